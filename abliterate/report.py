"""What people read: the candidate heatmap, the console summary, and the model card."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


def plot_candidate_scores(scores: dict[str, torch.Tensor], chosen: tuple[int, int], path: Path) -> None:
    """Draw the per-candidate scores as heatmaps (position × layer) with the chosen one marked.

    Args:
        scores: ``{"screen", "ablation", "steering", "kl"}`` → ``[n_positions, n_layers]``.
        chosen: ``(position_index, layer)`` of the chosen candidate.
        path: PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in ("screen", "screen_kl", "ablation", "kl", "steering") if name in scores]
    figure, axes = plt.subplots(len(names), 1, figsize=(10, 1.6 + 1.2 * len(names) * 1.2), squeeze=False)
    titles = {
        "screen": "ablation score, coarse screen (lower = less refusal)",
        "screen_kl": "first-token KL on harmless prompts, coarse screen",
        "ablation": "ablation score on all val prompts (screened candidates)",
        "kl": "first-token KL on harmless prompts (computed lazily)",
        "steering": "steering score on harmless prompts (computed lazily)",
    }
    for axis, name in zip(axes[:, 0], names, strict=True):
        values = scores[name].numpy()
        n_positions = values.shape[0]
        image = axis.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
        axis.set_title(titles[name], fontsize=9)
        axis.set_ylabel("EOI pos")
        axis.set_yticks(range(n_positions), [str(p - n_positions) for p in range(n_positions)])
        axis.plot(chosen[1], chosen[0], marker="*", color="red", markersize=12)
        figure.colorbar(image, ax=axis)
    axes[-1, 0].set_xlabel("layer")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def summary_table(manifest: dict[str, Any]) -> str:
    """A small plain-text table of the run's numbers."""
    evaluation = manifest.get("evaluation") or {}
    parity = manifest["parity"]
    rows = [
        ("direction", f"layer {manifest['direction']['layer']}, position {manifest['direction']['position']}")
    ]
    if evaluation:
        before, after = evaluation["before"], evaluation["after"]
        rows.append(
            ("refusal rate", f"{before['refusal_rate']:.1%} -> {after['refusal_rate']:.1%} (n={after['n']})")
        )
        rows.append(("KL harmless (1st token)", _fmt(evaluation["kl_harmless"])))
    rows.append(
        (
            "parity",
            f"{'PASS' if parity['passed'] else 'FAIL'}  max|Δlogit| {_fmt(parity['max_abs_logit_diff'])}"
            f"  KL {_fmt(parity['mean_kl'])}  top-1 {parity['top1_agreement']:.3f}",
        )
    )
    rows.append(
        ("time", "  ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in manifest["timings"].items()))
    )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def model_card(manifest: dict[str, Any], base_model: str | None) -> str:
    """The README.md model card for the edited checkpoint."""
    evaluation = manifest.get("evaluation") or {}
    parity = manifest["parity"]
    header = ["---", "tags:", "- abliterated", "- abliterate", "- refusal-direction"]
    if base_model:
        header += [f"base_model: {base_model}", "base_model_relation: finetune"]
    header += ["---", ""]
    lines = [
        f"# {Path(base_model).name if base_model else 'Model'} (abliterated)",
        "",
        f"Made with [abliterate](https://pypi.org/project/abliterate/) {manifest['abliterate_version']} "
        f"from `{manifest['model']['source']}`.",
        "",
        "## Method",
        "",
        "The refusal direction r̂ (difference of mean residual streams on harmful vs harmless prompts at "
        "an end-of-instruction token, Arditi et al. 2024) was folded into every module that writes to the "
        "residual stream: `W ← W − r̂ r̂ᵀ W` for the embedding, attention output, MLP down projections and "
        "experts, and their biases. Tied embeddings were untied; the output head is unchanged.",
        "",
        f"- chosen layer: {manifest['direction']['layer']}",
        f"- chosen position: {manifest['direction']['position']} (from the end of the chat template)",
        f"- dtype: {manifest['model']['dtype']}",
        "",
        "## Parity (edited weights vs. the original with the direction ablated by hooks)",
        "",
        "| max abs logit diff | mean KL | top-1 agreement | passed |",
        "|---|---|---|---|",
        f"| {_fmt(parity['max_abs_logit_diff'])} | {_fmt(parity['mean_kl'])} | "
        f"{parity['top1_agreement']:.4f} | {parity['passed']} |",
        "",
    ]
    if evaluation:
        before, after = evaluation["before"], evaluation["after"]
        lines += [
            "## Evaluation",
            "",
            "| | refusal rate | n |",
            "|---|---|---|",
            f"| original | {before['refusal_rate']:.1%} | {before['n']} |",
            f"| abliterated | {after['refusal_rate']:.1%} | {after['n']} |",
            "",
            f"First-token KL on harmless prompts: {_fmt(evaluation['kl_harmless'])}.",
            "",
        ]
    lines += [
        "This model will follow requests that the original refuses. Use it responsibly.",
        "",
        "`direction.safetensors` holds the direction; `abliterate.json` the full run manifest.",
        "",
    ]
    return "\n".join(header + lines)
