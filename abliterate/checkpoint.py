"""Write the edited checkpoint atomically: a temporary sibling directory, renamed at the very end."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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

    Ctrl-C or any error while writing leaves ``output`` exactly as it was.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        yield staging
        _apply_umask(staging)
        if output.exists():
            # Move the old directory aside first so a failure between the two renames loses nothing.
            retired = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
            os.replace(output, retired / output.name)
            os.replace(staging, output)
            shutil.rmtree(retired)
        else:
            os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def save_model(model: nn.Module, tokenizer: object, directory: Path) -> None:
    """``save_pretrained`` the model (safetensors) and tokenizer into ``directory``.

    The generation config is kept; a GGUF ``quantization_config`` never reaches ``config.json``.
    """
    drop_gguf_quantization(model)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text("utf-8"))
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
