"""The support matrix, generated from the adapter registry (``python -m abliterate.adapters.matrix``).

Every column is read from data: the adapter (writers, layouts, biases, post-norm), the default
configuration transformers ships for the model type (tied embeddings), and for the parity columns the
measurement ``benchmarks/gate_by_family.py`` wrote to ``measured_gate.json`` beside this file (the
whole gate on a tiny model of the type, per dtype: does the complete edit pass, and how many negative
controls are rejected). ``tests/test_gate.py`` runs the same measurement in CI.
"""

from __future__ import annotations

import json
from pathlib import Path

from abliterate.adapters.registry import get_adapter, registered_model_types
from abliterate.adapters.spec import Adapter

MEASURED_GATE = Path(__file__).with_name("measured_gate.json")
_MEASURED_DTYPES = (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16"))

MATRIX_START = "<!-- support-matrix:start -->"
MATRIX_END = "<!-- support-matrix:end -->"

_COLUMNS = (
    "model type",
    "adapter",
    "residual writers",
    "tied embeddings (default config)",
    "writer biases folded (when present)",
    "experts",
    "post-norm",
    *(f"gate {short}" for _, short in _MEASURED_DTYPES),
)


def _tied_by_default(model_type: str) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    text_config = getattr(config, "text_config", None)
    return bool(getattr(text_config or config, "tie_word_embeddings", False))


def _writers(adapter: Adapter) -> str:
    return ", ".join(f"`{writer.path}`" for writer in adapter.writers)


def _experts(adapter: Adapter) -> str:
    layouts = sorted({writer.layout for writer in adapter.writers if writer.layout.startswith("experts")})
    return ", ".join(f"fused (`{layout}`)" for layout in layouts) or "no"


def _biases(adapter: Adapter) -> str:
    # A writer with a bias attribute has it folded whenever the checkpoint carries one.
    without = [f"`{writer.path}`" for writer in adapter.writers if writer.bias is None]
    if not without:
        return "yes"
    if len(without) == len(adapter.writers):
        return "no"
    return "yes, except " + ", ".join(without)


def _gate(measured: dict, model_type: str, dtype: str) -> str:
    row = measured.get(model_type, {}).get(dtype)
    if row is None:
        return "not measured"
    verdict = "passes" if row["complete_passes"] else "FAILS"
    advisory = " (logits advisory)" if row.get("logits_advisory") else ""
    return f"{verdict}{advisory}, {row['controls_rejected']}/{row['controls']} controls rejected"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def support_matrix_markdown() -> str:
    """The support matrix as a markdown table, one row per registered model type.

    Returns:
        The table (header, separator, rows), ending with a newline.
    """
    measured = json.loads(MEASURED_GATE.read_text()) if MEASURED_GATE.is_file() else {}
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for model_type in registered_model_types():
        adapter = get_adapter(model_type)
        assert adapter is not None  # registered_model_types() lists only registered types
        cells = [
            f"`{model_type}`",
            adapter.name,
            _writers(adapter),
            _yes_no(_tied_by_default(model_type)),
            _biases(adapter),
            _experts(adapter),
            _yes_no(adapter.post_norm),
            *(_gate(measured, model_type, dtype) for dtype, _ in _MEASURED_DTYPES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def readme_matrix(readme_text: str) -> str | None:
    """The table between the support-matrix markers of a README, or ``None`` without markers."""
    start, end = readme_text.find(MATRIX_START), readme_text.find(MATRIX_END)
    if start < 0 or end < start:
        return None
    return readme_text[start + len(MATRIX_START) : end].strip() + "\n"


if __name__ == "__main__":
    print(support_matrix_markdown(), end="")
