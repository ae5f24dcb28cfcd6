"""``abliterate run``: load → extract → select → evaluate → fold → parity gate → save → push.

``run`` is the sequence of the stage functions of the modules beside it in ``abliterate.pipeline`` (one
per stage); each takes and returns plain values or the dataclasses defined there, and ``StageTimer`` times
every one of them the same way. Once the direction is chosen, a run ends one of five ways (an edited
model in memory, a streamed checkpoint, a LoRA adapter, a GGUF file, the direction alone), each given
the ``Found``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from abliterate.config import RunConfig
from abliterate.find.select import RefusalDirection
from abliterate.io import output as checkpoint
from abliterate.model.batching import EncodedPrompts
from abliterate.model.sources import local_checkpoint
from abliterate.pipeline.evaluation import Baseline, evaluate_after, evaluate_before
from abliterate.pipeline.finding import candidates_and_means, paper_direction, searched_direction
from abliterate.pipeline.gating import (
    certify_saved,
    chosen_edit,
    fold,
    hooked_edit,
    parity_prompts,
    parity_reference,
    raise_unless_passed,
)
from abliterate.pipeline.publishing import (
    RunResult,
    build_manifest,
    publish,
    save,
    save_direction_files,
    write_manifest,
)
from abliterate.pipeline.subject import Inputs, Subject, load, prepare
from abliterate.pipeline.timing import StageTimer
from abliterate.prove.files import compare_companions
from abliterate.prove.gate import Candidate, GateReport, completeness_on, gate_candidate
from abliterate.prove.lora_parity import peft_parity
from abliterate.ship.gguf_verify import gguf_source_path
from abliterate.ship.gguf_writer import gguf_card, gguf_into
from abliterate.ship.report import model_card
from abliterate.ship.streaming import stream_into

P = ParamSpec("P")
T = TypeVar("T")


def run(config: RunConfig, *, hub_api: object | None = None) -> RunResult:
    """Run the whole pipeline for one model.

    Args:
        config: the run configuration.
        hub_api: Hub API object for pushing (tests pass a recording fake).

    Returns:
        The manifest and where the result went.

    Raises:
        GateError: the edited model failed the parity gate (nothing written or pushed).
        FileNotFoundError, FileExistsError, PermissionError, ValueError, LookupError: bad input,
            raised before any heavy work where it can be known then.
    """
    if config.publishing.format == "gguf":
        gguf_source_path(config.model)  # a safetensors source: one line naming the commands, nothing loaded
    inputs = prepare(config, hub_api)
    timed = StageTimer()
    subject = timed("load", load, config, inputs)
    candidates, harmless_means = timed("extract", candidates_and_means, config, subject, inputs)
    chosen = timed("select", paper_direction, config, subject, inputs, candidates)
    chosen = timed("search", searched_direction, config, subject, inputs, candidates, harmless_means, chosen)
    found = Found(config, inputs, subject, chosen, timed, hub_api)
    if config.publishing.direction_only:
        return run_direction_only(found)
    if config.publishing.format == "lora":
        return run_lora(found)
    if config.publishing.format == "gguf":
        return run_gguf(found)
    before = timed("evaluate", evaluate_before, config, subject, inputs)
    if config.load.dispatch.active:
        return run_streamed(found, before)
    return run_in_memory(found, before)


@dataclass(frozen=True)
class Found:
    """Where a run stands once its direction is chosen: what every ending of the run takes.

    Attributes:
        config: the run configuration.
        inputs: the checked inputs (output directory, push target, prompt splits).
        subject: the loaded model and what the stages need to run it.
        chosen: the chosen direction (and searched edit point).
        timed: the run's stage timer.
        hub_api: the Hub API object for pushing (tests pass a recording fake), or ``None``.
    """

    config: RunConfig
    inputs: Inputs
    subject: Subject
    chosen: RefusalDirection
    timed: StageTimer
    hub_api: object | None

    def stages(self) -> tuple[RunConfig, Inputs, Subject, RefusalDirection, StageTimer]:
        """What the stage functions take: the configuration, inputs, subject, chosen direction and timer."""
        return self.config, self.inputs, self.subject, self.chosen, self.timed


def run_in_memory(found: Found, before: Baseline | None) -> RunResult:
    """The rest of a run on a model in memory: fold it, gate it against the hooked original, save it
    and certify the saved files against the source."""
    config, inputs, subject, chosen, timed = found.stages()
    reference = timed("verify", parity_reference, config, subject, inputs, chosen)
    timed("edit", fold, subject, chosen)
    gate = timed("verify", gate_candidate, reference, subject.adapter, Candidate(subject.model))
    del reference  # [n, S, vocab] logits: free them before evaluating and saving
    raise_unless_passed(gate, "nothing was saved or pushed")
    evaluation = timed("evaluate", evaluate_after, config, subject, inputs, before)

    def write(staging: Path) -> dict[str, Any]:
        timed("save", save, staging, config, subject, chosen)
        timed("certify", certify_saved, config, staging, chosen, gate, subject.n_layers, subject.model.device)
        raise_unless_passed(gate, "nothing was saved or pushed")
        return _write_manifest(found, staging, gate, evaluation)

    return publish(config, inputs, found.hub_api, write)


def run_streamed(found: Found, before: Baseline | None) -> RunResult:
    """The rest of a run on a dispatched (or 4-bit) model: the output is streamed from the source files.

    Offloaded weights cannot be edited in place (accelerate reads them from the source files), so the
    checkpoint is written by the same streaming fold ``apply`` uses. The proof is the weight certificate
    of the written files plus the completeness check of the adapter's writer list on the dispatched
    original; the evaluation after the edit runs on the original with the direction hooked out, which
    the certified fold reproduces.
    """
    config, inputs, subject, chosen, timed = found.stages()
    source, why_not = local_checkpoint(config.model)
    if source is None:
        raise ValueError(f"--device-map/--load-in-4bit stream the output from safetensors files: {why_not}")
    prompts = parity_prompts(config, subject, inputs)
    gate = _completeness_gate(subject, prompts, timed, **_STREAMED_SKIPS)
    raise_unless_passed(gate, "nothing was saved or pushed")
    evaluation = _evaluate_hooked(config, subject, inputs, chosen, before, timed)

    def write(staging: Path) -> dict[str, Any]:
        streamed = timed(
            "save",
            stream_into,
            source,
            chosen_edit(subject, chosen),
            staging,
            architecture=config.load.architecture,
            progress=config.progress,
        )
        gate.certificate = streamed.certificate
        gate.files = compare_companions(source, staging)  # stream_into raised if they differ
        save_direction_files(staging, config, subject, chosen)
        return _write_manifest(found, staging, gate, evaluation)

    return publish(config, inputs, found.hub_api, write)


def run_lora(found: Found) -> RunResult:
    """``run --format lora``: the edit as an exact PEFT adapter (``abliterate.ship.lora``), no weights.

    The gate: completeness of the writer list, and logit parity of the original with the adapter loaded
    through peft against the hooked original (no weight certificate: no checkpoint is written).
    """
    from abliterate.ship import lora

    config, inputs, subject, chosen, timed = found.stages()
    before = timed("evaluate", evaluate_before, config, subject, inputs)
    evaluation = _evaluate_hooked(config, subject, inputs, chosen, before, timed)
    model, adapter = subject.model, subject.adapter
    prompts = parity_prompts(config, subject, inputs)
    gate = _completeness_gate(subject, prompts, timed, **_LORA_SKIPS)
    edit = chosen_edit(subject, chosen)
    base_model = subject.loaded.base_model or config.model

    def write(staging: Path) -> dict[str, Any]:
        timed(
            "save",
            lora.write_lora,
            model,
            adapter,
            edit,
            staging,
            base_model=base_model,
        )
        gate.parity = timed("verify", peft_parity, model, adapter, edit, staging, prompts, subject.dtype_name)
        raise_unless_passed(gate, "nothing was saved or pushed")
        save_direction_files(staging, config, subject, chosen)
        weights = {"format": "lora", "adapter_bytes": lora.adapter_size(staging)}
        manifest = _write_manifest(found, staging, gate, evaluation, weights=weights)
        # The run's card (method, search, evaluation) beside the adapter's own README.
        (staging / "model_card.md").write_text((staging / "README.md").read_text("utf-8"), "utf-8")
        rank = int(lora.describe(staging)["r"])
        (staging / "README.md").write_text(lora.lora_card(config.model, gate.parity, rank=rank), "utf-8")
        return manifest

    return publish(config, inputs, found.hub_api, write)


def run_gguf(found: Found) -> RunResult:
    """``run --format gguf``: the edit written into the source GGUF file, streamed from that file (not from
    the dequantized model in memory) by ``abliterate.ship.gguf_writer``.

    The gate: completeness of the writer list on the loaded model, and the GGUF certificate of the
    written file (every tensor and key bitwise; timed with ``save``); the evaluation after the edit runs
    on the hooked original.
    """
    config, inputs, subject, chosen, timed = found.stages()
    source = gguf_source_path(config.model)
    before = timed("evaluate", evaluate_before, config, subject, inputs)
    evaluation = _evaluate_hooked(config, subject, inputs, chosen, before, timed)
    gate = _completeness_gate(subject, parity_prompts(config, subject, inputs), timed, **_GGUF_SKIPS)
    raise_unless_passed(gate, "nothing was saved or pushed")
    edit, base_model = chosen_edit(subject, chosen), subject.loaded.base_model or config.model
    options = dict(gguf_type=config.publishing.gguf_type, progress=config.progress)

    def write(staging: Path) -> dict[str, Any]:
        report = timed("save", gguf_into, source, edit, staging, base_model=base_model, **options)
        gate.certificate = report.certificate  # gguf_into raised GateError if it failed
        save_direction_files(staging, config, subject, chosen)
        manifest = _write_manifest(found, staging, gate, evaluation, weights=report.manifest_entry())
        with open(staging / "README.md", "a", encoding="utf-8") as card:
            card.write(gguf_card(report))
        return manifest

    return publish(config, inputs, found.hub_api, write)


def run_direction_only(found: Found) -> RunResult:
    """``run --direction-only`` after selection: check the direction with hooks, write it, no weights.

    The evaluation after the edit runs on the hooked original (which the fold reproduces exactly), and
    the completeness check proves the adapter's writer list, so ``abliterate apply`` (whose weight
    certificate proves the files it writes) completes the proof later.
    """
    config, inputs, subject, chosen, timed = found.stages()
    before = timed("evaluate", evaluate_before, config, subject, inputs)
    evaluation = _evaluate_hooked(config, subject, inputs, chosen, before, timed)
    prompts = parity_prompts(config, subject, inputs)
    gate = _completeness_gate(subject, prompts, timed, **_DIRECTION_ONLY_SKIPS)
    raise_unless_passed(gate, "nothing was written")
    assert inputs.output is not None  # RunConfig: --direction-only needs --output
    with checkpoint.atomic_directory(inputs.output) as staging:
        timed("save", save_direction_files, staging, config, subject, chosen)
        manifest = build_manifest(config, subject, chosen, gate, evaluation, timed.timings(), inputs)
        manifest["weights"] = None
        manifest["memory"] = timed.memory()
        (staging / "model_card.md").write_text(model_card(manifest, subject.loaded.base_model), "utf-8")
        (staging / "abliterate.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n", "utf-8")
    hint = (
        f"no weights written (--direction-only); fold the direction into a safetensors checkpoint with: "
        f"abliterate apply CHECKPOINT --direction {inputs.output.path / 'direction.safetensors'} --output DIR"
    )
    return RunResult(manifest, output=inputs.output.path, messages=[hint])


def _write_manifest(
    found: Found,
    staging: Path,
    gate: GateReport,
    evaluation: dict[str, Any] | None,
    weights: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the manifest of a run that writes an output (``weights``, when given, replaces its
    ``weights`` entry), write it and the card into ``staging``, and return it."""
    config, subject, timed = found.config, found.subject, found.timed
    manifest = build_manifest(config, subject, found.chosen, gate, evaluation, timed.timings(), found.inputs)
    if weights is not None:
        manifest["weights"] = weights
    manifest["memory"] = timed.memory()
    write_manifest(staging, manifest, subject.loaded.base_model)
    return manifest


def _evaluate_hooked(
    config: RunConfig,
    subject: Subject,
    inputs: Inputs,
    chosen: RefusalDirection,
    before: Baseline | None,
    timed: StageTimer,
) -> dict[str, Any] | None:
    """The evaluation after the edit, on the original with the edit hooked (no edited model in memory:
    the certified fold reproduces the hooks exactly)."""
    with hooked_edit(subject, chosen):
        return timed("evaluate", evaluate_after, config, subject, inputs, before)


def _completeness_gate(
    subject: Subject, prompts: EncodedPrompts, timed: StageTimer, **skipped: str
) -> GateReport:
    """The gate of a run without an edited model in memory: completeness of the writer list on the
    parity ``prompts``, and ``skipped`` (gate part → why) for the parts proven elsewhere or not at all."""
    completeness = timed("verify", completeness_on, subject.model, subject.adapter, prompts)
    return GateReport(completeness=completeness, skipped=dict(skipped))


# The gate parts each ending without an edited model in memory proves elsewhere, or cannot prove.
_STREAMED_SKIPS = {"parity": "dispatched model: the streamed files are proven by the weight certificate"}
_LORA_SKIPS = {"certificate": "--format lora: no checkpoint written; parity is checked through peft"}
_GGUF_SKIPS = {"parity": "--format gguf: re-quantized writers; the GGUF certificate proves them bitwise"}
_DIRECTION_ONLY_SKIPS = {
    "certificate": "--direction-only: no weights written (abliterate apply certifies the files it writes)",
    "parity": "--direction-only: no edited model; evaluated with the direction ablated by hooks",
}
