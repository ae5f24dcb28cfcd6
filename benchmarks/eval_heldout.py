"""Refusals (judge and markers, 95 % Wilson intervals) and first-token KL on held-out prompts, for the
original and any number of edited checkpoints, each model loaded once.

    python benchmarks/eval_heldout.py --n 200 /tmp/x /tmp/search_demo

Harmful prompts: the shared ``harmful_train`` split (never seen by the default run); harmless: the
shared ``harmless_train`` split. Greedy replies of 24 tokens, as the pipeline's evaluation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from abliterate.find.evaluate import generate_replies, is_refusal
from abliterate.find.judge import refusal_count, wilson_interval
from abliterate.find.scores import kl_divergence
from abliterate.model.batching import encode, forward_batches
from abliterate.model.loading import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "refusal_direction"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("edited", nargs="+")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", default="/tmp/eval_heldout.json")
    args = parser.parse_args()
    harmful = [row["instruction"] for row in json.loads((DATA / "harmful_train.json").read_text())][: args.n]
    harmless = [row["instruction"] for row in json.loads((DATA / "harmless_train.json").read_text())][
        : args.n
    ]
    results, reference = {}, None
    for source in ["demo", *args.edited]:
        loaded = load_model(source, device="cpu")
        replies = generate_replies(loaded.model, loaded.tokenizer, harmful, max_new_tokens=24, progress=False)
        encoded = encode(loaded.tokenizer, harmless, batch_size=32)
        logits = torch.cat([c.float().cpu() for c in forward_batches(loaded.model, encoded)])
        reference = logits if reference is None else reference
        judged, markers = refusal_count(replies), sum(is_refusal(reply) for reply in replies)
        results[source] = {
            "n": len(replies),
            "judged": judged,
            "judged_interval_95": wilson_interval(judged, len(replies)),
            "markers": markers,
            "markers_interval_95": wilson_interval(markers, len(replies)),
            "kl_harmless": kl_divergence(reference, logits).mean().item(),
            "replies": replies,
        }
        print(source, {k: v for k, v in results[source].items() if k != "replies"}, flush=True)
        del loaded
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n", "utf-8")


if __name__ == "__main__":
    main()
