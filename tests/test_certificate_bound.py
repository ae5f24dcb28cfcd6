"""The certificate's element bound for a fold computed elsewhere (another kernel, another device): it
must admit any correct float32 kernel, whatever its summation order, and still reject wrong edits."""

from __future__ import annotations

import torch

from abliterate.prove.bounds import TensorFold, exact_fold, leak_ratio, worst_bound_ratio
from abliterate.prove.controls import rotated

D_MODEL, D_IN = 2048, 96


def _cancelling_weight() -> torch.Tensor:
    """A bf16 down-projection-like ``[d_model, d_in]`` whose columns have ``r̂ᵀ w ≈ 0`` by construction
    (so the reduction cancels, the case a blocked GPU reduction rounds least well)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(D_MODEL, D_IN, generator=generator).to(torch.bfloat16)


def _direction() -> torch.Tensor:
    vector = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (vector / vector.norm()).float()


def _fold_with_reduction_error(weight: torch.Tensor, r: torch.Tensor, fraction: float) -> torch.Tensor:
    """``w − r p`` in float32 with ``p`` off by ``fraction`` of the worst-case float32 reduction error
    ``(d + 2) 2^-24 Σ|r_l w_lj|`` (signs alternating by column), then rounded to bf16 once."""
    w, r64 = weight.double(), r.double()
    p = r64 @ w
    worst = (D_MODEL + 2) * 2.0**-24 * (r64.abs() @ w.abs())
    signs = torch.where(torch.arange(D_IN) % 2 == 0, 1.0, -1.0).double()
    perturbed = (p + fraction * worst * signs).float()
    return (weight.float() - torch.outer(r.float(), perturbed)).to(torch.bfloat16)


def test_bound_admits_any_summation_order_and_rejects_wrong_edits() -> None:
    weight, r = _cancelling_weight(), _direction()
    exact = exact_fold(weight, TensorFold(r, "linear", 1.0))
    other_kernel = _fold_with_reduction_error(weight, r, 0.9)
    assert worst_bound_ratio(weight, exact, other_kernel, TensorFold(r, "linear", 1.0)) <= 1.0
    assert leak_ratio(exact, other_kernel, r, "linear") <= 2.0
    # Negative controls: an element 4 ulp off; the fold at strength 0.9; a direction 3° off.
    corrupted = other_kernel.clone()
    corrupted[7, 3] = (corrupted[7, 3].double() * (1 + 4 * 2.0**-7)).to(torch.bfloat16)
    assert worst_bound_ratio(weight, exact, corrupted, TensorFold(r, "linear", 1.0)) > 1.0
    weaker = (weight.float() - 0.9 * torch.outer(r.float(), r.float() @ weight.float())).to(torch.bfloat16)
    assert worst_bound_ratio(weight, exact, weaker, TensorFold(r, "linear", 1.0)) > 1.0
    off = rotated(r, 3.0)
    wrong = (weight.float() - torch.outer(off.float(), off.float() @ weight.float())).to(torch.bfloat16)
    failed = worst_bound_ratio(weight, exact, wrong, TensorFold(r, "linear", 1.0)) > 1.0
    assert failed or leak_ratio(exact, wrong, r, "linear") > 2.0


def test_bound_for_rows_layouts_and_subspaces() -> None:
    weight = _cancelling_weight().T.contiguous()  # [d_in, d_model]: the conv1d / embedding orientation
    q, _ = torch.linalg.qr(
        torch.randn(D_MODEL, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    )
    basis = q.T.contiguous().float()
    scales = (1.0, 0.4)
    exact = exact_fold(weight, TensorFold(basis, "conv1d", scales))
    w, b = weight.double(), basis.double()
    worst = (D_MODEL + 2) * 2.0**-24 * (w.abs() @ b.abs().T)  # [d_in, 2]
    p = w @ b.T + 0.9 * worst * torch.tensor([1.0, -1.0], dtype=torch.float64)
    folded = (weight.float() - (p * torch.tensor(scales, dtype=torch.float64)).float() @ basis).to(
        torch.bfloat16
    )
    assert worst_bound_ratio(weight, exact, folded, TensorFold(basis, "conv1d", scales)) <= 1.0
    dropped = (weight.float() - (w @ b[:1].T).float() @ basis[:1]).to(torch.bfloat16)  # second row left out
    assert worst_bound_ratio(weight, exact, dropped, TensorFold(basis, "conv1d", scales)) > 1.0
