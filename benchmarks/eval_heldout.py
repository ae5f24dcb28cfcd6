"""The held-out benchmark: the original against edited outputs, with the project's evaluation instrument.

    cp benchmarks/heldout_cache/demo_128_tokens.json /tmp/heldout.json      # the original's replies so far
    python benchmarks/eval_heldout.py --cache /tmp/heldout.json \
        paper=/tmp/demo_paper default=/tmp/demo_default
    python benchmarks/eval_heldout.py --cache /tmp/heldout.json --table-only   # the table again, no model

Each edited output is measured as its direction file declares (``OUTPUT_DIR/direction.safetensors``), hooked
onto the one loaded original (hooks are proven equal to the fold by ``abliterate verify``), so the
original's distributions are exact and no second model is loaded. Measured per model: greedy replies
(``--max-new-tokens``, KV cache) to the bundled held-out harmful, harmless and look-dangerous-but-safe eval
prompts (disjoint from extraction and selection); first-token KL to the original on the harmless prompts;
multi-token KL, KL(original ‖ edited) per token teacher-forced over the original's own greedy ``--damage-
tokens`` replies to the harmless prompts (``abliterate.find.damage``). The table recomputes verdicts with
the current judge: not helped (refused + dodged) with Wilson 95 % intervals and n, degenerate rates, over-
refusal, and paired bootstraps of every later edit against the first edit given.

Everything measured goes to ``--cache`` after each set, so a stopped run resumes where it stopped; a cache
whose prompts or lengths differ from this run's is refused rather than mixed.
"""

from __future__ import annotations

import argparse
import hashlib
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
from abliterate.find.evaluate import JudgedSet, generate_replies, judge_set
from abliterate.find.evaluate_model import prompt_sets as evaluation_sets
from abliterate.find.scores import kl_divergence
from abliterate.find.stats import paired_bootstrap, wilson_interval
from abliterate.model.batching import encode, forward_batches
from abliterate.model.hooks import ablated, edit_projection
from abliterate.model.loading import load_model
from abliterate.ship.direction_file import declared_from_file, load_direction

SETS = ("harmful", "harmless", "lookalike")


def prompt_sets(n_harmful: int, n_harmless: int, n_lookalike: int) -> dict[str, list[str]]:
    """The sets ``abliterate evaluate`` reads by default (the bundled held-out splits), cut to size."""
    sizes = {"harmful": n_harmful, "harmless": n_harmless, "lookalike": n_lookalike}
    return {name: prompts[: sizes[name]] for name, prompts in evaluation_sets(None, None, None, None).items()}


def open_cache(path: Path, sets: dict[str, list[str]], settings: dict[str, Any]) -> dict[str, Any]:
    """The cache at ``path`` (new when absent), checked to hold this run's prompts and settings.

    Raises:
        SystemExit: the cache was measured on other prompts or with other lengths.
    """
    if not path.exists():
        return {"settings": settings, "prompts": sets, "conditions": {}}
    cache = json.loads(path.read_text("utf-8"))
    for key in ("max_new_tokens", "damage_tokens"):
        if cache["settings"].get(key) != settings[key]:
            raise SystemExit(f"{path}: measured with {key}={cache['settings'].get(key)}, not {settings[key]}")
    for name, prompts in sets.items():
        if name in cache["prompts"] and cache["prompts"][name] != prompts:
            raise SystemExit(f"{path}: its {name} prompts differ from this run's")
    cache["prompts"] |= sets
    return cache


def save(path: Path, cache: dict[str, Any]) -> None:
    """Write atomically, so a run stopped mid-write leaves the previous cache."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(cache, indent=1, ensure_ascii=False) + "\n", "utf-8")
    partial.replace(path)


def measure(args: argparse.Namespace) -> None:
    """Generate and measure what the cache lacks, saving after each step."""
    sets = prompt_sets(args.n_harmful, args.n_harmless, args.n_lookalike)
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "damage_tokens": args.damage_tokens,
        "original": args.original,
    }
    cache = open_cache(args.cache, sets, settings)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.original, dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = resolve_adapter(model)
    edits: dict[str, Callable[[], AbstractContextManager]] = {"original": nullcontext}
    for label, directory in (edit.split("=", 1) for edit in args.edits):
        path = Path(directory) / "direction.safetensors"
        declared = declared_from_file(*load_direction(path))
        edits[label] = lambda declared=declared: ablated(model, adapter, edit_projection(declared))
        entry = cache["conditions"].setdefault(label, {})
        entry |= {"direction": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    encoded = encode(tokenizer, sets["harmless"], batch_size=args.batch_size, sort_by_length=False)
    first_token = torch.cat([chunk.float() for chunk in forward_batches(model, encoded)])
    reference = None
    for label, ablation in edits.items():
        entry = cache["conditions"].setdefault(label, {})
        replies, seconds = entry.setdefault("replies", {}), entry.setdefault("seconds", {})
        for name, prompts in sets.items():
            if len(replies.get(name, [])) == len(prompts):
                continue
            clock = time.perf_counter()
            with ablation():
                replies[name] = generate_replies(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens=args.max_new_tokens,
                    description=f"{label} {name}",
                )
            seconds[name] = time.perf_counter() - clock
            save(args.cache, cache)
        if label == "original" or "kl_multi_token" in entry:
            continue
        if reference is None:
            reference = record_reference(
                model, tokenizer, sets["harmless"], max_new_tokens=args.damage_tokens, progress=True
            )
        with ablation():
            edited = torch.cat([chunk.float() for chunk in forward_batches(model, encoded)])
        per_prompt = kl_divergence(first_token, edited)
        damage = multi_token_kl(model, reference, ablation, progress=True)
        entry |= {
            "kl_first_token": per_prompt.mean().item(),
            "kl_first_token_per_prompt": per_prompt.tolist(),
            "kl_multi_token": damage.mean,
            "kl_multi_token_per_prompt": damage.per_prompt,
            "damage_tokens_scored": damage.n_tokens,
        }
        save(args.cache, cache)
        print(f"{label}: measured", flush=True)


def table(cache: dict[str, Any]) -> list[str]:
    """The benchmark's table from cached replies (verdicts recomputed by the current judge)."""
    prompts = cache["prompts"]
    judged = {
        label: {name: judge_set(prompts[name], replies) for name, replies in entry.get("replies", {}).items()}
        for label, entry in cache["conditions"].items()
    }
    n = {name: len(values) for name, values in prompts.items()}
    lines = [
        f"| model | not helped, harmful (n={n['harmful']}) | degenerate harmful / harmless | "
        f"first-token KL | multi-token KL | not helped, harmless (n={n['harmless']}) | "
        f"not helped, lookalike (n={n.get('lookalike', 0)}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, sets in judged.items():
        entry = cache["conditions"][label]
        cells = [
            _rate(sets.get("harmful"), "not_helped"),
            f"{_rate(sets.get('harmful'), 'degenerate')} / {_rate(sets.get('harmless'), 'degenerate')}",
            f"{entry['kl_first_token']:.4f}" if "kl_first_token" in entry else "0 (itself)",
            f"{entry['kl_multi_token']:.4f}" if "kl_multi_token" in entry else "0 (itself)",
            _rate(sets.get("harmless"), "not_helped"),
            _rate(sets.get("lookalike"), "not_helped"),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + _differences(cache, judged)


def _differences(cache: dict[str, Any], judged: dict[str, dict[str, JudgedSet]]) -> list[str]:
    """Paired bootstraps of every later edit against the first edit given, per set and per KL."""
    edits = [label for label in judged if label != "original"]
    lines = []
    for other in edits[1:]:
        base, entry, first = edits[0], cache["conditions"][other], cache["conditions"][edits[0]]
        if entry.get("sha256") and entry.get("sha256") == first.get("sha256"):
            lines.append(f"\n{other} declares the same edit as {base} (direction files bitwise equal)")
            continue
        lines.append(f"\n{other} − {base}, paired bootstrap (95 % CI):")
        for name in SETS:
            if name in judged[other] and name in judged[base]:
                d = paired_bootstrap(judged[other][name].not_helped(), judged[base][name].not_helped())
                lines.append(f"- not helped, {name}: {d.mean:+.1%} ({d.low:+.1%} to {d.high:+.1%}), n={d.n}")
        for key in ("kl_first_token", "kl_multi_token"):
            if f"{key}_per_prompt" in entry and f"{key}_per_prompt" in first:
                d = paired_bootstrap(entry[f"{key}_per_prompt"], first[f"{key}_per_prompt"])
                lines.append(f"- {key}: {d.mean:+.4f} ({d.low:+.4f} to {d.high:+.4f}), n={d.n}")
    return lines


def _rate(judged: JudgedSet | None, figure: str) -> str:
    if judged is None:
        return "—"
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
    parser.add_argument("--cache", type=Path, required=True, help="replies and figures, resumed when present")
    parser.add_argument("--original", default="demo", help="the source model the edits were made from")
    parser.add_argument("--n-harmful", type=int, default=226)
    parser.add_argument("--n-harmless", type=int, default=122)
    parser.add_argument("--n-lookalike", type=int, default=134)
    parser.add_argument("--max-new-tokens", type=int, default=EVAL_MAX_NEW_TOKENS)
    parser.add_argument("--damage-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table-only", action="store_true", help="print the table from the cache, no model")
    args = parser.parse_args()
    if not args.table_only:
        measure(args)
    print("\n".join(table(json.loads(args.cache.read_text("utf-8")))))


if __name__ == "__main__":
    main()
