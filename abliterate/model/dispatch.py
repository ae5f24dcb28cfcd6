"""Models larger than one device: accelerate's device maps, memory limits and disk offload.

``--device-map``, ``--max-memory`` and ``--offload-folder`` are passed to ``from_pretrained`` under
transformers' own names. A dispatched model keeps offloaded weights on the ``meta`` device and loads
them for each forward pass, so nothing may read a device or a tie from a meta tensor, and the edit
cannot be folded into such weights in place: ``run`` streams the source files instead (see
``pipeline.run_streamed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abliterate.io.safetensors import read_json

_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_PLACES = ("cpu", "disk", "mps")


@dataclass(frozen=True)
class Dispatch:
    """How to place a model that may not fit one device.

    Attributes:
        device_map: accelerate's strategy name or an explicit ``{module: device}`` map, or ``None``.
        max_memory: ``{device: size}`` limits, or ``None``.
        offload_folder: where weights offloaded to ``disk`` go (a safetensors source is read in place).
        load_in_4bit: quantize the weights to 4 bits on load with bitsandbytes (GPU only).
    """

    device_map: str | dict[str, Any] | None = None
    max_memory: dict[int | str, str] | None = None
    offload_folder: str | None = None
    load_in_4bit: bool = False

    @property
    def active(self) -> bool:
        """Whether the model is placed by accelerate (or quantized) rather than loaded whole."""
        return self.device_map is not None or self.load_in_4bit

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained`` (empty when nothing is asked for)."""
        kwargs: dict[str, Any] = {}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        elif self.load_in_4bit:
            kwargs["device_map"] = "auto"
        if self.max_memory is not None:
            kwargs["max_memory"] = self.max_memory
        if self.offload_folder is not None:
            kwargs["offload_folder"] = self.offload_folder
        if self.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True)
        return kwargs


def parse_dispatch(
    device_map: str | None,
    max_memory: str | None,
    offload_folder: str | None,
    load_in_4bit: bool = False,
) -> Dispatch:
    """The CLI's dispatch flags, checked.

    Raises:
        ValueError: a malformed flag, or ``--load-in-4bit`` without a CUDA GPU and bitsandbytes.
        FileNotFoundError: a device-map file that does not exist.
    """
    if load_in_4bit:
        check_4bit_available()
    if (max_memory or offload_folder) and device_map is None and not load_in_4bit:
        raise ValueError("--max-memory and --offload-folder need --device-map (e.g. --device-map auto)")
    return Dispatch(
        _device_map(device_map),
        _max_memory(max_memory),
        str(Path(offload_folder).expanduser()) if offload_folder else None,
        load_in_4bit,
    )


def _device_map(value: str | None) -> str | dict[str, Any] | None:
    if value is None or value in _STRATEGIES:
        return value
    path = Path(value).expanduser()
    if path.suffix != ".json":
        raise ValueError(f"--device-map {value!r}: give {', '.join(_STRATEGIES)} or a FILE.json")
    if not path.is_file():
        raise FileNotFoundError(f"--device-map file not found: {value}")
    mapping = read_json(path, "--device-map file")  # one line for invalid JSON or a non-object
    if not mapping:
        raise ValueError(f"--device-map {value}: expected a JSON object of module name to device")
    return {name: _device(str(device), f"--device-map {value}") for name, device in mapping.items()}


def _max_memory(value: str | None) -> dict[int | str, str] | None:
    if not value:
        return None
    limits: dict[int | str, str] = {}
    for item in value.split(","):
        device, equals, size = item.strip().partition("=")
        if not equals or not device or not size:
            raise ValueError(f"--max-memory {value!r}: expected DEVICE=SIZE[,…], e.g. 0=20GiB,cpu=64GiB")
        limits[_device(device.strip(), "--max-memory")] = size.strip()
    return limits


def _device(name: str, flag: str) -> int | str:
    """accelerate's device keys: GPU index as an int, or cpu / disk / mps."""
    if name.isdigit():
        return int(name)
    if name.startswith("cuda:") and name[5:].isdigit():
        return int(name[5:])
    if name in _PLACES:
        return name
    raise ValueError(f"{flag}: unknown device {name!r} (use a GPU index, cuda:N, cpu, disk or mps)")


def check_4bit_available() -> None:
    """``--load-in-4bit`` needs a CUDA GPU and the bitsandbytes package.

    Raises:
        ValueError: either is missing (one line naming what, and the way around it).
    """
    import importlib.util

    if not torch.cuda.is_available():
        raise ValueError(
            "--load-in-4bit needs a CUDA GPU (bitsandbytes), and none is available: run without it, or "
            "use --device-map auto --offload-folder DIR to run a model larger than memory"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes")


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the device the input embedding runs on, never ``meta``.

    An embedding offloaded by accelerate holds a meta tensor; its hook's execution device says where
    the computation happens.
    """
    embedding = model.get_input_embeddings()
    if embedding.weight.device.type != "meta":
        return embedding.weight.device
    execution = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    return torch.device(execution if execution is not None else "cpu")


def offloaded(model: nn.Module) -> bool:
    """Whether some weights are offloaded (held as meta tensors and loaded per forward pass)."""
    return any(parameter.device.type == "meta" for parameter in model.parameters())
