"""The edit as an exact PEFT LoRA adapter: parity through peft on tiny models, one-line refusals where
peft cannot express a writer, and a wrong adapter is caught."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny import make_model, make_tokenizer

from abliterate.adapters import resolve_adapter
from abliterate.batching import encode
from abliterate.certificate import DeclaredEdit
from abliterate.lora import describe, lora_state, peft_parity, write_lora
from abliterate.search import EditPoint, declared_edit

pytest.importorskip("peft")

PROFILE = EditPoint(layer=1.4, position=-1, embedding=0.3, attention=1.2, mlp=0.6, peak=1.0, width=2.0)


def _setup(model_type: str) -> tuple[torch.nn.Module, object, torch.Tensor, object]:
    model = make_model(model_type)
    d_model = model.get_input_embeddings().weight.shape[1]
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(3))
    prompts = encode(
        make_tokenizer(), ["Tell me a joke.", "How do I hack wifi?"], batch_size=8, share_prefix=False
    )
    return model, resolve_adapter(model), direction / direction.norm(), prompts


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma", "phi3"])
@pytest.mark.parametrize("point", [None, PROFILE], ids=["paper", "profile"])
def test_adapter_reproduces_the_edit_through_peft(
    model_type: str, point: EditPoint | None, tmp_path: Path
) -> None:
    model, adapter, direction, prompts = _setup(model_type)
    declared = declared_edit(direction, point, 4)
    strength_of = None if point is None else point.strength_of
    write_lora(model, adapter, direction, tmp_path, base_model="tiny", strength_of=strength_of)
    assert describe(tmp_path)["r"] == 1
    report = peft_parity(model, adapter, declared, tmp_path, prompts, "float32")
    assert report.passed, report.reason
    assert report.max_abs_logit_diff <= 1e-5 * report.logit_scale
    # The model is left as it was (the adapter is unloaded), and a wrong declared edit fails.
    assert not any("lora" in name for name, _ in model.named_modules())
    wrong = DeclaredEdit(torch.roll(direction, 1))
    assert not peft_parity(model, adapter, wrong, tmp_path, prompts, "float32").passed


def test_adapter_is_much_smaller_than_the_writers() -> None:
    model, adapter, direction, _ = _setup("llama")
    tensors, config = lora_state(copy.deepcopy(model), adapter, direction)
    lora_elements = sum(t.numel() for t in tensors.values())
    assert lora_elements < 0.2 * sum(p.numel() for p in model.parameters())
    assert config["lora_bias"] is False and config["fan_in_fan_out"] is False


@pytest.mark.parametrize(
    ("model_type", "named"), [("qwen3_moe", "experts"), ("gpt2", "lora_bias is not supported on Embedding")]
)
def test_writers_peft_cannot_express_are_refused_in_one_line(model_type: str, named: str) -> None:
    model, adapter, direction, _ = _setup(model_type)
    with pytest.raises(ValueError, match=named) as error:
        lora_state(model, adapter, direction)
    assert "\n" not in str(error.value) and "--format checkpoint" in str(error.value)


def test_apply_format_lora_from_a_direction_file(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from conftest import save_tiny

    from abliterate.cli import main
    from abliterate.direction import save_direction

    source = save_tiny(tmp_path / "model", "llama")
    direction = save_direction(tmp_path / "d.safetensors", torch.randn(64), 1, -1, "x")
    result = CliRunner().invoke(
        main,
        [
            "apply",
            str(source),
            "--direction",
            str(direction),
            "-o",
            str(tmp_path / "lora"),
            "--format",
            "lora",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert "parity through peft" in result.output


def test_run_format_lora_writes_an_adapter_proven_through_peft(tiny_qwen2: Path, tmp_path: Path) -> None:
    from abliterate import RunConfig, run

    output = tmp_path / "lora"
    result = run(
        RunConfig(
            model=str(tiny_qwen2),
            output=str(output),
            format="lora",
            layer=1,
            position=-1,
            n_train=8,
            n_val=4,
            n_eval=2,
            progress=False,
        )
    )
    manifest = result.manifest
    assert manifest["parity"]["passed"] and manifest["parity"]["parity"]["top1_agreement"] == 1.0
    assert "certificate" in manifest["parity"]["skipped"]
    assert manifest["weights"]["format"] == "lora"
    assert not list(output.glob("model*.safetensors"))
    assert (output / "adapter_config.json").is_file() and (output / "direction.safetensors").is_file()
    assert "PeftModel.from_pretrained" in (output / "README.md").read_text()
