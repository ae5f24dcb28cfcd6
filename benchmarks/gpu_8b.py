"""An 8B Llama-config model in bf16 on one GPU, end to end: per-stage seconds and peak GPU memory.

Builds a randomly initialised Llama-3-8B-shaped model (hidden 4096, MLP 14336, 32 layers, 32 heads,
8 KV heads, rope_theta 500000; vocabulary = the demo tokenizer's, whose chat template it borrows)
directly on the device in bf16, saves it with ``save_pretrained`` (safetensors, 5 GB shards), then runs
in this process, through the CLI's own ``main``:

1. ``abliterate run MODEL --output OUT --dtype bfloat16 --device DEVICE --search none --no-progress``,
   with the pipeline's ``StageTimer`` wrapped so each stage also records its peak
   ``torch.cuda.max_memory_allocated`` (and its seconds survive a run the gate stops);
2. one tensor folded on the device and by the CPU kernel, each measured against the certificate's bound
   (the tensor the run's certificate rejected, if it rejected one);
3. ``cp -r`` of the checkpoint, then ``abliterate apply`` (streamed, with its certificate) of the run's
   direction to the same checkpoint: the throughput ratio;
4. ``abliterate verify MODEL OUT --direction … --json`` (certificate, completeness, logit parity) on the
   run's output, or on apply's when the run's gate stopped it; its certificate folds on the device;
5. the weight certificate alone on the same output, on the device and then on the host (the baseline:
   every GPU-folded tensor takes the host's float64 bounded path), each with its seconds, its host peak RSS
   and its peak GPU memory.

Host peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` before each step) is recorded per step.

A thread samples the device's used memory through NVML (what ``nvidia-smi`` shows) when
``pynvml`` is importable. Everything is written to ``--results`` as JSON after each step, so a run
stopped by a time limit still leaves what it measured. Steps 3–4 are skipped when ``--budget`` seconds
would not leave room for them.

A random model does not refuse: its refusal rates, KL and chosen direction mean nothing. The figures
this script is for are the times, the memory, and whether the gate and the certificate pass at this size.

Usage:
    python benchmarks/gpu_8b.py --tiny --device cpu     # the same path on a 4-layer model, on CPU
    PYTHONPATH=$PWD python3 benchmarks/gpu_8b.py --results $OUT/gpu_8b.json   # on the GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO_ROOT / ".gpu_bench" / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

# Meta-Llama-3-8B's config.json, less its vocabulary (the borrowed tokenizer's size is used instead).
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# The same code path on a model small enough for a CPU dry run.
TINY = {
    **LLAMA3_8B,
    "hidden_size": 64,
    "intermediate_size": 224,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


class Results:
    """A JSON file rewritten after every step, so a stopped run keeps what it measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        path.parent.mkdir(parents=True, exist_ok=True)

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=2, default=str))
        print(f"[gpu_8b] {key}: {json.dumps(value, default=str)}", flush=True)


class NvmlPeak:
    """Largest device memory in use (NVML, as ``nvidia-smi`` reports it), sampled every 50 ms."""

    def __init__(self) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
        except Exception as error:  # no NVML (CPU dry run, or no pynvml): report why, measure the rest
            self.unavailable = repr(error)
            return
        self.unavailable = None
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_mib = max(self.peak_mib, self._read())

    def take(self) -> float | None:
        """The peak since the last ``take`` (MiB), or ``None`` without NVML; starts a new window."""
        if self._thread is None:
            return None
        peak, self.peak_mib = max(self.peak_mib, self._read()), 0.0
        return round(peak, 1)


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


def cuda_peak_gib(device: str) -> float | None:
    return gib(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def reset_cuda(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def environment(device: str) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_total_gib"] = gib(torch.cuda.get_device_properties(0).total_memory)
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "--query-gpu=name,memory.total,driver_version"
            info["nvidia_smi"] = subprocess.run(
                [smi, query, "--format=csv,noheader"], capture_output=True, text=True, check=False
            ).stdout.strip()
    return info


def build_and_save(shape: dict[str, Any], device: str, model_dir: Path) -> dict[str, Any]:
    """A random bf16 Llama of ``shape``, made on ``device`` directly, saved to ``model_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        **shape,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    built_s = time.perf_counter() - started
    n_params = sum(parameter.numel() for parameter in model.parameters())
    started = time.perf_counter()
    model.save_pretrained(model_dir, max_shard_size="5GB")
    saved_s = time.perf_counter() - started
    for name in TOKENIZER_FILES[:3]:  # the run reads the tokenizer and its chat template from the model
        shutil.copy(TOKENIZER_DIR / name, model_dir / name)
    checkpoint_bytes = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    del model
    return {
        "parameters": n_params,
        "vocab_size": config.vocab_size,
        "build_s": round(built_s, 2),
        "save_pretrained_s": round(saved_s, 2),
        "checkpoint_gib": gib(checkpoint_bytes),
        "shards": len(list(model_dir.glob("*.safetensors"))),
    }


def cli(args: list[str]) -> tuple[int, float, str]:
    """Run ``abliterate ARGS`` in this process; its exit code, wall seconds and printed output."""
    from abliterate.cli import main

    print(f"[gpu_8b] $ abliterate {' '.join(args)}", flush=True)
    captured = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            main.main(args, prog_name="abliterate", standalone_mode=False)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    wall_s = round(time.perf_counter() - started, 2)
    print(captured.getvalue(), flush=True)
    return code, wall_s, captured.getvalue()


class StageProbe:
    """Wraps the pipeline's ``StageTimer`` while installed: every stage also records its peak allocated
    GPU memory (GiB), the timer's seconds are kept even when the run stops with an error (a failed run
    writes no manifest), and the direction handed to the ``edit`` stage is kept for the later steps."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peaks: dict[str, float] = {}
        self.timer: Any = None
        self.chosen: Any = None

    def __enter__(self) -> StageProbe:
        from abliterate.pipeline import run as pipeline

        self._original = original = pipeline.StageTimer.__call__
        probe, cuda = self, self.device.startswith("cuda")

        def traced(timer: Any, name: str, stage: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            probe.timer = timer
            if name == "edit":
                probe.chosen = args[1]  # fold(subject, chosen)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                return original(timer, name, stage, *args, **kwargs)
            finally:
                if cuda:
                    peak = gib(torch.cuda.max_memory_allocated())
                    probe.peaks[name] = max(probe.peaks.get(name, 0.0), peak)

        pipeline.StageTimer.__call__ = traced
        return self

    def __exit__(self, *exc: object) -> None:
        from abliterate.pipeline import run as pipeline

        pipeline.StageTimer.__call__ = self._original


def layout_of(name: str) -> str:
    return "embedding" if "embed_tokens" in name else "linear"


def diagnose(model_dir: Path, name: str, direction: torch.Tensor, device: str) -> dict[str, Any]:
    """Fold one source tensor on ``device`` and on the CPU kernel, and measure both against the
    certificate's bound (1 ulp of the exact float64 fold + float32 working precision); report the worst
    element of the device fold with the quantities the bound is made of."""
    from safetensors import safe_open

    from abliterate.edit.kernel import orthogonalize_, ulp
    from abliterate.io.safetensors import find_shards
    from abliterate.prove.bounds import WORKING_PRECISION, TensorFold, exact_fold, worst_bound_ratio

    shards, index = find_shards(model_dir)
    shard = index["weight_map"][name] if index else shards[0]
    with safe_open(str(model_dir / shard), "pt") as handle:
        source = handle.get_tensor(name)
    layout = layout_of(name)
    on_device = source.to(device, copy=True)  # a copy on the CPU too: the fold is in place
    orthogonalize_(on_device, direction, layout)
    device_fold = on_device.cpu()
    del on_device
    cpu_fold = source.clone()
    orthogonalize_(cpu_fold, direction, layout)
    exact = exact_fold(source, TensorFold(direction, layout))
    wide = source.to(torch.float64)
    bound = ulp(exact, source.dtype) + WORKING_PRECISION * (wide.abs() + (wide - exact).abs())
    ratio = (device_fold.to(torch.float64) - exact).abs() / bound
    row, column = divmod(int(ratio.argmax()), source.shape[1])
    r = direction.to(torch.float64) / direction.to(torch.float64).norm()
    if layout == "linear":  # W' = W − r̂ (r̂ᵀ W): p_j = r̂ᵀ w_j over the column, r_i the row's entry
        p, r_i, terms = float(r @ wide[:, column]), float(r[row]), float((r * wide[:, column]).abs().sum())
    else:  # W' = W − (W r̂) r̂ᵀ: p_i = w_iᵀ r̂ over the row, r_j the column's entry
        p, r_i, terms = float(wide[row] @ r), float(r[column]), float((wide[row] * r).abs().sum())
    return {
        "tensor": name,
        "shape": list(source.shape),
        "device_fold_bound_ratio": round(
            worst_bound_ratio(source, exact, device_fold, TensorFold(direction, layout)), 4
        ),
        "cpu_fold_bound_ratio": round(
            worst_bound_ratio(source, exact, cpu_fold, TensorFold(direction, layout)), 4
        ),
        "device_fold_old_bound_ratio": round(float(ratio.max()), 4),
        "elements_device_ne_cpu": int((device_fold != cpu_fold).sum()),
        "worst": {
            "index": [row, column],
            "w": float(wide[row, column]),
            "exact": float(exact[row, column]),
            "device": float(device_fold[row, column]),
            "cpu": float(cpu_fold[row, column]),
            "bound": float(bound[row, column]),
            "p": p,
            "r_entry": r_i,
            "sum_abs_terms_of_p": terms,
        },
    }


def host_peak_gib(reset: bool = True) -> float | None:
    """This process's peak RSS since the last reset (``VmHWM``), then reset it to the current RSS."""
    try:
        with open("/proc/self/status") as handle:
            peak = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return gib(peak)


def certificate_alone(model_dir: Path, edited_dir: Path, direction_file: Path, device: str) -> dict[str, Any]:
    """The weight certificate of ``edited_dir`` folded on ``device``, then on the host (the baseline)."""
    from abliterate.prove.certificate import certify_checkpoint
    from abliterate.prove.refold import certificate_device
    from abliterate.ship.direction_file import declared_from_file, load_direction

    direction, metadata = load_direction(direction_file)
    declared = declared_from_file(direction, metadata)
    measured: dict[str, Any] = {}
    for label, where in (("device", certificate_device(device)), ("host_baseline", None)):
        reset_cuda(device)
        host_peak_gib()
        started = time.perf_counter()
        verdict = certify_checkpoint(model_dir, edited_dir, declared, progress=False, device=where)
        measured[label] = {
            "device": str(where or "host"),
            "seconds": round(time.perf_counter() - started, 2),
            "passed": verdict.passed,
            "n_exact": verdict.n_exact,
            "n_bounded": verdict.n_bounded,
            "n_unchanged": verdict.n_unchanged,
            "host_peak_rss_gib": host_peak_gib(),
            "peak_allocated_gib": cuda_peak_gib(device),
        }
    return measured


def timed_command(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return round(time.perf_counter() - started, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="4 layers, hidden 64: a dry run of the same path")
    parser.add_argument("--device", default="cuda", help="where the model is built and run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpu_8b"), help="checkpoints go here")
    parser.add_argument("--results", type=Path, default=Path("gpu_8b.json"), help="JSON, rewritten per step")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later steps skip beyond it")
    parser.add_argument("--run-args", default="", help="extra flags for `abliterate run`, one string")
    options = parser.parse_args()

    started = time.perf_counter()
    results = Results(options.results)
    device = options.device
    results["environment"] = environment(device)
    if options.workdir.exists():
        shutil.rmtree(options.workdir)
    options.workdir.mkdir(parents=True)
    results["disk_free_gib_at_start"] = gib(shutil.disk_usage(options.workdir).free)
    model_dir, out_dir = options.workdir / "model", options.workdir / "abliterated"
    applied_dir = options.workdir / "applied"
    nvml = NvmlPeak()

    # Build and save the model, then free the device before the run.
    reset_cuda(device)
    built = build_and_save(TINY if options.tiny else LLAMA3_8B, device, model_dir)
    built["peak_allocated_gib"] = cuda_peak_gib(device)
    built["nvml_peak_mib"] = nvml.take()
    results["model"] = built
    reset_cuda(device)
    nvml.take()

    # abliterate run, in process, with every stage's seconds and peak GPU memory.
    run_args = ["run", str(model_dir), "--output", str(out_dir), "--dtype", "bfloat16", "--device", device]
    # A random model cannot refuse, so the paper's candidate filters (KL ≤ 0.1, steering above the
    # unsteered score) may reject every candidate and stop the run. Opened wide, they let the selection
    # stage run to completion and be timed; the direction it picks means nothing here.
    run_args += ["--max-kl", "1e6", "--min-steering", "-1e6"]
    run_args += ["--search", "none", "--no-progress", *options.run_args.split()]
    host_peak_gib()
    with StageProbe(device) as probe:
        code, wall_s, printed = cli(run_args)
    run: dict[str, Any] = {"command": "abliterate " + " ".join(run_args), "exit_code": code, "wall_s": wall_s}
    run["host_peak_rss_gib"] = host_peak_gib()
    if code != 0:
        run["error"] = printed.strip().splitlines()[-1] if printed.strip() else ""
    run["timings"] = probe.timer.timings() if probe.timer is not None else None
    run["stage_peak_allocated_gib"] = probe.peaks
    run["peak_allocated_gib"] = max(probe.peaks.values(), default=None)
    run["nvml_peak_mib"] = nvml.take()
    manifest_path = out_dir / "abliterate.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        shutil.copy(manifest_path, options.results.parent / "abliterate.json")
        run["timings"] = manifest.get("timings")
        run["gate"] = manifest.get("gate")
        run["peak_rss_mib"] = manifest.get("peak_rss_mib")
    chosen = probe.chosen
    if chosen is not None:
        run["direction"] = {"layer": chosen.layer, "position": chosen.position}
    results["run"] = run
    reset_cuda(device)
    if chosen is None:
        sys.exit(f"abliterate run stopped before the edit (exit code {code})")
    direction = chosen.direction.detach().float().cpu()

    # 2. One tensor folded on the device and on the CPU kernel, against the certificate's bound: the
    # tensor the run's certificate rejected, if any, else the chosen layer's MLP down-projection.
    failed = re.search(r"fail the certificate: (\S+) \(", printed)
    name = failed.group(1) if failed else f"model.layers.{chosen.layer}.mlp.down_proj.weight"
    results["fold_check"] = diagnose(model_dir, name, direction, device)
    reset_cuda(device)

    # The later steps need a direction file: the run's, or (when its gate stopped it, writing nothing)
    # the direction it folded, written the same way.
    direction_file = out_dir / "direction.safetensors"
    if not direction_file.exists():
        direction_file = options.workdir / "direction.safetensors"
        from abliterate.ship.direction_file import save_direction

        save_direction(direction_file, direction, chosen.layer, chosen.position, str(model_dir))

    # 3. cp -r against the streamed apply with its certificate (CPU work; same warm page cache for both).
    if time.perf_counter() - started < options.budget - 150:
        copy_dir = options.workdir / "copy"
        cp_s = timed_command(["cp", "-r", str(model_dir), str(copy_dir)])
        shutil.rmtree(copy_dir)
        apply_args = [
            "apply",
            str(model_dir),
            "--direction",
            str(direction_file),
            "--output",
            str(applied_dir),
        ]
        code, apply_s, _ = cli(apply_args)
        results["apply"] = {
            "command": "abliterate " + " ".join(apply_args),
            "exit_code": code,
            "apply_with_certificate_s": apply_s,
            "cp_r_s": cp_s,
            "throughput_vs_cp": round(cp_s / apply_s, 3),
        }
    else:
        results["apply"] = "skipped: budget"

    # 4. verify the run's output (or, when the run saved nothing, apply's) against the source on the
    # device: certificate, completeness, logit parity.
    edited_dir = out_dir if manifest_path.exists() else applied_dir
    if edited_dir.exists() and time.perf_counter() - started < options.budget - 90:
        reset_cuda(device)
        nvml.take()
        verify_args = ["verify", str(model_dir), str(edited_dir), "--direction", str(direction_file)]
        verify_args += ["--device", device, "--no-progress", "--json"]
        host_peak_gib()
        code, verify_s, printed = cli(verify_args)
        verify_rss = host_peak_gib()
        try:
            report: Any = json.loads(printed)
        except json.JSONDecodeError:
            report = printed[-4000:]
        results["verify"] = {
            "command": "abliterate " + " ".join(verify_args),
            "exit_code": code,
            "wall_s": verify_s,
            "host_peak_rss_gib": verify_rss,
            "peak_allocated_gib": cuda_peak_gib(device),
            "nvml_peak_mib": nvml.take(),
            "report": report,
        }
    else:
        results["verify"] = "skipped: budget or nothing to verify"

    # 5. the certificate alone, on the device and on the host (the baseline), on the same output.
    if edited_dir.exists() and time.perf_counter() - started < options.budget - 150:
        results["certificate_alone"] = certificate_alone(model_dir, edited_dir, direction_file, device)
    else:
        results["certificate_alone"] = "skipped: budget or nothing to certify"
    results["total_s"] = round(time.perf_counter() - started, 1)
    results["nvml"] = nvml.unavailable or "sampled every 50 ms"
    shutil.rmtree(options.workdir)


if __name__ == "__main__":
    main()
