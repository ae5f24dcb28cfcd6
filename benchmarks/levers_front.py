"""Issue 15 item 3's levers against the paper's point, at the trial level, with hooks on the demo.

    python benchmarks/levers_front.py --out /tmp/levers.json --plot /tmp/levers.png

Each variant is an edit hooked on the one loaded original (float32, CPU). Two figures per variant, the ones
the search's trials rank by: the mean refusal score (first-token log-odds of a refusal opener; lower = less
refusal) on the first ``--n`` harmful val prompts, and the mean first-token KL on the first ``--n`` harmless
val prompts. Prompts and candidates come from the run's own default splits (seed 0, 128 train prompts
per class), so the paper's point is the direction ``abliterate run demo --search none`` declares.

Variants:

- the paper's edit, ``W ← (I − s r̂ r̂ᵀ) W`` at strengths ``--strengths``: the curve to beat;
- **ACE** (Marshall et al. 2024) in the only form weights can carry: every writer projected, every
  embedding row's component along r̂ set to one level ``c`` (the writers add nothing along r̂ after the
  fold, so the residual stream carries ``c`` along r̂ at every layer);
- **per-layer directions**: each writer projects out the candidate of the layer it writes into (pos −1),
  from layer 10 on (the paper's direction below it), or everywhere clamped to layers 8–20; and the same
  with each layer's candidate made orthogonal to that layer's harmless mean;
- **a refined direction**: candidates re-extracted with the paper's edit hooked; the rank-2 edit
  ``{r̂, r̂₂}`` (``r̂₂`` = the re-extracted candidate at a layer, orthogonal to r̂) with weight ``w`` on r̂₂,
  and r̂ rotated towards what remains at its own layer.

What this cannot see: replies (a first-token proxy, as in the search's trials), the multi-token KL, and
prompts beyond the first ``--n``; one model.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from abliterate.adapters.resolve import ResolvedWriter, resolve_adapter
from abliterate.edit.direction import unit_direction
from abliterate.find.extract import candidate_directions, extract_means
from abliterate.find.scores import kl_divergence, refusal_scores, refusal_token_ids
from abliterate.model.batching import encode, last_logits
from abliterate.model.hooks import Patch, ablated, project_out_scaled, projection, subspace_projection
from abliterate.model.loading import load_model
from abliterate.model.prompts import load_splits

Pick = Callable[[ResolvedWriter], torch.Tensor]


def without(vector: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``vector`` with its component along the unit vector ``unit`` removed (float64)."""
    return vector.double() - (vector.double() @ unit.double()) * unit.double()


def per_writer(pick: Pick, strength: float) -> Callable[[ResolvedWriter], Patch]:
    """Each writer projects out its own direction ``pick(writer)`` at ``strength``."""

    def at(writer: ResolvedWriter) -> Patch:
        direction = unit_direction(pick(writer)).reshape(1, -1)
        return Patch(lambda out, inputs: project_out_scaled(out, direction, strength))

    return at


def affine(direction: torch.Tensor, level: float, strength: float = 1.0) -> Callable[[ResolvedWriter], Patch]:
    """ACE in weights: writers projected at ``strength``; the embedding's component ``x·r̂`` along r̂ moved
    to ``x·r̂ − s (x·r̂ − level)`` (at strength 1: set to ``level``)."""
    r = unit_direction(direction)

    def embedding(out: torch.Tensor, inputs: tuple) -> torch.Tensor:
        component = out.double() @ r.double()
        return (out.double() - strength * (component - level)[..., None] * r.double()).to(out.dtype)

    def at(writer: ResolvedWriter) -> Patch:
        if writer.group == "embedding":
            return Patch(embedding)
        return Patch(lambda out, inputs: project_out_scaled(out, r.reshape(1, -1), strength))

    return at


@dataclass
class Demo:
    """The demo loaded, the run's default splits (seed 0), and its candidates at the last EOI token."""

    model: torch.nn.Module
    adapter: object
    tokenizer: object
    splits: dict
    candidate: torch.Tensor  # [layers, d_model]
    orthogonal: torch.Tensor  # [layers, d_model]: each candidate ⊥ its layer's harmless mean
    harmless_mean: torch.Tensor  # [layers, d_model]
    r: torch.Tensor  # the paper's unit direction

    @classmethod
    def load(cls, layer: int) -> Demo:
        loaded = load_model("demo", dtype="float32", device="cpu")
        splits = {
            kind: load_splits(kind, None, n_train=128, n_val=150, n_eval=32, n_parity=4, seed=0)
            for kind in ("harmful", "harmless")
        }
        demo = cls(loaded.model, resolve_adapter(loaded.model), loaded.tokenizer, splits, *(None,) * 4)
        harmful, harmless = demo.means(nullcontext())
        demo.candidate = candidate_directions(harmful, harmless)[-1]
        demo.orthogonal = candidate_directions(harmful, harmless, project_harmless=True)[-1]
        demo.harmless_mean = harmless[-1]
        demo.r = unit_direction(demo.candidate[layer])
        return demo

    def means(self, context: AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor]:
        """Harmful and harmless mean block inputs ``[1, layers, d_model]`` at the last EOI token, under
        ``context``."""
        train = {kind: encode(self.tokenizer, cut.train, batch_size=32) for kind, cut in self.splits.items()}
        with context:
            means = extract_means(self.model, self.adapter, train, 1, progress=False)
        return means["harmful"], means["harmless"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="harmful and harmless val prompts scored")
    parser.add_argument("--layer", type=int, default=15, help="the paper's layer (the demo's selection)")
    parser.add_argument("--strengths", default="0.8,0.9,1.0,1.1,1.2")
    parser.add_argument("--out", required=True, help="JSON rows")
    parser.add_argument("--plot", help="PNG of the front")
    args = parser.parse_args()
    started = time.perf_counter()
    demo = Demo.load(args.layer)
    model, adapter, tokenizer, splits = demo.model, demo.adapter, demo.tokenizer, demo.splits
    candidate, harmless_mean, r = demo.candidate, demo.harmless_mean, demo.r
    n_layers = candidate.shape[0]
    harmful = encode(tokenizer, splits["harmful"].val[: args.n], batch_size=args.n)
    harmless = encode(tokenizer, splits["harmless"].val[: args.n], batch_size=args.n)
    reference = last_logits(model, adapter, harmless)[0]
    ids = refusal_token_ids(tokenizer)
    rows: list[dict] = []

    def measure(family: str, label: str, operator: Callable | None) -> None:
        with ablated(model, adapter, operator) if operator else nullcontext():
            score = refusal_scores(last_logits(model, adapter, harmful)[0], ids).mean().item()
            kl = kl_divergence(reference, last_logits(model, adapter, harmless)[0]).mean().item()
        rows.append({"family": family, "variant": label, "refusal_score": score, "kl": kl})
        print(f"{family:12s} {label:42s} refusal score {score:7.3f}  first-token KL {kl:.4f}", flush=True)

    measure("original", "no edit", None)
    for s in (float(s) for s in args.strengths.split(",")):
        measure("paper", f"strength {s:g}", per_writer(lambda w: r, s))
    # ACE: the harmless stream's level along r̂ at the paper's layer, and a few others.
    harmless_level = float(harmless_mean[args.layer].double() @ r.double())
    for level in (-0.1, 0.05, 0.1, 0.2, harmless_level):
        measure("ACE", f"embedding level c = {level:.3f}", affine(r, level))
    for level in (0.025, 0.05, 0.1):
        for s in (0.85, 0.9, 0.95):
            measure("ACE", f"embedding level c = {level:.3f}, s {s:g}", affine(r, level, s))

    def written_layer(writer: ResolvedWriter) -> int:
        # The residual stream a writer adds to is the input of the next block (the embedding's: block 0).
        return 0 if writer.group == "embedding" else min(writer.layer + 1, n_layers - 1)

    own = {
        "own layer from 10, r̂ below": lambda w: candidate[written_layer(w)] if written_layer(w) >= 10 else r,
        "own layer clamped to 8–20": lambda w: candidate[min(max(written_layer(w), 8), 20)],
        "own layer ⊥ its harmless mean, from 10": lambda w: demo.orthogonal[max(written_layer(w), 10)],
    }
    for label, pick in own.items():
        for s in (0.8, 1.0):
            measure("per-layer", f"{label}, s {s:g}", per_writer(pick, s))
    remaining = candidate_directions(*demo.means(ablated(model, adapter, projection(r))))[-1]
    for layer in (args.layer, args.layer + 3):
        second = unit_direction(without(remaining[layer], r))
        basis = torch.stack([r, second])
        for s, w in ((1.0, 0.5), (1.0, 1.0), (0.8, 1.0)):
            label = f"rank 2, r̂₂ at layer {layer}, s {s:g}, w {w:g}"
            measure("refined", label, subspace_projection(basis, lambda writer, s=s, w=w: [s, s * w]))
    for blend in (0.25, 0.5):
        remainder = without(remaining[args.layer], r) / candidate[args.layer].double().norm()
        rotated = r.double() + blend * remainder
        measure("refined", f"r̂ rotated by {blend:g} × the remainder", per_writer(lambda w, d=rotated: d, 1.0))
    seconds = time.perf_counter() - started
    with open(args.out, "w") as handle:
        json.dump({"n": args.n, "layer": args.layer, "seconds": seconds, "rows": rows}, handle, indent=1)
    print(f"{len(rows)} variants in {seconds:.0f} s -> {args.out}")
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 5))
    markers = {"paper": "o-", "ACE": "s", "per-layer": "^", "refined": "D"}
    for family, style in markers.items():
        points = sorted((row["kl"], row["refusal_score"]) for row in rows if row["family"] == family)
        points = [p for p in points if p[0] < 0.25]
        if points:
            axis.plot(*zip(*points, strict=True), style, label=family, alpha=0.8)
    axis.set_xlabel("first-token KL on harmless val prompts (damage)")
    axis.set_ylabel("refusal score on harmful val prompts (lower = less refusal)")
    axis.set_title("Issue 15 levers vs the paper's strength curve (demo, hooks; KL < 0.25 shown)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
