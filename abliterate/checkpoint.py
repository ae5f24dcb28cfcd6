"""Write the edited checkpoint atomically: a temporary sibling directory, renamed at the very end."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from abliterate.gguf import drop_gguf_quantization


def check_output_dir(output: str | Path, overwrite: bool) -> Path:
    """Refuse an existing, non-empty output directory unless ``overwrite``; check it can be written.

    Raises:
        FileExistsError: the directory exists and is not empty, or is a file.
        PermissionError: its parent cannot be written.
    """
    path = Path(output).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {path} is not empty (pass --overwrite to replace it)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the output {path}: {parent} is not writable")
    return path


@contextmanager
def atomic_directory(output: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``output``; on success it replaces ``output``, otherwise it vanishes.

    An existing ``output`` is replaced only once the ``with`` body has finished: Ctrl-C or any error
    before that leaves it exactly as it was, and no temporary directory behind.

    Raises:
        PermissionError: the temporary sibling cannot be created (the parent is not writable).
    """
    staging = _make_sibling(output, "tmp")
    try:
        yield staging
        _apply_umask(staging)
        _move_into_place(staging, output)
    finally:
        if staging.exists():
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


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename ``staging`` to ``output``; an old ``output`` is moved aside first and restored on failure."""
    if not output.exists():
        os.replace(staging, output)
        return
    retired = _sibling_name(output, "old")
    while retired.exists():
        retired = _sibling_name(output, "old")
    os.replace(output, retired)
    try:
        os.replace(staging, output)
    except BaseException:
        os.replace(retired, output)
        raise
    shutil.rmtree(retired)


def save_model(model: nn.Module, tokenizer: object, directory: Path, source: Path | None = None) -> None:
    """``save_pretrained`` the model (safetensors) into ``directory``, with the source's files beside it.

    With a ``source`` checkpoint directory, ``config.json`` is the source's with only the keys the edit
    changes (``companion_files.edited_config``) and every tokenizer, chat-template and generation file is
    copied byte for byte (``save_pretrained`` would rewrite them: another serialization, the padding the
    run set, a generation config derived from the config). Without one (a GGUF file), the tokenizer and
    the generation config are saved from memory; a GGUF ``quantization_config`` never reaches ``config.json``.

    Args:
        model: the edited model.
        tokenizer: its tokenizer (saved only without a ``source``).
        directory: the (empty, staging) output directory.
        source: the source checkpoint directory, or ``None`` when the source has none.
    """
    from abliterate.companion_files import copy_companions, edited_config

    drop_gguf_quantization(model)
    model.save_pretrained(directory, safe_serialization=True)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text("utf-8"))
    if source is not None:
        # What save_pretrained wrote beside the weights is replaced by the source's own files.
        (directory / "generation_config.json").unlink(missing_ok=True)
        source_config = json.loads((source / "config.json").read_text("utf-8"))
        config_path.write_text(json.dumps(edited_config(source_config, config), indent=2) + "\n", "utf-8")
        copy_companions(source, directory)
        return
    tokenizer.save_pretrained(directory)
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    if not (directory / "generation_config.json").exists() and getattr(model, "generation_config", None):
        model.generation_config.save_pretrained(directory)


def _apply_umask(directory: Path) -> None:
    """Give the finished output ordinary permissions: ``mkdtemp`` and some writers use owner-only modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
