"""Pre-quantized checkpoints are refused before heavy work; GGUF runs save bf16 by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny
from safetensors.torch import load_file
from tiny import quick_run_args

from abliterate.cli import main
from abliterate.edit.declared import DeclaredEdit
from abliterate.ship.direction_file import save_direction

FAST = quick_run_args(4, 2, layer=1)


def _quantized(directory: Path, method: str, nested: bool = False) -> Path:
    save_tiny(directory, "qwen2")
    config = json.loads((directory / "config.json").read_text())
    quantization = {"quant_method": method, "bits": 4}
    if nested:
        config["text_config"] = {"model_type": "qwen2", "quantization_config": quantization}
    else:
        config["quantization_config"] = quantization
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    ("method", "nested"), [("fp8", False), ("gptq", False), ("compressed-tensors", True)]
)
def test_run_refuses_a_prequantized_checkpoint_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, nested: bool
) -> None:
    source = _quantized(tmp_path / "model", method, nested)

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pre-quantized model was loaded")

    monkeypatch.setattr("abliterate.model.loading.load_model", must_not_load)
    output = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(source), "-o", str(output), *FAST])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert f"pre-quantized ({method})" in lines[0]
    assert "unquantized release" in lines[0] and "--direction-only" in lines[0]
    assert not output.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_apply_refuses_a_prequantized_checkpoint(tmp_path: Path) -> None:
    source = _quantized(tmp_path / "model", "awq")
    direction = tmp_path / "direction.safetensors"
    save_direction(direction, torch.randn(64), 1, -1, "test")
    output = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["apply", str(source), "--direction", str(direction), "-o", str(output)]
    )
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert "pre-quantized (awq)" in result.output and "unquantized release" in result.output
    assert not output.exists()


def test_a_gguf_quantization_config_is_not_refused(tmp_path: Path) -> None:
    from abliterate.model.sources import describe_source, refuse_prequantized

    source = _quantized(tmp_path / "model", "gguf")
    refuse_prequantized(describe_source(str(source)))  # does not raise


def _fake_gguf_load(checkpoint: Path, calls: list[dict], gguf: Path | None = None) -> object:
    """``load_model`` as for a GGUF file: the dequantized float32 weights, ``from_gguf`` set, and the
    tokenizer read from ``gguf`` when given (what a real GGUF load saves, and what the gate compares)."""
    from transformers import AutoTokenizer

    from abliterate.model import loading

    real = loading.load_model

    def load(source: str, **options: object) -> loading.LoadedModel:
        calls.append(options)
        loaded = real(str(checkpoint), **options)
        loaded.from_gguf = True
        if gguf is not None:
            loaded.tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return loaded

    return load


@pytest.mark.parametrize(("dtype", "saved"), [("auto", torch.bfloat16), ("float32", torch.float32)])
def test_gguf_output_is_bf16_unless_asked(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, saved: torch.dtype
) -> None:
    """The fold is computed in float32 from the dequantized weights and rounded once, at the end."""
    from tiny_gguf import write_gguf
    from transformers import AutoModelForCausalLM

    from abliterate.adapters.resolve import resolve_adapter
    from abliterate.edit.walker import fold_direction

    # The load below is the tiny checkpoint's; the certificate reads the same weights from this GGUF (F32).
    gguf = write_gguf(tmp_path / "model.gguf", AutoModelForCausalLM.from_pretrained(tiny_qwen2))
    calls: list[dict] = []
    monkeypatch.setattr("abliterate.model.loading.load_model", _fake_gguf_load(tiny_qwen2, calls, gguf))
    output = tmp_path / "out"
    args = ["run", str(gguf), "-o", str(output), "--dtype", dtype, "--no-evaluate", *FAST]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert calls[0]["dtype"] == "float32"
    manifest = json.loads((output / "abliterate.json").read_text())
    assert manifest["model"]["dtype"] == str(saved).removeprefix("torch.")
    gate = manifest["gate"]
    assert gate["passed"] and gate["parity"]["dtype"] == manifest["model"]["dtype"]
    certificate = gate["certificate"]  # against the dequantized GGUF, folded in float32 before the cast
    assert certificate["passed"] and certificate["n_exact"] == certificate["n_edited"] > 0
    weights = load_file(output / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {saved}
    # Bitwise: the float32 fold of the original, cast once.
    expected = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    direction = load_file(output / "direction.safetensors")["direction"]
    fold_direction(expected, resolve_adapter(expected), DeclaredEdit(direction))
    for name, tensor in expected.to(saved).state_dict().items():
        assert torch.equal(weights[name], tensor), name
