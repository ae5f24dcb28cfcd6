"""Agreement of a reply judge with the hand labels of ``benchmarks/judge_labels/``.

    python benchmarks/judge_agreement.py [--judge MODULE:FUNCTION] [--labels DIR] [--half even|odd]
        [--model NAME]

The judge is any function ``judge(reply: str, prompt: str = "") -> str`` returning one of ``refused``,
``dodged``, ``complied``, ``degenerate``. Prints the 4×4 confusion matrix (hand label × judge),
Cohen's κ on helped (complied) vs not helped (refused + dodged) with degenerate as a third class, the
same κ on the replies neither side calls degenerate, the degenerate agreement on its own, κ on all four
classes, and per-model rates of both with 95 % Wilson intervals. The judge defaults to
``abliterate.find.judge:judge``. ``--half`` keeps the replies whose id number is even (or odd): rules
developed on one half of a label set are checked on the other. ``--model`` keeps the replies of one
model (as ``replies.jsonl`` names it: ``original``, ``paper``, …).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

LABELS = ("refused", "dodged", "complied", "degenerate")
HERE = Path(__file__).resolve().parent / "judge_labels"
Judge = Callable[..., str]


def helped(label: str) -> str:
    """``helped`` for complied, ``not helped`` for refused and dodged, ``degenerate`` kept apart."""
    if label == "complied":
        return "helped"
    return "degenerate" if label == "degenerate" else "not helped"


def confusion(truth: Sequence[str], judged: Sequence[str], classes: Sequence[str]) -> list[list[int]]:
    """``matrix[i][j]``: how many replies hand-labelled ``classes[i]`` the judge calls ``classes[j]``.

    Raises:
        ValueError: a label is not one of ``classes``, or the two lists differ in length.
    """
    if len(truth) != len(judged):
        raise ValueError(f"{len(truth)} labels but {len(judged)} verdicts")
    index = {name: i for i, name in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for label, verdict in zip(truth, judged, strict=True):
        if label not in index or verdict not in index:
            raise ValueError(f"unknown label {label!r} or verdict {verdict!r} (expected one of {classes})")
        matrix[index[label]][index[verdict]] += 1
    return matrix


def cohen_kappa(matrix: list[list[int]]) -> float:
    """Cohen's κ of a square confusion matrix (nan when chance agreement is 1 or there are no items)."""
    total = sum(map(sum, matrix))
    if total == 0:
        return math.nan
    observed = sum(matrix[i][i] for i in range(len(matrix))) / total
    rows = [sum(row) / total for row in matrix]
    columns = [sum(row[j] for row in matrix) / total for j in range(len(matrix))]
    expected = sum(r * c for r, c in zip(rows, columns, strict=True))
    return math.nan if expected == 1 else (observed - expected) / (1 - expected)


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of ``successes / n`` (``(nan, nan)`` for ``n = 0``)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def load_judge(path: str) -> Judge:
    """The function named by ``module:function``."""
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"--judge must be module:function, got {path!r}")
    return getattr(importlib.import_module(module), name)


def read_rows(directory: Path) -> list[dict[str, str]]:
    """Replies joined with their hand labels, in the order of ``replies.jsonl`` (labelled ones only)."""
    lines = (directory / "replies.jsonl").read_text("utf-8").splitlines()
    replies = [json.loads(line) for line in lines if line.strip()]
    labels = {}
    for line in (directory / "labels.jsonl").read_text("utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        labels[row["id"]] = row["label"]
    return [row | {"label": labels[row["id"]]} for row in replies if row["id"] in labels]


def agreement(rows: list[dict[str, str]], judge: Judge) -> dict[str, object]:
    """The confusion matrices and κ values of ``judge`` against the rows' hand labels."""
    truth = [row["label"] for row in rows]
    judged = [judge(row["reply"], row["prompt"]) for row in rows]
    three = ("helped", "not helped", "degenerate")
    kept = [(t, j) for t, j in zip(truth, judged, strict=True) if "degenerate" not in (t, j)]
    binary = confusion([helped(t) for t, _ in kept], [helped(j) for _, j in kept], three[:2])
    degenerate = confusion(
        ["degenerate" if t == "degenerate" else "other" for t in truth],
        ["degenerate" if j == "degenerate" else "other" for j in judged],
        ("degenerate", "other"),
    )
    four = confusion(truth, judged, LABELS)
    helped3 = confusion([helped(t) for t in truth], [helped(j) for j in judged], three)
    return {
        "judged": judged,
        "four": four,
        "kappa_four": cohen_kappa(four),
        "helped3": helped3,
        "kappa_helped3": cohen_kappa(helped3),
        "binary": binary,
        "kappa_binary": cohen_kappa(binary),
        "degenerate": degenerate,
        "kappa_degenerate": cohen_kappa(degenerate),
    }


def print_matrix(matrix: list[list[int]], classes: Sequence[str]) -> None:
    """Rows: hand labels; columns: the judge."""
    print("hand \\ judge".ljust(14) + "".join(name.rjust(12) for name in classes) + "total".rjust(8))
    for name, row in zip(classes, matrix, strict=True):
        print(name.ljust(14) + "".join(str(n).rjust(12) for n in row) + str(sum(row)).rjust(8))


def print_rates(rows: list[dict[str, str]], judged: list[str]) -> None:
    """Per model and label: the hand rate and the judge's rate with their Wilson intervals."""
    for model in sorted({row["model"] for row in rows}):
        picked = [i for i, row in enumerate(rows) if row["model"] == model]
        print(f"{model} (n={len(picked)})")
        for label in LABELS:
            for who, values in (
                ("hand", [rows[i]["label"] for i in picked]),
                ("judge", [judged[i] for i in picked]),
            ):
                k = values.count(label)
                low, high = wilson(k, len(picked))
                print(f"  {label:<11}{who:<6}{k:>4}  {k / len(picked):6.1%} ({low:.1%}–{high:.1%})")


def main() -> None:
    """Read the labels, run the judge, print the agreement."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--judge", default="abliterate.find.judge:judge")
    parser.add_argument("--labels", type=Path, default=HERE)
    parser.add_argument("--half", choices=("even", "odd"), help="only the replies with an even (odd) id")
    parser.add_argument("--model", help="only the replies of this model (as replies.jsonl names it)")
    args = parser.parse_args()
    rows = read_rows(args.labels)
    if args.model is not None:
        rows = [row for row in rows if row["model"] == args.model]
    if args.half is not None:
        parity = 0 if args.half == "even" else 1
        rows = [row for row in rows if int("".join(filter(str.isdigit, row["id"]))) % 2 == parity]
    result = agreement(rows, load_judge(args.judge))
    print(f"{len(rows)} hand-labelled replies, judge {args.judge}\n")
    print_matrix(result["four"], LABELS)
    print(f"\nκ, four classes: {result['kappa_four']:.3f}")
    print(f"κ, helped / not helped / degenerate: {result['kappa_helped3']:.3f}")
    n_binary = sum(map(sum, result["binary"]))
    print(f"κ, helped / not helped (n={n_binary}, neither side degenerate): {result['kappa_binary']:.3f}")
    print(f"κ, degenerate / other: {result['kappa_degenerate']:.3f}  {result['degenerate']}\n")
    print_rates(rows, result["judged"])


if __name__ == "__main__":
    main()
