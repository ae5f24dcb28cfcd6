"""The space of edit points the search may suggest, and the points it tries first.

``SearchSpace.suggest`` maps an Optuna trial's parameters to an ``EditPoint`` around the paper's point;
``warm_starts`` are the parameters of the trials evaluated before the sampler's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abliterate.edit.declared import MAX_STRENGTH, DeclaredEdit
from abliterate.find.point import EditPoint, declared_edit, point_direction

# A second direction weighted less than this is dropped (the point stays rank 1).
MIN_SECOND_WEIGHT = 0.05


@dataclass(frozen=True)
class SearchSpace:
    """What the search may vary, and the data it needs.

    Attributes:
        candidates: ``[n_positions, n_layers, d_model]`` raw candidates.
        harmless_means: the harmless mean block inputs, same shape.
        n_layers: depth of the model (the profile spans every block).
        anchor: the paper's point; the direction's layer varies within ``layer_radius`` of it.
        layer_radius: how far (in layers) the direction may move from the anchor.
        subspace: whether points may add a second direction (rank 2).
        norm_preserving: every suggested point is norm-preserving (``run --norm-preserving``); the cheap
            trials still score the plain edit's hooks, the confirmation the exact norm-preserving ones.
    """

    candidates: torch.Tensor
    harmless_means: torch.Tensor
    n_layers: int
    anchor: EditPoint
    layer_radius: float = 2.0
    subspace: bool = True
    norm_preserving: bool = False

    def declared(self, point: EditPoint) -> DeclaredEdit:
        """The edit ``point`` declares, along its direction from these candidates (``declared_edit``)."""
        direction = point_direction(point, self.candidates, self.harmless_means)
        return declared_edit(direction, point, self.n_layers)

    def suggest(self, trial: object) -> EditPoint:
        """An Optuna trial's point."""
        n_positions, n_extracted, _ = self.candidates.shape
        low = max(0.0, self.anchor.layer - self.layer_radius)
        high = min(float(n_extracted - 1), self.anchor.layer + self.layer_radius)
        position = trial.suggest_int("position", -n_positions, -1)
        return EditPoint(
            layer=trial.suggest_float("layer", low, high),
            position=position,
            orthogonal=trial.suggest_categorical("orthogonal", [False, True]),
            embedding=trial.suggest_float("embedding", 0.0, MAX_STRENGTH),
            attention=trial.suggest_float("attention", 0.0, MAX_STRENGTH),
            mlp=trial.suggest_float("mlp", 0.0, MAX_STRENGTH),
            peak=trial.suggest_float("peak", 0.0, float(self.n_layers - 1)),
            width=trial.suggest_float("width", 0.0, float(self.n_layers)),
            **self._second(trial, position, n_positions),
            norm_preserving=self.norm_preserving,
        )

    def _second(self, trial: object, position: int, n_positions: int) -> dict[str, object]:
        """The second direction: another EOI position (an offset from the first), and its weight; a
        weight under ``MIN_SECOND_WEIGHT`` (or a single EOI position) keeps the point rank 1."""
        if not self.subspace or n_positions < 2:
            return {}
        offset = trial.suggest_int("second_offset", 1, n_positions - 1)
        weight = trial.suggest_float("second_weight", 0.0, 1.0)
        if weight < MIN_SECOND_WEIGHT:
            return {}
        return {"second": (position + offset) % n_positions - n_positions, "second_weight": weight}


def warm_starts(space: SearchSpace) -> list[dict[str, object]]:
    """The trials evaluated before the sampler's own: the paper's point first, then the points the
    hook measurements on the demo model found best at low KL (the direction ⊥ the harmless mean; a
    second EOI position's direction at weight 0.25; both; a profile that fades the late writers; and
    uniform strengths below 1), so TPE starts from what is known instead of rediscovering it."""
    anchor = space.anchor
    paper = {
        "layer": anchor.layer,
        "position": anchor.position,
        "orthogonal": anchor.orthogonal,
        "embedding": 1.0,
        "attention": 1.0,
        "mlp": 1.0,
        "peak": 0.0,
        "width": 0.0,
    }
    n_positions = space.candidates.shape[0]
    if space.subspace and n_positions > 1:
        paper.update(second_offset=n_positions - 1, second_weight=0.0)  # offset n − 1: position − 1
    orthogonal = {**paper, "orthogonal": True}
    starts = [paper, orthogonal]
    starts.append({**orthogonal, "peak": anchor.layer, "width": float(space.n_layers)})
    if "second_weight" in paper:
        starts += [{**paper, "second_weight": 0.25}, {**orthogonal, "second_weight": 0.25}]
    # A uniform strength below 1 trades refusals for KL smoothly (0.9: KL 0.076 → 0.062 at the same
    # 1/32 refusals on the demo, benchmarks/edit_levers.py).
    for strength in (0.85, 0.75):
        uniform = {"embedding": strength, "attention": strength, "mlp": strength}
        starts += [{**paper, **uniform}, {**orthogonal, **uniform}]
    return starts
