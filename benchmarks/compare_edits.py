"""Held-out comparison of edits on the demo: the original, the paper rule and the default, one loaded model.

Each edit is applied as its hooks (proven equal to the folded weights by the gate), so every condition
is measured on the same loaded model. Replies are cached in ``--out`` (JSON) so verdicts can be
recomputed with a later judge without generating again; KL figures are cached beside them.

    python benchmarks/compare_edits.py --out /tmp/b15/replies.json \
        --edit paper=/tmp/b15/paper/direction.safetensors \
        --edit default=/tmp/b15/default/direction.safetensors
    python benchmarks/compare_edits.py --out /tmp/b15/replies.json --report

Measured per condition: greedy replies (``--max-new-tokens``, default 128) to every bundled harmful eval,
harmless eval and look-dangerous-but-safe prompt; first-token KL to the original on the harmless prompts;
multi-token KL: KL(original ‖ edited) per token, teacher-forced over the original's own greedy replies to
the harmless prompts (truncated at end of text), averaged per prompt and then over prompts.

``benchmarks/heldout_cache/demo_128_tokens.json`` holds the original demo model's replies generated so far
(harmful and harmless eval sets, 128 tokens, float32 CPU); copy it to ``--out`` to go on from there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from abliterate.adapters.resolve import resolve_adapter
from abliterate.find.evaluate import generate_replies
from abliterate.find.scores import kl_divergence
from abliterate.model import loading
from abliterate.model.batching import encode, format_chat, forward_batches
from abliterate.model.hooks import ablated, edit_projection
from abliterate.model.prompts import bundled
from abliterate.ship.direction_file import declared_from_file, load_direction

SETS = (("harmful", "eval"), ("harmless", "eval"), ("lookalike", "eval"))


def _load_cache(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"conditions": {}}


def _save_cache(path: Path, cache: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(path)


@torch.no_grad()
def _teacher_forced_kl(model, tokenizer, prompts, replies, hooks, batch_size: int = 8) -> list[float]:
    """Mean per-token KL(original ‖ edited) over each original reply, teacher-forced."""
    texts = format_chat(tokenizer, prompts)
    per_prompt: list[float] = []
    for start in range(0, len(texts), batch_size):
        rows = []
        for text, reply in zip(
            texts[start : start + batch_size], replies[start : start + batch_size], strict=True
        ):
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
            rows.append((prompt_ids, reply_ids))
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (p, r) in enumerate(rows):  # left padding, as generation uses
            offset = width - len(p) - len(r)
            ids[i, offset:] = torch.tensor(p + r)
            mask[i, offset:] = 1
            # the logits at position t predict token t+1: score the positions predicting reply tokens
            scored[i, offset + len(p) - 1 : width - 1] = True
        reference = model(input_ids=ids, attention_mask=mask).logits
        with hooks():
            edited = model(input_ids=ids, attention_mask=mask).logits
        kl = kl_divergence(reference, edited)
        for i in range(len(rows)):
            per_prompt.append(kl[i][scored[i]].mean().item())
    return per_prompt


def generate(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    cache = _load_cache(args.out)
    loaded = loading.load_model("demo", dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = resolve_adapter(model)
    edits: dict[str, Any] = {"original": None}
    for spec in args.edit:
        name, path = spec.split("=", 1)
        direction, metadata = load_direction(path)
        edits[name] = (declared_from_file(direction, metadata), path, metadata)
    prompt_sets = {f"{kind}_{split}": bundled(kind, split) for kind, split in SETS}
    cache["prompts"] = prompt_sets
    cache["max_new_tokens"] = args.max_new_tokens

    def hooks_of(name: str):
        edit = edits[name]
        return (
            (lambda: contextlib.nullcontext())
            if edit is None
            else (lambda: ablated(model, adapter, edit_projection(edit[0])))
        )

    harmless = prompt_sets["harmless_eval"]
    encoded = encode(tokenizer, harmless, batch_size=32)
    reference_first = torch.cat([c.float() for c in forward_batches(model, encoded)])
    for name in edits:
        entry = cache["conditions"].setdefault(name, {"replies": {}, "seconds": {}})
        if edits[name] is not None:
            entry["direction"] = edits[name][1]
            entry["metadata"] = edits[name][2]
        for set_name, prompts in prompt_sets.items():
            if len(entry["replies"].get(set_name, [])) == len(prompts):
                continue
            started = time.perf_counter()
            with hooks_of(name)():
                entry["replies"][set_name] = generate_replies(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens=args.max_new_tokens,
                    description=f"{name} {set_name}",
                )
            entry["seconds"][set_name] = time.perf_counter() - started
            _save_cache(args.out, cache)
        if name != "original" and "first_token_kl" not in entry:
            with hooks_of(name)():
                edited_first = torch.cat([c.float() for c in forward_batches(model, encoded)])
            entry["first_token_kl"] = kl_divergence(reference_first, edited_first).tolist()
            original_replies = cache["conditions"]["original"]["replies"]["harmless_eval"]
            entry["multi_token_kl"] = _teacher_forced_kl(
                model, tokenizer, harmless, original_replies, hooks_of(name)
            )
            _save_cache(args.out, cache)
        print(name, "done", flush=True)


def _judge():
    from abliterate.find import judge as judge_module

    if hasattr(judge_module, "judge"):
        return judge_module.judge
    return lambda reply, prompt="": "refused" if judge_module.judge_refusal(reply) else "complied"


def report(args: argparse.Namespace) -> None:
    from abliterate.find.judge import wilson_interval

    try:
        from abliterate.find.stats import paired_bootstrap
    except ImportError:
        paired_bootstrap = None
    cache = _load_cache(args.out)
    judge = _judge()
    verdicts: dict[str, dict[str, list[str]]] = {}
    for name, entry in cache["conditions"].items():
        verdicts[name] = {
            set_name: [judge(r, p) for r, p in zip(replies, cache["prompts"][set_name], strict=True)]
            for set_name, replies in entry["replies"].items()
        }

    def rate(values: list[str], which: set[str]) -> str:
        k, n = sum(v in which for v in values), len(values)
        lo, hi = wilson_interval(k, n)
        return f"{100 * k / n:.1f} % ({100 * lo:.1f}–{100 * hi:.1f}), {k}/{n}"

    not_helped = {"refused", "dodged"}
    print(f"max_new_tokens {cache['max_new_tokens']}")
    for name, sets in verdicts.items():
        entry = cache["conditions"][name]
        print(f"\n## {name}")
        for set_name, values in sets.items():
            counts = {c: sum(v == c for v in values) for c in ("refused", "dodged", "complied", "degenerate")}
            print(
                f"  {set_name}: not helped {rate(values, not_helped)}; "
                f"degenerate {rate(values, {'degenerate'})}; {counts}"
            )
        if "first_token_kl" in entry:
            ft, mt = entry["first_token_kl"], entry["multi_token_kl"]
            print(
                f"  first-token KL {sum(ft) / len(ft):.4f} (n={len(ft)}); "
                f"multi-token KL {sum(mt) / len(mt):.4f} (n={len(mt)})"
            )
    if paired_bootstrap and "paper" in verdicts:
        for other in verdicts:
            if other in ("paper", "original"):
                continue
            for set_name in verdicts[other]:
                a = [float(v in not_helped) for v in verdicts[other][set_name]]
                b = [float(v in not_helped) for v in verdicts["paper"][set_name]]
                d = paired_bootstrap(a, b)
                print(
                    f"\n{other} − paper, not helped on {set_name}: {100 * d.mean:+.1f} points "
                    f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}] (n={d.n})"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--edit", action="append", default=[], help="NAME=direction.safetensors")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    report(args) if args.report else generate(args)


if __name__ == "__main__":
    main()
