"""The checked inputs of a run and the model it works on: ``Inputs``/``prepare``, ``Subject``/``load``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from abliterate.adapters.resolve import blocks_of, residual_writers, resolve_adapter
from abliterate.adapters.spec import Adapter
from abliterate.config import RunConfig
from abliterate.edit.walker import check_finite, check_norm_preserving

# checkpoint and loading are called through their modules, so tests can replace a stage's core (a load
# that must not happen) by patching the module attribute.
from abliterate.io import output as checkpoint
from abliterate.model import loading
from abliterate.model.batching import (
    EncodedPrompts,
    auto_batch_size,
    encode,
    eoi_length,
)
from abliterate.model.chat import ChatFormat, detect_thinking, parse_template_kwargs
from abliterate.model.gguf import gguf_output_dtype
from abliterate.model.prompts import PromptSplits, load_prompt_classes
from abliterate.model.sources import check_layer, describe_source, refuse_prequantized
from abliterate.prove.parity import check_dtype
from abliterate.ship.hub import PushTarget, check_push_auth, staging_directory


@dataclass(frozen=True)
class Inputs:
    """What the cheap checks produced, before any heavy work.

    Attributes:
        output: the checked output directory (``checkpoint.prepare_output``), or ``None`` (push only).
        push_target: the checked Hub repository and token, or ``None`` (no push).
        harmful: harmful prompts, split into train/val/eval/parity.
        harmless: harmless prompts, split the same way.
        staging: where a push without ``--output`` stages the checkpoint, else ``None``.
    """

    output: checkpoint.OutputDir | None
    push_target: PushTarget | None
    harmful: PromptSplits
    harmless: PromptSplits
    staging: Path | None = None

    @property
    def prompt_sizes(self) -> dict[str, dict[str, int]]:
        """The prompts each split holds, per class: fewer than ``--n-*`` asked for when a source is small."""
        return {"harmful": self.harmful.sizes(), "harmless": self.harmless.sizes()}


def prepare(config: RunConfig, hub_api: object | None) -> Inputs:
    """Check the source, the output directory and the Hub token and read the prompts: bad input fails
    here, early."""
    loading.check_device(config.load.device)
    source = describe_source(config.model)
    refuse_prequantized(source, direction_only=config.publishing.direction_only)
    check_layer(config.selection.layer, source.n_layers)
    if (
        config.load.dispatch.active
        and not config.publishing.direction_only
        and (source.is_gguf or source.weights_bytes is None)
    ):
        if source.path is not None:  # a hub id is checked once downloaded
            raise ValueError(
                f"--device-map/--load-in-4bit write the output by streaming the source's safetensors files, "
                f"and {config.model} has none: convert it to safetensors first, or run without them"
            )
    output = (
        checkpoint.prepare_output(config.publishing.output, config.model, config.publishing.overwrite)
        if config.publishing.output
        else None
    )
    target = (
        check_push_auth(config.publishing.push_to_hub, hub_api) if config.publishing.push_to_hub else None
    )
    staging = None
    if target is not None and output is None:
        staging = staging_directory(target.repo_id, source.weights_bytes)
    sizes = dict(
        n_train=config.prompts.n_train,
        n_val=config.prompts.n_val,
        n_eval=config.prompts.n_eval,
        n_parity=config.prompts.n_parity,
        seed=config.prompts.seed,
    )
    harmful, harmless = load_prompt_classes(config.prompts.harmful, config.prompts.harmless, **sizes)
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
        dtype="float32" if from_gguf else config.load.dtype,
        device=config.load.device,
        trust_remote_code=config.load.trust_remote_code,
        allow_pickle=config.load.allow_pickle,
        dispatch=config.load.dispatch,
    )
    check_dtype(loaded.dtype_name)  # no parity proof for 8-bit floats or unknown formats: refuse now
    adapter = resolve_adapter(loaded.model, config.load.architecture)
    # NaN/Inf in a writer would make every candidate direction NaN, and the fold spread it: say so now.
    check_finite(residual_writers(loaded.model, adapter))
    n_layers = len(blocks_of(loaded.model, adapter)[1])
    chat, replies = _chat_formats(config, loaded.tokenizer)
    n_eoi = eoi_length(loaded.tokenizer, chat=chat)
    check_layer(config.selection.layer, n_layers)
    if config.selection.norm_preserving:  # fused experts cannot carry it: refuse before any forward pass
        check_norm_preserving(residual_writers(loaded.model, adapter))
    if config.selection.position is not None and not -n_eoi <= config.selection.position < n_eoi:
        raise ValueError(
            f"--position {config.selection.position} is out of range: there are {n_eoi} EOI tokens"
        )
    batch_size = config.load.batch_size
    if batch_size == "auto":
        prompts = inputs.harmful.train + inputs.harmless.train
        batch_size = auto_batch_size(loaded.model, loaded.tokenizer, prompts)
    return Subject(
        loaded,
        adapter,
        n_layers=n_layers,
        n_eoi=n_eoi,
        batch_size=batch_size,
        cast_to=_cast_after_fold(config, loaded),
        chat=chat,
        replies=replies,
    )


def _chat_formats(config: RunConfig, tokenizer: object) -> tuple[ChatFormat, ChatFormat]:
    """The scoring format (thinking closed) and the format replies are generated with."""
    thinking = detect_thinking(tokenizer)
    kwargs = parse_template_kwargs(config.prompts.chat_template_kwargs)
    scoring = ChatFormat(config.prompts.system_prompt, kwargs, thinking, close_thinking=True)
    return scoring, ChatFormat(config.prompts.system_prompt, kwargs, thinking)


def _cast_after_fold(config: RunConfig, loaded: loading.LoadedModel) -> str | None:
    if not loaded.from_gguf:
        return None
    wanted = gguf_output_dtype(config.load.dtype)
    return None if wanted == loaded.dtype_name else wanted
