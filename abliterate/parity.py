"""Parity: does the edited model reproduce the hooked original? One report, tolerances in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# Gate tolerances per dtype. In float32 the fold and the hooks differ only by rounding order, so the
# largest logit difference stays near 1e-6 of the logit scale on real models; 1e-3 leaves room for
# deep models and long prompts while still rejecting any wrong direction (which moves logits by O(1)).
# In 16-bit formats the edited weights are rounded once to 8 (bf16) or 11 (fp16) mantissa bits, so
# single logits move by a few percent of their scale; the gate then judges the distributions instead
# (mean KL and top-1 agreement), which is what a user of the checkpoint observes.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"max_rel_logit_diff": 1e-3, "mean_kl": 1e-4, "top1_agreement": 0.99},
    "float64": {"max_rel_logit_diff": 1e-6, "mean_kl": 1e-8, "top1_agreement": 0.999},
    "bfloat16": {"max_rel_logit_diff": float("inf"), "mean_kl": 2e-2, "top1_agreement": 0.9},
    "float16": {"max_rel_logit_diff": float("inf"), "mean_kl": 1e-2, "top1_agreement": 0.95},
}


_CHUNK_ROWS = 64


@dataclass(frozen=True)
class ParityReport:
    """How closely the edited model reproduces the hooked original.

    Attributes:
        max_abs_logit_diff: largest |Δlogit| over every compared position and vocabulary entry.
        logit_scale: largest |logit| of the reference, to read the difference relative to it.
        mean_kl: mean KL(reference ‖ edited) over compared positions.
        top1_agreement: fraction of positions whose argmax agrees.
        n_positions: number of compared positions.
        dtype: the dtype whose tolerances were applied.
        passed: whether every tolerance for ``dtype`` holds.
        reason: why it failed (empty when passed).
    """

    max_abs_logit_diff: float
    logit_scale: float
    mean_kl: float
    top1_agreement: float
    n_positions: int
    dtype: str
    passed: bool
    reason: str = ""

    def to_dict(self) -> dict[str, float | int | str | bool]:
        """Plain dictionary for JSON output."""
        return asdict(self)


def kl_divergence(reference_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ other) per row over the last axis, in float64."""
    log_p = torch.log_softmax(reference_logits.double(), dim=-1)
    log_q = torch.log_softmax(other_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def compare_logits(
    reference: torch.Tensor, edited: torch.Tensor, dtype: str, mask: torch.Tensor | None = None
) -> ParityReport:
    """Compare two logit tensors ``[..., vocab]`` position by position.

    Args:
        reference: logits of the hooked original.
        edited: logits of the edited model, same shape.
        dtype: name of the model dtype (selects the tolerances).
        mask: optional boolean ``[...]`` selecting real (non-padding) positions.

    Returns:
        The parity report, with ``passed`` judged against ``TOLERANCES[dtype]``.
    """
    if reference.shape != edited.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference.shape)} vs {tuple(edited.shape)}")
    vocab = reference.shape[-1]
    reference = reference.reshape(-1, vocab)
    edited = edited.reshape(-1, vocab)
    if mask is not None:
        keep = mask.reshape(-1).to(reference.device).bool()
        reference, edited = reference[keep], edited[keep]
    # Row chunks keep float64 copies of a large vocabulary (150k entries) to a few hundred MB.
    diff, scale, kl_sum, agree = 0.0, 0.0, 0.0, 0
    for start in range(0, reference.shape[0], _CHUNK_ROWS):
        ref, out = reference[start : start + _CHUNK_ROWS], edited[start : start + _CHUNK_ROWS]
        diff = max(diff, (ref.double() - out.double()).abs().max().item())
        scale = max(scale, ref.double().abs().max().item())
        kl_sum += kl_divergence(ref, out).sum().item()
        agree += (ref.argmax(-1) == out.argmax(-1)).sum().item()
    rows = max(reference.shape[0], 1)
    kl, top1 = kl_sum / rows, agree / rows
    tolerance = TOLERANCES.get(dtype, TOLERANCES["bfloat16"])
    failures = []
    if not diff <= tolerance["max_rel_logit_diff"] * max(scale, 1e-12):
        failures.append(
            f"max |Δlogit| {diff:.3g} > {tolerance['max_rel_logit_diff']:.0e} × logit scale {scale:.3g}"
        )
    if not kl <= tolerance["mean_kl"]:
        failures.append(f"mean KL {kl:.3g} > {tolerance['mean_kl']:.0e}")
    if not top1 >= tolerance["top1_agreement"]:
        failures.append(f"top-1 agreement {top1:.3f} < {tolerance['top1_agreement']}")
    return ParityReport(
        max_abs_logit_diff=diff,
        logit_scale=scale,
        mean_kl=kl,
        top1_agreement=top1,
        n_positions=int(reference.shape[0]),
        dtype=dtype,
        passed=not failures,
        reason="; ".join(failures),
    )
