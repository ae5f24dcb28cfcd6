"""A GGUF source loaded one tensor at a time is the model transformers loads from it, bit for bit.

``load_gguf_model`` replaces transformers' GGUF loading (a whole float32 state dict beside the model) for
``run``, ``apply`` and the demo; it must give the same parameters, buffers, config and generation config,
for llama's Q/K row permutation, tied and untied heads, and F32, F16 and Q8_0 tensors alike.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import make_model
from tiny_gguf import MIXED, write_gguf

from abliterate.model import gguf as gguf_loading
from abliterate.model.loading import load_model

pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

_IGNORED_CONFIG_KEYS = {"_name_or_path", "quantization_config", "transformers_version"}


def _gguf(directory: Path, model_type: str, tied: bool) -> Path:
    torch.manual_seed(0)
    return write_gguf(directory / "model.gguf", make_model(model_type, tie_word_embeddings=tied), MIXED)


def _transformers_load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def _config(model: torch.nn.Module) -> dict:
    return {k: v for k, v in model.config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}


@pytest.mark.parametrize(("model_type", "tied"), [("llama", False), ("qwen2", True), ("qwen2", False)])
def test_streamed_gguf_is_transformers_gguf_bit_for_bit(tmp_path: Path, model_type: str, tied: bool) -> None:
    path = _gguf(tmp_path, model_type, tied)
    expected = _transformers_load(path)
    loaded = load_model(str(path), dtype="float32", device="cpu")
    assert loaded.from_gguf
    model = loaded.model
    assert not hasattr(model, "hf_quantizer") or model.hf_quantizer is None
    theirs = dict(expected.named_parameters(remove_duplicate=False))
    ours = dict(model.named_parameters(remove_duplicate=False))
    assert ours.keys() == theirs.keys()
    for name, parameter in ours.items():
        assert parameter.dtype == theirs[name].dtype == torch.float32
        assert torch.equal(parameter, theirs[name]), name
    assert dict(model.named_buffers()).keys() == dict(expected.named_buffers()).keys()
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, dict(expected.named_buffers())[name]), name
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head is embedding) == tied
    assert _config(model) == _config(expected)
    assert model.generation_config.to_dict() == expected.generation_config.to_dict()
    ids = torch.arange(12).reshape(2, 6)
    assert torch.equal(model(ids).logits, expected(ids).logits)


def test_each_parameter_is_memory_of_its_own(tmp_path: Path) -> None:
    """F32 tensors dequantize to views of the memory-mapped file: the fold writes in place, so every
    parameter must own its memory (a shared or read-only one would corrupt or crash the fold)."""
    path = _gguf(tmp_path, "qwen2", tied=False)
    written = path.read_bytes()
    model = load_model(str(path), dtype="float32", device="cpu").model
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)
    for parameter in model.parameters():
        parameter.add_(1.0)  # writable
    assert path.read_bytes() == written


def test_a_shape_the_model_does_not_expect_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _gguf(tmp_path, "qwen2", tied=False)
    original = gguf_loading._assign

    def truncated(slots: dict, name: str, value: object, where: Path) -> None:
        original(slots, name, value[:1] if name.endswith("o_proj.weight") else value, where)

    monkeypatch.setattr(gguf_loading, "_assign", truncated)
    with pytest.raises(ValueError, match=r"o_proj\.weight has shape"):
        gguf_loading.load_gguf_model(path)


def test_tensors_that_do_not_cover_the_model_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parameter no GGUF tensor fills would keep uninitialized memory: that model is not returned."""
    path = _gguf(tmp_path, "qwen2", tied=False)
    original = gguf_loading._produced_names

    def without_one(*args: object) -> dict[str, set[str]]:
        produced = original(*args)
        produced["blk.0.ffn_down.weight"] = set()
        return produced

    monkeypatch.setattr(gguf_loading, "_produced_names", without_one)
    assert gguf_loading.load_gguf_model(path) is None
    # load_model then loads through transformers: the same model, at transformers' memory cost.
    loaded = load_model(str(path), dtype="float32", device="cpu")
    expected = _transformers_load(path)
    for name, parameter in loaded.model.named_parameters():
        assert torch.equal(parameter, dict(expected.named_parameters())[name]), name


@pytest.mark.parametrize("tied", [True, False])
def test_rounded_copy_is_deepcopy_then_cast(tied: bool) -> None:
    """The gate's reference for a GGUF run (the original rounded to the saved dtype) is built one tensor at
    a time; it must be exactly ``copy.deepcopy(model).to(dtype)``, ties kept, nothing shared."""
    import copy

    torch.manual_seed(0)
    model = make_model("qwen2", tie_word_embeddings=tied)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    expected = copy.deepcopy(model).to(torch.bfloat16)
    rounded = gguf_loading.rounded_copy(model, torch.bfloat16)
    theirs = dict(expected.named_parameters(remove_duplicate=False))
    for name, parameter in rounded.named_parameters(remove_duplicate=False):
        assert parameter.dtype == torch.bfloat16 and torch.equal(parameter, theirs[name]), name
    for name, buffer in rounded.named_buffers():
        assert torch.equal(buffer, dict(expected.named_buffers())[name]), name
    assert (rounded.get_output_embeddings().weight is rounded.get_input_embeddings().weight) == tied
    ids = torch.arange(12).reshape(2, 6)
    assert torch.equal(rounded(ids).logits, expected(ids).logits)
    originals = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not originals & {p.untyped_storage().data_ptr() for p in rounded.parameters()}
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, before[name]), name
