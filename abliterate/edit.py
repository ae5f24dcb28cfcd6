"""The weight edit: fold the projection ``I − r̂ r̂ᵀ`` into every residual writer, as a pure tensor function."""

from __future__ import annotations

import torch
from torch import nn

from abliterate.adapters import Adapter, Layout, residual_writers
from abliterate.adapters.resolve import embeddings_of, locate

# Layouts whose last axis is d_model (rows are written into the residual stream).
ROWS_WRITE = ("conv1d", "experts_t", "embedding")


def orthogonalize(weight: torch.Tensor, direction: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Remove ``direction`` from everything ``weight`` can write into the residual stream.

    Computed in float64 (or the weight's own wider dtype) and cast back to the weight's dtype once.

    Args:
        weight: the writer's weight, laid out as ``layout`` says:
            linear ``[d_model, d_in]``, conv1d ``[d_in, d_model]``, experts ``[E, d_model, d_in]``,
            experts_t ``[E, d_in, d_model]``, embedding ``[vocab, d_model]``.
        direction: ``[d_model]``; normalized here, so any non-zero vector is accepted.
        layout: the weight layout.

    Returns:
        A new tensor ``W'`` with ``r̂ᵀ W' = 0`` along the model axis, same shape and dtype as ``weight``.
    """
    r = _unit(direction, weight)
    w = weight.to(r.dtype)
    if layout in ROWS_WRITE:
        # [..., d_model]: W' = W − (W r̂) r̂ᵀ
        edited = w - torch.einsum("...d,d->...", w, r).unsqueeze(-1) * r
    elif layout in ("linear", "experts"):
        # [..., d_model, d_in]: W' = W − r̂ (r̂ᵀ W)
        edited = w - r.unsqueeze(-1) * torch.einsum("d,...di->...i", r, w).unsqueeze(-2)
    else:
        raise ValueError(f"unknown weight layout {layout!r}")
    return edited.to(weight.dtype)


def orthogonalize_(
    weight: torch.Tensor, direction: torch.Tensor, layout: Layout, chunk_elements: int = 1 << 22
) -> None:
    """``weight ← orthogonalize(weight)`` in place, in independent slices so the float64 temporaries stay
    small (an embedding of 150k × 4k would otherwise need several GB of them).

    Slicing changes nothing numerically: each row (rows-write layouts) or column (linear layouts) is
    computed on its own either way.
    """
    if weight.numel() <= chunk_elements:
        weight.copy_(orthogonalize(weight, direction, layout))
    elif layout in ROWS_WRITE:
        rows = weight.reshape(-1, weight.shape[-1])  # [n, d_model], each row edited on its own
        step = max(1, chunk_elements // rows.shape[1])
        for first in range(0, rows.shape[0], step):
            block = rows[first : first + step]
            block.copy_(orthogonalize(block, direction, "embedding"))
    elif layout == "experts":
        for expert in weight:  # [d_model, d_in] each
            orthogonalize_(expert, direction, "linear", chunk_elements)
    else:
        step = max(1, chunk_elements // weight.shape[0])  # [d_model, d_in], each column edited on its own
        for first in range(0, weight.shape[1], step):
            columns = weight[:, first : first + step]
            columns.copy_(orthogonalize(columns, direction, "linear"))


def orthogonalize_bias(bias: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Remove ``direction`` from a bias ``[d_model]`` or per-expert bias ``[E, d_model]``."""
    return orthogonalize(bias, direction, "embedding")


def _unit(direction: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    compute = torch.float64 if like.device.type != "mps" else torch.float32
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
    tied = head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None
    return tied


@torch.no_grad()
def fold_direction(model: nn.Module, adapter: Adapter, direction: torch.Tensor) -> int:
    """Edit ``model`` in place so no residual writer can write along ``direction``.

    Args:
        model: the causal LM (its weights are replaced in memory; nothing on disk changes).
        adapter: the architecture description.
        direction: ``[d_model]`` refusal direction.

    Returns:
        The number of tensors edited.
    """
    untie_embeddings(model, adapter)
    edited = 0
    for writer in residual_writers(model, adapter):
        orthogonalize_(writer.weight_tensor().data, direction, writer.layout)
        edited += 1
        bias = writer.bias_tensor()
        if bias is not None:
            bias.data.copy_(orthogonalize_bias(bias.data, direction))
            edited += 1
    return edited
