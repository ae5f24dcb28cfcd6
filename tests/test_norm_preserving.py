"""The column-norm-preserving edit ``W ← (I − Q diag(s) Qᵀ) W D`` as a member of the edit family:
the fold kernel's invariant and determinism, fold = hooks, the certificate (with negative
controls: the plain fold, a norm-preserving fold declared plain, a bias scaled by ``D``), the direction
file and streaming ``apply``, the refusals (fused experts, LoRA) and ``run --norm-preserving``."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import make_model, make_tokenizer, quick_run_args

from abliterate.adapters.resolve import residual_writers, resolve_adapter
from abliterate.edit import tiles
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.kernel import norm_factors, orthogonalize
from abliterate.edit.walker import fold_direction
from abliterate.find.point import EditPoint, declared_edit
from abliterate.model.batching import all_position_logits, encode
from abliterate.model.hooks import ablated, edit_projection
from abliterate.prove.certificate import certify_checkpoint
from abliterate.ship.direction_file import declared_from_file, load_direction, point_metadata, save_direction

PROMPTS = ["Tell me a joke.", "How do I hack into my neighbour's wifi?", "Write a poem about the sea."]
# A searched rank-2 point with a layer profile, folded norm-preserving.
POINT = EditPoint(
    layer=1.0,
    position=-1,
    embedding=0.6,
    attention=1.2,
    mlp=0.7,
    peak=1.0,
    width=3.0,
    second=-2,
    second_weight=0.4,
    norm_preserving=True,
)
PLAIN_POINT = EditPoint(**{**POINT.__dict__, "norm_preserving": False})


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models: one intra-op thread (see ``conftest.one_thread``)."""


def _basis(d_model: int, k: int = 2, seed: int = 5) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(d_model, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q.T.contiguous().float()


def _lengths(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The length of every vector the writer emits per input coordinate."""
    return weight.double().norm(dim=0 if layout == "linear" else -1)


@pytest.mark.parametrize("layout", ["linear", "conv1d", "embedding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_keeps_lengths_and_is_thread_independent(
    layout: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiled kernel's ``(I − Q diag(s) Qᵀ) W D`` keeps every written vector's length (``norm_factors``),
    gives the same bits on 1 and 3 threads (many tiles), and leaves the plain fold as it was."""
    monkeypatch.setattr(tiles, "TILE_ELEMENTS", 256)  # 8-16 tiles, so the threads really split the work
    d, other = 32, 100
    shape = {"linear": (d, other), "conv1d": (other, d), "embedding": (other, d)}[layout]
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for direction, strength in ((_basis(d)[0], 0.8), (_basis(d), (1.1, 0.4))):
        torch.set_num_threads(1)
        one = orthogonalize(weight, direction, layout, strength, norm_preserving=True)
        torch.set_num_threads(3)
        three = orthogonalize(weight, direction, layout, strength, norm_preserving=True)
        plain_three = orthogonalize(weight, direction, layout, strength)
        torch.set_num_threads(1)
        assert torch.equal(one, three)
        plain = orthogonalize(weight, direction, layout, strength, norm_preserving=False)
        assert torch.equal(plain, plain_three) and torch.equal(
            plain, orthogonalize(weight, direction, layout, strength)
        )
        factors = norm_factors(weight, direction, layout, strength)
        exact = orthogonalize(weight.double(), direction, layout, strength)
        exact = exact * (factors[None, :] if layout == "linear" else factors[:, None])
        tolerance = 1e-6 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(
            one.double(), exact, rtol=tolerance, atol=tolerance * weight.abs().max().item()
        )
        torch.testing.assert_close(
            _lengths(one, layout), _lengths(weight, layout), rtol=2 * tolerance, atol=0
        )
        assert (_lengths(plain, layout) < _lengths(weight, layout) * (1 - 4 * tolerance)).any()
        assert (factors > 1 + 4 * tolerance).any()  # D is not the identity here


def test_kernel_refuses_fused_experts() -> None:
    for layout in ("experts", "experts_t"):
        with pytest.raises(ValueError, match=f"fused expert's input \\(layout {layout}\\)"):
            orthogonalize(torch.randn(2, 16, 16), _basis(16)[0], layout, norm_preserving=True)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("direction_rows", [1, 2])
def test_fold_equals_its_hooks(model_type: str, direction_rows: int) -> None:
    """A searched point folded norm-preserving equals its hooks (``edit_projection`` of the norm-preserving
    edit) to 1e-4 of the logit scale; the plain fold of the same point is another edit."""
    model = make_model(model_type)
    adapter = resolve_adapter(model)
    basis = _basis(model.config.hidden_size)
    point = POINT if direction_rows == 2 else EditPoint(**{**POINT.__dict__, "second": None})
    direction = basis if direction_rows == 2 else basis[0]
    prompts = encode(make_tokenizer(), PROMPTS, batch_size=8, share_prefix=False)
    declared = declared_edit(direction, point, model.config.num_hidden_layers)
    with ablated(model, adapter, edit_projection(declared)):
        hooked = all_position_logits(model, prompts)
    folded = copy.deepcopy(model)
    fold_direction(folded, adapter, declared)
    scale = hooked.abs().max()
    assert (hooked - all_position_logits(folded, prompts)).abs().max() <= 1e-4 * scale
    plain = copy.deepcopy(model)
    fold_direction(plain, adapter, replace(declared, norm_preserving=False))
    assert (hooked - all_position_logits(plain, prompts)).abs().max() > 1e-3 * scale


def _other_kernel(model: torch.nn.Module, adapter: object, declared: DeclaredEdit) -> None:
    """A correct norm-preserving fold by another kernel: float32, whole-tensor reductions, ``D`` from
    float32 sums in torch's own order, then rounded toward zero (bf16 only) instead of to nearest."""
    q = declared.direction.float()
    for writer in residual_writers(model, adapter):
        scales = torch.tensor(declared.scales(writer.group, writer.layer), dtype=torch.float32).reshape(-1)
        weight = writer.weight_tensor()
        wide = weight.float()
        rows = writer.layout != "linear"
        along = wide @ q.T if rows else (q @ wide).T  # [n, k]: p per written vector
        squared = (wide * wide).sum(-1 if rows else 0)
        factors = (squared / (squared - (along.square() * scales * (2 - scales)).sum(-1))).sqrt()
        projected = wide - (along * scales) @ q if rows else wide - q.T @ (along * scales).T
        weight.data.copy_(_truncated(projected * (factors[:, None] if rows else factors[None, :])))
        bias = writer.bias_tensor()
        if bias is not None:
            wide_bias = bias.float()
            bias.data.copy_(wide_bias - ((wide_bias @ q.T) * scales) @ q)


def _truncated(values: torch.Tensor) -> torch.Tensor:
    """float32 → bfloat16 rounded toward zero (another correct rounding: within one ulp of the value)."""
    return (values.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _scale_biases_too(model: torch.nn.Module, adapter: object, declared: DeclaredEdit) -> None:
    """The bug the certificate must catch: the biases folded as if they were embedding rows, scaled by D."""
    fold_direction(model, adapter, declared)
    for writer in residual_writers(model, adapter):
        bias = writer.bias_tensor()
        if bias is not None:
            scales = declared.scales(writer.group, writer.layer)
            bias.data.copy_(orthogonalize(bias, declared.direction, "embedding", scales, True))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_certificate_proves_the_fold_and_rejects_controls(
    model_type: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    model = make_model(model_type).to(dtype)
    adapter = resolve_adapter(model)
    n_layers = model.config.num_hidden_layers
    d_model = model.config.hidden_size
    # The first row leans on one attention writer's output, so D is far from 1 on some vectors (a bias too).
    writer = next(w for w in residual_writers(model, adapter) if w.group == "attention")
    lean = writer.bias_tensor() if writer.bias_tensor() is not None else writer.weight_tensor()[:, 0]
    if writer.layout == "conv1d" and writer.bias_tensor() is None:
        lean = writer.weight_tensor()[0]
    start = torch.cat([lean.detach().float()[None] * 4 / lean.float().norm(), _basis(d_model)]).T
    basis = torch.linalg.qr(start.double())[0].T[:2].float().contiguous()
    model.save_pretrained(tmp_path / "original")
    declared = declared_edit(basis, POINT, n_layers)
    assert declared.norm_preserving and not declared.is_plain()

    folded = copy.deepcopy(model)
    fold_direction(folded, adapter, declared)
    folded.save_pretrained(tmp_path / "folded")
    passed = certify_checkpoint(tmp_path / "original", tmp_path / "folded", declared, progress=False)
    assert passed.passed, passed.failures
    assert passed.n_exact == passed.n_edited > 0  # bitwise: this machine's kernel
    if dtype == torch.bfloat16:  # the bounded path: a correct fold by another kernel passes
        other = copy.deepcopy(model)
        fold_direction(other, adapter, DeclaredEdit(basis), writers=[])  # unties a tied head
        _other_kernel(other, adapter, declared)
        other.save_pretrained(tmp_path / "other")
        report = certify_checkpoint(tmp_path / "original", tmp_path / "other", declared, progress=False)
        assert report.passed, report.failures
        assert report.n_bounded > 0

    plain = copy.deepcopy(model)
    plain_declared = declared_edit(basis, PLAIN_POINT, n_layers)
    fold_direction(plain, adapter, plain_declared)
    plain.save_pretrained(tmp_path / "plain")
    controls = {"plain fold declared norm-preserving": ("plain", declared)}
    controls["norm-preserving fold declared plain"] = ("folded", plain_declared)
    if any(w.bias_tensor() is not None for w in residual_writers(model, adapter)):
        scaled = copy.deepcopy(model)
        _scale_biases_too(scaled, adapter, declared)
        scaled.save_pretrained(tmp_path / "scaled")
        controls["a bias scaled by D"] = ("scaled", declared)
    assert certify_checkpoint(
        tmp_path / "original", tmp_path / "plain", plain_declared, progress=False
    ).passed
    for name, (directory, claim) in controls.items():
        report = certify_checkpoint(tmp_path / "original", tmp_path / directory, claim, progress=False)
        assert not report.passed, name
        if name == "a bias scaled by D":
            assert all(".bias" in line for line in report.failures), report.failures


def test_direction_file_apply_and_verify(tmp_path: Path) -> None:
    """The direction file declares the norm-preserving fold (old files: plain); ``apply`` streams it
    bitwise like the in-memory fold and certifies it, ``verify`` proves it; the same file without the
    flag fails verification."""
    from click.testing import CliRunner
    from conftest import assert_apply_equals_fold, save_tiny
    from transformers import AutoModelForCausalLM

    from abliterate.cli import main

    source = save_tiny(tmp_path / "original", "gpt2")  # Conv1D writers with biases, tied head
    model = AutoModelForCausalLM.from_pretrained(source)
    adapter = resolve_adapter(model)
    n_layers = model.config.n_layer
    basis = _basis(model.config.hidden_size)
    path = save_direction(
        tmp_path / "np.safetensors", basis, 1, -1, "x", extra=point_metadata(POINT, n_layers)
    )
    stored, metadata = load_direction(path)
    declared = declared_from_file(stored, metadata)
    assert declared.norm_preserving
    assert not declared_from_file(stored, point_metadata(PLAIN_POINT, n_layers)).norm_preserving
    assert not declared_from_file(stored, {}).norm_preserving and not DeclaredEdit(stored).norm_preserving
    fold_direction(model, adapter, declared_edit(stored, POINT, n_layers))
    model.save_pretrained(tmp_path / "folded")
    assert_apply_equals_fold(source, path, tmp_path / "folded", tmp_path / "applied")
    plain = save_direction(
        tmp_path / "plain.safetensors", stored, 1, -1, "x", extra=point_metadata(PLAIN_POINT, n_layers)
    )
    wrong = CliRunner().invoke(
        main, ["verify", str(source), str(tmp_path / "applied"), "--direction", str(plain), "--no-forward"]
    )
    assert wrong.exit_code == 2, wrong.output


def test_fused_experts_and_lora_are_refused_in_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from conftest import save_tiny

    from abliterate.cli import main

    model = make_model("qwen3_moe")
    adapter = resolve_adapter(model)
    basis = _basis(model.config.hidden_size)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for refused in (
        lambda: fold_direction(model, adapter, DeclaredEdit(basis[0], norm_preserving=True)),
        lambda: ablated(
            model, adapter, edit_projection(DeclaredEdit(basis[0], norm_preserving=True))
        ).__enter__(),
    ):
        with pytest.raises(ValueError, match=r"^\S*experts\S*: a norm-preserving edit cannot scale") as error:
            refused()
        assert "\n" not in str(error.value)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())

    source = save_tiny(tmp_path / "moe", "qwen3_moe")
    n_layers = model.config.num_hidden_layers
    path = save_direction(
        tmp_path / "np.safetensors", basis, 1, -1, "x", extra=point_metadata(POINT, n_layers)
    )
    runner = CliRunner()
    applied = runner.invoke(
        main, ["apply", str(source), "--direction", str(path), "--output", str(tmp_path / "a")]
    )
    assert applied.exit_code != 0 and "a norm-preserving edit cannot scale a fused expert" in applied.output
    assert len(applied.output.strip().splitlines()) == 1, applied.output
    lora = runner.invoke(
        main,
        ["apply", str(source), "--direction", str(path), "--output", str(tmp_path / "l"), "--format", "lora"],
    )
    assert (
        lora.exit_code != 0 and "a norm-preserving edit is full rank; use --format checkpoint" in lora.output
    )
    assert len(lora.output.strip().splitlines()) == 1, lora.output
    run = runner.invoke(
        main, ["run", str(source), "--output", str(tmp_path / "r"), "--norm-preserving", "--format", "lora"]
    )
    assert run.exit_code != 0 and "a norm-preserving edit is full rank" in run.output
    moe_run = runner.invoke(
        main,
        ["run", str(source), "--output", str(tmp_path / "m"), "--norm-preserving", *quick_run_args(8, 4)],
    )
    assert moe_run.exit_code != 0 and "a norm-preserving edit cannot scale a fused expert" in moe_run.output
    assert len(moe_run.output.strip().splitlines()) == 1, moe_run.output
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


@pytest.mark.parametrize("searched", [True, False])
def test_run_norm_preserving_end_to_end(tiny_qwen2: Path, tmp_path: Path, searched: bool) -> None:
    """``run --norm-preserving`` folds the chosen point norm-preserving (searched, or the candidate given
    by ``--layer``), passes its gate (parity and certificate) and says so in the direction file."""
    import json

    from click.testing import CliRunner

    from abliterate.cli import main

    output = tmp_path / "out"
    args = [str(tiny_qwen2), "--output", str(output), "--norm-preserving", "--trials", "8", "--max-kl", "inf"]
    quick = quick_run_args(8, 4, evaluate=False, layer=None if searched else 2)
    result = CliRunner().invoke(main, ["run", *args, "--min-steering=-inf", *quick], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((output / "abliterate.json").read_text())
    assert (manifest["search"] is not None) == searched
    gate = manifest["gate"]
    assert gate["passed"] and gate["certificate"]["passed"] and gate["certificate"]["n_edited"] > 0
    assert gate["parity"]["max_abs_logit_diff"] <= 1e-4 * gate["parity"]["logit_scale"]
    stored, metadata = load_direction(output / "direction.safetensors")
    assert declared_from_file(stored, metadata).norm_preserving
    assert json.loads(metadata["edit_point"])["norm_preserving"] is True
