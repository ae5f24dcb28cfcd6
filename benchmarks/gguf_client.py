"""Judged refusals of the demo's GGUF output in llama.cpp against the safetensors edit in transformers.

    python benchmarks/gguf_client.py --n 50 --out /tmp/gguf_client.json [--direction D] [--baselines]

Finds the demo's direction (``run demo --direction-only``, layer 15, last instruction token, unless
``--direction`` is given), applies it twice (``apply`` to the demo's converted safetensors → safetensors,
``apply DEMO.gguf --format gguf`` → GGUF), times both and reports the sizes, then generates greedy replies
(128 new tokens) to the bundled harmful evaluation prompts: the safetensors edit in transformers (float32,
CPU), the GGUF edit in llama.cpp (llama-cpp-python, 2 threads) fed the same chat-template token ids. Each
refusal rate comes with its 95 % Wilson interval and ``n``. ``--baselines`` adds the unedited model in
both engines. ``--workdir DIR`` keeps the outputs; its ``st/`` and ``gguf/`` from an earlier run are
reused (their apply times are then not measured again).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner
from tqdm import tqdm

from abliterate.cli import main as cli
from abliterate.find import judge as judge_module
from abliterate.find.evaluate import generate_replies
from abliterate.find.judge import wilson_interval
from abliterate.model.batching import format_chat
from abliterate.model.demo import assemble_gguf, converted_demo_dir
from abliterate.model.loading import load_model
from abliterate.model.prompts import bundled


def _refused() -> Callable[[str], bool]:
    """The project's judge: ``not_helped`` (refusal or no help) when the judge module has it, else
    ``judge_refusal``."""
    return getattr(judge_module, "not_helped", None) or judge_module.judge_refusal


def _cli(*args: str) -> float:
    """Run an ``abliterate`` command; its wall time in seconds."""
    start = time.perf_counter()
    result = CliRunner().invoke(cli, [*args, "--no-progress"] if args[0] == "run" else list(args))
    if result.exit_code != 0:
        raise SystemExit(f"abliterate {' '.join(args)} failed:\n{result.output}")
    return time.perf_counter() - start


def _llama_replies(path: Path, ids: list[list[int]], max_new_tokens: int) -> tuple[list[str], float]:
    """Greedy llama.cpp replies to token ids, and the generation time in seconds."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=2, verbose=False, seed=0)
    start, replies = time.perf_counter(), []
    for row in tqdm(ids, desc=f"llama.cpp {path.name}", unit="prompt"):
        llm.reset()
        completion = llm.create_completion(row, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
        replies.append(completion["choices"][0]["text"])
    return replies, time.perf_counter() - start


def _torch_replies(source: str, prompts: list[str], max_new_tokens: int) -> tuple[list[str], float]:
    loaded = load_model(source, dtype="float32", device="cpu")
    start = time.perf_counter()
    replies = generate_replies(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens)
    return replies, time.perf_counter() - start


def _rate(replies: list[str], seconds: float) -> dict[str, object]:
    refused = sum(_refused()(reply) for reply in replies)
    low, high = wilson_interval(refused, len(replies))
    return {
        "n": len(replies),
        "refused": refused,
        "rate": refused / len(replies),
        "interval_95": [low, high],
        "generate_s": round(seconds, 1),
        "replies": replies,
    }


def _outputs(work: Path, direction: Path | None) -> dict[str, object]:
    """The direction (found unless given), the safetensors and GGUF edits, their times and sizes."""
    timings: dict[str, float] = {}
    if direction is None:
        found = work / "direction"
        timings["direction_s"] = _cli(
            "run", "demo", "--direction-only", "--layer", "15", "--position", "-1", "--no-evaluate",
            "--output", str(found),
        )  # fmt: skip
        direction = found / "direction.safetensors"
    source_gguf = assemble_gguf()
    for name, args in (
        ("st", [str(converted_demo_dir())]),
        ("gguf", [str(source_gguf), "--format", "gguf"]),
    ):
        if not (work / name).is_dir():  # an earlier run's output in --workdir is reused
            timings[f"apply_{name}_s"] = _cli(
                "apply", *args, "--direction", str(direction), "-o", str(work / name)
            )
    (edited_gguf,) = (work / "gguf").glob("*.gguf")
    sizes = {
        "source_gguf_bytes": source_gguf.stat().st_size,
        "edited_gguf_bytes": edited_gguf.stat().st_size,
        "safetensors_bytes": sum(p.stat().st_size for p in (work / "st").glob("*.safetensors")),
    }
    return {"direction": str(direction), "source_gguf": source_gguf, "edited_gguf": edited_gguf,
            "timings": {k: round(v, 1) for k, v in timings.items()}, "sizes": sizes}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="harmful evaluation prompts (50 bundled)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--direction", type=Path, help="a direction file (default: found on the demo)")
    parser.add_argument("--baselines", action="store_true", help="also the unedited model in both engines")
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) the outputs here")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gguf_client.json"))
    args = parser.parse_args()
    prompts = bundled("harmful", "eval")[: args.n]
    with tempfile.TemporaryDirectory(prefix="gguf_client-") as scratch:
        tmp = args.workdir or Path(scratch)
        made = _outputs(tmp, args.direction)
        tokenizer = load_model("demo", dtype="float32", device="cpu").tokenizer
        ids = tokenizer(format_chat(tokenizer, prompts), add_special_tokens=False)["input_ids"]
        tokens = args.max_new_tokens
        rows = {
            "transformers safetensors edit": _rate(*_torch_replies(str(tmp / "st"), prompts, tokens)),
            "llama.cpp GGUF edit": _rate(*_llama_replies(made["edited_gguf"], ids, tokens)),
        }
        if args.baselines:
            rows["transformers original"] = _rate(*_torch_replies("demo", prompts, args.max_new_tokens))
            rows["llama.cpp source GGUF"] = _rate(
                *_llama_replies(made["source_gguf"], ids, args.max_new_tokens)
            )
    judge_name = _refused().__name__
    report = {"judge": judge_name, "max_new_tokens": args.max_new_tokens, **made, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2, default=str), "utf-8")
    print(f"judge: {judge_name}; greedy, {args.max_new_tokens} new tokens; sizes {made['sizes']}; "
          f"times {made['timings']}")  # fmt: skip
    for name, row in rows.items():
        low, high = row["interval_95"]
        print(f"{name:32s} refused {row['refused']}/{row['n']} = {row['rate']:.2f} "
              f"[{low:.2f}, {high:.2f}]  ({row['generate_s']} s)")  # fmt: skip


if __name__ == "__main__":
    main()
