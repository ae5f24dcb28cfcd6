"""Output handling that cannot lose data: one output rule for every writer (``checkpoint.prepare_output``),
``--overwrite`` only over an earlier abliterate output, a move into place checked against what was there,
Ctrl-C and SIGTERM that clean up and tell the truth, source file modes kept, symbolic links handled."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny
from tiny import quick_run_args

from abliterate.cli import main
from abliterate.edit.declared import DeclaredEdit
from abliterate.io import output as checkpoint
from abliterate.ship import streaming
from abliterate.ship.direction_file import save_direction

FAST_RUN = [*quick_run_args(4, 2, layer=1, evaluate=False)]
EARLIER = {"abliterate_version": "0.0.0", "command": "apply", "format": "checkpoint", "source": "x"}


def _fingerprint(directory: Path) -> dict[str, str]:
    """Every file (links followed) and folder under ``directory``, with its content hash and mode."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        if path.is_file():
            entries[key] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {oct(path.stat().st_mode)}"
        else:
            entries[key] = "dir"
    return entries


def _one_line_error(result: object, expect: str) -> str:
    assert result.exit_code == 1, result.output
    # Progress bars of the work done before a late refusal may come first; the error is one last line.
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and "Traceback" not in result.output, result.output
    assert expect in errors[0], errors[0]
    return errors[0]


def _leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if ".tmp-" in path.name or ".old-" in path.name)


def _earlier_output(directory: Path) -> Path:
    """An earlier ``apply`` output at ``directory``: its manifest and a file of its own."""
    directory.mkdir(parents=True)
    (directory / "abliterate.json").write_text(json.dumps(EARLIER))
    (directory / "stale.txt").write_text("from the earlier output")
    return directory


def _user_folder(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "notes.txt").write_text("my notes")
    (directory / "data").mkdir()
    (directory / "data" / "table.csv").write_text("a,b\n1,2\n")
    return directory


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "models" / "source", "qwen2")


@pytest.fixture()
def direction_file(tmp_path: Path) -> Path:
    path = tmp_path / "direction.safetensors"
    save_direction(path, torch.randn(64, generator=torch.Generator().manual_seed(5)), 1, -1, "test")
    return path


def _apply(source: Path, direction: Path, output: Path, *flags: str) -> object:
    args = ["apply", str(source), "--direction", str(direction), "-o", str(output), *flags]
    return CliRunner().invoke(main, args)


# ------------------------------------------------------------------ never over, in or around the source


@pytest.mark.parametrize("output_format", ["lora", "checkpoint"])
@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_apply_refuses_an_output_overlapping_the_source(
    source: Path, direction_file: Path, where: str, output_format: str
) -> None:
    (source.parent / "sibling.txt").write_text("another of the user's files")
    output = {"same": source, "parent": source.parent, "inside": source / "adapter"}[where]
    before = _fingerprint(source.parent)
    result = _apply(source, direction_file, output, "--format", output_format, "--overwrite")
    _one_line_error(result, "overlaps the model source")
    assert _fingerprint(source.parent) == before
    assert _leftovers(source.parent) == [] and _leftovers(source.parent.parent) == []


@pytest.mark.parametrize("mode", [["--format", "lora"], ["--direction-only"], []])
@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_run_refuses_an_output_overlapping_the_source(source: Path, where: str, mode: list[str]) -> None:
    output = {"same": source, "parent": source.parent, "inside": source / "out"}[where]
    before = _fingerprint(source.parent)
    result = CliRunner().invoke(
        main, ["run", str(source), "-o", str(output), "--overwrite", *mode, *FAST_RUN]
    )
    _one_line_error(result, "overlaps the model source")
    assert _fingerprint(source.parent) == before


def test_an_output_reached_through_a_link_is_compared_by_where_it_leads(
    source: Path, direction_file: Path, tmp_path: Path
) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(source.parent, target_is_directory=True)
    before = _fingerprint(source)
    result = _apply(source, direction_file, alias, "--format", "lora", "--overwrite")
    _one_line_error(result, "overlaps the model source")
    result = _apply(source, direction_file, alias / "source" / "adapter")
    _one_line_error(result, "overlaps the model source")
    assert _fingerprint(source) == before


def test_what_a_link_in_the_source_leads_to_is_protected_too(
    source: Path, direction_file: Path, tmp_path: Path
) -> None:
    """A source whose tokenizer is a link into an earlier abliterate output: replacing that output
    would leave the source's link dangling."""
    shared = _earlier_output(tmp_path / "shared")
    (source / "tokenizer.json").rename(shared / "tokenizer.json")
    (source / "tokenizer.json").symlink_to(shared / "tokenizer.json")
    before = _fingerprint(shared)
    result = _apply(source, direction_file, shared, "--overwrite")
    _one_line_error(result, "which the model source's")
    assert _fingerprint(shared) == before


def test_hub_demo_and_gguf_sources_are_protected_where_they_lie(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    snapshot = hub / "models--owner--name" / "snapshots" / "abc"
    for output in (snapshot, snapshot / "out", hub):
        with pytest.raises(ValueError, match="overlaps the model source"):
            checkpoint.prepare_output(output, "owner/name", overwrite=True)
    checkpoint.prepare_output(hub / "models--owner--other", "owner/name", overwrite=True)  # control

    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="overlaps the model source"):
        checkpoint.prepare_output(tmp_path / "cache", "demo", overwrite=True)
    checkpoint.prepare_output(tmp_path / "elsewhere", "demo", overwrite=True)  # control

    gguf = tmp_path / "ggufs" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    for output in (gguf.parent, gguf):
        with pytest.raises(ValueError, match="overlaps the model source"):
            checkpoint.prepare_output(output, str(gguf), overwrite=True)
    checkpoint.prepare_output(gguf.parent / "edited", str(gguf), overwrite=False)  # control: a sibling


# ------------------------------------------------------------------- --overwrite: only our own output


@pytest.mark.parametrize("output_format", ["lora", "checkpoint"])
def test_overwrite_refuses_a_folder_of_user_files(
    source: Path, direction_file: Path, tmp_path: Path, output_format: str
) -> None:
    folder = _user_folder(tmp_path / "mine")
    before = _fingerprint(folder)
    result = _apply(source, direction_file, folder, "--format", output_format, "--overwrite")
    line = _one_line_error(result, "holds files that are not abliterate output")
    assert str(folder) in line
    assert _fingerprint(folder) == before and _leftovers(tmp_path) == []


def test_run_overwrite_refuses_a_folder_of_user_files(source: Path, tmp_path: Path) -> None:
    folder = _user_folder(tmp_path / "mine")
    before = _fingerprint(folder)
    result = CliRunner().invoke(main, ["run", str(source), "-o", str(folder), "--overwrite", *FAST_RUN])
    _one_line_error(result, "holds files that are not abliterate output")
    assert _fingerprint(folder) == before


@pytest.mark.parametrize("output_format", ["checkpoint", "lora"])
def test_overwrite_replaces_our_earlier_output(
    source: Path, direction_file: Path, tmp_path: Path, output_format: str
) -> None:
    out = tmp_path / "out"
    first = _apply(source, direction_file, out, "--format", output_format)
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / "abliterate.json").read_text())
    assert manifest["command"] == "apply" and manifest["format"] == output_format
    (out / "stale.txt").write_text("left by the earlier output")

    refused = _apply(source, direction_file, out, "--format", output_format)
    _one_line_error(refused, "pass --overwrite to replace it")
    assert (out / "stale.txt").exists()

    again = _apply(source, direction_file, out, "--format", output_format, "--overwrite")
    assert again.exit_code == 0, again.output
    assert not (out / "stale.txt").exists() and (out / "abliterate.json").is_file()
    assert _leftovers(tmp_path) == []


def test_run_overwrite_replaces_our_earlier_output(source: Path, tmp_path: Path) -> None:
    out = _earlier_output(tmp_path / "out")
    result = CliRunner().invoke(main, ["run", str(source), "-o", str(out), "--overwrite", *FAST_RUN])
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()
    assert "abliterate_version" in json.loads((out / "abliterate.json").read_text())
    assert _leftovers(tmp_path) == []


def test_a_manifest_that_is_not_ours_does_not_count(tmp_path: Path) -> None:
    for content in ("not json", "[1, 2]", '{"version": 1}'):
        folder = tmp_path / f"folder{len(content)}"
        folder.mkdir()
        (folder / "abliterate.json").write_text(content)
        with pytest.raises(FileExistsError, match="not abliterate output"):
            checkpoint.prepare_output(folder, None, overwrite=True)
    linked = tmp_path / "linked"
    linked.mkdir()
    (tmp_path / "real.json").write_text(json.dumps(EARLIER))
    (linked / "abliterate.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(FileExistsError, match="not abliterate output"):
        checkpoint.prepare_output(linked, None, overwrite=True)


# ------------------------------------------------------------- the move into place, checked at the end


def _during_apply(monkeypatch: pytest.MonkeyPatch, action: object) -> None:
    """Run ``action()`` while ``apply`` writes, after its shards and before the move into place."""
    card = streaming.apply_card

    def card_and_action(*args: object, **kwargs: object) -> str:
        action()
        return card(*args, **kwargs)

    monkeypatch.setattr(streaming, "apply_card", card_and_action)


def test_a_folder_created_at_the_output_meanwhile_is_left_alone(
    source: Path, direction_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _during_apply(monkeypatch, lambda: _user_folder(out))
    result = _apply(source, direction_file, out)
    _one_line_error(result, "was created while abliterate ran")
    assert sorted(str(path.relative_to(out)) for path in out.rglob("*")) == [
        "data",
        "data/table.csv",
        "notes.txt",
    ]
    assert (out / "notes.txt").read_text() == "my notes" and _leftovers(tmp_path) == []


def test_an_earlier_output_replaced_meanwhile_is_left_alone(
    source: Path, direction_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _earlier_output(tmp_path / "out")

    def replace_it() -> None:
        out.rename(tmp_path / "moved")
        _user_folder(out)

    _during_apply(monkeypatch, replace_it)
    result = _apply(source, direction_file, out, "--overwrite")
    _one_line_error(result, "was moved or replaced while abliterate ran")
    assert (out / "notes.txt").read_text() == "my notes" and (tmp_path / "moved" / "stale.txt").exists()
    assert _leftovers(tmp_path) == []


def test_an_empty_output_that_gains_files_meanwhile_is_left_alone(
    source: Path, direction_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _during_apply(monkeypatch, lambda: (out / "notes.txt").write_text("my notes"))
    result = _apply(source, direction_file, out, "--overwrite")
    _one_line_error(result, "changed while abliterate ran")
    assert [path.name for path in out.iterdir()] == ["notes.txt"] and _leftovers(tmp_path) == []


@pytest.mark.parametrize("output_format", ["checkpoint", "lora"])
def test_a_symlinked_output_is_refused_up_front(
    source: Path, direction_file: Path, tmp_path: Path, output_format: str
) -> None:
    target = _earlier_output(tmp_path / "real")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    before = _fingerprint(target)
    result = _apply(source, direction_file, link, "--format", output_format, "--overwrite")
    _one_line_error(result, "is a symbolic link")
    assert link.is_symlink() and link.resolve() == target and _fingerprint(target) == before
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------- Ctrl-C and SIGTERM


@pytest.fixture()
def ctrl_c_reaches_us() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt, as in a terminal. A shell without job control starts background
    jobs (``pytest … &``) with SIGINT ignored, and Python then keeps ignoring it: right for the program
    (it was asked not to hear Ctrl-C), but these tests are about what it does when it hears one."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_before_the_move_cleans_up_and_says_nothing_was_written(
    source: Path, direction_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _earlier_output(tmp_path / "out")
    before = _fingerprint(out)
    _during_apply(monkeypatch, lambda: signal.raise_signal(signal.SIGTERM))
    result = _apply(source, direction_file, out, "--overwrite")
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert result.output.strip().splitlines()[-1] == "interrupted: nothing was written"
    assert _fingerprint(out) == before and _leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.usefixtures("ctrl_c_reaches_us")
def test_a_signal_during_the_replacement_is_held_and_then_tells_the_truth(
    source: Path, direction_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """Ctrl-C or SIGTERM while the old output is renamed aside and removed: the replacement finishes,
    and the message says that OUT holds the new output (never "nothing was written")."""
    out = _earlier_output(tmp_path / "out")
    remove = checkpoint._remove_retired

    def signalled_removal(retired: Path | None) -> str:
        signal.raise_signal(signum)  # delivered to this (the main) thread before it returns
        return remove(retired)

    monkeypatch.setattr(checkpoint, "_remove_retired", signalled_removal)
    result = _apply(source, direction_file, out, "--overwrite")
    assert result.exit_code == 128 + signum, result.output
    assert f"interrupted: {out} holds the new output; the output it replaced was removed" in result.output
    assert "nothing was written" not in result.output
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


# The child hears Ctrl-C even when pytest runs as a background job (exec keeps an ignored SIGINT ignored).
_SLOW_APPLY = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from abliterate.ship import streaming
fold = streaming.fold_into
def slow(*args, **kwargs):
    time.sleep(0.3)
    return fold(*args, **kwargs)
streaming.fold_into = slow
from abliterate.cli import main
sys.argv = ["abliterate", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_command_cleans_every_temporary_folder(
    source: Path, direction_file: Path, tmp_path: Path, signum: int
) -> None:
    """``timeout``, Slurm and ``docker stop`` send SIGTERM: the staged checkpoint must not stay behind."""
    out = _earlier_output(tmp_path / "out")
    before = _fingerprint(out)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    args = ["apply", str(source), "--direction", str(direction_file), "-o", str(out), "--overwrite"]
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_APPLY, *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not [path for path in tmp_path.iterdir() if path.name.startswith(".out.tmp-")]:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the staging folder never appeared"
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: nothing was written"
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".out.")]
    assert _fingerprint(out) == before


# --------------------------------------------------------------------------- file modes and links


def test_source_file_modes_are_kept_and_new_files_get_the_umask(
    source: Path, direction_file: Path, tmp_path: Path
) -> None:
    (source / "tokenizer.json").chmod(0o600)
    (source / "tokenizer_config.json").chmod(0o640)
    out = tmp_path / "out"
    result = _apply(source, direction_file, out)
    assert result.exit_code == 0, result.output
    umask = os.umask(0)
    os.umask(umask)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(out / "tokenizer.json") == 0o600
    assert mode(out / "tokenizer_config.json") == 0o640
    for written in ("README.md", "abliterate.json", "model.safetensors"):
        assert mode(out / written) == 0o666 & ~umask, written


def test_a_link_out_of_the_source_is_copied_by_content_and_said(
    source: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = tmp_path / "elsewhere" / "tokenizer.json"
    elsewhere.parent.mkdir()
    (source / "tokenizer.json").rename(elsewhere)
    elsewhere.chmod(0o600)
    (source / "tokenizer.json").symlink_to(elsewhere)
    # A Hub cache snapshot links into its blobs: copied the same way, without a word.
    blob = tmp_path / "hub" / "models--owner--name" / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    blob.write_text("{}")
    (source / "special_tokens_map.json").symlink_to(blob)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="abliterate.io.output"):
        streaming.stream_apply(source, DeclaredEdit(torch.randn(64)), out, progress=False)
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == elsewhere.read_bytes()
    assert stat.S_IMODE((out / "tokenizer.json").stat().st_mode) == 0o600
    warned = [record.getMessage() for record in caplog.records]
    assert len(warned) == 1 and str(elsewhere) in warned[0], warned
    assert (out / "special_tokens_map.json").read_text() == "{}"


def test_a_link_to_something_that_is_not_a_file_is_refused(
    source: Path, direction_file: Path, tmp_path: Path
) -> None:
    (source / "vocab.txt").symlink_to("/dev/null")
    out = tmp_path / "out"
    result = _apply(source, direction_file, out)
    _one_line_error(result, "is not a regular file")
    assert not out.exists() and _leftovers(tmp_path) == []
