"""Generate greedy replies of the demo model (original and edited) for hand labelling.

    python benchmarks/generate_replies.py --edited /tmp/x --out /tmp/replies.json

Prompts: the 39 HarmBench validation prompts, the first 21 of the shared harmful train split and the
first 10 Alpaca validation prompts (harmless: the judge must not flag compliant replies).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from abliterate.find.evaluate import generate_replies
from abliterate.model.loading import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "refusal_direction"


def prompts() -> list[tuple[str, str]]:
    """``(source, prompt)`` pairs in a fixed order."""

    def read(name: str) -> list[str]:
        return [row["instruction"] for row in json.loads((DATA / name).read_text())]

    return (
        [("harmbench_val", p) for p in read("harmful_val.json")]
        + [("harmful_train", p) for p in read("harmful_train.json")[:21]]
        + [("harmless_val", p) for p in read("harmless_val.json")[:10]]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edited", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    pairs = prompts()
    rows = []
    for label, model_id in (("original", "demo"), ("edited", args.edited)):
        loaded = load_model(model_id, dtype="auto", device="cpu")
        replies = generate_replies(
            loaded.model, loaded.tokenizer, [p for _, p in pairs], max_new_tokens=args.max_new_tokens
        )
        rows += [
            {"model": label, "source": source, "prompt": prompt, "reply": reply}
            for (source, prompt), reply in zip(pairs, replies, strict=True)
        ]
        del loaded
    Path(args.out).write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", "utf-8")


if __name__ == "__main__":
    main()
