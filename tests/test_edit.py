"""The fold's invariants, per writer kind: nothing it edits can write along r̂ afterwards.

For every layout the edited weight must (1) have no component along r̂ on its model axis and (2) act
as the original followed by the projection ``I − r̂ r̂ᵀ``, so that the folded module's output equals
the hooked module's output. ``orthogonalize`` must be pure and keep the input dtype.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny import make_model
from torch.nn import functional
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from abliterate.adapters.resolve import resolve_adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.kernel import orthogonalize
from abliterate.edit.walker import fold_direction, untie_embeddings
from abliterate.model.hooks import project_out

D_MODEL, D_IN, N_EXPERTS = 16, 24, 4


def _random(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.fixture
def direction() -> torch.Tensor:
    vector = _random(D_MODEL, seed=99)
    return vector / vector.norm()


def test_linear(direction: torch.Tensor) -> None:
    weight, inputs = _random(D_MODEL, D_IN), _random(5, D_IN, seed=1)  # nn.Linear: [out, in]
    edited = orthogonalize(weight, direction, "linear")
    torch.testing.assert_close(direction @ edited, torch.zeros(D_IN, dtype=torch.float64))
    torch.testing.assert_close(
        functional.linear(inputs, edited), project_out(functional.linear(inputs, weight), direction)
    )


def test_conv1d_with_bias(direction: torch.Tensor) -> None:
    # GPT-2 Conv1D stores [in, out] and computes x @ W + b.
    module = Conv1D(D_MODEL, D_IN).double()
    with torch.no_grad():
        module.weight.copy_(_random(D_IN, D_MODEL, seed=1))
        module.bias.copy_(_random(D_MODEL, seed=2))
    inputs = _random(5, D_IN, seed=3)
    with torch.no_grad():
        expected = project_out(module(inputs), direction)
        module.weight.copy_(orthogonalize(module.weight, direction, "conv1d"))
        module.bias.copy_(orthogonalize(module.bias, direction, "embedding"))
        torch.testing.assert_close(module(inputs), expected)
    torch.testing.assert_close(module.weight.detach() @ direction, torch.zeros(D_IN, dtype=torch.float64))
    torch.testing.assert_close(module.bias.detach() @ direction, torch.tensor(0.0, dtype=torch.float64))


def test_fused_experts(direction: torch.Tensor) -> None:
    # Mixtral-style [E, d_model, d_in], applied as F.linear(x, W[e]).
    weight, inputs = _random(N_EXPERTS, D_MODEL, D_IN), _random(5, D_IN, seed=1)
    edited = orthogonalize(weight, direction, "experts")
    torch.testing.assert_close(
        torch.einsum("d,edi->ei", direction, edited), torch.zeros(N_EXPERTS, D_IN, dtype=torch.float64)
    )
    for expert in range(N_EXPERTS):
        torch.testing.assert_close(
            functional.linear(inputs, edited[expert]),
            project_out(functional.linear(inputs, weight[expert]), direction),
        )


def test_fused_experts_transposed_with_per_expert_bias(direction: torch.Tensor) -> None:
    # GPT-OSS: down_proj [E, d_in, d_model] applied as x @ W[e] + b[e], down_proj_bias [E, d_model].
    weight, bias = _random(N_EXPERTS, D_IN, D_MODEL), _random(N_EXPERTS, D_MODEL, seed=1)
    inputs = _random(5, D_IN, seed=2)
    edited, edited_bias = (
        orthogonalize(weight, direction, "experts_t"),
        orthogonalize(bias, direction, "embedding"),
    )
    torch.testing.assert_close(edited @ direction, torch.zeros(N_EXPERTS, D_IN, dtype=torch.float64))
    torch.testing.assert_close(edited_bias @ direction, torch.zeros(N_EXPERTS, dtype=torch.float64))
    for expert in range(N_EXPERTS):
        torch.testing.assert_close(
            inputs @ edited[expert] + edited_bias[expert],
            project_out(inputs @ weight[expert] + bias[expert], direction),
        )


def test_bias(direction: torch.Tensor) -> None:
    bias = _random(D_MODEL, seed=1)
    edited = orthogonalize(bias, direction, "embedding")
    torch.testing.assert_close(edited, project_out(bias, direction))
    torch.testing.assert_close(edited @ direction, torch.tensor(0.0, dtype=torch.float64))


def test_embedding_rows(direction: torch.Tensor) -> None:
    table = _random(50, D_MODEL)  # [vocab, d_model]: each row is written into the residual stream
    edited = orthogonalize(table, direction, "embedding")
    torch.testing.assert_close(edited @ direction, torch.zeros(50, dtype=torch.float64))
    torch.testing.assert_close(edited, project_out(table, direction))


def test_a_wrong_layout_breaks_the_invariant(direction: torch.Tensor) -> None:
    # The layouts are not interchangeable: folding a Linear weight as Conv1D leaves r̂ writable.
    weight = _random(D_MODEL, D_MODEL)
    wrongly_edited = orthogonalize(weight, direction, "conv1d")
    assert (direction @ wrongly_edited).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_orthogonalize_is_pure_and_keeps_the_dtype(direction: torch.Tensor, dtype: torch.dtype) -> None:
    weight = _random(D_MODEL, D_IN, dtype=dtype)
    before = weight.clone()
    edited = orthogonalize(weight, direction.float(), "linear")
    assert torch.equal(weight, before)
    assert edited.data_ptr() != weight.data_ptr()
    assert edited.dtype == dtype and edited.shape == weight.shape
    # Computed in float64 and rounded once: within half a unit in the last place of the exact result
    # (a computation in bf16 itself would be off by several units).
    unit = direction.float().double() / direction.float().double().norm()
    exact = weight.double() - torch.outer(unit, unit @ weight.double())
    half_ulp = torch.finfo(dtype).eps / 2 * (1 + 1e-9)
    assert ((edited.double() - exact).abs() <= half_ulp * exact.abs()).all()


def test_direction_length_and_validity(direction: torch.Tensor) -> None:
    weight = _random(D_MODEL, D_IN)
    torch.testing.assert_close(
        orthogonalize(weight, 7.5 * direction, "linear"), orthogonalize(weight, direction, "linear")
    )
    with pytest.raises(ValueError, match="non-zero"):
        orthogonalize(weight, torch.zeros(D_MODEL), "linear")
    with pytest.raises(ValueError, match="non-zero"):
        orthogonalize(weight, torch.full((D_MODEL,), float("nan")), "linear")
    with pytest.raises(ValueError, match="layout"):
        orthogonalize(weight, direction, "transposed")  # type: ignore[arg-type]


def _unit(size: int, seed: int) -> torch.Tensor:
    vector = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fold_unties_embeddings_and_keeps_the_head(tied: bool, tmp_path: Path) -> None:
    model = make_model("llama", tie_word_embeddings=tied)
    adapter = resolve_adapter(model)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    head = model.lm_head.weight.detach().clone()
    embedding = model.model.embed_tokens.weight.detach().clone()
    direction = _unit(model.config.hidden_size, seed=3)

    fold_direction(model, adapter, DeclaredEdit(direction))
    assert torch.equal(model.lm_head.weight, head)
    assert not torch.equal(model.model.embed_tokens.weight, embedding)
    torch.testing.assert_close(
        model.model.embed_tokens.weight @ direction, torch.zeros(model.config.vocab_size), atol=1e-6, rtol=0
    )
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False

    # The untied head survives a save and reload.
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.lm_head.weight, head)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_untie_reports_whether_weights_were_tied() -> None:
    tied, untied = make_model("llama", tie_word_embeddings=True), make_model("llama")
    assert untie_embeddings(tied, resolve_adapter(tied)) is True
    assert untie_embeddings(untied, resolve_adapter(untied)) is False


def test_fold_in_a_model_edits_exactly_the_writers() -> None:
    # GPT-2: two embeddings, and per block two Conv1D writers with biases.
    model = make_model("gpt2")
    before = copy.deepcopy(model.state_dict())
    direction = _unit(model.config.hidden_size, seed=4)
    edited = fold_direction(model, resolve_adapter(model), DeclaredEdit(direction))
    assert edited == 2 + model.config.n_layer * 2 * 2
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    expected = {"transformer.wte.weight", "transformer.wpe.weight"} | {
        f"transformer.h.{layer}.{part}.c_proj.{kind}"
        for layer in range(model.config.n_layer)
        for part in ("attn", "mlp")
        for kind in ("weight", "bias")
    }
    assert changed - {"lm_head.weight"} == expected
    for name in expected:
        tensor = model.state_dict()[name]
        assert (tensor @ direction).abs().max() < 1e-5, name


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "qwen2_moe", "deepseek_v3"])
def test_fold_in_moe_models_edits_every_expert_and_nothing_that_reads(model_type: str) -> None:
    model = make_model(model_type)
    adapter = resolve_adapter(model)
    before = copy.deepcopy(model.state_dict())
    direction = _unit(model.config.hidden_size, seed=5)
    fold_direction(model, adapter, DeclaredEdit(direction))
    after = model.state_dict()
    for name, tensor in after.items():
        # Routers, gate_up projections and their biases read the residual stream: never edited.
        if any(
            part in name for part in ("gate_up_proj", "router", "mlp.gate.", "q_proj", "k_proj", "v_proj")
        ):
            assert torch.equal(tensor, before[name]), name
    for layer, block in enumerate(model.model.layers):
        experts = getattr(block.mlp, "experts", None)
        if experts is None:
            continue
        if model_type == "gpt_oss":  # [E, d_in, d_model], bias [E, d_model]
            assert (experts.down_proj @ direction).abs().max() < 1e-5, layer
            assert (experts.down_proj_bias @ direction).abs().max() < 1e-5, layer
        else:  # [E, d_model, d_in]
            assert torch.einsum("d,edi->ei", direction, experts.down_proj).abs().max() < 1e-5, layer
