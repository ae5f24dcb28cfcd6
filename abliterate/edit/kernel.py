"""The fold kernel: ``W' = (I − s r̂ r̂ᵀ) W`` as a pure tensor function, and the checks a weight passes first.

Nothing here knows about models: ``abliterate.edit.walker`` applies the kernel to a model's residual
writers, streaming ``apply`` to the tensors of a checkpoint, the certificate to recompute what was declared.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from abliterate.adapters.spec import FUSED_LAYOUTS, Layout
from abliterate.edit.tiles import ROWS_WRITE, TileFold, TileVisitor, factors, fold_tiles
from abliterate.io.finite import all_finite
from abliterate.io.threads import one_intra_op_thread

# What one tensor's fold is given (``DeclaredEdit.scales``): the strength ``s``, or one per row of a subspace
# ``[k, d_model]``.
Scales = float | Sequence[float]


def compute_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype the fold is computed in for weights of ``dtype``.

    16-bit weights are folded in float32: its 24-bit mantissa is 16 bits wider than bf16's and 13 wider
    than fp16's, so the float32 result rounds to the same 16-bit value as an exact computation except
    where it lies within ~2^-16 ulp of a rounding boundary (measured: ~1e-5 of the elements, each then
    one ulp away; ``abliterate.prove.certificate`` states and checks the bound). Wider weights are folded in
    float64 (float32 on MPS, which has no float64).
    """
    if dtype in (torch.bfloat16, torch.float16) or torch.device(device).type == "mps":
        return torch.float32
    return torch.float64


# Explicit mantissa bits per floating dtype; a dtype not listed is treated as float32.
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at the magnitude of each of ``values`` (a float64 tensor)."""
    exponent = torch.floor(torch.log2(values.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exponent - MANTISSA_BITS.get(dtype, 23))


def orthogonalize(
    weight: torch.Tensor,
    direction: torch.Tensor,
    layout: Layout,
    scales: Scales = 1.0,
    norm_preserving: bool = False,
) -> torch.Tensor:
    """Remove ``direction`` from everything ``weight`` can write into the residual stream.

    Computed in ``compute_dtype(weight.dtype)`` and cast back to the weight's dtype once per element.

    Args:
        weight: the writer's weight, laid out as ``layout`` says:
            linear ``[d_model, d_in]``, conv1d ``[d_in, d_model]``, experts ``[E, d_model, d_in]``,
            experts_t ``[E, d_in, d_model]``, embedding ``[vocab, d_model]``.
        direction: ``[d_model]``, normalized here, so any non-zero vector is accepted; or a subspace
            ``[k, d_model]`` of orthonormal rows ``q_i`` (``check_basis``), which folds
            ``W' = (I − Σ_i s_i q_i q_iᵀ) W`` in one pass (one rounding per element).
        layout: the weight layout.
        scales: ``s`` in ``W' = (I − s r̂ r̂ᵀ) W``; 1 removes the direction completely. For a subspace,
            one strength per row (a single float applies to every row).
        norm_preserving: fold ``W' = (I − s r̂ r̂ᵀ) W D`` instead, ``D`` (``norm_factors``) keeping the
            length of every vector the writer emits per input coordinate. Never for a bias (it has no
            input coordinate); refused for fused experts (no module boundary for the hook's input scaling).

    Returns:
        A new tensor ``W'`` with ``r̂ᵀ W' = (1 − s) r̂ᵀ W`` along the model axis, same shape and dtype.
    """
    edited = weight.detach().clone()
    orthogonalize_(edited, direction, layout, scales, norm_preserving)
    return edited


def orthogonalize_(
    weight: torch.Tensor,
    direction: torch.Tensor,
    layout: Layout,
    scales: Scales = 1.0,
    norm_preserving: bool = False,
) -> None:
    """``weight ← orthogonalize(weight)`` in place, tile by tile (``abliterate.edit.tiles``).

    The tiles depend only on the tensor's shape, every tile is computed by the same operations on
    whichever thread runs it, and the one reduction across tiles adds their partial sums in tile order,
    so the in-memory fold, streaming ``apply`` and the certificate produce the same bits on one machine
    whatever the thread count. On the CPU the tiles are spread over ``torch.get_num_threads()`` Python
    threads (torch releases the GIL inside each operation), each running single-threaded operations.
    Temporaries stay at a few tiles (an embedding of 150k × 4k never needs a full-size float copy).

    With ``norm_preserving`` the squared lengths are reduced beside the coefficients (per tile in tile
    order for the columns, per row for the rows), ``D`` is computed in the compute dtype and every
    updated tile is multiplied by it: the same tiles and order, so still the same bits on any thread count.
    """
    if not weight.is_contiguous():  # e.g. a transposed view: edit a contiguous copy, write it back once
        contiguous = weight.contiguous()
        orthogonalize_(contiguous, direction, layout, scales, norm_preserving)
        weight.copy_(contiguous)
        return
    fold_into(weight, weight, direction, layout, scales, norm_preserving)


def fold_into(
    source: torch.Tensor,
    out: torch.Tensor,
    direction: torch.Tensor,
    layout: Layout,
    scales: Scales = 1.0,
    norm_preserving: bool = False,
    visit: TileVisitor | None = None,
    workers: int | None = None,
) -> None:
    """``out ← orthogonalize(source)``, bitwise as ``orthogonalize_`` would leave ``source``.

    ``source`` is only read (a read-only memory map of a stored tensor will do), each tile at most twice;
    ``out`` is written once, a tile at a time. ``visit(offset, tile)`` sees every finished tile of ``out``
    while it is still in the cache (see ``abliterate.edit.tiles.TileVisitor``).

    Args:
        source: the writer's weight, contiguous, laid out as ``orthogonalize`` says.
        out: a contiguous tensor of the same shape and dtype (``source`` itself for a fold in place).
        direction, layout, scales, norm_preserving: as ``orthogonalize``.
        visit: called with each finished tile, or ``None``.
        workers: threads the tiles are spread over on the CPU (default ``torch.get_num_threads()``).
    """
    if layout not in ("linear", "experts", *ROWS_WRITE):
        raise ValueError(f"unknown weight layout {layout!r}")
    # Fused experts: no module boundary between the expert choice and the weights, so no norm-preserving edit.
    if norm_preserving and layout in FUSED_LAYOUTS:
        raise ValueError(f"a norm-preserving edit cannot scale a fused expert's input (layout {layout})")
    if source.shape != out.shape or source.dtype != out.dtype:
        raise ValueError(f"fold into {list(out.shape)} {out.dtype} from {list(source.shape)} {source.dtype}")
    if not (source.is_contiguous() and out.is_contiguous()):
        raise ValueError("fold_into takes contiguous tensors")
    if direction.dim() == 2:
        r: torch.Tensor = _basis(direction, source)
        strength: float | torch.Tensor = _row_strengths(scales, r)
    else:
        r = _unit(direction, source)
        if isinstance(scales, Sequence):
            raise ValueError("a single direction takes a single strength")
        strength = float(scales)
    if source.device.type != "cpu":
        workers = 1
    elif workers is None:
        workers = torch.get_num_threads()
    with one_intra_op_thread():
        fold_tiles(source, out, layout, TileFold(r, strength, workers, norm_preserving, visit))


def norm_factors(
    weight: torch.Tensor, direction: torch.Tensor, layout: Layout, scales: Scales = 1.0
) -> torch.Tensor:
    """The diagonal ``D`` of the column-norm-preserving fold ``W' = (I − s r̂ r̂ᵀ) W D``.

    Every vector the writer can emit for one input coordinate (a column of ``W`` in the linear layout, a
    row in the rows layouts, one token's embedding) keeps its original length: with ``n = |w|²`` and
    ``p_i = q_iᵀ w``, ``|(I − Σ s_i q_i q_iᵀ) w|² = n − Σ s_i (2 − s_i) p_i²`` in exact arithmetic, so
    ``D = sqrt(n / that)`` (1 where the projected vector is zero). Computed in float64 from ``weight``.

    Returns:
        ``[d_in]`` (linear, conv1d), ``[vocab]`` (embedding), ``[E, d_in]`` (experts, experts_t).
    """
    basis = direction.reshape(-1, direction.shape[-1]).to(device=weight.device, dtype=torch.float64)
    basis = basis / basis.norm(dim=-1, keepdim=True)
    row_scales = _row_strengths(scales, basis)
    wide = weight.detach().to(torch.float64)
    if layout in ROWS_WRITE:
        along, squared = wide @ basis.T, (wide * wide).sum(-1)  # [..., k], [...]
    else:
        along, squared = torch.einsum("kd,...di->...ik", basis, wide), (wide * wide).sum(-2)
    coefficients = along.reshape(-1, basis.shape[0]).T  # [k, m], as the kernel's tiles hold them
    return factors(squared.reshape(-1), coefficients, row_scales).reshape(squared.shape)


# The largest subspace the fold and the hooks accept, and how far from orthonormal its rows may be.
MAX_RANK = 4
BASIS_TOLERANCE = 1e-5


def check_basis(basis: torch.Tensor) -> torch.Tensor:
    """``basis`` ``[k, d_model]`` as float64, after checking its rows are orthonormal (within
    ``BASIS_TOLERANCE``) and ``1 ≤ k ≤ MAX_RANK``; the rank-k fold is exact only for such rows."""
    if basis.dim() != 2 or not 1 <= basis.shape[0] <= MAX_RANK:
        raise ValueError(f"a subspace must be [k, d_model] with 1 ≤ k ≤ {MAX_RANK}, got {list(basis.shape)}")
    wide = basis.detach().to(torch.float64)
    if not bool(torch.isfinite(wide).all()):
        raise ValueError("the subspace contains NaN or infinite values")
    gram = wide @ wide.T
    off = (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max().item()
    if off > BASIS_TOLERANCE:
        raise ValueError(f"the subspace's rows must be orthonormal (|QQᵀ − I| = {off:.2g})")
    return wide


def _basis(basis: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    compute = compute_dtype(like.dtype, like.device)
    return check_basis(basis).to(device=like.device, dtype=compute)


def _row_strengths(scales: Scales, r: torch.Tensor) -> torch.Tensor:
    values = [float(s) for s in scales] if isinstance(scales, Sequence) else [float(scales)] * r.shape[0]
    if len(values) != r.shape[0]:
        raise ValueError(f"{len(values)} strengths for a subspace of {r.shape[0]} directions")
    return torch.tensor(values, dtype=r.dtype, device=r.device)


def _unit(direction: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    compute = compute_dtype(like.dtype, like.device)
    r = direction.detach().to(device=like.device, dtype=compute).flatten()
    norm = r.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the direction must be a finite, non-zero vector")
    return r / norm


def changes(scales: Scales) -> bool:
    """Whether a fold at ``scales`` (one per row for a subspace) changes a tensor: not all zero."""
    return any(value != 0 for value in (scales if isinstance(scales, Sequence) else (scales,)))


def non_finite_writer(name: str) -> str:
    """The one-line refusal of a source writer that holds NaN or infinite values."""
    return (
        f"the source's {name} holds NaN/Inf values: a fold would spread them over whole rows; "
        "abliterate refuses non-finite writers"
    )


def refuse_non_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError(non_finite_writer(name))`` unless every element of ``tensor`` is finite.

    A fold multiplies each written vector's component along r̂ into every element of its row (or
    column), so one NaN in the source becomes a row of NaN in the edit, and the certificate could no
    longer tell any value there from the declared one.
    """
    if not all_finite(tensor):
        raise ValueError(non_finite_writer(name))
