"""The edit as an exact PEFT LoRA adapter of the edit's rank: parity through peft on every registered family
(or a one-line refusal that names the writer peft cannot express, from an explicit list), rank-2 adapters
from ``apply --format lora``, 16-bit parity, and wrong adapters (a wrong direction, a dropped second
direction) caught."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny import make_model, make_tokenizer, quick_lora_config

from abliterate.adapters.registry import registered_model_types
from abliterate.adapters.resolve import residual_writers, resolve_adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.lora_factors import lora_state
from abliterate.find.point import EditPoint, declared_edit
from abliterate.model.batching import encode
from abliterate.prove.lora_parity import peft_parity
from abliterate.ship.lora import describe, write_lora

pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

PROFILE = EditPoint(layer=1.4, position=-1, embedding=0.3, attention=1.2, mlp=0.6, peak=1.0, width=2.0)
# A rank-2 point: a second direction at weight 0.4, a strength profile, the embedding at strength 1 ...
RANK2 = EditPoint(
    layer=1.0, position=-1, attention=1.2, mlp=0.7, peak=1.0, width=3.0, second=-2, second_weight=0.4
)
# ... and the same point leaving the embedding alone (what families with writer biases can express).
RANK2_NO_EMBEDDING = EditPoint(**{**RANK2.__dict__, "embedding": 0.0})

# What peft 0.21 cannot hold in one exact adapter, per model type: the writer biases need lora_bias, which is
# one switch per adapter and which peft's Embedding and ParamWrapper (target_parameters) layers refuse. A type
# moving in or out of these lists fails the test.
_BIAS_AND_EMBEDDING = "lora_bias is one switch per adapter and peft's Embedding refuses it"
_EXPERT_BIAS = "cannot put a bias on a target_parameters tensor"
REFUSED = {
    "with embedding": {
        "codegen": _BIAS_AND_EMBEDDING,
        "falcon": _BIAS_AND_EMBEDDING,
        "gpt2": _BIAS_AND_EMBEDDING,
        "gpt_neox": _BIAS_AND_EMBEDDING,
        "gpt_oss": _EXPERT_BIAS,
        "gptj": _BIAS_AND_EMBEDDING,
        "phi": _BIAS_AND_EMBEDDING,
        "starcoder2": _BIAS_AND_EMBEDDING,
    },
    "without embedding": {"gpt_oss": _EXPERT_BIAS},
}
POINTS = {"with embedding": RANK2, "without embedding": RANK2_NO_EMBEDDING}


def _setup(model_type: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object, object]:
    model = make_model(model_type, dtype=dtype)
    prompts = encode(
        make_tokenizer(), ["Tell me a joke.", "How do I hack wifi?"], batch_size=8, share_prefix=False
    )
    return model, resolve_adapter(model), prompts


def _direction(d_model: int) -> torch.Tensor:
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(3))
    return direction / direction.norm()


def _basis(d_model: int, k: int = 2) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(d_model, k, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    )
    return q.T.contiguous().float()


def _d_model(model: torch.nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[1]


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
@pytest.mark.parametrize("point", [None, PROFILE], ids=["paper", "profile"])
def test_rank1_adapter_reproduces_the_edit_through_peft(
    model_type: str, point: EditPoint | None, tmp_path: Path
) -> None:
    model, adapter, prompts = _setup(model_type)
    direction = _direction(_d_model(model))
    declared = declared_edit(direction, point, 4)
    write_lora(model, adapter, declared, tmp_path, base_model="tiny")
    assert describe(tmp_path)["r"] == 1
    report = peft_parity(model, adapter, declared, tmp_path, prompts, "float32")
    assert report.passed, report.reason
    assert report.max_abs_logit_diff <= 1e-5 * report.logit_scale
    # The model is left as it was (the adapter is unloaded), and a wrong declared edit fails.
    assert not any("lora" in name for name, _ in model.named_modules())
    wrong = DeclaredEdit(torch.roll(direction, 1))
    assert not peft_parity(model, adapter, wrong, tmp_path, prompts, "float32").passed


@pytest.mark.parametrize("edit", list(POINTS))
@pytest.mark.parametrize("model_type", registered_model_types())
def test_every_family_passes_through_peft_or_is_refused_in_one_line(
    model_type: str, edit: str, tmp_path: Path
) -> None:
    """Rank 2 with a strength profile: parity through peft within 1e-5 of the logit scale, a rank-1 adapter's
    reference (the second direction dropped) fails; or exactly the expected one-line refusal."""
    model, adapter, prompts = _setup(model_type)
    basis = _basis(_d_model(model))
    declared = declared_edit(basis, POINTS[edit], model.config.num_hidden_layers)
    refusal = REFUSED[edit].get(model_type)
    if refusal is not None:
        with pytest.raises(ValueError, match=refusal) as error:
            write_lora(model, adapter, declared, tmp_path, base_model="tiny")
        assert "\n" not in str(error.value) and str(error.value).endswith("use --format checkpoint")
        assert not (tmp_path / "adapter_config.json").exists()
        return
    write_lora(model, adapter, declared, tmp_path, base_model="tiny")
    config = describe(tmp_path)
    assert config["r"] == config["lora_alpha"] == 2
    targets = set(config["target_modules"]) | {p.rsplit(".", 1)[0] for p in config["target_parameters"] or ()}
    expected = {
        w.name for w in residual_writers(model, adapter) if w.group != "embedding" or edit == "with embedding"
    }
    assert targets == expected
    report = peft_parity(model, adapter, declared, tmp_path, prompts, "float32")
    assert report.passed, report.reason
    assert report.max_abs_logit_diff <= 1e-5 * report.logit_scale
    first_only = DeclaredEdit(basis[0], declared.strengths, 1.0, declared.layer_strengths)
    assert not peft_parity(model, adapter, first_only, tmp_path, prompts, "float32").passed


def test_dense_and_shared_writers_of_moe_types_are_not_dropped_by_peft(tmp_path: Path) -> None:
    """peft's transformers-5 shim re-reads a target ending in ``.down_proj`` on Qwen2-MoE-like types as an
    expert name and drops it: the dense block's ``mlp.down_proj`` is targeted as a parameter instead, and
    peft wraps it."""
    model, adapter, _ = _setup("qwen3_moe")  # mlp_only_layers=[1]: block 1 is dense
    write_lora(model, adapter, DeclaredEdit(_direction(_d_model(model))), tmp_path, base_model="tiny")
    assert "model.layers.1.mlp.down_proj.weight" in describe(tmp_path)["target_parameters"]
    from abliterate.prove.lora_parity import load_lora

    wrapped = load_lora(model, tmp_path)
    try:
        dense = wrapped.get_submodule("base_model.model.model.layers.1.mlp.down_proj")
        assert "default" in dense.lora_A
    finally:
        wrapped.unload()


def test_refusals_name_the_writer() -> None:
    model, adapter, _ = _setup("qwen3_moe")
    direction = _direction(_d_model(model))
    # An experts tensor whose module claims the other orientation would be read transposed by peft.
    model.get_submodule("model.layers.0.mlp.experts").is_transposed = True
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.down_proj: .* other way round"):
        lora_state(model, adapter, DeclaredEdit(direction))
    model, adapter, _ = _setup("gpt2")
    with pytest.raises(
        ValueError, match=r"transformer\.h\.0\.attn\.c_proj\.bias and the embedding transformer\.wte"
    ):
        lora_state(model, adapter, DeclaredEdit(direction))


def test_adapter_size_grows_with_the_rank_only() -> None:
    model, adapter, _ = _setup("llama")
    d_model = _d_model(model)
    rank1, config = lora_state(copy.deepcopy(model), adapter, DeclaredEdit(_direction(d_model)))
    rank2, _ = lora_state(model, adapter, DeclaredEdit(_basis(d_model), weights=(1.0, 0.4)))
    elements = sum(t.numel() for t in rank1.values())
    assert elements < 0.2 * sum(p.numel() for p in model.parameters())
    assert sum(t.numel() for t in rank2.values()) == 2 * elements
    assert config["lora_bias"] is False and config["fan_in_fan_out"] is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_parity_through_peft_uses_the_measured_floor(dtype: torch.dtype, tmp_path: Path) -> None:
    model, adapter, prompts = _setup("qwen3_moe", dtype)
    basis = _basis(_d_model(model))
    declared = DeclaredEdit(basis, weights=(1.0, 0.4))
    write_lora(model, adapter, declared, tmp_path, base_model="tiny")
    name = str(dtype).removeprefix("torch.")
    report = peft_parity(model, adapter, declared, tmp_path, prompts, name)
    assert report.passed, report.reason
    assert report.floor_mean_kl is not None and report.trimmed_mean_kl <= report.mean_kl_limit
    assert not peft_parity(model, adapter, DeclaredEdit(basis[0]), tmp_path, prompts, name).passed


def test_apply_format_lora_writes_a_rank2_adapter_and_a_rank1_file_fails_against_it(tmp_path: Path) -> None:
    """``apply --format lora`` with a rank-2 direction file: a rank-2 adapter that passes parity through peft;
    the same source with only the first direction gives an adapter that fails against the rank-2 edit."""
    from click.testing import CliRunner
    from conftest import save_tiny
    from transformers import AutoModelForCausalLM

    from abliterate.cli import main
    from abliterate.ship.direction_file import (
        declared_from_file,
        load_direction,
        point_metadata,
        save_direction,
    )

    source = save_tiny(tmp_path / "model", "qwen2")
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    adapter = resolve_adapter(model)
    n_layers = model.config.num_hidden_layers
    basis = _basis(_d_model(model))
    files = {
        "rank2": save_direction(
            tmp_path / "r2.safetensors", basis, 1, -1, "x", extra=point_metadata(RANK2, n_layers)
        ),
        "rank1": save_direction(
            tmp_path / "r1.safetensors", basis[0], 1, -1, "x", extra=point_metadata(PROFILE, n_layers)
        ),
    }
    runner = CliRunner()
    for name, path in files.items():
        result = runner.invoke(
            main,
            ["apply", str(source), "--direction", str(path), "-o", str(tmp_path / name), "--format", "lora"],
        )
        assert result.exit_code == 0, result.output
        assert "parity through peft" in result.output
    assert describe(tmp_path / "rank2")["r"] == 2 and describe(tmp_path / "rank1")["r"] == 1
    assert "rank-2 LoRA" in (tmp_path / "rank2" / "README.md").read_text()
    declared = declared_from_file(*load_direction(files["rank2"]))
    prompts = encode(
        make_tokenizer(), ["Tell me a joke.", "How do I hack wifi?"], batch_size=8, share_prefix=False
    )
    assert peft_parity(model, adapter, declared, tmp_path / "rank2", prompts, "float32").passed
    assert not peft_parity(model, adapter, declared, tmp_path / "rank1", prompts, "float32").passed


def test_run_format_lora_writes_an_adapter_proven_through_peft(tiny_qwen2: Path, tmp_path: Path) -> None:
    from abliterate import run

    output = tmp_path / "lora"
    result = run(quick_lora_config(tiny_qwen2, output))
    manifest = result.manifest
    assert manifest["gate"]["passed"] and manifest["gate"]["parity"]["top1_agreement"] == 1.0
    assert "certificate" in manifest["gate"]["skipped"]
    assert manifest["weights"]["format"] == "lora"
    assert not list(output.glob("model*.safetensors"))
    assert (output / "adapter_config.json").is_file() and (output / "direction.safetensors").is_file()
    assert "PeftModel.from_pretrained" in (output / "README.md").read_text()
