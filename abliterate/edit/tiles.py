"""The fold's tile loops: ``out ← (I − s r̂ r̂ᵀ) source`` a cache-sized tile at a time.

``abliterate.edit.kernel`` checks the arguments and picks the compute dtype; this module runs the loops.
Every tile is computed by the same operations whichever thread runs it and whichever tensor it is
written to, and the one reduction across tiles adds their partial sums in tile order, so a fold in place,
a fold into another buffer and a fold spread over threads give the same bits. A caller may watch each
finished tile (``TileVisitor``) while it is still in the cache: streaming ``apply`` and the certificate
check finiteness and compare bytes there instead of in more passes over the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

# Layouts whose last axis is d_model (rows are written into the residual stream).
ROWS_WRITE = ("conv1d", "experts_t", "embedding")

# Elements per tile: 1 MiB of float32, small enough to stay in a core's cache between the reads and
# writes of one tile (measured fastest of 2^14 … 2^20 on the development VM).
TILE_ELEMENTS = 1 << 18

T = TypeVar("T")

# Called with each finished tile of ``out``: the offset of its first element in the flattened tensor and
# the tile itself (a view of ``out``, rows × the last axis). With several workers it is called from their
# threads, in any order.
TileVisitor = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class TileFold:
    """One fold as the tile loops apply it.

    Attributes:
        r: the unit direction ``[d_model]`` or orthonormal basis ``[k, d_model]``, in the compute dtype.
        strength: its ``s`` (a ``[k]`` tensor for a basis).
        workers: the threads the tiles are spread over.
        norm_preserving: whether each updated vector is multiplied by its ``D``.
        visit: called with every finished tile, or ``None``.
    """

    r: torch.Tensor
    strength: float | torch.Tensor
    workers: int
    norm_preserving: bool
    visit: TileVisitor | None = None


def fold_tiles(source: torch.Tensor, out: torch.Tensor, layout: str, fold: TileFold) -> None:
    """Write the fold of ``source`` into ``out`` (both contiguous, same shape and dtype; may be one tensor).

    Each tile of ``source`` is read twice at most (the coefficients, then the update) and written once
    to ``out``, so ``source`` may be a read-only memory map.
    """
    # A tile already in the compute dtype is updated in a copy unless it is updated where it lies.
    copy = source.data_ptr() != out.data_ptr()
    if layout in ROWS_WRITE:
        # [..., d_model]: W' = W − s (W r̂) r̂ᵀ, each row on its own.
        width = source.shape[-1]
        _fold_rows(source.view(-1, width), out.view(-1, width), fold, copy)
    elif layout == "experts":
        for index in range(source.shape[0]):  # [d_model, d_in] each; never norm-preserving
            base = index * source[index].numel()
            _fold_columns(source[index], out[index], replace(fold, visit=_shifted(fold.visit, base)), copy)
    else:
        _fold_columns(source, out, fold, copy)


def _shifted(visit: TileVisitor | None, base: int) -> TileVisitor | None:
    """``visit`` for one expert: offsets counted from the start of the whole tensor."""
    if visit is None:
        return None
    return lambda offset, tile: visit(base + offset, tile)


def factors(
    squared: torch.Tensor, coefficients: torch.Tensor, strength: float | torch.Tensor
) -> torch.Tensor:
    """``D = sqrt(n / (n − Σ_k s_k (2 − s_k) p_k²))`` in the compute dtype (``norm_factors``'s formula):
    ``squared`` ``[m]`` the lengths² ``n``, ``coefficients`` ``[m]`` or ``[k, m]`` the unscaled ``p``."""
    if coefficients.dim() == 1:
        removed = coefficients.square() * (strength * (2 - strength))
    else:
        removed = (coefficients.square() * (strength * (2 - strength))[:, None]).sum(0)
    projected = squared - removed
    tiny = torch.finfo(squared.dtype).tiny
    return torch.where(
        projected > tiny, (squared / projected.clamp_min(tiny)).sqrt(), torch.ones_like(squared)
    )


def _map_tiles(function: Callable[[int], T], starts: range, workers: int) -> list[T]:
    """``[function(start) for start in starts]``, spread over ``workers`` threads when worth it."""
    if workers <= 1 or len(starts) < 4:
        return [function(start) for start in starts]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, starts))


def _finish(target: torch.Tensor, block: torch.Tensor, fold: TileFold, offset: int) -> None:
    """Round the tile's result into ``out`` and show it to the visitor."""
    target.copy_(block)
    if fold.visit is not None:
        fold.visit(offset, target)


def _fold_rows(source: torch.Tensor, out: torch.Tensor, fold: TileFold, copy: bool) -> None:
    # source [n, d_model]: p = W r̂ per row, then W −= s p r̂ᵀ (a subspace: P = W Qᵀ, W −= (P diag s) Q);
    # norm-preserving: then each row times its D (from its squared length and p, before the update).
    r, strength, norm_preserving = fold.r, fold.strength, fold.norm_preserving
    step = max(1, TILE_ELEMENTS // source.shape[1])

    def tile(first: int) -> None:
        block = source[first : first + step].to(r.dtype, copy=copy)
        if r.dim() == 1:
            coefficients = (block * r).sum(-1)
            scale = factors((block * block).sum(-1), coefficients, strength) if norm_preserving else None
            block.addr_(coefficients, r, alpha=-strength)
        else:
            coefficients = block @ r.T  # [rows, k]
            scale = factors((block * block).sum(-1), coefficients.T, strength) if norm_preserving else None
            block.addmm_(coefficients * strength, r, alpha=-1.0)
        if scale is not None:
            block.mul_(scale[:, None])
        _finish(out[first : first + step], block, fold, first * source.shape[1])

    _map_tiles(tile, range(0, source.shape[0], step), fold.workers)


def _fold_columns(source: torch.Tensor, out: torch.Tensor, fold: TileFold, copy: bool) -> None:
    # source [d_model, d_in]: p = r̂ᵀ W from per-tile partial sums added in tile order, then W −= s r̂ pᵀ
    # (a subspace: P = Q W the same way, then W −= Qᵀ diag(s) P). Norm-preserving: the squared column
    # lengths are summed beside p the same way, and each updated tile is multiplied by D per column.
    r, strength, norm_preserving = fold.r, fold.strength, fold.norm_preserving
    step = max(1, TILE_ELEMENTS // max(1, source.shape[1]))
    starts = range(0, source.shape[0], step)
    rows_of = (
        (lambda first: r[first : first + step])
        if r.dim() == 1
        else (lambda first: r[:, first : first + step])
    )

    def partial(first: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        block = source[first : first + step].to(r.dtype)
        squared = (block * block).sum(0) if norm_preserving else None
        if r.dim() == 1:
            return (block * rows_of(first)[:, None]).sum(0), squared
        return rows_of(first) @ block, squared

    shape = (source.shape[1],) if r.dim() == 1 else (r.shape[0], source.shape[1])
    coefficients = torch.zeros(shape, dtype=r.dtype, device=source.device)
    squared = torch.zeros(source.shape[1], dtype=r.dtype, device=source.device)
    for part, part_squared in _map_tiles(partial, starts, fold.workers):
        coefficients += part
        if part_squared is not None:
            squared += part_squared
    scale = factors(squared, coefficients, strength) if norm_preserving else None
    if r.dim() == 2:
        coefficients *= strength[:, None]

    def update(first: int) -> None:
        block = source[first : first + step].to(r.dtype, copy=copy)
        if r.dim() == 1:
            block.addr_(rows_of(first), coefficients, alpha=-strength)
        else:
            block.addmm_(rows_of(first).T, coefficients, alpha=-1.0)
        if scale is not None:
            block.mul_(scale)
        _finish(out[first : first + step], block, fold, first * source.shape[1])

    _map_tiles(update, starts, fold.workers)
