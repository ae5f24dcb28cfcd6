"""What a streamed apply edits in a safetensors checkpoint, decided and validated before anything is written.

``config.json`` picks the adapter, whose ``checkpoint_writers`` and ``checkpoint_embeddings`` patterns name
the tensors to edit. Every matched tensor is checked (dtype, stored size, a ``d_model`` axis), every decoder
block must have an attention and an MLP writer among them, and the direction must fit the embedding, so a
wrong adapter or a partly covered checkpoint fails in seconds with nothing written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from abliterate.adapters.names import ATTENTION_MODULES
from abliterate.adapters.registry import get_adapter, registered_model_types
from abliterate.adapters.spec import FUSED_LAYOUTS, Adapter, Layout
from abliterate.adapters.tying import ties_embeddings
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.kernel import ROWS_WRITE, Scales
from abliterate.io.safetensors import (
    DTYPES,
    INDEX_NAME,
    Shard,
    TensorEntry,
    find_shards,
    read_header,
    read_json,
)
from abliterate.model.sources import declared_layers, text_config
from abliterate.prove.structure import canonical, layer_of, read_structure

# The module names attention blocks use on disk (``self_attn``, ``attn``, ``attention``, ``self_attention``).
_ATTENTION_NAME = re.compile(r"\.(" + "|".join(ATTENTION_MODULES) + r")\.")


@dataclass(frozen=True)
class StreamPlan:
    """Everything a streamed apply writes, read from the checkpoint's config and shard headers.

    Attributes:
        shards: the checkpoint's shards, their headers parsed.
        index: ``model.safetensors.index.json``'s content, ``None`` for a single file.
        config: ``config.json``'s content.
        model_type: the adapter's model type that was used.
        edits: tensor name -> layout to orthogonalize it with.
        embedding: the token embedding, as stored.
        add_lm_head: name of an ``lm_head`` tensor to add (tied embeddings), else ``None``.
        untie: the model ties its embedding to its head; the output unties it.
    """

    shards: tuple[Shard, ...]
    index: dict | None
    config: dict
    model_type: str
    edits: dict[str, Layout]
    embedding: TensorEntry
    add_lm_head: str | None
    untie: bool


def plan_edit(checkpoint: Path, direction: torch.Tensor, architecture: str | None) -> StreamPlan:
    """Read config and shard headers, decide every edit and validate it before anything is written.

    Raises:
        ValueError: a pre-quantized checkpoint, an adapter without checkpoint patterns, patterns that
            match no embedding or writer, an uneditable tensor, a block without an attention or MLP
            writer, or a direction of another width than the embedding.
        LookupError: no adapter for the model type.
    """
    config = read_json(checkpoint / "config.json", "config.json")
    adapter, model_type = _pick_adapter(config, architecture, checkpoint)
    _refuse_quantized(config, checkpoint)
    if not adapter.checkpoint_writers or not adapter.checkpoint_embeddings:
        raise ValueError(
            f"the {adapter.name} adapter has no checkpoint patterns; use `abliterate run` instead"
        )
    names, index = find_shards(checkpoint)
    shards = tuple(read_header(checkpoint / name) for name in names)
    if index is not None:
        _check_index(index, shards)
    by_name = {entry.name: entry for shard in shards for entry in shard.entries}
    edits, embeddings = _match(by_name, adapter, checkpoint)
    token_embedding = _token_embedding(embeddings, adapter)
    d_model = token_embedding.shape[-1]
    if direction.shape[-1] != d_model:
        raise ValueError(
            f"the direction has {direction.shape[-1]} entries but {checkpoint}'s embedding "
            f"{token_embedding.name} is {list(token_embedding.shape)} (d_model={d_model}): "
            "the direction belongs to another model"
        )
    for name, layout in edits.items():
        _check_editable(by_name[name], layout, d_model)
    _check_every_block(edits, by_name, config, adapter, checkpoint)
    untie = ties_embeddings(config, model_type)
    add_head = _added_head(token_embedding, adapter, by_name) if untie else None
    return StreamPlan(shards, index, config, model_type, edits, token_embedding, add_head, untie)


def _refuse_quantized(config: dict, checkpoint: Path) -> None:
    quantization = config.get("quantization_config") or text_config(config).get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise ValueError(
            f"{checkpoint} is pre-quantized ({method}); apply edits full-precision weights only: "
            "apply the direction to its unquantized release"
        )


def _match(
    by_name: dict[str, TensorEntry], adapter: Adapter, checkpoint: Path
) -> tuple[dict[str, Layout], list[TensorEntry]]:
    """The tensors the adapter's patterns match (name -> layout), and the embeddings among them."""
    writers = [(re.compile(pattern), layout) for pattern, layout in adapter.checkpoint_writers]
    embeddings = [re.compile(pattern) for pattern in adapter.checkpoint_embeddings]
    edits: dict[str, Layout] = {}
    found_embeddings: list[TensorEntry] = []
    for entry in by_name.values():
        if any(pattern.fullmatch(entry.name) for pattern in embeddings):
            found_embeddings.append(entry)
            edits[entry.name] = _edit_layout(entry, "embedding")
            continue
        layout = next((layout for pattern, layout in writers if pattern.fullmatch(entry.name)), None)
        if layout is not None:
            edits[entry.name] = _edit_layout(entry, layout)
    if not found_embeddings or len(edits) == len(found_embeddings):
        raise ValueError(
            f"no {'embedding' if not found_embeddings else 'residual-writer'} tensor in {checkpoint} matches "
            f"the {adapter.name} adapter's patterns; is the model type right (see --architecture)?"
        )
    return edits, found_embeddings


def _token_embedding(found_embeddings: list[TensorEntry], adapter: Adapter) -> TensorEntry:
    """The token embedding (GPT-2 also edits its position embedding): the tensor named like the adapter's
    first embedding module, e.g. ``...embed_tokens.weight`` or ``...wte.weight``."""
    token_suffix = adapter.embeddings[0].rsplit(".", 1)[-1] + ".weight"
    named_like = [
        e for e in found_embeddings if e.name == token_suffix or e.name.endswith("." + token_suffix)
    ]
    return (named_like or found_embeddings)[0]


def _added_head(
    token_embedding: TensorEntry, adapter: Adapter, by_name: dict[str, TensorEntry]
) -> str | None:
    """The ``lm_head`` tensor an untied output must add, or ``None`` when the checkpoint stores one.

    The head takes the embedding's on-disk prefix: "lm_head.weight" beside "model.embed_tokens.weight",
    "language_model.lm_head.weight" beside "language_model.model.embed_tokens.weight" (multimodal).
    """
    embed_key, head_key = f"{adapter.embeddings[0]}.weight", f"{adapter.lm_head}.weight"
    on_disk = token_embedding.name
    prefix = on_disk[: -len(embed_key)] if on_disk.endswith("." + embed_key) else ""
    has_head = any(name == head_key or name.endswith("." + head_key) for name in by_name)
    return None if has_head else prefix + head_key


def _check_every_block(
    edits: dict[str, Layout],
    by_name: dict[str, TensorEntry],
    config: dict,
    adapter: Adapter,
    checkpoint: Path,
) -> None:
    """Every decoder block must have at least one attention and one MLP writer among the matched tensors.

    A checkpoint whose names the patterns only partly cover (a renamed MLP in some blocks, a missing
    shard) would otherwise be edited incompletely, and the output would silently keep the direction.
    """
    n_layers = declared_layers(config)
    if n_layers is None:
        return
    roles: dict[int, set[str]] = {layer: set() for layer in range(n_layers)}
    for name in edits:
        layer = layer_of(name)
        if layer in roles and len(by_name[name].shape) >= 2:  # weights, not biases
            roles[layer].add("attention" if _ATTENTION_NAME.search(name) else "mlp")
    for layer, found in roles.items():
        missing = {"attention", "mlp"} - found
        if missing:
            raise ValueError(
                f"block {layer} of {checkpoint} has no {' or '.join(sorted(missing))} writer among the "
                f"tensors the {adapter.name} adapter's patterns match; nothing was written "
                "(is --architecture right?)"
            )


def _pick_adapter(config: dict, architecture: str | None, checkpoint: Path) -> tuple[Adapter, str]:
    model_type = architecture or config.get("model_type")
    nested_type = text_config(config).get("model_type")
    if architecture is None and get_adapter(str(model_type)) is None and nested_type:
        model_type = nested_type
    adapter = get_adapter(str(model_type))
    if adapter is None:
        known = ", ".join(registered_model_types())
        how = "given with --architecture" if architecture else f"from {checkpoint / 'config.json'}"
        raise LookupError(
            f"no adapter for model type {model_type!r} ({how}); pass --architecture with one of: {known}"
        )
    return adapter, str(model_type)


def _check_index(index: dict, shards: tuple[Shard, ...]) -> None:
    stored = {shard.path.name: {entry.name for entry in shard.entries} for shard in shards}
    for name, file in index["weight_map"].items():
        if name not in stored[file]:
            raise ValueError(f"{INDEX_NAME} places {name} in {file}, but that shard does not hold it")


def _edit_layout(entry: TensorEntry, layout: Layout) -> Layout:
    """The layout to orthogonalize a matched tensor with: a bias (one axis less) has d_model last."""
    weight_dims = 3 if layout in FUSED_LAYOUTS else 2
    if len(entry.shape) == weight_dims:
        return layout
    if len(entry.shape) == weight_dims - 1:
        return "embedding"
    raise ValueError(
        f"tensor {entry.name} matches a {layout} writer pattern but has shape {list(entry.shape)}"
    )


def _check_editable(entry: TensorEntry, layout: Layout, d_model: int) -> None:
    if entry.dtype not in DTYPES:
        raise ValueError(
            f"tensor {entry.name} has dtype {entry.dtype}; only {', '.join(DTYPES)} can be edited"
        )
    numel = 1
    for size in entry.shape:
        numel *= size
    if numel * DTYPES[entry.dtype].itemsize != entry.end - entry.start:
        raise ValueError(
            f"tensor {entry.name}: shape {list(entry.shape)} does not match its stored byte count"
        )
    axis = -1 if layout in ROWS_WRITE else (0 if layout == "linear" else -2)
    if entry.shape[axis] != d_model:
        raise ValueError(
            f"tensor {entry.name} ({layout}, {list(entry.shape)}) has no axis of size d_model={d_model}"
        )


def tensor_scales(
    source: Path, architecture: str | None, declared: DeclaredEdit, plan: StreamPlan
) -> Callable[[str], tuple[Scales, bool]] | None:
    """Each edited tensor's fold by its on-disk name: its ``declared.scales`` and whether it is scaled by
    ``D`` (a norm-preserving edit's weights, never a bias); ``None`` for the plain edit.

    The group, block and whether a tensor is a bias come from the model's structure
    (``certificate.read_structure``), as the certificate reads them.

    Raises:
        ValueError: a tensor's writer group is unknown, the declared edit is out of range or zero
            (``DeclaredEdit.validate``), or a norm-preserving edit meets fused experts.
    """
    if declared.is_plain():
        return None
    required = read_structure(source, architecture).edits
    missing = [name for name in plan.edits if canonical(name) not in required]
    if missing:
        raise ValueError(
            f"cannot tell the writer group of {missing[0]} from the model's structure, so a per-group "
            "strength cannot be applied to it; fold with `abliterate run` instead"
        )
    declared.validate((required[canonical(n)].group, required[canonical(n)].layer) for n in plan.edits)
    if declared.norm_preserving:
        fused = [name for name in plan.edits if required[canonical(name)].group == "experts"]
        if fused:
            raise ValueError(
                f"{fused[0]}: a norm-preserving edit cannot scale a fused expert's input "
                "(no module boundary); use a plain edit for this model"
            )

    def scales(name: str) -> tuple[Scales, bool]:
        tensor = required[canonical(name)]
        return declared.scales(tensor.group, tensor.layer), declared.norm_preserving and not tensor.bias

    return scales
