"""The parity gate: three proofs that an edited checkpoint is the declared edit, composed in one report.

* **Weight certificate** (``abliterate.prove.certificate``): every tensor the model's structure says
  must change equals the fold of the original, every other tensor is bitwise equal. Streams; no forward pass.
* **Completeness** (``abliterate.prove.residual.check_completeness``): on real prompts, the adapter's listed
  writers account for every increment of the residual stream, up to rounding, so the fold (and the
  certificate's list) leaves nothing out that a prompt exercises.
* **Logit parity** (``abliterate.prove.parity``): the edited model reproduces the hooked original; in float32
  within 1e-3 of the logit scale, in 16-bit within ``FLOOR_FACTOR`` times the model's measured
  rounding floor.

``run`` runs all three (the certificate on the saved files when the source is a safetensors checkpoint),
``verify`` all three (``--no-forward`` keeps only the certificate, for models that do not fit), ``apply``
the certificate. Which ones ran, and why any was skipped, is part of the report.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from abliterate.adapters.resolve import residual_writers
from abliterate.adapters.spec import Adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.model.batching import EncodedPrompts, all_position_logits
from abliterate.model.dispatch import offloaded
from abliterate.model.hooks import ablated, edit_projection
from abliterate.prove.certificate import Certificate
from abliterate.prove.files import CompanionReport
from abliterate.prove.parity import (
    SIXTEEN_BIT,
    ParityReport,
    RoundingFloor,
    check_dtype,
    compare_logits,
    measure_floor,
)
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


def hooked_reference(
    model: nn.Module,
    adapter: Adapter,
    declared: DeclaredEdit,
    prompts: EncodedPrompts,
    dtype: str,
) -> HookedReference:
    """Run the original on ``prompts`` (one batch) with the declared edit hooked (``edit_projection``),
    the same edit the fold is given.

    Raises:
        ValueError: ``dtype`` has no parity proof (8-bit floats, unknown formats).
    """
    check_dtype(dtype)
    with ablated(model, adapter, edit_projection(declared)):
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


def edited_parity(
    model: nn.Module, adapter: Adapter, prompts: EncodedPrompts, reference: HookedReference
) -> ParityReport:
    """Compare the edited model's logits on ``prompts`` with the hooked reference.

    In 16-bit the limit comes from the rounding floor measured on the edited model itself: the distance
    between it and a sibling that rounds the same exact fold differently (``dithered``).
    """
    edited = all_position_logits(model, prompts)
    if reference.dtype not in SIXTEEN_BIT:
        return compare_logits(reference.logits, edited, reference.dtype, reference.mask)
    if offloaded(model):
        # Offloaded weights are reloaded from disk per forward pass: no sibling can be made in place.
        report = compare_logits(
            reference.logits, edited, reference.dtype, reference.mask, RoundingFloor(float("inf"), 1.0)
        )
        return replace(report, advisory=_OFFLOADED_ADVISORY)
    floors = []
    for seed in range(_SIBLINGS):
        with dithered(model, adapter, seed):
            sibling = all_position_logits(model, prompts)
        floors.append(measure_floor(edited, sibling, reference.mask))
    floor = RoundingFloor(max(f.mean_kl for f in floors), max(f.top1_disagreement for f in floors))
    report = compare_logits(reference.logits, edited, reference.dtype, reference.mask, floor)
    if any(writer.layout in ("experts", "experts_t") for writer in adapter.writers):
        report = replace(report, advisory=_ROUTED_ADVISORY)
    return report


# Siblings whose distances make the floor (the largest counts): rounding noise is a random variable.
_SIBLINGS = 2
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
