"""Confirm a lever of ``levers_front.py`` against the paper's point as the search's last stage would.

    python benchmarks/confirm_lever.py --ace-level 0.05 --strength 0.9 --out /tmp/ace.json

Both edits hooked on the one loaded demo (float32, CPU, greedy, KV cache): 128-token replies to the 128
confirmation prompts the run uses (the harmful val split read from its end), read by the frozen judge,
and the paired bootstrap of not helped (lever − paper); first-token KL on the 128 harmless confirmation
prompts; multi-token KL teacher-forced over the original's greedy 64-token replies to 32 of them. The
lever dominates when the upper end of the difference is ≤ +2 points and both KLs are lower
(``abliterate.find.confirm``).
"""

from __future__ import annotations

import argparse
import json
import time

from levers_front import Demo, affine, per_writer

from abliterate.find.confirm import ConfirmSettings
from abliterate.find.damage import multi_token_kl, record_reference
from abliterate.find.evaluate import generate_replies
from abliterate.find.judge import not_helped
from abliterate.find.scores import kl_divergence
from abliterate.find.stats import paired_bootstrap
from abliterate.model.batching import encode, last_logits
from abliterate.model.hooks import ablated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ace-level", type=float, required=True, help="the embedding's level c along r̂")
    parser.add_argument("--strength", type=float, default=1.0, help="the lever's strength s")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--n", type=int, default=128, help="confirmation prompts")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    demo = Demo.load(args.layer)
    model, adapter, tokenizer = demo.model, demo.adapter, demo.tokenizer
    harmful = demo.splits["harmful"].val[::-1][: args.n]
    harmless = demo.splits["harmless"].val[::-1][: args.n]
    edits = {
        "paper": per_writer(lambda w: demo.r, 1.0),
        "lever": affine(demo.r, args.ace_level, args.strength),
    }
    encoded = encode(tokenizer, harmless, batch_size=64)
    original = last_logits(model, adapter, encoded)[0]
    reference = record_reference(model, tokenizer, harmless[:32], max_new_tokens=64, batch_size=32)
    result: dict = {"settings": vars(args), "n": len(harmful)}
    for name, operator in edits.items():
        with ablated(model, adapter, operator):
            logits = last_logits(model, adapter, encoded)[0]
            replies = generate_replies(
                model, tokenizer, harmful, max_new_tokens=args.tokens, batch_size=64, description=name
            )
        hooks = lambda op=operator: ablated(model, adapter, op)  # noqa: E731
        multi = multi_token_kl(model, reference, hooks, batch_size=32)
        verdicts = [float(not_helped(reply, prompt)) for reply, prompt in zip(replies, harmful, strict=True)]
        result[name] = {
            "not_helped": sum(verdicts),
            "verdicts": verdicts,
            "first_token_kl": kl_divergence(original, logits).mean().item(),
            "multi_token_kl": multi.mean,
            "replies": replies,
        }
        print(
            f"{name}: not helped {int(sum(verdicts))}/{len(verdicts)}, first-token KL "
            f"{result[name]['first_token_kl']:.4f}, multi-token KL {multi.mean:.4f}",
            flush=True,
        )
    rule = ConfirmSettings()  # the search's own dominance rule: its bound and its bootstrap seed
    test = paired_bootstrap(result["lever"]["verdicts"], result["paper"]["verdicts"], seed=rule.seed)
    result["difference"] = vars(test)
    lever, paper = result["lever"], result["paper"]
    dominates = (
        test.high <= rule.max_increase
        and lever["first_token_kl"] < paper["first_token_kl"]
        and lever["multi_token_kl"] < paper["multi_token_kl"]
    )
    result["dominates"] = dominates
    result["seconds"] = time.perf_counter() - started
    print(
        f"lever − paper not helped {100 * test.mean:+.1f} pts [{100 * test.low:+.1f}, {100 * test.high:+.1f}]"
        f" on {test.n}; dominates: {dominates}; {result['seconds']:.0f} s"
    )
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
