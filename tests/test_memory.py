"""Resident memory per stage of a run (``StageTimer`` → the manifest's ``memory``)."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import quick_run_args

from abliterate.cli import main
from abliterate.io.memory import MIB, current_rss
from abliterate.pipeline.timing import StageTimer

pytestmark = pytest.mark.skipif(current_rss() is None, reason="no way to read the resident size here")

BIG_MIB = 256


def _big() -> torch.Tensor:
    """A tensor of ``BIG_MIB`` MiB in fresh anonymous pages, every page written (so it is resident, not
    just reserved). Fresh pages, not the allocator's: in a long test session the allocator may hand back
    memory that earlier tests freed and that is still resident, which no stage would see grow."""
    buffer = mmap.mmap(-1, BIG_MIB * MIB)
    tensor = torch.frombuffer(buffer, dtype=torch.float32)
    tensor.fill_(1.0)
    return tensor


def test_a_stage_that_keeps_a_big_tensor_shows_it() -> None:
    timer = StageTimer()
    kept = timer("allocate", _big)
    figures = timer.memory()["stages"]["allocate"]
    assert figures["growth_mib"] >= 0.9 * BIG_MIB
    assert figures["peak_rss_mib"] >= figures["end_rss_mib"] >= 0.9 * BIG_MIB
    del kept


def test_a_short_lived_copy_counts_in_the_peak_not_at_the_end() -> None:
    timer = StageTimer()

    def copy_and_free() -> None:
        copy = _big()
        timer.observe()  # the copy exists now, however briefly
        del copy

    before = current_rss() or 0
    timer("transient", copy_and_free)
    figures = timer.memory()["stages"]["transient"]
    assert figures["growth_mib"] >= 0.9 * BIG_MIB
    assert figures["end_rss_mib"] - before / MIB < 0.5 * BIG_MIB  # freed before the stage ended


def test_a_stage_that_allocates_nothing_shows_no_growth() -> None:
    timer = StageTimer()
    timer("idle", sum, range(1000))
    assert timer.memory()["stages"]["idle"]["growth_mib"] < 32


def test_a_stage_that_raises_is_still_measured() -> None:
    timer = StageTimer()

    def fails() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        timer("check", fails)
    assert set(timer.memory()["stages"]) == {"check"}


def test_a_recurring_stage_keeps_its_largest_growth() -> None:
    timer = StageTimer()
    kept = timer("verify", _big)
    del kept
    timer("verify", sum, range(10))
    assert timer.memory()["stages"]["verify"]["growth_mib"] >= 0.9 * BIG_MIB


def test_the_manifest_has_memory_figures_for_every_stage(tiny_qwen2: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    args = ["run", str(tiny_qwen2), "-o", str(output), *quick_run_args(4, 2, layer=2, evaluate=False)]
    result = CliRunner().invoke(main, [*args, "--search", "none"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((output / "abliterate.json").read_text())
    stages = {key.removesuffix("_s") for key in manifest["timings"]} - {"total"}
    memory = manifest["memory"]
    assert set(memory["stages"]) == stages
    assert {"load", "extract", "edit", "verify", "save", "certify"} <= stages
    for figures in memory["stages"].values():
        assert 0 < figures["end_rss_mib"] <= figures["peak_rss_mib"] <= memory["peak_rss_mib"]
        assert figures["growth_mib"] >= 0
