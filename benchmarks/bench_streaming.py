"""Benchmark ``stream_apply`` against ``cp -r`` on a synthetic llama-shaped bf16 checkpoint.

Writes a sharded checkpoint of about ``--gb`` GB (TinyLlama-like shapes: d_model 2048, MLP 5632, GQA,
vocab 32000; ``--short`` writes ~200 MB with smaller shapes) into a temporary directory, then times
``cp -r`` and ``stream_apply`` in both orders (cp first, then ours; ours first, then cp), each run in
its own process. ``stream_apply`` reports its peak RSS increase (VmHWM after a reset, so the parent's
peak does not leak in) against the largest shard. Nothing is dropped from the page cache: every run
reads a warm source, like the first ``cp`` that follows writing it.

Usage:
    python benchmarks/bench_streaming.py --gb 2
    python benchmarks/bench_streaming.py --short
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]

# (d_model, d_mlp, n_kv_heads * head_dim, vocab, shard size in bytes)
_SHAPES = {"full": (2048, 5632, 256, 32000, 500 << 20), "short": (1024, 2816, 256, 16000, 50 << 20)}

_CHILD = """
import json, resource, sys, time, torch
from pathlib import Path
from abliterate.edit.declared import DeclaredEdit
from abliterate.prove.certificate import certify_checkpoint
from abliterate.prove.structure import read_structure
from abliterate.ship.streaming import stream_apply

def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))

source, output, d_model, mode = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
direction = torch.randn(d_model, generator=torch.Generator().manual_seed(0))
read_structure(source)  # imports transformers' modeling code (~150 MB, once) before the baseline
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset VmHWM to the current RSS: the peak below is this call's own
baseline = status("VmRSS")
started = time.perf_counter()
if mode == "certify":
    certificate = certify_checkpoint(source, output, DeclaredEdit(direction), progress=False)
    assert certificate.passed, certificate.failures
    edited, total = certificate.n_edited, certificate.n_tensors
else:
    certify = mode == "apply+certify"
    report = stream_apply(source, DeclaredEdit(direction), output, progress=False, certify=certify)
    edited, total = report.tensors_edited, report.tensors_total
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "baseline": baseline, "peak": status("VmHWM"),
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "edited": edited, "total": total}))
"""

MODES = ("apply", "certify", "apply+certify")


def write_checkpoint(path: Path, target_bytes: int, shape: str) -> dict[str, float]:
    """Write a llama-shaped bf16 checkpoint of about ``target_bytes`` without instantiating a model.

    Returns:
        Its size, shard count, largest shard and the share of bytes the edit touches.
    """
    d_model, d_mlp, d_kv, vocab, shard_limit = _SHAPES[shape]
    per_layer = {
        "self_attn.q_proj.weight": (d_model, d_model),
        "self_attn.k_proj.weight": (d_kv, d_model),
        "self_attn.v_proj.weight": (d_kv, d_model),
        "self_attn.o_proj.weight": (d_model, d_model),
        "mlp.gate_proj.weight": (d_mlp, d_model),
        "mlp.up_proj.weight": (d_mlp, d_model),
        "mlp.down_proj.weight": (d_model, d_mlp),
        "input_layernorm.weight": (d_model,),
        "post_attention_layernorm.weight": (d_model,),
    }
    layer_bytes = 2 * sum(math.prod(s) for s in per_layer.values())
    n_layers = max(1, round((target_bytes - 4 * vocab * d_model) / layer_bytes))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d_model)}
    for layer in range(n_layers):
        shapes.update({f"model.layers.{layer}.{name}": s for name, s in per_layer.items()})
    shapes["model.norm.weight"] = (d_model,)
    shapes["lm_head.weight"] = (vocab, d_model)

    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor_shape in shapes.items():
        nbytes = 2 * math.prod(tensor_shape)
        if groups[-1] and size + nbytes > shard_limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    path.mkdir(parents=True)
    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=d_model // 64,
        num_key_value_heads=d_kv // 64,
        vocab_size=vocab,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    pattern = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(torch.bfloat16)
    weight_map: dict[str, str] = {}
    total = 0
    for number, names in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            numel = math.prod(shapes[name])
            tensors[name] = pattern.repeat(-(-numel // pattern.numel()))[:numel].reshape(shapes[name])
            weight_map[name] = file
            total += 2 * numel
        save_file(tensors, path / file, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    edited = sum(
        2 * math.prod(s)
        for n, s in shapes.items()
        if n.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight"))
    )
    shard_sizes = [p.stat().st_size for p in path.glob("*.safetensors")]
    return {
        "bytes": sum(shard_sizes),
        "shards": len(shard_sizes),
        "largest_shard": max(shard_sizes),
        "edited_share": edited / total,
        "layers": n_layers,
        "d_model": d_model,
    }


def time_cp(source: Path, destination: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(destination)], check=True)
    seconds = time.perf_counter() - started
    shutil.rmtree(destination)
    return seconds


def time_ours(source: Path, destination: Path, d_model: int, mode: str) -> dict[str, float]:
    """Run ``mode`` in a fresh process; ``certify`` reads ``destination`` (kept), the others write it."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(source), str(destination), str(d_model), mode],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured["process_seconds"] = time.perf_counter() - started
    if mode != "certify":
        shutil.rmtree(destination)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB (default 2)")
    parser.add_argument("--short", action="store_true", help="~200 MB with smaller shapes, for CI")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temporary files")
    parser.add_argument("--repeat", type=int, default=3, help="runs per order (default 3)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="what to time")
    args = parser.parse_args()
    target = int(0.2e9) if args.short else int(args.gb * 1e9)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-streaming-") as scratch:
        root = Path(scratch)
        source = root / "checkpoint"
        started = time.perf_counter()
        info = write_checkpoint(source, target, "short" if args.short else "full")
        write_seconds = time.perf_counter() - started
        gb = info["bytes"] / 1e9
        print(
            f"checkpoint: {gb:.2f} GB bf16, {info['layers']} layers, {info['shards']} shards, largest "
            f"{info['largest_shard'] / 2**20:.0f} MiB, edited share {info['edited_share']:.0%} "
            f"(written in {write_seconds:.1f} s)"
        )
        edited_copy = root / "edited"  # what ``certify`` reads: one apply, kept for every run
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from abliterate.ship.streaming import stream_apply; import torch;"
                "from abliterate.edit.declared import DeclaredEdit;"
                "stream_apply(sys.argv[1], DeclaredEdit(torch.randn(int(sys.argv[3]),"
                " generator=torch.Generator().manual_seed(0))), sys.argv[2], progress=False, certify=False)",
                str(source),
                str(edited_copy),
                str(info["d_model"]),
            ],
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        print(f"\nmedian of {args.repeat} runs per order (best in brackets); ratio = cp time / ours\n")
        print("| mode | order | cp -r (s) | ours (s) | cp GB/s | ours GB/s | throughput ours/cp |")
        print("|---|---|---:|---:|---:|---:|---:|")
        measured = []
        for mode in args.modes:
            runs: dict[str, list[tuple[float, dict[str, float]]]] = {"cp first": [], "ours first": []}
            target_dir = edited_copy if mode == "certify" else root / "ours"
            for _ in range(args.repeat):
                cp_seconds = time_cp(source, root / "cp")
                runs["cp first"].append((cp_seconds, time_ours(source, target_dir, info["d_model"], mode)))
                ours = time_ours(source, target_dir, info["d_model"], mode)
                runs["ours first"].append((time_cp(source, root / "cp"), ours))
            for order, pairs in runs.items():
                cp_times = [cp for cp, _ in pairs]
                ours_times = [ours["seconds"] for _, ours in pairs]
                ratios = [cp / ours["seconds"] for cp, ours in pairs]
                print(
                    f"| {mode} | {order} | {median(cp_times):.2f} ({min(cp_times):.2f}) | "
                    f"{median(ours_times):.2f} ({min(ours_times):.2f}) | {gb / median(cp_times):.2f} | "
                    f"{gb / median(ours_times):.2f} | {median(ratios):.2f} ({max(ratios):.2f}) |"
                )
                measured += [(mode, ours) for _, ours in pairs]
        print()
        print("| mode | peak RSS increase (max) | largest shard | ratio |")
        print("|---|---:|---:|---:|")
        for mode in args.modes:
            peak = max(ours["peak"] - ours["baseline"] for m, ours in measured if m == mode)
            print(
                f"| {mode} | {peak / 2**20:.0f} MiB | {info['largest_shard'] / 2**20:.0f} MiB | "
                f"{peak / info['largest_shard']:.2f} |"
            )
        first = measured[0][1]
        print(f"\ntensors edited {first['edited']} of {first['total']}")


if __name__ == "__main__":
    main()
