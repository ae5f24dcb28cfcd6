"""Load a chat model and its tokenizer from a hub id, a local directory, a .gguf file, or the demo."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from abliterate.io.locations import HUB_ID
from abliterate.io.safetensors import INDEX_NAME, find_shards
from abliterate.model.demo import DEMO_BASE_MODEL, converted_demo_dir
from abliterate.model.dispatch import Dispatch, input_device
from abliterate.model.gguf import drop_gguf_quantization, load_gguf_model
from abliterate.model.sources import describe_source

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICES = "auto, cpu, cuda, cuda:N or mps"


@dataclass
class LoadedModel:
    """A model ready for abliteration.

    Attributes:
        model: the causal LM in eval mode.
        tokenizer: its tokenizer, left padding, with a pad token.
        source: what the user asked for (hub id, path, or "demo").
        base_model: the hub id to name as ``base_model`` in the model card, when known.
        from_gguf: the weights were dequantized from GGUF.
    """

    model: nn.Module
    tokenizer: object
    source: str
    base_model: str | None
    from_gguf: bool = False

    @property
    def dtype_name(self) -> str:
        """Name of the model's parameter dtype, e.g. ``"float32"``."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @property
    def input_device(self) -> torch.device:
        """Device of the input embedding (where input ids go; never ``meta``)."""
        return input_device(self.model)


def resolve_device(device: str) -> tuple[str | None, str | dict | None]:
    """Turn ``--device`` into ``(move_to, device_map)``.

    ``auto`` spreads the model over all GPUs with accelerate's ``device_map="auto"`` when CUDA exists,
    else stays on the CPU.
    """
    if device == "auto":
        return (None, "auto") if torch.cuda.is_available() else ("cpu", None)
    check_device(device)
    return device, None


def check_device(device: str) -> None:
    """Refuse a ``--device`` that names no device this machine has, before any work is done.

    Args:
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``mps:N``.

    Raises:
        ValueError: not a device name, or one this machine lacks (one line naming the flag).
    """
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as error:  # torch's parse error: "Expected one of cpu, cuda, ... device type"
        raise ValueError(f"--device {device!r}: not a device; use {_DEVICES}") from error
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r}: abliterate runs on {_DEVICES}")
    if parsed.type == "cpu":
        return
    backend = torch.cuda if parsed.type == "cuda" else torch.mps
    available = torch.cuda.is_available() if parsed.type == "cuda" else torch.backends.mps.is_available()
    if not available:
        raise ValueError(f"--device {device}: {parsed.type.upper()} is not available on this machine")
    count = backend.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(
            f"--device {device}: this machine has {count} {parsed.type} device(s), numbered from 0"
        )


def _dtype_arg(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _locate_weights(source: str) -> tuple[str, str | None]:
    """Return ``(directory_or_repo, gguf_file)`` for a model source, or raise a clear error."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model not found: {source} (no such .gguf file)")
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"model not found: {source} has no config.json")
        return str(path), None
    if not HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model not found: {source} is neither a local path nor a hub id")
    return source, None


def checked_source(source: str) -> tuple[str, str | None, str | None]:
    """``(directory_or_repo, gguf_file, base_model)`` for a model source, checked before any load.

    ``base_model`` is the hub id to name in the model card (the demo's base, or ``source`` when it is no
    local path), else ``None``.

    Raises:
        FileNotFoundError: no such model.
        ValueError: its ``config.json`` holds values transformers would not load, or its index names a
            shard outside the checkpoint.
    """
    if source == "demo":
        return str(converted_demo_dir()), None, DEMO_BASE_MODEL
    directory, gguf_file = _locate_weights(source)
    base_model = source if not Path(source).expanduser().exists() else None
    if gguf_file is None:
        describe_source(source)  # raises on config.json values transformers would not load
        if (Path(directory) / INDEX_NAME).is_file():
            find_shards(Path(directory))  # shard names outside the folder: refused, never read
    return directory, gguf_file, base_model


def load_model(
    source: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    dispatch: Dispatch | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for abliteration.

    Args:
        source: hub id, local directory, path to a ``.gguf`` file, or ``"demo"``.
        dtype: ``auto`` (the checkpoint's dtype) or a dtype name.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        trust_remote_code: allow code shipped with the checkpoint (off by default).
        allow_pickle: allow pickled ``.bin`` weights; safetensors only by default.
        dispatch: ``--device-map``/``--max-memory``/``--offload-folder``/``--load-in-4bit``; when active,
            accelerate places the model and ``device`` is not used.

    Returns:
        The loaded model.

    Raises:
        FileNotFoundError: the model does not exist.
        ValueError: the tokenizer has no chat template, or an option is invalid.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file, base_model = checked_source(source)
    from_gguf = gguf_file is not None
    move_to, placement = _placement(device, dispatch)
    common = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    from transformers.utils import logging as transformers_logging

    # Our own progress bars cover the stages; transformers' per-tensor bar would only add noise.
    transformers_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **common)
        # Check the template before spending time on the weights.
        _prepare_tokenizer(tokenizer, source)
        use_safetensors = None if (allow_pickle or gguf_file) else True
        model = _streamed_gguf(directory, gguf_file, dtype, move_to, placement)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=_dtype_arg(dtype), **placement, use_safetensors=use_safetensors, **common
            )
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise FileNotFoundError(f"could not load {source}: {first_line}") from error
    if move_to is not None:
        model = model.to(move_to)
    model.eval()
    model.requires_grad_(False)
    if from_gguf:
        drop_gguf_quantization(model)
    return LoadedModel(model, tokenizer, source, base_model, from_gguf)


def _streamed_gguf(
    directory: str, gguf_file: str | None, dtype: str, move_to: str | None, placement: dict
) -> nn.Module | None:
    """A GGUF model loaded one tensor at a time onto one device (``gguf.load_gguf_model``), or ``None``:
    not a GGUF, a dispatched placement (accelerate's), or tensors that loader does not map.

    ``device_map="auto"`` on a machine with one GPU is that GPU, as accelerate would place a model there.
    """
    if gguf_file is None:
        return None
    device = move_to
    if device is None and placement == {"device_map": "auto"} and torch.cuda.device_count() == 1:
        device = "cuda:0"
    if device is None:
        return None
    working = torch.float32 if dtype == "auto" else _dtype_arg(dtype)
    return load_gguf_model(Path(directory) / gguf_file, dtype=working, device=device)


def _placement(device: str, dispatch: Dispatch | None) -> tuple[str | None, dict]:
    """``(move_to, from_pretrained placement kwargs)``: ``--device``, unless a dispatch places the model."""
    move_to, device_map = resolve_device(device)
    placement: dict = {"device_map": device_map}
    if dispatch is not None and dispatch.active:
        move_to, placement = None, dispatch.from_pretrained_kwargs()
    return move_to, placement


def _prepare_tokenizer(tokenizer: object, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{source} has no chat template: abliterate needs an instruction-tuned chat model")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Any token works as padding because padded positions are masked out.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ValueError(f"{source}: the tokenizer has no pad, eos or unk token to pad with")
