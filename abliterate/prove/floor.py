"""The 16-bit rounding floor: how far two equally exact roundings of one edited model are from each other.

In 16-bit no constant tolerance separates "rounded differently" from "slightly wrong"
(``abliterate.prove.parity``), so the gate measures each candidate's own floor: the distance between its
logits and those of siblings whose residual writers carry a seeded one-ulp dither (``dithered``).
``rounding_floor`` is the one place that measures it, for an edited checkpoint, an in-memory fold and a
LoRA adapter loaded through peft alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from abliterate.adapters.resolve import residual_writers
from abliterate.adapters.spec import Adapter
from abliterate.prove.parity import RoundingFloor, measure_floor

# Siblings whose distances make the floor (the largest counts): rounding noise is a random variable.
_SIBLINGS = 2


def rounding_floor(
    model: nn.Module,
    adapter: Adapter,
    edited: torch.Tensor,
    logits: Callable[[], torch.Tensor],
    mask: torch.Tensor | None,
) -> RoundingFloor:
    """The largest distance between a candidate's logits and those of its dithered siblings.

    Args:
        model: the module whose residual writers hold the weights the candidate computes with (dithered
            in place, and restored bitwise, for each sibling).
        adapter: its architecture description.
        edited: the candidate's logits, as ``logits()`` returned them on the undithered weights.
        logits: the candidate's all-position logits on the gate's prompts, computed again per sibling.
        mask: the real (non-padding) positions.
    """
    floors = []
    for seed in range(_SIBLINGS):
        with dithered(model, adapter, seed):
            sibling = logits()
        floors.append(measure_floor(edited, sibling, mask))
    return RoundingFloor(max(f.mean_kl for f in floors), max(f.top1_disagreement for f in floors))


# Two roundings of the same exact fold differ by about one rounding error per element. The sibling
# moves each element of every residual-writer tensor one ulp up with probability 1/24 and one ulp down
# with probability 1/24: zero mean and variance 1/12 ulp², the variance of round-to-nearest's own error.
_DITHER_PROBABILITY = 1 / 24
_DITHER_CHUNK = 1 << 22


@contextmanager
def dithered(model: nn.Module, adapter: Adapter, seed: int = 0) -> Iterator[None]:
    """Inside the block, every residual writer's weights and biases carry a one-ulp dither (seeded).

    The changed elements' values are kept and written back afterwards, so the model leaves the block
    bitwise as it entered, also when the body raises.
    """
    generator = torch.Generator().manual_seed(seed)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for writer in residual_writers(model, adapter):
                for tensor in (writer.weight_tensor(), writer.bias_tensor()):
                    if tensor is not None:
                        saved.extend(_dither(tensor.data.view(-1), generator))
        yield
    finally:
        with torch.no_grad():
            for flat, indices, values in reversed(saved):
                flat[indices] = values


def _dither(flat: torch.Tensor, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    for start in range(0, flat.numel(), _DITHER_CHUNK):
        chunk = flat[start : start + _DITHER_CHUNK]
        draw = torch.rand(chunk.numel(), generator=generator).to(chunk.device)
        indices = (draw < 2 * _DITHER_PROBABILITY).nonzero().flatten()
        towards = torch.where(draw[indices] < _DITHER_PROBABILITY, float("inf"), float("-inf"))
        yield chunk, indices, chunk[indices].clone()
        chunk[indices] = torch.nextafter(chunk[indices], towards.to(chunk.dtype))
