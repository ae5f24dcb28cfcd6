"""A source whose residual writers hold NaN or Inf is refused by ``run`` in one line, before anything is
written: a fold spreads a non-finite value over a whole row, where the certificate could then no longer
tell a correct edit from garbage. A non-finite value outside the writers (a norm weight) is not refused
for that reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus import change_tensor
from tiny import quick_run_args

from abliterate.cli import main

WRITER = "model.layers.1.mlp.down_proj.weight"


def _poisoned(source: Path, into: Path, name: str, value: float) -> Path:
    shutil.copytree(source, into)

    def poison(tensor: object) -> None:
        tensor.view(-1)[7] = value  # type: ignore[attr-defined]

    change_tensor(into, name, poison)
    return into


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_run_refuses_a_source_with_a_non_finite_writer(
    tiny_qwen2: Path, tmp_path: Path, value: float
) -> None:
    source = _poisoned(tiny_qwen2, tmp_path / "source", WRITER, value)
    output = tmp_path / "out"
    args = ["run", str(source), "-o", str(output), *quick_run_args(6, 2, 2, 2, False)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "NaN/Inf" in lines[0] and "down_proj" in lines[0], result.output
    assert "Traceback" not in result.output
    assert not output.exists()
    assert not list(tmp_path.glob(".out.*")), "a staging folder was left behind"


def test_run_accepts_the_same_source_when_every_writer_is_finite(tiny_qwen2: Path, tmp_path: Path) -> None:
    """Negative control: the unpoisoned copy of the same checkpoint runs to the end."""
    source = shutil.copytree(tiny_qwen2, tmp_path / "source")
    output = tmp_path / "out"
    args = ["run", str(source), "-o", str(output), *quick_run_args(6, 2, 2, 2, False)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (output / "abliterate.json").is_file()
