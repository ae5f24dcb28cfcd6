"""Measure edit variants on the demo model with hooks only: first-token refusal score on harmful val
prompts, first-token KL on harmless val prompts, and (``--generate``) judged refusals of greedy replies.

    python benchmarks/edit_levers.py /tmp/x/direction.safetensors --n 32 [--generate]

Variants: the file's edit as stored (plain), and the same with the column-norm-preserving fold
(``W' = (I − s r̂ r̂ᵀ) W D``, hook: ``abliterate.model.hooks.norm_preserving_projection``), each at
strength 1 and at a few lower uniform strengths, so the two trade-off curves can be compared at equal KL.
"""

from __future__ import annotations

import argparse
import json
import time

from abliterate.adapters.resolve import resolve_adapter
from abliterate.find.evaluate import generate_replies
from abliterate.find.judge import refusal_count
from abliterate.find.scores import kl_divergence, refusal_scores, refusal_token_ids
from abliterate.model.batching import encode, last_logits
from abliterate.model.hooks import ablated, edit_projection, norm_preserving_projection
from abliterate.model.loading import load_model
from abliterate.model.prompts import bundled
from abliterate.ship.direction_file import load_direction


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("direction")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--strengths", default="1.0,0.9,0.8")
    parser.add_argument("--generate", action="store_true")
    args = parser.parse_args()
    loaded = load_model("demo", dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = resolve_adapter(model)
    direction, _ = load_direction(args.direction)
    harmful, harmless = bundled("harmful", "val")[: args.n], bundled("harmless", "val")[: args.n]
    enc_harmful = encode(tokenizer, harmful, batch_size=16)
    enc_harmless = encode(tokenizer, harmless, batch_size=16)
    reference = last_logits(model, adapter, enc_harmless)[0]
    ids = refusal_token_ids(tokenizer)
    base = refusal_scores(last_logits(model, adapter, enc_harmful)[0], ids).mean().item()
    print(json.dumps({"variant": "original", "refusal_score": round(base, 3)}), flush=True)
    for strength in [float(s) for s in args.strengths.split(",")]:
        for name, operator in (("plain", edit_projection), ("norm-preserving", norm_preserving_projection)):
            started = time.perf_counter()
            with ablated(model, adapter, operator(direction, lambda writer, s=strength: s)):
                score = refusal_scores(last_logits(model, adapter, enc_harmful)[0], ids).mean().item()
                kl = kl_divergence(reference, last_logits(model, adapter, enc_harmless)[0]).mean().item()
                row = {
                    "variant": name,
                    "strength": strength,
                    "refusal_score": round(score, 3),
                    "kl": round(kl, 4),
                }
                if args.generate:
                    replies = generate_replies(model, tokenizer, harmful, max_new_tokens=24, progress=False)
                    row["judged_refusals"] = f"{refusal_count(replies)}/{len(replies)}"
            row["seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
