"""The command line: parse, build the config, call one library function, turn errors into one line."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from abliterate import __version__
from abliterate.config import help_of
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


def _option(name: str, *flags: str, **kwargs: Any) -> Callable:
    return click.option(*flags, help=help_of(name), **kwargs)


def _dispatch_options(command: Callable) -> Callable:
    """``--device-map``, ``--max-memory`` and ``--offload-folder``, as ``run`` has them."""
    for name, flag, metavar in reversed(_DISPATCH_FLAGS):
        command = click.option(flag, name, metavar=metavar, help=help_of(name))(command)
    return command


_DISPATCH_FLAGS = (
    ("device_map", "--device-map", "auto|balanced|sequential|FILE.json"),
    ("max_memory", "--max-memory", "DEVICE=SIZE,…"),
    ("offload_folder", "--offload-folder", "DIR"),
)


def _pop_dispatch(options: dict[str, Any]) -> Any:
    from abliterate.model.dispatch import parse_dispatch

    return parse_dispatch(*(options.pop(name) for name, _, _ in _DISPATCH_FLAGS))


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
@_option("output", "--output", "-o")
@_option("push_to_hub", "--push-to-hub", metavar="REPO_ID")
@_option("private", "--private", is_flag=True)
@_option("harmful", "--harmful", metavar="SRC")
@_option("harmless", "--harmless", metavar="SRC")
@_option("n_train", "--n-train", type=int, default=128, show_default=True)
@_option("n_val", "--n-val", type=int, default=32, show_default=True)
@_option("n_eval", "--n-eval", type=int, default=50, show_default=True)
@_option("seed", "--seed", type=int, default=0, show_default=True)
@_option("device", "--device", default="auto", show_default=True)
@_option(
    "dtype",
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
)
@_option("layer", "--layer", type=int)
@_option("position", "--position", type=int)
@_option("batch_size", "--batch-size", default="32", show_default=True)
@_option("max_kl", "--max-kl", type=float)
@_option("search", "--search", type=click.Choice(["tpe", "none"]), default="tpe", show_default=True)
@_option("trials", "--trials", type=int, default=48, show_default=True)
@_option("search_budget", "--search-budget", type=float, default=150.0, show_default=True, metavar="SECONDS")
@_option("min_steering", "--min-steering", type=float)
@_option("architecture", "--architecture", metavar="MODEL_TYPE")
@_option("system_prompt", "--system-prompt")
@_option("project_harmless", "--project-harmless", is_flag=True)
@_option("norm_preserving", "--norm-preserving", is_flag=True)
@_option("evaluate", "--evaluate/--no-evaluate", default=True, show_default=True)
@_option("direction_only", "--direction-only", is_flag=True)
@_option(
    "format", "--format", type=click.Choice(["checkpoint", "lora"]), default="checkpoint", show_default=True
)
@_option("device_map", "--device-map", metavar="auto|balanced|sequential|FILE.json")
@_option("max_memory", "--max-memory", metavar="DEVICE=SIZE,…")
@_option("offload_folder", "--offload-folder", metavar="DIR")
@_option("load_in_4bit", "--load-in-4bit", is_flag=True)
@_option("chat_template_kwargs", "--chat-template-kwargs", metavar="JSON")
@_option("max_thinking_tokens", "--max-thinking-tokens", type=int, default=512, show_default=True)
@_option("trust_remote_code", "--trust-remote-code", is_flag=True)
@_option("allow_pickle", "--allow-pickle", is_flag=True)
@_option("overwrite", "--overwrite", is_flag=True)
@_option("progress", "--progress/--no-progress", default=True)
def run_command(**options: Any) -> None:
    """Find the refusal direction of MODEL, fold it into the weights, verify, save and/or push.

    MODEL is a hub id, a local directory, a .gguf file, or 'demo' (the embedded demo model).
    """
    from abliterate.config import RunConfig

    with _one_line_errors():
        config = RunConfig(**options)
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
@click.option("--output", "-o", required=True, help="Output directory.")
@click.option("--architecture", metavar="MODEL_TYPE", help=help_of("architecture"))
@click.option("--overwrite", is_flag=True, help=help_of("overwrite"))
@click.option(
    "--certify/--no-certify",
    default=True,
    show_default=True,
    help="Certify the written weights against CHECKPOINT before moving them into place (exit 2 if not).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["checkpoint", "lora"]),
    default="checkpoint",
    show_default=True,
    help="A full checkpoint (streamed), or an exact PEFT LoRA adapter (loads the model; parity via peft).",
)
def apply_command(
    checkpoint: str,
    direction_file: str,
    output: str,
    architecture: str | None,
    overwrite: bool,
    certify: bool,
    output_format: str,
) -> None:
    """Fold a saved direction into CHECKPOINT (safetensors, streamed tensor by tensor) and save to OUTPUT."""
    with _one_line_errors():
        from abliterate.ship.direction_file import declared_from_file, load_direction
        from abliterate.ship.streaming import stream_apply

        direction, metadata = load_direction(direction_file)
        if output_format == "lora":
            from abliterate.ship.lora import adapter_size, apply_lora

            target, parity = apply_lora(
                checkpoint,
                declared_from_file(direction, metadata),
                output,
                architecture=architecture,
                overwrite=overwrite,
            )
            click.echo(
                f"LoRA adapter ({adapter_size(target) / 2**20:.1f} MiB) saved to {target}; parity through "
                f"peft: max|Δlogit| {parity.max_abs_logit_diff:.3g}, top-1 {parity.top1_agreement:.3f}"
            )
            return
        report = stream_apply(
            checkpoint,
            direction,
            output,
            architecture=architecture,
            overwrite=overwrite,
            certify=certify,
            declared=declared_from_file(direction, metadata),  # a searched edit's strengths
        )
        click.echo(
            f"edited {report.tensors_edited} of {report.tensors_total} tensors "
            f"({report.bytes_written / 2**20:.0f} MiB) in {report.seconds:.1f}s; saved to {output}"
        )
        if report.certificate is not None:
            from abliterate.ship.report import gate_lines

            click.echo(
                "\n".join(gate_lines({"passed": True, "certificate": report.certificate.to_dict()})[1:])
            )


@main.command("verify")
@click.argument("original")
@click.argument("edited")
@click.option("--direction", "direction_file", required=True, help="direction.safetensors used for the edit.")
@click.option(
    "--dtype", default="auto", show_default=True, help="Dtype of both models (auto: the edited one's)."
)
@click.option("--device", default="auto", show_default=True, help=help_of("device"))
@click.option("--architecture", metavar="MODEL_TYPE", help=help_of("architecture"))
@click.option("--trust-remote-code", is_flag=True, help=help_of("trust_remote_code"))
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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_dispatch_options
@click.option("--progress/--no-progress", default=True, help=help_of("progress"))
def verify_command(original: str, edited: str, direction_file: str, as_json: bool, **options: Any) -> None:
    """Prove that EDITED is ORIGINAL with the direction folded in; exit 2 when it is not.

    Runs the weight certificate, the residual-stream completeness check and logit parity (see README,
    "What the gate proves"). EDITED may be a LoRA adapter directory (run/apply --format lora): its
    tensors and adapter_config.json are compared with the adapter recomputed from ORIGINAL.
    """
    with _one_line_errors():
        from abliterate.ship.report import gate_lines
        from abliterate.ship.verify import verify_checkpoints

        report = verify_checkpoints(
            original, edited, direction_file, dispatch=_pop_dispatch(options), **options
        )
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            click.echo("\n".join(gate_lines(report)))
        if not report["passed"]:
            click.echo(f"error: parity gate failed: {report['reason']}", err=True)
            sys.exit(2)


@main.command("evaluate")
@click.argument("model")
@click.option("--baseline", help="Original model to compare against (refusal rate and KL).")
@click.option("--harmful", metavar="SRC", help=help_of("harmful"))
@click.option("--harmless", metavar="SRC", help=help_of("harmless"))
@click.option("--n", "n_prompts", type=int, default=50, show_default=True, help="Prompts per class.")
@click.option("--dtype", default="auto", show_default=True, help=help_of("dtype"))
@click.option("--device", default="auto", show_default=True, help=help_of("device"))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_dispatch_options
def evaluate_command(model: str, as_json: bool, **options: Any) -> None:
    """Refusal rate of MODEL on harmful prompts (and KL to --baseline on harmless prompts)."""
    with _one_line_errors():
        from abliterate.find.evaluate import evaluate_model

        result = evaluate_model(model, dispatch=_pop_dispatch(options), **options)
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            for key, value in result.items():
                click.echo(f"{key:20s} {value}")


if __name__ == "__main__":
    main()
