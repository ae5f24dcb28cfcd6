"""The parity gate: three proofs that an edited checkpoint is the declared edit, composed in one report.

* **Weight certificate** (``abliterate.prove.certificate``): every tensor the model's structure says
  must change equals the fold of the original, every other tensor is bitwise equal. Streams; no forward pass.
* **Completeness** (``abliterate.prove.residual.check_completeness``): on real prompts, the adapter's listed
  writers account for every increment of the residual stream, up to rounding, so the fold (and the
  certificate's list) leaves nothing out that a prompt exercises.
* **Logit parity** (``abliterate.prove.parity``): the edited model reproduces the hooked original; in float32
  within 1e-3 of the logit scale, in 16-bit within ``FLOOR_FACTOR`` times the model's measured
  rounding floor.

The forward half is run in one place, in two steps: ``gate_reference`` measures the original
(completeness, the hooked logits) before any candidate exists, and ``gate_candidate`` judges a
``Candidate`` against it (logit parity, with the 16-bit rounding floor of ``abliterate.prove.floor``).
Two steps, because a run folds the original in place after measuring it, ``verify`` frees the original
before loading the edited checkpoint, and the negative controls judge many candidates against one
reference. ``run`` (on the in-memory fold), ``verify`` (on the loaded edited checkpoint), the controls
and the LoRA check (the adapter loaded through peft) all call these two; each adds its own parts around
them: the certificate on the saved files, the distance to a full residual ablation, the files beside
the weights. Which ones ran, and why any was skipped, is part of the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from abliterate.adapters.spec import FUSED_LAYOUTS, Adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.model.batching import EncodedPrompts, all_position_logits
from abliterate.model.dispatch import offloaded
from abliterate.model.gguf import rounded_copy
from abliterate.model.hooks import ablated, edit_projection
from abliterate.prove.certificate import Certificate
from abliterate.prove.files import CompanionReport
from abliterate.prove.floor import rounding_floor
from abliterate.prove.parity import SIXTEEN_BIT, ParityReport, RoundingFloor, check_dtype, compare_logits
from abliterate.prove.residual import CompletenessReport, check_completeness


@dataclass
class GateReport:
    """What the gate proved.

    Attributes:
        certificate: the weight certificate, or ``None`` when it did not run.
        completeness: the residual-stream completeness check, or ``None``.
        parity: the logit parity report, or ``None``.
        files: ``config.json`` and the files transformers reads beside the weights, or ``None``.
        skipped: ingredient name → why it did not run.
    """

    certificate: Certificate | None = None
    completeness: CompletenessReport | None = None
    parity: ParityReport | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    files: CompanionReport | None = None

    @property
    def passed(self) -> bool:
        """Every gating ingredient that ran passed, and at least one proof of the weights ran (the
        files beside them prove nothing about the weights on their own)."""
        ran = [part for part in self._gating() if part is not None]
        files_pass = self.files is None or self.files.passed
        return any(part is not self.files for part in ran) and all(part.passed for part in ran) and files_pass

    def _gating(self) -> tuple[Certificate | CompletenessReport | ParityReport | CompanionReport | None, ...]:
        parity = self.parity if self.parity is None or not self.parity.advisory else None
        return (self.certificate, self.completeness, parity, self.files)

    @property
    def reason(self) -> str:
        """Why the gate failed (empty when it passed)."""
        reasons = [
            f"{name}: {part.reason}"
            for name, part in (
                ("certificate", self.certificate),
                ("completeness", self.completeness),
                ("parity", self.parity),
                ("files", self.files),
            )
            if part is not None and not part.passed and part in self._gating()
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
            "files": None if self.files is None else self.files.to_dict(),
            "skipped": dict(self.skipped),
        }


@dataclass(frozen=True)
class HookedReference:
    """Logits of the hooked original on the parity prompts."""

    logits: torch.Tensor
    mask: torch.Tensor
    dtype: str


@dataclass(frozen=True)
class GateReference:
    """What the gate measures on the original, before any candidate exists.

    Attributes:
        prompts: the parity prompts in one batch, padded once, so hooked and candidate logits line up
            position by position.
        hooked: the hooked original's logits on them.
        completeness: the residual-stream completeness check of the adapter's writer list, or ``None``
            where the caller does not ask for it.
    """

    prompts: EncodedPrompts
    hooked: HookedReference
    completeness: CompletenessReport | None


@dataclass(frozen=True)
class Candidate:
    """The edited model the gate judges, however it is held: a loaded edited checkpoint, the original
    with the edit folded in memory, or the original with a LoRA adapter loaded through peft.

    Attributes:
        model: the module whose residual writers hold the weights the candidate computes with; the
            16-bit rounding floor dithers them (``abliterate.prove.floor``). For a LoRA adapter: the base
            model under it.
        logits: the candidate's all-position logits given ``model`` and the gate's prompts.
        may_advise: 16-bit parity of routed experts or offloaded weights may be reported without gating
            (a weight certificate carries the proof of a checkpoint); ``False`` keeps it gating.
    """

    model: nn.Module
    logits: Callable[[nn.Module, EncodedPrompts], torch.Tensor] = all_position_logits
    may_advise: bool = True


def gate_reference(
    model: nn.Module,
    adapter: Adapter,
    prompts: EncodedPrompts,
    edit: DeclaredEdit,
    dtype: str,
    *,
    completeness: bool = True,
    rounded_to: str | None = None,
) -> GateReference:
    """The first half of the gate, on the original: completeness of the writer list, then the hooked
    original's logits (``gate_candidate`` is the second half).

    Args:
        model: the original model, unedited.
        adapter: its architecture description.
        prompts: the parity prompts (the first batch is used).
        edit: the declared edit the hooks apply.
        dtype: ``model``'s dtype name (selects the parity tolerances).
        completeness: run the completeness check.
        rounded_to: the dtype the candidate is saved in, when it differs from ``model``'s: the hooked
            reference is then the original rounded to it once (a copy), then hooked.

    Raises:
        ValueError: the dtype has no parity proof (8-bit floats, unknown formats).
    """
    checked = completeness_on(model, adapter, prompts) if completeness else None
    if rounded_to is None:
        return GateReference(prompts, hooked_reference(model, adapter, edit, prompts, dtype), checked)
    rounded = rounded_copy(model, getattr(torch, rounded_to))  # no second full-precision copy
    hooked = hooked_reference(rounded, adapter, edit, prompts, rounded_to)
    del rounded
    return GateReference(prompts, hooked, checked)


def gate_candidate(reference: GateReference, adapter: Adapter, candidate: Candidate) -> GateReport:
    """The second half of the gate: the candidate's logit parity against the hooked original, with the
    completeness measured on the original; the weight certificate and the files are the caller's to add.
    """
    parity = candidate_parity(reference, adapter, candidate)
    return GateReport(completeness=reference.completeness, parity=parity)


def hooked_reference(
    model: nn.Module, adapter: Adapter, edit: DeclaredEdit, prompts: EncodedPrompts, dtype: str
) -> HookedReference:
    """Run the original with ``edit`` hooked on every residual writer on ``prompts`` (one batch).

    Raises:
        ValueError: ``dtype`` has no parity proof (8-bit floats, unknown formats).
    """
    check_dtype(dtype)
    with ablated(model, adapter, edit_projection(edit)):
        reference = all_position_logits(model, prompts)
    return HookedReference(reference, prompts.batches[0][1], dtype)


def completeness_on(model: nn.Module, adapter: Adapter, prompts: EncodedPrompts) -> CompletenessReport:
    """The completeness check on the first batch of ``prompts`` (prefix included)."""
    input_ids, mask = prompts.batches[0]
    if prompts.prefix.numel():
        prefix = prompts.prefix.expand(input_ids.shape[0], -1)
        input_ids = torch.cat([prefix, input_ids], dim=1)
        mask = torch.cat([torch.ones_like(prefix), mask], dim=1)
    return check_completeness(model, adapter, input_ids, mask)


def candidate_parity(reference: GateReference, adapter: Adapter, candidate: Candidate) -> ParityReport:
    """Compare the candidate's logits on the gate's prompts with the hooked reference.

    In 16-bit the limit comes from the rounding floor measured on the candidate itself
    (``abliterate.prove.floor.rounding_floor``).
    """
    hooked, prompts = reference.hooked, reference.prompts
    edited = candidate.logits(candidate.model, prompts)
    if hooked.dtype not in SIXTEEN_BIT:
        return compare_logits(hooked.logits, edited, hooked.dtype, hooked.mask)
    if candidate.may_advise and offloaded(candidate.model):
        # Offloaded weights are reloaded from disk per forward pass: no sibling can be made in place.
        report = compare_logits(
            hooked.logits, edited, hooked.dtype, hooked.mask, RoundingFloor(float("inf"), 1.0)
        )
        return replace(report, advisory=_OFFLOADED_ADVISORY)
    floor = rounding_floor(
        candidate.model, adapter, edited, lambda: candidate.logits(candidate.model, prompts), hooked.mask
    )
    report = compare_logits(hooked.logits, edited, hooked.dtype, hooked.mask, floor)
    if candidate.may_advise and any(writer.layout in FUSED_LAYOUTS for writer in adapter.writers):
        report = replace(report, advisory=_ROUTED_ADVISORY)
    return report


# Expert routing turns ulp-level rounding into discrete expert flips whose effect spreads to every later
# token through attention; in 16-bit their logit distance is heavy-tailed (measured on a tiny OLMoE in
# fp16: the complete edit at 30x a typical sibling's distance, and one sibling seed in three as far).
_OFFLOADED_ADVISORY = (
    "reported, not gating: weights are offloaded, so the 16-bit rounding floor cannot be measured; "
    "the weight certificate and the completeness check carry the proof"
)
_ROUTED_ADVISORY = (
    "reported, not gating: 16-bit expert routing makes logit distances heavy-tailed; "
    "the weight certificate and the completeness check carry the proof"
)
