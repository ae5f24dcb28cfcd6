"""Streaming apply: bitwise equal to the in-memory fold, bounded memory, atomic output, clear errors."""

from __future__ import annotations

import filecmp
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiny
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from abliterate.adapters.registry import get_adapter
from abliterate.adapters.resolve import model_type_of
from abliterate.edit import tiles
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.walker import fold_direction
from abliterate.errors import GateError
from abliterate.io.safetensors import INDEX_NAME
from abliterate.prove.certificate import certify_checkpoint
from abliterate.ship import streaming
from abliterate.ship.direction_file import load_direction, save_direction
from abliterate.ship.streaming import StreamReport, stream_apply

REPO_ROOT = Path(__file__).resolve().parents[1]
D_MODEL = 64


# ----------------------------------------------------------------------------------------------- helpers


def _model(model_type: str, dtype: torch.dtype = torch.float32, **overrides: object) -> torch.nn.Module:
    """A seeded tiny model of a registered family from ``tests/tiny.py``."""
    return tiny.make_model(model_type, seed=0, dtype=dtype, **overrides)


def _direction(seed: int = 1, size: int = D_MODEL) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


def _save(model: torch.nn.Module, path: Path, sharded: bool) -> Path:
    if sharded:
        model.save_pretrained(path, max_shard_size="20KB")
        assert len(list(path.glob("model-*.safetensors"))) > 3
    else:
        model.save_pretrained(path)
        assert (path / "model.safetensors").is_file()
    return path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("model*.safetensors")):
        state.update(load_file(file))
    return state


def _assert_bitwise_equal(streamed: dict[str, torch.Tensor], folded: dict[str, torch.Tensor]) -> None:
    assert sorted(streamed) == sorted(folded)
    for name, tensor in folded.items():
        assert streamed[name].dtype == tensor.dtype, name
        assert torch.equal(streamed[name], tensor), name


def _leftovers(parent: Path) -> list[str]:
    """Temporary or backup directories a failed run might have left next to the output."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def llama_checkpoint(tmp_path: Path) -> Path:
    model = _model("llama")
    path = _save(model, tmp_path / "llama", sharded=True)
    tiny.make_tokenizer().save_pretrained(path)
    return path


# ------------------------------------------------------------------------------ equality with the fold

CASES = [
    pytest.param("llama", {"tie_word_embeddings": False}, id="llama-untied"),
    pytest.param("llama", {"tie_word_embeddings": True}, id="llama-tied"),
    pytest.param("qwen2", {}, id="qwen2-qkv-bias"),
    pytest.param("qwen3_moe", {}, id="qwen3_moe-experts"),
]


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("model_type", "overrides"), CASES)
def test_stream_apply_equals_in_memory_fold(
    tmp_path: Path, model_type: str, overrides: dict, dtype: torch.dtype, sharded: bool
) -> None:
    model = _model(model_type, dtype, **overrides)
    original = _save(model, tmp_path / "original", sharded)
    tiny.make_tokenizer().save_pretrained(original)
    original_state = _tensors(original)
    direction = _direction()

    report = stream_apply(original, DeclaredEdit(direction), tmp_path / "streamed", progress=False)

    adapter = get_adapter(model_type)
    assert adapter is not None
    fold_direction(model, adapter, DeclaredEdit(direction))
    folded = _save(model, tmp_path / "folded", sharded)
    streamed_state = _tensors(tmp_path / "streamed")
    _assert_bitwise_equal(streamed_state, _tensors(folded))

    # Something was edited and the report says so; untouched tensors are the original ones.
    changed = [name for name in original_state if not torch.equal(original_state[name], streamed_state[name])]
    assert (
        report.tensors_edited
        >= len(changed)
        > 2 * tiny.CONFIGS.get(model_type, {}).get("num_hidden_layers", 2)
    )
    assert report.model_type == model_type and report.output == (tmp_path / "streamed").absolute()
    assert report.tensors_total == len(streamed_state) and report.bytes_written > 0

    # Tied embeddings are untied: the head keeps the original matrix.
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    if overrides.get("tie_word_embeddings"):
        assert config["tie_word_embeddings"] is False
        assert "lm_head.weight" not in original_state
        assert torch.equal(streamed_state["lm_head.weight"], original_state["model.embed_tokens.weight"])

    # Layout preserved: shard names, index, header metadata, tokenizer and generation config.
    out = tmp_path / "streamed"
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        p.name for p in original.glob("*.safetensors")
    )
    for shard in original.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as before, safe_open(str(out / shard.name), "pt") as after:
            assert before.metadata() == after.metadata()
        if not any(name in changed or name == "lm_head.weight" for name in load_file(out / shard.name)):
            assert filecmp.cmp(shard, out / shard.name, shallow=False), shard.name
    if sharded:
        index_before = json.loads((original / INDEX_NAME).read_text())["weight_map"]
        index_after = json.loads((out / INDEX_NAME).read_text())["weight_map"]
        assert {k: v for k, v in index_after.items() if k in index_before} == index_before
        assert set(index_after) - set(index_before) <= {"lm_head.weight"}
        assert set(index_after) == set(streamed_state)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert filecmp.cmp(original / name, out / name, shallow=False), name

    # The streamed checkpoint loads and computes exactly what the folded model computes.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    folded_reloaded = AutoModelForCausalLM.from_pretrained(folded, dtype=dtype).eval()
    ids = torch.randint(3, tiny.VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = reloaded(ids).logits
        torch.testing.assert_close(logits, folded_reloaded(ids).logits, rtol=0, atol=0)
        # In bf16 the in-memory model also holds its rotary inv_freq buffer in bf16 (``model.to(dtype)``),
        # while a loaded one computes it in float32: equal up to bf16 rounding of the positions' angles.
        exact = dtype == torch.float32
        torch.testing.assert_close(
            logits, model(ids).logits, rtol=0 if exact else 0.05, atol=0 if exact else 0.1
        )


def _registered_tiny_types() -> list[str]:
    return [model_type for model_type in tiny.CONFIGS if get_adapter(model_type) is not None]


@pytest.mark.parametrize("model_type", _registered_tiny_types())
def test_every_registered_family_streams_like_the_fold(tmp_path: Path, model_type: str) -> None:
    model = _model(model_type)
    original = _save(model, tmp_path / "original", sharded=False)
    direction = _direction()
    report = stream_apply(original, DeclaredEdit(direction), tmp_path / "streamed", progress=False)
    adapter = get_adapter(model_type)
    assert adapter is not None
    fold_direction(model, adapter, DeclaredEdit(direction))
    _assert_bitwise_equal(_tensors(tmp_path / "streamed"), _tensors(_save(model, tmp_path / "folded", False)))
    assert report.tensors_edited > 0


def test_multimodal_checkpoint_uses_the_text_config(tmp_path: Path) -> None:
    model = tiny.make_multimodal_model()
    original = _save(model, tmp_path / "original", sharded=True)
    direction = _direction()
    report = stream_apply(original, DeclaredEdit(direction), tmp_path / "streamed", progress=False)
    fold_direction(model, get_adapter(model_type_of(model)), DeclaredEdit(direction))
    _assert_bitwise_equal(_tensors(tmp_path / "streamed"), _tensors(_save(model, tmp_path / "folded", True)))
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert report.model_type == config["text_config"]["model_type"]
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False


def test_fused_experts_on_disk(tmp_path: Path) -> None:
    """A checkpoint holding the fused in-memory expert tensors (``mlp.experts.down_proj`` [E, d, f])."""
    model = _model("qwen3_moe", torch.bfloat16)
    original = tmp_path / "fused"
    original.mkdir()
    model.config.to_json_file(original / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, original / "model.safetensors")
    direction = _direction()
    stream_apply(original, DeclaredEdit(direction), tmp_path / "streamed", progress=False)
    fold_direction(model, get_adapter("qwen3_moe"), DeclaredEdit(direction))
    streamed = load_file(tmp_path / "streamed" / "model.safetensors")
    fused = [name for name in streamed if name.endswith("mlp.experts.down_proj")]
    assert fused and all(streamed[name].dim() == 3 for name in fused)
    _assert_bitwise_equal(streamed, {k: v for k, v in model.state_dict().items() if k in streamed})


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3_moe", "gpt_oss"])
def test_sliced_edit_of_large_tensors_equals_whole_edit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_type: str
) -> None:
    """Tensors above the tile size are edited tile by tile; the result is still bitwise the fold's."""
    if model_type not in tiny.CONFIGS:
        pytest.skip(f"tests/tiny.py has no {model_type} config")
    monkeypatch.setattr(tiles, "TILE_ELEMENTS", 1000)
    model = _model(model_type)
    original = _save(model, tmp_path / "original", sharded=False)
    direction = _direction()
    stream_apply(original, DeclaredEdit(direction), tmp_path / "streamed", progress=False)
    fold_direction(model, get_adapter(model_type), DeclaredEdit(direction))
    _assert_bitwise_equal(_tensors(tmp_path / "streamed"), _tensors(_save(model, tmp_path / "folded", False)))


@pytest.mark.parametrize("failure", ["missing", "cross-device"])
def test_copies_without_copy_file_range(
    llama_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """Where the kernel cannot copy (not Linux, or another file system), bytes go through user space."""
    expected = stream_apply(llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "kernel", progress=False)
    if failure == "missing":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:

        def cross_device(*args: object) -> int:
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", cross_device)
    report = stream_apply(llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "user", progress=False)
    assert report.bytes_written == expected.bytes_written
    for shard in (tmp_path / "kernel").glob("*.safetensors"):
        assert filecmp.cmp(shard, tmp_path / "user" / shard.name, shallow=False), shard.name


# ---------------------------------------------------------------------------------- output directory


def _earlier_output(out: Path) -> None:
    """An earlier abliterate output at ``out`` (its manifest), which ``--overwrite`` may replace."""
    out.mkdir()
    (out / "abliterate.json").write_text('{"abliterate_version": "0"}')
    (out / "keep.txt").write_text("old")


def test_overwrite_replaces_only_after_success(llama_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _earlier_output(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        stream_apply(llama_checkpoint, DeclaredEdit(_direction()), out, progress=False)
    assert (out / "keep.txt").read_text() == "old" and _leftovers(tmp_path) == []

    stream_apply(llama_checkpoint, DeclaredEdit(_direction()), out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / INDEX_NAME).is_file()
    assert _leftovers(tmp_path) == []


def test_empty_existing_output_is_used(llama_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    stream_apply(llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interruption_leaves_nothing(
    llama_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt: type[BaseException]
) -> None:
    out = tmp_path / "out"
    _earlier_output(out)
    calls = []

    def failing(*args: object) -> None:
        calls.append(args)
        if len(calls) == 3:
            raise interrupt("stop")
        original_edit(*args)

    original_edit = streaming.fold_into
    monkeypatch.setattr(streaming, "fold_into", failing)
    with pytest.raises(interrupt):
        stream_apply(llama_checkpoint, DeclaredEdit(_direction()), out, overwrite=True, progress=False)
    assert len(calls) == 3
    assert sorted(p.name for p in out.iterdir()) == ["abliterate.json", "keep.txt"]
    assert _leftovers(tmp_path) == []


def test_output_inside_checkpoint_is_refused(llama_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="overlaps the model source"):
        stream_apply(
            llama_checkpoint, DeclaredEdit(_direction()), llama_checkpoint / "edited", progress=False
        )
    assert not (llama_checkpoint / "edited").exists()


def test_read_only_parent(llama_checkpoint: Path, tmp_path: Path) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (see the simulated variant below)")
        with pytest.raises(PermissionError, match="not writable"):
            stream_apply(llama_checkpoint, DeclaredEdit(_direction()), parent / "out", progress=False)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_unwritable_parent_simulated(
    llama_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check where chmod is ineffective (root): ``os.access`` reports the parent unwritable."""
    parent = tmp_path / "locked"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != parent and real_access(path, mode))
    with pytest.raises(PermissionError, match=f"{parent} is not writable"):
        stream_apply(llama_checkpoint, DeclaredEdit(_direction()), parent / "out", progress=False)
    assert list(parent.iterdir()) == []


def test_temp_dir_creation_refused(
    llama_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_mkdir = Path.mkdir

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        if ".tmp-" in self.name:
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(PermissionError, match="not writable"):
        stream_apply(llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------- bad inputs


def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert _leftovers(out.parent) == [] and _leftovers(tmp_path) == []


def test_missing_index_with_shards_present(llama_checkpoint: Path, tmp_path: Path) -> None:
    (llama_checkpoint / INDEX_NAME).unlink()
    with pytest.raises(ValueError, match=r"has shards \(model-00001-of-.*no model.safetensors.index.json"):
        stream_apply(llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_missing_shard(llama_checkpoint: Path, tmp_path: Path) -> None:
    missing = sorted(llama_checkpoint.glob("model-*.safetensors"))[2]
    missing.unlink()
    with pytest.raises(ValueError, match=f"lacks shard.*{missing.name}"):
        stream_apply(llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_index_pointing_at_the_wrong_shard(llama_checkpoint: Path, tmp_path: Path) -> None:
    index = json.loads((llama_checkpoint / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    (llama_checkpoint / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"places {name} in {shards[1]}"):
        stream_apply(llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_truncated_shard(llama_checkpoint: Path, tmp_path: Path) -> None:
    shard = sorted(llama_checkpoint.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        stream_apply(llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_no_safetensors_at_all(tmp_path: Path) -> None:
    checkpoint = tmp_path / "empty"
    checkpoint.mkdir()
    _model("llama").config.to_json_file(checkpoint / "config.json")
    (checkpoint / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="only safetensors checkpoints can be streamed"):
        stream_apply(checkpoint, DeclaredEdit(_direction()), tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_missing_config(llama_checkpoint: Path, tmp_path: Path) -> None:
    (llama_checkpoint / "config.json").unlink()
    with pytest.raises(ValueError, match=r"has no config\.json"):
        stream_apply(llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_missing_local_path_that_is_no_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a local directory nor a Hub id"):
        stream_apply(
            tmp_path / "no" / "such" / "dir", DeclaredEdit(_direction()), tmp_path / "out", progress=False
        )


@pytest.mark.parametrize(
    ("direction", "message"),
    [
        (_direction(size=D_MODEL + 1), r"65 entries .*d_model=64.*another model"),
        (torch.zeros(D_MODEL), "zero vector"),
        (torch.full((D_MODEL,), math.nan), "NaN or infinite"),
        (torch.ones(2, D_MODEL), "orthonormal"),  # a subspace's rows must be orthogonal
        (torch.ones(2, 3, D_MODEL), r"must be \[d_model\]"),
    ],
    ids=["wrong-size", "zero", "nan", "2d-not-orthogonal", "3d"],
)
def test_bad_direction(llama_checkpoint: Path, tmp_path: Path, direction: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stream_apply(llama_checkpoint, DeclaredEdit(direction), tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_unknown_architecture(llama_checkpoint: Path, tmp_path: Path) -> None:
    config = json.loads((llama_checkpoint / "config.json").read_text())
    config["model_type"] = "my_custom_llama"
    (llama_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(LookupError, match=r"'my_custom_llama'.*--architecture"):
        stream_apply(llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "out", progress=False)
    with pytest.raises(LookupError, match=r"'nope' \(given with --architecture\)"):
        stream_apply(
            llama_checkpoint,
            DeclaredEdit(_direction()),
            tmp_path / "out",
            architecture="nope",
            progress=False,
        )
    _assert_nothing_written(tmp_path, tmp_path / "out")

    report = stream_apply(
        llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "out", architecture="llama", progress=False
    )
    assert report.model_type == "llama" and report.tensors_edited == 9


def test_wrong_architecture_matches_nothing(llama_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="matches the gpt2 adapter's patterns"):
        stream_apply(
            llama_checkpoint,
            DeclaredEdit(_direction()),
            tmp_path / "out",
            architecture="gpt2",
            progress=False,
        )
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_quantized_checkpoint_refused(llama_checkpoint: Path, tmp_path: Path) -> None:
    config = json.loads((llama_checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (llama_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantized \(fp8\)"):
        stream_apply(llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_stale_weight_files_are_not_copied(llama_checkpoint: Path, tmp_path: Path) -> None:
    (llama_checkpoint / "pytorch_model.bin").write_bytes(b"unedited weights")
    (llama_checkpoint / "notes.txt").write_text("hello")
    stream_apply(llama_checkpoint, DeclaredEdit(_direction()), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    assert (tmp_path / "out" / "notes.txt").read_text() == "hello"


# ------------------------------------------------------------------------------------------- hub ids


def test_hub_id_is_downloaded_with_safetensors_patterns(
    llama_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls: list[dict] = []

    def fake_download(**kwargs: object) -> str:
        calls.append(kwargs)
        return str(llama_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    report = stream_apply("someone/tiny-llama", DeclaredEdit(_direction()), tmp_path / "out", progress=False)
    assert calls and calls[0]["repo_id"] == "someone/tiny-llama"
    assert "*.safetensors" in calls[0]["allow_patterns"] and "tokenizer*" in calls[0]["allow_patterns"]
    assert report.tensors_edited == 9


# ----------------------------------------------------------------------------------------- direction


def test_direction_file_round_trip(tmp_path: Path) -> None:
    vector = _direction() * 3.0
    path = save_direction(tmp_path / "direction.safetensors", vector, 2, -1, "someone/model", {"kl": "0.01"})
    loaded, metadata = load_direction(path)
    assert loaded.dtype == torch.float32 and loaded.shape == (D_MODEL,)
    torch.testing.assert_close(loaded, (vector / vector.norm()).float())
    assert metadata == {"layer": "2", "position": "-1", "source": "someone/model", "kl": "0.01"}


def test_direction_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_direction(tmp_path / "missing.safetensors")
    save_file({"other": torch.ones(4)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"no tensor named 'direction'.*other"):
        load_direction(tmp_path / "other.safetensors")
    for name, tensor, message in [
        ("matrix", torch.ones(2, 4), "orthonormal"),
        ("cube", torch.ones(2, 2, 4), r"must be \[d_model\]"),
        ("nan", torch.tensor([1.0, math.inf]), "NaN or infinite"),
        ("zero", torch.zeros(4), "zero vector"),
    ]:
        save_file({"direction": tensor}, tmp_path / f"{name}.safetensors")
        with pytest.raises(ValueError, match=message):
            load_direction(tmp_path / f"{name}.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_direction(tmp_path / "garbage.safetensors")
    with pytest.raises(ValueError, match="would override"):
        save_direction(tmp_path / "d.safetensors", torch.ones(4), 0, -1, "m", {"layer": "3"})


def test_stream_apply_accepts_a_loaded_direction_file(llama_checkpoint: Path, tmp_path: Path) -> None:
    path = save_direction(tmp_path / "direction.safetensors", _direction(), 1, -1, str(llama_checkpoint))
    direction, _ = load_direction(path)
    report = stream_apply(llama_checkpoint, DeclaredEdit(direction), tmp_path / "out", progress=False)
    assert isinstance(report, StreamReport) and report.tensors_edited == 9


# -------------------------------------------------------------------------------------------- memory

# A llama-shaped bf16 checkpoint of ~400 MiB in shards of <= 52 MiB, written tensor by tensor.
_HIDDEN, _FFN, _VOCAB, _LAYERS, _SHARD_LIMIT = 1024, 2816, 16384, 14, 52 << 20


def _write_synthetic_llama(path: Path) -> int:
    """Write the checkpoint without instantiating a model; return the largest shard's size in bytes."""
    path.mkdir()
    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=_HIDDEN,
        intermediate_size=_FFN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=_VOCAB,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    (path / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (_VOCAB, _HIDDEN)}
    for layer in range(_LAYERS):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{name}.weight"] = (_HIDDEN, _HIDDEN)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (_FFN, _HIDDEN)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (_FFN, _HIDDEN)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (_HIDDEN, _FFN)
        shapes[f"{prefix}.input_layernorm.weight"] = (_HIDDEN,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (_HIDDEN,)
    shapes["model.norm.weight"] = (_HIDDEN,)
    shapes["lm_head.weight"] = (_VOCAB, _HIDDEN)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > _SHARD_LIMIT:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    pattern = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(torch.bfloat16)
    weight_map = {}
    for number, names in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            numel = math.prod(shapes[name])
            tensors[name] = pattern.repeat(-(-numel // pattern.numel()))[:numel].reshape(shapes[name])
            weight_map[name] = file
        save_file(tensors, path / file, metadata={"format": "pt"})
        del tensors
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return max(p.stat().st_size for p in path.glob("*.safetensors"))


_MEASURE = textwrap.dedent(
    """
    import json, resource, sys, torch
    from abliterate.edit.declared import DeclaredEdit
    from abliterate.prove.structure import read_structure
    from abliterate.ship.streaming import stream_apply

    # The certificate builds the model on the meta device: transformers' modeling code is imported once
    # (~150 MB of Python modules, whatever the checkpoint's size). Import it before the baseline, so the
    # peak below is the data that streaming and certifying hold.
    read_structure(__import__("pathlib").Path(sys.argv[1]))

    def status(key):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))

    direction = torch.randn(int(sys.argv[3]))
    # ru_maxrss carries the parent's peak across fork + exec on Linux, so the peak is read from this
    # process's own high-water mark (VmHWM), reset to the current RSS once everything is imported.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    baseline = status("VmRSS")
    report = stream_apply(sys.argv[1], DeclaredEdit(direction), sys.argv[2], progress=False)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "edited": report.tensors_edited,
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    """
)


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS"
)
def test_peak_memory_is_bounded_by_the_largest_shard(tmp_path: Path) -> None:
    checkpoint = tmp_path / "synthetic"
    largest_shard = _write_synthetic_llama(checkpoint)
    total = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    margin = 48 << 20
    assert total > 4 * (largest_shard + margin)  # an implementation holding the model could not pass

    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(checkpoint), str(tmp_path / "out"), str(_HIDDEN)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=300,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    increase = measured["peak"] - measured["baseline"]
    assert measured["edited"] == 1 + 2 * _LAYERS
    # It reads the largest edited tensor (the 32 MiB embedding) whole: the measurement must see it.
    assert increase >= _VOCAB * _HIDDEN * 2
    assert increase <= largest_shard + margin, f"peak RSS grew by {increase / 2**20:.0f} MiB"


def test_a_fold_that_overflows_float16_fails_the_certificate_and_writes_nothing(tmp_path: Path) -> None:
    """The fold is checked finite tile by tile while it is written: a strength-1.5 fold that pushes one
    float16 element past 65504 (its source finite) is caught as an overflow, not as a bad source."""
    model = _model("llama").half()
    direction = torch.zeros(D_MODEL)
    direction[:4] = 1.0  # r̂ = (1, 1, 1, 1, 0, …) / 2
    weight = model.model.layers[0].self_attn.o_proj.weight.data
    # Column 0 = (40000, −40000, −40000, −40000, 0, …): p = r̂ᵀw = −40000 and W'₀ = 40000 + s · 20000,
    # 60000 at s = 1 (finite), 70000 at s = 1.5 (over float16's 65504).
    weight[:, 0] = 0
    weight[:4, 0] = torch.tensor([40000.0, -40000.0, -40000.0, -40000.0])
    source = _save(model, tmp_path / "fp16", sharded=False)
    out = tmp_path / "out"
    with pytest.raises(GateError, match=r"o_proj\.weight: the declared fold overflows to NaN/Inf in F16"):
        stream_apply(source, DeclaredEdit(direction, default_strength=1.5), out, progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []
    # Written without the certificate, the overflowed fold is what the declared edit gives, bit for bit:
    # the certificate still refuses it (its tile check falls back to the path that says why).
    stream_apply(source, DeclaredEdit(direction, default_strength=1.5), out, progress=False, certify=False)
    certificate = certify_checkpoint(
        source, out, DeclaredEdit(direction, default_strength=1.5), progress=False
    )
    assert (
        not certificate.passed
        and "o_proj.weight (attention 0): the declared fold overflows" in certificate.reason
    )
    shutil.rmtree(out)
    # The same edit of the finite source at strength 1 stays finite and is written.
    stream_apply(source, DeclaredEdit(direction), out, progress=False)
    assert out.is_dir()
