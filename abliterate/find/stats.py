"""Intervals for rates and for paired differences: the statistics every evaluation figure carries.

* ``wilson_interval``: the Wilson score interval of a rate ``k / n`` (stays inside ``[0, 1]`` and is
  honest at ``k = 0``, where the normal approximation collapses to a point);
* ``paired_bootstrap``: the mean difference of two measurements taken on the same items (e.g. whether
  each held-out prompt was helped by edit A and by edit B) with a 95 % percentile bootstrap interval
  that resamples *pairs*, so the items' shared difficulty cancels out of the comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate ``successes / n``.

    Args:
        successes: how many of the ``n`` items count.
        n: the sample size.
        z: the normal quantile (1.96 for 95 %).

    Returns:
        ``(low, high)`` inside ``[0, 1]``; ``(0, 1)`` for ``n = 0`` (nothing measured, nothing known).
    """
    if n <= 0:
        return (0.0, 1.0)
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class PairedDifference:
    """The mean of ``a - b`` over paired items, with its 95 % bootstrap interval.

    Attributes:
        mean: the observed mean difference.
        low: the 2.5th percentile of the bootstrap means.
        high: the 97.5th percentile of the bootstrap means.
        n: the number of pairs.
    """

    mean: float
    low: float
    high: float
    n: int


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, rounds: int = 4000, seed: int = 0
) -> PairedDifference:
    """Mean of ``a[i] - b[i]`` with a 95 % percentile bootstrap interval that resamples pairs.

    For not-helped indicators (1 = not helped) of edit A and edit B on the same prompts, ``high <= 0.02``
    says A does not help less than B by more than two points, with 95 % confidence.

    Args:
        a: one measurement per item.
        b: the other measurement on the same items, in the same order.
        rounds: bootstrap resamples.
        seed: the generator's seed (same inputs and seed, same interval).

    Returns:
        The mean difference, its interval and the number of pairs.

    Raises:
        ValueError: ``a`` and ``b`` differ in length, are empty, hold non-finite values, or ``rounds`` < 1.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples must have equal lengths, got {len(a)} and {len(b)}")
    if len(a) == 0:
        raise ValueError("paired samples are empty")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    differences = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not np.isfinite(differences).all():
        raise ValueError("paired samples hold non-finite values")
    generator = np.random.default_rng(seed)
    # Resample in chunks so 4000 rounds of a few hundred pairs never hold a large index matrix.
    means = np.empty(rounds)
    chunk = max(1, 1_000_000 // len(differences))
    for start in range(0, rounds, chunk):
        stop = min(rounds, start + chunk)
        picks = generator.integers(0, len(differences), size=(stop - start, len(differences)))
        means[start:stop] = differences[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedDifference(float(differences.mean()), float(low), float(high), len(differences))
