"""Draw replies from a ``eval_heldout.py`` cache for blind hand labelling.

    python benchmarks/sample_for_labels.py --cache benchmarks/heldout_cache/demo_128_tokens.json \
        --dir benchmarks/judge_labels/heldout --batch b1 original:harmful_eval:60 original:harmless_eval:20

Appends the drawn replies to ``DIR/replies.jsonl`` (``id``, ``model``, ``set``, ``prompt_index``,
``prompt``, ``reply``; ids continue ``h000``, ``h001``, …, given after shuffling; a reply already drawn is
never drawn again) and writes ``DIR/to_label_BATCH.jsonl``: the same replies in id order, ``id``, ``prompt``
and ``reply`` only, so the labeller sees neither the model nor the set. Labels go to ``DIR/labels.jsonl``
(``id``, ``label``, optional ``note``), read by ``benchmarks/judge_agreement.py --labels DIR``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), "utf-8")


# Older batches recorded the cache's former set names.
_SET_NAMES = {"harmful_eval": "harmful", "harmless_eval": "harmless"}


def used_prompts(rows: list[dict]) -> set[tuple[str, int]]:
    """``(set, prompt_index)`` of every drawn reply, under the cache's current set names."""
    return {(_SET_NAMES.get(row["set"], row["set"]), row["prompt_index"]) for row in rows}


def draw(
    cache: dict,
    requests: list[tuple[str, str, int]],
    taken: set,
    seed: int,
    banned_prompts: set[tuple[str, int]] | None = None,
) -> list[dict]:
    """``count`` replies per ``(model, set)`` drawn without replacement, skipping ``taken`` keys.

    With ``banned_prompts`` (a set of ``(set, prompt_index)``), prompts in it are skipped and every
    prompt drawn joins it, so no two replies of the batch answer the same prompt.
    """
    rng = random.Random(seed)
    drawn = []
    for model, name, count in requests:
        replies = cache["conditions"][model]["replies"][name]
        prompts = cache["prompts"][name]
        free = [i for i in range(len(replies)) if (model, name, i) not in taken]
        if banned_prompts is not None:
            free = [i for i in free if (name, i) not in banned_prompts]
        if count > len(free):
            raise SystemExit(f"{model}:{name} has {len(free)} replies not yet drawn, {count} asked")
        for index in sorted(rng.sample(free, count)):
            row = {"model": model, "set": name, "prompt_index": index}
            drawn.append(row | {"prompt": prompts[index], "reply": replies[index]})
            if banned_prompts is not None:
                banned_prompts.add((name, index))
    return drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--batch", required=True, help="name of the to_label file written")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument(
        "--fresh-prompts",
        type=Path,
        nargs="*",
        default=None,
        help="draw only prompts never drawn in these label folders (nor twice in this batch)",
    )
    parser.add_argument("--id-prefix", default="h", help="first letter of the ids of this folder")
    parser.add_argument("requests", nargs="+", help="MODEL:SET:COUNT")
    args = parser.parse_args()
    requests = []
    for text in args.requests:
        model, name, count = text.split(":")
        requests.append((model, name, int(count)))
    cache = json.loads(args.cache.read_text("utf-8"))
    args.dir.mkdir(parents=True, exist_ok=True)
    existing = _read_jsonl(args.dir / "replies.jsonl")
    taken = {(row["model"], row["set"], row["prompt_index"]) for row in existing}
    banned = None
    if args.fresh_prompts is not None:
        banned = used_prompts(existing)
        for folder in args.fresh_prompts:
            banned |= used_prompts(_read_jsonl(folder / "replies.jsonl"))
    new = draw(cache, requests, taken, args.seed + len(existing), banned)
    # Ids are given after shuffling, so neither an id's place nor its range tells the model or the set.
    random.Random(args.seed).shuffle(new)
    new = [{"id": f"{args.id_prefix}{len(existing) + offset:03d}", **row} for offset, row in enumerate(new)]
    _write_jsonl(args.dir / "replies.jsonl", existing + new)
    blind = [{"id": r["id"], "prompt": r["prompt"], "reply": r["reply"]} for r in new]
    _write_jsonl(args.dir / f"to_label_{args.batch}.jsonl", blind)
    print(f"{len(new)} replies drawn; {len(existing) + len(new)} in {args.dir / 'replies.jsonl'}")


if __name__ == "__main__":
    main()
