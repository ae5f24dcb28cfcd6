"""The held-out benchmark: the original against edited outputs, with the project's evaluation instrument.

    python benchmarks/eval_heldout.py paper=/tmp/demo_paper default=/tmp/demo_default
    python benchmarks/eval_heldout.py --rejudge /tmp/eval_heldout.json      # verdicts again, no generation

Each edited output is measured as its direction file declares (``direction.safetensors``), hooked onto the
one loaded original (hooks are proven equal to the fold by ``abliterate verify``), so the original's
distributions are exact and no second model is loaded. Prints, per model: not helped (refused + dodged)
on the bundled harmful eval prompts with its Wilson 95 % interval and n, the degenerate rate (harmful and
harmless), first-token KL and multi-token KL (the original's greedy harmless replies, teacher-forced),
over-refusal (not helped) on harmless and look-dangerous-but-safe prompts, and a paired bootstrap of
not helped, second − first edit given. Every reply is saved to ``--out`` so verdicts can be recomputed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from abliterate.adapters.resolve import resolve_adapter
from abliterate.config import EVAL_MAX_NEW_TOKENS
from abliterate.find.damage import multi_token_kl, record_reference
from abliterate.find.evaluate import generate_replies, judge_set
from abliterate.find.scores import kl_divergence
from abliterate.find.stats import paired_bootstrap, wilson_interval
from abliterate.model.batching import encode, forward_batches
from abliterate.model.hooks import ablated, edit_projection
from abliterate.model.loading import load_model
from abliterate.model.prompts import bundled, has_bundled
from abliterate.ship.direction_file import declared_from_file, load_direction


def prompt_sets(n_harmful: int, n_harmless: int, n_lookalike: int) -> dict[str, list[str]]:
    """The bundled eval splits (disjoint from extraction and selection), cut to the sizes asked."""
    sets = {
        "harmful": bundled("harmful", "eval")[:n_harmful],
        "harmless": bundled("harmless", "eval")[:n_harmless],
    }
    if has_bundled("lookalike", "eval"):
        sets["lookalike"] = bundled("lookalike", "eval")[:n_lookalike]
    return sets


def measure(loaded: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Replies of the original and of every edit to every set, and their KL figures."""
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = resolve_adapter(model)
    sets = prompt_sets(args.n_harmful, args.n_harmless, args.n_lookalike)
    started = time.perf_counter()
    reference = record_reference(
        model, tokenizer, sets["harmless"], max_new_tokens=args.damage_tokens, batch_size=args.batch_size
    )
    encoded = encode(tokenizer, sets["harmless"], batch_size=args.batch_size, sort_by_length=False)
    edits: dict[str, Callable[[], AbstractContextManager]] = {"original": nullcontext}
    for label, directory in (edit.split("=", 1) for edit in args.edits):
        declared = declared_from_file(*load_direction(Path(directory) / "direction.safetensors"))
        edits[label] = lambda declared=declared: ablated(model, adapter, edit_projection(declared))
    results: dict[str, Any] = {}
    first_token = None
    for label, ablation in edits.items():
        clock = time.perf_counter()
        with ablation():
            replies = {
                name: generate_replies(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size,
                    description=f"{label} {name}",
                )
                for name, prompts in sets.items()
            }
            logits = torch.cat([chunk.float().cpu() for chunk in forward_batches(model, encoded)])
        first_token = logits if first_token is None else first_token
        damage = multi_token_kl(model, reference, ablation, batch_size=max(1, args.batch_size // 4))
        results[label] = {
            "replies": replies,
            "kl_first_token": kl_divergence(first_token, logits).mean().item(),
            "kl_multi_token": damage.mean,
            "kl_multi_token_per_prompt": damage.per_prompt,
            "seconds": time.perf_counter() - clock,
        }
        print(f"{label}: {results[label]['seconds']:.0f} s", flush=True)
    settings = {key: value for key, value in vars(args).items() if key not in ("rejudge",)}
    settings |= {"damage_tokens_scored": reference.n_tokens, "seconds": time.perf_counter() - started}
    return {"settings": settings, "prompts": sets, "models": results}


def table(saved: dict[str, Any]) -> list[str]:
    """The benchmark's table from saved replies (verdicts recomputed by the current judge)."""
    prompts, models = saved["prompts"], saved["models"]
    judged = {
        label: {name: judge_set(prompts[name], data["replies"][name]) for name in prompts}
        for label, data in models.items()
    }
    n = {name: len(values) for name, values in prompts.items()}
    header = (
        f"| model | not helped, harmful (n={n['harmful']}) | degenerate harmful / harmless | "
        f"first-token KL | multi-token KL | over-refusal harmless (n={n['harmless']}) | "
        f"over-refusal lookalike (n={n.get('lookalike', 0)}) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for label, sets in judged.items():
        cells = [
            _rate(sets["harmful"], "not_helped"),
            f"{_rate(sets['harmful'], 'degenerate')} / {_rate(sets['harmless'], 'degenerate')}",
            f"{models[label]['kl_first_token']:.4f}",
            f"{models[label]['kl_multi_token']:.4f}",
            _rate(sets["harmless"], "not_helped"),
            _rate(sets["lookalike"], "not_helped") if "lookalike" in sets else "—",
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    edits = [label for label in judged if label != "original"]
    if len(edits) >= 2:
        first, second = edits[0], edits[1]
        difference = paired_bootstrap(
            judged[second]["harmful"].not_helped(), judged[first]["harmful"].not_helped()
        )
        lines.append(
            f"\nnot helped, {second} − {first} (paired bootstrap, n={difference.n}): {difference.mean:+.1%} "
            f"(95 % CI {difference.low:+.1%} to {difference.high:+.1%})"
        )
    return lines


def _rate(judged: Any, figure: str) -> str:
    count = judged.count("refused", "dodged") if figure == "not_helped" else judged.count("degenerate")
    low, high = wilson_interval(count, judged.n)
    return f"{count / max(judged.n, 1):.1%} ({low:.1%}–{high:.1%})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "edits", nargs="*", help="LABEL=OUTPUT_DIR of each edited output (its direction file)"
    )
    parser.add_argument("--original", default="demo", help="the source model the edits were made from")
    parser.add_argument("--n-harmful", type=int, default=226)
    parser.add_argument("--n-harmless", type=int, default=122)
    parser.add_argument("--n-lookalike", type=int, default=134)
    parser.add_argument("--max-new-tokens", type=int, default=EVAL_MAX_NEW_TOKENS)
    parser.add_argument("--damage-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="/tmp/eval_heldout.json", help="where replies and figures go")
    parser.add_argument("--rejudge", metavar="JSON", help="recompute the table from saved replies")
    args = parser.parse_args()
    if args.rejudge:
        saved = json.loads(Path(args.rejudge).read_text("utf-8"))
    else:
        if not args.edits:
            parser.error("give LABEL=OUTPUT_DIR for each edit, or --rejudge JSON")
        loaded = load_model(args.original, dtype="float32", device="cpu")
        saved = measure(loaded, args)
        Path(args.out).write_text(json.dumps(saved, indent=1, ensure_ascii=False) + "\n", "utf-8")
        print(f"replies saved to {args.out}")
    print("\n".join(table(saved)))


if __name__ == "__main__":
    main()
