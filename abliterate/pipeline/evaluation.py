"""Refusal rate and harmless KL of the model before and after the edit (the manifest's ``evaluation``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from abliterate.config import RunConfig
from abliterate.find.evaluate import RefusalEvaluation, is_refusal, refusal_rate
from abliterate.find.judge import wilson_interval
from abliterate.find.scores import kl_divergence
from abliterate.model.batching import last_logits
from abliterate.model.chat import split_reply
from abliterate.pipeline.subject import Inputs, Subject


@dataclass(frozen=True)
class Baseline:
    """The unedited model's behaviour on the evaluation prompts.

    Attributes:
        refusals: refusal rate and greedy replies on the harmful eval prompts.
        harmless_logits: ``[n, vocab]`` last-position logits on the harmless eval prompts.
    """

    refusals: RefusalEvaluation
    harmless_logits: torch.Tensor


def evaluate_before(config: RunConfig, subject: Subject, inputs: Inputs) -> Baseline | None:
    """Measure the original model (``None`` with ``--no-evaluate``)."""
    if not config.evaluation.evaluate:
        return None
    return _measure(config, subject, inputs, "evaluate before")


def _measure(config: RunConfig, subject: Subject, inputs: Inputs, description: str) -> Baseline:
    """Greedy replies to the harmful eval prompts, and last-position logits on the harmless ones."""
    refusals = refusal_rate(
        subject.model,
        subject.tokenizer,
        inputs.harmful.eval,
        description=description,
        **generation_options(config, subject),
    )
    harmless_logits = last_logits(subject.model, subject.adapter, subject.encoded(inputs.harmless.eval))[0]
    return Baseline(refusals, harmless_logits)


def evaluate_after(
    config: RunConfig, subject: Subject, inputs: Inputs, before: Baseline | None
) -> dict[str, Any] | None:
    """Measure the edited model against ``before``: the manifest's ``evaluation`` (``None`` without one)."""
    if before is None:
        return None
    measured = _measure(config, subject, inputs, "evaluate after")
    after, harmless_after = measured.refusals, measured.harmless_logits
    examples = zip(inputs.harmful.eval, before.refusals.replies, after.replies, strict=True)
    return {
        "before": _rates(before.refusals),
        "after": _rates(after),
        "kl_harmless": kl_divergence(before.harmless_logits, harmless_after).mean().item(),
        "thinking": _thinking_split(subject, before.refusals, after),
        "examples": [
            {"prompt": prompt, "before": old, "after": new} for prompt, old, new in list(examples)[:5]
        ],
    }


def _rates(evaluation: RefusalEvaluation) -> dict[str, Any]:
    """Marker rate (``refusal_rate``, the paper's count) and judged rate with its 95 % interval."""
    refused = round(evaluation.judged_refusal_rate * evaluation.n)
    return {
        "refusal_rate": evaluation.refusal_rate,
        "judged_refusal_rate": evaluation.judged_refusal_rate,
        "judged_interval_95": wilson_interval(refused, evaluation.n),
        "n": evaluation.n,
    }


def generation_options(config: RunConfig, subject: Subject) -> dict[str, Any]:
    thinking = subject.replies.opens_thinking(subject.tokenizer)
    return dict(
        max_new_tokens=config.evaluation.max_new_tokens
        + (config.evaluation.max_thinking_tokens if thinking else 0),
        batch_size=subject.batch_size,
        progress=config.progress,
        chat=subject.replies,
    )


def _thinking_split(subject: Subject, *evaluations: RefusalEvaluation) -> dict[str, Any] | None:
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
