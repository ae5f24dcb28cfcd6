"""What the edit search leaves behind: the Pareto front (JSON and plot), the manifest's ``search`` entry,
and the searched point's strengths in ``direction.safetensors`` metadata, read back as the declared edit
that ``apply``, ``verify``, LoRA output and the certificate check.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from abliterate.adapters import ResolvedWriter
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.kernel import Strength
from abliterate.find.point import EditPoint
from abliterate.find.search import SearchResult, pareto_front


def save_front(result: SearchResult, max_kl: float, json_path: object, png_path: object) -> None:
    """Write the Pareto JSON and a refusal-score-vs-KL plot, the paper's and the chosen point marked."""
    from pathlib import Path

    Path(json_path).write_text(json.dumps(result.to_dict(max_kl), indent=1) + "\n", "utf-8")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    axes.scatter([t.kl for t in result.trials], [t.refusal_score for t in result.trials], s=10, c="0.6")
    front = pareto_front(result.trials)
    axes.plot([t.kl for t in front], [t.refusal_score for t in front], "-o", ms=3, label="Pareto front")
    paper, chosen = result.trials[0], result.chosen
    axes.scatter([paper.kl], [paper.refusal_score], marker="s", s=60, c="tab:orange", label="paper rule")
    axes.scatter([chosen.kl], [chosen.refusal_score], marker="*", s=160, c="tab:red", label="chosen")
    axes.axvline(max_kl, ls="--", c="0.4", lw=1)
    kls = [t.kl for t in result.trials if t.kl > 0] + [max_kl]
    if max(kls) / min(kls) > 20:  # a wide range reads best on a log axis; a narrow one keeps its ticks
        axes.set_xscale("log")
    axes.set_xlabel("first-token KL, harmless val (trial prompts)")
    axes.set_ylabel("refusal score, harmful val (trial prompts)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    pyplot.close(figure)


# Metadata key of ``direction.safetensors`` that holds a searched point (absent: strength 1 everywhere).
POINT_KEY = "edit_point"
STRENGTHS_KEY = "strengths"


def point_metadata(point: EditPoint, n_layers: int) -> dict[str, str]:
    """``direction.safetensors`` metadata for ``point``: the point itself and its resolved strengths.

    ``strengths`` holds what ``apply`` and the certificate need (the embedding's strength and one
    strength per block for every writer group), so a reader needs no knowledge of the profile's form.
    """
    strengths = {"embedding": point.embedding, "layers": point.layer_strengths(n_layers)}
    if point.rank > 1:
        strengths["weights"] = list(point.weights())
    if point.norm_preserving:
        strengths["norm_preserving"] = True
    return {POINT_KEY: json.dumps(asdict(point)), STRENGTHS_KEY: json.dumps(strengths)}


def strengths_from_metadata(metadata: dict[str, str]) -> DeclaredEdit:
    """The strengths a direction file declares, as a ``DeclaredEdit`` whose direction is left empty.

    Old direction files (no ``strengths`` key) declare strength 1 on every writer; a file without
    ``"norm_preserving": true`` declares the plain fold.

    Raises:
        ValueError: the ``strengths`` entry is not what ``point_metadata`` writes.
    """
    if STRENGTHS_KEY not in metadata:
        return DeclaredEdit(torch.empty(0))
    try:
        stored = json.loads(metadata[STRENGTHS_KEY])
        layers = {group: tuple(float(s) for s in values) for group, values in stored["layers"].items()}
        weights = tuple(float(w) for w in stored.get("weights", ()))
        norm_preserving = stored.get("norm_preserving", False)
        if not isinstance(norm_preserving, bool):
            raise ValueError(f"norm_preserving must be true or false, got {norm_preserving!r}")
        embedding = {"embedding": float(stored["embedding"])}
        return DeclaredEdit(torch.empty(0), embedding, 1.0, layers, weights, norm_preserving)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"the direction file's {STRENGTHS_KEY!r} metadata is malformed: {error}") from error


def declared_edit(direction: torch.Tensor, point: EditPoint | None, n_layers: int) -> DeclaredEdit:
    """The edit the certificate checks: ``direction`` with ``point``'s strengths."""
    if point is None:
        return DeclaredEdit(direction)
    layers = point.layer_strengths(n_layers)
    embedding = {"embedding": point.embedding}
    return DeclaredEdit(direction, embedding, 1.0, layers, point.weights(), point.norm_preserving)


def summary(result: SearchResult) -> dict[str, object]:
    """The manifest's ``search`` entry: sizes, the paper's and the chosen point, the front's extent."""
    front = pareto_front(result.trials)
    paper = next((trial for trial in result.confirmed if trial.point == result.trials[0].point), None)
    return {
        "trials": len(result.trials),
        "front_size": len(front),
        "seconds": result.seconds,
        "paper": None if paper is None else paper.to_dict(),
        "chosen": result.chosen.to_dict(),
        "confirmed": [trial.to_dict() for trial in result.confirmed],
    }


def declared_from_file(direction: torch.Tensor, metadata: dict[str, str]) -> DeclaredEdit:
    """The edit a direction file declares: its direction with its strengths (1 for old files)."""
    return replace(strengths_from_metadata(metadata), direction=direction)


def writer_strengths(declared: DeclaredEdit) -> Callable[[ResolvedWriter], Strength] | None:
    """The hooks' and the fold's per-writer strength for a declared edit (per row for a subspace);
    ``None`` when it is the plain strength-1 edit (so callers keep the paper's code path)."""
    if declared.is_plain():
        return None
    return lambda writer: declared.scales_for(writer.group, writer.layer)
