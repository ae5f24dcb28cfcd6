"""Choose the candidate whose ablation removes refusal best (Arditi et al. 2024, with a cheaper search).

Scores per candidate r̂ = c / |c|:
- ablation score: mean refusal score on harmful val prompts with r̂ projected out everywhere;
- steering score: mean refusal score on harmless val prompts with c added at its layer;
- KL: first-token KL(original ‖ ablated) on harmless val prompts.
The paper discards NaN, layer ≥ 0.8·n_layers, KL > 0.1 and steering < 0, then takes the lowest
ablation score. We compute the same choice with less work: a coarse ablation screen on a few prompts
keeps the best ``screen_keep`` candidates, those get the full ablation score, and KL and steering are
computed lazily in ablation order until the first candidate passes every filter. The screen itself
visits every second layer, then the layers next to the best candidates, and also measures KL on a few
harmless prompts so candidates that clearly damage the model are scored last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from abliterate.adapters import Adapter
from abliterate.batching import EncodedPrompts, last_logits
from abliterate.parity import kl_divergence

REFUSAL_PREFIXES = ("I", "As", "Sorry", "Unfortunately", "I'm", "I cannot", "I can't")


@dataclass(frozen=True)
class RefusalDirection:
    """The chosen direction and how it was found.

    Attributes:
        direction: unit vector ``[d_model]``, float32, on the CPU.
        layer: block whose input it was measured at.
        position: EOI position, negative from the end (``-1`` = last token).
        ablation_score: mean refusal score on harmful prompts with it ablated.
        steering_score: mean refusal score on harmless prompts with it added.
        kl: first-token KL on harmless prompts with it ablated.
        scores: ``{"ablation", "steering", "kl", "screen"}`` → ``[n_positions, n_layers]`` (NaN = not
            computed) for plots and the manifest.
    """

    direction: torch.Tensor
    layer: int
    position: int
    ablation_score: float = math.nan
    steering_score: float = math.nan
    kl: float = math.nan
    scores: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


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


def _units(candidates: torch.Tensor) -> torch.Tensor:
    return (candidates / candidates.norm(dim=-1, keepdim=True)).float()


def select_direction(
    model: nn.Module,
    adapter: Adapter,
    candidates: torch.Tensor,
    harmful_val: EncodedPrompts,
    harmless_val: EncodedPrompts,
    harmful_screen: EncodedPrompts,
    refusal_ids: list[int],
    harmless_screen: EncodedPrompts | None = None,
    *,
    max_layer_fraction: float = 0.8,
    max_kl: float = 0.1,
    min_steering: float | None = None,
    screen_keep: int = 6,
    batch_size: int = 32,
    n_layers: int | None = None,
    layer_stride: int = 2,
    progress: bool = True,
) -> RefusalDirection:
    """Pick the candidate with the lowest ablation score among those that pass every filter.

    Args:
        model: the causal LM.
        adapter: its architecture description.
        candidates: ``[n_positions, n_layers, d_model]`` from ``extract_candidates``.
        harmful_val: harmful validation prompts (ablation score).
        harmless_val: harmless validation prompts (steering score and KL).
        harmful_screen: a few harmful prompts for the coarse screen.
        refusal_ids: refusal first-token ids.
        harmless_screen: a few harmless prompts on which the screen also measures KL, so candidates
            that clearly break the model (screen KL above twice ``max_kl``) are scored last.
        max_layer_fraction: discard candidates at layer ≥ this fraction of the depth.
        max_kl: discard candidates whose harmless KL exceeds this.
        min_steering: discard candidates whose steering score is below this; ``None`` (default) asks
            that adding the candidate raise the harmless prompts' refusal score above its unsteered
            value. The paper's absolute threshold 0 (p(refusal) ≥ ½) is unreachable for small models
            whose refusals themselves score below 0 (the demo model: −0.65 on harmful prompts).
        screen_keep: candidates kept after the screen.
        batch_size: rows per forward; several candidates share a forward when prompts are few.
        n_layers: depth of the model (default: the candidates' layer count); extraction may stop
            early, so the candidates can cover fewer layers than the model has.
        layer_stride: screen every ``layer_stride``-th layer first, then the layers beside the best
            (1 screens every candidate).
        progress: show progress bars.

    Returns:
        The chosen direction with all computed scores.

    Raises:
        LookupError: no candidate passes the filters.
    """
    n_positions, n_extracted, _ = candidates.shape
    n_layers = n_layers or n_extracted
    # A zero candidate (e.g. at the embedding, where both prompt sets end in the same EOI tokens) has
    # no direction: it would only score NaN, so it is not scored at all.
    norms = candidates.norm(dim=-1)
    eligible = [
        (pos, layer)
        for layer in range(n_extracted)
        if layer < max_layer_fraction * n_layers
        for pos in range(n_positions)
        if torch.isfinite(norms[pos, layer]) and norms[pos, layer] > 0
    ]
    nan = torch.full((n_positions, n_extracted), math.nan, dtype=torch.float64)
    scores = {name: nan.clone() for name in ("screen", "screen_kl", "ablation", "steering", "kl")}
    units = _units(candidates)

    def ablation_pass(
        encoded: EncodedPrompts,
        pairs: list[tuple[int, int]],
        name: str,
        reference: torch.Tensor | None = None,
    ) -> None:
        """Score each candidate's ablation: refusal score, or KL from ``reference`` logits when given."""
        bar = tqdm(
            total=len(pairs), desc=f"select: {name.replace('_', ' ')}", unit="cand", disable=not progress
        )
        directions_per_forward = max(1, batch_size // encoded.count)
        with bar:
            for start in range(0, len(pairs), directions_per_forward):
                chunk = pairs[start : start + directions_per_forward]
                directions = torch.stack([units[pos, layer] for pos, layer in chunk])
                logits = last_logits(model, adapter, encoded, ablate=directions)
                for (pos, layer), rows in zip(chunk, logits, strict=True):
                    if reference is None:
                        scores[name][pos, layer] = refusal_scores(rows, refusal_ids).mean()
                    else:
                        scores[name][pos, layer] = kl_divergence(reference, rows).mean()
                bar.update(len(chunk))

    screen_reference = None if harmless_screen is None else last_logits(model, adapter, harmless_screen)[0]

    def screen(pairs: list[tuple[int, int]]) -> None:
        ablation_pass(harmful_screen, pairs, "screen")
        if harmless_screen is not None:
            ablation_pass(harmless_screen, pairs, "screen_kl", screen_reference)

    def screen_order(pair: tuple[int, int]) -> tuple[bool, bool, float]:
        # Unscreened candidates go last, then those whose screen KL already breaks the bound.
        unscreened = math.isnan(scores["screen"][pair])
        breaks_model = bool(scores["screen_kl"][pair] > 2 * max_kl)
        return unscreened, breaks_model, _sort_key(scores["screen"][pair])

    # Neighbouring layers give similar candidates: screen every ``layer_stride``-th layer, then the
    # skipped layers next to the best screened candidates.
    coarse = [pair for pair in eligible if pair[1] % layer_stride == 0]
    screen(coarse)
    best = sorted(coarse, key=screen_order)[: max(1, screen_keep // 2)]
    neighbours = {
        (pos, layer + step)
        for pos, layer in best
        for step in range(1 - layer_stride, layer_stride)
        if step and (pos, layer + step) in eligible and (pos, layer + step) not in coarse
    }
    screen(sorted(neighbours))
    by_screen = sorted(eligible, key=screen_order)
    baseline = last_logits(model, adapter, harmless_val)[0]
    if min_steering is None:
        min_steering = refusal_scores(baseline, refusal_ids).mean().item()
    # Full scores for the best screened candidates; if none of them passes the filters, the next ones.
    for start in range(0, len(by_screen), screen_keep):
        group = by_screen[start : start + screen_keep]
        ablation_pass(harmful_val, group, "ablation")
        ranked = sorted(group, key=lambda pair: _sort_key(scores["ablation"][pair]))
        for pos, layer in tqdm(ranked, desc="select: filters", unit="cand", disable=not progress):
            ablation = scores["ablation"][pos, layer].item()
            if math.isnan(ablation):
                continue
            ablated = last_logits(model, adapter, harmless_val, ablate=units[pos, layer][None])[0]
            kl = kl_divergence(baseline, ablated).mean().item()
            scores["kl"][pos, layer] = kl
            if not kl <= max_kl:
                continue
            vector = candidates[pos, layer].float()
            steered = last_logits(model, adapter, harmless_val, steer=(vector, layer))[0]
            steering = refusal_scores(steered, refusal_ids).mean().item()
            scores["steering"][pos, layer] = steering
            if not steering > min_steering:
                continue
            return RefusalDirection(
                direction=units[pos, layer].clone(),
                layer=layer,
                position=pos - n_positions,
                ablation_score=ablation,
                steering_score=steering,
                kl=kl,
                scores=scores,
            )
    raise LookupError(
        f"no candidate passed the filters (KL ≤ {max_kl}, steering > {min_steering:.3g}, "
        f"layer < {max_layer_fraction:.0%} of {n_layers}); relax them or give --layer and --position"
    )


def _sort_key(value: torch.Tensor) -> float:
    value = float(value)
    return math.inf if math.isnan(value) else value


def direction_at(candidates: torch.Tensor, layer: int, position: int) -> RefusalDirection:
    """The candidate at ``(position, layer)`` chosen by hand (``--layer/--position``), no scoring.

    Raises:
        ValueError: the layer or position is out of range.
    """
    n_positions, n_layers, _ = candidates.shape
    if not 0 <= layer < n_layers:
        raise ValueError(f"--layer {layer} is out of range: the model has {n_layers} layers")
    if not -n_positions <= position < n_positions:
        raise ValueError(f"--position {position} is out of range: there are {n_positions} EOI tokens")
    index = position % n_positions
    return RefusalDirection(
        direction=_units(candidates[index, layer]).clone(), layer=layer, position=index - n_positions
    )
