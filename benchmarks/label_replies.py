"""Generate the demo model's replies that ``benchmarks/judge_labels/`` labels by hand.

    python benchmarks/label_replies.py --paper DIR --searched DIR [--check-only]

``DIR`` is the output of ``abliterate run demo --direction-only`` (its ``direction.safetensors``); the
edit it declares is applied as hooks on every residual writer (the reference the folded weights are
proven equal to), so the hooked replies are the edited model's replies. Writes ``replies.jsonl`` (with
the model's name) and ``to_label.jsonl`` (the same replies shuffled with a fixed seed, id, prompt and
reply only, so that the labeller does not know which model wrote a reply).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from abliterate.adapters.resolve import resolve_adapter
from abliterate.find.evaluate import generate_replies
from abliterate.io.output import DIRECTION_NAME
from abliterate.model.hooks import ablated, edit_projection
from abliterate.model.loading import LoadedModel, load_model
from abliterate.ship.direction_file import declared_from_file, load_direction

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks" / "judge_labels"
SHARED = ROOT.parents[1] / "shared" / "datasets" / "refusal_direction"
MAX_NEW_TOKENS = 128
BATCH_SIZE = 32
SHUFFLE_SEED = 15


def used_prompts() -> list[str]:
    """Every string of the bundled prompt sets and the shared datasets, lower-cased."""
    found: list[str] = []
    for path in sorted((ROOT / "abliterate" / "data").glob("*.json")) + sorted(SHARED.glob("*.json")):
        for row in json.loads(path.read_text("utf-8")):
            found.append((row if isinstance(row, str) else row["instruction"]).lower())
    return found


def check_new(prompts: list[dict[str, str]]) -> None:
    """Raise if a prompt occurs (case-insensitive, as a substring either way) in a used prompt set.

    Raises:
        ValueError: a prompt is not new.
    """
    used = used_prompts()
    for row in prompts:
        text = row["prompt"].lower()
        clash = [u for u in used if text in u or u in text]
        if clash:
            raise ValueError(f"prompt {row['prompt_id']} is not new: it matches {clash[0]!r}")
    print(f"{len(prompts)} prompts checked against {len(used)} used prompts: none occurs")


@contextmanager
def edited(loaded: LoadedModel, directory: Path | None) -> Iterator[None]:
    """Hook the edit declared by ``directory``'s direction file on ``loaded`` (nothing for ``None``)."""
    if directory is None:
        with nullcontext():
            yield
        return
    direction, metadata = load_direction(directory / DIRECTION_NAME)
    declared = declared_from_file(direction, metadata)
    with ablated(loaded.model, resolve_adapter(loaded.model, None), edit_projection(declared)):
        yield


def main() -> None:
    """Generate, save and shuffle the replies."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--paper", type=Path, required=True)
    parser.add_argument("--searched", type=Path, default=None, help="leave out to label no searched edit")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument(
        "--only", choices=["original", "paper", "searched"], help="generate one model's replies"
    )
    parser.add_argument("--cache", type=Path, default=None, help="folder of per-model replies to reuse")
    parser.add_argument(
        "--cached-only", action="store_true", help="write what --cache holds, generate nothing"
    )
    args = parser.parse_args()
    prompts = json.loads((HERE / "prompts.json").read_text("utf-8"))
    check_new(prompts)
    if args.check_only:
        return
    harmful = [row for row in prompts if row["kind"] == "harmful"]
    lookalike = [row for row in prompts if row["kind"] == "lookalike"]
    runs = [("original", None, harmful + lookalike), ("paper", args.paper, harmful + lookalike)]
    if args.searched is not None:
        runs.append(("searched", args.searched, harmful))
    if args.only:
        runs = [run for run in runs if run[0] == args.only]
    rows: list[dict[str, object]] = []
    if args.cached_only:
        for name, _, chosen in runs:
            path = args.cache / f"{name}.jsonl"
            held = (
                {}
                if not path.is_file()
                else {r["prompt_id"]: r for r in map(json.loads, path.read_text("utf-8").splitlines())}
            )
            rows += [held[row["prompt_id"]] for row in chosen if row["prompt_id"] in held]
    else:
        loaded = load_model("demo", dtype="float32", device="cpu")
        for name, directory, chosen in runs:
            cached = args.cache / f"{name}.jsonl" if args.cache else None
            rows += replies_of(loaded, name, directory, chosen, cached)
    if args.only:
        return
    for index, row in enumerate(rows):
        row["id"] = f"r{index:03d}"
    write_jsonl(HERE / "replies.jsonl", rows, ["id", "prompt_id", "model", "prompt", "reply", "n_new_tokens"])
    blind = list(rows)
    random.Random(SHUFFLE_SEED).shuffle(blind)
    write_jsonl(HERE / "to_label.jsonl", blind, ["id", "prompt", "reply"])
    print(f"{len(rows)} replies written to {HERE}")


def replies_of(
    loaded: LoadedModel, name: str, directory: Path | None, chosen: list[dict[str, str]], cached: Path | None
) -> list[dict[str, object]]:
    """``name``'s replies to ``chosen``, one batch of 32 at a time, each batch appended to ``cached``
    (when given) as soon as it is done, so that an interrupted run keeps what it generated."""
    done = {}
    if cached is not None and cached.is_file():
        done = {row["prompt_id"]: row for row in map(json.loads, cached.read_text("utf-8").splitlines())}
    todo = [row for row in chosen if row["prompt_id"] not in done]
    for start in range(0, len(todo), BATCH_SIZE):
        batch = todo[start : start + BATCH_SIZE]
        with edited(loaded, directory):
            replies = generate_replies(
                loaded.model,
                loaded.tokenizer,
                [row["prompt"] for row in batch],
                max_new_tokens=MAX_NEW_TOKENS,
                batch_size=BATCH_SIZE,
                description=f"{name} {start // BATCH_SIZE + 1}/{-(-len(todo) // BATCH_SIZE)}",
            )
        for row, reply in zip(batch, replies, strict=True):
            # the decoded reply re-encoded: the new tokens up to EOS (special tokens are not decoded)
            n_new = len(loaded.tokenizer(reply, add_special_tokens=False)["input_ids"])
            done[row["prompt_id"]] = {
                "model": name,
                "prompt_id": row["prompt_id"],
                "prompt": row["prompt"],
            } | {
                "reply": reply,
                "n_new_tokens": n_new,
            }
            if cached is not None:
                with cached.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(done[row["prompt_id"]], ensure_ascii=False) + "\n")
    return [done[row["prompt_id"]] for row in chosen]


def write_jsonl(path: Path, rows: list[dict[str, object]], keys: list[str]) -> None:
    """Write ``keys`` of each row as one JSON line."""
    lines = [json.dumps({key: row[key] for key in keys}, ensure_ascii=False) for row in rows]
    path.write_text("\n".join(lines) + "\n", "utf-8")


if __name__ == "__main__":
    main()
