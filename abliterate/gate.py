"""The parity gate: three proofs that an edited checkpoint is the declared edit, composed in one report.

* **Weight certificate** (``abliterate.certificate``): every tensor the model's structure says must change
  equals the fold of the original, every other tensor is bitwise equal. Streams; no forward pass.
* **Completeness** (``abliterate.residual.check_completeness``): on real prompts, the adapter's listed
  writers account for every increment of the residual stream, up to rounding, so the fold (and the
  certificate's list) leaves nothing out that a prompt exercises.
* **Logit parity** (``abliterate.parity``): the edited model reproduces the hooked original; in float32
  within 1e-3 of the logit scale, in 16-bit within ``FLOOR_FACTOR`` times the model's measured
  rounding floor.

``run`` runs all three (the certificate on the saved files when the source is a safetensors checkpoint),
``verify`` all three (``--no-forward`` keeps only the certificate, for models that do not fit), ``apply``
the certificate. Which ones ran, and why any was skipped, is part of the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from abliterate.adapters import Adapter
from abliterate.batching import EncodedPrompts, all_position_logits
from abliterate.certificate import Certificate
from abliterate.hooks import ablate_direction
from abliterate.parity import SIXTEEN_BIT, ParityReport, RoundingFloor, check_dtype, measure_floor
from abliterate.residual import CompletenessReport, check_completeness


class ParityError(RuntimeError):
    """The edited model is not proven to be the declared edit; nothing was saved, written or pushed."""


@dataclass
class GateReport:
    """What the gate proved.

    Attributes:
        certificate: the weight certificate, or ``None`` when it did not run.
        completeness: the residual-stream completeness check, or ``None``.
        parity: the logit parity report, or ``None``.
        skipped: ingredient name → why it did not run.
    """

    certificate: Certificate | None = None
    completeness: CompletenessReport | None = None
    parity: ParityReport | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every ingredient that ran passed, and at least one ran."""
        ran = [part for part in (self.certificate, self.completeness, self.parity) if part is not None]
        return bool(ran) and all(part.passed for part in ran)

    @property
    def reason(self) -> str:
        """Why the gate failed (empty when it passed)."""
        reasons = [
            f"{name}: {part.reason}"
            for name, part in (
                ("certificate", self.certificate),
                ("completeness", self.completeness),
                ("parity", self.parity),
            )
            if part is not None and not part.passed
        ]
        if not reasons and not self.passed:
            reasons.append("no check could run: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items()))
        return "; ".join(reasons)

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary for the manifest and ``verify --json``."""
        return {
            "passed": self.passed,
            "reason": self.reason,
            "certificate": None if self.certificate is None else self.certificate.to_dict(),
            "completeness": None if self.completeness is None else self.completeness.to_dict(),
            "parity": None if self.parity is None else self.parity.to_dict(),
            "skipped": dict(self.skipped),
        }


@dataclass(frozen=True)
class HookedReference:
    """Logits of the hooked original on the parity prompts, and its rounding floor in 16-bit."""

    logits: torch.Tensor
    mask: torch.Tensor
    dtype: str
    floor: RoundingFloor | None


def hooked_reference(
    model: nn.Module, adapter: Adapter, direction: torch.Tensor, prompts: EncodedPrompts, dtype: str
) -> HookedReference:
    """Run the hooked original on ``prompts`` (one batch), plus the rounding-floor run in 16-bit.

    Raises:
        ValueError: ``dtype`` has no parity proof (8-bit floats, unknown formats).
    """
    check_dtype(dtype)
    mask = prompts.batches[0][1]
    with ablate_direction(model, adapter, direction):
        reference = all_position_logits(model, prompts)
    floor = None
    if dtype in SIXTEEN_BIT:
        with ablate_direction(model, adapter, direction, in_model_dtype=True):
            low_precision = all_position_logits(model, prompts)
        floor = measure_floor(reference, low_precision, mask)
    return HookedReference(reference, mask, dtype, floor)


def completeness_on(model: nn.Module, adapter: Adapter, prompts: EncodedPrompts) -> CompletenessReport:
    """The completeness check on the first batch of ``prompts`` (prefix included)."""
    input_ids, mask = prompts.batches[0]
    if prompts.prefix.numel():
        prefix = prompts.prefix.expand(input_ids.shape[0], -1)
        input_ids = torch.cat([prefix, input_ids], dim=1)
        mask = torch.cat([torch.ones_like(prefix), mask], dim=1)
    return check_completeness(model, adapter, input_ids, mask)


def edited_parity(model: nn.Module, prompts: EncodedPrompts, reference: HookedReference) -> ParityReport:
    """Compare the edited model's logits on ``prompts`` with the hooked reference."""
    from abliterate.parity import compare_logits

    edited = all_position_logits(model, prompts)
    return compare_logits(reference.logits, edited, reference.dtype, reference.mask, reference.floor)
