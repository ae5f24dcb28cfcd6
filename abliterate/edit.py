"""The weight edit: fold ``I − s r̂ r̂ᵀ`` into every residual writer, as a pure tensor function."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

from abliterate.adapters import Adapter, Layout, ResolvedWriter, residual_writers
from abliterate.adapters.resolve import embeddings_of, locate

# Layouts whose last axis is d_model (rows are written into the residual stream).
ROWS_WRITE = ("conv1d", "experts_t", "embedding")


T = TypeVar("T")

# Elements per tile of the in-place kernel: 1 MiB of float32, small enough to stay in a core's cache
# between the reads and writes of one tile (measured fastest of 2^14 … 2^20 on the development VM).
TILE_ELEMENTS = 1 << 18


def compute_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype the fold is computed in for weights of ``dtype``.

    16-bit weights are folded in float32: its 24-bit mantissa is 16 bits wider than bf16's and 13 wider
    than fp16's, so the float32 result rounds to the same 16-bit value as an exact computation except
    where it lies within ~2^-16 ulp of a rounding boundary (measured: ~1e-5 of the elements, each then
    one ulp away; ``abliterate.certificate`` states and checks the bound). Wider weights are folded in
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
    weight: torch.Tensor, direction: torch.Tensor, layout: Layout, strength: float = 1.0
) -> torch.Tensor:
    """Remove ``direction`` from everything ``weight`` can write into the residual stream.

    Computed in ``compute_dtype(weight.dtype)`` and cast back to the weight's dtype once per element.

    Args:
        weight: the writer's weight, laid out as ``layout`` says:
            linear ``[d_model, d_in]``, conv1d ``[d_in, d_model]``, experts ``[E, d_model, d_in]``,
            experts_t ``[E, d_in, d_model]``, embedding ``[vocab, d_model]``.
        direction: ``[d_model]``; normalized here, so any non-zero vector is accepted.
        layout: the weight layout.
        strength: ``s`` in ``W' = (I − s r̂ r̂ᵀ) W``; 1 removes the direction completely.

    Returns:
        A new tensor ``W'`` with ``r̂ᵀ W' = (1 − s) r̂ᵀ W`` along the model axis, same shape and dtype.
    """
    edited = weight.detach().clone()
    orthogonalize_(edited, direction, layout, strength)
    return edited


def orthogonalize_(
    weight: torch.Tensor, direction: torch.Tensor, layout: Layout, strength: float = 1.0
) -> None:
    """``weight ← orthogonalize(weight)`` in place, tile by tile (see ``TILE_ELEMENTS``).

    The tiles depend only on the tensor's shape, every tile is computed by the same operations on
    whichever thread runs it, and the one reduction across tiles adds their partial sums in tile order,
    so the in-memory fold, streaming ``apply`` and the certificate produce the same bits on one machine
    whatever the thread count. On the CPU the tiles are spread over ``torch.get_num_threads()`` Python
    threads (torch releases the GIL inside each operation), each running single-threaded operations.
    Temporaries stay at a few tiles (an embedding of 150k × 4k never needs a full-size float copy).
    """
    if layout not in ("linear", "experts", *ROWS_WRITE):
        raise ValueError(f"unknown weight layout {layout!r}")
    r = _unit(direction, weight)
    workers = torch.get_num_threads() if weight.device.type == "cpu" else 1
    with one_intra_op_thread():
        _fold_in_place(weight, r, direction, layout, strength, workers)


def _fold_in_place(
    weight: torch.Tensor,
    r: torch.Tensor,
    direction: torch.Tensor,
    layout: Layout,
    strength: float,
    workers: int,
) -> None:
    if not weight.is_contiguous():  # e.g. a transposed view: edit a contiguous copy, write it back once
        contiguous = weight.contiguous()
        _fold_in_place(contiguous, r, direction, layout, strength, workers)
        weight.copy_(contiguous)
        return
    if layout in ROWS_WRITE:
        # [..., d_model]: W' = W − s (W r̂) r̂ᵀ, each row on its own.
        _fold_rows(weight.view(-1, weight.shape[-1]), r, strength, workers)
    elif layout == "experts":
        for expert in weight:  # [d_model, d_in] each
            _fold_columns(expert, r, strength, workers)
    else:
        _fold_columns(weight, r, strength, workers)


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run torch operations on one intra-op thread: a tile is too small to split, and on a busy 2-core
    machine the per-operation barrier of a second thread made the loop up to 80x slower (measured)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _map_tiles(function: Callable[[int], T], starts: range, workers: int) -> list[T]:
    """``[function(start) for start in starts]``, spread over ``workers`` threads when worth it."""
    if workers <= 1 or len(starts) < 4:
        return [function(start) for start in starts]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, starts))


def _fold_rows(weight: torch.Tensor, r: torch.Tensor, strength: float, workers: int) -> None:
    # weight [n, d_model]: p = W r̂ per row, then W −= s p r̂ᵀ.
    step = max(1, TILE_ELEMENTS // weight.shape[1])

    def tile(first: int) -> None:
        rows = weight[first : first + step]
        block = rows.to(r.dtype)
        coefficients = (block * r).sum(-1)
        block.addr_(coefficients, r, alpha=-strength)
        rows.copy_(block)

    _map_tiles(tile, range(0, weight.shape[0], step), workers)


def _fold_columns(weight: torch.Tensor, r: torch.Tensor, strength: float, workers: int) -> None:
    # weight [d_model, d_in]: p = r̂ᵀ W from per-tile partial sums added in tile order, then W −= s r̂ pᵀ.
    step = max(1, TILE_ELEMENTS // max(1, weight.shape[1]))
    starts = range(0, weight.shape[0], step)

    def partial(first: int) -> torch.Tensor:
        return (weight[first : first + step].to(r.dtype) * r[first : first + step, None]).sum(0)

    coefficients = torch.zeros(weight.shape[1], dtype=r.dtype, device=weight.device)
    for part in _map_tiles(partial, starts, workers):
        coefficients += part

    def update(first: int) -> None:
        rows = weight[first : first + step]
        block = rows.to(r.dtype)
        block.addr_(r[first : first + step], coefficients, alpha=-strength)
        rows.copy_(block)

    _map_tiles(update, starts, workers)


def orthogonalize_bias(bias: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Remove ``direction`` from a bias ``[d_model]`` or per-expert bias ``[E, d_model]``."""
    return orthogonalize(bias, direction, "embedding")


def _unit(direction: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    compute = compute_dtype(like.dtype, like.device)
    r = direction.detach().to(device=like.device, dtype=compute).flatten()
    norm = r.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the direction must be a finite, non-zero vector")
    return r / norm


def untie_embeddings(model: nn.Module, adapter: Adapter) -> bool:
    """Give ``lm_head`` its own copy of a tied embedding matrix, so editing the embedding leaves it intact.

    Returns:
        Whether the weights were tied.
    """
    head_name = locate(model, adapter.lm_head)
    if head_name is None:
        return False
    head = model.get_submodule(head_name)
    embedding = embeddings_of(model, adapter)[0].module
    # Meta tensors (offloaded weights) all report data_ptr 0: only identity can tell a tie there.
    on_meta = head.weight.device.type == "meta" or embedding.weight.device.type == "meta"
    same_storage = not on_meta and head.weight.data_ptr() == embedding.weight.data_ptr()
    tied = head.weight is embedding.weight or same_storage
    if tied:
        head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None
    return tied


@torch.no_grad()
def fold_direction(
    model: nn.Module,
    adapter: Adapter,
    direction: torch.Tensor,
    writers: Iterable[ResolvedWriter] | None = None,
    strength_of: Callable[[ResolvedWriter], float] | None = None,
) -> int:
    """Edit ``model`` in place so no residual writer can write along ``direction``.

    Args:
        model: the causal LM (its weights are replaced in memory; nothing on disk changes).
        adapter: the architecture description.
        direction: ``[d_model]`` refusal direction.
        writers: edit only these (default: every residual writer); the gate's negative controls
            (``abliterate.controls``) leave some out.
        strength_of: ``s`` of ``I − s r̂ r̂ᵀ`` per writer (weight and bias), default 1 everywhere;
            the hook equivalent is ``abliterate.hooks.ablate_with_strengths``.

    Returns:
        The number of tensors edited.
    """
    untie_embeddings(model, adapter)
    edited = 0
    for writer in residual_writers(model, adapter) if writers is None else writers:
        strength = 1.0 if strength_of is None else float(strength_of(writer))
        orthogonalize_(writer.weight_tensor().data, direction, writer.layout, strength)
        edited += 1
        bias = writer.bias_tensor()
        if bias is not None:
            orthogonalize_(bias.data, direction, "embedding", strength)
            edited += 1
    return edited
