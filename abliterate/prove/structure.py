"""What the model's structure says about its checkpoint: which on-disk tensors the edit must change, and how.

A model is built on the meta device from ``config.json`` (no weights), the adapter's writer modules are
resolved on it, and transformers' own save-time conversion maps each writer parameter to its on-disk name(s)
(fused experts become per-expert tensors, Mixtral's ``w2``, …). So which tensors must change comes from the
model, not from the on-disk name patterns ``apply`` uses. Names are compared without the text-model prefix a
checkpoint may carry (``canonical``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from abliterate.adapters.names import NAME_PREFIXES
from abliterate.adapters.spec import FUSED_LAYOUTS
from abliterate.edit.declared import DeclaredEdit, RequiredEdit
from abliterate.io.chunked import ChunkedReader
from abliterate.io.safetensors import Shard, TensorEntry, find_shards, read_header

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class Structure:
    """What the model's structure says about its checkpoint.

    Attributes:
        edits: canonical on-disk name → the edit it must carry.
        alternatives: per writer parameter, its in-memory name and the names it is saved under.
        head: canonical name of the output head's weight.
        embedding: canonical name of the token embedding's weight.
        tied: whether the original ties the head to the embedding.
        model_type: the adapter's model type.
    """

    edits: dict[str, RequiredEdit]
    alternatives: list[tuple[str, tuple[str, ...]]]
    head: str
    embedding: str
    tied: bool
    model_type: str


class TensorSource(Protocol):
    """An original that is not a safetensors directory (``abliterate.prove.gguf_source.GGUFSource``).

    Attributes:
        config: the model's config, built from the source's own metadata.
        cast_after_fold: the run folds the source's tensors in their own dtype and casts the result once.
    """

    config: Any
    cast_after_fold: bool

    def index(self) -> dict[str, tuple[Any, TensorEntry]]: ...  # saved name → location for ``reader()``

    def reader(self) -> ChunkedReader: ...  # a ChunkedReader that also reads this source's locations

    def check_config(self, edited: Path, structure: Structure, declared: DeclaredEdit, fail: Any) -> None: ...


def canonical(name: str) -> str:
    """An on-disk tensor name without the text-model prefix it may carry (``model.``, ``transformer.``…)."""
    for prefix in NAME_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def layer_of(name: str) -> int:
    """The decoder-block index in a tensor name, or -1 (embeddings, head, norms)."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else -1


def tensor_index(checkpoint: Path) -> dict[str, tuple[Path, TensorEntry]]:
    """Where each tensor of a safetensors checkpoint lives: saved name → (shard path, header entry)."""
    names, _ = find_shards(checkpoint)
    index: dict[str, tuple[Path, TensorEntry]] = {}
    for file in names:
        shard: Shard = read_header(checkpoint / file)
        for entry in shard.entries:
            index[entry.name] = (shard.path, entry)
    return index


def read_structure(checkpoint: Path | TensorSource, architecture: str | None = None) -> Structure:
    """Build the model on the meta device from ``checkpoint/config.json`` and list what the edit must change.

    Raises:
        ValueError: the config cannot be built into a model without remote code.
    """
    from transformers import AutoModelForCausalLM

    from abliterate.adapters.paths import locate
    from abliterate.adapters.resolve import embeddings_of, resolve_adapter, resolve_writers

    try:
        config = _config_of(checkpoint, architecture)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(
            f"cannot build {checkpoint}'s model from its config.json to certify it: {error}"
        ) from error
    adapter = resolve_adapter(model, architecture)
    parameters: dict[str, RequiredEdit] = {}
    for embedding in embeddings_of(model, adapter):
        parameters[f"{embedding.name}.weight"] = RequiredEdit("embedding", "embedding", -1)
    for writer in resolve_writers(model, adapter):
        group = writer.group
        parameters[f"{writer.name}.{writer.weight}"] = RequiredEdit(writer.layout, group, writer.layer)
        if writer.bias_tensor() is not None:
            parameters[f"{writer.name}.{writer.bias}"] = RequiredEdit("embedding", group, writer.layer, True)
    edits, alternatives = _on_disk_names(model, parameters)
    head_name = locate(model, adapter.lm_head)
    embedding_name = embeddings_of(model, adapter)[0].name
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    head, embedding = canonical(f"{head_name}.weight"), canonical(f"{embedding_name}.weight")
    return Structure(edits, alternatives, head, embedding, tied, adapter.name)


def _config_of(checkpoint: Path | TensorSource, architecture: str | None) -> Any:
    """The checkpoint's config; a model type transformers does not know is read as ``architecture``."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from abliterate.io.safetensors import read_json

    if not isinstance(checkpoint, Path):  # a GGUF source: the config transformers builds from its metadata
        return checkpoint.config
    fields = read_json(checkpoint / "config.json", "config.json")
    if architecture is not None and fields.get("model_type") not in CONFIG_MAPPING:
        fields = {key: value for key, value in fields.items() if key != "model_type"}
        return AutoConfig.for_model(architecture, **fields)
    return AutoConfig.from_pretrained(str(checkpoint), trust_remote_code=False)


def _on_disk_names(
    model: torch.nn.Module, parameters: dict[str, RequiredEdit]
) -> tuple[dict[str, RequiredEdit], list[tuple[str, tuple[str, ...]]]]:
    """Map in-memory parameter names to the names ``save_pretrained`` writes.

    Fused experts are written per expert by some families: ``[E, d_model, d_in]`` becomes E tensors
    ``[d_model, d_in]`` (layout ``linear``), ``[E, d_in, d_model]`` becomes E ``conv1d``-like ones. A
    checkpoint may hold either naming (hub originals differ), so both are kept.

    Returns:
        ``(edits, alternatives)``: every acceptable canonical name → its edit, and per parameter its
        in-memory name and the names it is saved under (one of the two must be on disk).
    """
    from transformers.core_model_loading import revert_weight_conversion

    state = dict(model.state_dict(keep_vars=True))
    edits: dict[str, RequiredEdit] = {}
    alternatives = []
    for name, required in parameters.items():
        edits[canonical(name)] = required
        try:
            reverted = revert_weight_conversion(model, {name: state[name]})
        except Exception as error:
            logger.info("no save-time conversion for %s (%s): kept its in-memory name", name, error)
            reverted = {}
        for disk_name, tensor in reverted.items():
            layout = required.layout
            if tensor.dim() < state[name].dim() and layout in FUSED_LAYOUTS:
                layout = "linear" if layout == "experts" else "conv1d"
            edits[canonical(disk_name)] = replace(required, layout=layout)
        alternatives.append((canonical(name), tuple(sorted(canonical(n) for n in reverted))))
    return edits, alternatives
