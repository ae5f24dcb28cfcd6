"""Plots a person would rather look at than read: the candidate scores as heatmaps."""

from __future__ import annotations

from pathlib import Path

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
