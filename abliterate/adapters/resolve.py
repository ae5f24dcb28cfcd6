"""Find the adapter for a loaded model and resolve its writers to real modules."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from abliterate.adapters.discovery import discover_adapter
from abliterate.adapters.paths import locate, module_at
from abliterate.adapters.registry import get_adapter, registered_model_types
from abliterate.adapters.spec import Adapter, Layout, writer_group, writer_role

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedWriter:
    """A residual writer of one block, bound to its module.

    Attributes:
        name: full dotted module name inside the model, e.g. ``"model.layers.3.mlp.down_proj"``.
        module: the module whose output is added to the residual stream.
        layout: weight layout (see ``abliterate.adapters.spec.Layout``).
        weight: attribute name of the weight parameter.
        bias: attribute name of the bias parameter, or ``None``.
        layer: index of the block it lives in, ``-1`` for embeddings.
        group: ``embedding``, ``attention``, ``mlp``, ``experts`` or ``shared_experts``.
    """

    name: str
    module: nn.Module
    layout: Layout
    weight: str
    bias: str | None
    layer: int
    group: str = "embedding"

    def weight_tensor(self) -> torch.Tensor:
        """The writer's weight parameter."""
        return getattr(self.module, self.weight)

    def bias_tensor(self) -> torch.Tensor | None:
        """The writer's bias parameter, if it has one."""
        if self.bias is None:
            return None
        bias = getattr(self.module, self.bias, None)
        return bias if isinstance(bias, torch.Tensor) else None


def model_type_of(model: nn.Module) -> str:
    """The ``model_type`` of a causal LM, looking inside multimodal wrappers' text config."""
    config = model.config
    text_config = getattr(config, "text_config", None)
    if text_config is not None and get_adapter(config.model_type) is None:
        return text_config.model_type
    return config.model_type


def blocks_of(model: nn.Module, adapter: Adapter) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of ``model`` and their dotted name.

    Raises:
        LookupError: the adapter's block path does not exist in the model.
    """
    name = locate(model, adapter.blocks)
    blocks = module_at(model, name) if name is not None else None
    if not isinstance(blocks, nn.ModuleList):
        raise LookupError(f"adapter {adapter.name!r}: no block list at {adapter.blocks!r}")
    return name, blocks


def embeddings_of(model: nn.Module, adapter: Adapter) -> list[ResolvedWriter]:
    """The embeddings whose output enters the residual stream, as writers (layout: rows = tokens)."""
    found = []
    for path in adapter.embeddings:
        name = locate(model, path)
        if name is None:
            raise LookupError(f"adapter {adapter.name!r}: no embedding at {path!r}")
        found.append(ResolvedWriter(name, module_at(model, name), "embedding", "weight", None, -1))
    return found


def resolve_writers(model: nn.Module, adapter: Adapter) -> list[ResolvedWriter]:
    """Every residual writer of every block, bound to its module.

    Raises:
        LookupError: a non-optional writer is missing from some block, or a block resolves no attention
            writer or no MLP writer (optional writers are "at least one of" groups: a dense block has a
            ``down_proj``, a MoE block experts, but no block may have neither).
    """
    blocks_name, blocks = blocks_of(model, adapter)
    writers = []
    for index, block in enumerate(blocks):
        roles = set()
        for writer in adapter.writers:
            module = module_at(block, writer.path)
            if module is None:
                if writer.optional:
                    continue
                raise LookupError(f"adapter {adapter.name!r}: block {index} has no module {writer.path!r}")
            name = f"{blocks_name}.{index}.{writer.path}"
            resolved = ResolvedWriter(
                name, module, writer.layout, writer.weight, writer.bias, index, writer_group(writer)
            )
            writers.append(resolved)
            roles.add(writer_role(writer))
        for role in ("attention", "mlp"):
            if role not in roles:
                paths = [w.path for w in adapter.writers if writer_role(w) == role] or ["(none listed)"]
                raise LookupError(
                    f"adapter {adapter.name!r}: block {index} has no {role} writer "
                    f"(looked for {', '.join(paths)}); is --architecture right?"
                )
    return writers


def residual_writers(model: nn.Module, adapter: Adapter) -> list[ResolvedWriter]:
    """Embeddings first, then every block's writers: everything the fold edits and the hooks ablate."""
    return embeddings_of(model, adapter) + resolve_writers(model, adapter)


def resolve_adapter(model: nn.Module, architecture: str | None = None) -> Adapter:
    """Return the adapter for ``model``.

    Args:
        model: a loaded causal LM.
        architecture: a registered model type to use instead of the model's own (override).

    Returns:
        The adapter.

    Raises:
        LookupError: the override is unknown, or the model type is unknown and discovery does not
            find a unique match.
    """
    if architecture is not None:
        adapter = get_adapter(architecture)
        if adapter is None:
            raise LookupError(
                f"--architecture {architecture!r} is not a registered model type; "
                f"choose one of: {', '.join(registered_model_types())}"
            )
        return adapter
    model_type = model_type_of(model)
    adapter = get_adapter(model_type)
    if adapter is not None:
        return adapter
    return discover_adapter(model, model_type)
