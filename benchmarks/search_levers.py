"""Summarise a run's edit search: the front next to the paper's point, and how far each lever moved it.

    python benchmarks/search_levers.py OUT/pareto_front.json

For every lever (direction orthogonal to the harmless mean, blend of neighbouring layers, attention /
MLP / embedding strength, layer profile) the trials are split by the lever's setting, and for each side
the best cheap refusal score among trials whose cheap KL is under the bound is printed (lower is better),
with the number of trials on that side.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable


def best_under(trials: list[dict], max_kl: float) -> str:
    scores = [t["refusal_score"] for t in trials if t["kl"] <= max_kl]
    return (
        f"{min(scores):7.3f} ({len(scores)}/{len(trials)} under)" if scores else f"   none (0/{len(trials)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("front")
    args = parser.parse_args()
    data = json.loads(open(args.front).read())
    trials, max_kl = data["trials"], data["max_kl"]
    paper = data["paper"]
    if max_kl is None:  # no cap: the levers are compared under the paper point's own trial KL
        max_kl = paper["kl"]
    anchor = paper["point"]["layer"]
    print(f"paper point: refusal score {paper['refusal_score']:.3f}, KL {paper['kl']:.4f}")
    print("front (KL, refusal score):")
    for index in data["front"]:
        trial = trials[index]
        point = trial["point"]
        print(
            f"  {trial['kl']:.4f}  {trial['refusal_score']:7.3f}  layer {point['layer']:.2f} "
            f"pos {point['position']} orth {point['orthogonal']} "
            f"e/a/m {point['embedding']:.2f}/{point['attention']:.2f}/{point['mlp']:.2f} "
            f"peak {point['peak']:.1f} width {point['width']:.1f} "
            f"second {point.get('second')} w2 {point.get('second_weight', 0):.2f}"
        )
    levers: dict[str, Callable[[dict], bool]] = {
        "orthogonal to harmless mean": lambda p: p["orthogonal"],
        "blended layer (|layer - round| > 0.1)": lambda p: abs(p["layer"] - round(p["layer"])) > 0.1,
        "layer moved from the paper's (> 0.5)": lambda p: abs(p["layer"] - anchor) > 0.5,
        "MLP strength < 0.5": lambda p: p["mlp"] < 0.5,
        "attention strength > 1": lambda p: p["attention"] > 1.0,
        "embedding strength < 0.5": lambda p: p["embedding"] < 0.5,
        "peaked profile (width < half depth)": lambda p: 0 < p["width"] < 12,
        "second direction (rank 2)": lambda p: p.get("second") is not None and p.get("second_weight", 0) > 0,
        "flat strength < 1 on every group": lambda p: (
            p["width"] <= 0 and max(p["embedding"], p["attention"], p["mlp"]) < 1.0
        ),
    }
    print(f"best cheap refusal score with cheap KL <= {max_kl} (lower is better): lever on | off")
    for name, test in levers.items():
        on = [t for t in trials if test(t["point"])]
        off = [t for t in trials if not test(t["point"])]
        print(f"  {name:40s} {best_under(on, max_kl)} | {best_under(off, max_kl)}")
    print("confirmed (refusals by the judge / n, KL on all harmless val prompts):")
    for trial in data["confirmed"]:
        print(f"  {trial['refusals']}/{trial['n_confirm']}  KL {trial['confirm_kl']:.4f}  {trial['point']}")
    print(f"chosen: {data['chosen']['point']}  seconds: {data['seconds']}")


if __name__ == "__main__":
    main()
