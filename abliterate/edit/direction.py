"""The refusal direction as a validated unit vector (or an orthonormal subspace), whatever its source."""

from __future__ import annotations

import torch

from abliterate.edit.kernel import check_basis


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """``v / |v|`` along the last axis, in ``vectors``' own dtype and device: a direction ``[d_model]``, or
    each row of ``[k, d_model]``. Nothing is checked (``unit_direction`` validates a direction first)."""
    return vectors / vectors.norm(dim=-1, keepdim=True)


def unit_direction(vector: torch.Tensor, what: str = "the direction") -> torch.Tensor:
    """Validate a refusal direction and return it as a unit float32 vector.

    Args:
        vector: the candidate direction, ``[d_model]``, any floating dtype and device.
        what: how error messages name it, e.g. ``"the direction in FILE"``.

    A subspace ``[k, d_model]`` (``1 ≤ k ≤ MAX_RANK``) is accepted too: its rows must be orthogonal
    (each is normalized; ``abliterate.edit.kernel.check_basis`` states the tolerance).

    Returns:
        ``vector / |vector|`` (normalized in float64), float32, on the CPU; for a subspace, each row so.
    """
    if vector.dim() not in (1, 2):
        raise ValueError(
            f"{what} must be [d_model] (or a subspace [k, d_model]), got shape {list(vector.shape)}"
        )
    if not vector.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {vector.dtype}")
    wide = vector.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(wide).all()):
        raise ValueError(f"{what} contains NaN or infinite values")
    if bool((wide.norm(dim=-1) == 0).any()):
        raise ValueError(f"{what} is the zero vector" if vector.dim() == 1 else f"{what} has a zero row")
    unit = unit_rows(wide).to(torch.float32)
    if unit.dim() == 2:
        try:
            check_basis(unit)
        except ValueError as error:
            raise ValueError(f"{what}: {error}") from None
    return unit
