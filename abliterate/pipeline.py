"""``abliterate run``: load → extract → select → evaluate → fold → parity gate → save → push."""

from __future__ import annotations

import json
import logging
import math
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from abliterate.config import RunConfig

logger = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """The edited model does not reproduce the hooked original; nothing was saved or pushed."""


@dataclass
class RunResult:
    """What ``run`` produced.

    Attributes:
        manifest: the ``abliterate.json`` content.
        output: the directory written, or ``None`` (push only, or parity failed).
        url: the Hub URL pushed to, if any.
    """

    manifest: dict[str, Any]
    output: Path | None = None
    url: str | None = None
    messages: list[str] = field(default_factory=list)


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.timings[f"{name}_s"] = round(time.perf_counter() - begin, 3)

    def total(self) -> dict[str, float]:
        return {**self.timings, "total_s": round(time.perf_counter() - self.start, 3)}


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run(config: RunConfig, *, hub_api: object | None = None) -> RunResult:
    """Run the whole pipeline for one model.

    Args:
        config: the run configuration.
        hub_api: Hub API object for pushing (tests pass a recording fake).

    Returns:
        The manifest and where the result went.

    Raises:
        ParityError: the edited model failed the parity gate (nothing written or pushed).
        FileNotFoundError, FileExistsError, PermissionError, ValueError, LookupError: bad input,
            raised before any heavy work where it can be known then.
    """
    from abliterate import __version__
    from abliterate.adapters import resolve_adapter
    from abliterate.batching import all_position_logits, encode, eoi_length, last_logits
    from abliterate.checkpoint import atomic_directory, check_output_dir, save_model
    from abliterate.direction import save_direction
    from abliterate.edit import fold_direction
    from abliterate.evaluate import refusal_rate
    from abliterate.extract import extract_candidates
    from abliterate.hooks import ablate_direction
    from abliterate.hub import check_push_auth, push_folder
    from abliterate.loading import load_model
    from abliterate.parity import compare_logits, kl_divergence
    from abliterate.prompts import load_splits
    from abliterate.report import model_card, plot_candidate_scores
    from abliterate.select import direction_at, refusal_token_ids, select_direction

    # Cheap checks first: bad input must fail before minutes of work.
    output = check_output_dir(config.output, config.overwrite) if config.output else None
    token = check_push_auth(config.push_to_hub, hub_api) if config.push_to_hub else None
    sizes = dict(
        n_train=config.n_train,
        n_val=config.n_val,
        n_eval=config.n_eval,
        n_parity=config.n_parity,
        seed=config.seed,
    )
    harmful = load_splits("harmful", config.harmful, **sizes)
    harmless = load_splits("harmless", config.harmless, **sizes)

    timer = _Timer()
    with timer.stage("load"):
        loaded = load_model(
            config.model,
            dtype=config.dtype,
            device=config.device,
            trust_remote_code=config.trust_remote_code,
            allow_pickle=config.allow_pickle,
        )
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = resolve_adapter(model, config.architecture)
    if config.batch_size == "auto":
        from dataclasses import replace

        from abliterate.batching import auto_batch_size

        config = replace(config, batch_size=auto_batch_size(model, tokenizer, harmful.train + harmless.train))
    n_eoi = eoi_length(tokenizer, config.system_prompt)

    def encoded(prompts: list[str]) -> Any:
        return encode(
            tokenizer,
            prompts,
            batch_size=config.batch_size,
            system_prompt=config.system_prompt,
            keep_last=n_eoi,
        )

    from abliterate.adapters.resolve import blocks_of

    n_layers = len(blocks_of(model, adapter)[1])
    with timer.stage("extract"):
        # Selection never looks at layers past the fraction, so the forward pass stops there.
        if config.layer is None:
            limit = min(n_layers, max(1, math.ceil(config.max_layer_fraction * n_layers)))
        else:
            limit = min(n_layers, config.layer + 1)
        candidates = extract_candidates(
            model,
            adapter,
            encoded(harmful.train),
            encoded(harmless.train),
            n_eoi,
            limit,
            project_harmless=config.project_harmless,
            progress=config.progress,
        )
    refusal_ids = refusal_token_ids(tokenizer)
    with timer.stage("select"):
        if config.layer is not None:
            chosen = direction_at(candidates, config.layer, config.position)
        else:
            chosen = select_direction(
                model,
                adapter,
                candidates,
                encoded(harmful.val),
                encoded(harmless.val),
                encoded(harmful.val[: config.screen_prompts]),
                refusal_ids,
                harmless_screen=encoded(harmless.val[: config.screen_prompts]),
                max_layer_fraction=config.max_layer_fraction,
                max_kl=config.max_kl,
                min_steering=config.min_steering,
                screen_keep=config.screen_keep,
                batch_size=config.batch_size,
                n_layers=n_layers,
                layer_stride=config.layer_stride,
                progress=config.progress,
            )
    generate = dict(
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        system_prompt=config.system_prompt,
        progress=config.progress,
    )
    before = None
    with timer.stage("evaluate"):
        if config.evaluate:
            before = refusal_rate(model, tokenizer, harmful.eval, description="evaluate before", **generate)
            harmless_before = last_logits(model, adapter, encoded(harmless.eval))[0]
    with timer.stage("verify"):
        # One batch, padded once, so hooked and edited logits line up position by position.
        parity_texts = harmful.parity + harmless.parity
        parity_prompts = encode(
            tokenizer,
            parity_texts,
            batch_size=len(parity_texts),
            system_prompt=config.system_prompt,
            share_prefix=False,
        )
        parity_mask = parity_prompts.batches[0][1]
        with ablate_direction(model, adapter, chosen.direction):
            reference = all_position_logits(model, parity_prompts)
    with timer.stage("edit"):
        fold_direction(model, adapter, chosen.direction)
    verify_started = time.perf_counter()
    edited = all_position_logits(model, parity_prompts)
    parity = compare_logits(reference, edited, loaded.dtype_name, parity_mask)
    timer.timings["verify_s"] = round(timer.timings["verify_s"] + time.perf_counter() - verify_started, 3)
    del reference, edited
    evaluation = None
    if parity.passed and config.evaluate:
        with timer.stage("evaluate_after"):
            after = refusal_rate(model, tokenizer, harmful.eval, description="evaluate after", **generate)
            harmless_after = last_logits(model, adapter, encoded(harmless.eval))[0]
            kl = kl_divergence(harmless_before, harmless_after).mean().item()
        timer.timings["evaluate_s"] = round(
            timer.timings["evaluate_s"] + timer.timings.pop("evaluate_after_s"), 3
        )
        evaluation = {
            "before": {"refusal_rate": before.refusal_rate, "n": before.n},
            "after": {"refusal_rate": after.refusal_rate, "n": after.n},
            "kl_harmless": kl,
            "examples": [
                {"prompt": prompt, "before": old, "after": new}
                for prompt, old, new in list(zip(harmful.eval, before.replies, after.replies, strict=True))[
                    :5
                ]
            ],
        }
    import transformers

    manifest: dict[str, Any] = {
        "abliterate_version": __version__,
        "model": {
            "source": config.model,
            "base_model": loaded.base_model,
            "model_type": model.config.model_type,
            "adapter": adapter.name,
            "dtype": loaded.dtype_name,
            "n_layers": n_layers,
        },
        "direction": {
            "layer": chosen.layer,
            "position": chosen.position,
            "n_eoi_tokens": n_eoi,
            "ablation_score": chosen.ablation_score,
            "steering_score": chosen.steering_score,
            "kl": chosen.kl,
            "selected_by": "user" if config.layer is not None else "search",
            "project_harmless": config.project_harmless,
        },
        "parity": {**parity.to_dict()},
        "evaluation": evaluation,
        "config": {k: v for k, v in vars(config).items() if k not in ("push_to_hub",)},
        "timings": {},
        "peak_rss_mib": 0.0,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    if not parity.passed:
        manifest["timings"] = timer.total()
        raise ParityError(f"parity check failed: {parity.reason}; nothing was saved or pushed")

    result = RunResult(manifest, output=output)
    with ExitStack() as cleanup:
        target = output
        if target is None:  # push only: stage the checkpoint in a scratch directory
            scratch = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="abliterate-push-"))
            target = Path(scratch) / "model"
        save_started = time.perf_counter()
        bar = cleanup.enter_context(tqdm(total=4, desc="save", unit="step", disable=not config.progress))
        with atomic_directory(target) as staging:
            bar.set_postfix_str("weights")
            save_model(model, tokenizer, staging)
            bar.update()
            save_direction(
                staging / "direction.safetensors",
                chosen.direction,
                chosen.layer,
                chosen.position,
                config.model,
                extra={"model_type": model.config.model_type},
            )
            bar.update()
            if chosen.scores:
                plot_candidate_scores(
                    chosen.scores, (chosen.position + n_eoi, chosen.layer), staging / "candidate_scores.png"
                )
                scores = {name: _nan_to_none(values.tolist()) for name, values in chosen.scores.items()}
                (staging / "candidate_scores.json").write_text(json.dumps(scores) + "\n", "utf-8")
            bar.update()
            # Everything but the final rename and the two small files below counts as saving.
            timer.timings["save_s"] = round(time.perf_counter() - save_started, 3)
            manifest["timings"] = timer.total()
            manifest["peak_rss_mib"] = round(peak_rss_mib(), 1)
            (staging / "README.md").write_text(model_card(manifest, loaded.base_model), "utf-8")
            (staging / "abliterate.json").write_text(
                json.dumps(manifest, indent=2, default=str) + "\n", "utf-8"
            )
            bar.update()
        if config.push_to_hub:
            result.url = push_folder(target, config.push_to_hub, token, private=config.private, api=hub_api)
    return result


def _nan_to_none(values: Any) -> Any:
    if isinstance(values, list):
        return [_nan_to_none(value) for value in values]
    return None if values != values else values
