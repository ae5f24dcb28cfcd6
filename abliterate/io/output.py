"""Where output goes and how it gets there: one rule for every writer, and an atomic move into place.

Every writer of output (``run``'s checkpoint, LoRA adapter or direction files; ``apply``'s checkpoint or
adapter) checks its output directory with ``prepare_output`` before anything is loaded or written, and
writes it through ``atomic_directory``:

- the output is never the source, inside it, or around it: symbolic links are resolved on both sides, and
  what a link inside the source leads to counts as the source too;
- an existing directory is used only when it is empty; ``--overwrite`` replaces only an earlier
  abliterate output, recognised by its ``abliterate.json`` manifest (``run`` writes its full manifest
  there, ``apply`` a short one: ``write_apply_manifest``); a symbolic link is refused;
- the output is staged in a hidden sibling ``.OUT.tmp-*`` and renamed into place at the very end, after
  checking that OUT is still what was there when it was checked; Ctrl-C and SIGTERM remove the staging.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from abliterate import __version__
from abliterate.io.interrupts import Interrupted, deferred_signals, signal_number, terminate_as_interrupt
from abliterate.io.locations import source_location

logger = logging.getLogger(__name__)

MANIFEST_NAME = "abliterate.json"
DIRECTION_NAME = "direction.safetensors"


@dataclass(frozen=True)
class OutputDir:
    """A checked output directory, and what was at its path when it was checked.

    Attributes:
        path: the absolute output path, its parent's symbolic links resolved.
        overwrite: ``--overwrite`` was given (an earlier abliterate output there may be replaced).
        found: ``(device, inode)`` of the directory that was at ``path``, or ``None`` when there was none.
    """

    path: Path
    overwrite: bool
    found: tuple[int, int] | None


def prepare_output(output: str | Path, source: str | Path | None, overwrite: bool) -> OutputDir:
    """Check ``output`` against the output rule, before anything is loaded or written.

    Args:
        output: the output directory as the user gave it.
        source: the model source as given (local directory, ``.gguf`` file, Hub id, ``demo``), or
            ``None`` when there is no source to protect (a push's own staging folder).
        overwrite: replace an earlier abliterate output at ``output``.

    Returns:
        The checked output, for ``atomic_directory``.

    Raises:
        ValueError: the output is the source, lies inside it, or contains it.
        FileExistsError: the output is a file or a symbolic link, or a directory that is not empty and
            not an earlier abliterate output (or is one, and ``overwrite`` was not given).
        PermissionError: its parent cannot be written.
    """
    given = Path(os.path.abspath(Path(output).expanduser()))
    path = given.parent.resolve() / given.name if given.name else given
    if source is not None:
        _refuse_overlap(path.resolve(), source)
    if path.is_symlink():
        raise FileExistsError(
            f"the output {path} is a symbolic link to {path.resolve()}: give that directory itself, or "
            "another --output"
        )
    why = _why_not_replaceable(path, overwrite)
    if why is not None:
        raise FileExistsError(why)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the output {path}: {parent} is not writable")
    return OutputDir(path, overwrite, _identity(path))


def is_abliterate_output(directory: Path) -> bool:
    """Whether ``directory`` holds an abliterate output: an ``abliterate.json`` manifest (a regular file,
    a JSON object with ``abliterate_version``), as ``run`` and ``apply`` write."""
    manifest = directory / MANIFEST_NAME
    if manifest.is_symlink() or not manifest.is_file():
        return False
    try:
        content = json.loads(manifest.read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "abliterate_version" in content


def write_apply_manifest(
    directory: Path,
    source: str,
    output_format: str,
    *,
    revision: str | None = None,
    direction_file: str | Path | None = None,
) -> None:
    """Write the short ``abliterate.json`` of an ``apply`` output (``output_format``: ``checkpoint`` or
    ``lora``): what wrote it from which ``source`` (as the user gave it) at which Hub ``revision``, so that a
    later ``--overwrite`` recognises the directory as abliterate's own; ``direction_file``, the direction
    applied, is copied in as ``direction.safetensors``, so that ``verify OUTPUT`` needs nothing else."""
    manifest = {
        "abliterate_version": __version__,
        "command": "apply",
        "format": output_format,
        "source": source,
        "revision": revision,
    }
    if direction_file is not None:
        shutil.copyfile(direction_file, directory / DIRECTION_NAME)
        manifest["direction"] = DIRECTION_NAME
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")


def _refuse_overlap(output: Path, source: str | Path) -> None:
    """Refuse an ``output`` (resolved) equal to, inside or around the source or what its links lead to."""
    location = source_location(source)
    if location is None:
        return
    for protected, link in _protected_paths(location):
        if output == protected or protected in output.parents or output in protected.parents:
            if link is None:
                raise ValueError(
                    f"the output {output} overlaps the model source {location}: choose an --output "
                    "outside it that does not contain it"
                )
            raise ValueError(
                f"the output {output} overlaps {protected}, which the model source's {link} links to: "
                "choose an --output that does not contain it"
            )


def _protected_paths(location: Path) -> Iterator[tuple[Path, Path | None]]:
    """``location``, then what each symbolic link inside it leads to outside it, with the link."""
    yield location, None
    if not location.is_dir():
        return
    for folder, subfolders, files in os.walk(location):
        for name in subfolders + files:
            entry = Path(folder) / name
            if entry.is_symlink():
                target = entry.resolve()
                if not target.is_relative_to(location):
                    yield target, entry


def _why_not_replaceable(path: Path, overwrite: bool) -> str | None:
    """Why the directory at ``path`` may not be written over (one line), or ``None`` when it may."""
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not path.is_dir():
        return f"output {path} exists and is not a directory"
    if not any(path.iterdir()):
        return None
    if not is_abliterate_output(path):
        return (
            f"output directory {path} is not empty and holds files that are not abliterate output, which "
            "--overwrite never replaces: remove them yourself or choose another --output"
        )
    if not overwrite:
        return (
            f"output directory {path} is not empty: it holds an earlier abliterate output "
            "(pass --overwrite to replace it)"
        )
    return None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def _check_unchanged(target: OutputDir) -> None:
    """Refuse to move the output into place when OUT is no longer what ``prepare_output`` checked: a
    folder created there meanwhile, one replaced, or files added that may not be replaced.

    Raises:
        FileExistsError: OUT changed (it is left as it is).
    """
    now = _identity(target.path)
    kept = "it was left as it is and nothing was written"
    if now != target.found:
        happened = "was created" if target.found is None else "was moved or replaced"
        raise FileExistsError(f"the output {target.path} {happened} while abliterate ran: {kept}")
    why = _why_not_replaceable(target.path, target.overwrite)
    if why is not None:
        raise FileExistsError(f"the output {target.path} changed while abliterate ran ({why}); {kept}")


@contextmanager
def atomic_directory(target: OutputDir) -> Iterator[Path]:
    """Yield a hidden staging sibling of ``target``; on success it replaces ``target``, otherwise it vanishes.

    The move happens only once the ``with`` body has finished, and only if OUT is still what
    ``prepare_output`` found (else ``FileExistsError``, the user's folder untouched). An old output is
    renamed aside, the new one renamed into place and the old one removed, with Ctrl-C and SIGTERM held
    until all three are done. An interruption before that removes the staging folder and raises as it
    came (nothing was written); one held until after raises ``Interrupted`` saying OUT holds the new
    output. SIGTERM raises like Ctrl-C in here (``interrupts.terminate_as_interrupt``).

    Raises:
        PermissionError: the staging sibling cannot be created (the parent is not writable).
        FileExistsError: OUT changed while the body ran.
    """
    staging: Path | None = None
    placed = False
    note = ""
    with terminate_as_interrupt():
        try:
            with deferred_signals():
                staging = _make_sibling(target.path, "tmp")
            yield staging
            _apply_umask(staging)
            with deferred_signals():
                _check_unchanged(target)
                retired = _move_into_place(staging, target.path)
                placed = True
                note = _remove_retired(retired)
        except KeyboardInterrupt as interrupt:
            if placed:
                state = f"{target.path} holds the new output{note}"
                raise Interrupted(signal_number(interrupt), state) from interrupt
            raise
        finally:
            if staging is not None and not placed:
                with deferred_signals():  # a second Ctrl-C must not leave it half-removed
                    shutil.rmtree(staging, ignore_errors=True)


def _sibling_name(output: Path, kind: str) -> Path:
    return output.parent / f".{output.name}.{kind}-{secrets.token_hex(4)}"


def _make_sibling(output: Path, kind: str) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = _sibling_name(output, kind)
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except PermissionError as error:
            raise PermissionError(
                f"cannot write the output {output}: {output.parent} is not writable"
            ) from error
        return path


def _move_into_place(staging: Path, output: Path) -> Path | None:
    """Rename ``staging`` to ``output``; an old ``output`` is renamed aside first (and back on failure).

    Returns:
        Where the old output now is, or ``None`` when there was none.
    """
    if not os.path.lexists(output):
        os.rename(staging, output)
        return None
    retired = _sibling_name(output, "old")
    while os.path.lexists(retired):
        retired = _sibling_name(output, "old")
    os.rename(output, retired)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(retired, output)
        raise
    return retired


def _remove_retired(retired: Path | None) -> str:
    """Remove the replaced output; return what to add to "OUT holds the new output" about it."""
    if retired is None:
        return ""
    try:
        shutil.rmtree(retired)
    except OSError as error:
        # The new output is in place: failing now would report an error for a finished job.
        logger.warning("the replaced output could not be removed (%s): remove %s yourself", error, retired)
        return f"; the output it replaced is still at {retired}"
    return "; the output it replaced was removed"


def copy_source_file(file: Path, destination: Path, source: Path) -> None:
    """Copy one file of the ``source`` directory into the output: its content and its mode.

    A symbolic link is copied by content (a Hub cache snapshot is all links into the cache's ``blobs``).
    A link that leads out of ``source``, other than into a Hub cache's blobs, is copied too and logged as
    a warning naming what was read. Anything that is not, or does not lead to, a regular file (a device,
    a pipe, a directory, a broken link) is refused: reading ``/dev/zero`` would never end.

    Args:
        file: the file in ``source``.
        destination: where its copy goes.
        source: the source directory.

    Raises:
        ValueError: ``file`` is not a regular file, nor a link to one.
    """
    real = file.resolve()
    linked = f" (a symbolic link to {real})" if file.is_symlink() else ""
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError as error:
        raise ValueError(f"{file} in the model source is a broken symbolic link to {real}") from error
    if not stat.S_ISREG(mode):
        raise ValueError(
            f"{file} in the model source is not a regular file{linked}: only regular files are copied"
        )
    if linked and not real.is_relative_to(source.resolve()) and not _is_hub_blob(real):
        logger.warning("copied %s from %s, outside the model source (a symbolic link)", file.name, real)
    shutil.copyfile(real, destination)
    shutil.copymode(real, destination)


def _is_hub_blob(path: Path) -> bool:
    return path.parent.name == "blobs" and path.parent.parent.name.startswith(("models--", "datasets--"))


def _apply_umask(directory: Path) -> None:
    """Give the safetensors files written into ``directory`` the umask's mode: the safetensors writer
    (``save_file``, ``save_pretrained``) creates them owner-only (0600) whatever the umask. Every other
    file keeps the mode it was created with: the umask's for what abliterate writes, the source's for
    what ``copy_source_file`` copied."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*.safetensors"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)
