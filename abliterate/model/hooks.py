"""Every hook abliterate installs, each in a context manager that always removes it.

An ablation is one patcher, ``ablated``, fed a small operator: the operator says what the hooks do at
one site (``projection``, ``subspace_projection``, ``norm_preserving_projection``; ``edit_projection``
picks the one a declared edit needs), the placement says which modules are the sites (every residual
writer by default, where the weight fold edits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from abliterate.adapters.resolve import ResolvedWriter, blocks_of, residual_writers
from abliterate.adapters.spec import Adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.direction import unit_rows
from abliterate.edit.kernel import norm_factors
from abliterate.edit.walker import check_norm_preserving

HiddenCallback = Callable[[int, torch.Tensor], None]


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


def project_out(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``h − (h·r̂) r̂`` along the last axis, in float32 or better, returned in ``hidden``'s dtype.

    Args:
        hidden: ``[..., d_model]``.
        direction: unit ``[d_model]``, or ``[batch, d_model]`` for one direction per batch row.
    """
    # A strength of exactly 1 multiplies exactly, so this is bit for bit the unscaled projection.
    return project_out_scaled(hidden, direction, 1.0)


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
    if r.dim() == 2:  # one direction per batch row: [batch, 1, ..., d_model]
        r = r.view(r.shape[0], *([1] * (h.dim() - 2)), r.shape[-1])
    if isinstance(strength, torch.Tensor):
        strength = strength.to(device=hidden.device, dtype=compute).view(shape)
    return (h - strength * (h * r).sum(-1, keepdim=True) * r).to(hidden.dtype)


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


@dataclass(frozen=True)
class Patch:
    """What the hooks do at one module.

    Attributes:
        output: ``(output, inputs) -> replacement`` of the module's output tensor; ``inputs`` are its
            positional arguments (an embedding's token ids).
        input: ``hidden -> replacement`` of the module's first positional argument before it runs
            (``None``: left as it is).
    """

    output: Callable[[torch.Tensor, tuple[Any, ...]], torch.Tensor]
    input: Callable[[torch.Tensor], torch.Tensor] | None = None


# An ablation operator: the patch at one site, or ``None`` to leave the site alone. The site is the
# residual writer hooked, or ``None`` where the placement hooks a module that is no writer.
Operator = Callable[["ResolvedWriter | None"], "Patch | None"]
# Where an ablation's hooks go: each module to hook, with the residual writer it is (or ``None``).
Placement = Callable[[nn.Module, Adapter], Iterable[tuple[nn.Module, "ResolvedWriter | None"]]]


def writer_sites(model: nn.Module, adapter: Adapter) -> list[tuple[nn.Module, ResolvedWriter | None]]:
    """The embeddings and every residual writer: what the fold edits (so it must equal these hooks)."""
    return [(writer.module, writer) for writer in residual_writers(model, adapter)]


def _map_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    raise TypeError(f"cannot ablate a module output of type {type(output).__name__}")


def _output_hook(rewrite: Callable[[torch.Tensor, tuple[Any, ...]], torch.Tensor]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return _map_output(output, lambda out: rewrite(out, args))

    return hook


def _input_hook(rewrite: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
        return (rewrite(args[0]), *args[1:])

    return hook


@contextmanager
def ablated(
    model: nn.Module, adapter: Adapter, operator: Operator, where: Placement = writer_sites
) -> Iterator[None]:
    """Hook ``operator``'s patch on every site of ``where`` for the ``with`` body.

    Args:
        model: the causal LM.
        adapter: its architecture description.
        operator: what to do at each site (see ``projection`` and its siblings).
        where: the sites (default: every residual writer, ``writer_sites``).
    """

    def handles() -> Iterator[torch.utils.hooks.RemovableHandle]:
        for module, writer in where(model, adapter):
            patch = operator(writer)
            if patch is None:
                continue
            yield module.register_forward_hook(_output_hook(patch.output))
            if patch.input is not None:
                yield module.register_forward_pre_hook(_input_hook(patch.input))

    with registered(handles()):
        yield


def projection(direction: torch.Tensor, scales: Callable[[ResolvedWriter], Any] | None = None) -> Operator:
    """Project ``direction`` out of each site's output: ``h − (h·r̂) r̂``, or ``h − s (h·r̂) r̂`` with
    ``s = scales(writer)`` (the hook equivalent of folding ``I − s r̂ r̂ᵀ``; a writer of strength 0
    is not hooked). With ``[batch, d_model]`` directions and ``[batch]`` strengths, every batch row is
    its own edit, so many edits share one forward pass.

    Args:
        direction: ``[d_model]`` (normalized here) or ``[batch, d_model]`` unit rows.
        scales: the strength at each writer, a float or ``[batch]`` (default: 1 everywhere, the paper's
            edit); a declared edit's is ``DeclaredEdit.scales`` (``edit_projection``).
    """
    if direction.dim() == 1:
        direction = unit_rows(direction)
    if scales is None:
        plain = Patch(lambda out, inputs: project_out(out, direction))
        return lambda writer: plain

    def at(writer: ResolvedWriter | None) -> Patch | None:
        strength = scales(writer)
        if isinstance(strength, torch.Tensor) or strength != 0:
            return Patch(lambda out, inputs: project_out_scaled(out, direction, strength))
        return None

    return at


def subspace_projection(basis: torch.Tensor, scales: Callable[[ResolvedWriter], Any]) -> Operator:
    """Project ``Σ_i s_i (h·q_i) q_i`` out of each site's output, ``s = scales(writer)``: the hook
    equivalent of folding ``I − Q diag(s) Qᵀ`` (``abliterate.edit.kernel.orthogonalize_`` with a
    ``[k, d_model]`` direction). A writer whose scales are all 0 is not hooked.

    Args:
        basis: orthonormal rows ``[k, d_model]``, or ``[batch, k, d_model]`` (one edit per batch row,
            ``scales`` then gives ``[batch, k]``).
        scales: the scales ``[k]`` (a sequence or tensor) at each writer.
    """

    def at(writer: ResolvedWriter | None) -> Patch | None:
        rows = torch.as_tensor(scales(writer), dtype=torch.float64)
        if bool((rows != 0).any()):
            return Patch(lambda out, inputs: project_out_subspace(out, basis, rows))
        return None

    return at


def norm_preserving_projection(direction: torch.Tensor, scales: Callable[[ResolvedWriter], Any]) -> Operator:
    """The hook equivalent of the column-norm-preserving fold ``W' = (I − s r̂ r̂ᵀ) W D``
    (``abliterate.edit.kernel.norm_factors``): scale what each writer reads by ``D``, then project its
    output. An embedding's ``D`` is per token, so its output rows are scaled by ``D[token]``. Fused
    experts have no module boundary between the expert choice and their weights, so they are refused.

    Args:
        direction: ``[d_model]``, or an orthonormal subspace ``[k, d_model]`` (rows normalized here).
        scales: each writer's strength (per row of a subspace).
    """
    basis = unit_rows(direction.reshape(-1, direction.shape[-1]))

    def at(writer: ResolvedWriter | None) -> Patch:
        check_norm_preserving([writer])
        rows = torch.as_tensor(scales(writer), dtype=torch.float64).expand(basis.shape[0])
        factors = norm_factors(writer.weight_tensor(), basis, writer.layout, tuple(rows.tolist()))
        if writer.group == "embedding":  # per token: no input to scale, its output rows are scaled
            return Patch(lambda out, ids: _scale_rows(project_out_subspace(out, basis, rows), factors, ids))
        return Patch(lambda out, inputs: project_out_subspace(out, basis, rows), _scaling(factors))

    return at


def _scaling(factors: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def scale(hidden: torch.Tensor) -> torch.Tensor:
        wide = factors.to(device=hidden.device, dtype=torch.float32)
        return (hidden.to(torch.float32) * wide).to(hidden.dtype)

    return scale


def _scale_rows(projected: torch.Tensor, factors: torch.Tensor, inputs: tuple[Any, ...]) -> torch.Tensor:
    # An embedding's factors are per token: row ``i`` of the output is scaled by ``D[token_i]``.
    row_scale = factors.to(projected.device)[inputs[0]].to(torch.float32)[..., None]
    return (projected.to(torch.float32) * row_scale).to(projected.dtype)


def edit_projection(declared: DeclaredEdit) -> Operator:
    """The operator whose hooks are the reference of ``walker.fold_direction(declared)``: its direction
    ``[d_model]`` (``projection``) or subspace ``[k, d_model]`` (``subspace_projection``) at each writer's
    ``declared.scales``, or of the fold ``(I − s r̂ r̂ᵀ) W D`` when ``declared.norm_preserving``
    (``norm_preserving_projection``). The paper's plain edit takes the unscaled projection."""
    direction = declared.direction
    if declared.is_plain():
        return projection(direction)

    def scales(writer: ResolvedWriter) -> Any:
        return declared.scales(writer.group, writer.layer)

    if declared.norm_preserving:
        return norm_preserving_projection(direction, scales)
    if direction.dim() == 2:
        return subspace_projection(direction, scales)
    return projection(direction, scales)
