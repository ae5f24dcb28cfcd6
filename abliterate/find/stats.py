"""Intervals of rates and of paired differences (stand-in until the shared evaluation's module lands:
the same names and signatures, so a merge takes that module's bodies)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PairedDifference:
    """The mean of ``a − b`` over paired observations, with its 95 % bootstrap interval.

    Attributes:
        mean: mean difference.
        low: lower end of the 95 % interval.
        high: upper end of the 95 % interval.
        n: pairs.
    """

    mean: float
    low: float
    high: float
    n: int


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, rounds: int = 4000, seed: int = 0
) -> PairedDifference:
    """The mean of ``a − b`` with a 95 % percentile-bootstrap interval, resampling the pairs.

    Args:
        a: one value per item (e.g. 1.0 where the first model was not helpful).
        b: the other model's values on the same items.
        rounds: bootstrap resamples.
        seed: the resampling seed.

    Returns:
        The mean difference and its interval (all zero, ``n = 0``, for no pairs).

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return PairedDifference(0.0, 0.0, 0.0, 0)
    differences = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, n, (rounds, n), generator=generator)
    means = differences[indices].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return PairedDifference(differences.mean().item(), low, high, n)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of a rate ``successes / n``; ``(0, 1)`` for ``n = 0``."""
    if n <= 0:
        return (0.0, 1.0)
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))
