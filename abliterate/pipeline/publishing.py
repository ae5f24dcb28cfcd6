"""What a run writes and where it goes: checkpoint, direction files, manifest and card, push."""

from __future__ import annotations

import json
import platform
import resource
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from abliterate import __version__
from abliterate.config import RunConfig
from abliterate.find.select import RefusalDirection
from abliterate.io.interrupts import Interrupted, signal_number
from abliterate.io.output import OutputDir, atomic_directory, prepare_output
from abliterate.model.sources import hub_revision, local_checkpoint
from abliterate.pipeline.subject import Inputs, Subject
from abliterate.prove.gate import GateReport

# checkpoint is called through its module, so tests can replace the save (an interrupted one) by patching it.
from abliterate.ship import checkpoint, direction_file, front
from abliterate.ship.direction_file import save_direction
from abliterate.ship.hub import PushError, PushResult, PushTarget, push_folder
from abliterate.ship.plots import plot_candidate_scores
from abliterate.ship.report import model_card


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


def save(directory: Path, config: RunConfig, subject: Subject, chosen: RefusalDirection) -> None:
    """Write the edited checkpoint, the direction and the candidate scores into ``directory``."""
    with tqdm(total=2, desc="save", unit="step", disable=not config.progress) as bar:
        bar.set_postfix_str("weights")
        checkpoint.save_model(subject.model, subject.tokenizer, directory, local_checkpoint(config.model)[0])
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
        front.save_front(chosen.search, config.search_max_kl, directory / "pareto_front.json", png)
    if chosen.scores:
        starred = (chosen.position + subject.n_eoi, chosen.layer)
        plot_candidate_scores(chosen.scores, starred, directory / "candidate_scores.png")
        scores = {name: _nan_to_none(values.tolist()) for name, values in chosen.scores.items()}
        (directory / "candidate_scores.json").write_text(json.dumps(scores) + "\n", "utf-8")


def _point_metadata(chosen: RefusalDirection, subject: Subject) -> dict[str, str]:
    if chosen.edit_point is None:
        return {}
    return direction_file.point_metadata(chosen.edit_point, subject.n_layers)


def build_manifest(
    config: RunConfig,
    subject: Subject,
    chosen: RefusalDirection,
    gate: GateReport,
    evaluation: dict[str, Any] | None,
    timings: dict[str, float],
    inputs: Inputs,
) -> dict[str, Any]:
    """The ``abliterate.json`` content (``prompts``: the prompts each split used, per class)."""
    import transformers  # only for its version; heavy, and only ``run`` needs it

    return {
        "abliterate_version": __version__,
        "model": {
            "source": config.model,
            "revision": hub_revision(config.model),  # the Hub commit verify downloads; None for a path
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
            "selected_by": "user" if config.selection.layer is not None else "screening",
            "project_harmless": config.selection.project_harmless,
            "edit_point": None if chosen.edit_point is None else asdict(chosen.edit_point),
        },
        "search": None if chosen.search is None else front.summary(chosen.search),
        "gate": gate.to_dict(),
        "evaluation": evaluation,
        "prompts": inputs.prompt_sizes,  # what was used: ``config``'s ``n_*`` are what was asked for
        # The configuration as run: ``--batch-size auto`` shows the size it resolved to.
        "config": {
            key: value
            for key, value in {**config.to_options(), "batch_size": subject.batch_size}.items()
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
    return push_folder(directory, target, private=config.publishing.private, api=hub_api)


def publish(
    config: RunConfig, inputs: Inputs, hub_api: object | None, write: Callable[[Path], dict[str, Any]]
) -> RunResult:
    """Write the output atomically with ``write(staging) -> manifest``, then push it when asked.

    Ctrl-C or SIGTERM during the upload says what exists: the saved output, and a push that may be
    incomplete.
    """
    saved = None if inputs.output is None else inputs.output.path
    pushing = False
    try:
        with _destination(inputs.output, inputs.staging) as target:
            with atomic_directory(target) as staging:
                manifest = write(staging)
            pushing = True
            pushed = push(target.path, config, inputs.push_target, hub_api)
    except KeyboardInterrupt as interrupt:
        if not pushing:
            if saved is None:  # the staging folder of a push alone is removed: nothing is left
                raise Interrupted(signal_number(interrupt)) from interrupt
            raise
        assert inputs.push_target is not None  # push() returns at once without a target
        kept = f"{saved} holds the new output" if saved is not None else "nothing was saved"
        state = f"{kept}; the push to {inputs.push_target.repo_id} was cut off and may be incomplete"
        raise Interrupted(signal_number(interrupt), state) from interrupt
    if pushed is None:
        return RunResult(manifest, output=saved)
    return RunResult(manifest, output=saved, url=pushed.url, messages=pushed.notes)


@contextmanager
def _destination(output: OutputDir | None, staging: Path | None) -> Iterator[OutputDir]:
    """Where the checkpoint goes: ``output``, or for a push alone ``staging``, removed once pushed.

    A failed upload keeps the staged checkpoint (the error says where, and how to retry); any other
    failure removes it. The staging folder is abliterate's own, in its cache: an earlier one left by a
    failed upload is replaced.
    """
    if output is not None:
        yield output
        return
    assert staging is not None  # RunConfig: no --output means --push-to-hub, and prepare staged it
    target = prepare_output(staging, None, overwrite=True)
    try:
        yield target
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
