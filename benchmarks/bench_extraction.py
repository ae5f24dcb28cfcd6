"""Extraction and selection cost against plain forward passes over the same prompts, in the same run.

    python benchmarks/bench_extraction.py            # the demo model, 128 + 128 bundled prompts
    python benchmarks/bench_extraction.py --short    # a tiny random model (CI smoke run)

Prints ratios (machines here are noisy, so only ratios measured in one process mean anything):
- extraction time / plain forward time (transformers forward, left padded, full logits; target ≤ 1.05);
- extraction time / our own forward without hooks (the hooks' overhead);
- selection: cost of scoring one candidate on the screen and on the full val set, in plain forwards.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _timed(function, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help="tiny random model instead of the demo")
    parser.add_argument("--n", type=int, default=128, help="prompts per class")
    args = parser.parse_args()

    from abliterate.adapters.resolve import resolve_adapter
    from abliterate.find.extract import extract_candidates
    from abliterate.model.batching import encode, eoi_length, format_chat, forward_batches, last_logits
    from abliterate.model.prompts import bundled

    if args.short:
        from tiny import make_model, make_tokenizer

        model, tokenizer = make_model("qwen2"), make_tokenizer()
        tokenizer.padding_side = "left"
        args.n = min(args.n, 32)
    else:
        from abliterate.model.loading import load_model

        loaded = load_model("demo")
        model, tokenizer = loaded.model, loaded.tokenizer
    adapter = resolve_adapter(model)
    harmful, harmless = bundled("harmful", "train")[: args.n], bundled("harmless", "train")[: args.n]
    n_eoi = eoi_length(tokenizer)
    batch_size = 32

    def plain_forward() -> None:
        with torch.no_grad():
            for prompts in (harmful, harmless):
                texts = format_chat(tokenizer, prompts)
                for start in range(0, len(texts), batch_size):
                    batch = tokenizer(
                        texts[start : start + batch_size],
                        add_special_tokens=False,
                        padding=True,
                        return_tensors="pt",
                    )
                    model(**batch)

    encoded = [encode(tokenizer, p, batch_size=batch_size, keep_last=n_eoi) for p in (harmful, harmless)]

    def own_forward() -> None:
        for prompts in encoded:
            for _ in forward_batches(model, prompts):
                pass

    def extraction() -> None:
        extract_candidates(model, adapter, *encoded, n_eoi, progress=False)

    plain_forward()  # warm up kernels for every shape once
    t_plain = _timed(plain_forward)
    t_own = _timed(own_forward)
    t_extract = _timed(extraction)
    val = encode(tokenizer, bundled("harmful", "val")[:32], batch_size=batch_size, keep_last=n_eoi)
    screen = encode(tokenizer, bundled("harmful", "val")[:4], batch_size=batch_size, keep_last=n_eoi)
    d_model = model.get_input_embeddings().weight.shape[-1]
    directions = torch.nn.functional.normalize(torch.randn(8, d_model), dim=-1)
    t_val_plain = _timed(lambda: last_logits(model, adapter, val))
    t_val_one = _timed(lambda: last_logits(model, adapter, val, ablate=directions[:1]))
    t_screen_eight = _timed(lambda: last_logits(model, adapter, screen, ablate=directions))
    rows = [
        ("prompts", f"{len(harmful)} harmful + {len(harmless)} harmless"),
        ("plain transformers forward (s)", f"{t_plain:.2f}"),
        ("our forward, no hooks (s)", f"{t_own:.2f}"),
        ("extraction (s)", f"{t_extract:.2f}"),
        ("extraction / plain forward", f"{t_extract / t_plain:.3f}  (target ≤ 1.05)"),
        ("extraction / our forward", f"{t_extract / t_own:.3f}"),
        ("one candidate on 32 val prompts / plain val forward", f"{t_val_one / t_val_plain:.3f}"),
        (
            "one candidate in the 4-prompt screen / plain val forward",
            f"{t_screen_eight / 8 / t_val_plain:.3f}",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
