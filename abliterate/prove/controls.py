"""Negative controls for the parity gate: edits that are almost, but not exactly, the declared edit.

Every check abliterate ships must reject these (tests/test_gate.py runs them on every registered family
in bf16 and fp16; ``benchmarks/gate_controls.py`` measures the margins on the demo model). Each control
is the complete fold with one part left out or changed:

* ``nothing``: no tensor edited;
* ``embedding``, ``attention``, ``mlp``, ``experts``, ``shared_experts``: that writer group left unedited;
* ``layer:N``: every writer of block N left unedited;
* ``off:DEG``: the fold along a direction DEG degrees away from the declared one.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from abliterate.adapters.resolve import residual_writers
from abliterate.adapters.spec import WRITER_GROUPS, Adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.direction import unit_rows
from abliterate.edit.walker import fold_direction
from abliterate.model.batching import EncodedPrompts
from abliterate.prove.certificate import certify_checkpoint
from abliterate.prove.gate import Candidate, GateReport, gate_candidate, gate_reference
from abliterate.prove.structure import read_structure


def rotated(direction: torch.Tensor, degrees: float, seed: int = 0) -> torch.Tensor:
    """A unit vector ``degrees`` away from ``direction``, towards a seeded random orthogonal one."""
    unit = unit_rows(direction.double())
    other = torch.randn(unit.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    other = other - (other @ unit) * unit
    other = unit_rows(other)
    angle = math.radians(degrees)
    return (math.cos(angle) * unit + math.sin(angle) * other).to(direction.dtype)


def available_controls(model: nn.Module, adapter: Adapter) -> list[str]:
    """The controls that apply to ``model``: the groups it has, its middle block, and a 3° rotation."""
    writers = residual_writers(model, adapter)
    groups = [group for group in WRITER_GROUPS if any(w.group == group for w in writers)]
    n_layers = 1 + max(w.layer for w in writers)
    return ["nothing", *groups, f"layer:{n_layers // 2}", "off:3"]


def _left_out(control: str) -> tuple[str | None, int | None]:
    if control in WRITER_GROUPS:
        return control, None
    if control.startswith("layer:"):
        return None, int(control.split(":", 1)[1])
    return None, None


def fold_control(model: nn.Module, adapter: Adapter, direction: torch.Tensor, control: str) -> int:
    """Edit ``model`` in place like ``fold_direction``, but as ``control`` says (``complete``: the real fold).

    Returns:
        The number of tensors edited.
    """
    if control.startswith("off:"):
        direction = rotated(direction, float(control.split(":", 1)[1]))
    elif control not in ("complete", "nothing") and _left_out(control) == (None, None):
        raise ValueError(f"unknown control {control!r}")
    group, layer = _left_out(control)
    writers = [
        writer
        for writer in residual_writers(model, adapter)
        if control != "nothing" and writer.group != group and writer.layer != layer
    ]
    return fold_direction(model, adapter, DeclaredEdit(direction), writers)


def gate_on_controls(
    model: nn.Module,
    adapter: Adapter,
    direction: torch.Tensor,
    prompts: EncodedPrompts,
    workdir: Path,
    controls: list[str] | None = None,
) -> dict[str, GateReport]:
    """Run the whole gate on the complete edit and on every control, each saved as a checkpoint.

    Args:
        model: the unedited model, in the dtype to test (left unchanged: controls edit copies).
        adapter: its architecture description.
        direction: the declared direction.
        prompts: one batch of parity prompts.
        workdir: an empty directory for the original and the control checkpoints.
        controls: which to run (default: ``complete`` and ``available_controls``).

    Returns:
        Control name → the gate's report (``complete`` must pass, every other must fail).
    """
    dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
    original = workdir / "original"
    model.save_pretrained(original)
    structure = read_structure(original)
    declared = DeclaredEdit(direction)
    reference = gate_reference(model, adapter, prompts, declared, dtype_name)
    reports = {}
    for control in controls or ["complete", *available_controls(model, adapter)]:
        edited = copy.deepcopy(model)
        fold_control(edited, adapter, direction, control)
        report = gate_candidate(reference, adapter, Candidate(edited))
        saved = workdir / control.replace(":", "_")
        edited.save_pretrained(saved)
        del edited
        report.certificate = certify_checkpoint(
            original, saved, declared, progress=False, structure=structure
        )
        shutil.rmtree(saved)
        reports[control] = report
    return reports
