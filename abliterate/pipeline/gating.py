"""The chosen edit as hooks and as a fold, and the gate between them: parity reference, check, certificate."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import torch

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
from abliterate.model.hooks import ablated, edit_projection
from abliterate.pipeline.subject import Inputs, Subject
from abliterate.prove.certificate import certify_checkpoint
from abliterate.prove.files import compare_companions, compare_gguf_tokenizer
from abliterate.prove.gate import (
    GateReference,
    GateReport,
    gate_reference,
)
from abliterate.prove.gguf_source import certificate_source
from abliterate.prove.refold import certificate_device
from abliterate.ship import direction_file


def chosen_edit(subject: Subject, chosen: RefusalDirection) -> DeclaredEdit:
    """The chosen edit as the fold, the hooks and the certificate take it: its direction as stored, with
    the searched point's strengths over the model's blocks (``None``: the paper's edit)."""
    return declared_edit(chosen.direction, chosen.edit_point, subject.n_layers)


def hooked_edit(subject: Subject, chosen: RefusalDirection) -> AbstractContextManager:
    """The hook equivalent of the chosen edit (the paper's or a searched point)."""
    return ablated(subject.model, subject.adapter, edit_projection(chosen_edit(subject, chosen)))


def parity_reference(
    config: RunConfig, subject: Subject, inputs: Inputs, chosen: RefusalDirection
) -> GateReference:
    """What the gate compares with, measured before the fold: completeness of the writer list, and the
    original model with the chosen edit hooked on the parity prompts (for a cast output, the original
    rounded to the saved dtype once, then hooked)."""
    declared = direction_file.declared_edit(chosen.direction, chosen.edit_point, subject.n_layers)
    prompts = parity_prompts(config, subject, inputs)
    return gate_reference(
        subject.model, subject.adapter, prompts, declared, subject.dtype_name, rounded_to=subject.cast_to
    )


def parity_prompts(config: RunConfig, subject: Subject, inputs: Inputs) -> EncodedPrompts:
    """Harmful and harmless parity prompts in one batch, padded once, no shared prefix."""
    texts = inputs.harmful.parity + inputs.harmless.parity
    return encode(subject.tokenizer, texts, batch_size=len(texts), share_prefix=False, chat=subject.chat)


def fold(subject: Subject, chosen: RefusalDirection) -> None:
    """Fold the direction into every residual writer of the model in memory (then cast, for GGUF)."""
    walker.fold_direction(subject.model, subject.adapter, chosen_edit(subject, chosen))
    if subject.cast_to is not None:
        subject.model.to(getattr(torch, subject.cast_to))


def certify_saved(
    config: RunConfig,
    staging: Path,
    chosen: RefusalDirection,
    gate: GateReport,
    n_layers: int,
    device: torch.device | str | None = None,
) -> None:
    """Add the weight certificate of the saved checkpoint against its source (safetensors, or a GGUF read
    tensor by tensor) to ``gate`` (``n_layers``: the model's depth, over which a searched edit declares its
    strength profile; ``device``: where the model was folded, and so where the certificate folds again when
    it is a GPU, bitwise that device's fold), and the comparison of its config.json and the files beside the
    weights with the source's (for a GGUF source: its tokenizer as read from both)."""
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
        device=certificate_device(device),
    )


def raise_unless_passed(gate: GateReport, consequence: str) -> None:
    if not gate.passed:
        raise GateError(f"parity gate failed: {gate.reason}; {consequence}")
