"""What the edit search leaves beside a run's output: the Pareto front as JSON and as a plot, and the
manifest's ``search`` entry."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from abliterate.find.search import SearchResult, pareto_front


def save_front(result: SearchResult, max_kl: float | None, json_path: object, png_path: object) -> None:
    """Write the Pareto JSON and a refusal-score-vs-KL plot, the paper's and the chosen point marked
    (and the user's KL cap, ``max_kl``, when there is one)."""
    Path(json_path).write_text(json.dumps(result.to_dict(max_kl), indent=1) + "\n", "utf-8")
    import matplotlib  # only when a plot is drawn: it takes a second to import

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    axes.scatter([t.kl for t in result.trials], [t.refusal_score for t in result.trials], s=10, c="0.6")
    front = pareto_front(result.trials)
    axes.plot([t.kl for t in front], [t.refusal_score for t in front], "-o", ms=3, label="Pareto front")
    paper, chosen = result.trials[0], result.chosen
    axes.scatter([paper.kl], [paper.refusal_score], marker="s", s=60, c="tab:orange", label="paper rule")
    axes.scatter([chosen.kl], [chosen.refusal_score], marker="*", s=160, c="tab:red", label="chosen")
    caps = [] if max_kl is None else [max_kl]
    for cap in caps:
        axes.axvline(cap, ls="--", c="0.4", lw=1)
    kls = [t.kl for t in result.trials if t.kl > 0] + caps
    if max(kls) / min(kls) > 20:  # a wide range reads best on a log axis; a narrow one keeps its ticks
        axes.set_xscale("log")
    axes.set_xlabel("first-token KL, harmless val (trial prompts)")
    axes.set_ylabel("refusal score, harmful val (trial prompts)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    pyplot.close(figure)


def summary(result: SearchResult) -> dict[str, object]:
    """The manifest's ``search`` entry: sizes, the paper's and the chosen point, the front's extent, the
    outcome line (the paper's point kept and why, or the point that dominates it) and any warning."""
    front = pareto_front(result.trials)
    return {
        "trials": len(result.trials),
        "front_size": len(front),
        "seconds": result.seconds,
        "paper": result.confirmed[0].to_dict(),
        "chosen": result.chosen.to_dict(),
        "chosen_is_paper": result.chosen is result.confirmed[0],
        "outcome": result.outcome,
        "warning": result.warning,
        "difference": None if result.difference is None else asdict(result.difference),
        "confirmed": [trial.to_dict() for trial in result.confirmed],
    }
