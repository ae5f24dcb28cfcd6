"""The parts of a run's typed configuration: how the model is loaded, which prompts, how the direction is
selected and searched, the evaluation, and where the result goes.

Each field's metadata holds its help text and, for a command-line option, its flags and click settings
(``metavar``, ``show_default``; a ``Literal`` type gives the choices); the CLI generates its options from
them, so each default and help text is written once, here. Every part checks its own fields when built;
``RunConfig`` checks what spans parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from abliterate.model.chat import parse_template_kwargs

if TYPE_CHECKING:
    from abliterate.model.dispatch import Dispatch

# New tokens per judged evaluation reply, everywhere the project evaluates (run, evaluate, the search's
# confirmations, the benchmarks): refusals that arrive after a compliant opening ("Sure, here is …
# However, I cannot …") only show in long replies.
EVAL_MAX_NEW_TOKENS = 128


def _option(default: Any, *flags: str, help: str, **click: Any) -> Any:
    """A field that is a command-line option: its flags, help text and click settings in its metadata."""
    return field(default=default, metadata={"flags": flags, "help": help, **click})


def _setting(default: Any, help: str) -> Any:
    """A field that is no command-line option (a setting of the library), with its help text."""
    return field(default=default, metadata={"help": help})


def _at_least(config: object, minimum: int, *names: str) -> None:
    """Refuse a count below ``minimum`` (a negative count would slice prompts from the end)."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


@dataclass(frozen=True)
class PublishingConfig:
    """Where the result goes: an output directory and/or a Hub repository, and in which form."""

    output: str | None = _option(None, "--output", "-o", help="Output directory for the checkpoint.")
    push_to_hub: str | None = _option(
        None, "--push-to-hub", metavar="REPO_ID", help="Hub repo id to push to."
    )
    private: bool = _option(False, "--private", help="Create the Hub repo as private.")
    direction_only: bool = _option(
        False,
        "--direction-only",
        help="Find and check the direction (hooks only) and write it with the manifest, no weights; "
        "`abliterate apply` folds it into a checkpoint later.",
    )
    format: Literal["checkpoint", "lora", "gguf"] = _option(
        "checkpoint",
        "--format",
        help="Write a full checkpoint, an exact PEFT LoRA adapter of the edit ('lora'), or a GGUF file "
        "from a .gguf source ('gguf': streamed, certified bitwise).",
    )
    gguf_type: Literal["q8_0", "f16", "bf16", "source"] = _option(
        "q8_0",
        "--gguf-type",
        help="--format gguf: the type of the edited writers ('source': the source's own, when gguf-py "
        "can write it); every other tensor keeps its own.",
    )
    overwrite: bool = _option(
        False,
        "--overwrite",
        help="Replace an earlier abliterate output at --output (a directory holding its abliterate.json).",
    )

    def __post_init__(self) -> None:
        if self.format not in ("checkpoint", "lora", "gguf"):
            raise ValueError(f"--format {self.format!r}: choose 'checkpoint', 'lora' or 'gguf'")
        if self.direction_only and self.push_to_hub is not None:
            raise ValueError("--direction-only writes no weights to push: give --output DIR instead")


@dataclass(frozen=True)
class PromptConfig:
    """Which prompts, how many of each split, and how they are put into the chat template."""

    harmful: str | None = _option(
        None, "--harmful", metavar="SRC", help="Harmful prompt source (default: bundled)."
    )
    harmless: str | None = _option(
        None, "--harmless", metavar="SRC", help="Harmless prompt source (default: bundled)."
    )
    n_train: int = _option(128, "--n-train", help="Prompts per class used to extract candidates.")
    n_val: int = _option(
        150,
        "--n-val",
        help="Validation prompts per class: the paper's selection scores candidates on the first 32, the "
        "search's trials and confirmations use them all.",
    )
    n_eval: int = _option(
        32, "--n-eval", help="Harmful prompts judged before and after (and harmless ones for first-token KL)."
    )
    n_parity: int = _setting(4, "Held-aside prompts for the parity check.")
    seed: int = _option(0, "--seed", help="Seed for prompt sampling.")
    system_prompt: str | None = _option(None, "--system-prompt", help="System prompt for every chat.")
    chat_template_kwargs: str | None = _option(
        None,
        "--chat-template-kwargs",
        metavar="JSON",
        help="JSON object of extra chat template arguments, e.g. '{\"enable_thinking\": false}'.",
    )

    def __post_init__(self) -> None:
        _at_least(self, 1, "n_train", "n_val", "n_eval", "n_parity")
        parse_template_kwargs(self.chat_template_kwargs)  # raises on anything but a JSON object


@dataclass(frozen=True)
class LoadConfig:
    """How the model is loaded and run: device, dtype, adapter, trust, placement over devices, batch size."""

    device: str = _option("auto", "--device", help="auto (device_map=auto on GPU), cpu, cuda, cuda:N, mps.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _option(
        "auto",
        "--dtype",
        help="auto (checkpoint dtype), float32, bfloat16, float16.",
    )
    batch_size: int | str = _option(
        32,
        "--batch-size",
        help="Prompts per forward pass, or 'auto': the largest that fits on the GPU, 64 on the CPU.",
    )
    architecture: str | None = _option(
        None, "--architecture", metavar="MODEL_TYPE", help="Use this registered model type's adapter."
    )
    device_map: str | None = _option(
        None,
        "--device-map",
        metavar="auto|balanced|sequential|FILE.json",
        help="auto, balanced, sequential or FILE.json ({module: device}): spread the model over GPUs, CPU "
        "and disk with accelerate; the output is then streamed from the source files.",
    )
    max_memory: str | None = _option(
        None,
        "--max-memory",
        metavar="DEVICE=SIZE,…",
        help="Memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB.",
    )
    offload_folder: str | None = _option(
        None, "--offload-folder", metavar="DIR", help="Folder for weights --device-map offloads to disk."
    )
    load_in_4bit: bool = _option(
        False,
        "--load-in-4bit",
        help="Find the direction on a 4-bit (bitsandbytes, GPU) copy; the output is streamed from the "
        "full-precision source files.",
    )
    trust_remote_code: bool = _option(
        False, "--trust-remote-code", help="Allow code from the model repository."
    )
    allow_pickle: bool = _option(False, "--allow-pickle", help="Allow loading .bin/.pt pickled weights.")

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            if not self.batch_size.isdigit():
                raise ValueError(f"--batch-size {self.batch_size!r}: give a number or 'auto'")
            object.__setattr__(self, "batch_size", int(self.batch_size))
        if self.batch_size != "auto":
            _at_least(self, 1, "batch_size")
        self.dispatch  # noqa: B018 - parses the dispatch flags: raises on a malformed one

    @property
    def dispatch(self) -> Dispatch:
        """``--device-map``, ``--max-memory``, ``--offload-folder`` and ``--load-in-4bit``, parsed."""
        # Imported here: it imports torch, and the CLI reads these fields for ``--help``.
        from abliterate.model.dispatch import parse_dispatch

        return parse_dispatch(self.device_map, self.max_memory, self.offload_folder, self.load_in_4bit)


@dataclass(frozen=True)
class SelectionConfig:
    """Which direction: a given candidate, or the paper's selection and the search around it."""

    layer: int | None = _option(None, "--layer", help="Use this layer's candidate, skip selection.")
    position: int | None = _option(
        None, "--position", help="EOI position (negative from the end) with --layer."
    )
    max_kl: float | None = _option(
        None,
        "--max-kl",
        help="First-token KL cap on harmless prompts (default: none, the search keeps the paper's point "
        "unless a point beats it on refusals and damage); with a cap the search picks the fewest "
        "refusals under it; with --search none, the paper's candidate filter (default 0.1).",
    )
    search: Literal["tpe", "none"] = _option(
        "tpe",
        "--search",
        help="Search a family of exact edits with Optuna TPE ('tpe'), or keep the paper's rule ('none').",
    )
    min_steering: float | None = _option(
        None,
        "--min-steering",
        help="Discard candidates whose steering score is not above this (default: the unsteered score).",
    )
    project_harmless: bool = _option(
        False,
        "--project-harmless",
        help="Remove each candidate's component along the harmless mean (lower KL; off = the paper).",
    )
    norm_preserving: bool = _option(
        False,
        "--norm-preserving",
        help="Fold (I − s r̂ r̂ᵀ) W D, D keeping every writer column's length (exact and certified; not for "
        "fused experts, not as LoRA).",
    )
    max_layer_fraction: float = _setting(0.8, "Discard candidates at layer >= this fraction.")
    select_prompts: int = _setting(
        32, "Validation prompts per class the paper's selection scores candidates on (the first ones)."
    )
    screen_prompts: int = _setting(4, "Harmful prompts for the first, coarse ablation screen.")
    screen_keep: int = _setting(6, "Candidates kept after the screen for full scoring.")
    layer_stride: int = _setting(
        2, "Screen every N-th layer first, then the layers beside the best (1 = all)."
    )

    def __post_init__(self) -> None:
        if (self.layer is None) != (self.position is None):
            raise ValueError("--layer and --position go together: give both or neither")
        if self.search not in ("tpe", "none"):
            raise ValueError(f"--search {self.search!r}: choose 'tpe' or 'none'")


@dataclass(frozen=True)
class SearchConfig:
    """The budget of the search over exact edits (``--search tpe``)."""

    trials: int = _option(48, "--trials", help="Cheap trials of the search (batched per forward).")
    search_budget: float = _option(
        150.0, "--search-budget", metavar="SECONDS", help="Seconds the search's trials may take."
    )
    trial_prompts: int = _option(
        64,
        "--trial-prompts",
        help="Harmful validation prompts each cheap trial's first-token refusal score is measured on.",
    )
    confirm_prompts: int = _option(
        128,
        "--confirm-prompts",
        help="Harmful validation prompts the finalists are confirmed on by long replies and the judge "
        "(read from the end of the split, the trials' from its start), in two stages.",
    )
    confirm_tokens: int = _option(128, "--confirm-tokens", help="Tokens per reply confirming finalists.")
    stage_prompts: int = _setting(32, "Confirmation prompts of the first stage (elimination).")
    finalists: int = _setting(2, "Trials confirmed besides the paper's point.")
    survivors: int = _setting(2, "Finalists confirmed on every confirmation prompt at most.")
    drop_margin: int = _setting(
        1, "A finalist not helped on this many more first-stage prompts than the paper's point stops."
    )
    max_increase: float = _setting(
        0.02,
        "A searched point replaces the paper's only if the 95 % paired-bootstrap upper end of its "
        "not-helped rate minus the paper point's is at most this.",
    )
    kl_prompts: int = _setting(32, "Harmless validation prompts each trial's first-token KL is measured on.")
    damage_prompts: int = _setting(32, "Harmless val prompts whose greedy replies the multi-token KL reads.")
    damage_tokens: int = _setting(64, "Tokens of those replies.")

    def __post_init__(self) -> None:
        _at_least(self, 1, "trials", "trial_prompts", "confirm_prompts", "confirm_tokens")
        _at_least(self, 1, "stage_prompts", "kl_prompts", "damage_prompts", "damage_tokens", "drop_margin")
        _at_least(self, 0, "finalists", "survivors")
        if not self.search_budget > 0:  # written so that NaN is refused too
            raise ValueError(
                f"--search-budget must be a positive number of seconds, got {self.search_budget}"
            )


@dataclass(frozen=True)
class EvaluationConfig:
    """What is measured before and after the edit, and how long the judged replies are."""

    evaluate: bool = _option(
        True,
        "--evaluate/--no-evaluate",
        help="Measure not-helped rates, over-refusal and damage (KL) before and after.",
    )
    max_new_tokens: int = _option(
        EVAL_MAX_NEW_TOKENS,
        "--max-new-tokens",
        help="Tokens generated per evaluation reply (long enough to see refusals that come late).",
    )
    n_over_refusal: int = _option(
        16,
        "--n-over-refusal",
        help="Harmless and look-dangerous-but-safe prompts each, for over-refusal, degenerate replies "
        "and the multi-token KL.",
    )
    max_thinking_tokens: int = _option(
        512,
        "--max-thinking-tokens",
        help="Extra tokens generated per reply when the template opens a thinking block.",
    )

    def __post_init__(self) -> None:
        _at_least(self, 0, "max_thinking_tokens")
        _at_least(self, 1, "max_new_tokens", "n_over_refusal")
