"""Benchmark streaming ``apply`` and the weight certificate against ``cp -r`` on a synthetic bf16 checkpoint.

Writes a sharded llama-shaped checkpoint of about ``--gb`` GB (TinyLlama-like shapes: d_model 2048, MLP
5632, GQA, vocab 32000; ``--short`` writes ~200 MB with smaller shapes), then times three modes, each in a
fresh process, in alternating rounds with ``cp -r`` of the same checkpoint (even rounds cp first, odd rounds
ours first):

* ``apply``: ``stream_apply`` as users run it, certifying what it wrote (the default);
* ``apply --no-certify``: the same without the certificate;
* ``certificate``: the certificate alone, as ``verify --no-forward`` runs it (``certify_checkpoint`` of
  an edited copy against the original, then the companion files).

Each round's ratio is ``cp seconds / ours seconds`` (the same bytes, so the throughput ratio); the table
gives the median over rounds with the range. ``cached`` rounds read a warm page cache; ``dropped`` rounds
first evict both checkpoints from the page cache (``posix_fadvise(DONTNEED)`` on every file after an
``fdatasync``; ``/proc/sys/vm/drop_caches`` with ``--drop-all`` where permitted), so both tools read the
disk. With ``--sync`` each tool's time includes an ``os.sync()`` after it, so what ``cp -r`` and ``apply``
wrote is on the disk (the case of a checkpoint larger than RAM). Peak RSS of every run is the child's own:
its high-water mark over the whole process (``VmHWM``) and the increase over its RSS once everything is
imported (reset with ``/proc/self/clear_refs``), the figure bounded by the largest shard. The load average
is printed beside each mode (the machine may be shared).

Usage:
    python benchmarks/bench_streaming.py --gb 2 --rounds 5
    python benchmarks/bench_streaming.py --short --rounds 2
    git worktree add /tmp/before OLD && python benchmarks/bench_streaming.py --tree /tmp/before   # a baseline
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
import json, sys, time, torch
from pathlib import Path
from abliterate.edit.declared import DeclaredEdit
from abliterate.prove.certificate import certify_checkpoint
from abliterate.prove.files import compare_companions
from abliterate.prove.structure import read_structure
from abliterate.ship.streaming import stream_apply

def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))

source, output, d_model, mode = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
direction = torch.randn(d_model, generator=torch.Generator().manual_seed(0))
read_structure(source)  # imports transformers' modeling code (~150 MB, once) before the baseline
imports_peak = status("VmHWM")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset VmHWM to the current RSS: the peak below is this call's own
baseline = status("VmRSS")
started = time.perf_counter()
if mode == "certificate":
    certificate = certify_checkpoint(source, output, DeclaredEdit(direction), progress=False)
    assert certificate.passed, certificate.failures
    assert compare_companions(source, output).passed
    edited, total = certificate.n_edited, certificate.n_tensors
else:
    certify = mode == "apply"
    report = stream_apply(source, DeclaredEdit(direction), output, progress=False, certify=certify)
    edited, total = report.tensors_edited, report.tensors_total
seconds = time.perf_counter() - started
peak = status("VmHWM")
print(json.dumps({"seconds": seconds, "baseline": baseline, "peak": peak,
                  "process_peak": max(peak, imports_peak), "edited": edited, "total": total}))
"""

# Writes the edited copy that ``certificate`` rounds read.
_KEEP = (
    "import sys, torch; from abliterate.ship.streaming import stream_apply;"
    "from abliterate.edit.declared import DeclaredEdit;"
    "direction = torch.randn(int(sys.argv[3]), generator=torch.Generator().manual_seed(0));"
    "stream_apply(sys.argv[1], DeclaredEdit(direction), sys.argv[2], progress=False, certify=False)"
)

MODES = ("apply", "apply --no-certify", "certificate")

# With ``--tree``: the abliterate package the children import instead of this checkout's (the editable
# install's import hook would otherwise win over PYTHONPATH).
_TREE: list[Path] = []


def _child(code: str) -> str:
    if not _TREE:
        return code
    hook = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]"
    return f"{hook}; sys.path.insert(0, {str(_TREE[0])!r})\n{code}"


CACHES = ("cached", "dropped")


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


def drop_from_cache(paths: list[Path], everything: bool) -> str:
    """Evict every file under ``paths`` from the page cache; return how."""
    if everything:
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1")
            return "drop_caches"
        except OSError:
            pass
    for root in paths:
        for file in [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]:
            descriptor = os.open(file, os.O_RDONLY)
            try:
                os.fdatasync(descriptor)  # dirty pages are not dropped: write them first
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)
    return "posix_fadvise(DONTNEED)"


def time_cp(source: Path, destination: Path, flush: bool = False) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(destination)], check=True)
    if flush:
        os.sync()  # the copy is on the disk, as it must be when the checkpoint is larger than RAM
    seconds = time.perf_counter() - started
    shutil.rmtree(destination)
    return seconds


def time_ours(
    source: Path, destination: Path, d_model: int, mode: str, flush: bool = False
) -> dict[str, float]:
    """Run ``mode`` in a fresh process; ``certificate`` reads ``destination`` (kept), the others write it.

    With ``flush``, the time of an ``os.sync()`` right after the process is added to ``seconds``.
    """
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _child(_CHILD), str(source), str(destination), str(d_model), mode],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured["process_seconds"] = time.perf_counter() - started
    if flush:
        clock = time.perf_counter()
        os.sync()
        measured["seconds"] += time.perf_counter() - clock
    if mode != "certificate":
        shutil.rmtree(destination)
    return measured


def run_rounds(
    root: Path, info: dict, mode: str, cache: str, rounds: int, drop_all: bool, flush: bool = False
) -> list[tuple[float, dict]]:
    """``rounds`` pairs of (cp seconds, our measurement), alternating which runs first."""
    source, edited = root / "checkpoint", root / "edited"
    target = edited if mode == "certificate" else root / "ours"
    pairs = []
    for number in range(rounds):
        times: dict[str, object] = {}
        for tool in ("cp", "ours") if number % 2 == 0 else ("ours", "cp"):
            if cache == "dropped":
                drop_from_cache([source, edited], drop_all)
            if tool == "cp":
                times["cp"] = time_cp(source, root / "cp", flush)
            else:
                times["ours"] = time_ours(source, target, info["d_model"], mode, flush)
        pairs.append((times["cp"], times["ours"]))
    return pairs


def report(mode: str, cache: str, pairs: list[tuple[float, dict]], info: dict, load: tuple) -> None:
    ratios = [cp / ours["seconds"] for cp, ours in pairs]
    cp_times = [cp for cp, _ in pairs]
    ours_times = [ours["seconds"] for _, ours in pairs]
    increase = max(ours["peak"] - ours["baseline"] for _, ours in pairs)
    process = max(ours["process_peak"] for _, ours in pairs)
    gb = info["bytes"] / 1e9
    print(
        f"| {mode} | {cache} | **{median(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f}) | "
        f"{median(cp_times):.2f} ({gb / median(cp_times):.2f}) | {median(ours_times):.2f} "
        f"({gb / median(ours_times):.2f}) | {len(pairs)} | {increase / 2**20:.0f} MiB "
        f"({increase / info['largest_shard']:.2f}) | {process / 2**30:.2f} GiB | "
        f"{load[0]:.1f}-{load[1]:.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB (default 2)")
    parser.add_argument("--short", action="store_true", help="~200 MB with smaller shapes, for CI")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temporary files")
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds per mode and cache (default 5)"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="what to time")
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES, help="page cache states")
    parser.add_argument("--drop-all", action="store_true", help="try /proc/sys/vm/drop_caches first")
    parser.add_argument(
        "--sync",
        action="store_true",
        help="count an os.sync() after each tool in its time (written bytes on the disk, as for a "
        "checkpoint larger than RAM, where cp -r cannot leave its copy in the page cache)",
    )
    parser.add_argument(
        "--tree",
        type=Path,
        default=None,
        help="time the abliterate package of this source tree (e.g. a `git worktree` of an older commit)",
    )
    args = parser.parse_args()
    if args.tree is not None:
        _TREE.append(args.tree.resolve())
    target = int(0.2e9) if args.short else int(args.gb * 1e9)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-streaming-") as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        info = write_checkpoint(root / "checkpoint", target, "short" if args.short else "full")
        print(
            f"checkpoint: {info['bytes'] / 1e9:.2f} GB bf16, {info['layers']} layers, "
            f"{info['shards']} shards, "
            f"largest {info['largest_shard'] / 2**20:.0f} MiB, edited share {info['edited_share']:.0%} "
            f"(written in {time.perf_counter() - started:.1f} s); {os.cpu_count()} CPUs, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
        )
        subprocess.run(  # the edited copy the certificate reads, kept for every round
            [
                sys.executable,
                "-c",
                _child(_KEEP),
                str(root / "checkpoint"),
                str(root / "edited"),
                str(info["d_model"]),
            ],
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        if "dropped" in args.caches:
            print(f"page cache dropped by {drop_from_cache([root / 'checkpoint'], args.drop_all)}")
        print(
            f"\nratio = cp -r seconds / ours, median of {args.rounds} alternating rounds (range); seconds "
            "median (GB/s); RSS: peak increase over the imported process (share of the largest shard), "
            "whole process peak\n"
        )
        print(
            "| mode | page cache | ours / cp | cp -r s (GB/s) | ours s (GB/s) | rounds | peak RSS increase "
            "| process peak RSS | load avg |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for cache in args.caches:
            for mode in args.modes:
                before = os.getloadavg()[0]
                pairs = run_rounds(root, info, mode, cache, args.rounds, args.drop_all, args.sync)
                report(mode, cache, pairs, info, (before, os.getloadavg()[0]))
        first = pairs[0][1]
        print(f"\ntensors edited {first['edited']} of {first['total']}")


if __name__ == "__main__":
    main()
