"""The edit as an exact PEFT LoRA adapter, per registered model type.

For every registered model type: the tiny random model of ``tests/tiny.py`` (4 blocks, d_model 64), a random
orthonormal rank-2 subspace (second direction at weight 0.4) with a strength profile over the blocks, and
chat-templated prompts from the bundled harmless evaluation set. Two edits: the embedding at strength 1, and
the same edit leaving the embedding alone (what a searched point may choose). Reported per type and edit:

- supported, or the one-line refusal (which writer peft cannot express);
- fp32: max |Δlogit| / max |logit| of ``PeftModel.from_pretrained`` on the original against the hooked
  original; *control*: the same adapter against the edit without its second direction (must fail);
- bf16 (embedding edit): the model cast to bf16, adapter written and compared as the gate does in 16-bit:
  trimmed mean KL against the limit from the measured rounding floor;
- the adapter's size and how it targets the writers (modules, parameters).

With ``--shapes-of DIR`` (default: the demo checkpoint in abliterate's cache, if present) it also computes
the size of rank-1 and rank-2 adapters for that checkpoint from its writer shapes on the meta device (no
weights loaded), with the formula checked against the files written for the tiny models.

Usage:
    python benchmarks/lora_by_family.py [--prompts 4] [--output benchmarks/lora_by_family.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from tiny import make_model, make_tokenizer  # noqa: E402

from abliterate.adapters import resolve_adapter  # noqa: E402
from abliterate.adapters.registry import registered_model_types  # noqa: E402
from abliterate.adapters.resolve import residual_writers  # noqa: E402
from abliterate.adapters.spec import FUSED_LAYOUTS  # noqa: E402
from abliterate.edit.declared import DeclaredEdit  # noqa: E402
from abliterate.find.point import EditPoint, declared_edit  # noqa: E402
from abliterate.model.batching import encode  # noqa: E402
from abliterate.prove.lora_parity import peft_parity  # noqa: E402
from abliterate.ship.lora import adapter_size, describe, write_lora  # noqa: E402

COMMAND = "python benchmarks/lora_by_family.py"
POINT = EditPoint(
    layer=1.0, position=-1, attention=1.2, mlp=0.7, peak=1.0, width=3.0, second=-2, second_weight=0.4
)
EDITS = {"embedding 1": POINT, "embedding 0": EditPoint(**{**POINT.__dict__, "embedding": 0.0})}
DEMO_CACHE = Path.home() / ".cache" / "abliterate" / "demo" / "safetensors"


def _prompts(count: int) -> object:
    texts = json.loads((REPO_ROOT / "abliterate" / "data" / "harmless_eval.json").read_text())[:count]
    return encode(make_tokenizer(), texts, batch_size=max(count, 1), share_prefix=False)


def _basis(d_model: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(d_model, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    )
    return q.T.contiguous().float()


def _edit(model: torch.nn.Module, adapter: object, point: EditPoint, prompts: object, dtype: str) -> dict:
    """Write the adapter of ``point`` for ``model`` and check it through peft (or record the refusal)."""
    basis = _basis(model.get_input_embeddings().weight.shape[1])
    declared = declared_edit(basis, point, model.config.num_hidden_layers)
    with tempfile.TemporaryDirectory() as directory:
        try:
            write_lora(model, adapter, declared, directory, base_model="tiny")
        except ValueError as error:
            return {"refused": str(error)}
        report = peft_parity(model, adapter, declared, directory, prompts, dtype)
        row = {
            "passed": report.passed,
            "rel": report.max_abs_logit_diff / report.logit_scale,
            "trimmed_kl": report.trimmed_mean_kl,
            "kl_limit": report.mean_kl_limit,
            "bytes": adapter_size(directory),
        }
        config = describe(directory)
        row["modules"] = len(config["target_modules"])
        row["parameters"] = len(config.get("target_parameters") or ())
        if dtype == "float32":
            first_only = DeclaredEdit(basis[0], declared.strengths, 1.0, declared.layer_strengths)
            control = peft_parity(model, adapter, first_only, directory, prompts, dtype)
            row["control_rel"] = control.max_abs_logit_diff / control.logit_scale
            row["control_passed"] = control.passed
            row["predicted_bytes"] = tensor_bytes(model, adapter, 2, point.embedding != 0)
    return row


def tensor_bytes(model: torch.nn.Module, adapter: object, rank: int, embedding: bool = True) -> int:
    """float32 bytes of a rank-``rank`` adapter's tensors, from the writers' shapes alone (no header).

    Per writer ``k (d_in + d_model)`` values (an embedding: ``k (vocab + d_model)``; fused experts
    ``k E (d_in + d_model)``), plus ``d_model`` per writer for ``lora_bias`` when any writer has a bias.
    """
    elements, biased, writers = 0, False, 0
    for writer in residual_writers(model, adapter):
        if writer.layout == "embedding" and not embedding:
            continue
        shape = writer.weight_tensor().shape
        if writer.layout in FUSED_LAYOUTS:
            elements += rank * shape[0] * (shape[1] + shape[2])
        else:
            elements += rank * (shape[0] + shape[1])
        biased |= writer.bias_tensor() is not None
        writers += writer.layout != "embedding"
    d_model = model.get_input_embeddings().weight.shape[1]
    return 4 * (elements + (d_model * writers if biased else 0))


def measure(model_type: str, prompts: object) -> dict:
    """The LoRA numbers of one model type (see the module docstring)."""
    started = time.perf_counter()
    model = make_model(model_type)
    adapter = resolve_adapter(model)
    row: dict = {"model_type": model_type, "adapter": adapter.name}
    for name, point in EDITS.items():
        row[name] = _edit(model, adapter, point, prompts, "float32")
    bf16 = make_model(model_type, dtype=torch.bfloat16)
    row["bf16"] = _edit(bf16, adapter, EDITS["embedding 1"], prompts, "bfloat16")
    row["seconds"] = time.perf_counter() - started
    return row


def checkpoint_sizes(directory: Path) -> dict:
    """Adapter tensor bytes of rank 1 and 2 for the checkpoint in ``directory``, from meta-device shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = resolve_adapter(model)
    return {
        "model_type": config.model_type,
        "writers": len(residual_writers(model, adapter)),
        "rank1": tensor_bytes(model, adapter, 1),
        "rank2": tensor_bytes(model, adapter, 2),
    }


def _cell(result: dict) -> str:
    if "refused" in result:
        return "refused"
    status = "pass" if result["passed"] else "**FAIL**"
    return f"{status} {result['rel']:.1e}"


def _why(row: dict) -> str:
    reasons = {row[name]["refused"] for name in (*EDITS, "bf16") if "refused" in row[name]}
    return " / ".join(sorted(reasons)).replace("|", "\\|")


def markdown(rows: list[dict], prompt_count: int, sizes: dict | None) -> str:
    """The results as a markdown section with the command that produced them."""
    lines = [
        "# LoRA adapters by family",
        "",
        f"Produced by `{COMMAND} --prompts {prompt_count}` (torch {torch.__version__}, "
        f"peft {_peft_version()}, CPU, one thread).",
        "Tiny random models from `tests/tiny.py`; a random orthonormal rank-2 subspace (second direction at",
        "weight 0.4) with a strength profile over the blocks (peak 1, width 3; attention 1.2, MLP 0.7);",
        f"{prompt_count} chat-templated prompts from `abliterate/data/harmless_eval.json`. Each adapter is",
        "loaded with `PeftModel.from_pretrained` on the original and compared with the hooked original.",
        "fp32 columns: max |Δlogit| / max |logit| (gate: 1e-3; tests/test_lora.py asserts ≤ 1e-5);",
        "*control*: the same adapter against the edit without its second direction (must fail). bf16:",
        "trimmed mean KL against the limit from the measured rounding floor (as the gate in 16-bit).",
        "*targets*: modules + parameters (`target_parameters`: fused experts, and the dense `down_proj`",
        "writers of Qwen2-MoE-like types, which peft's transformers-5 shim would otherwise re-read as expert",
        "names).",
        "",
        "| model type | adapter | embedding 1 (fp32) | control | embedding 0 (fp32) | bf16 KL / limit "
        "| targets | bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        first, bf16 = row["embedding 1"], row["bf16"]
        usable = first if "refused" not in first else row["embedding 0"]
        control = f"{first['control_rel']:.2f}" if "refused" not in first else "—"
        if "refused" in bf16:
            kl = "refused"
        else:
            kl = f"{bf16['trimmed_kl']:.1e} / {bf16['kl_limit']:.1e}" + (
                "" if bf16["passed"] else " **FAIL**"
            )
        # A type refused with the embedding shows its adapter without it (marked).
        mark = " (emb. 0)" if usable is not first else ""
        targets = "—" if "refused" in usable else f"{usable['modules']} + {usable['parameters']}{mark}"
        size = "—" if "refused" in usable else f"{usable['bytes']}{mark}"
        lines.append(
            f"| `{row['model_type']}` | {row['adapter']} | {_cell(first)} | {control} "
            f"| {_cell(row['embedding 0'])} | {kl} | {targets} | {size} |"
        )
    refused = [row for row in rows if "refused" in row["embedding 1"]]
    passed = [row for row in rows if "refused" not in row["embedding 1"]]
    worst = max((row["embedding 1"]["rel"] for row in passed), default=0.0)
    lines += [
        "",
        f"{len(passed)} of {len(rows)} types pass with the embedding edited (worst fp32 ratio {worst:.1e}); "
        f"{len(refused)} are refused:",
        "",
    ]
    lines += [f"- `{row['model_type']}`: {_why(row)}" for row in refused]
    if sizes is not None:
        lines += [
            "",
            f"Adapter tensors for `{sizes['path']}` ({sizes['model_type']}, {sizes['writers']} residual "
            "writers), from its shapes on the meta device (the formula matches every tiny adapter's file up",
            "to its header):",
            f"rank 1: {sizes['rank1'] / 2**20:.2f} MiB, rank 2: {sizes['rank2'] / 2**20:.2f} MiB (float32).",
        ]
    return "\n".join(lines) + "\n"


def _peft_version() -> str:
    from importlib.metadata import version

    return version("peft")


def main() -> None:
    """Measure every registered model type, print the table and write it to ``--output``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=4, help="number of chat prompts per family")
    parser.add_argument(
        "--output", type=Path, default=REPO_ROOT / "benchmarks" / "lora_by_family.md", help="markdown file"
    )
    parser.add_argument(
        "--shapes-of", type=Path, default=DEMO_CACHE, help="checkpoint whose adapter size to compute"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    prompts = _prompts(args.prompts)
    rows = []
    for model_type in registered_model_types():
        rows.append(measure(model_type, prompts))
        print(json.dumps(rows[-1]), file=sys.stderr)
    for row in rows:
        for name in EDITS:
            result = row[name]
            if "refused" not in result:
                # The shape formula accounts for every tensor byte; the rest is the safetensors header.
                header = result["bytes"] - result["predicted_bytes"]
                assert 0 < header < 64 * 1024, (row["model_type"], name, header)
    sizes = None
    if (args.shapes_of / "config.json").is_file():
        sizes = {
            "path": str(args.shapes_of).replace(str(Path.home()), "~"),
            **checkpoint_sizes(args.shapes_of),
        }
    text = markdown(rows, args.prompts, sizes)
    args.output.write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()
