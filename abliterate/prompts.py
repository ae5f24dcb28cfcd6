"""Prompt sets: the bundled defaults, local files, or hub datasets; sampled deterministically."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

_TEXT_FIELDS = ("instruction", "prompt", "text")
_SPLITS = ("train", "val", "eval")


@dataclass(frozen=True)
class PromptSplits:
    """Disjoint prompt lists of one class (harmful or harmless).

    Attributes:
        train: prompts whose activations define the candidates.
        val: prompts that score candidates during selection.
        eval: prompts for the before/after evaluation.
        parity: prompts held aside for the parity check.
    """

    train: list[str]
    val: list[str]
    eval: list[str]
    parity: list[str]


def bundled(kind: str, split: str) -> list[str]:
    """A bundled prompt list written for this project.

    Args:
        kind: ``"harmful"`` or ``"harmless"``.
        split: ``"train"``, ``"val"`` or ``"eval"``.
    """
    if kind not in ("harmful", "harmless") or split not in _SPLITS:
        raise ValueError(f"no bundled prompt set {kind}_{split}")
    text = resources.files("abliterate").joinpath("data", f"{kind}_{split}.json").read_text("utf-8")
    return json.loads(text)


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
        prompts = path.read_text("utf-8").splitlines()
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text("utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: not valid JSON ({error.msg}, line {error.lineno})") from error
        if not isinstance(data, list):
            raise ValueError(f"{source}: expected a JSON list of prompts")
        prompts = _from_records(data, source)
    elif suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{source}: line {number} is not valid JSON ({error.msg})") from error
        prompts = _from_records(records, source)
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
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


def load_splits(
    kind: str,
    source: str | None,
    *,
    n_train: int,
    n_val: int,
    n_eval: int,
    n_parity: int,
    seed: int,
) -> PromptSplits:
    """Disjoint train/val/eval/parity prompts of one class, sampled deterministically from ``seed``.

    With no ``source`` the bundled splits are used as written (parity prompts come from the end of the
    bundled train split, which is never sampled for training when it is large enough). A user source
    is shuffled once with ``seed`` and cut into consecutive, disjoint pieces.

    Args:
        kind: ``"harmful"`` or ``"harmless"``.
        source: user prompt source, or ``None`` for the bundled sets.
        n_train: prompts to extract candidates from.
        n_val: prompts to score candidates with.
        n_eval: prompts for the before/after evaluation.
        n_parity: prompts for the parity check.
        seed: sampling seed.

    Raises:
        ValueError: the source has too few prompts.
    """
    rng = random.Random(f"{seed}-{kind}")
    if source is None:
        train, val, evaluation = (bundled(kind, split) for split in _SPLITS)
        rng.shuffle(train)
        return PromptSplits(
            train[:n_train],
            val[:n_val],
            evaluation[:n_eval],
            _held_aside(train[n_train:] + val[n_val:], train[:n_train] + val[:n_val], n_parity, kind),
        )
    # A prompt listed twice must not land in two splits: keep its first occurrence only.
    prompts = list(dict.fromkeys(read_prompts(source)))
    rng.shuffle(prompts)
    if len(prompts) < 4:
        raise ValueError(f"{source}: needs at least 4 distinct prompts, found {len(prompts)}")
    wanted = n_train + n_val + n_eval + n_parity
    if len(prompts) < wanted:
        # Shrink every split in proportion so all four stay disjoint and non-empty.
        scale = len(prompts) / wanted
        others = [max(1, int(n * scale)) for n in (n_val, n_eval, n_parity)]
        while sum(others) > len(prompts) - 1:
            others[others.index(max(others))] -= 1
        n_val, n_eval, n_parity = others
        n_train = len(prompts) - n_val - n_eval - n_parity
    cuts = [n_train, n_train + n_val, n_train + n_val + n_eval]
    return PromptSplits(
        prompts[: cuts[0]],
        prompts[cuts[0] : cuts[1]],
        prompts[cuts[1] : cuts[2]],
        prompts[cuts[2] : cuts[2] + n_parity],
    )


def _held_aside(unused: list[str], selection: list[str], n_parity: int, kind: str) -> list[str]:
    """``n_parity`` prompts from ``unused`` that are not among the prompts selection sees.

    Raises:
        ValueError: ``--n-train``/``--n-val`` leave no bundled prompt for the parity check.
    """
    seen = set(selection)
    parity = [prompt for prompt in dict.fromkeys(unused) if prompt not in seen][:n_parity]
    if not parity:
        raise ValueError(
            f"--n-train/--n-val use every bundled {kind} prompt: none is left for the parity check; "
            "lower them or give --harmful/--harmless"
        )
    return parity
