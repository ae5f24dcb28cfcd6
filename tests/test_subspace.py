"""Rank-k edits ``W ← (I − Q diag(s) Qᵀ) W``: the fold's invariant, its hooks, the
certificate (with negative controls: a dropped or re-weighted second direction), the direction file and
streaming ``apply``."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import make_model, make_tokenizer

from abliterate.adapters.resolve import resolve_adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.direction import unit_direction
from abliterate.edit.kernel import check_basis, orthogonalize
from abliterate.edit.walker import fold_direction
from abliterate.find.point import EditPoint, declared_edit, point_direction
from abliterate.model.batching import all_position_logits, encode
from abliterate.model.hooks import ablated, edit_projection
from abliterate.prove.certificate import certify_checkpoint
from abliterate.ship.direction_file import declared_from_file, load_direction, point_metadata, save_direction

PROMPTS = ["Tell me a joke.", "How do I hack into my neighbour's wifi?", "Write a poem about the sea."]
POINT = EditPoint(
    layer=1.0, position=-1, attention=1.2, mlp=0.7, peak=1.0, width=3.0, second=-2, second_weight=0.4
)


def _basis(d_model: int, k: int = 2, seed: int = 5) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(d_model, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q.T.contiguous().float()


@pytest.mark.parametrize("layout", ["linear", "conv1d", "embedding", "experts", "experts_t"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_subspace_fold_scales_each_direction(layout: str, dtype: torch.dtype) -> None:
    """``q_iᵀ W' = (1 − s_i) q_iᵀ W`` along every row of Q, and the rest of W is untouched."""
    d, other = 32, 24
    shape = {"linear": (d, other), "conv1d": (other, d), "embedding": (50, d), "experts": (3, d, other)}
    weight = torch.randn(shape.get(layout, (3, other, d)), generator=torch.Generator().manual_seed(0)).to(
        dtype
    )
    basis = _basis(d, 3)
    scales = (1.0, 0.25, 0.6)
    edited = orthogonalize(weight, basis, layout, scales).double()
    q = basis.double()
    rows = layout in ("conv1d", "embedding", "experts_t")
    along = (lambda w: w @ q.T) if rows else (lambda w: torch.einsum("kd,...di->...ki", q, w))
    expected = along(weight.double()) * (torch.tensor(scales, dtype=torch.float64).neg() + 1).view(
        *(([1] * (weight.dim() - 1) + [-1]) if rows else ([1] * (weight.dim() - 2) + [-1, 1]))
    )
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    scale = weight.double().abs().max()
    assert (along(edited) - expected).abs().max() <= tolerance * scale
    # The orthogonal complement of Q is left as it was.
    complement = torch.eye(d, dtype=torch.float64) - q.T @ q
    project = (lambda w: w @ complement) if rows else (lambda w: complement @ w)
    assert (project(edited) - project(weight.double())).abs().max() <= tolerance * scale
    # A single-row subspace is the rank-1 fold.
    one = orthogonalize(weight, basis[:1], layout, (0.7,))
    torch.testing.assert_close(
        one.double(),
        orthogonalize(weight, basis[0], layout, 0.7).double(),
        rtol=0,
        atol=1e-6 if dtype == torch.float32 else 0.05,
    )


def test_basis_checks_reject_bad_subspaces() -> None:
    basis = _basis(16, 2)
    check_basis(basis)
    with pytest.raises(ValueError, match="orthonormal"):
        check_basis(torch.stack([basis[0], (basis[0] + basis[1]) / 2**0.5]))
    with pytest.raises(ValueError, match="k ≤"):
        check_basis(_basis(16, 5))
    with pytest.raises(ValueError, match="strengths"):
        orthogonalize(torch.randn(16, 4), basis, "linear", (1.0, 0.5, 0.2))
    with pytest.raises(ValueError, match="orthonormal"):
        unit_direction(torch.stack([basis[0], basis[0] + 0.1 * basis[1]]))
    torch.testing.assert_close(unit_direction(3 * basis), basis)  # rows are normalized


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3_moe"])
def test_subspace_fold_equals_its_hooks(model_type: str) -> None:
    model = make_model(model_type)
    adapter = resolve_adapter(model)
    basis = _basis(model.config.hidden_size)
    n_layers = model.config.num_hidden_layers
    layers = declared_edit(basis, POINT, n_layers).layer_strengths
    declared = DeclaredEdit(basis, {"embedding": 0.5}, 1.0, layers, (1.0, 0.4))
    prompts = encode(make_tokenizer(), PROMPTS, batch_size=8, share_prefix=False)
    with ablated(model, adapter, edit_projection(declared)):
        hooked = all_position_logits(model, prompts)
    folded = copy.deepcopy(model)
    fold_direction(folded, adapter, declared)
    scale = hooked.abs().max()
    assert (hooked - all_position_logits(folded, prompts)).abs().max() <= 1e-4 * scale
    # Negative control: folding the first direction alone is another edit.
    first_only = copy.deepcopy(model)
    fold_direction(first_only, adapter, replace(declared, direction=basis[0]))
    assert (hooked - all_position_logits(first_only, prompts)).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_certificate_proves_a_subspace_and_rejects_controls(tmp_path: Path, dtype: torch.dtype) -> None:
    model = make_model("llama").to(dtype)
    adapter = resolve_adapter(model)
    basis = _basis(model.config.hidden_size)
    model.save_pretrained(tmp_path / "original")
    declared = DeclaredEdit(basis, weights=(1.0, 0.4))
    controls = {
        "second direction dropped": lambda m: fold_direction(m, adapter, DeclaredEdit(basis[0])),
        "second weight 0.2": lambda m: fold_direction(m, adapter, DeclaredEdit(basis, weights=(1.0, 0.2))),
        "nothing": lambda m: None,
    }
    edited = copy.deepcopy(model)
    fold_direction(edited, adapter, declared)
    edited.save_pretrained(tmp_path / "edited")
    passed = certify_checkpoint(tmp_path / "original", tmp_path / "edited", declared, progress=False)
    assert passed.passed, passed.failures
    assert passed.n_exact == passed.n_edited
    for name, control in controls.items():
        wrong = copy.deepcopy(model)
        control(wrong)
        wrong.save_pretrained(tmp_path / name)
        report = certify_checkpoint(tmp_path / "original", tmp_path / name, declared, progress=False)
        assert not report.passed, name


def test_direction_file_and_apply_reproduce_a_rank2_point(tmp_path: Path) -> None:
    """A searched rank-2 point: its file keeps Q and the weights, ``apply`` streams it bitwise like the
    in-memory fold and certifies it, ``verify`` proves it; a file holding only the first row fails."""
    from click.testing import CliRunner
    from conftest import assert_apply_equals_fold, save_tiny
    from transformers import AutoModelForCausalLM

    from abliterate.cli import main

    source = save_tiny(tmp_path / "original", "qwen2")
    model = AutoModelForCausalLM.from_pretrained(source)
    adapter = resolve_adapter(model)
    d_model, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    candidates = torch.randn(2, n_layers, d_model, generator=torch.Generator().manual_seed(1))
    basis = point_direction(POINT, candidates, torch.randn_like(candidates))
    assert basis.shape == (2, d_model)
    path = save_direction(
        tmp_path / "d.safetensors", basis, 1, -1, "x", extra=point_metadata(POINT, n_layers)
    )
    stored, metadata = load_direction(path)
    declared = declared_from_file(stored, metadata)
    assert declared.weights == (1.0, 0.4) and stored.shape == (2, d_model)
    fold_direction(model, adapter, declared_edit(stored, POINT, n_layers))
    model.save_pretrained(tmp_path / "folded")
    assert_apply_equals_fold(source, path, tmp_path / "folded", tmp_path / "applied")
    first = save_direction(
        tmp_path / "first.safetensors", stored[0], 1, -1, "x", extra=point_metadata(POINT, n_layers)
    )
    wrong = CliRunner().invoke(
        main, ["verify", str(source), str(tmp_path / "applied"), "--direction", str(first), "--no-forward"]
    )
    assert wrong.exit_code == 2, wrong.output


@pytest.mark.parametrize("layout", ["linear", "conv1d", "embedding"])
def test_norm_factors_keep_every_written_vector_length(layout: str) -> None:
    """``(I − s Q Qᵀ) W D`` keeps the length of every vector the writer emits per input coordinate."""
    from abliterate.edit.kernel import norm_factors

    d = 24
    shape = {"linear": (d, 16), "conv1d": (16, d), "embedding": (40, d)}[layout]
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    basis, scales = _basis(d).double(), (0.9, 0.3)
    factors = norm_factors(weight, basis, layout, scales)
    folded = orthogonalize(weight, basis, layout, scales)
    columns = layout == "linear"
    scaled = folded * (factors[None, :] if columns else factors[:, None])
    lengths = (lambda w: w.norm(dim=0)) if columns else (lambda w: w.norm(dim=1))
    torch.testing.assert_close(lengths(scaled), lengths(weight))
    assert (lengths(folded) < lengths(weight) - 1e-6).any()  # the plain fold does shorten them


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_norm_preserving_hooks_equal_their_weight_edit(model_type: str) -> None:
    """The norm-preserving hooks equal a model whose weights hold ``(I − s r̂ r̂ᵀ) W D`` and whose biases
    hold ``(I − s r̂ r̂ᵀ) b``."""
    from abliterate.adapters.resolve import residual_writers
    from abliterate.edit.kernel import norm_factors
    from abliterate.model.hooks import norm_preserving_projection

    model = make_model(model_type)
    adapter = resolve_adapter(model)
    direction = _basis(model.config.hidden_size)[0]
    prompts = encode(make_tokenizer(), PROMPTS, batch_size=8, share_prefix=False)
    with ablated(model, adapter, norm_preserving_projection(direction, lambda writer: 0.8)):
        hooked = all_position_logits(model, prompts)
    edited = copy.deepcopy(model)
    fold_direction(edited, adapter, DeclaredEdit(direction), writers=[])  # unties a tied head, edits nothing
    for writer in residual_writers(edited, adapter):
        weight = writer.weight_tensor()
        factors = norm_factors(weight, direction, writer.layout, 0.8).to(weight.dtype)
        folded = orthogonalize(weight, direction, writer.layout, 0.8)
        rows = writer.layout in ("conv1d", "embedding")
        weight.data.copy_(folded * (factors[:, None] if rows else factors[None, :]))
        bias = writer.bias_tensor()
        if bias is not None:
            bias.data.copy_(orthogonalize(bias, direction, "embedding", 0.8))
    scale = hooked.abs().max()
    assert (hooked - all_position_logits(edited, prompts)).abs().max() <= 1e-4 * scale
    plain = copy.deepcopy(model)
    fold_direction(plain, adapter, DeclaredEdit(direction, default_strength=0.8))
    assert (hooked - all_position_logits(plain, prompts)).abs().max() > 1e-3 * scale  # a different edit
