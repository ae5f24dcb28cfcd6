"""A point of the searched edit family: its direction and its per-writer strengths.

Every point is a weight edit ``W ← (I − s r̂ r̂ᵀ) W`` per residual writer, with

* a direction ``r̂``: the candidate at a (fractional) layer — a blend of the two neighbouring layers'
  candidates — and EOI position, optionally made orthogonal to the harmless mean at that layer;
* optionally a second direction ``q₂`` of weight ``w₂``: the candidate of another EOI position at the same
  (fractional) layer, made orthogonal to ``r̂``, so a writer of strength ``s`` gets the rank-2 edit
  ``W ← (I − s r̂ r̂ᵀ − s w₂ q₂ q₂ᵀ) W`` (the fold, the hooks and the certificate take any orthonormal
  subspace of up to ``abliterate.edit.kernel.MAX_RANK`` rows);
* a strength ``s`` per writer: a peak strength per group (embedding, attention writers, MLP writers
  incl. experts), shaped over the layers by a triangular kernel ``max(0, 1 − |layer − peak| / width)``
  (``width = 0`` means flat: the same strength in every block).

The paper's point (its candidate, strength 1 everywhere) is ``EditPoint.paper``. A point becomes an edit in
one place, ``declared_edit``: the ``DeclaredEdit`` that the fold, the hooks, the gate, the certificate, the
direction file, streaming apply and LoRA output take, so each point is proved like the paper's edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.direction import unit_rows

# Writer groups that take the MLP strength.
MLP_GROUPS = ("mlp", "experts", "shared_experts")


@dataclass(frozen=True)
class EditPoint:
    """One member of the edit family.

    Attributes:
        layer: layer of the direction; a fraction blends the candidates of the two layers around it.
        position: EOI position of the candidate (negative, from the end).
        orthogonal: remove the direction's component along the harmless mean at ``round(layer)``.
        embedding: strength at the embedding.
        attention: peak strength of the attention writers.
        mlp: peak strength of the MLP writers (and experts).
        peak: block where the profile peaks.
        width: blocks from the peak to where the strength reaches 0; 0 = flat profile.
        second: EOI position of a second direction (same layer), made orthogonal to the first.
        second_weight: its weight ``w₂`` relative to the first; 0 (or ``second`` unset) = rank 1.
        norm_preserving: fold ``(I − Q diag(s) Qᵀ) W D`` (``edit.kernel.norm_factors``), which keeps
            the length of every vector a writer emits per input coordinate; set by ``run
            --norm-preserving``, not searched (no gain on the demo, BENCHMARKS).
    """

    layer: float
    position: int
    orthogonal: bool = False
    embedding: float = 1.0
    attention: float = 1.0
    mlp: float = 1.0
    peak: float = 0.0
    width: float = 0.0
    second: int | None = None
    second_weight: float = 0.0
    norm_preserving: bool = False

    @classmethod
    def paper(
        cls, layer: int, position: int, orthogonal: bool = False, norm_preserving: bool = False
    ) -> EditPoint:
        """The paper's edit: the candidate at ``(layer, position)``, strength 1 on every writer
        (``norm_preserving``: the run's ``--norm-preserving`` variant of it)."""
        return cls(float(layer), position, orthogonal, norm_preserving=norm_preserving)

    def strength(self, group: str, layer: int) -> float:
        """The strength at a writer of ``group`` in block ``layer`` (``-1``: the embedding)."""
        if group == "embedding" or layer < 0:
            return self.embedding
        peak_strength = self.mlp if group in MLP_GROUPS else self.attention
        if self.width <= 0:
            return peak_strength
        return peak_strength * max(0.0, 1.0 - abs(layer - self.peak) / self.width)

    @property
    def rank(self) -> int:
        """1, or 2 with a second direction of non-zero weight."""
        return 2 if self.second is not None and self.second_weight != 0 else 1


def declared_edit(direction: torch.Tensor, point: EditPoint | None, n_layers: int) -> DeclaredEdit:
    """The edit ``point`` declares along ``direction`` (its ``point_direction``, as stored): the embedding's
    strength, one strength per block for every other writer group (``EditPoint.strength`` over the
    model's ``n_layers`` blocks), each direction's weight (rank 2) and the norm-preserving switch.
    ``None`` is the paper's edit: strength 1 on every writer.

    This is the one place a point becomes a ``DeclaredEdit``; the search, the gate and the direction
    file all go through it."""
    if point is None:
        return DeclaredEdit(direction)
    groups = ("attention", *MLP_GROUPS)
    layers = {group: tuple(point.strength(group, layer) for layer in range(n_layers)) for group in groups}
    weights = () if point.rank == 1 else (1.0, point.second_weight)
    return DeclaredEdit(
        direction, {"embedding": point.embedding}, 1.0, layers, weights, point.norm_preserving
    )


def point_direction(point: EditPoint, candidates: torch.Tensor, harmless_means: torch.Tensor) -> torch.Tensor:
    """The unit direction ``[d_model]`` (float32) of ``point``, or ``[2, d_model]`` orthonormal rows for a
    rank-2 point (its first row the rank-1 direction).

    Args:
        point: the edit.
        candidates: ``[n_positions, n_layers, d_model]`` raw candidates (harmful − harmless means).
        harmless_means: ``[n_positions, n_layers, d_model]`` harmless mean block inputs.
    """
    first = _blended(point, point.position, candidates, harmless_means)
    if point.rank == 1:
        return first.float()
    second = _blended(point, point.second, candidates, harmless_means)
    second = second - (second @ first) * first
    basis = torch.stack([first, unit_rows(second)])
    # One more Gram-Schmidt pass in float64 keeps the float32 rows orthonormal to rounding.
    basis[1] -= (basis[1] @ basis[0]) * basis[0]
    return unit_rows(basis).float()


def _blended(
    point: EditPoint, position: int, candidates: torch.Tensor, harmless_means: torch.Tensor
) -> torch.Tensor:
    """The unit float64 candidate at ``point.layer`` (blended) and ``position``, optionally ⊥ the
    harmless mean."""
    n_positions, n_layers, _ = candidates.shape
    index = position % n_positions
    low = min(math.floor(point.layer), n_layers - 1)
    high = min(low + 1, n_layers - 1)
    fraction = point.layer - low
    # Blend the unit candidates so neither layer dominates by its norm alone.
    units = unit_rows(candidates[index, [low, high]].double())
    vector = (1 - fraction) * units[0] + fraction * units[1]
    if point.orthogonal:
        mean = unit_rows(harmless_means[index, min(round(point.layer), n_layers - 1)].double())
        vector = vector - (vector @ mean) * mean
    return unit_rows(vector)
