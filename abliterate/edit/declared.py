"""The declared edit: what a direction file says an edited checkpoint carries, and what one tensor must carry.

``DeclaredEdit`` is the one form of an edit: the search's point maps to it (``abliterate.find.point``), the
direction file is read into it, and the fold, the hooks, the gate, the certificate, streaming apply and LoRA
output take it; each writer's share of it is ``DeclaredEdit.scales``, and every consumer that reads a
declared edit from outside checks it with the same ``DeclaredEdit.validate``.
``RequiredEdit`` is what one tensor must carry, as the model's structure says (layout, group, block, bias).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from abliterate.adapters.spec import Layout
from abliterate.edit.kernel import Scales, changes

# The largest strength a declared edit may give a writer; the search draws strengths from [0, MAX_STRENGTH].
MAX_STRENGTH = 1.5


@dataclass(frozen=True)
class DeclaredEdit:
    """The edit a checkpoint claims to carry: ``W ← (I − s r̂ r̂ᵀ) W`` on every residual writer.

    Attributes:
        direction: ``[d_model]`` unit direction (as stored in ``direction.safetensors``).
        strengths: ``s`` per writer group (``embedding``, ``attention``, ``mlp``, ``experts``,
            ``shared_experts``); a group not named has strength ``default_strength``.
        default_strength: the strength of every group not in ``strengths``.
        layer_strengths: per group, one strength per decoder block (a layer profile); where given it
            overrides ``strengths`` for that group's writers in blocks ``0 … len − 1``.
        weights: for a subspace ``direction`` ``[k, d_model]`` (orthonormal rows ``q_i``), the weight
            ``w_i`` of each row: a writer of strength ``s`` gets ``W ← (I − Σ_i s w_i q_i q_iᵀ) W``.
        norm_preserving: every weight gets ``W ← (I − s r̂ r̂ᵀ) W D`` (``abliterate.edit.kernel.norm_factors``);
            biases are projected, never scaled.
    """

    direction: torch.Tensor
    strengths: dict[str, float] = field(default_factory=dict)
    default_strength: float = 1.0
    layer_strengths: dict[str, tuple[float, ...]] = field(default_factory=dict)
    weights: tuple[float, ...] = ()
    norm_preserving: bool = False

    def validate(self, writers: Iterable[tuple[str, int]] | None = None) -> DeclaredEdit:
        """Check that this is an edit: finite strengths in ``[0, MAX_STRENGTH]`` (the search's range),
        subspace weights in ``[0, 1]``, and, given the ``(group, layer)`` of every writer it applies to,
        not zero on all of them (a no-op would certify the unmodified source as edited).

        Every consumer (``apply``, ``verify``, LoRA output, the certificate) calls this one check.

        Args:
            writers: the writers the edit is applied to; ``None`` skips the no-op check.

        Returns:
            ``self``.

        Raises:
            ValueError: one line naming the first value out of range, or saying the edit is a no-op.
        """
        values = [("every other writer", self.default_strength)]
        values += [(f"the {group}", strength) for group, strength in self.strengths.items()]
        for group, profile in self.layer_strengths.items():
            values += [(f"block {layer}'s {group}", s) for layer, s in enumerate(profile)]
        for where, value in values:
            _check_range(f"{where} strength", value, MAX_STRENGTH)
        for row, weight in enumerate(self.weights):
            _check_range(f"subspace row {row} weight", weight, 1.0)
        if writers is not None and not any(changes(self.scales(g, layer)) for g, layer in writers):
            raise ValueError(
                "the direction file declares a zero edit (strength 0 on every writer): a no-op, "
                "the output would equal the source"
            )
        return self

    def is_plain(self) -> bool:
        """Strength 1 on every writer along one direction, not norm-preserving: the paper's edit."""
        plain = not self.strengths and not self.layer_strengths and self.default_strength == 1.0
        return plain and self.direction.dim() == 1 and not self.weights and not self.norm_preserving

    def scales(self, group: str, layer: int) -> Scales:
        """What the fold of a writer of ``group`` in block ``layer`` (``-1``: embeddings) is given, and the
        hooks and the LoRA factors with it: its strength ``s``, or for a subspace ``[k, d_model]`` that
        strength times each row's weight (``weights``; 1 when empty).

        The strength is ``layer_strengths[group][layer]`` when the edit declares a per-layer profile for
        the group, else ``strengths[group]``, else ``default_strength``.
        """
        profile = self.layer_strengths.get(group)
        if profile is not None and 0 <= layer < len(profile):
            strength = float(profile[layer])
        else:
            strength = self.strengths.get(group, self.default_strength)
        if self.direction.dim() != 2:
            return strength
        weights = self.weights or (1.0,) * self.direction.shape[0]
        return tuple(strength * weight for weight in weights)


def _check_range(what: str, value: float, upper: float) -> None:
    """One line unless ``value`` is finite and in ``[0, upper]`` (``what``: e.g. "the embedding strength")."""
    if not math.isfinite(value):
        raise ValueError(f"the declared edit gives {what} {value}: strengths and weights must be finite")
    if not 0.0 <= value <= upper:
        raise ValueError(f"the declared edit gives {what} {value:g}, outside [0, {upper:g}]")


@dataclass(frozen=True)
class RequiredEdit:
    """A tensor the structure says the edit must change (``bias``: a writer's bias, which a
    norm-preserving edit projects but never scales; it is folded with the ``embedding`` layout)."""

    layout: Layout
    group: str
    layer: int
    bias: bool = False
