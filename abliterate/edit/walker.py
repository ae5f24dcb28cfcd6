"""The model walker: fold the kernel into every residual writer of a loaded model, untying a tied head.

``abliterate.edit.kernel`` holds the tensor arithmetic; this module decides which tensors of a model it
edits (the adapter's residual writers, their biases) and refuses what it cannot edit before changing any.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from abliterate.adapters.paths import locate
from abliterate.adapters.resolve import ResolvedWriter, embeddings_of, residual_writers
from abliterate.adapters.spec import FUSED_LAYOUTS, Adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.kernel import orthogonalize_, refuse_non_finite


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
    declared: DeclaredEdit,
    writers: Iterable[ResolvedWriter] | None = None,
) -> int:
    """Edit ``model`` in place so no residual writer can write along the declared edit's direction.

    Args:
        model: the causal LM (its weights are replaced in memory; nothing on disk changes).
        adapter: the architecture description.
        declared: the edit: its ``direction`` (``[d_model]``, or an orthonormal subspace ``[k, d_model]``),
            ``I − s r̂ r̂ᵀ`` on each writer's weight and bias with ``s = declared.scales(group, layer)``
            (the hook equivalent is ``model.hooks.edit_projection``); when ``declared.norm_preserving``,
            ``W' = (I − s r̂ r̂ᵀ) W D`` on every weight (``orthogonalize``), biases never scaled.
        writers: edit only these (default: every residual writer); the gate's negative controls
            (``abliterate.prove.controls``) leave some out.

    Returns:
        The number of tensors edited.

    Raises:
        ValueError: a norm-preserving edit with a fused-experts writer, or a writer holding NaN/Inf values
            (both checked before anything is edited).
    """
    chosen = list(residual_writers(model, adapter) if writers is None else writers)
    direction, norm_preserving = declared.direction, declared.norm_preserving
    if norm_preserving:
        check_norm_preserving(chosen)
    check_finite(chosen)  # before anything is folded: the model is left as it was
    untie_embeddings(model, adapter)
    edited = 0
    for writer in chosen:
        scales = declared.scales(writer.group, writer.layer)
        orthogonalize_(writer.weight_tensor().data, direction, writer.layout, scales, norm_preserving)
        edited += 1
        bias = writer.bias_tensor()
        if bias is not None:
            orthogonalize_(bias.data, direction, "embedding", scales)  # a bias is never scaled by D
            edited += 1
    return edited


def check_finite(writers: Iterable[ResolvedWriter]) -> None:
    """Refuse, in one line naming the tensor, writers whose weight or bias holds NaN or Inf values.

    Weights not in memory (offloaded to the meta device) are skipped: the streamed fold checks each
    tensor as it reads it.
    """
    for writer in writers:
        for name, tensor in ((writer.weight, writer.weight_tensor()), (writer.bias, writer.bias_tensor())):
            if tensor is not None and tensor.device.type != "meta":
                refuse_non_finite(f"{writer.name}.{name}", tensor)


def check_norm_preserving(writers: Iterable[ResolvedWriter]) -> None:
    """Raise one line naming the first fused-experts writer: a norm-preserving edit scales a writer's
    input, and fused experts have no module boundary where their input could be scaled."""
    for writer in writers:
        if writer.layout in FUSED_LAYOUTS:
            raise ValueError(
                f"{writer.name}: a norm-preserving edit cannot scale a fused expert's input "
                "(no module boundary); use a plain edit for this model"
            )
