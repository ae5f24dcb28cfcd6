"""Wilson intervals and the paired bootstrap, with negative controls."""

from __future__ import annotations

import random

import pytest

from abliterate.find.stats import PairedDifference, paired_bootstrap, wilson_interval


def test_wilson_interval_matches_the_formula_and_brackets_the_rate() -> None:
    low, high = wilson_interval(1, 50)
    assert 0.003 < low < 0.004 and 0.10 < high < 0.11
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(50, 50)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for k in range(0, 41, 5):
        low, high = wilson_interval(k, 40)
        assert low <= k / 40 <= high
    # More data, a narrower interval.
    assert (
        wilson_interval(20, 400)[1] - wilson_interval(20, 400)[0]
        < wilson_interval(2, 40)[1] - wilson_interval(2, 40)[0]
    )


def test_judge_keeps_the_old_name() -> None:
    from abliterate.find import judge

    assert judge.wilson_interval is wilson_interval


def test_identical_samples_give_an_interval_around_zero() -> None:
    rng = random.Random(1)
    a = [float(rng.random() < 0.3) for _ in range(200)]
    result = paired_bootstrap(a, a)
    assert isinstance(result, PairedDifference)
    assert result.mean == 0.0 and result.low <= 0.0 <= result.high and result.n == 200


def test_independent_draws_of_one_rate_contain_zero() -> None:
    rng = random.Random(2)
    a = [float(rng.random() < 0.2) for _ in range(300)]
    b = [float(rng.random() < 0.2) for _ in range(300)]
    result = paired_bootstrap(a, b)
    assert result.low < 0.0 < result.high


def test_a_shifted_sample_excludes_zero() -> None:
    rng = random.Random(3)
    b = [float(rng.random() < 0.1) for _ in range(200)]
    # a helps less on 30 extra prompts: the difference is +0.15 and the interval must not reach 0.
    a = list(b)
    flipped = [i for i, value in enumerate(b) if value == 0.0][:30]
    for i in flipped:
        a[i] = 1.0
    result = paired_bootstrap(a, b)
    assert result.mean == pytest.approx(0.15)
    assert 0.0 < result.low < 0.15 < result.high
    reverse = paired_bootstrap(b, a)
    assert reverse.high < 0.0


def test_pairing_beats_unpaired_noise() -> None:
    # Items differ a lot in difficulty, the two arms by a constant 0.05: pairing sees it.
    rng = random.Random(4)
    b = [rng.uniform(0, 10) for _ in range(100)]
    a = [value + 0.05 for value in b]
    result = paired_bootstrap(a, b)
    assert result.low == pytest.approx(0.05) and result.high == pytest.approx(0.05)


def test_deterministic_given_seed() -> None:
    rng = random.Random(5)
    # Continuous values, so the percentiles of two seeds cannot land on the same grid point.
    a = [rng.random() for _ in range(50)]
    b = [rng.random() for _ in range(50)]
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7) != paired_bootstrap(a, b, seed=8)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ([1.0, 0.0], [1.0], "equal lengths"),
        ([], [], "empty"),
        ([float("nan")], [0.0], "non-finite"),
    ],
)
def test_bad_samples_raise(a: list[float], b: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b)
    with pytest.raises(ValueError, match="rounds"):
        paired_bootstrap([1.0], [0.0], rounds=0)
