"""The support matrix, generated from the adapter registry (``python -m abliterate.adapters.matrix``).

Every column is read from data: the adapter (writers, layouts, biases, post-norm), and the default
configuration transformers ships for the model type (tied embeddings). The parity columns say "yes"
for every registered type because ``tests/test_adapters.py`` parametrizes its fp32 and bf16 parity
test over ``registered_model_types()``; a test there checks that it still does.
"""

from __future__ import annotations

from abliterate.adapters.registry import get_adapter, registered_model_types
from abliterate.adapters.spec import Adapter

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
    "parity fp32",
    "parity bf16",
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


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def support_matrix_markdown() -> str:
    """The support matrix as a markdown table, one row per registered model type.

    Returns:
        The table (header, separator, rows), ending with a newline.
    """
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
            "yes",
            "yes",
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
