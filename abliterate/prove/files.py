"""Everything in a checkpoint besides its weights: ``config.json`` and the files transformers reads with it.

The weight certificate proves the tensors; a checkpoint is more than its tensors. ``config.json`` decides
the architecture the tensors are read into (a changed ``hidden_act`` or ``rms_norm_eps`` is another model
with the same weights); the tokenizer, the chat template and the generation config decide what the model
is asked and how it answers (an added ``chat_template.jinja`` can inject a system instruction into every
chat). So an edited checkpoint must carry the original's ``config.json`` except the keys the edit itself
changes (``ALLOWED_CONFIG_CHANGES``), and every companion file (``COMPANION_PATTERNS``) byte for byte:
none changed, none missing, none added. ``run`` and ``apply`` copy them from the source (``copy_companions``),
``verify`` and both commands' own gates compare them (``compare_companions``).

A GGUF source has no such files: its tokenizer is compared as the tokenizer reads it from both
(vocabulary, merges, special tokens, chat template; ``compare_gguf_tokenizer``).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abliterate.io.locations import COMPANION_PATTERNS
from abliterate.prove.verdict import MAX_LISTED_FAILURES, Verdict

# The config.json keys an edit may change, and the only change allowed to each. Nothing else may differ:
# no other value, no added and no removed key, at any depth.
ALLOWED_CONFIG_CHANGES: dict[str, str] = {
    # Untying a tied embedding: the embedding is edited, the output head keeps the original matrix.
    "tie_word_embeddings": "set to false (also inside text_config)",
    # The dtype the checkpoint was saved in (run --dtype, a GGUF source); the tensors' own dtypes are
    # what the weight certificate checks.
    "dtype": "the saved dtype (at any depth)",
    "torch_dtype": "the saved dtype, under its older name (at any depth)",
}
# Never companions: config.json (compared key by key), weight indexes (the certificate reads the tensors
# themselves), and the files abliterate writes about the edit.
_NOT_COMPANIONS = frozenset({"config.json", "abliterate.json", "candidate_scores.json", "pareto_front.json"})


@dataclass(frozen=True)
class CompanionReport(Verdict):
    """The verdict of ``compare_companions``: everything in the checkpoint besides its weights.

    Attributes:
        passed: ``config.json`` differs only in allowed keys and every companion file is identical.
        config_changes: the allowed keys that did change (``"tie_word_embeddings"``, ``"dtype"``, …).
        files: companion files compared (relative paths); for a GGUF original, what was compared.
        mode: ``"bytes"`` (files compared byte for byte) or ``"gguf"`` (a GGUF original: the tokenizer as
            read from both).
        failures: the first differences, one line each.
        n_failures: how many differences.
    """

    passed: bool
    config_changes: list[str]
    files: list[str]
    mode: str = "bytes"
    failures: list[str] = field(default_factory=list)
    n_failures: int = 0

    failing = "difference(s) beside the weights"


def is_companion(relative: Path) -> bool:
    """Whether a file (path relative to the checkpoint) is one transformers reads beside the weights."""
    name = relative.name
    if any(part.startswith(".") for part in relative.parts) or name in _NOT_COMPANIONS:
        return False
    if name.endswith(".index.json"):
        return False
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in COMPANION_PATTERNS)


def companion_files(directory: Path) -> list[str]:
    """The companion files of a checkpoint directory, as sorted relative POSIX paths."""
    found = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if is_companion(relative):
            found.append(relative.as_posix())
    return sorted(found)


def copy_companions(
    source: Path, directory: Path, copy: Callable[[Path, Path, Path], None] | None = None
) -> list[str]:
    """Copy every companion file of ``source`` into ``directory``, byte for byte.

    Args:
        source: the source checkpoint directory.
        directory: the output directory.
        copy: ``copy(file, destination, source)``, the output's copier (``checkpoint.copy_source_file``
            keeps modes and refuses what is not a regular file); default a plain content copy.

    Returns:
        The files copied (relative paths).
    """
    names = companion_files(source)
    for name in names:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        if copy is None:
            shutil.copyfile(source / name, directory / name)
        else:
            copy(source / name, directory / name, source)
    return names


def edited_config(source: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """The source's config with only the allowed keys taken from the config the edited model saved.

    ``tie_word_embeddings`` becomes false where the saved model untied it (top level and
    ``text_config``); the dtype keys the source has, or ``dtype`` when it has none, take the saved dtype.
    """
    config = json.loads(json.dumps(source))
    for part, saved_part in ((config, saved), (config.get("text_config"), saved.get("text_config"))):
        if not isinstance(part, dict):
            continue
        saved_part = saved_part if isinstance(saved_part, dict) else saved
        if saved_part.get("tie_word_embeddings") is False:
            part["tie_word_embeddings"] = False
    saved_dtype = saved.get("dtype") or saved.get("torch_dtype")
    if isinstance(saved_dtype, str):
        keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["dtype"]
        for key in keys:
            config[key] = saved_dtype
    return config


def config_differences(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Compare two ``config.json`` contents key by key, at every depth.

    Returns:
        ``(failures, allowed)``: one line per forbidden difference, naming the key; and the allowed keys
        (``ALLOWED_CONFIG_CHANGES``) that did change.
    """
    failures: list[str] = []
    allowed: set[str] = set()
    _compare(before, after, "", failures, allowed)
    return failures, sorted(allowed)


def _compare(before: dict, after: dict, prefix: str, failures: list[str], allowed: set[str]) -> None:
    for key in sorted(set(before) | set(after), key=str):
        path = f"{prefix}{key}"
        was, now = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if was == now and type(was) is type(now):
            continue
        if _allowed(path, now):
            allowed.add(key)
        elif isinstance(was, dict) and isinstance(now, dict):
            _compare(was, now, f"{path}.", failures, allowed)
        elif now is _ABSENT:
            failures.append(f"config.json: {path} is removed (the original has {_show(was)})")
        elif was is _ABSENT:
            failures.append(f"config.json: {path} is added ({_show(now)}; the original has no such key)")
        else:
            failures.append(f"config.json: {path} is {_show(now)}, the original has {_show(was)}")


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _allowed(path: str, now: object) -> bool:
    key = path.rsplit(".", 1)[-1]
    if key in ("dtype", "torch_dtype"):
        return isinstance(now, str)
    if path in ("tie_word_embeddings", "text_config.tie_word_embeddings"):
        return now is False
    return False


def _show(value: object) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def compare_companions(original: Path, edited: Path) -> CompanionReport:
    """Compare ``config.json`` key by key and every companion file byte for byte.

    Args:
        original: the unedited checkpoint directory.
        edited: the edited checkpoint directory.

    Returns:
        The report (``passed`` tells the verdict; nothing is raised for a differing checkpoint).
    """
    from abliterate.io.safetensors import read_json

    before = read_json(original / "config.json", "config.json")
    after = read_json(edited / "config.json", "config.json")
    failures, changed = config_differences(before, after)
    source_files, edited_files = companion_files(original), companion_files(edited)
    for name in sorted(set(source_files) - set(edited_files)):
        failures.append(f"{name}: in the original but missing from the edited checkpoint")
    for name in sorted(set(edited_files) - set(source_files)):
        failures.append(f"{name}: in the edited checkpoint but not in the original")
    for name in sorted(set(source_files) & set(edited_files)):
        if not _same_bytes(original / name, edited / name):
            failures.append(f"{name}: differs from the original's (compared byte for byte)")
    return _report(failures, changed, source_files, "bytes")


def _same_bytes(first: Path, second: Path) -> bool:
    if first.stat().st_size != second.stat().st_size:
        return False
    with open(first, "rb") as left, open(second, "rb") as right:
        while True:
            block = left.read(1 << 20)
            if block != right.read(1 << 20):
                return False
            if not block:
                return True


def _report(failures: list[str], changed: list[str], files: list[str], mode: str) -> CompanionReport:
    return CompanionReport(
        passed=not failures,
        config_changes=changed,
        files=files,
        mode=mode,
        failures=failures[:MAX_LISTED_FAILURES],
        n_failures=len(failures),
    )


# What a GGUF original's tokenizer is compared in, as the tokenizer reads it from both sides.
GGUF_TOKENIZER_PARTS = ("vocabulary", "merges", "special tokens", "chat template")


def compare_gguf_tokenizer(gguf: Path, edited: Path) -> CompanionReport:
    """Compare the tokenizer of a GGUF original with the edited checkpoint's, as transformers reads both.

    A GGUF file holds its tokenizer as metadata, not as files, so nothing can be compared byte for byte:
    the vocabulary, the BPE merges, the special tokens and the chat template must be equal instead.

    Args:
        gguf: the original ``.gguf`` file.
        edited: the edited checkpoint directory.

    Returns:
        The report, ``mode`` ``"gguf"``.
    """
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target = AutoTokenizer.from_pretrained(str(edited))
    failures = []
    for part in GGUF_TOKENIZER_PARTS:
        was, now = _tokenizer_part(source, part), _tokenizer_part(target, part)
        if was != now:
            difference = _first_difference(was, now)
            failures.append(f"tokenizer: the {part} differ(s) from the GGUF's ({difference})")
    return _report(failures, [], list(GGUF_TOKENIZER_PARTS), "gguf")


def _tokenizer_part(tokenizer: Any, part: str) -> object:
    if part == "vocabulary":
        return dict(tokenizer.get_vocab())
    if part == "merges":
        backend = getattr(tokenizer, "backend_tokenizer", None)
        model = json.loads(backend.to_str())["model"] if backend is not None else {}
        # Newer tokenizers write a merge as a pair, older ones as "a b": the same merge either way.
        return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    if part == "special tokens":
        decoder = tokenizer.added_tokens_decoder
        added = {index: (token.content, token.special) for index, token in decoder.items()}
        return {"added": added, "named": dict(tokenizer.special_tokens_map)}
    return tokenizer.chat_template


def _first_difference(was: object, now: object) -> str:
    if isinstance(was, dict) and isinstance(now, dict):
        for key in sorted(set(was) | set(now), key=str):
            if was.get(key, _ABSENT) != now.get(key, _ABSENT):
                return f"{key!r}: {_show(now.get(key, _ABSENT))} instead of {_show(was.get(key, _ABSENT))}"
    if isinstance(was, list) and isinstance(now, list):
        if len(was) != len(now):
            return f"{len(now)} entries instead of {len(was)}"
        index = next(i for i, (a, b) in enumerate(zip(was, now, strict=True)) if a != b)
        return f"entry {index}: {_show(now[index])} instead of {_show(was[index])}"
    return f"{_show(now)} instead of {_show(was)}"
