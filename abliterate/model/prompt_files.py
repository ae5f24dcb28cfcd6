"""Prompts from a user's source: a ``.txt``, ``.json``, ``.jsonl`` or ``.csv`` file, or a hub dataset."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

# The fields (JSON) or columns (CSV, datasets) a prompt is read from, first found first.
_TEXT_FIELDS = ("instruction", "prompt", "text")


def _from_records(records: list, source: str) -> list[str]:
    prompts = []
    for index, record in enumerate(records):
        if isinstance(record, str):
            prompts.append(record)
            continue
        if isinstance(record, dict):
            field = next((name for name in _TEXT_FIELDS if isinstance(record.get(name), str)), None)
            if field is not None:
                prompts.append(record[field])
                continue
        raise ValueError(
            f"{source}: item {index} is neither a string nor an object with an {'/'.join(_TEXT_FIELDS)} field"
        )
    return prompts


def read_prompts(source: str) -> list[str]:
    """Read prompts from a ``.txt``, ``.json``, ``.jsonl`` or ``.csv`` file, or a hub dataset id.

    Args:
        source: a local file path, or a hub dataset id (``owner/name``, optionally ``:split``).

    Returns:
        The non-empty prompts, stripped, in file order.

    Raises:
        FileNotFoundError: the file does not exist (and it is not a hub dataset id).
        ValueError: the file is malformed or holds no prompt.
    """
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if not path.exists():
        if (
            suffix in (".txt", ".json", ".jsonl", ".csv")
            or "/" not in source
            or source.startswith((".", "/", "~"))
        ):
            raise FileNotFoundError(f"prompt file not found: {source}")
        prompts = _from_hub_dataset(source)
    elif suffix == ".txt":
        prompts = _read_text(path, source).splitlines()
    elif suffix == ".json":
        try:
            data = json.loads(_read_text(path, source))
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: not valid JSON ({error.msg}, line {error.lineno})") from error
        if not isinstance(data, list):
            raise ValueError(f"{source}: expected a JSON list of prompts")
        prompts = _from_records(data, source)
    elif suffix == ".jsonl":
        records = []
        for number, line in enumerate(_read_text(path, source).splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{source}: line {number} is not valid JSON ({error.msg})") from error
        prompts = _from_records(records, source)
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_read_text(path, source), newline=""))
        column = next((name for name in _TEXT_FIELDS if name in (reader.fieldnames or [])), None)
        if column is None:
            raise ValueError(f"{source}: needs a column named {', '.join(_TEXT_FIELDS)}")
        prompts = [row[column] or "" for row in reader]
    else:
        raise ValueError(f"{source}: unsupported prompt file type (use .txt, .json, .jsonl, .csv)")
    prompts = [prompt.strip() for prompt in prompts if prompt and prompt.strip()]
    if not prompts:
        raise ValueError(f"{source}: no prompts found")
    return prompts


def _read_text(path: Path, source: str) -> str:
    """The text of a prompt file, which must be UTF-8.

    Raises:
        ValueError: the file is not UTF-8 (named, with the offset of the first bad byte).
    """
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as error:
        bad = error.object[error.start : error.start + 1]
        raise ValueError(
            f"{source}: not UTF-8 text (byte {error.start} is {bad!r}); save the prompt file as UTF-8"
        ) from error


def _from_hub_dataset(source: str) -> list[str]:
    """Prompts from a hub dataset (``owner/name[:split]``); needs the ``datasets`` package."""
    repo_id, _, split = source.partition(":")
    try:
        import datasets
    except ImportError as error:
        raise ValueError(f"{source}: reading hub datasets needs 'pip install datasets'") from error
    dataset = datasets.load_dataset(repo_id, split=split or "train")
    column = next((name for name in _TEXT_FIELDS if name in dataset.column_names), None)
    if column is None:
        raise ValueError(f"{source}: needs a column named {', '.join(_TEXT_FIELDS)}")
    return list(dataset[column])
