"""Agreement of a reply judge with the hand labels of ``benchmarks/judge_labels/``.

    python benchmarks/judge_agreement.py [--judge MODULE:FUNCTION] [--labels DIR] [--half even|odd]
        [--model NAME] [--judge-model ID_OR_PATH [--margins FILE] [--threshold T]]

The judge is any function ``judge(reply: str, prompt: str = "") -> str`` returning one of ``refused``,
``dodged``, ``complied``, ``degenerate``. Prints the 4×4 confusion matrix (hand label × judge),
Cohen's κ on helped (complied) vs not helped (refused + dodged) with degenerate as a third class, the
same κ on the replies neither side calls degenerate, the degenerate agreement on its own, κ on all four
classes, and per-model rates of both with 95 % Wilson intervals. The judge defaults to
``abliterate.find.judge:judge``. ``--half`` keeps the replies whose id number is even (or odd): rules
developed on one half of a label set are checked on the other. ``--model`` keeps the replies of one
model (as ``replies.jsonl`` names it: ``original``, ``paper``, …).

``--judge-model`` judges with ``abliterate.find.judge_model.ModelJudge`` on that model (``demo`` or a
path; float32 on the CPU unless ``--device``/``--dtype`` say otherwise): the rules' refused and degenerate
verdicts stand, the judge model decides complied or dodged from its letter logits. The script prints the
seconds per reply the judge model read. ``--margins FILE`` keeps the judge model's margins (per rubric,
judge model and reply id), so other thresholds (``--threshold``) or subsets cost no forward pass.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from abliterate.find.stats import wilson_interval

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


def kappa_interval(matrix: list[list[int]], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap 95 % interval of Cohen's κ, resampling the matrix's items (seeded)."""
    import random

    cells = [(i, j) for i, row in enumerate(matrix) for j, count in enumerate(row) for _ in range(count)]
    if not cells:
        return math.nan, math.nan
    draw = random.Random(seed)
    kappas = []
    for _ in range(resamples):
        resampled = [[0] * len(matrix) for _ in matrix]
        for i, j in draw.choices(cells, k=len(cells)):
            resampled[i][j] += 1
        kappa = cohen_kappa(resampled)
        kappas.append(
            0.0 if math.isnan(kappa) else kappa
        )  # a one-class resample agrees no better than chance
    kappas.sort()
    return kappas[int(0.025 * resamples)], kappas[int(0.975 * resamples) - 1]


def load_judge(path: str) -> Judge:
    """The function named by ``module:function``."""
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"--judge must be module:function, got {path!r}")
    return getattr(importlib.import_module(module), name)


def model_verdicts(rows: list[dict[str, str]], args: argparse.Namespace) -> list[str]:
    """The model judge's verdicts on ``rows`` (margins read from ``args.margins`` where kept there)."""
    from abliterate.find.judge import judge
    from abliterate.find.judge_model import ASKED, RUBRIC, ModelJudge, decide

    rules = [judge(row["reply"], row["prompt"]) for row in rows]
    asked = [i for i, verdict in enumerate(rules) if verdict in ASKED]
    key = hashlib.sha256(f"{RUBRIC}\n{args.judge_model}".encode()).hexdigest()[:16]
    store = json.loads(args.margins.read_text("utf-8")) if args.margins and args.margins.exists() else {}
    kept = store.setdefault(key, {"judge_model": args.judge_model, "margins": {}})["margins"]
    missing = [i for i in asked if rows[i]["id"] not in kept]
    if missing:
        from abliterate.model.loading import load_model

        loaded = load_model(args.judge_model, dtype=args.dtype, device=args.device)
        model_judge = ModelJudge(loaded.model, loaded.tokenizer, args.judge_model, batch_size=args.batch_size)
        start = time.perf_counter()
        margins = model_judge.margins(
            [rows[i]["prompt"] for i in missing], [rows[i]["reply"] for i in missing]
        )
        elapsed = time.perf_counter() - start
        kept.update({rows[i]["id"]: margin for i, margin in zip(missing, margins.tolist(), strict=True)})
        print(
            f"judge model {args.judge_model}: {len(missing)} replies read in {elapsed:.1f} s, "
            f"{elapsed / len(missing):.2f} s per reply ({args.dtype}, {args.device}, batches of "
            f"{args.batch_size})"
        )
        if args.margins:
            args.margins.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n", "utf-8")
    print(f"judge model asked about {len(asked)} of {len(rows)} replies (the rules' complied and dodged)")
    by_label = {
        label: [kept[rows[i]["id"]] for i in asked if rows[i]["label"] == label]
        for label in ("complied", "dodged")
    }
    complied, dodged = by_label["complied"], by_label["dodged"]
    print(
        f"its margins rank hand-complied over hand-dodged replies: AUC {margin_auc(complied, dodged):.3f} "
        f"(complied n={len(complied)}, dodged n={len(dodged)}; 0.5 = no signal, at any threshold)"
    )
    return decide(rules, {i: kept[rows[i]["id"]] for i in asked}, args.threshold)


def margin_auc(higher: Sequence[float], lower: Sequence[float]) -> float:
    """The probability that a value of ``higher`` exceeds one of ``lower`` (ties count half; nan if empty)."""
    if not higher or not lower:
        return math.nan
    wins = sum((a > b) + 0.5 * (a == b) for a in higher for b in lower)
    return wins / (len(higher) * len(lower))


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
                low, high = wilson_interval(k, len(picked))
                print(f"  {label:<11}{who:<6}{k:>4}  {k / len(picked):6.1%} ({low:.1%}–{high:.1%})")


def print_kappas_per_model(rows: list[dict[str, str]], judged: list[str]) -> None:
    """κ helped / not helped (neither side degenerate) for each model's replies."""
    for model in sorted({row["model"] for row in rows}):
        picked = [
            (row["label"], verdict)
            for row, verdict in zip(rows, judged, strict=True)
            if row["model"] == model and "degenerate" not in (row["label"], verdict)
        ]
        matrix = confusion([helped(t) for t, _ in picked], [helped(j) for _, j in picked], LABELS_BINARY)
        print(f"{model}: κ helped / not helped {cohen_kappa(matrix):.3f} (n={len(picked)})  {matrix}")


LABELS_BINARY = ("helped", "not helped")


def main() -> None:
    """Read the labels, run the judge, print the agreement."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--judge", default="abliterate.find.judge:judge")
    parser.add_argument("--judge-model", help="judge with this model (ModelJudge): demo or a path")
    parser.add_argument("--margins", type=Path, help="JSON file keeping the judge model's margins")
    parser.add_argument("--threshold", type=float, default=0.0, help="margin above which A (complied)")
    parser.add_argument("--dtype", default="float32", help="the judge model's dtype")
    parser.add_argument("--device", default="cpu", help="the judge model's device")
    parser.add_argument("--batch-size", type=int, default=8, help="replies per forward pass")
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
    if args.judge_model is not None:
        by_row = dict(zip((row["id"] for row in rows), model_verdicts(rows, args), strict=True))
        by_reply = {(row["reply"], row["prompt"]): by_row[row["id"]] for row in rows}
        name = f"ModelJudge({args.judge_model}, threshold {args.threshold:g})"
        result = agreement(rows, lambda reply, prompt="": by_reply[(reply, prompt)])
    else:
        name = args.judge
        result = agreement(rows, load_judge(args.judge))
    print(f"{len(rows)} hand-labelled replies, judge {name}\n")
    print_matrix(result["four"], LABELS)
    print(f"\nκ, four classes: {result['kappa_four']:.3f}")
    print(f"κ, helped / not helped / degenerate: {result['kappa_helped3']:.3f}")
    n_binary = sum(map(sum, result["binary"]))
    low, high = kappa_interval(result["binary"])
    print(
        f"κ, helped / not helped (n={n_binary}, neither side degenerate): {result['kappa_binary']:.3f} "
        f"(bootstrap 95 % CI {low:.3f}–{high:.3f})"
    )
    print(f"κ, degenerate / other: {result['kappa_degenerate']:.3f}  {result['degenerate']}\n")
    print_kappas_per_model(rows, result["judged"])
    print()
    print_rates(rows, result["judged"])


if __name__ == "__main__":
    main()
