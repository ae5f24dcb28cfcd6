"""Parity: does the edited model reproduce the hooked original? One report, tolerances in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from abliterate.find.scores import kl_divergence

# Gate tolerances per dtype. In float32 the fold and the hooks differ only by rounding order, so the
# largest logit difference stays near 1e-6 of the logit scale on real models; 1e-3 leaves room for
# deep models and long prompts while still rejecting any wrong direction (which moves logits by O(1)).
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"max_rel_logit_diff": 1e-3, "mean_kl": 1e-4, "top1_agreement": 0.99},
    "float64": {"max_rel_logit_diff": 1e-6, "mean_kl": 1e-8, "top1_agreement": 0.999},
}
# In 16-bit formats the edited weights are rounded once to 8 (bf16) or 11 (fp16) mantissa bits, so no
# constant tolerance separates "rounded differently" from "slightly wrong". The gate measures the
# model's own rounding floor instead: the distance between the edited model and a sibling that rounds
# the same exact fold differently (``abliterate.prove.floor.dithered``: one-ulp changes with the variance of
# round-to-nearest's error). The edited model may be at most FLOOR_FACTOR times as far from the hooked
# reference as that, in (trimmed) mean KL and in top-1 disagreement. Measured margins are in
# BENCHMARKS.md (parity gate section).
SIXTEEN_BIT = ("bfloat16", "float16")
FLOOR_FACTOR = 3.0
# Top-1 flips are rare, discrete events (only positions whose top-2 margin is below the rounding noise
# can flip), so their count fluctuates like a Poisson count between two equally noisy runs: a few
# flips are allowed on top of FLOOR_FACTOR times the floor's own.
_TOP1_SLACK = 3


def _top1_slack(rows: int) -> float:
    """Flips allowed beyond the floor's: a Poisson allowance of 3, plus 1 % of the positions."""
    return _TOP1_SLACK + 0.01 * rows


# Below this KL two distributions are the same for every purpose; it keeps the limit above zero when a
# model is so small or so well conditioned that the floor itself vanishes.
_KL_EPSILON = 1e-7


@dataclass(frozen=True)
class RoundingFloor:
    """How far two equally exact 16-bit roundings of the edited model are from each other.

    Attributes:
        mean_kl: trimmed mean KL between the two, per position (see ``_trimmed_mean``).
        top1_disagreement: fraction of positions whose argmax differs.
    """

    mean_kl: float
    top1_disagreement: float


def check_dtype(dtype: str) -> None:
    """Refuse dtypes the gate has no proof for (8-bit floats, integer or unknown formats).

    Raises:
        ValueError: naming the dtype and the ones that are supported.
    """
    if dtype not in TOLERANCES and dtype not in SIXTEEN_BIT:
        supported = ", ".join([*TOLERANCES, *SIXTEEN_BIT])
        raise ValueError(f"no parity proof for dtype {dtype}; load the model as one of: {supported}")


_CHUNK_ROWS = 64


@dataclass(frozen=True)
class ParityReport:
    """How closely the edited model reproduces the hooked original.

    Attributes:
        max_abs_logit_diff: largest |Δlogit| over every compared position and vocabulary entry.
        logit_scale: largest |logit| of the reference, to read the difference relative to it.
        mean_kl: mean KL(reference ‖ edited) over compared positions.
        trimmed_mean_kl: the same without the few largest positions (what 16-bit limits judge: an MoE
            router that flips an expert at one position is rounding noise, not a wrong edit).
        top1_agreement: fraction of positions whose argmax agrees.
        n_positions: number of compared positions.
        dtype: the dtype whose tolerances were applied.
        passed: whether every tolerance for ``dtype`` holds.
        reason: why it failed (empty when passed).
        floor_mean_kl, floor_top1_disagreement: the measured rounding floor (16-bit only).
        mean_kl_limit, top1_agreement_limit: the limits applied (16-bit: from the floor).
        advisory: when set, why this report is shown but does not decide the gate.
    """

    max_abs_logit_diff: float
    logit_scale: float
    mean_kl: float
    trimmed_mean_kl: float
    top1_agreement: float
    n_positions: int
    dtype: str
    passed: bool
    reason: str = ""
    floor_mean_kl: float | None = None
    floor_top1_disagreement: float | None = None
    mean_kl_limit: float | None = None
    top1_agreement_limit: float | None = None
    advisory: str = ""

    def to_dict(self) -> dict[str, float | int | str | bool]:
        """Plain dictionary for JSON output."""
        return asdict(self)


def compare_logits(
    reference: torch.Tensor,
    edited: torch.Tensor,
    dtype: str,
    mask: torch.Tensor | None = None,
    floor: RoundingFloor | None = None,
) -> ParityReport:
    """Compare two logit tensors ``[..., vocab]`` position by position.

    Args:
        reference: logits of the hooked original.
        edited: logits of the edited model, same shape.
        dtype: name of the model dtype (selects the tolerances).
        mask: optional boolean ``[...]`` selecting real (non-padding) positions.
        floor: the measured rounding floor; required for 16-bit dtypes (see ``measure_floor``).

    Returns:
        The parity report, with ``passed`` judged against the limits of ``dtype``.
    """
    check_dtype(dtype)
    diff, scale, kl, top1, rows, trimmed_kl = logit_distance(reference, edited, mask)
    if dtype in SIXTEEN_BIT:
        if floor is None:
            raise ValueError(f"a {dtype} parity check needs the model's measured rounding floor")
        limits = {
            "max_rel_logit_diff": float("inf"),
            "mean_kl": FLOOR_FACTOR * floor.mean_kl + _KL_EPSILON,
            "top1_agreement": 1.0 - FLOOR_FACTOR * floor.top1_disagreement - _top1_slack(rows) / max(rows, 1),
        }
    else:
        limits = TOLERANCES[dtype]
    failures = []
    if not diff <= limits["max_rel_logit_diff"] * max(scale, 1e-12):
        failures.append(
            f"max |Δlogit| {diff:.3g} > {limits['max_rel_logit_diff']:.0e} × logit scale {scale:.3g}"
        )
    judged_kl = trimmed_kl if dtype in SIXTEEN_BIT else kl
    if not judged_kl <= limits["mean_kl"]:
        what = "trimmed mean KL" if dtype in SIXTEEN_BIT else "mean KL"
        failures.append(f"{what} {judged_kl:.3g} > {limits['mean_kl']:.3g}")
    if not top1 >= limits["top1_agreement"]:
        failures.append(f"top-1 agreement {top1:.3f} < {limits['top1_agreement']:.3f}")
    return ParityReport(
        max_abs_logit_diff=diff,
        logit_scale=scale,
        mean_kl=kl,
        trimmed_mean_kl=trimmed_kl,
        top1_agreement=top1,
        n_positions=rows,
        dtype=dtype,
        passed=not failures,
        reason="; ".join(failures),
        floor_mean_kl=None if floor is None else floor.mean_kl,
        floor_top1_disagreement=None if floor is None else floor.top1_disagreement,
        mean_kl_limit=limits["mean_kl"],
        top1_agreement_limit=limits["top1_agreement"],
    )


def measure_floor(edited: torch.Tensor, sibling: torch.Tensor, mask: torch.Tensor | None) -> RoundingFloor:
    """The rounding floor from two runs that differ only in how the same exact edit was rounded."""
    _, _, _, top1, _, trimmed_kl = logit_distance(edited, sibling, mask)
    return RoundingFloor(trimmed_kl, 1.0 - top1)


def logit_distance(
    reference: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[float, float, float, float, int]:
    """``(max |Δlogit|, logit scale, mean KL, top-1 agreement, positions, trimmed mean KL)`` over the
    masked positions."""
    if reference.shape != edited.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference.shape)} vs {tuple(edited.shape)}")
    vocab = reference.shape[-1]
    reference = reference.reshape(-1, vocab)
    edited = edited.reshape(-1, vocab)
    if mask is not None:
        keep = mask.reshape(-1).to(reference.device).bool()
        reference, edited = reference[keep], edited[keep]
    # Row chunks keep float64 copies of a large vocabulary (150k entries) to a few hundred MB.
    diff, scale, agree = 0.0, 0.0, 0
    per_row: list[torch.Tensor] = []
    for start in range(0, reference.shape[0], _CHUNK_ROWS):
        ref, out = reference[start : start + _CHUNK_ROWS], edited[start : start + _CHUNK_ROWS]
        diff = max(diff, (ref.double() - out.double()).abs().max().item())
        scale = max(scale, ref.double().abs().max().item())
        per_row.append(kl_divergence(ref, out))
        agree += (ref.argmax(-1) == out.argmax(-1)).sum().item()
    rows = max(reference.shape[0], 1)
    kl = torch.cat(per_row) if per_row else torch.zeros(0, dtype=torch.float64)
    return diff, scale, kl.sum().item() / rows, agree / rows, int(reference.shape[0]), _trimmed_mean(kl)


def _trimmed_mean(values: torch.Tensor) -> float:
    """The mean without the ``_TOP1_SLACK`` largest values (isolated flips, see there)."""
    if values.numel() <= 2 * _TOP1_SLACK:
        return values.mean().item() if values.numel() else 0.0
    return values.sort().values[: values.numel() - _TOP1_SLACK].mean().item()
