"""The model before and after the edit, measured with the evaluation instrument (the manifest's
``evaluation``).

Before: judged greedy replies to the harmful eval prompts; the original's replies to harmless prompts,
kept as the multi-token KL reference (``abliterate.find.damage``) and judged for over-refusal and
degenerate replies; judged replies to the look-dangerous-but-safe prompts; first-token logits on the
harmless eval prompts. After: the same on the edited model, and the KL figures against the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from abliterate.config import RunConfig
from abliterate.find.damage import DamageReference, multi_token_kl, record_reference
from abliterate.find.evaluate import JudgedSet, evaluate_sets, is_refusal, judge_set
from abliterate.find.scores import kl_divergence
from abliterate.find.stats import paired_bootstrap
from abliterate.model.batching import last_logits
from abliterate.model.chat import split_reply
from abliterate.model.prompts import bundled, has_bundled
from abliterate.pipeline.subject import Inputs, Subject

# The original's most likely tokens kept per reply position: the edited model is measured after the fold,
# without hooks, so the multi-token KL is the (tight) lower bound of ``abliterate.find.damage``.
KEEP_TOP = 256


@dataclass(frozen=True)
class Baseline:
    """The unedited model's behaviour on the evaluation prompts.

    Attributes:
        harmful: judged replies to the harmful eval prompts.
        harmless_logits: ``[n, vocab]`` last-position logits on the harmless eval prompts.
        over_refusal: judged replies to the harmless and (when bundled) look-dangerous-but-safe prompts.
        reference: the original's harmless replies as tokens, for the multi-token KL.
    """

    harmful: JudgedSet
    harmless_logits: torch.Tensor
    over_refusal: dict[str, JudgedSet]
    reference: DamageReference | None = None


def evaluate_before(config: RunConfig, subject: Subject, inputs: Inputs) -> Baseline | None:
    """Measure the original model (``None`` with ``--no-evaluate``)."""
    if not config.evaluation.evaluate:
        return None
    harmless = over_refusal_prompts(config, inputs)["harmless"]
    options = generation_options(config, subject)
    reference = record_reference(
        subject.model,
        subject.tokenizer,
        harmless,
        max_new_tokens=options["max_new_tokens"],
        batch_size=options["batch_size"],
        chat=subject.replies,
        keep_top=KEEP_TOP,
        progress=config.progress,
    )
    measured = _measure(config, subject, inputs, "evaluate before", skip_harmless=True)
    over_refusal = {"harmless": judge_set(harmless, reference.replies), **measured.over_refusal}
    return Baseline(measured.harmful, measured.harmless_logits, over_refusal, reference)


def over_refusal_prompts(config: RunConfig, inputs: Inputs) -> dict[str, list[str]]:
    """The harmless eval prompts and the bundled look-dangerous-but-safe ones, ``--n-over-refusal`` each."""
    n = config.evaluation.n_over_refusal
    sets = {"harmless": inputs.harmless.eval[:n]}
    if has_bundled("lookalike", "eval"):
        sets["lookalike"] = bundled("lookalike", "eval")[:n]
    return sets


def _measure(
    config: RunConfig, subject: Subject, inputs: Inputs, description: str, *, skip_harmless: bool = False
) -> Baseline:
    """Judged replies to the harmful prompts and the over-refusal sets, and first-token logits."""
    sets = {
        name: prompts
        for name, prompts in over_refusal_prompts(config, inputs).items()
        if not (skip_harmless and name == "harmless")
    }
    options = generation_options(config, subject)
    judged = evaluate_sets(
        subject.model,
        subject.tokenizer,
        {"harmful": inputs.harmful.eval, **sets},
        **options,
        description=f"{description}: {', '.join(['harmful', *sets])}",
    )
    harmful = judged.pop("harmful")
    over_refusal = judged
    harmless_logits = last_logits(subject.model, subject.adapter, subject.encoded(inputs.harmless.eval))[0]
    return Baseline(harmful, harmless_logits, over_refusal)


def evaluate_after(
    config: RunConfig, subject: Subject, inputs: Inputs, before: Baseline | None
) -> dict[str, Any] | None:
    """Measure the edited model against ``before``: the manifest's ``evaluation`` (``None`` without one).

    Returns:
        ``before``/``after`` (harmful set: ``JudgedSet.summary`` plus the older names ``refusal_rate``
        for the marker rate and ``judged_refusal_rate``/``judged_interval_95`` for the not-helped rate),
        ``not_helped_difference`` (after − before, paired bootstrap), ``over_refusal`` (per set, before
        and after), ``kl_harmless`` (first token), ``multi_token_kl``, ``max_new_tokens``, ``thinking``
        and ``examples``.
    """
    if before is None:
        return None
    after = _measure(config, subject, inputs, "evaluate after")
    examples = zip(inputs.harmful.eval, before.harmful.replies, after.harmful.replies, strict=True)
    result: dict[str, Any] = {
        "before": before.harmful.summary() | before.harmful.legacy_rates(),
        "after": after.harmful.summary() | after.harmful.legacy_rates(),
        "not_helped_difference": vars(
            paired_bootstrap(after.harmful.not_helped(), before.harmful.not_helped())
        ),
        "over_refusal": {
            name: {"before": judged.summary(), "after": after.over_refusal[name].summary()}
            for name, judged in before.over_refusal.items()
        },
        "kl_harmless": kl_divergence(before.harmless_logits, after.harmless_logits).mean().item(),
        "max_new_tokens": generation_options(config, subject)["max_new_tokens"],
        "thinking": _thinking_split(subject, before.harmful, after.harmful),
        "examples": [
            {"prompt": prompt, "before": old, "after": new} for prompt, old, new in list(examples)[:5]
        ],
    }
    if before.reference is not None:
        damage = multi_token_kl(subject.model, before.reference, batch_size=max(1, subject.batch_size // 4))
        result["multi_token_kl"] = {
            "mean": damage.mean,
            "n_prompts": damage.n_prompts,
            "n_tokens": damage.n_tokens,
            "top_tokens_kept": KEEP_TOP,
        }
    return result


def generation_options(config: RunConfig, subject: Subject) -> dict[str, Any]:
    """How evaluation replies are generated: length (plus the thinking allowance), batch, chat format."""
    thinking = subject.replies.opens_thinking(subject.tokenizer)
    return dict(
        max_new_tokens=config.evaluation.max_new_tokens
        + (config.evaluation.max_thinking_tokens if thinking else 0),
        batch_size=subject.batch_size,
        progress=config.progress,
        chat=subject.replies,
    )


def _thinking_split(subject: Subject, *evaluations: JudgedSet) -> dict[str, Any] | None:
    """For replies that open a thinking block: per evaluation, the refusal rate in the answer and inside
    the block, and how many replies never closed it (raise ``--max-thinking-tokens``); else ``None``."""
    thinking = subject.replies.thinking
    if thinking is None or not subject.replies.opens_thinking(subject.tokenizer):
        return None
    inside = subject.replies.render(subject.tokenizer, "Hi").rstrip().endswith(thinking.open)
    split: dict[str, Any] = {"format": thinking.name}
    for name, evaluation in zip(("before", "after"), evaluations, strict=False):
        parts = [split_reply(reply, thinking, inside) for reply in evaluation.replies]
        n = max(len(parts), 1)
        split[name] = {
            "refusal_rate_in_answer": sum(is_refusal(part.answer) for part in parts) / n,
            "refusal_rate_in_thinking": sum(is_refusal(part.thinking) for part in parts) / n,
            "unfinished": sum(not part.finished for part in parts),
            "n": len(parts),
        }
    return split
