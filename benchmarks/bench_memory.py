"""Peak resident memory of ``abliterate run`` against the bound 2 × the model in its working dtype + 2 GiB.

Each case runs ``abliterate run`` in a fresh process under ``/usr/bin/time -v`` (its "Maximum resident
set size" is the figure) and prints the per-stage peaks of the run's manifest (``memory``). Cases:

- ``demo``: the embedded demo model (its float32 safetensors cache).
- ``demo-gguf``: the demo's Q4_K_M GGUF file itself as the source (0.5B parameters).
- ``synthetic``: a Qwen2-shaped GGUF built here (default 1.54B parameters: hidden 1536, 28 layers,
  intermediate 8960, vocabulary 151,936, tied embeddings; random weights, 2-D tensors Q8_0), written
  tensor by tensor with gguf-py's ``GGUFWriter`` and the tiny test tokenizer padded to the vocabulary.

A GGUF run works in float32 (the fold is computed from the dequantized weights, the output cast once),
so its working size is 4 bytes per parameter. Each case runs ``--direction-only`` (load + extract +
hooked check) and, with ``--full``, a full save run (load + extract + fold + gate + save + certificate);
``--defaults`` instead runs once with the run's defaults (the search and the before/after evaluation on).

    PYTHONPATH=$PWD python benchmarks/bench_memory.py --cases demo demo-gguf --full
    PYTHONPATH=$PWD python benchmarks/bench_memory.py --cases synthetic --full --workdir /tmp/bench_memory
    PYTHONPATH=$PWD python benchmarks/bench_memory.py --cases demo --defaults    # as a user types it
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
RUN_FLAGS = ["--layer", "12", "--position", "-1", "--no-evaluate", "--search", "none", "--no-progress"]
PROMPTS = ["--n-train", "8", "--n-val", "4"]


@dataclass(frozen=True)
class Shape:
    """A Qwen2-shaped decoder (tied embeddings, q/k/v biases)."""

    hidden: int = 1536
    layers: int = 28
    intermediate: int = 8960
    vocab: int = 151_936
    heads: int = 12
    kv_heads: int = 2

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(GGUF name, numpy shape [out, in])`` of every tensor, in file order."""
        kv = self.hidden // self.heads * self.kv_heads
        named: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            block = f"blk.{i}"
            named += [
                (f"{block}.attn_norm.weight", (self.hidden,)),
                (f"{block}.attn_q.weight", (self.hidden, self.hidden)),
                (f"{block}.attn_q.bias", (self.hidden,)),
                (f"{block}.attn_k.weight", (kv, self.hidden)),
                (f"{block}.attn_k.bias", (kv,)),
                (f"{block}.attn_v.weight", (kv, self.hidden)),
                (f"{block}.attn_v.bias", (kv,)),
                (f"{block}.attn_output.weight", (self.hidden, self.hidden)),
                (f"{block}.ffn_norm.weight", (self.hidden,)),
                (f"{block}.ffn_gate.weight", (self.intermediate, self.hidden)),
                (f"{block}.ffn_up.weight", (self.intermediate, self.hidden)),
                (f"{block}.ffn_down.weight", (self.hidden, self.intermediate)),
            ]
        return [*named, ("output_norm.weight", (self.hidden,))]

    def parameters(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.tensors())


def write_synthetic_gguf(path: Path, shape: Shape, qtype: str = "Q8_0", seed: int = 0) -> Path:
    """Write a random Qwen2-shaped model with the tiny test tokenizer as ``path``, one tensor at a time
    (gguf-py's ``add_tensor`` would hold every tensor until the end)."""
    import gguf

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_gguf import write_tokenizer

    quantized = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    writer.add_block_count(shape.layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(shape.vocab)
    write_tokenizer(writer, shape.vocab)
    for name, dims in shape.tensors():
        if len(dims) == 1:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), 4 * dims[0])
        else:
            block, size = gguf.GGML_QUANT_SIZES[quantized]
            nbytes = dims[0] * dims[1] // block * size
            writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes, quantized)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, dims in shape.tensors():
        if len(dims) == 1:
            ones = name.endswith("norm.weight")
            values = np.ones(dims, np.float32) if ones else rng.standard_normal(dims, np.float32) * 0.02
            writer.write_tensor_data(values)
            continue
        rows = max(1, (1 << 24) // dims[1])  # quantize 64 MiB of float32 at a time
        chunks = ((min(rows, dims[0] - r), dims[1]) for r in range(0, dims[0], rows))
        packed = [gguf.quants.quantize(rng.standard_normal(c, np.float32) * 0.02, quantized) for c in chunks]
        writer.write_tensor_data(np.concatenate(packed))
    writer.close()
    return path


def measure(source: str, output: Path, *extra: str, defaults: bool = False) -> dict:
    """Run ``abliterate run source`` in a fresh process under ``/usr/bin/time -v``; its peak RSS and the
    manifest's per-stage memory. ``defaults``: the run as a user types it (search and evaluation on)."""
    flags = ["--no-progress"] if defaults else [*RUN_FLAGS, *PROMPTS]
    command = [sys.executable, "-m", "abliterate.cli", "run", source, "-o", str(output), *flags]
    command += list(extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    begin = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - begin
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-6000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"run failed ({done.returncode}): {' '.join(command)}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    manifest = json.loads((output / "abliterate.json").read_text())
    return {"command": " ".join(command), "seconds": seconds, "peak": peak_kib * 1024, "manifest": manifest}


def report(case: str, working_bytes: int, result: dict) -> None:
    bound = 2 * working_bytes + 2 * GIB
    peak = result["peak"]
    verdict = "within" if peak <= bound else "OVER"
    print(f"\n## {case}: peak RSS {peak / GIB:.2f} GiB, bound {bound / GIB:.2f} GiB ({verdict}); ", end="")
    print(f"model {working_bytes / GIB:.2f} GiB in its working dtype; {result['seconds']:.0f} s")
    print(f"   {result['command']}")
    for stage, figures in result["manifest"].get("memory", {}).get("stages", {}).items():
        print(
            f"   {stage:9s} peak {figures['peak_rss_mib'] / 1024:6.2f} GiB  "
            f"growth {figures['growth_mib'] / 1024:6.2f} GiB  end {figures['end_rss_mib'] / 1024:6.2f} GiB"
        )


def gguf_parameters(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(tensor.n_elements) for tensor in GGUFReader(str(path)).tensors)


def run_case(case: str, source: str, working_bytes: int, workdir: Path, runs: list[str]) -> None:
    """Each of ``runs`` (``direction``, ``full``, ``defaults``) of ``case``, measured and reported."""
    labels = {
        "direction": f"{case} --direction-only",
        "full": f"{case} full run (fold, gate, save, certificate)",
        "defaults": f"{case} default run (search, evaluation)",
    }
    for run in runs:
        output = workdir / f"{case}-{run}"
        if run == "direction":
            result = measure(source, output, "--direction-only")
        else:
            result = measure(source, output, defaults=run == "defaults")
        report(labels[run], working_bytes, result)
        shutil.rmtree(output)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--cases", nargs="+", choices=["demo", "demo-gguf", "synthetic"], default=["demo"])
    parser.add_argument("--full", action="store_true", help="also a full save run per case")
    parser.add_argument("--only-full", action="store_true", help="only the full save run per case")
    parser.add_argument("--workdir", type=Path, default=None, help="where the GGUF and outputs go (removed)")
    parser.add_argument(
        "--defaults", action="store_true", help="one run with the run's defaults (search and evaluation on)"
    )
    parser.add_argument("--layers", type=int, default=Shape.layers)
    parser.add_argument("--qtype", default="Q8_0", help="GGML type of the synthetic 2-D tensors")
    args = parser.parse_args()
    if args.defaults:
        runs = ["defaults"]
    else:
        runs = ([] if args.only_full else ["direction"]) + (["full"] if args.full or args.only_full else [])
    sys.stdout.reconfigure(line_buffering=True)  # each figure as it is measured, also into a file
    workdir = Path(tempfile.mkdtemp(prefix="bench_memory-", dir=args.workdir))
    try:
        for case in args.cases:
            if case == "demo":
                from abliterate.model.demo import converted_demo_dir

                weights = converted_demo_dir() / "model.safetensors"
                run_case(case, "demo", weights.stat().st_size, workdir, runs)
            elif case == "demo-gguf":
                from abliterate.model.demo import assemble_gguf

                gguf = assemble_gguf()
                run_case(case, str(gguf), 4 * gguf_parameters(gguf), workdir, runs)
            else:
                shape = Shape(layers=args.layers)
                begin = time.perf_counter()
                gguf = write_synthetic_gguf(workdir / "synthetic.gguf", shape, args.qtype)
                print(
                    f"built {gguf.name}: {shape.parameters() / 1e9:.2f}B parameters, {args.qtype}, "
                    f"{gguf.stat().st_size / GIB:.2f} GiB in {time.perf_counter() - begin:.0f} s"
                )
                run_case(case, str(gguf), 4 * shape.parameters(), workdir, runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
