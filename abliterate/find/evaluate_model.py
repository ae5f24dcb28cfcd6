"""``abliterate evaluate``: one model's figures, optionally against the original it was made from.

Per prompt set (harmful, harmless, look-dangerous-but-safe) the judged replies' summary
(``abliterate.find.evaluate.JudgedSet.summary``); with a baseline, also the baseline's, the first-token KL
and the multi-token KL on harmless prompts (``abliterate.find.damage``), and a paired bootstrap of the
not-helped difference on the harmful prompts. Each model is loaded once, one at a time. With a judge
model (``abliterate.find.judge_model``), it is loaded last and decides complied or dodged on every set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from abliterate.config import LoadConfig
from abliterate.find import evaluate  # called through its module, so tests can replace generation
from abliterate.find.damage import DamageReference, KLSummary, multi_token_kl, record_reference
from abliterate.find.evaluate import EVAL_MAX_NEW_TOKENS, JudgedSet
from abliterate.find.judge_model import ModelJudge
from abliterate.find.scores import kl_divergence
from abliterate.find.stats import paired_bootstrap
from abliterate.model import loading  # called through its module, so tests can replace a load
from abliterate.model.batching import encode, forward_batches
from abliterate.model.prompt_files import read_prompts
from abliterate.model.prompts import bundled, has_bundled

# The original's most likely tokens kept per reply position when the edited model is a separate
# checkpoint: the multi-token KL is then a (tight) lower bound, see ``abliterate.find.damage``.
KEEP_TOP = 256


@dataclass(frozen=True)
class Measured:
    """One model's judged sets and first-token logits on the harmless prompts."""

    sets: dict[str, JudgedSet]
    harmless_logits: torch.Tensor


def prompt_sets(
    harmful: str | None, harmless: str | None, lookalike: str | None, n_prompts: int | None
) -> dict[str, list[str]]:
    """The evaluation's prompt sets: the given sources or the bundled eval splits, the first ``n_prompts``
    of each or all of them (``None``); the look-dangerous-but-safe set only when given or bundled."""
    sets = {
        "harmful": read_prompts(harmful) if harmful else bundled("harmful", "eval"),
        "harmless": read_prompts(harmless) if harmless else bundled("harmless", "eval"),
    }
    if lookalike or has_bundled("lookalike", "eval"):
        sets["lookalike"] = read_prompts(lookalike) if lookalike else bundled("lookalike", "eval")
    return {name: prompts[:n_prompts] for name, prompts in sets.items()}


def evaluate_model(
    model: str,
    *,
    baseline: str | None = None,
    harmful: str | None = None,
    harmless: str | None = None,
    lookalike: str | None = None,
    n_prompts: int | None = None,
    load: LoadConfig | None = None,
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
    damage_tokens: int = 64,
    judge_model: str | None = None,
) -> dict[str, Any]:
    """Not-helped rates of ``model`` per prompt set, and its damage against ``baseline``.

    Returns:
        ``model``, ``sets`` (per set, ``JudgedSet.summary``), ``max_new_tokens`` and, for older readers,
        ``refusal_rate`` (markers), ``judged_refusal_rate`` (not helped), ``judged_interval_95`` and ``n``
        on the harmful set; with a baseline also ``baseline``, ``baseline_sets``,
        ``baseline_refusal_rate``, ``baseline_judged_refusal_rate``, ``kl_harmless`` (first token),
        ``multi_token_kl`` and ``not_helped_difference`` (model − baseline on the harmful prompts, paired);
        ``judge``: which judge gave the verdicts (the rules, or ``judge_model`` with the rules).

    Raises:
        FileNotFoundError: ``judge_model`` names no model (checked before any model is loaded).
        ValueError: ``n_prompts``, ``max_new_tokens`` or ``damage_tokens`` below 1, ``load.device`` not a
            device of this machine, or a prompt source is malformed.
    """
    load = load or LoadConfig()
    _check_options(load, judge_model, n_prompts, max_new_tokens, damage_tokens)
    sets = prompt_sets(harmful, harmless, lookalike, n_prompts)
    reference: DamageReference | None = None
    base: Measured | None = None
    if baseline is not None:
        loaded = loading.load_model(baseline, dtype=load.dtype, device=load.device, dispatch=load.dispatch)
        base = _measure(loaded, sets, max_new_tokens)
        reference = record_reference(
            loaded.model, loaded.tokenizer, sets["harmless"], max_new_tokens=damage_tokens, keep_top=KEEP_TOP
        )
        del loaded
    loaded = loading.load_model(model, dtype=load.dtype, device=load.device, dispatch=load.dispatch)
    measured = _measure(loaded, sets, max_new_tokens)
    damage = None if reference is None else multi_token_kl(loaded.model, reference)
    del loaded  # one model at a time: the judge model comes next
    judge_name = "rules"
    if judge_model is not None:
        judge_name, measured, base = _judged_by_model(judge_model, load, measured, base)
    result = {
        "model": model,
        "judge": judge_name,
        **measured.sets["harmful"].legacy_rates(),
        "max_new_tokens": max_new_tokens,
    }
    result["sets"] = {name: judged.summary() for name, judged in measured.sets.items()}
    if base is not None and damage is not None:
        result |= {"baseline": baseline, **_against(measured, base, damage, damage_tokens)}
    return result


def _check_options(load: LoadConfig, judge_model: str | None, *counts: int | None) -> None:
    """Refuse bad options before any model is loaded: counts below 1, a device this machine lacks, a
    ``--judge-model`` that names no model."""
    for name, value in zip(("--n", "--max-new-tokens", "damage_tokens"), counts, strict=True):
        if value is not None and value < 1:  # a negative count would slice from the end
            raise ValueError(f"{name} must be at least 1, got {value}")
    loading.check_device(load.device)
    if judge_model is not None:
        try:
            loading.checked_source(judge_model)  # the loader's own check of a source, without loading it
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--judge-model: {error}") from error


def _judged_by_model(
    source: str, load: LoadConfig, measured: Measured, base: Measured | None
) -> tuple[str, Measured, Measured | None]:
    """The judge model's name and the measured sets with its verdicts (loaded after the models judged)."""
    loaded = loading.load_model(source, dtype=load.dtype, device=load.device)
    model_judge = ModelJudge(loaded.model, loaded.tokenizer, source)

    def rejudged(found: Measured) -> Measured:
        sets = {
            name: replace(
                judged, verdicts=model_judge.refine(judged.prompts, judged.replies, judged.verdicts)
            )
            for name, judged in found.sets.items()
        }
        return replace(found, sets=sets)

    name = f"model {source} (complied or dodged; the rules' refused and degenerate verdicts kept)"
    return name, rejudged(measured), None if base is None else rejudged(base)


def _against(measured: Measured, base: Measured, damage: KLSummary, damage_tokens: int) -> dict[str, Any]:
    """The model's figures against its baseline: the baseline's sets, KL, the paired difference."""
    difference = paired_bootstrap(measured.sets["harmful"].not_helped(), base.sets["harmful"].not_helped())
    legacy = base.sets["harmful"].legacy_rates()
    return {
        "baseline_refusal_rate": legacy["refusal_rate"],
        "baseline_judged_refusal_rate": legacy["judged_refusal_rate"],
        "baseline_sets": {name: judged.summary() for name, judged in base.sets.items()},
        "kl_harmless": kl_divergence(base.harmless_logits, measured.harmless_logits).mean().item(),
        "multi_token_kl": {
            "mean": damage.mean,
            "n_prompts": damage.n_prompts,
            "n_tokens": damage.n_tokens,
            "max_new_tokens": damage_tokens,
            "top_tokens_kept": KEEP_TOP,
        },
        "not_helped_difference": vars(difference),
    }


def _measure(loaded: Any, sets: dict[str, list[str]], max_new_tokens: int) -> Measured:
    """Judged replies to every set and first-token logits on the harmless prompts."""
    judged = evaluate.evaluate_sets(
        loaded.model, loaded.tokenizer, sets, max_new_tokens=max_new_tokens, description=", ".join(sets)
    )
    encoded = encode(loaded.tokenizer, sets["harmless"], batch_size=32, sort_by_length=False)
    logits = torch.cat([chunk.float().cpu() for chunk in forward_batches(loaded.model, encoded)])
    return Measured(judged, logits)


def format_evaluation(result: dict[str, Any]) -> list[str]:
    """``evaluate_model``'s result as lines of text: one per set and model, then the damage figures."""
    lines = [
        f"model {result['model']}" + (f"   baseline {result['baseline']}" if "baseline" in result else "")
    ]
    lines.append(f"judge: {result.get('judge', 'rules')}")
    lines.append(f"replies: greedy, {result['max_new_tokens']} new tokens; not helped = refused + dodged")
    for name, summary in result["sets"].items():
        lines.append(_set_line(name, "model", summary))
        if "baseline_sets" in result:
            lines.append(_set_line(name, "baseline", result["baseline_sets"][name]))
    if "kl_harmless" in result:
        damage = result["multi_token_kl"]
        difference = result["not_helped_difference"]
        lines += [
            f"first-token KL (harmless)   {result['kl_harmless']:.4f}",
            f"multi-token KL (harmless)   {damage['mean']:.4f}  ({damage['n_prompts']} prompts, "
            f"{damage['n_tokens']} tokens of the baseline's replies)",
            f"not helped, model - baseline (harmful, paired)  {difference['mean']:+.1%} "
            f"(95 % CI {difference['low']:+.1%} to {difference['high']:+.1%}, n={difference['n']})",
        ]
    return lines


def _set_line(name: str, who: str, summary: dict[str, Any]) -> str:
    low, high = summary["not_helped_interval_95"]
    counts = " ".join(f"{verdict} {count}" for verdict, count in summary["counts"].items())
    return (
        f"{name:9s} {who:8s} not helped {summary['not_helped_rate']:6.1%} (95 % CI {low:.1%}–{high:.1%}, "
        f"n={summary['n']})  degenerate {summary['degenerate_rate']:.1%}  markers "
        f"{summary['marker_rate']:.1%}  [{counts}]"
    )
