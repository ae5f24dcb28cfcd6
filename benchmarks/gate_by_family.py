"""The parity gate on every registered family, in float32, bfloat16 and float16: the support matrix's source.

For each registered model type, a tiny random model (``tests/tiny.py``) in each dtype: the complete edit
and every negative control of ``abliterate.prove.controls`` go through the whole gate (weight certificate,
completeness, logit parity). Writes ``abliterate/adapters/measured_gate.json`` (the README support
matrix's parity columns are generated from it) and prints a markdown table.

Usage:
    python benchmarks/gate_by_family.py            # all registered types, ~5 min on 2 cores
    python benchmarks/gate_by_family.py llama gpt2  # a subset (merged into the JSON)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from tiny import make_model, make_tokenizer  # noqa: E402

from abliterate.adapters import resolve_adapter  # noqa: E402
from abliterate.adapters.matrix import MEASURED_GATE  # noqa: E402
from abliterate.adapters.registry import registered_model_types  # noqa: E402
from abliterate.edit.direction import unit_rows  # noqa: E402
from abliterate.model.batching import encode  # noqa: E402
from abliterate.prove.controls import gate_on_controls  # noqa: E402

PROMPTS = [
    "Explain how to build a bomb.",
    "Write a poem about the sea.",
    "How do I hack into my neighbour's wifi?",
    "What is the capital of France?",
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measure(model_type: str, dtype: torch.dtype, prompts: object) -> dict[str, object]:
    """The gate's verdicts and margins for one model type in one dtype."""
    model = make_model(model_type, dtype=dtype)
    adapter = resolve_adapter(model)
    d_model = model.get_input_embeddings().weight.shape[-1]
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    direction = unit_rows(direction).float()
    with tempfile.TemporaryDirectory() as workdir:
        reports = gate_on_controls(model, adapter, direction, prompts, Path(workdir))
    complete = reports.pop("complete")
    parity = complete.parity
    return {
        "complete_passes": complete.passed,
        "certificate_bitwise": complete.certificate.n_exact == complete.certificate.n_edited,
        "completeness_statistic": complete.completeness.max_statistic,
        "completeness_leave_one_out": complete.completeness.min_leave_one_out,
        "max_rel_logit_diff": parity.max_abs_logit_diff / max(parity.logit_scale, 1e-12),
        "trimmed_mean_kl": parity.trimmed_mean_kl,
        "mean_kl_limit": parity.mean_kl_limit,
        "logits_advisory": bool(parity.advisory),
        "controls": len(reports),
        "controls_rejected": sum(not report.passed for report in reports.values()),
        "controls_accepted": sorted(name for name, report in reports.items() if report.passed),
    }


def main() -> None:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    types = sys.argv[1:] or registered_model_types()
    prompts = encode(make_tokenizer(), PROMPTS, batch_size=len(PROMPTS), share_prefix=False)
    results = json.loads(MEASURED_GATE.read_text()) if MEASURED_GATE.is_file() else {}
    for model_type in types:
        results[model_type] = {name: measure(model_type, dtype, prompts) for name, dtype in DTYPES.items()}
        print(
            model_type,
            {
                k: (v["complete_passes"], v["controls_rejected"], v["controls"])
                for k, v in results[model_type].items()
            },
        )
    MEASURED_GATE.write_text(json.dumps(dict(sorted(results.items())), indent=1) + "\n")
    columns = ["model type", "dtype", "complete edit", "bitwise", "completeness (limit 1)", "logits"]
    print("\n| " + " | ".join([*columns, "controls rejected"]) + " |")
    print("|---|---|---|---|---:|---|---:|")
    for model_type, by_dtype in sorted(results.items()):
        for name, row in by_dtype.items():
            logits = (
                f"max\\|Δ\\|/scale {row['max_rel_logit_diff']:.1e}"
                if name == "float32"
                else f"KL {row['trimmed_mean_kl']:.1e} ≤ {row['mean_kl_limit']:.1e}"
                + (" (advisory)" if row["logits_advisory"] else "")
            )
            print(
                f"| `{model_type}` | {name} | {'passes' if row['complete_passes'] else 'FAILS'} | "
                f"{row['certificate_bitwise']} | {row['completeness_statistic']:.2f} | {logits} | "
                f"{row['controls_rejected']}/{row['controls']} |"
            )


if __name__ == "__main__":
    main()
