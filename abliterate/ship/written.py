"""``apply`` certifies what it wrote from the bytes it computed, without folding a second time.

The weight certificate (``abliterate.prove.certificate``) refolds every edited tensor of the original and
compares it with the written one, bitwise on the machine that folded. When ``apply`` itself folds, that
second fold would recompute bytes it has just computed. Instead:

* **which tensors must change, and how, comes from the model's structure** (``read_structure``), exactly as
  the certificate reads it: ``apply`` folds each tensor with the structure's layout, group strength and
  norm-preserving flag, and a tensor its name patterns edit that the structure does not (or the reverse)
  fails before anything is written;
* **every written byte is read back** (``abliterate.io.shard_writer``): each folded tensor compared with the
  bytes of this machine's fold just computed, each copied run with the source, each header parsed again;
* the declared edit, the tensor names, the config and the companion files are checked by the
  certificate's own functions.

So the written checkpoint holds this machine's fold of the original, bitwise: the certificate's exact path.
``abliterate verify`` still refolds everything independently of the writer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from abliterate.adapters.spec import Layout
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.kernel import Scales, changes
from abliterate.errors import GateError
from abliterate.prove.checks import check_config, check_declared, check_names
from abliterate.prove.structure import Structure, canonical, tensor_index
from abliterate.prove.tally import Certificate, Tally


@dataclass(frozen=True)
class WriterFold:
    """How one tensor is folded, as the model's structure says: its layout, ``declared.scales`` for its
    group and block, whether it is scaled by ``D`` (a norm-preserving edit's weight), and where it lives."""

    layout: Layout
    scales: Scales
    scaled: bool
    group: str
    layer: int


def structural_folds(
    source: Path, planned: dict[str, Layout], structure: Structure, declared: DeclaredEdit
) -> dict[str, WriterFold]:
    """The fold of every tensor the edit changes, from the structure, checked against ``apply``'s plan.

    Args:
        source: the original checkpoint directory.
        planned: the tensors ``apply``'s name patterns edit, with their layouts.
        structure: ``read_structure(source)``.
        declared: the declared edit.

    Returns:
        On-disk name → its fold, for every tensor with a non-zero strength.

    Raises:
        GateError: the declared edit is no edit of this model, or the plan and the structure disagree on
            which tensors change or how; nothing has been written yet.
    """
    tally = Tally()
    index = tensor_index(source)
    names_by_canonical = {canonical(name): name for name in index}
    folds: dict[str, WriterFold] = {}
    if check_declared(declared, structure, index, names_by_canonical, tally):
        for name in index:
            required = structure.edits.get(canonical(name))
            layout = planned.get(name)
            if required is None:
                if layout is not None:
                    tally.fail(
                        f"{name}: apply's patterns edit it, but the structure says no writer lives there"
                    )
                continue
            scales = declared.scales(required.group, required.layer)
            if not changes(scales):  # strength 0: copied, and read back as unchanged
                continue
            if layout is None:
                tally.fail(f"{name}: the structure says it must be edited, but apply's patterns miss it")
                continue
            if layout != required.layout:
                tally.fail(
                    f"{name}: the structure folds it as {required.layout}, apply's patterns as {layout}"
                )
                continue
            scaled = declared.norm_preserving and not required.bias
            folds[name] = WriterFold(layout, scales, scaled, required.group, required.layer)
    if tally.failures:
        raise GateError(f"weight certificate failed: {tally.failures[0]}; nothing was written")
    return folds


def certify_written(
    source: Path,
    written: Path,
    structure: Structure,
    declared: DeclaredEdit,
    folds: dict[str, WriterFold],
    mismatches: list[str],
    started: float,
) -> Certificate:
    """The certificate of ``written``, whose tensors ``folds`` were folded and every byte read back.

    Args:
        source: the original checkpoint directory.
        written: the directory just written.
        structure: ``read_structure(source)``.
        declared: the declared edit.
        folds: what ``structural_folds`` returned, the folds the writer applied.
        mismatches: what read back differently from what was meant (``ShardWrite.mismatches``).
        started: ``time.perf_counter()`` when the certificate's work began.

    Returns:
        The certificate: every folded tensor exact (this machine's fold, bitwise), every other unchanged.
    """
    tally = Tally()
    source_index, target_index = tensor_index(source), tensor_index(written)
    check_names(structure, source_index, target_index, tally)
    check_config(source, written, structure, declared, tally)
    for line in mismatches:
        tally.fail(line)
    for name in target_index:
        tally.n_tensors += 1
        fold = folds.get(name)
        if fold is not None:
            tally.edited(fold.group, fold.layer, exact=True, leak=1.0)
        else:
            tally.n_unchanged += 1
    tally.bytes_read = 2 * sum(entry.end - entry.start for _, entry in target_index.values())
    return tally.certificate(time.perf_counter() - started)
