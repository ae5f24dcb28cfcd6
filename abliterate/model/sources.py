"""What a model source is, read cheaply before any heavy work: its config, quantization and place on disk.

``run`` and ``apply`` refuse here what they cannot do well (a pre-quantized checkpoint, a ``--layer`` past the
last block) so that a bad input costs seconds, not a model load. The safetensors directory behind a source
(``local_checkpoint``, downloading a Hub id's weights and companion files) is resolved here too.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abliterate.adapters.tying import tie_word_embeddings
from abliterate.io.locations import COMPANION_PATTERNS, HUB_ID, cache_dir
from abliterate.io.safetensors import find_shards
from abliterate.model.demo import converted_demo_dir

logger = logging.getLogger(__name__)

# The weights and every file transformers reads beside them (what verify compares, byte for byte).
HUB_ALLOW_PATTERNS = ["*.safetensors", *COMPANION_PATTERNS]
# ``quant_method`` values that are not weights a fold can edit: everything except GGUF, which transformers
# dequantizes to plain float tensors on load.
_DEQUANTIZED_ON_LOAD = {"gguf"}
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class SourceInfo:
    """What is known about a model source without loading it.

    Attributes:
        source: what the user gave (hub id, directory, ``.gguf`` file, ``demo``).
        path: the local file or directory behind it, or ``None`` (a hub id).
        config: its ``config.json`` content, or ``None`` when it cannot be read cheaply.
    """

    source: str
    path: Path | None
    config: dict[str, Any] | None

    @property
    def is_gguf(self) -> bool:
        """The source is a single ``.gguf`` file (dequantized on load)."""
        return self.path is not None and self.path.suffix == ".gguf"

    @property
    def quantization(self) -> str | None:
        """The ``quant_method`` of a pre-quantized checkpoint (``fp8``, ``gptq``, …), else ``None``."""
        return quantization_method(self.config or {})

    @property
    def weights_bytes(self) -> int | None:
        """Bytes of the weights an edited copy will take, roughly: the safetensors files, or four times a
        GGUF file (4-bit quantized, saved as bf16); ``None`` when unknown (a hub id)."""
        if self.path is None or not self.path.exists():
            return None
        if self.path.is_file():
            return 4 * self.path.stat().st_size if self.is_gguf else None
        return sum(path.stat().st_size for path in self.path.glob("*.safetensors")) or None

    @property
    def n_layers(self) -> int | None:
        """Decoder blocks declared by the config, when it says."""
        return declared_layers(self.config or {})


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a multimodal config (its ``text_config``), or ``{}`` when it has none."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else {}


def declared_layers(config: dict[str, Any]) -> int | None:
    """The number of decoder blocks a config declares (top level or ``text_config``), when it says."""
    for part in (config, text_config(config)):
        for key in _LAYER_KEYS:
            if isinstance(part.get(key), int):
                return part[key]
    return None


def describe_source(source: str) -> SourceInfo:
    """What can be read cheaply about ``source``: a local ``config.json``, or a hub id's (one small file).

    Never raises for a missing or unreachable source: loading it later gives the precise error.

    Raises:
        ValueError: its ``config.json`` holds a value transformers would misread or reject with a
            traceback (see ``check_config``).
    """
    info = _describe(source)
    where = f"{source}'s config.json" if info.path is None else str(info.path / "config.json")
    check_config(info.config, where)
    return info


def _describe(source: str) -> SourceInfo:
    if source == "demo":
        directory = cache_dir() / "safetensors"
        return SourceInfo(source, directory, _read_config(directory / "config.json"))
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        return SourceInfo(source, path.absolute(), None)
    if path.exists():
        return SourceInfo(source, path.absolute(), _read_config(path / "config.json"))
    if not HUB_ID.match(source):
        return SourceInfo(source, None, None)
    return SourceInfo(source, None, _hub_config(source))


def check_config(config: dict[str, Any] | None, where: str = "config.json") -> None:
    """Refuse ``config.json`` values that abliterate or transformers would misread.

    ``tie_word_embeddings`` decides whether the edited embedding is also the output head: the string
    ``"false"`` is true to Python and a type error to transformers.

    Args:
        config: a ``config.json``'s content, or ``None`` (nothing to check).
        where: how to name the file in the error.

    Raises:
        ValueError: a value has the wrong type (one line naming the key).
    """
    if config is None:
        return
    for prefix, part in (("", config), ("text_config.", text_config(config))):
        tie_word_embeddings(part, prefix, where)


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _hub_config(repo_id: str) -> dict[str, Any] | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return _read_config(Path(hf_hub_download(repo_id, "config.json")))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        # Not known yet is fine: loading the model later reports the precise problem.
        logger.info("could not read %s's config.json before loading it: %s", repo_id, error)
        return None


def quantization_method(config: dict[str, Any]) -> str | None:
    """``quant_method`` of a config's ``quantization_config`` (top level or ``text_config``), unless GGUF."""
    for part in (config, text_config(config)):
        quantization = part.get("quantization_config")
        if quantization:
            method = (
                quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
            )
            if str(method).lower() not in _DEQUANTIZED_ON_LOAD:
                return str(method)
    return None


def refuse_prequantized(info: SourceInfo, *, direction_only: bool = False, command: str = "run") -> None:
    """Refuse a pre-quantized checkpoint (fp8, gptq, awq, bitsandbytes, mxfp4, compressed-tensors, …).

    Its weights are integer codes with scales, not matrices a fold can edit exactly. ``run
    --direction-only`` only reads activations, so it may use one; the direction is then applied to the
    unquantized release with ``abliterate apply``.

    Raises:
        ValueError: the checkpoint is quantized (one line naming the format and the way out).
    """
    method = info.quantization
    if method is None or direction_only:
        return
    if command == "apply":
        way_out = "apply the direction to its unquantized release"
    else:
        way_out = (
            "use its unquantized release, or find the direction here with `abliterate run "
            "--direction-only` and fold it into the unquantized release with `abliterate apply`"
        )
    raise ValueError(
        f"{info.source} is pre-quantized ({method}); {command} edits full-precision weights only: {way_out}"
    )


def check_layer(layer: int | None, n_layers: int | None) -> None:
    """Refuse ``--layer`` past the model's last block (known from the config or the loaded model).

    Raises:
        ValueError: the layer is out of range.
    """
    if layer is None or n_layers is None:
        return
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"--layer {layer} is out of range: the model has {n_layers} layers (0 to {n_layers - 1})"
        )


def local_checkpoint(source: str | Path) -> tuple[Path | None, str]:
    """The local safetensors directory behind a model source, or ``(None, why not)``.

    ``demo`` is its converted cache directory; a Hub id is downloaded (safetensors and JSON only); a
    GGUF file or a directory without safetensors weights has none.

    Raises:
        ValueError: the checkpoint's ``config.json`` holds a malformed value (see ``check_config``).
    """
    if str(source) == "demo":
        return converted_demo_dir(), ""
    path = Path(source).expanduser()
    if path.is_file():
        return None, f"{source} is a single file, not a safetensors checkpoint directory"
    try:
        directory = resolve_checkpoint(source)
        find_shards(directory)
    except ValueError as error:
        return None, str(error)
    describe_source(str(directory))  # a malformed config.json is refused, not a reason to skip
    return directory, ""


def hub_revision(source: str) -> str | None:
    """The commit hash of a Hub id's snapshot in the local cache (which loading or downloading it filled).

    ``None`` for a local path, ``demo``, or a Hub id not in the cache: a local path has no revision.
    Reads the cache only, never the network.
    """
    if source == "demo" or Path(source).expanduser().exists() or not HUB_ID.match(source):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id=source, filename="config.json")
    if not isinstance(cached, str):  # not cached, or cached as missing
        return None
    snapshot = Path(cached).parent.name
    return snapshot if re.fullmatch(r"[0-9a-f]{40}", snapshot) else None


def resolve_checkpoint(checkpoint: str | Path, revision: str | None = None) -> Path:
    """The checkpoint directory behind a local path or a Hub id (its weights and companion files downloaded,
    at ``revision`` when given).

    Raises:
        ValueError: a file, neither a directory nor a Hub id, or a failed download.
    """
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path.absolute()
    if path.exists():
        raise ValueError(f"{path} is a file; give the checkpoint directory (with config.json) instead")
    if not HUB_ID.match(str(checkpoint)):
        raise ValueError(f"checkpoint {checkpoint} is neither a local directory nor a Hub id like owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logger.info("%s is not a local directory: downloading it from the Hub", checkpoint)
    try:
        local = snapshot_download(
            repo_id=str(checkpoint),
            revision=revision,
            allow_patterns=HUB_ALLOW_PATTERNS,
            ignore_patterns=["consolidated*"],  # Mistral's second, unsharded copy of the weights
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise ValueError(f"could not download {checkpoint} from the Hub: {error}") from error
    return Path(local)
