"""Every hook abliterate installs, each in a context manager that always removes it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from abliterate.adapters import Adapter, ResolvedWriter, residual_writers
from abliterate.adapters.resolve import blocks_of

HiddenCallback = Callable[[int, torch.Tensor], None]
# The strength of the projection at one residual writer: a float, or ``[batch]`` (one per batch row).
StrengthOf = Callable[[ResolvedWriter], "float | torch.Tensor"]


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    # Decoder blocks get the residual stream positionally or as ``hidden_states=``.
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def registered(handles: Iterable[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Keep hooks installed for the ``with`` body and remove every one of them afterwards.

    ``handles`` may be a generator that registers as it goes: it is consumed inside the ``try``, so a
    failure halfway through still removes the hooks registered before it.
    """
    installed: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for handle in handles:
            installed.append(handle)
        yield
    finally:
        for handle in installed:
            handle.remove()


@contextmanager
def record_block_inputs(
    model: nn.Module, adapter: Adapter, callback: HiddenCallback, layers: range | None = None
) -> Iterator[None]:
    """Call ``callback(layer, resid_pre)`` with the residual stream entering each block.

    Args:
        model: the causal LM.
        adapter: its architecture description.
        callback: receives the block index and its input ``[batch, seq, d_model]``.
        layers: the blocks to record (default: all).
    """
    _, blocks = blocks_of(model, adapter)

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            callback(layer, _hidden_of(args, kwargs))

        return hook

    recorded = layers if layers is not None else range(len(blocks))
    with registered(
        blocks[layer].register_forward_pre_hook(make_hook(layer), with_kwargs=True) for layer in recorded
    ):
        yield


class StopForward(Exception):
    """Raised by ``stop_before`` to end a forward pass early; caught by the context manager."""


@contextmanager
def stop_before(model: nn.Module, adapter: Adapter, layer: int) -> Iterator[None]:
    """End forward passes when they reach block ``layer`` (nothing after it is computed): the forward
    pass raises ``StopForward``, which the caller catches once it has what it recorded."""
    _, blocks = blocks_of(model, adapter)
    if layer >= len(blocks):
        yield
        return

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise StopForward

    handle = blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
    with registered([handle]):
        yield


def project_out(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``h − (h·r̂) r̂`` along the last axis, in float32 or better, returned in ``hidden``'s dtype.

    Args:
        hidden: ``[..., d_model]``.
        direction: unit ``[d_model]``, or ``[batch, d_model]`` for one direction per batch row.
    """
    compute = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden.to(compute)
    r = direction.to(device=hidden.device, dtype=compute)
    if r.dim() == 2:  # one direction per batch row: [batch, 1, ..., d_model]
        r = r.view(r.shape[0], *([1] * (h.dim() - 2)), r.shape[-1])
    return (h - (h * r).sum(-1, keepdim=True) * r).to(hidden.dtype)


def _map_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    raise TypeError(f"cannot ablate a module output of type {type(output).__name__}")


@contextmanager
def ablate_direction(model: nn.Module, adapter: Adapter, direction: torch.Tensor) -> Iterator[None]:
    """Project ``direction`` out of the output of the embeddings and of every residual writer.

    This is the reference ("hooked") model that the weight fold must reproduce exactly.

    Args:
        model: the causal LM.
        adapter: its architecture description.
        direction: ``[d_model]`` (normalized here) or ``[batch, d_model]`` unit rows.
    """
    if direction.dim() == 1:
        direction = direction / direction.norm()

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return _map_output(output, lambda out: project_out(out, direction))

    with registered(writer.module.register_forward_hook(hook) for writer in residual_writers(model, adapter)):
        yield


def project_out_scaled(
    hidden: torch.Tensor, direction: torch.Tensor, strength: float | torch.Tensor
) -> torch.Tensor:
    """``h − s (h·r̂) r̂`` along the last axis (``project_out`` with a strength ``s``).

    Args:
        hidden: ``[..., d_model]``.
        direction: unit ``[d_model]``, or ``[batch, d_model]`` for one direction per batch row.
        strength: a float, or ``[batch]`` for one strength per batch row.
    """
    compute = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden.to(compute)
    r = direction.to(device=hidden.device, dtype=compute)
    shape = (-1, *([1] * (h.dim() - 1)))
    if r.dim() == 2:
        r = r.view(r.shape[0], *([1] * (h.dim() - 2)), r.shape[-1])
    if isinstance(strength, torch.Tensor):
        strength = strength.to(device=hidden.device, dtype=compute).view(shape)
    return (h - strength * (h * r).sum(-1, keepdim=True) * r).to(hidden.dtype)


@contextmanager
def ablate_with_strengths(
    model: nn.Module, adapter: Adapter, direction: torch.Tensor, strength_of: StrengthOf
) -> Iterator[None]:
    """Project ``s · (h·r̂) r̂`` out of every residual writer's output, ``s = strength_of(writer)``.

    The hook equivalent of folding ``I − s r̂ r̂ᵀ`` with a per-writer strength into the weights (a
    writer of strength 0 gets no hook). With ``[batch, d_model]`` directions and ``[batch]``
    strengths, every batch row is its own edit, so many edits share one forward pass.

    Args:
        model: the causal LM.
        adapter: its architecture description.
        direction: ``[d_model]`` (normalized here) or ``[batch, d_model]`` unit rows.
        strength_of: the strength of each writer.
    """
    if direction.dim() == 1:
        direction = direction / direction.norm()

    def make_hook(strength: float | torch.Tensor) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            return _map_output(output, lambda out: project_out_scaled(out, direction, strength))

        return hook

    def handles() -> Iterator[torch.utils.hooks.RemovableHandle]:
        for writer in residual_writers(model, adapter):
            strength = strength_of(writer)
            if isinstance(strength, torch.Tensor) or strength != 0:
                yield writer.module.register_forward_hook(make_hook(strength))

    with registered(handles()):
        yield


def project_out_subspace(hidden: torch.Tensor, basis: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``h − Σ_i s_i (h·q_i) q_i`` along the last axis, in float32 or better (rank-k ``project_out_scaled``).

    Args:
        hidden: ``[batch, ..., d_model]``.
        basis: orthonormal rows ``[k, d_model]``, or ``[batch, k, d_model]`` for one subspace per batch row.
        scales: ``[k]``, or ``[batch, k]`` with a per-row basis.
    """
    compute = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden.to(compute)
    q = basis.to(device=hidden.device, dtype=compute)
    s = scales.to(device=hidden.device, dtype=compute)
    if q.dim() == 2:
        return (h - (h @ q.T * s) @ q).to(hidden.dtype)
    flat = h.reshape(h.shape[0], -1, h.shape[-1])  # [batch, tokens, d_model]
    coefficients = torch.bmm(flat, q.transpose(1, 2)) * s[:, None, :]  # [batch, tokens, k]
    return (flat - torch.bmm(coefficients, q)).reshape(h.shape).to(hidden.dtype)


# Per-writer scales of a subspace edit: ``[k]`` (a sequence or tensor), or ``[batch, k]``.
ScalesOf = Callable[[ResolvedWriter], Any]


@contextmanager
def ablate_subspace(
    model: nn.Module, adapter: Adapter, basis: torch.Tensor, scales_of: ScalesOf
) -> Iterator[None]:
    """Project ``Σ_i s_i (h·q_i) q_i`` out of every residual writer's output, ``s = scales_of(writer)``:
    the hook equivalent of folding ``I − Q diag(s) Qᵀ`` (``abliterate.edit.kernel.orthogonalize_`` with a
    ``[k, d_model]`` direction). A writer whose scales are all 0 gets no hook.

    Args:
        basis: orthonormal rows ``[k, d_model]``, or ``[batch, k, d_model]`` (one edit per batch row,
            ``scales_of`` then gives ``[batch, k]``).
    """

    def make_hook(scales: torch.Tensor) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            return _map_output(output, lambda out: project_out_subspace(out, basis, scales))

        return hook

    def handles() -> Iterator[torch.utils.hooks.RemovableHandle]:
        for writer in residual_writers(model, adapter):
            scales = torch.as_tensor(scales_of(writer), dtype=torch.float64)
            if bool((scales != 0).any()):
                yield writer.module.register_forward_hook(make_hook(scales))

    with registered(handles()):
        yield


@contextmanager
def ablate_norm_preserving(
    model: nn.Module, adapter: Adapter, direction: torch.Tensor, strength_of: Callable[[ResolvedWriter], Any]
) -> Iterator[None]:
    """The hook equivalent of the column-norm-preserving fold ``W' = (I − s r̂ r̂ᵀ) W D``
    (``abliterate.edit.kernel.norm_factors``): scale what each writer reads by ``D``, then project its output.

    An embedding's ``D`` is per token, so its hook scales each output row by ``D[token]``. Fused experts
    have no module boundary between the expert choice and their weights, so they are refused.

    Args:
        direction: ``[d_model]``, or an orthonormal subspace ``[k, d_model]``.
        strength_of: each writer's strength (per row of a subspace).
    """
    from abliterate.edit.kernel import norm_factors
    from abliterate.edit.walker import check_norm_preserving

    basis = direction.reshape(-1, direction.shape[-1])
    basis = basis / basis.norm(dim=-1, keepdim=True)
    writers = list(residual_writers(model, adapter))
    check_norm_preserving(writers)  # before any hook is installed

    def handles() -> Iterator[torch.utils.hooks.RemovableHandle]:
        for writer in writers:
            strength = strength_of(writer)
            scales = torch.as_tensor(strength, dtype=torch.float64).expand(basis.shape[0])
            factors = norm_factors(writer.weight_tensor(), basis, writer.layout, tuple(scales.tolist()))
            yield writer.module.register_forward_hook(
                _projecting(basis, scales, factors, writer.group == "embedding")
            )
            if writer.group != "embedding":
                yield writer.module.register_forward_pre_hook(_scaling_input(factors))

    with registered(handles()):
        yield


def _scaling_input(factors: torch.Tensor) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
        hidden = args[0]
        scaled = (hidden.to(torch.float32) * factors.to(device=hidden.device, dtype=torch.float32)).to(
            hidden.dtype
        )
        return (scaled, *args[1:])

    return hook


def _projecting(
    basis: torch.Tensor, scales: torch.Tensor, factors: torch.Tensor, per_token: bool
) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        def ablate(out: torch.Tensor) -> torch.Tensor:
            projected = project_out_subspace(out, basis, scales)
            if not per_token:
                return projected
            row_scale = factors.to(out.device)[args[0]].to(torch.float32)[..., None]
            return (projected.to(torch.float32) * row_scale).to(out.dtype)

        return _map_output(output, ablate)

    return hook


def ablate_edit(
    model: nn.Module,
    adapter: Adapter,
    direction: torch.Tensor,
    strength_of: Callable[[ResolvedWriter], Any] | None,
    norm_preserving: bool = False,
) -> contextlib.AbstractContextManager[None]:
    """The hooked reference of a fold: ``direction`` ``[d_model]`` with ``strength_of`` (``None``: 1
    everywhere, the paper's edit), or a subspace ``[k, d_model]`` whose ``strength_of`` gives one
    strength per row (``DeclaredEdit.scales_for``); ``norm_preserving``: of the fold ``(I − s r̂ r̂ᵀ) W D``
    (``ablate_norm_preserving``)."""
    if norm_preserving:
        if strength_of is None:
            return ablate_norm_preserving(model, adapter, direction, lambda writer: 1.0)
        return ablate_norm_preserving(model, adapter, direction, strength_of)
    if direction.dim() == 2:
        rows = direction.shape[0]
        return ablate_subspace(model, adapter, direction, strength_of or (lambda writer: [1.0] * rows))
    if strength_of is None:
        return ablate_direction(model, adapter, direction)
    return ablate_with_strengths(model, adapter, direction, strength_of)


@contextmanager
def add_to_block_input(
    model: nn.Module, adapter: Adapter, vector: torch.Tensor, layer: int
) -> Iterator[None]:
    """Add ``vector`` to the residual stream entering block ``layer`` at every position (steering)."""
    _, blocks = blocks_of(model, adapter)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = _hidden_of(args, kwargs)
        steered = hidden + vector.to(device=hidden.device, dtype=hidden.dtype)
        if args:
            return (steered, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": steered}

    handle = blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
    with registered([handle]):
        yield
