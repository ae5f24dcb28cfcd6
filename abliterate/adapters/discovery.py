"""Guess the adapter of an unregistered model type from its module structure, or fail loudly.

A registered adapter *matches* a model when everything it names exists there: the block list, the
embeddings, every required writer (and the norm on its output) in every block, and each marker in at
least one block; each writer's weight must also have ``d_model`` on the axis its layout says. Adapters
that describe the same structure count as one. A match whose requirements are a strict subset of
another match's is dropped: a model with Gemma-2's sandwich norms also has every path a llama block
has, and the more specific description is the right one. Exactly one structure must remain.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from abliterate.adapters.paths import locate, module_at
from abliterate.adapters.registry import registered_adapters
from abliterate.adapters.spec import Adapter, Layout, Writer

logger = logging.getLogger(__name__)

# Which axis of a writer's weight is the model (residual) axis, per layout.
_MODEL_AXIS: dict[Layout, int] = {
    "linear": 0,
    "conv1d": 1,
    "experts": 1,
    "experts_t": 2,
    "embedding": 1,
}

Structure = tuple[object, ...]


def structure_of(adapter: Adapter) -> Structure:
    """Everything about an adapter that the in-memory fold depends on (model types and notes aside)."""
    return (adapter.blocks, adapter.embeddings, adapter.writers, adapter.lm_head, adapter.post_norm)


def requirements_of(adapter: Adapter) -> frozenset[str]:
    """The paths a model must have for ``adapter`` to match, as comparable strings."""
    required = {f"blocks:{adapter.blocks}"}
    required.update(f"embedding:{path}" for path in adapter.embeddings)
    for writer in adapter.writers:
        if not writer.optional:
            required.add(f"writer:{writer.path}")
            if writer.output_norm is not None:
                required.add(f"writer:{writer.output_norm}")
    required.update(f"marker:{marker}" for marker in adapter.markers)
    return frozenset(required)


def _has(block: nn.Module, path: str) -> bool:
    # Markers and writers may name a module or a parameter.
    return module_at(block, path) is not None or isinstance(_attribute(block, path), torch.Tensor)


def _attribute(root: nn.Module, path: str) -> object:
    owner_path, _, name = path.rpartition(".")
    owner = module_at(root, owner_path) if owner_path else root
    return getattr(owner, name, None) if owner is not None else None


def _writer_fits(block: nn.Module, writer: Writer, d_model: int) -> bool:
    module = module_at(block, writer.path)
    weight = getattr(module, writer.weight, None) if module is not None else None
    if not isinstance(weight, torch.Tensor):
        return False
    axis = _MODEL_AXIS[writer.layout]
    return weight.dim() > axis and weight.shape[axis] == d_model


def matches(model: nn.Module, adapter: Adapter) -> bool:
    """Whether every path ``adapter`` names exists in ``model`` with the shapes its layouts imply."""
    blocks_name = locate(model, adapter.blocks)
    blocks = module_at(model, blocks_name) if blocks_name is not None else None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return False
    embedding_names = [locate(model, path) for path in adapter.embeddings]
    if any(name is None for name in embedding_names):
        return False
    token_embedding = getattr(module_at(model, embedding_names[0]), "weight", None)
    if not isinstance(token_embedding, torch.Tensor):
        return False
    d_model = token_embedding.shape[-1]
    for writer in adapter.writers:
        present = [block for block in blocks if module_at(block, writer.path) is not None]
        if not writer.optional and len(present) != len(blocks):
            return False
        if not all(_writer_fits(block, writer, d_model) for block in present):
            return False
        if writer.output_norm is not None and not all(
            module_at(block, writer.output_norm) is not None for block in present
        ):
            return False
    return all(any(_has(block, marker) for block in blocks) for marker in adapter.markers)


def discover_adapter(model: nn.Module, model_type: str) -> Adapter:
    """Pick the registered adapter whose structure, alone, fits ``model``.

    Args:
        model: a loaded causal LM whose ``model_type`` is not registered.
        model_type: that model type, for messages.

    Returns:
        The adapter of the unique most specific matching structure (logged as a warning).

    Raises:
        LookupError: no structure or several structures match; the message names ``--architecture``.
    """
    by_structure: dict[Structure, Adapter] = {}
    for adapter in registered_adapters():
        if matches(model, adapter):
            by_structure.setdefault(structure_of(adapter), adapter)
    candidates = list(by_structure.values())
    most_specific = [
        adapter
        for adapter in candidates
        if not any(requirements_of(adapter) < requirements_of(other) for other in candidates)
    ]
    if len(most_specific) == 1:
        chosen = most_specific[0]
        logger.warning(
            "model type %r is not registered; its modules match the %r adapter (%s), using it. "
            "Pass --architecture TYPE to choose another.",
            model_type,
            chosen.name,
            ", ".join(chosen.model_types),
        )
        return chosen
    if not most_specific:
        raise LookupError(
            f"model type {model_type!r} is not supported and its modules match no known architecture; "
            f"pass --architecture TYPE with a registered type whose layout it shares"
        )
    names = ", ".join(adapter.name for adapter in most_specific)
    raise LookupError(
        f"model type {model_type!r} is not registered and its modules match several architectures "
        f"({names}); pass --architecture TYPE to choose one"
    )
