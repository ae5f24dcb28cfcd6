"""``abliterate run``: load → extract → select → evaluate → fold → parity gate → save → push.

``run`` is the sequence of the stage functions below; each takes and returns plain values or the
dataclasses defined here, and ``StageTimer`` times every one of them the same way.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

# checkpoint, edit and loading are called through their modules, so tests can replace a stage's core
# (a broken fold, an interrupted save, a load that must not happen) by patching the module attribute.
from abliterate import __version__, checkpoint, edit, loading
from abliterate import search as family
from abliterate.adapters import Adapter, resolve_adapter
from abliterate.adapters.resolve import blocks_of
from abliterate.batching import (
    EncodedPrompts,
    auto_batch_size,
    encode,
    eoi_length,
    last_logits,
)
from abliterate.certificate import certify_checkpoint
from abliterate.chat import ChatFormat, detect_thinking, parse_template_kwargs, split_reply
from abliterate.config import RunConfig
from abliterate.direction import save_direction, unit_direction
from abliterate.evaluate import RefusalEvaluation, is_refusal, refusal_rate
from abliterate.extract import candidate_directions, extract_means
from abliterate.gate import (
    GateReport,
    HookedReference,
    ParityError,
    completeness_on,
    edited_parity,
    hooked_reference,
)
from abliterate.gguf import gguf_output_dtype
from abliterate.hooks import ablate_edit
from abliterate.hub import PushError, PushResult, PushTarget, check_push_auth, push_folder, staging_directory
from abliterate.judge import refusal_count, wilson_interval
from abliterate.parity import check_dtype, kl_divergence
from abliterate.prompts import PromptSplits, load_splits
from abliterate.report import model_card, plot_candidate_scores
from abliterate.residual import CompletenessReport
from abliterate.select import RefusalDirection, direction_at, refusal_token_ids, select_direction
from abliterate.sources import check_layer, describe_source, refuse_output_in_source, refuse_prequantized
from abliterate.streaming import local_checkpoint, stream_into

P = ParamSpec("P")
T = TypeVar("T")


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
    inputs = prepare(config, hub_api)
    timed = StageTimer()
    subject = timed("load", load, config, inputs)
    candidates, harmless_means = timed("extract", extract, config, subject, inputs)
    chosen = timed("select", select, config, subject, inputs, candidates)
    chosen = timed("search", search, config, subject, inputs, candidates, harmless_means, chosen)
    if config.direction_only:
        return run_direction_only(config, inputs, subject, chosen, timed)
    if config.format == "lora":
        return run_lora(config, inputs, subject, chosen, timed, hub_api)
    before = timed("evaluate", evaluate_before, config, subject, inputs)
    if config.dispatch.active:
        return run_streamed(config, inputs, subject, chosen, before, timed, hub_api)
    reference = timed("verify", parity_reference, config, subject, inputs, chosen)
    timed("edit", fold, subject, chosen)
    gate = timed("verify", check_parity, subject.model, subject.adapter, reference)
    del reference  # [n, S, vocab] logits: free them before evaluating and saving
    _raise_unless_passed(gate, "nothing was saved or pushed")
    evaluation = timed("evaluate", evaluate_after, config, subject, inputs, before)

    def write(staging: Path) -> dict[str, Any]:
        timed("save", save, staging, config, subject, chosen)
        timed("verify", certify_saved, config, staging, chosen, gate, subject.n_layers)
        _raise_unless_passed(gate, "nothing was saved or pushed")
        manifest = build_manifest(config, subject, chosen, gate, evaluation, timed.timings())
        write_manifest(staging, manifest, subject.loaded.base_model)
        return manifest

    return _publish(config, inputs, hub_api, write)


def run_streamed(
    config: RunConfig,
    inputs: Inputs,
    subject: Subject,
    chosen: RefusalDirection,
    before: Baseline | None,
    timed: StageTimer,
    hub_api: object | None,
) -> RunResult:
    """The rest of a run on a dispatched (or 4-bit) model: the output is streamed from the source files.

    Offloaded weights cannot be edited in place (accelerate reads them from the source files), so the
    checkpoint is written by the same streaming fold ``apply`` uses. The proof is the weight certificate
    of the written files plus the completeness check of the adapter's writer list on the dispatched
    original; the evaluation after the edit runs on the original with the direction hooked out, which
    the certified fold reproduces.
    """
    source, why_not = local_checkpoint(config.model)
    if source is None:
        raise ValueError(f"--device-map/--load-in-4bit stream the output from safetensors files: {why_not}")
    prompts = _parity_prompts(config, subject, inputs)
    gate = GateReport(completeness=timed("verify", completeness_on, subject.model, subject.adapter, prompts))
    gate.skipped["parity"] = "dispatched model: the streamed files are proven by the weight certificate"
    _raise_unless_passed(gate, "nothing was saved or pushed")
    with _hooked_edit(subject, chosen):
        evaluation = timed("evaluate", evaluate_after, config, subject, inputs, before)

    def write(staging: Path) -> dict[str, Any]:
        streamed = timed(
            "save",
            stream_into,
            source,
            chosen.direction,
            staging,
            architecture=config.architecture,
            progress=config.progress,
            declared=family.declared_edit(chosen.direction, chosen.edit_point, subject.n_layers),
        )
        gate.certificate = streamed.certificate
        save_direction_files(staging, config, subject, chosen)
        manifest = build_manifest(config, subject, chosen, gate, evaluation, timed.timings())
        write_manifest(staging, manifest, subject.loaded.base_model)
        return manifest

    return _publish(config, inputs, hub_api, write)


def run_lora(
    config: RunConfig,
    inputs: Inputs,
    subject: Subject,
    chosen: RefusalDirection,
    timed: StageTimer,
    hub_api: object | None,
) -> RunResult:
    """``run --format lora``: the edit as an exact PEFT adapter (``abliterate.lora``), no weights.

    The gate: completeness of the writer list, and logit parity of the original with the adapter loaded
    through peft against the hooked original (no weight certificate: no checkpoint is written).
    """
    from abliterate import lora

    before = timed("evaluate", evaluate_before, config, subject, inputs)
    with _hooked_edit(subject, chosen):
        evaluation = timed("evaluate", evaluate_after, config, subject, inputs, before)
    model, adapter = subject.model, subject.adapter
    prompts = _parity_prompts(config, subject, inputs)
    gate = GateReport(completeness=timed("verify", completeness_on, model, adapter, prompts))
    gate.skipped["certificate"] = "--format lora: no checkpoint written; parity is checked through peft"
    declared = family.declared_edit(chosen.direction, chosen.edit_point, subject.n_layers)
    base_model = subject.loaded.base_model or config.model

    def write(staging: Path) -> dict[str, Any]:
        timed(
            "save",
            lora.write_lora,
            model,
            adapter,
            chosen.direction,
            staging,
            base_model=base_model,
            strength_of=_strengths(chosen),
        )
        gate.parity = timed(
            "verify", lora.peft_parity, model, adapter, declared, staging, prompts, subject.dtype_name
        )
        _raise_unless_passed(gate, "nothing was saved or pushed")
        save_direction_files(staging, config, subject, chosen)
        manifest = build_manifest(config, subject, chosen, gate, evaluation, timed.timings())
        manifest["weights"] = {"format": "lora", "adapter_bytes": lora.adapter_size(staging)}
        write_manifest(staging, manifest, subject.loaded.base_model)
        # The run's card (method, search, evaluation) beside the adapter's own README.
        (staging / "model_card.md").write_text((staging / "README.md").read_text("utf-8"), "utf-8")
        rank = int(lora.describe(staging)["r"])
        (staging / "README.md").write_text(lora.lora_card(config.model, gate.parity, rank=rank), "utf-8")
        return manifest

    return _publish(config, inputs, hub_api, write)


def run_direction_only(
    config: RunConfig, inputs: Inputs, subject: Subject, chosen: RefusalDirection, timed: StageTimer
) -> RunResult:
    """``run --direction-only`` after selection: check the direction with hooks, write it, no weights.

    The evaluation after the edit runs on the hooked original (which the fold reproduces exactly), and
    the completeness check proves the adapter's writer list, so ``abliterate apply`` (whose weight
    certificate proves the files it writes) completes the proof later.
    """
    before = timed("evaluate", evaluate_before, config, subject, inputs)
    with _hooked_edit(subject, chosen):
        evaluation = timed("evaluate", evaluate_after, config, subject, inputs, before)
    gate = GateReport(skipped=dict(_DIRECTION_ONLY_SKIPS))
    gate.completeness = timed(
        "verify", completeness_on, subject.model, subject.adapter, _parity_prompts(config, subject, inputs)
    )
    _raise_unless_passed(gate, "nothing was written")
    assert inputs.output is not None  # RunConfig: --direction-only needs --output
    with checkpoint.atomic_directory(inputs.output) as staging:
        timed("save", save_direction_files, staging, config, subject, chosen)
        manifest = build_manifest(config, subject, chosen, gate, evaluation, timed.timings())
        manifest["weights"] = None
        (staging / "model_card.md").write_text(model_card(manifest, subject.loaded.base_model), "utf-8")
        (staging / "abliterate.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n", "utf-8")
    hint = (
        f"no weights written (--direction-only); fold the direction into a safetensors checkpoint with: "
        f"abliterate apply CHECKPOINT --direction {inputs.output / 'direction.safetensors'} --output DIR"
    )
    return RunResult(manifest, output=inputs.output, messages=[hint])


_DIRECTION_ONLY_SKIPS = {
    "certificate": "--direction-only: no weights written (abliterate apply certifies the files it writes)",
    "parity": "--direction-only: no edited model; evaluated with the direction ablated by hooks",
}


class StageTimer:
    """Wall-clock seconds per named stage, for the manifest's ``timings``.

    A name that recurs adds up: ``evaluate`` covers the evaluation before and after the edit,
    ``verify`` the reference logits before the fold and the comparison after it.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, stage: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``stage(*args, **kwargs)`` and add its duration to ``name``."""
        begin = time.perf_counter()
        try:
            return stage(*args, **kwargs)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begin

    def timings(self) -> dict[str, float]:
        """``{"<stage>_s": seconds, …, "total_s": seconds since the timer started}``, to the millisecond."""
        stages = {f"{name}_s": round(seconds, 3) for name, seconds in self.seconds.items()}
        return {**stages, "total_s": round(time.perf_counter() - self.started, 3)}


# ------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Inputs:
    """What the cheap checks produced, before any heavy work.

    Attributes:
        output: the checked output directory, or ``None`` (push only).
        push_target: the checked Hub repository and token, or ``None`` (no push).
        harmful: harmful prompts, split into train/val/eval/parity.
        harmless: harmless prompts, split the same way.
        staging: where a push without ``--output`` stages the checkpoint, else ``None``.
    """

    output: Path | None
    push_target: PushTarget | None
    harmful: PromptSplits
    harmless: PromptSplits
    staging: Path | None = None


def prepare(config: RunConfig, hub_api: object | None) -> Inputs:
    """Check the source, the output directory and the Hub token and read the prompts: bad input fails
    here, early."""
    source = describe_source(config.model)
    refuse_prequantized(source, direction_only=config.direction_only)
    check_layer(config.layer, source.n_layers)
    if (
        config.dispatch.active
        and not config.direction_only
        and (source.is_gguf or source.weights_bytes is None)
    ):
        if source.path is not None:  # a hub id is checked once downloaded
            raise ValueError(
                f"--device-map/--load-in-4bit write the output by streaming the source's safetensors files, "
                f"and {config.model} has none: convert it to safetensors first, or run without them"
            )
    if config.output:
        refuse_output_in_source(config.output, source)
    output = checkpoint.check_output_dir(config.output, config.overwrite) if config.output else None
    target = check_push_auth(config.push_to_hub, hub_api) if config.push_to_hub else None
    staging = None
    if target is not None and output is None:
        staging = staging_directory(target.repo_id, source.weights_bytes)
    sizes = dict(
        n_train=config.n_train,
        n_val=config.n_val,
        n_eval=config.n_eval,
        n_parity=config.n_parity,
        seed=config.seed,
    )
    harmful = load_splits("harmful", config.harmful, **sizes)
    harmless = load_splits("harmless", config.harmless, **sizes)
    return Inputs(output, target, harmful, harmless, staging)


@dataclass(frozen=True)
class Subject:
    """The model being edited and what every later stage needs to run it.

    Attributes:
        loaded: the model, its tokenizer and where they came from.
        adapter: its architecture description.
        n_layers: decoder blocks in the model.
        n_eoi: end-of-instruction tokens of its chat template.
        batch_size: prompts per forward pass (``--batch-size auto`` resolved).
        system_prompt: system message of every chat, or ``None``.
        cast_to: dtype the model is cast to right after the fold (a GGUF source: the fold is computed
            from the dequantized float32 weights and rounded once), or ``None``.
        chat: the chat format of extraction, selection and parity (any thinking block closed).
        replies: the chat format the evaluation generates with (the template as the user runs it).
    """

    loaded: loading.LoadedModel
    adapter: Adapter
    n_layers: int
    n_eoi: int
    batch_size: int
    system_prompt: str | None
    cast_to: str | None = None
    chat: ChatFormat = field(default_factory=ChatFormat)
    replies: ChatFormat = field(default_factory=ChatFormat)

    @property
    def model(self) -> nn.Module:
        """The causal LM."""
        return self.loaded.model

    @property
    def tokenizer(self) -> object:
        """Its tokenizer."""
        return self.loaded.tokenizer

    @property
    def dtype_name(self) -> str:
        """The model's parameter dtype, e.g. ``"float32"`` (selects the parity tolerances)."""
        return self.loaded.dtype_name

    def encoded(self, prompts: list[str]) -> EncodedPrompts:
        """``prompts`` chat-formatted and batched after their shared prefix, each keeping its EOI tokens."""
        return encode(
            self.tokenizer,
            prompts,
            batch_size=self.batch_size,
            keep_last=self.n_eoi,
            chat=self.chat,
        )


def load(config: RunConfig, inputs: Inputs) -> Subject:
    """Load the model and tokenizer, find the adapter, and resolve ``--batch-size auto``."""
    from_gguf = Path(config.model).suffix == ".gguf"
    loaded = loading.load_model(
        config.model,
        dtype="float32" if from_gguf else config.dtype,
        device=config.device,
        trust_remote_code=config.trust_remote_code,
        allow_pickle=config.allow_pickle,
        dispatch=config.dispatch,
    )
    check_dtype(loaded.dtype_name)  # no parity proof for 8-bit floats or unknown formats: refuse now
    adapter = resolve_adapter(loaded.model, config.architecture)
    n_layers = len(blocks_of(loaded.model, adapter)[1])
    chat, replies = _chat_formats(config, loaded.tokenizer)
    n_eoi = eoi_length(loaded.tokenizer, chat=chat)
    check_layer(config.layer, n_layers)
    if config.position is not None and not -n_eoi <= config.position < n_eoi:
        raise ValueError(f"--position {config.position} is out of range: there are {n_eoi} EOI tokens")
    batch_size = config.batch_size
    if batch_size == "auto":
        prompts = inputs.harmful.train + inputs.harmless.train
        batch_size = auto_batch_size(loaded.model, loaded.tokenizer, prompts)
    return Subject(
        loaded,
        adapter,
        n_layers=n_layers,
        n_eoi=n_eoi,
        batch_size=batch_size,
        system_prompt=config.system_prompt,
        cast_to=_cast_after_fold(config, loaded),
        chat=chat,
        replies=replies,
    )


def _chat_formats(config: RunConfig, tokenizer: object) -> tuple[ChatFormat, ChatFormat]:
    """The scoring format (thinking closed) and the format replies are generated with."""
    thinking = detect_thinking(tokenizer)
    kwargs = parse_template_kwargs(config.chat_template_kwargs)
    scoring = ChatFormat(config.system_prompt, kwargs, thinking, close_thinking=True)
    return scoring, ChatFormat(config.system_prompt, kwargs, thinking)


def _cast_after_fold(config: RunConfig, loaded: loading.LoadedModel) -> str | None:
    if not loaded.from_gguf:
        return None
    wanted = gguf_output_dtype(config.dtype)
    return None if wanted == loaded.dtype_name else wanted


def extract(config: RunConfig, subject: Subject, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates ``[n_eoi, n_extracted, d_model]``: harmful minus harmless mean block inputs, and the
    harmless means (the search's directions may be made orthogonal to them).

    Selection never looks at layers past the fraction (or past ``--layer``), so the forward passes stop
    there and ``n_extracted`` may be less than the model's depth.
    """
    if config.layer is None:
        limit = min(subject.n_layers, max(1, math.ceil(config.max_layer_fraction * subject.n_layers)))
    else:
        limit = min(subject.n_layers, config.layer + 1)
    harmful_means, harmless_means = extract_means(
        subject.model,
        subject.adapter,
        subject.encoded(inputs.harmful.train),
        subject.encoded(inputs.harmless.train),
        subject.n_eoi,
        limit,
        progress=config.progress,
    )
    return candidate_directions(harmful_means, harmless_means, config.project_harmless), harmless_means


def select(config: RunConfig, subject: Subject, inputs: Inputs, candidates: torch.Tensor) -> RefusalDirection:
    """The candidate given by ``--layer/--position``, or the one the search selects."""
    if config.layer is not None:
        return _as_stored(direction_at(candidates, config.layer, config.position))
    harmful, harmless = inputs.harmful, inputs.harmless
    chosen = select_direction(
        subject.model,
        subject.adapter,
        candidates,
        subject.encoded(harmful.val),
        subject.encoded(harmless.val),
        subject.encoded(harmful.val[: config.screen_prompts]),
        refusal_token_ids(subject.tokenizer),
        harmless_screen=subject.encoded(harmless.val[: config.screen_prompts]),
        max_layer_fraction=config.max_layer_fraction,
        max_kl=config.selection_max_kl,
        min_steering=config.min_steering,
        screen_keep=config.screen_keep,
        batch_size=subject.batch_size,
        n_layers=subject.n_layers,
        layer_stride=config.layer_stride,
        progress=config.progress,
    )
    return _as_stored(chosen)


def search(
    config: RunConfig,
    subject: Subject,
    inputs: Inputs,
    candidates: torch.Tensor,
    harmless_means: torch.Tensor,
    chosen: RefusalDirection,
) -> RefusalDirection:
    """Search the family of exact edits around the paper's choice (``abliterate.search``), on the
    validation split only; ``--search none`` or ``--layer/--position`` keep the paper's edit.

    Raises:
        ValueError: no confirmed point meets ``--max-kl`` (nothing is written).
    """
    if config.search == "none" or config.layer is not None:
        return chosen
    model, adapter = subject.model, subject.adapter
    harmful, harmless = inputs.harmful.val, inputs.harmless.val
    trial_harmless = subject.encoded(harmless[: config.search_prompts])
    data = family.SearchData(
        subject.encoded(harmful[: config.search_prompts]),
        trial_harmless,
        last_logits(model, adapter, trial_harmless)[0],
        refusal_token_ids(subject.tokenizer),
    )
    anchor = family.EditPoint.paper(chosen.layer, chosen.position, config.project_harmless)
    space = family.SearchSpace(candidates, harmless_means, subject.n_layers, anchor)
    confirm_harmless = subject.encoded(harmless)
    reference = last_logits(model, adapter, confirm_harmless)[0]

    def confirm(point: family.EditPoint, direction: torch.Tensor) -> tuple[int, int, float]:
        with ablate_edit(model, adapter, direction, point.strength_of):
            replies = refusal_rate(model, subject.tokenizer, harmful, **_generation(config, subject)).replies
            logits = last_logits(model, adapter, confirm_harmless)[0]
        return refusal_count(replies), len(replies), kl_divergence(reference, logits).mean().item()

    per_forward = max(1, subject.batch_size // config.search_prompts)
    settings = family.SearchSettings(
        config.trials, config.search_budget, per_forward, config.finalists, config.search_max_kl, config.seed
    )
    result = family.search_edit(model, adapter, space, data, confirm, settings)
    best = result.chosen
    if best.point == anchor:
        return replace(chosen, search=result)
    direction = family.point_direction(best.point, candidates, harmless_means)
    searched = replace(
        chosen,
        direction=direction,
        layer=min(round(best.point.layer), candidates.shape[1] - 1),
        position=best.point.position,
        ablation_score=best.refusal_score,
        kl=best.confirm_kl,
        edit_point=best.point,
        search=result,
    )
    return _as_stored(searched)


def _strengths(chosen: RefusalDirection) -> Callable[..., float] | None:
    return family.strength_function(chosen.edit_point)


def _hooked_edit(subject: Subject, chosen: RefusalDirection) -> AbstractContextManager:
    """The hook equivalent of the chosen edit (the paper's or a searched point)."""
    return ablate_edit(subject.model, subject.adapter, chosen.direction, _strengths(chosen))


def _as_stored(chosen: RefusalDirection) -> RefusalDirection:
    """The direction exactly as ``direction.safetensors`` stores it (unit, float32), so the hooks, the
    fold and anyone re-applying or certifying the saved file all use the same bits."""
    return replace(chosen, direction=unit_direction(chosen.direction))


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
    if not config.evaluate:
        return None
    refusals = refusal_rate(
        subject.model,
        subject.tokenizer,
        inputs.harmful.eval,
        description="evaluate before",
        **_generation(config, subject),
    )
    harmless_logits = last_logits(subject.model, subject.adapter, subject.encoded(inputs.harmless.eval))[0]
    return Baseline(refusals, harmless_logits)


def evaluate_after(
    config: RunConfig, subject: Subject, inputs: Inputs, before: Baseline | None
) -> dict[str, Any] | None:
    """Measure the edited model against ``before``: the manifest's ``evaluation`` (``None`` without one)."""
    if before is None:
        return None
    after = refusal_rate(
        subject.model,
        subject.tokenizer,
        inputs.harmful.eval,
        description="evaluate after",
        **_generation(config, subject),
    )
    harmless_after = last_logits(subject.model, subject.adapter, subject.encoded(inputs.harmless.eval))[0]
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


def _generation(config: RunConfig, subject: Subject) -> dict[str, Any]:
    thinking = subject.replies.opens_thinking(subject.tokenizer)
    return dict(
        max_new_tokens=config.max_new_tokens + (config.max_thinking_tokens if thinking else 0),
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


@dataclass(frozen=True)
class ParityReference:
    """What the gate measures on the original before the fold.

    Attributes:
        prompts: harmful and harmless parity prompts in one batch, padded once, so hooked and edited
            logits line up position by position.
        hooked: the hooked original's logits on them (and the 16-bit rounding floor).
        completeness: the residual-stream completeness check of the adapter's writer list.
    """

    prompts: EncodedPrompts
    hooked: HookedReference
    completeness: CompletenessReport


def parity_reference(
    config: RunConfig, subject: Subject, inputs: Inputs, chosen: RefusalDirection
) -> ParityReference:
    """The reference the gate compares with: the original model with the direction ablated by hooks."""
    prompts = _parity_prompts(config, subject, inputs)
    completeness = completeness_on(subject.model, subject.adapter, prompts)
    if subject.cast_to is None:
        hooked = hooked_reference(
            subject.model, subject.adapter, chosen.direction, prompts, subject.dtype_name, _strengths(chosen)
        )
    else:
        # The gate of the saved dtype: the reference is the original rounded to it once, then hooked.
        rounded = copy.deepcopy(subject.model).to(getattr(torch, subject.cast_to))
        hooked = hooked_reference(
            rounded, subject.adapter, chosen.direction, prompts, subject.cast_to, _strengths(chosen)
        )
        del rounded
    return ParityReference(prompts, hooked, completeness)


def _parity_prompts(config: RunConfig, subject: Subject, inputs: Inputs) -> EncodedPrompts:
    """Harmful and harmless parity prompts in one batch, padded once, no shared prefix."""
    texts = inputs.harmful.parity + inputs.harmless.parity
    return encode(subject.tokenizer, texts, batch_size=len(texts), share_prefix=False, chat=subject.chat)


def fold(subject: Subject, chosen: RefusalDirection) -> None:
    """Fold the direction into every residual writer of the model in memory (then cast, for GGUF)."""
    edit.fold_direction(subject.model, subject.adapter, chosen.direction, strength_of=_strengths(chosen))
    if subject.cast_to is not None:
        subject.model.to(getattr(torch, subject.cast_to))


def check_parity(model: nn.Module, adapter: Adapter, reference: ParityReference) -> GateReport:
    """The in-memory part of the gate: completeness of the writer list, and logit parity of the edited
    model against the hooked original on the parity prompts.

    Returns:
        The gate report so far; ``certify_saved`` adds the weight certificate of the saved files.
    """
    parity = edited_parity(model, adapter, reference.prompts, reference.hooked)
    return GateReport(completeness=reference.completeness, parity=parity)


def certify_saved(
    config: RunConfig, staging: Path, chosen: RefusalDirection, gate: GateReport, n_layers: int
) -> None:
    """Add the weight certificate of the saved checkpoint against its safetensors source to ``gate``
    (``n_layers``: the model's depth, over which a searched edit declares its strength profile)."""
    source, why_not = local_checkpoint(config.model)
    if source is None:
        gate.skipped["certificate"] = why_not
        return
    gate.certificate = certify_checkpoint(
        source,
        staging,
        family.declared_edit(chosen.direction, chosen.edit_point, n_layers),
        architecture=config.architecture,
        progress=config.progress,
    )


def _raise_unless_passed(gate: GateReport, consequence: str) -> None:
    if not gate.passed:
        raise ParityError(f"parity gate failed: {gate.reason}; {consequence}")


def save(directory: Path, config: RunConfig, subject: Subject, chosen: RefusalDirection) -> None:
    """Write the edited checkpoint, the direction and the candidate scores into ``directory``."""
    with tqdm(total=2, desc="save", unit="step", disable=not config.progress) as bar:
        bar.set_postfix_str("weights")
        checkpoint.save_model(subject.model, subject.tokenizer, directory)
        bar.update()
        save_direction_files(directory, config, subject, chosen)
        bar.update()


def save_direction_files(
    directory: Path, config: RunConfig, subject: Subject, chosen: RefusalDirection
) -> None:
    """Write ``direction.safetensors`` and, after a search, the candidate scores (PNG and JSON)."""
    save_direction(
        directory / "direction.safetensors",
        chosen.direction,
        chosen.layer,
        chosen.position,
        config.model,
        extra={"model_type": subject.model.config.model_type, **_point_metadata(chosen, subject)},
    )
    if chosen.search is not None:
        png = directory / "pareto_front.png"
        family.save_front(chosen.search, config.search_max_kl, directory / "pareto_front.json", png)
    if chosen.scores:
        starred = (chosen.position + subject.n_eoi, chosen.layer)
        plot_candidate_scores(chosen.scores, starred, directory / "candidate_scores.png")
        scores = {name: _nan_to_none(values.tolist()) for name, values in chosen.scores.items()}
        (directory / "candidate_scores.json").write_text(json.dumps(scores) + "\n", "utf-8")


def _point_metadata(chosen: RefusalDirection, subject: Subject) -> dict[str, str]:
    if chosen.edit_point is None:
        return {}
    return family.point_metadata(chosen.edit_point, subject.n_layers)


def build_manifest(
    config: RunConfig,
    subject: Subject,
    chosen: RefusalDirection,
    gate: GateReport,
    evaluation: dict[str, Any] | None,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The ``abliterate.json`` content (keys documented in DESIGN.md)."""
    import transformers  # only for its version; heavy, and only ``run`` needs it

    return {
        "abliterate_version": __version__,
        "model": {
            "source": config.model,
            "base_model": subject.loaded.base_model,
            "model_type": subject.model.config.model_type,
            "adapter": subject.adapter.name,
            "dtype": subject.dtype_name,
            "n_layers": subject.n_layers,
        },
        "direction": {
            "layer": chosen.layer,
            "position": chosen.position,
            "n_eoi_tokens": subject.n_eoi,
            "ablation_score": chosen.ablation_score,
            "steering_score": chosen.steering_score,
            "kl": chosen.kl,
            "selected_by": "user" if config.layer is not None else "search",
            "project_harmless": config.project_harmless,
            "edit_point": None if chosen.edit_point is None else asdict(chosen.edit_point),
        },
        "search": None if chosen.search is None else family.summary(chosen.search),
        "parity": gate.to_dict(),
        "evaluation": evaluation,
        # The configuration as run: ``--batch-size auto`` shows the size it resolved to.
        "config": {
            key: value
            for key, value in {**vars(config), "batch_size": subject.batch_size}.items()
            if key != "push_to_hub"
        },
        "timings": timings,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }


def write_manifest(directory: Path, manifest: dict[str, Any], base_model: str | None) -> None:
    """Write the model card and ``abliterate.json``."""
    (directory / "README.md").write_text(model_card(manifest, base_model), "utf-8")
    (directory / "abliterate.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n", "utf-8")


def push(
    directory: Path, config: RunConfig, target: PushTarget | None, hub_api: object | None
) -> PushResult | None:
    """Upload ``directory`` to ``--push-to-hub`` when asked; return where it went."""
    if target is None:
        return None
    return push_folder(directory, target, private=config.private, api=hub_api)


# ------------------------------------------------------------------------------------------ helpers


def _publish(
    config: RunConfig, inputs: Inputs, hub_api: object | None, write: Callable[[Path], dict[str, Any]]
) -> RunResult:
    """Write the output atomically with ``write(staging) -> manifest``, then push it when asked."""
    with _destination(inputs.output, inputs.staging) as target:
        with checkpoint.atomic_directory(target) as staging:
            manifest = write(staging)
        pushed = push(target, config, inputs.push_target, hub_api)
    if pushed is None:
        return RunResult(manifest, output=inputs.output)
    return RunResult(manifest, output=inputs.output, url=pushed.url, messages=pushed.notes)


@contextmanager
def _destination(output: Path | None, staging: Path | None) -> Iterator[Path]:
    """Where the checkpoint goes: ``output``, or for a push alone ``staging``, removed once pushed.

    A failed upload keeps the staged checkpoint (the error says where, and how to retry); any other
    failure removes it.
    """
    if output is not None:
        yield output
        return
    assert staging is not None  # RunConfig: no --output means --push-to-hub, and prepare staged it
    try:
        yield staging
    except PushError:
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _nan_to_none(values: Any) -> Any:
    if isinstance(values, list):
        return [_nan_to_none(value) for value in values]
    return None if values != values else values
