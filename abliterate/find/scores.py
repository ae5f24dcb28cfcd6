"""Refusal scores: how likely a reply starts as a refusal, and the per-candidate grid of such scores.

The refusal score of a prompt is the log-odds of its first token being a typical refusal's first token
("I", "As", "Sorry", …). Selection fills a ``CandidateScores`` grid with it (and with the first-token
KL on harmless prompts) by ``ablation_pass``; the search and the benchmarks score edits with it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from abliterate.adapters.spec import Adapter
from abliterate.model.batching import EncodedPrompts, last_logits

REFUSAL_PREFIXES = ("I", "As", "Sorry", "Unfortunately", "I'm", "I cannot", "I can't")


def refusal_token_ids(tokenizer: object, prefixes: tuple[str, ...] = REFUSAL_PREFIXES) -> list[int]:
    """First tokens of typical refusals ("I", "As", "Sorry", …), found from the tokenizer."""
    ids = []
    for prefix in prefixes:
        tokens = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        if tokens and tokens[0] not in ids:
            ids.append(tokens[0])
    return ids


def refusal_scores(logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """Per-row log-odds ``log p − log(1 − p)`` of starting with a refusal token, in float64."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    log_p = torch.logsumexp(log_probs[..., refusal_ids], dim=-1)
    return log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-12))


Pair = tuple[int, int]  # a candidate's (position index from the first EOI token, layer)


@dataclass
class CandidateScores:
    """Every score computed so far, float64 ``[n_positions, n_layers]`` each, NaN where not computed.

    Attributes:
        screen: refusal score on the few harmful screen prompts with the candidate ablated.
        screen_kl: first-token KL on the few harmless screen prompts with it ablated.
        ablation: refusal score on the harmful val prompts with it ablated.
        steering: refusal score on the harmless val prompts with it added at its layer.
        kl: first-token KL on the harmless val prompts with it ablated.
    """

    screen: torch.Tensor
    screen_kl: torch.Tensor
    ablation: torch.Tensor
    steering: torch.Tensor
    kl: torch.Tensor

    @classmethod
    def unscored(cls, n_positions: int, n_layers: int) -> CandidateScores:
        """All-NaN scores for a ``[n_positions, n_layers]`` candidate grid."""
        nan = torch.full((n_positions, n_layers), math.nan, dtype=torch.float64)
        return cls(*(nan.clone() for _ in fields(cls)))

    def as_dict(self) -> dict[str, torch.Tensor]:
        """``{name: scores}`` for ``RefusalDirection.scores``, plots and the manifest."""
        return {item.name: getattr(self, item.name) for item in fields(self)}


@dataclass(frozen=True)
class Scorer:
    """What every scoring forward pass needs.

    Attributes:
        model: the causal LM.
        adapter: its architecture description.
        candidates: ``[n_positions, n_layers, d_model]`` raw candidates (steering adds them as they are).
        units: the same candidates as float32 unit vectors (ablation projects them out).
        refusal_ids: refusal first-token ids.
        batch_size: rows per forward; several candidates share a forward when prompts are few.
        progress: show progress bars.
    """

    model: nn.Module
    adapter: Adapter
    candidates: torch.Tensor
    units: torch.Tensor
    refusal_ids: list[int]
    batch_size: int
    progress: bool


def ablation_pass(
    scorer: Scorer,
    encoded: EncodedPrompts,
    pairs: list[Pair],
    into: torch.Tensor,
    name: str,
    reference: torch.Tensor | None = None,
) -> None:
    """Write each candidate's ablation score into ``into[pair]``.

    The score is the mean refusal score on ``encoded`` with the candidate ablated, or with
    ``reference`` logits the mean first-token KL from them.
    """
    bar = tqdm(total=len(pairs), desc=f"select: {name}", unit="cand", disable=not scorer.progress)
    directions_per_forward = max(1, scorer.batch_size // encoded.count)
    with bar:
        for start in range(0, len(pairs), directions_per_forward):
            chunk = pairs[start : start + directions_per_forward]
            directions = torch.stack([scorer.units[pair] for pair in chunk])
            logits = last_logits(scorer.model, scorer.adapter, encoded, ablate=directions)
            for pair, rows in zip(chunk, logits, strict=True):
                if reference is None:
                    into[pair] = refusal_scores(rows, scorer.refusal_ids).mean()
                else:
                    into[pair] = kl_divergence(reference, rows).mean()
            bar.update(len(chunk))


def kl_divergence(reference_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ other) per row over the last axis, in float64."""
    log_p = torch.log_softmax(reference_logits.double(), dim=-1)
    log_q = torch.log_softmax(other_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)
