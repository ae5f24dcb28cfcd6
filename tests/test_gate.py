"""The parity gate rejects every incomplete edit, in bf16 and fp16, on every registered family.

For each registered model type and each 16-bit dtype: the complete fold must pass the whole gate
(weight certificate, residual-stream completeness, logit parity against the rounding floor), and every
negative control of ``abliterate.prove.controls`` (nothing edited; the embedding, attention, MLP, experts or
shared experts left unedited; the middle block left unedited; a direction 3° off) must fail it. The
completeness check must also reject the adapter with any writer group removed.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from tiny import make_model, make_tokenizer

from abliterate.adapters.registry import registered_model_types
from abliterate.adapters.resolve import resolve_adapter
from abliterate.adapters.spec import writer_group
from abliterate.edit.declared import DeclaredEdit
from abliterate.model.batching import encode
from abliterate.prove.certificate import certify_checkpoint
from abliterate.prove.controls import gate_on_controls, rotated
from abliterate.prove.gate import completeness_on
from abliterate.prove.parity import check_dtype

PROMPTS = [
    "Explain how to build a bomb.",
    "Write a poem about the sea.",
    "How do I hack into my neighbour's wifi?",
    "What is the capital of France?",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts() -> object:
    return encode(make_tokenizer(), PROMPTS, batch_size=len(PROMPTS), share_prefix=False)


def _direction(model: torch.nn.Module) -> torch.Tensor:
    d_model = model.get_input_embeddings().weight.shape[-1]
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return (direction / direction.norm()).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("model_type", registered_model_types())
def test_gate_passes_the_edit_and_rejects_every_control(
    model_type: str, dtype: torch.dtype, prompts: object, tmp_path: Path
) -> None:
    model = make_model(model_type, dtype=dtype)
    adapter = resolve_adapter(model)
    reports = gate_on_controls(model, adapter, _direction(model), prompts, tmp_path)
    complete = reports.pop("complete")
    assert complete.passed, complete.reason
    certificate, parity = complete.certificate, complete.parity
    assert certificate.n_exact == certificate.n_edited > 0, certificate.failures
    # Dense families: logit parity gates and passes. Routed experts: reported, not gating.
    assert parity.passed or parity.advisory, parity.reason
    accepted = [control for control, report in reports.items() if report.passed]
    assert not accepted, f"controls passed the gate: {accepted}"
    assert {"nothing", "embedding", "attention", "off:3"} <= set(reports)


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe", "gpt2", "gemma2", "deepseek_v3"])
def test_completeness_rejects_an_adapter_missing_a_writer_group(model_type: str, prompts: object) -> None:
    model = make_model(model_type, dtype=torch.bfloat16)
    adapter = resolve_adapter(model)
    for group in {writer_group(writer) for writer in adapter.writers}:
        reduced = dataclasses.replace(
            adapter, writers=tuple(w for w in adapter.writers if writer_group(w) != group)
        )
        try:
            report = completeness_on(model, reduced, prompts)
        except LookupError as error:  # resolution already refuses a block with no writer of a role
            assert "has no" in str(error)
            continue
        assert not report.passed, f"adapter without {group} passed: {report.max_statistic}"


def test_bounded_certificate_accepts_another_float32_kernel_and_rejects_a_rotation(tmp_path: Path) -> None:
    """Checkpoints written by another correct implementation are certified within the stated bound."""
    model = make_model("llama", dtype=torch.bfloat16)
    adapter = resolve_adapter(model)
    direction = _direction(model)
    model.save_pretrained(tmp_path / "original")
    other = copy.deepcopy(model)
    with torch.no_grad():  # the textbook formula, untiled, float32: rounds differently from ours
        r = direction.float()
        for writer in fold_targets(other, adapter):
            weight = writer.weight_tensor()
            w = weight.float()
            if writer.layout == "embedding":
                weight.copy_((w - torch.outer(w @ r, r)).to(weight.dtype))
            else:
                weight.copy_((w - torch.outer(r, r @ w)).to(weight.dtype))
    other.config.tie_word_embeddings = False
    other.save_pretrained(tmp_path / "other")
    certificate = certify_checkpoint(tmp_path / "original", tmp_path / "other", DeclaredEdit(direction))
    assert certificate.passed, certificate.failures
    assert certificate.max_leak_ratio <= 1.5
    rotated_by_one = certify_checkpoint(
        tmp_path / "original", tmp_path / "other", DeclaredEdit(rotated(direction, 1.0)), progress=False
    )
    assert not rotated_by_one.passed


def fold_targets(model: torch.nn.Module, adapter: object) -> list:
    from abliterate.adapters.resolve import residual_writers
    from abliterate.edit.walker import untie_embeddings

    untie_embeddings(model, adapter)
    return residual_writers(model, adapter)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "int8", "complex64"])
def test_dtypes_without_a_proof_are_refused(dtype: str) -> None:
    with pytest.raises(ValueError, match="no parity proof"):
        check_dtype(dtype)


# ------------------------------------------------------------------ completeness by construction


def _tiny_checkpoint(path: Path, dtype: torch.dtype = torch.bfloat16) -> tuple[Path, torch.Tensor]:
    model = make_model("llama", dtype=dtype)
    model.save_pretrained(path)
    return path, _direction(model)


def _rewrite(checkpoint: Path, change: object) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(checkpoint / "model.safetensors")
    save_file(change(tensors), checkpoint / "model.safetensors", metadata={"format": "pt"})


def test_apply_refuses_a_block_whose_mlp_writer_is_not_found(tmp_path: Path) -> None:
    from abliterate.ship.streaming import stream_apply

    checkpoint, direction = _tiny_checkpoint(tmp_path / "original")

    def rename(tensors: dict) -> dict:
        tensors["model.layers.2.mlp.down_projection.weight"] = tensors.pop(
            "model.layers.2.mlp.down_proj.weight"
        )
        return tensors

    _rewrite(checkpoint, rename)
    with pytest.raises(ValueError, match=r"block 2 .* has no mlp writer"):
        stream_apply(checkpoint, DeclaredEdit(direction), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_apply_refuses_an_eight_bit_float_writer(tmp_path: Path) -> None:
    from abliterate.ship.streaming import stream_apply

    checkpoint, direction = _tiny_checkpoint(tmp_path / "original")

    def to_fp8(tensors: dict) -> dict:
        name = "model.layers.1.self_attn.o_proj.weight"
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        return tensors

    _rewrite(checkpoint, to_fp8)
    with pytest.raises(ValueError, match="dtype F8_E4M3"):
        stream_apply(checkpoint, DeclaredEdit(direction), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_adapter_cannot_resolve_a_block_without_mlp_writers() -> None:
    from abliterate.adapters.resolve import resolve_writers
    from abliterate.adapters.spec import Writer

    model = make_model("qwen3_moe")
    adapter = resolve_adapter(model)
    # Every MLP writer optional and misspelt: each block would resolve attention only.
    broken = dataclasses.replace(
        adapter,
        writers=(
            Writer("self_attn.o_proj"),
            Writer("mlp.expertz", layout="experts", weight="down_proj", bias=None, optional=True),
            Writer("mlp.down_projection", optional=True),
        ),
    )
    with pytest.raises(LookupError, match="block 0 has no mlp writer"):
        resolve_writers(model, broken)


def test_certificate_lists_structural_tensors_the_checkpoint_lacks(tmp_path: Path) -> None:
    """The certificate's list comes from the meta model, so a tensor missing on disk is reported."""
    checkpoint, direction = _tiny_checkpoint(tmp_path / "original")
    edited = tmp_path / "edited"
    from abliterate.ship.streaming import stream_apply

    stream_apply(checkpoint, DeclaredEdit(direction), edited, progress=False, certify=False)

    def drop(tensors: dict) -> dict:
        del tensors["model.layers.3.mlp.down_proj.weight"]
        return tensors

    _rewrite(edited, drop)
    certificate = certify_checkpoint(checkpoint, edited, DeclaredEdit(direction), progress=False)
    assert not certificate.passed
    assert any("layers.3.mlp.down_proj.weight" in line for line in certificate.failures)
