"""Guards: outputs that overlap the source, apply's own card, early layer checks,
disjoint parity prompts, and which errors the CLI turns into one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny
from tiny import quick_run_args

from abliterate.cli import main
from abliterate.model.prompts import bundled, load_splits
from abliterate.ship.direction_file import save_direction

FAST = quick_run_args(4, 2, evaluate=False)
MANUAL = ["--layer", "1", "--position", "-1"]


def _fingerprint(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _one_line_error(result: object, expect: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert expect in lines[0], lines[0]


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "source", "qwen2")


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_run_refuses_an_output_overlapping_the_source(source: Path, where: str) -> None:
    output = {"same": source, "inside": source / "edited", "parent": source.parent}[where]
    before = _fingerprint(source)
    result = CliRunner().invoke(main, ["run", str(source), "-o", str(output), "--overwrite", *MANUAL, *FAST])
    _one_line_error(result, "overlaps the model source")
    assert _fingerprint(source) == before
    assert not (source / "edited").exists()


@pytest.fixture()
def direction_file(tmp_path: Path) -> Path:
    path = tmp_path / "direction.safetensors"
    save_direction(path, torch.randn(64, generator=torch.Generator().manual_seed(5)), 1, -1, "test")
    return path


def test_apply_refuses_an_output_inside_the_source(source: Path, direction_file: Path) -> None:
    before = _fingerprint(source)
    args = ["apply", str(source), "--direction", str(direction_file), "-o", str(source / "edited")]
    result = CliRunner().invoke(main, args)
    _one_line_error(result, "overlaps the model source")
    assert _fingerprint(source) == before


def test_apply_writes_its_own_model_card(source: Path, direction_file: Path, tmp_path: Path) -> None:
    (source / "README.md").write_text("---\nlicense: mit\n---\n# The original model card\n")
    output = tmp_path / "edited"
    result = CliRunner().invoke(
        main, ["apply", str(source), "--direction", str(direction_file), "-o", str(output)]
    )
    assert result.exit_code == 0, result.output
    card = (output / "README.md").read_text()
    assert "The original model card" not in card
    assert "abliterated" in card and "certificate   PASS" in card
    assert (source / "README.md").read_text().endswith("# The original model card\n")


def test_layer_out_of_range_fails_before_loading(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded although config.json says the layer does not exist")

    monkeypatch.setattr("abliterate.model.loading.load_model", must_not_load)
    args = ["run", str(source), "-o", str(tmp_path / "out"), "--layer", "4", "--position", "-1", *FAST]
    _one_line_error(CliRunner().invoke(main, args), "--layer 4 is out of range: the model has 4 layers")
    assert not (tmp_path / "out").exists()


def test_layer_unknown_to_the_config_fails_before_extraction(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the config cannot be read before loading, the loaded model decides, still before extraction."""
    from abliterate.model.sources import SourceInfo

    monkeypatch.setattr(
        "abliterate.pipeline.subject.describe_source", lambda name: SourceInfo(name, Path(name), None)
    )

    def must_not_extract(*args: object, **kwargs: object) -> None:
        raise AssertionError("extraction ran with an impossible --position")

    monkeypatch.setattr("abliterate.pipeline.finding.extract_means", must_not_extract)
    args = ["run", str(source), "-o", str(tmp_path / "out"), "--layer", "0", "--position", "-99", *FAST]
    _one_line_error(CliRunner().invoke(main, args), "--position -99 is out of range")


@pytest.mark.parametrize(
    ("n_train", "n_val"), [(1, 1), (128, 32), (150, 40), (160, 1), (160, 38), (159, 40), (1, 40)]
)
def test_bundled_parity_prompts_never_overlap_selection(n_train: int, n_val: int) -> None:
    for kind in ("harmful", "harmless"):
        splits = load_splits(kind, None, n_train=n_train, n_val=n_val, n_eval=50, n_parity=4, seed=3)
        assert splits.parity, (kind, n_train, n_val)
        assert not set(splits.parity) & (set(splits.train) | set(splits.val))


def test_bundled_prompts_exhausted_by_selection_is_one_line(tmp_path: Path, source: Path) -> None:
    n_val = str(max(len(bundled(kind, "val")) for kind in ("harmful", "harmless")))  # every val prompt
    args = ["run", str(source), "-o", str(tmp_path / "out"), *MANUAL, "--n-train", "160", "--n-val", n_val]
    _one_line_error(CliRunner().invoke(main, args), "none is left for the parity check")


@pytest.mark.parametrize(
    ("n_train", "n_val", "n_parity"), [(1, 1, 1000), (100, 100, 4), (2, 1, 1), (1, 50, 50)]
)
def test_user_parity_prompts_never_overlap_selection(
    tmp_path: Path, n_train: int, n_val: int, n_parity: int
) -> None:
    prompts = tmp_path / "prompts.txt"
    # Duplicates: the same text must not reach two splits through two copies.
    prompts.write_text("\n".join([f"prompt {i % 7}" for i in range(12)]))
    splits = load_splits(
        "harmful", str(prompts), n_train=n_train, n_val=n_val, n_eval=3, n_parity=n_parity, seed=0
    )
    parts = [splits.train, splits.val, splits.eval, splits.parity]
    assert all(parts), parts
    assert sum(len(part) for part in parts) == len({prompt for part in parts for prompt in part}) == 7


def test_an_internal_error_keeps_its_traceback(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ValueError raised inside a library (here ``json``) is a bug to report, not a one-line user error."""

    def broken_load(*args: object, **kwargs: object) -> None:
        json.loads("{")

    monkeypatch.setattr("abliterate.model.loading.load_model", broken_load)
    result = CliRunner().invoke(main, ["run", str(source), "-o", str(tmp_path / "out"), *MANUAL, *FAST])
    assert result.exit_code == 1
    assert isinstance(result.exception, json.JSONDecodeError)
    assert not result.output.startswith("error:")


def test_verbose_shows_the_traceback_of_a_user_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["-v", "run", str(tmp_path / "missing"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: model not found")
