"""One typed configuration object for a run; the CLI builds it, the pipeline reads it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from abliterate.model.chat import parse_template_kwargs

if TYPE_CHECKING:
    from abliterate.model.dispatch import Dispatch


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class RunConfig:
    """Everything ``abliterate run`` needs. Each field's ``metadata["help"]`` documents it."""

    model: str = field(metadata=_help("Hub id, local directory, a .gguf file, or 'demo'."))
    output: str | None = field(default=None, metadata=_help("Output directory for the checkpoint."))
    push_to_hub: str | None = field(default=None, metadata=_help("Hub repo id to push to."))
    private: bool = field(default=False, metadata=_help("Create the Hub repo as private."))
    harmful: str | None = field(default=None, metadata=_help("Harmful prompt source (default: bundled)."))
    harmless: str | None = field(default=None, metadata=_help("Harmless prompt source (default: bundled)."))
    n_train: int = field(default=128, metadata=_help("Prompts per class used to extract candidates."))
    n_val: int = field(default=32, metadata=_help("Prompts per class used to score candidates."))
    n_eval: int = field(default=50, metadata=_help("Prompts per class for the before/after evaluation."))
    n_parity: int = field(default=4, metadata=_help("Held-aside prompts for the parity check."))
    seed: int = field(default=0, metadata=_help("Seed for prompt sampling."))
    device: str = field(
        default="auto", metadata=_help("auto (device_map=auto on GPU), cpu, cuda, cuda:N, mps.")
    )
    dtype: str = field(default="auto", metadata=_help("auto (checkpoint dtype), float32, bfloat16, float16."))
    layer: int | None = field(default=None, metadata=_help("Use this layer's candidate, skip selection."))
    position: int | None = field(
        default=None, metadata=_help("EOI position (negative from the end) with --layer.")
    )
    batch_size: int | str = field(
        default=32,
        metadata=_help("Prompts per forward pass, or 'auto' for the largest that fits on the GPU."),
    )
    architecture: str | None = field(
        default=None, metadata=_help("Use this registered model type's adapter.")
    )
    trust_remote_code: bool = field(default=False, metadata=_help("Allow code from the model repository."))
    allow_pickle: bool = field(default=False, metadata=_help("Allow loading .bin/.pt pickled weights."))
    overwrite: bool = field(
        default=False,
        metadata=_help(
            "Replace an earlier abliterate output at --output (a directory holding its abliterate.json)."
        ),
    )
    system_prompt: str | None = field(default=None, metadata=_help("System prompt for every chat."))
    max_layer_fraction: float = field(
        default=0.8, metadata=_help("Discard candidates at layer >= this fraction.")
    )
    max_kl: float | None = field(
        default=None,
        metadata=_help(
            "First-token KL bound on harmless prompts: the search picks the fewest refusals under it "
            "(default 0.05); with --search none, the paper's candidate filter (default 0.1)."
        ),
    )
    search: str = field(
        default="tpe",
        metadata=_help(
            "Search a family of exact edits with Optuna TPE ('tpe'), or keep the paper's rule ('none')."
        ),
    )
    trials: int = field(default=48, metadata=_help("Cheap trials of the search (batched per forward)."))
    search_budget: float = field(default=150.0, metadata=_help("Seconds the search's trials may take."))
    search_prompts: int = field(
        default=8, metadata=_help("Harmful and harmless validation prompts each cheap trial is scored on.")
    )
    finalists: int = field(
        default=3, metadata=_help("Trials confirmed by greedy generation (besides the paper's point).")
    )
    min_steering: float | None = field(
        default=None,
        metadata=_help(
            "Discard candidates whose steering score is not above this (default: the unsteered score)."
        ),
    )
    screen_prompts: int = field(
        default=4, metadata=_help("Harmful prompts for the first, coarse ablation screen.")
    )
    screen_keep: int = field(default=6, metadata=_help("Candidates kept after the screen for full scoring."))
    layer_stride: int = field(
        default=2, metadata=_help("Screen every N-th layer first, then the layers beside the best (1 = all).")
    )
    project_harmless: bool = field(
        default=False,
        metadata=_help(
            "Remove each candidate's component along the harmless mean (lower KL; off = the paper)."
        ),
    )
    norm_preserving: bool = field(
        default=False,
        metadata=_help(
            "Fold (I − s r̂ r̂ᵀ) W D, D keeping every writer column's length (exact and certified; not for "
            "fused experts, not as LoRA)."
        ),
    )
    max_new_tokens: int = field(
        default=24, metadata=_help("Tokens generated per prompt when evaluating refusals.")
    )
    evaluate: bool = field(default=True, metadata=_help("Measure refusal rate and KL before and after."))
    progress: bool = field(default=True, metadata=_help("Show progress bars."))
    chat_template_kwargs: str | None = field(
        default=None,
        metadata=_help("JSON object of extra chat template arguments, e.g. '{\"enable_thinking\": false}'."),
    )
    max_thinking_tokens: int = field(
        default=512,
        metadata=_help("Extra tokens generated per reply when the template opens a thinking block."),
    )
    device_map: str | None = field(
        default=None,
        metadata=_help(
            "auto, balanced, sequential or FILE.json ({module: device}): spread the model over GPUs, CPU "
            "and disk with accelerate; the output is then streamed from the source files."
        ),
    )
    max_memory: str | None = field(
        default=None, metadata=_help("Memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB.")
    )
    offload_folder: str | None = field(
        default=None, metadata=_help("Folder for weights --device-map offloads to disk.")
    )
    load_in_4bit: bool = field(
        default=False,
        metadata=_help(
            "Find the direction on a 4-bit (bitsandbytes, GPU) copy; the output is streamed from the "
            "full-precision source files."
        ),
    )
    direction_only: bool = field(
        default=False,
        metadata=_help(
            "Find and check the direction (hooks only) and write it with the manifest, no weights; "
            "`abliterate apply` folds it into a checkpoint later."
        ),
    )
    format: str = field(
        default="checkpoint",
        metadata=_help("Write a full checkpoint, or an exact PEFT LoRA adapter of the edit ('lora')."),
    )

    def __post_init__(self) -> None:
        if (self.layer is None) != (self.position is None):
            raise ValueError("--layer and --position go together: give both or neither")
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            if not self.batch_size.isdigit():
                raise ValueError(f"--batch-size {self.batch_size!r}: give a number or 'auto'")
            object.__setattr__(self, "batch_size", int(self.batch_size))
        counts = ("n_train", "n_val", "n_eval", "n_parity", "trials")
        for name in counts + (("batch_size",) if self.batch_size != "auto" else ()):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_thinking_tokens < 0:
            raise ValueError(f"--max-thinking-tokens must be at least 0, got {self.max_thinking_tokens}")
        if not self.search_budget > 0:  # written so that NaN is refused too
            raise ValueError(
                f"--search-budget must be a positive number of seconds, got {self.search_budget}"
            )
        parse_template_kwargs(self.chat_template_kwargs)  # raises on anything but a JSON object
        if self.format not in ("checkpoint", "lora"):
            raise ValueError(f"--format {self.format!r}: choose 'checkpoint' or 'lora'")
        if self.norm_preserving and self.format == "lora":
            raise ValueError("a norm-preserving edit is full rank; use --format checkpoint")  # as lora.py
        if self.search not in ("tpe", "none"):
            raise ValueError(f"--search {self.search!r}: choose 'tpe' or 'none'")
        if self.trials < 1 or self.finalists < 0 or self.search_prompts < 1:
            raise ValueError("--trials and the search's prompt count must be at least 1")
        self.dispatch  # noqa: B018 - parses the dispatch flags: raises on a malformed one
        if self.direction_only and self.push_to_hub is not None:
            raise ValueError("--direction-only writes no weights to push: give --output DIR instead")
        if self.output is None and self.push_to_hub is None:
            raise ValueError("nothing to do: give --output DIR and/or --push-to-hub REPO_ID")

    @property
    def selection_max_kl(self) -> float:
        """The paper's candidate filter: ``--max-kl`` with ``--search none``, else its default 0.1."""
        if self.search == "none" and self.max_kl is not None:
            return self.max_kl
        return 0.1 if self.max_kl is None else max(self.max_kl, 0.1)

    @property
    def search_max_kl(self) -> float:
        """The KL bound the search's choice must meet (default 0.05)."""
        return 0.05 if self.max_kl is None else self.max_kl

    @property
    def dispatch(self) -> Dispatch:
        """``--device-map``, ``--max-memory``, ``--offload-folder`` and ``--load-in-4bit``, parsed."""
        from abliterate.model.dispatch import parse_dispatch

        return parse_dispatch(self.device_map, self.max_memory, self.offload_folder, self.load_in_4bit)


def help_of(name: str) -> str:
    """The help text of a ``RunConfig`` field (the CLI uses it so texts live in one place)."""
    return next(f.metadata["help"] for f in fields(RunConfig) if f.name == name)
