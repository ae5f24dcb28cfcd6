"""Prompt sets: the bundled defaults or a user's source (``abliterate.model.prompt_files``), sampled
deterministically into disjoint splits."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from importlib import resources

from abliterate.model.prompt_files import read_prompts

logger = logging.getLogger(__name__)

_SPLITS = ("train", "val", "eval")
# The harmful and harmless classes may share at most this fraction of the smaller one's prompts: the
# refusal direction is the difference of their means, and shared prompts pull the two means together.
_MAX_SHARED_FRACTION = 0.5


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

    def sizes(self) -> dict[str, int]:
        """The prompts each split holds, e.g. ``{"train": 128, "val": 32, "eval": 50, "parity": 4}``."""
        return {split: len(getattr(self, split)) for split in (*_SPLITS, "parity")}


# Bundled sets beyond the harmful/harmless splits: safe prompts that look dangerous ("how do I kill a
# Python process"), on which a good edit must not start refusing (over-refusal).
_EXTRA_SETS = {("lookalike", "eval")}


def bundled(kind: str, split: str) -> list[str]:
    """A bundled prompt list written for this project.

    Args:
        kind: ``"harmful"`` or ``"harmless"`` (splits ``"train"``, ``"val"``, ``"eval"``), or
            ``"lookalike"`` (split ``"eval"``: safe prompts that look dangerous).
        split: the split.

    Raises:
        ValueError: no such bundled set.
    """
    if (kind not in ("harmful", "harmless") or split not in _SPLITS) and (kind, split) not in _EXTRA_SETS:
        raise ValueError(f"no bundled prompt set {kind}_{split}")
    text = resources.files("abliterate").joinpath("data", f"{kind}_{split}.json").read_text("utf-8")
    return json.loads(text)


def has_bundled(kind: str, split: str) -> bool:
    """Whether this installation bundles the prompt set ``kind_split``."""
    return resources.files("abliterate").joinpath("data", f"{kind}_{split}.json").is_file()


def load_prompt_classes(
    harmful: str | None,
    harmless: str | None,
    *,
    n_train: int,
    n_val: int,
    n_eval: int,
    n_parity: int,
    seed: int,
) -> tuple[PromptSplits, PromptSplits]:
    """The harmful and harmless splits (see ``load_splits``), once the two classes are known to differ.

    Each source is read once. Prompts found in both classes are reported in one warning line; more than
    half of the smaller class's prompts shared (identical sets included) is refused.

    Args:
        harmful: harmful prompt source, or ``None`` for the bundled set.
        harmless: harmless prompt source, or ``None`` for the bundled set.
        n_train: prompts per class to extract candidates from.
        n_val: prompts per class to score candidates with.
        n_eval: prompts per class for the before/after evaluation.
        n_parity: prompts per class for the parity check.
        seed: sampling seed.

    Returns:
        ``(harmful splits, harmless splits)``.

    Raises:
        ValueError: a source is malformed or too small, or the classes share too many prompts.
    """
    sources = {"harmful": harmful, "harmless": harmless}
    read = {
        kind: None if source is None else _distinct(read_prompts(source)) for kind, source in sources.items()
    }
    if harmful is not None or harmless is not None:  # the bundled sets are known to be disjoint
        pools = {
            kind: read[kind] or [p for split in _SPLITS for p in bundled(kind, split)] for kind in sources
        }
        check_classes_differ(pools["harmful"], pools["harmless"])
    sizes = dict(n_train=n_train, n_val=n_val, n_eval=n_eval, n_parity=n_parity, seed=seed)
    first, second = (load_splits(kind, sources[kind], **sizes, prompts=read[kind]) for kind in sources)
    return first, second


def check_classes_differ(harmful: list[str], harmless: list[str]) -> None:
    """Refuse harmful and harmless prompts that are mostly the same; warn about any prompt in both.

    The refusal direction is the difference of the two classes' mean activations: a prompt in both pulls
    the means together, and identical sets give a direction of pure noise that nothing downstream would
    notice.

    Args:
        harmful: the harmful prompts (all of the source, not only the sampled ones).
        harmless: the harmless prompts.

    Raises:
        ValueError: the sets are identical, or share more than half of the smaller set's prompts.
    """
    harmless_set = set(harmless)
    shared = [prompt for prompt in dict.fromkeys(harmful) if prompt in harmless_set]
    if not shared:
        return
    smaller = min(len(set(harmful)), len(harmless_set))
    example = shared[0] if len(shared[0]) <= 60 else shared[0][:57] + "..."
    if set(harmful) == harmless_set:
        raise ValueError(
            f"the harmful and harmless prompts are the same {smaller} prompts: the refusal direction is "
            "the difference between the two classes, so give two different sets (--harmful, --harmless)"
        )
    if len(shared) > _MAX_SHARED_FRACTION * smaller:
        raise ValueError(
            f"the harmful and harmless prompts share {len(shared)} of {smaller} prompts (e.g. {example!r}): "
            "the refusal direction is the difference between the two classes, so give two different sets"
        )
    logger.warning(
        "the harmful and harmless prompts share %d prompt(s) (e.g. %r): each counts in both classes",
        len(shared),
        example,
    )


def load_splits(
    kind: str,
    source: str | None,
    *,
    n_train: int,
    n_val: int,
    n_eval: int,
    n_parity: int,
    seed: int,
    prompts: list[str] | None = None,
) -> PromptSplits:
    """Disjoint train/val/eval/parity prompts of one class, sampled deterministically from ``seed``.

    With no ``source`` the bundled splits are used as written (parity prompts come from the end of the
    bundled train split, which is never sampled for training when it is large enough). A user source
    is shuffled once with ``seed`` and cut into consecutive, disjoint pieces.

    When fewer prompts exist than asked for, the splits are smaller (a user source's shrink in proportion,
    each keeping at least one prompt) and one warning line says so; ``PromptSplits.sizes`` tells what was
    used. A user source needs at least 4 distinct prompts, one per split.

    Args:
        kind: ``"harmful"`` or ``"harmless"``.
        source: user prompt source, or ``None`` for the bundled sets.
        n_train: prompts to extract candidates from.
        n_val: prompts to score candidates with.
        n_eval: prompts for the before/after evaluation.
        n_parity: prompts for the parity check.
        seed: sampling seed.
        prompts: ``source``'s distinct prompts when already read (``None``: read them from ``source``).

    Raises:
        ValueError: a count is below 1, or the source has too few prompts.
    """
    asked = {"train": n_train, "val": n_val, "eval": n_eval, "parity": n_parity}
    for split, count in asked.items():
        if count < 1:
            raise ValueError(f"{kind} prompts: the {split} split needs at least 1 prompt, not {count}")
    rng = random.Random(f"{seed}-{kind}")
    if source is None:
        splits = _bundled_splits(kind, rng, n_train, n_val, n_eval, n_parity)
        _warn_if_fewer(kind, "the bundled set", splits, asked)
        return splits
    # A prompt listed twice must not land in two splits: keep its first occurrence only.
    prompts = list(prompts) if prompts is not None else _distinct(read_prompts(source))
    rng.shuffle(prompts)
    if len(prompts) < 4:
        raise ValueError(f"{source}: needs at least 4 distinct prompts, found {len(prompts)}")
    splits = _cut(prompts, n_train, n_val, n_eval, n_parity)
    _warn_if_fewer(kind, source, splits, asked)
    return splits


def _bundled_splits(
    kind: str, rng: random.Random, n_train: int, n_val: int, n_eval: int, n_parity: int
) -> PromptSplits:
    """The bundled splits as written, the train split shuffled with ``rng``; parity prompts are held
    aside from what training and validation do not use."""
    train, val, evaluation = (bundled(kind, split) for split in _SPLITS)
    rng.shuffle(train)
    return PromptSplits(
        train[:n_train],
        val[:n_val],
        evaluation[:n_eval],
        _held_aside(train[n_train:] + val[n_val:], train[:n_train] + val[:n_val], n_parity, kind),
    )


def _cut(prompts: list[str], n_train: int, n_val: int, n_eval: int, n_parity: int) -> PromptSplits:
    """``prompts`` (shuffled, distinct, at least 4) cut into consecutive, disjoint splits of the sizes
    asked, or, when there are fewer, of sizes shrunk in proportion so all four stay non-empty."""
    wanted = n_train + n_val + n_eval + n_parity
    if len(prompts) < wanted:
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


def _distinct(prompts: list[str]) -> list[str]:
    """``prompts`` without repeats, each kept at its first occurrence."""
    return list(dict.fromkeys(prompts))


def _warn_if_fewer(kind: str, source: str, splits: PromptSplits, asked: dict[str, int]) -> None:
    """One warning line when a split holds fewer prompts than asked for."""
    used = splits.sizes()
    if all(used[split] >= count for split, count in asked.items()):
        return
    logger.warning(
        "fewer %s prompts than asked in %s: %s",
        kind,
        source,
        ", ".join(f"{split} {used[split]} of {count}" for split, count in asked.items()),
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
