"""The command line: parse, build the config, call one library function, turn errors into one line."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from abliterate import __version__
from abliterate.config import (
    EvaluationConfig,
    LoadConfig,
    PromptConfig,
    PublishingConfig,
    RunConfig,
)
from abliterate.config.flags import click_options
from abliterate.errors import GateError

_PACKAGE = Path(__file__).resolve().parent
# Errors a user can cause and fix: reported as one line, exit code 1, no traceback (``-v`` shows it too).
_USER_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    ValueError,
    LookupError,
    NotADirectoryError,
    ConnectionError,  # abliterate.ship.hub.PushError: the Hub refused or could not be reached
    OSError,  # a disk that is full or too small, a file that cannot be read: the path is in the message
)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    from abliterate.io.interrupts import interrupted_state, signal_number, terminate_as_interrupt

    try:
        # SIGTERM (timeout, Slurm, docker stop) unwinds like Ctrl-C, so temporary output is removed.
        with terminate_as_interrupt():
            yield
    except GateError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except _USER_ERRORS as error:
        if not _is_user_error(error):
            raise  # a bug, ours or a library's, not the user's input: keep the traceback
        if _verbose():
            traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        click.echo(f"error: {message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as interrupt:
        click.echo(f"interrupted: {interrupted_state(interrupt)}", err=True)
        sys.exit(128 + signal_number(interrupt))


def _is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is a user error abliterate raised itself, as opposed to a bug.

    File-system errors always are (a path the user gave). A ``ValueError`` or ``LookupError`` is only when
    abliterate's own code raised it: the same types raised inside torch, transformers or the standard
    library mean something went wrong that one line would hide. ``KeyError``/``IndexError`` never are.
    """
    if isinstance(error, (KeyError, IndexError)):
        return False
    if isinstance(error, OSError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def _verbose() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("verbose"))


@click.group()
@click.version_option(__version__, prog_name="abliterate")
@click.option("-v", "--verbose", is_flag=True, help="Log more, and show the traceback of every error.")
def main(verbose: bool) -> None:
    """Remove the refusal direction from a chat model's weights, proven by a parity check."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


@main.command("run")
@click.argument("model")
@click_options(RunConfig)
def run_command(model: str, **options: Any) -> None:
    """Find the refusal direction of MODEL, fold it into the weights, verify, save and/or push.

    MODEL is a hub id, a local directory, a .gguf file, or 'demo' (the embedded demo model).
    """
    with _one_line_errors():
        config = RunConfig.from_options(model, **options)
        from abliterate.pipeline.run import run
        from abliterate.ship.report import summary_table

        result = run(config)
        click.echo(summary_table(result.manifest))
        if result.output is not None:
            click.echo(f"saved to {result.output}")
        if result.url is not None:
            click.echo(f"pushed to {result.url}")
        for message in result.messages:
            click.echo(message)


@main.command("apply")
@click.argument("checkpoint")
@click.option("--direction", "direction_file", required=True, help="direction.safetensors from a run.")
@click_options(PublishingConfig, "output", required=True, help="Output directory.")
@click_options(LoadConfig, "architecture")
@click_options(PublishingConfig, "overwrite")
@click.option(
    "--certify/--no-certify",
    default=True,
    show_default=True,
    help="Certify the written weights against CHECKPOINT before moving them into place (exit 2 if not).",
)
@click_options(
    PublishingConfig,
    "format",
    help="A full checkpoint (streamed), an exact PEFT LoRA adapter (loads the model; parity via peft), or "
    "a GGUF file from a .gguf CHECKPOINT (streamed, certified bitwise).",
)
@click_options(PublishingConfig, "gguf_type")
def apply_command(
    checkpoint: str, direction_file: str, architecture: str | None, certify: bool, **options: Any
) -> None:
    """Fold a saved direction into CHECKPOINT (safetensors, streamed tensor by tensor) and save to OUTPUT."""
    with _one_line_errors():
        from abliterate.ship.direction_file import declared_from_file, load_direction
        from abliterate.ship.streaming import stream_apply

        publishing = PublishingConfig(**options)
        declared = declared_from_file(*load_direction(direction_file))  # 1 everywhere for old files
        if publishing.format == "lora":
            from abliterate.ship.lora import adapter_size, apply_lora

            target, parity = apply_lora(
                checkpoint,
                declared,
                publishing.output,
                architecture=architecture,
                overwrite=publishing.overwrite,
                direction_file=direction_file,
            )
            click.echo(
                f"LoRA adapter ({adapter_size(target) / 2**20:.1f} MiB) saved to {target}; parity through "
                f"peft: max|Δlogit| {parity.max_abs_logit_diff:.3g}, top-1 {parity.top1_agreement:.3f}"
            )
            return
        if publishing.format == "gguf":
            from abliterate.ship.gguf_writer import apply_gguf, gguf_lines

            written = apply_gguf(
                checkpoint, declared, publishing, certify=certify, direction_file=direction_file
            )
            click.echo("\n".join(gguf_lines(written)))
            return
        report = stream_apply(
            checkpoint,
            declared,
            publishing.output,
            architecture=architecture,
            overwrite=publishing.overwrite,
            certify=certify,
            direction_file=direction_file,
        )
        click.echo(
            f"edited {report.tensors_edited} of {report.tensors_total} tensors "
            f"({report.bytes_written / 2**20:.0f} MiB) in {report.seconds:.1f}s; saved to {publishing.output}"
        )
        if report.certificate is not None:
            from abliterate.ship.report import gate_lines

            click.echo(
                "\n".join(gate_lines({"passed": True, "certificate": report.certificate.to_dict()})[1:])
            )


_DISPATCH = ("device_map", "max_memory", "offload_folder")


@main.command("verify")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--direction",
    "direction_file",
    help="direction.safetensors used for the edit (default: EDITED/direction.safetensors).",
)
@click_options(LoadConfig, "dtype", type=str, help="Dtype of both models (auto: the edited one's).")
@click_options(LoadConfig, "device", "architecture", "trust_remote_code")
@click.option(
    "--forward/--no-forward",
    default=True,
    show_default=True,
    help="Load the models for the completeness check and logit parity (--no-forward: certificate only).",
)
@click.option(
    "--certificate/--no-certificate",
    default=True,
    show_default=True,
    help="Certify the weights tensor by tensor (needs both as safetensors checkpoints).",
)
@click.option("--revision", help="With EDITED a Hub id alone: the branch, tag or commit to verify.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click_options(LoadConfig, *_DISPATCH)
@click_options(RunConfig, "progress")
def verify_command(
    models: tuple[str, ...], direction_file: str | None, revision: str | None, as_json: bool, **options: Any
) -> None:
    """[ORIGINAL] EDITED: prove that EDITED is ORIGINAL with the direction folded in; exit 2 when it is not.

    With EDITED alone (an output of run or apply), ORIGINAL, its revision and the direction file are read
    from EDITED's abliterate.json and direction.safetensors.

    Runs the weight certificate, the residual-stream completeness check and logit parity (see README,
    "What the gate proves"). EDITED may be a LoRA adapter directory (run/apply --format lora): its
    tensors and adapter_config.json are compared with the adapter recomputed from ORIGINAL.
    """
    with _one_line_errors():
        from abliterate.ship.report import gate_lines
        from abliterate.ship.verify import verify_checkpoints

        original, edited, direction_file = _verify_inputs(models, direction_file, revision, as_json)
        report = verify_checkpoints(original, edited, direction_file, load=_pop_load(options), **options)
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            click.echo("\n".join(gate_lines(report)))
        if not report["passed"]:
            click.echo(f"error: parity gate failed: {report['reason']}", err=True)
            sys.exit(2)


def _verify_inputs(
    models: tuple[str, ...], direction_file: str | None, revision: str | None, as_json: bool
) -> tuple[str, str, str]:
    """``(original, edited, direction file)`` of ``verify``'s arguments; with EDITED alone, read from its
    manifest and said first (on stderr under ``--json``, so stdout stays JSON)."""
    if len(models) > 2:
        raise click.UsageError("verify takes [ORIGINAL] EDITED: at most two models")
    if len(models) == 2:
        if revision is not None:
            raise click.UsageError("--revision is for verify EDITED alone (a Hub id)")
        if direction_file is None:
            raise click.UsageError("verify ORIGINAL EDITED needs --direction FILE")
        return models[0], models[1], direction_file
    from abliterate.ship.verify import local_edited, manifest_inputs, pinned_original

    edited, fetched = local_edited(models[0], revision)  # a Hub id is downloaded first
    if fetched:
        click.echo(fetched, err=as_json)
    inputs = manifest_inputs(edited)
    if direction_file is None and inputs.direction_file is None:
        raise ValueError(f"{edited} holds no direction.safetensors: pass --direction FILE")
    direction = direction_file or str(inputs.direction_file)
    revision = inputs.revision or "none recorded (a local path has no revision)"
    click.echo(f"from {edited}/abliterate.json: original {inputs.original}, revision {revision}", err=as_json)
    click.echo(f"direction: {direction}", err=as_json)
    return pinned_original(inputs), edited, direction


@main.command("evaluate")
@click.argument("model")
@click.option("--baseline", help="Original model to compare against (its rates, KL, paired difference).")
@click_options(PromptConfig, "harmful", "harmless")
@click.option(
    "--lookalike",
    metavar="SRC",
    help="Safe prompts that look dangerous, for over-refusal (default: bundled).",
)
@click.option(
    "--n",
    "n_prompts",
    type=int,
    default=None,
    help="Prompts per set (default: every prompt of each set; the bundled held-out sets hold over 200 "
    "harmful prompts, disjoint from extraction and selection).",
)
@click_options(EvaluationConfig, "max_new_tokens")
@click.option(
    "--judge-model",
    metavar="ID_OR_PATH",
    help="A chat model that decides complied or dodged (the rules keep refused and degenerate); "
    "loaded last, with --dtype and --device (default: the rules alone).",
)
@click_options(LoadConfig, "dtype", type=str)
@click_options(LoadConfig, "device")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click_options(LoadConfig, *_DISPATCH)
def evaluate_command(model: str, as_json: bool, **options: Any) -> None:
    """Not-helped rates of MODEL on harmful, harmless and look-dangerous-but-safe prompts (with their
    95 % intervals), and its damage (first- and multi-token KL) against --baseline."""
    with _one_line_errors():
        from abliterate.find.evaluate_model import evaluate_model, format_evaluation

        result = evaluate_model(model, load=_pop_load(options), **options)
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            click.echo("\n".join(format_evaluation(result)))


def _pop_load(options: dict[str, Any]) -> LoadConfig:
    """The ``LoadConfig`` of a command's loading options, taken out of ``options``."""
    return LoadConfig(
        **{each.name: options.pop(each.name) for each in fields(LoadConfig) if each.name in options}
    )


if __name__ == "__main__":
    main()
