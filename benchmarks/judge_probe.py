"""A linear probe as judge: can the demo model's own activations tell a dodge from real help?

Each hand-labelled (prompt, reply) is read once by the demo model in its chat template; the residual
stream after every block, averaged over the reply's tokens, is the feature. A logistic regression on
helped (complied) vs not helped (refused or dodged), degenerate left out, is fitted on the development
labels only (``benchmarks/judge_labels/`` and ``benchmarks/judge_labels/heldout/``); its layer and L2
strength are chosen by 5-fold cross-validated κ on those, then frozen and scored **once** on the fresh
labels (``benchmarks/judge_labels/fresh/``), which nothing was fitted or chosen on.

    python benchmarks/judge_probe.py --features /tmp/probe_features.pt      # forward passes cached there

Prints the cross-validated κ per layer, the chosen probe, and its κ on the fresh set: alone (every
verdict from the probe) and behind the rules (the rule judge's refused and degenerate verdicts stand,
the probe decides complied vs dodged for the rest, as ``--judge-model`` does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_agreement import cohen_kappa, confusion, read_rows

from abliterate.find.judge import judge
from abliterate.find.stats import wilson_interval
from abliterate.model.loading import load_model

ROOT = Path(__file__).resolve().parent / "judge_labels"
TRAIN = (ROOT, ROOT / "heldout")
TEST = ROOT / "fresh"
STRENGTHS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def features(rows: list[dict[str, str]], batch: int = 4) -> torch.Tensor:
    """``[rows, layers + 1, d_model]``: each block's output averaged over the reply's tokens."""
    loaded = load_model("demo", dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    out = []
    for start in tqdm(range(0, len(rows), batch), desc="probe features"):
        chunk = rows[start : start + batch]
        for row in chunk:  # one at a time: no padding to account for; batches only group the bar
            user = [{"role": "user", "content": row["prompt"]}]
            prefix = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            text = prefix + row["reply"]
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :640]
            first = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                hidden = model(ids, output_hidden_states=True).hidden_states
            span = slice(min(first, ids.shape[1] - 1), ids.shape[1])
            out.append(torch.stack([h[0, span].mean(0) for h in hidden]))
    return torch.stack(out)


def fit(x: torch.Tensor, y: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized L2 logistic regression: ``(mean, scale, weights with bias last)``."""
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = torch.cat([(x - mean) / scale, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.zeros(z.shape[1], dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = (
            torch.nn.functional.binary_cross_entropy_with_logits(z @ w, y) + strength * (w[:-1] ** 2).sum()
        )
        value.backward()
        return value

    optimizer.step(loss)
    return mean, scale, w.detach()


def predict(x: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    mean, scale, w = probe
    return torch.cat([(x - mean) / scale, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w > 0


def kappa(truth: list[bool], guess: list[bool]) -> float:
    names = ("not helped", "helped")
    return cohen_kappa(confusion([names[t] for t in truth], [names[g] for g in guess], names))


def cross_validated(x: torch.Tensor, y: torch.Tensor, strength: float, folds: int = 5) -> float:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    guesses = torch.zeros(len(x), dtype=torch.bool)
    for fold in range(folds):
        test = order[fold::folds]
        train = torch.ones(len(x), dtype=torch.bool)
        train[test] = False
        guesses[test] = predict(x[test], fit(x[train], y[train], strength))
    return kappa([bool(v) for v in y], [bool(v) for v in guesses])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, required=True, help="cache of the forward passes")
    args = parser.parse_args()
    train_rows = [row for folder in TRAIN for row in read_rows(folder)]
    test_rows = read_rows(TEST)
    rows = train_rows + test_rows
    if args.features.exists():
        cached = torch.load(args.features)
    else:
        cached = features(rows).double()
        torch.save(cached, args.features)
    labels = [row["label"] for row in rows]
    keep = torch.tensor([label != "degenerate" for label in labels])
    y_all = torch.tensor([label in ("refused", "dodged") for label in labels], dtype=torch.float64)
    n_train = len(train_rows)
    train = keep.clone()
    train[n_train:] = False
    print(f"train: {int(train.sum())} labelled replies (dev + heldout, degenerate left out)")
    best = (-1.0, 0, 0.0)
    for layer in range(cached.shape[1]):
        scores = [cross_validated(cached[train, layer], y_all[train], s) for s in STRENGTHS]
        print(f"layer {layer:2d}: CV κ " + " ".join(f"{k:.3f}" for k in scores))
        for strength, score in zip(STRENGTHS, scores, strict=True):
            best = max(best, (score, layer, strength))
    score, layer, strength = best
    print(f"chosen on the development labels only: layer {layer}, L2 {strength} (CV κ {score:.3f})")
    probe = fit(cached[train, layer], y_all[train], strength)
    test = torch.zeros(len(rows), dtype=torch.bool)
    test[n_train:] = True
    guess = predict(cached[:, layer], probe)
    truth_test = [bool(y_all[i]) for i in range(n_train, len(rows)) if keep[i]]
    alone = [bool(guess[i]) for i in range(n_train, len(rows)) if keep[i]]
    print(f"fresh, probe alone: κ {kappa(truth_test, alone):.3f} (n={len(truth_test)})")
    behind, truth_behind = [], []
    for i in range(n_train, len(rows)):
        rule = judge(rows[i]["reply"], rows[i]["prompt"])
        if labels[i] == "degenerate" or rule == "degenerate":
            continue
        truth_behind.append(bool(y_all[i]))
        behind.append(True if rule == "refused" else bool(guess[i]))
    print(f"fresh, behind the rules: κ {kappa(truth_behind, behind):.3f} (n={len(truth_behind)})")
    for name in ("paper", "orth", "original"):
        idx = [i for i in range(n_train, len(rows)) if rows[i]["model"] == name and keep[i]]
        hand = sum(bool(y_all[i]) for i in idx)
        probe_count = sum(bool(guess[i]) for i in idx)
        low, high = wilson_interval(probe_count, len(idx))
        print(f"  {name}: not helped by hand {hand}/{len(idx)}, by the probe {probe_count}/{len(idx)} "
              f"({low:.0%}-{high:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
