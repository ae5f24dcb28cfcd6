"""The chosen edit as hooks and as a fold, and the gate between them: parity reference, check, certificate."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from abliterate.adapters.spec import Adapter
from abliterate.config import RunConfig

# walker is called through its module, so tests can replace the fold (a broken one) by patching it.
from abliterate.edit import walker
from abliterate.edit.declared import DeclaredEdit
from abliterate.errors import GateError
from abliterate.find.point import declared_edit
from abliterate.find.select import RefusalDirection
from abliterate.model.batching import (
    EncodedPrompts,
    encode,
)
from abliterate.model.gguf_source import certificate_source
from abliterate.model.hooks import ablated, edit_projection
from abliterate.pipeline.subject import Inputs, Subject
from abliterate.prove.certificate import certify_checkpoint
from abliterate.prove.files import compare_companions, compare_gguf_tokenizer
from abliterate.prove.gate import (
    GateReport,
    HookedReference,
    completeness_on,
    edited_parity,
    hooked_reference,
)
from abliterate.prove.residual import CompletenessReport


def chosen_edit(subject: Subject, chosen: RefusalDirection) -> DeclaredEdit:
    """The chosen edit as the fold, the hooks and the certificate take it: its direction as stored, with
    the searched point's strengths over the model's blocks (``None``: the paper's edit)."""
    return declared_edit(chosen.direction, chosen.edit_point, subject.n_layers)


def hooked_edit(subject: Subject, chosen: RefusalDirection) -> AbstractContextManager:
    """The hook equivalent of the chosen edit (the paper's or a searched point)."""
    return ablated(subject.model, subject.adapter, edit_projection(chosen_edit(subject, chosen)))


@dataclass(frozen=True)
class ParityReference:
    """What the gate measures on the original before the fold.

    Attributes:
        prompts: harmful and harmless parity prompts in one batch, padded once, so hooked and edited
            logits line up position by position.
        hooked: the hooked original's logits on them (and the 16-bit rounding floor).
        completeness: the residual-stream completeness check of the adapter's writer list.
    """

    prompts: EncodedPrompts
    hooked: HookedReference
    completeness: CompletenessReport


def parity_reference(
    config: RunConfig, subject: Subject, inputs: Inputs, chosen: RefusalDirection
) -> ParityReference:
    """The reference the gate compares with: the original model with the direction ablated by hooks."""
    prompts = parity_prompts(config, subject, inputs)
    completeness = completeness_on(subject.model, subject.adapter, prompts)
    if subject.cast_to is None:
        hooked = hooked_reference(
            subject.model, subject.adapter, chosen_edit(subject, chosen), prompts, subject.dtype_name
        )
    else:
        # The gate of the saved dtype: the reference is the original rounded to it once, then hooked.
        rounded = copy.deepcopy(subject.model).to(getattr(torch, subject.cast_to))
        hooked = hooked_reference(
            rounded, subject.adapter, chosen_edit(subject, chosen), prompts, subject.cast_to
        )
        del rounded
    return ParityReference(prompts, hooked, completeness)


def parity_prompts(config: RunConfig, subject: Subject, inputs: Inputs) -> EncodedPrompts:
    """Harmful and harmless parity prompts in one batch, padded once, no shared prefix."""
    texts = inputs.harmful.parity + inputs.harmless.parity
    return encode(subject.tokenizer, texts, batch_size=len(texts), share_prefix=False, chat=subject.chat)


def fold(subject: Subject, chosen: RefusalDirection) -> None:
    """Fold the direction into every residual writer of the model in memory (then cast, for GGUF)."""
    walker.fold_direction(subject.model, subject.adapter, chosen_edit(subject, chosen))
    if subject.cast_to is not None:
        subject.model.to(getattr(torch, subject.cast_to))


def check_parity(model: nn.Module, adapter: Adapter, reference: ParityReference) -> GateReport:
    """The in-memory part of the gate: completeness of the writer list, and logit parity of the edited
    model against the hooked original on the parity prompts.

    Returns:
        The gate report so far; ``certify_saved`` adds the weight certificate of the saved files.
    """
    parity = edited_parity(model, adapter, reference.prompts, reference.hooked)
    return GateReport(completeness=reference.completeness, parity=parity)


def certify_saved(
    config: RunConfig, staging: Path, chosen: RefusalDirection, gate: GateReport, n_layers: int
) -> None:
    """Add the weight certificate of the saved checkpoint against its source (safetensors, or a GGUF read
    tensor by tensor) to ``gate`` (``n_layers``: the model's depth, over which a searched edit declares its
    strength profile), and the comparison of its config.json and the files beside the weights with the
    source's (for a GGUF source: its tokenizer as read from both)."""
    source, why_not = certificate_source(config.model)
    if source is None:
        gate.skipped["certificate"] = why_not
        return
    if isinstance(source, Path):
        gate.files = compare_companions(source, staging)
    else:
        gate.files = compare_gguf_tokenizer(source.path, staging)
    gate.certificate = certify_checkpoint(
        source,
        staging,
        declared_edit(chosen.direction, chosen.edit_point, n_layers),
        architecture=config.load.architecture,
        progress=config.progress,
    )


def raise_unless_passed(gate: GateReport, consequence: str) -> None:
    if not gate.passed:
        raise GateError(f"parity gate failed: {gate.reason}; {consequence}")
