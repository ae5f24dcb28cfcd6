"""Every registered architecture: the weight fold reproduces the hooked original, in fp32 and bf16.

One test, parametrized over the adapter registry, so a newly registered family is covered without
touching this file (``tiny.CONFIGS`` must then hold a tiny config for it). Each numeric check is also
run against a deliberately wrong direction and must reject it.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import CONFIGS, VOCAB_SIZE, make_model, make_multimodal_model
from torch import nn

from abliterate.adapters import (
    Adapter,
    Writer,
    discovery,
    get_adapter,
    registered_model_types,
    residual_writers,
    resolve_adapter,
)
from abliterate.adapters.discovery import discover_adapter, structure_of
from abliterate.adapters.matrix import readme_matrix, support_matrix_markdown
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.walker import fold_direction
from abliterate.find.scores import kl_divergence
from abliterate.model.hooks import ablated, projection
from abliterate.prove.parity import compare_logits
from abliterate.prove.residual import full_projection, residual_sites, residual_terms

# The support matrix claims fp32 and bf16 parity for exactly these model types.
PARITY_MODEL_TYPES = registered_model_types()

# fp32: hooks and fold differ only in rounding order, measured ≈ 1e-6 of the logit scale.
FP32_RELATIVE_BOUND = 1e-4
# Residual stream left along r̂ after ablating every residual term, relative to its size.
RESIDUAL_LEAK_BOUND = 1e-5

# bf16. A bf16 model is off the fp32 reference by rounding noise before any edit: its weights were
# rounded once (relative error ≤ u = 2⁻⁸) and every matmul rounds again. The fold, computed in float64
# from those bf16 weights and rounded back once, adds at most one more rounding of the same size per
# edited weight. With e_cast the logit error of the hooked bf16 model and e_fold the extra error of the
# folded one, |e_cast' + e_fold|² ≤ 2|e_cast'|² + 2|e_fold|² ≲ 4|e_cast|², and KL ≈ ½·Var(Δlogit) for
# small errors, so KL(reference ‖ folded bf16) ≲ 4 · KL(reference ‖ hooked bf16). MoE routers turn part
# of that noise into discrete expert flips at a few positions, whose count fluctuates between two
# equally noisy runs (over 6 seeds the measured ratio reached 3.5 for deepseek_v3); a further factor 2
# covers that. A wrong direction lands 20× (deepseek_v3) to 2000× above the noise instead.
BF16_KL_NOISE_FACTOR = 8.0
# Top-1: only positions whose top-2 margin is below the noise amplitude can flip, and the folded
# model's amplitude is at most twice the cast's, so at most twice as many positions disagree with the
# reference, plus a few for the Poisson fluctuation of such small counts.
BF16_TOP1_FACTOR = 2
BF16_TOP1_SLACK = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.double().reshape(-1, VOCAB_SIZE)


def _hooked(model: nn.Module, adapter: Adapter, direction: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    with ablated(model, adapter, projection(direction)):
        return _logits(model, ids)


def fp32_agrees(reference: torch.Tensor, edited: torch.Tensor) -> bool:
    """The fp32 parity check: max |Δlogit| ≤ 1e-4 · max |logit|."""
    return (reference - edited).abs().max().item() <= FP32_RELATIVE_BOUND * reference.abs().max().item()


def bf16_agrees(reference: torch.Tensor, hooked_bf16: torch.Tensor, edited_bf16: torch.Tensor) -> bool:
    """The bf16 parity check: mean KL and top-1 against the fp32 reference, bounded by the bf16 noise.

    Args:
        reference: fp32 logits of the hooked original.
        hooked_bf16: logits of the same hooks on the bf16 model (the noise floor of bf16 itself).
        edited_bf16: logits of the model folded in bf16.
    """
    noise_kl = kl_divergence(reference, hooked_bf16).mean().item()
    edited_kl = kl_divergence(reference, edited_bf16).mean().item()
    noise_flips = (reference.argmax(-1) != hooked_bf16.argmax(-1)).sum().item()
    edited_flips = (reference.argmax(-1) != edited_bf16.argmax(-1)).sum().item()
    return (
        edited_kl <= BF16_KL_NOISE_FACTOR * noise_kl
        and edited_flips <= BF16_TOP1_FACTOR * noise_flips + BF16_TOP1_SLACK
    )


def _residual_leak(model: nn.Module, adapter: Adapter, direction: torch.Tensor, ids: torch.Tensor) -> float:
    """Largest |h · r̂| / max |h| over every block input and the last block's output."""
    from abliterate.adapters.resolve import blocks_of

    _, blocks = blocks_of(model, adapter)
    leaks: list[float] = []

    def measure(hidden: torch.Tensor) -> None:
        hidden = hidden.double()
        leaks.append((hidden @ direction.double()).abs().max().item() / hidden.abs().max().item())

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        measure(args[0] if args else kwargs["hidden_states"])

    def post_hook(module: nn.Module, args: tuple, output: object) -> None:
        measure(output if isinstance(output, torch.Tensor) else output[0])

    handles = [block.register_forward_pre_hook(pre_hook, with_kwargs=True) for block in blocks]
    handles.append(blocks[-1].register_forward_hook(post_hook))
    try:
        with ablated(model, adapter, full_projection(direction), where=residual_sites):
            _logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return max(leaks)


@pytest.mark.parametrize("model_type", PARITY_MODEL_TYPES)
def test_fold_reproduces_hooked_original(model_type: str) -> None:
    model = make_model(model_type)
    adapter = resolve_adapter(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 20), generator=generator)
    direction = torch.randn(model.config.hidden_size, generator=generator, dtype=torch.float64)
    direction = (direction / direction.norm()).float()
    wrong = torch.randn(model.config.hidden_size, generator=generator, dtype=torch.float64)
    wrong = (wrong / wrong.norm()).float()

    # The module structure alone identifies the family, as discovery would for an unknown type.
    assert structure_of(discover_adapter(model, "unregistered")) == structure_of(adapter)

    # Every term added to the residual stream is known: ablating them leaves no r̂ in it anywhere.
    assert _residual_leak(model, adapter, direction, ids) <= RESIDUAL_LEAK_BOUND

    reference = _hooked(model, adapter, direction, ids)
    wrong_reference = _hooked(model, adapter, wrong, ids)
    folded = copy.deepcopy(model)
    fold_direction(folded, adapter, DeclaredEdit(direction))
    edited = _logits(folded, ids)
    assert fp32_agrees(reference, edited), compare_logits(reference, edited, "float32")
    assert not fp32_agrees(wrong_reference, edited)

    # Post-norm families: the fold equals the writer hooks, not full residual-stream ablation; the
    # distance to the latter is what the report gives next to parity.
    with ablated(model, adapter, full_projection(direction), where=residual_sites):
        full = compare_logits(_logits(model, ids), edited, "float32")
    if adapter.post_norm:
        assert 0 < full.max_abs_logit_diff < float("inf")
    else:
        assert full.passed, full.reason

    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    hooked_bf16 = _hooked(model_bf16, adapter, direction, ids)
    wrong_hooked_bf16 = _hooked(model_bf16, adapter, wrong, ids)
    fold_direction(model_bf16, adapter, DeclaredEdit(direction))
    assert all(param.dtype == torch.bfloat16 for param in model_bf16.parameters())
    edited_bf16 = _logits(model_bf16, ids)
    assert bf16_agrees(reference, hooked_bf16, edited_bf16), compare_logits(
        reference, edited_bf16, "bfloat16"
    )
    assert not bf16_agrees(wrong_reference, wrong_hooked_bf16, edited_bf16)


def test_every_registered_type_has_a_tiny_config() -> None:
    assert set(registered_model_types()) <= set(CONFIGS)


def test_post_norm_flag_matches_output_norms() -> None:
    for model_type in registered_model_types():
        adapter = get_adapter(model_type)
        assert adapter.post_norm == any(writer.output_norm for writer in adapter.writers), model_type


def test_multimodal_wrapper_resolves_to_its_text_model() -> None:
    model = make_multimodal_model()
    adapter = resolve_adapter(model)
    assert "gemma3_text" in adapter.model_types
    names = [writer.name for writer in residual_writers(model, adapter)]
    assert names[0] == "model.language_model.embed_tokens"
    assert all(name.startswith("model.language_model.") for name in names)
    assert len(names) == 1 + 2 * model.config.text_config.num_hidden_layers

    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    direction = torch.randn(model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(1))
    reference = _hooked(model, adapter, direction, ids)
    fold_direction(model, adapter, DeclaredEdit(direction))
    assert fp32_agrees(reference, _logits(model, ids))


def test_discovery_finds_a_registered_structure_under_an_unknown_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = make_model("qwen3")
    model.config.model_type = "mystery_lm"
    with caplog.at_level(logging.WARNING, logger="abliterate.adapters.discovery"):
        adapter = resolve_adapter(model)
    assert structure_of(adapter) == structure_of(get_adapter("qwen3"))
    assert "mystery_lm" in caplog.text and adapter.name in caplog.text


def test_discovery_prefers_the_more_specific_structure() -> None:
    # A Gemma-2 block has every path a llama block has, plus the sandwich norms.
    model = make_model("gemma2")
    assert discover_adapter(model, "mystery_lm") is get_adapter("gemma2")


def test_discovery_rejects_an_unmatched_model() -> None:
    model = nn.Module()
    model.config = SimpleNamespace(model_type="mystery_lm")
    model.transformer = nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(4, 4)])})
    with pytest.raises(LookupError, match=r"mystery_lm.*--architecture"):
        resolve_adapter(model)


def test_discovery_rejects_an_ambiguous_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two registered structures that differ only where the module names cannot tell them apart.
    llama = get_adapter("llama")
    twin = Adapter(
        model_types=("llama_twin",),
        blocks=llama.blocks,
        embeddings=llama.embeddings,
        writers=(Writer("self_attn.o_proj", bias=None), Writer("mlp.down_proj", bias=None)),
    )
    monkeypatch.setattr(discovery, "registered_adapters", lambda: [llama, twin])
    with pytest.raises(LookupError, match=r"mystery_lm.*several.*--architecture"):
        discover_adapter(make_model("llama"), "mystery_lm")


def test_residual_terms_are_the_output_norms_of_post_norm_families() -> None:
    model = make_model("gemma2")
    adapter = resolve_adapter(model)
    terms = residual_terms(model, adapter)
    block = model.model.layers[0]
    assert block.post_attention_layernorm in terms and block.post_feedforward_layernorm in terms
    assert block.self_attn.o_proj not in terms


def test_support_matrix_parity_columns_come_from_the_measurement() -> None:
    """The gate columns are read from benchmarks/gate_by_family.py's measurement, which must cover the
    whole registry in every dtype, with the complete edit passing and every control rejected."""
    import json

    from abliterate.adapters.matrix import MEASURED_GATE

    assert PARITY_MODEL_TYPES == registered_model_types()
    measured = json.loads(MEASURED_GATE.read_text())
    assert set(measured) >= set(registered_model_types()), "rerun benchmarks/gate_by_family.py"
    for model_type in registered_model_types():
        for dtype in ("float32", "bfloat16", "float16"):
            row = measured[model_type][dtype]
            assert row["complete_passes"] and row["controls_rejected"] == row["controls"] > 0, (
                model_type,
                dtype,
            )
    rows = support_matrix_markdown().strip().splitlines()[2:]
    assert [row.split("|")[1].strip().strip("`") for row in rows] == registered_model_types()
    assert all(row.count("controls rejected") == 3 for row in rows)


def test_readme_support_matrix_is_current() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    published = readme_matrix(readme.read_text(encoding="utf-8")) if readme.exists() else None
    if published is None or not published.strip():
        pytest.skip("README.md has no support matrix between the markers yet")
    assert published == support_matrix_markdown(), (
        "README support matrix is stale: paste `python -m abliterate.adapters.matrix`"
    )
