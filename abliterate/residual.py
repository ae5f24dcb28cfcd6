"""Full residual-stream ablation: the reference that post-norm families can only approximate.

``abliterate.hooks.ablate_direction`` projects r̂ out of what each writer emits, which is exactly what
the weight fold reproduces. Where a norm sits between a writer and the residual add (Gemma-2/3,
OLMo-2), the normed output can point along r̂ again, so the residual stream still carries r̂. The
context manager here projects r̂ out of every term that is actually added to the residual stream (the
embeddings, and each writer's output norm where it has one, else the writer), so r̂ is absent from
the residual stream everywhere. For pre-norm families it installs the same hooks as the writer-level
ablation; for post-norm families the logit distance between the two is the price of the fold.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from abliterate.adapters import Adapter
from abliterate.adapters.resolve import blocks_of, embeddings_of
from abliterate.hooks import _map_output, project_out, registered


def residual_terms(model: nn.Module, adapter: Adapter) -> list[nn.Module]:
    """Every module whose output is added to the residual stream as it is.

    Args:
        model: the causal LM.
        adapter: its architecture description.

    Returns:
        The embeddings, then per block each present writer, or the norm applied to its output.
    """
    terms = [embedding.module for embedding in embeddings_of(model, adapter)]
    _, blocks = blocks_of(model, adapter)
    for index, block in enumerate(blocks):
        for writer in adapter.writers:
            path = writer.output_norm or writer.path
            try:
                terms.append(block.get_submodule(path))
            except AttributeError:
                if writer.optional:
                    continue
                raise LookupError(f"adapter {adapter.name!r}: block {index} has no module {path!r}") from None
    return terms


@contextmanager
def ablate_residual_stream(model: nn.Module, adapter: Adapter, direction: torch.Tensor) -> Iterator[None]:
    """Project ``direction`` out of every term added to the residual stream.

    Args:
        model: the causal LM.
        adapter: its architecture description.
        direction: ``[d_model]``; normalized here.
    """
    unit = direction / direction.norm()

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return _map_output(output, lambda hidden: project_out(hidden, unit))

    with registered(module.register_forward_hook(hook) for module in residual_terms(model, adapter)):
        yield
