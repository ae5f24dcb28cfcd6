"""The bounds of the weight certificate: how far a fold computed by another correct kernel may land.

A tensor that is not bitwise equal to this machine's fold is judged against the exact fold, computed here in
float64 and never rounded (``exact_fold``), by two tests:

* **every element** within one unit in the last place of the exact fold plus the float32 working precision
  (``WORKING_PRECISION`` of the original element) and the float32 error of the reduction along the direction
  (``worst_bound_ratio`` ≤ 1);
* **the part of the error along the direction** at most ``LEAK_RATIO_LIMIT`` times that of the correctly
  rounded fold (``leak_ratio``). This is what rejects a direction a few degrees off, whose per-element change
  is below one bf16 ulp but adds up along r̂.

``judge_bounded`` applies both and says which failed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abliterate.adapters.spec import Layout
from abliterate.edit.direction import unit_rows
from abliterate.edit.kernel import ROWS_WRITE, Scales, compute_dtype, norm_factors, orthogonalize_, ulp

# A correctly rounded fold leaves, along r̂, only its rounding error; a bounded (non-bitwise) tensor may
# carry at most this many times as much. A float32-computed fold measures 1.00-1.02 (a few elements one
# ulp off); a direction 3° off measures > 10 on the demo model (BENCHMARKS.md, certificate table).
LEAK_RATIO_LIMIT = 2.0
# The float32 working precision of a 16-bit fold, as a fraction of the terms of ``w − s r_i p_j``: 2^-16
# leaves a factor 128 over float32's 2^-23 for the few operations per element and the reduction in p_j.
WORKING_PRECISION = 2.0**-16


@dataclass(frozen=True)
class TensorFold:
    """The fold one tensor must carry: the direction (or subspace), the tensor's layout, its scales (a
    float, or one per row of a subspace) and whether its weight is scaled by ``D`` (norm-preserving)."""

    direction: torch.Tensor
    layout: Layout
    scales: Scales = 1.0
    norm_preserving: bool = False


def exact_fold(source: torch.Tensor, fold: TensorFold) -> torch.Tensor:
    """The fold in float64, unrounded (the reference of the bound)."""
    wide = source.to(torch.float64)
    orthogonalize_(wide, fold.direction, fold.layout, fold.scales, fold.norm_preserving)
    return wide


def worst_bound_ratio(
    source: torch.Tensor, exact: torch.Tensor, target: torch.Tensor, fold: TensorFold
) -> float:
    """The largest |edited − exact fold| over its bound; ≤ 1 passes.

    The bound of ``w' = w − s r_i p_j`` computed in float32 by any correct kernel, then rounded once:
    1 ulp of the exact fold, plus ``WORKING_PRECISION`` of its terms ``|w|`` and ``|w − exact|``, plus
    the float32 error of the reduction ``p_j = Σ_l r_l w_lj`` in any summation order,
    ``(d_model + 2) 2^-24 Σ_l |r_l w_lj|``, carried into the element by ``s r_i``. The last term is what a
    GPU's blocked reductions need where ``p_j`` cancels (a random 8B down-projection folded on an H100
    exceeded the bound without it, BENCHMARKS §9); a rotated direction still fails the leak ratio.

    A norm-preserving fold ``(w − s r_i p_j) D_j`` carries those terms times ``D_j``, plus ``D_j``'s own
    float32 error times the element (``_factor_error``).
    """
    direction, layout, strength = fold.direction, fold.layout, fold.scales
    error = (target.to(torch.float64) - exact).abs()
    bound = ulp(exact, target.dtype)
    if compute_dtype(target.dtype) != torch.float64:
        wide = source.to(torch.float64)
        factors = torch.ones((), dtype=torch.float64)
        plain = exact
        if fold.norm_preserving:
            factors = _broadcast(norm_factors(wide, direction, layout, strength), layout)
            plain = exact / factors
        working = WORKING_PRECISION * (wide.abs() + (wide - plain).abs())
        working = working + _reduction_bound(wide, direction, layout, strength)
        bound = bound + working * factors
        if fold.norm_preserving:
            bound = bound + _factor_error(factors, direction, strength) * exact.abs()
    return (error / bound).max().item() if error.numel() else 0.0


def _broadcast(factors: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``norm_factors`` shaped to multiply the weight: per column (``[..., 1, d_in]``) or per row."""
    return factors[..., None] if layout in ROWS_WRITE else factors[..., None, :]


def _factor_error(
    factors: torch.Tensor, direction: torch.Tensor, strength: float | tuple[float, ...]
) -> torch.Tensor:
    """The relative float32 error of ``D = sqrt(n / (n − Σ_k c_k p_k²))``, ``c_k = s_k (2 − s_k)``: the sums
    ``n`` and ``p_k`` err by ``γ n`` and ``γ √n`` (``|q_k| = 1``, Cauchy-Schwarz), so the denominator by
    ``γ n (1 + 3 Σ|c_k|)``, i.e. ``γ (1 + 3 Σ|c_k|) D²`` of itself; ``D`` by half of that and of ``n``'s
    ``γ``, bounded by the whole (the other half covers the division and the square root)."""
    rows = direction.reshape(-1, direction.shape[-1])
    scales = strength if isinstance(strength, tuple) else (strength,) * rows.shape[0]
    gamma = (rows.shape[-1] + 2) * 2.0**-24
    spread = sum(abs(s * (2 - s)) for s in scales)
    return gamma * (2 + 3 * spread) * factors.square()


def _reduction_bound(
    wide: torch.Tensor, direction: torch.Tensor, layout: Layout, strength: float | tuple[float, ...]
) -> torch.Tensor:
    """``γ Σ_k |s_k| |q_ki| Σ_l |q_kl w_lj|`` per element, with ``γ = (d_model + 2) 2^-24``: the float32
    error of the dot products ``p`` in any summation order."""
    basis = _wide_unit_rows(direction).to(wide.device).abs()  # on the device the tensors were folded on
    values = strength if isinstance(strength, tuple) else (strength,)
    scales = torch.tensor(values, dtype=torch.float64, device=wide.device).abs()
    gamma = (basis.shape[-1] + 2) * 2.0**-24
    spread = _along(wide.abs(), basis, layout)  # S = Σ_l |q_kl w_lj| per written vector and row of Q
    if layout in ROWS_WRITE:  # [..., k] ⊗ |q|
        return gamma * torch.einsum("...k,kd->...d", spread * scales, basis)
    return gamma * torch.einsum("...ki,kd->...di", spread * scales[:, None], basis)


def _wide_unit_rows(direction: torch.Tensor) -> torch.Tensor:
    """``direction`` as float64 unit rows ``[k, d_model]`` (``k = 1`` for a single direction)."""
    return unit_rows(direction.to(torch.float64).reshape(-1, direction.shape[-1]))


def _along(tensor: torch.Tensor, r: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The component of each written vector along r̂: ``W r̂`` (rows layouts) or ``r̂ᵀ W`` (column layouts);
    for a subspace ``r`` ``[k, d_model]``, along each of its rows."""
    if layout in ROWS_WRITE:
        return tensor @ (r if r.dim() == 1 else r.T)
    return torch.einsum("d,...di->...i" if r.dim() == 1 else "kd,...di->...ki", r, tensor)


def leak_ratio(exact: torch.Tensor, target: torch.Tensor, direction: torch.Tensor, layout: Layout) -> float:
    """|r̂-component of (edited − exact fold)| over that of (correctly rounded fold − exact fold); for a
    subspace, the components along all of its rows together."""
    rounded = exact.to(target.dtype).to(torch.float64)
    r = _wide_unit_rows(direction).to(exact.device)
    leak = _along(target.to(torch.float64) - exact, r, layout).norm().item()
    floor = _along(rounded - exact, r, layout).norm().item()
    return leak / max(floor, torch.finfo(torch.float64).tiny)


def judge_bounded(source: torch.Tensor, target: torch.Tensor, fold: TensorFold) -> tuple[float, str]:
    """Judge an edited tensor that is not this machine's fold of ``source`` against the exact fold.

    Returns:
        ``(leak ratio, failure)``: the failure is empty when every element is within its bound and the
        error along the direction within ``LEAK_RATIO_LIMIT`` times its rounding floor.
    """
    exact = exact_fold(source, fold)
    leak = leak_ratio(exact, target, fold.direction, fold.layout)
    worst = worst_bound_ratio(source, exact, target, fold)
    # Written as "not within": a comparison with NaN is false, and a NaN must fail, never pass.
    if not worst <= 1.0:
        return leak, f"an element is {worst:.3g}× the bound (1 ulp of the exact fold + working precision)"
    if not leak <= LEAK_RATIO_LIMIT:
        return leak, f"leak along the direction {leak:.3g}× its rounding floor (limit {LEAK_RATIO_LIMIT})"
    return leak, ""
