"""Apply a refusal direction to a safetensors checkpoint on disk, one tensor at a time.

Never instantiates a model: ``config.json`` picks the adapter, whose ``checkpoint_writers`` and
``checkpoint_embeddings`` patterns name the tensors to edit. Edited tensors go through the same
``orthogonalize`` as the in-memory fold; every other byte is copied as is, so shard names, tensor order,
dtypes and header metadata are preserved. The byte-level work (header parsing, kernel copies,
incremental shard writing) lives in ``abliterate.io.safetensors``; this module decides what to edit,
validates it before anything is written, and handles the index, config, a tied head and the atomic
output (a temporary sibling directory renamed into place at the end).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from abliterate.adapters.registry import get_adapter, registered_model_types
from abliterate.adapters.spec import Adapter, Layout
from abliterate.adapters.tying import ties_embeddings
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.direction import unit_direction
from abliterate.edit.kernel import ROWS_WRITE, Strength, changes, orthogonalize_, refuse_non_finite
from abliterate.errors import GateError
from abliterate.io.output import (
    MANIFEST_NAME,
    atomic_directory,
    copy_source_file,
    prepare_output,
    write_apply_manifest,
)
from abliterate.io.safetensors import (
    DTYPES,
    INDEX_NAME,
    SHARD_NAME,
    Shard,
    TensorEntry,
    find_shards,
    read_header,
    read_json,
    reuse_freed_memory,
    write_shard,
)
from abliterate.model.sources import describe_source, refuse_prequantized
from abliterate.prove.certificate import Certificate
from abliterate.prove.files import COMPANION_PATTERNS, compare_companions
from abliterate.ship.report import apply_card

logger = logging.getLogger(__name__)

# The weights and every file transformers reads beside them (what verify compares, byte for byte).
HUB_ALLOW_PATTERNS = ["*.safetensors", *COMPANION_PATTERNS]
# The module names attention blocks use on disk (``self_attn``, ``attn``, ``attention``, ``self_attention``).
_ATTENTION_NAME = re.compile(r"\.(self_attn|attn|attention|self_attention)\.")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Weight files the loader could pick up instead of (or beside) the edited shards; never copied.
_STALE_WEIGHTS = re.compile(
    r"(model|consolidated.*|pytorch_model.*|tf_model|flax_model)\.(safetensors|bin|pth|pt|h5|msgpack)"
)


@dataclass(frozen=True)
class StreamReport:
    """What ``stream_apply`` did.

    Attributes:
        tensors_total: tensors written (including an ``lm_head`` added when untying embeddings).
        tensors_edited: tensors orthogonalized.
        bytes_read: bytes read from the checkpoint's shards.
        bytes_written: bytes written to the output shards.
        seconds: wall-clock time of the whole call.
        output: the output directory.
        model_type: the adapter's model type that was used.
        certificate: the weight certificate of the written files, or ``None`` when not asked for.
    """

    tensors_total: int
    tensors_edited: int
    bytes_read: int
    bytes_written: int
    seconds: float
    output: Path
    model_type: str
    certificate: Certificate | None = None


@dataclass(frozen=True)
class _Plan:
    shards: tuple[Shard, ...]
    index: dict | None
    config: dict
    model_type: str
    edits: dict[str, Layout]  # tensor name -> layout to orthogonalize it with
    embedding: TensorEntry  # the token embedding, as stored
    add_lm_head: str | None  # name of an lm_head tensor to add (tied embeddings), else None
    untie: bool


def stream_apply(
    checkpoint: str | Path,
    direction: torch.Tensor,
    output: str | Path,
    *,
    architecture: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    certify: bool = True,
    declared: DeclaredEdit | None = None,
) -> StreamReport:
    """Write a copy of ``checkpoint`` with ``direction`` folded out of every residual writer.

    Args:
        checkpoint: a local directory with ``config.json`` and ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``, or a Hub id ``owner/name`` (downloaded when not a local path).
        direction: ``[d_model]`` refusal direction, any non-zero length (``orthogonalize`` normalizes it),
            or an orthonormal subspace ``[k, d_model]`` (its row weights in ``declared.weights``).
        output: directory to create; written atomically (temporary sibling, renamed at the end). It may
            not overlap the checkpoint (``checkpoint.prepare_output``); an ``abliterate.json`` marks it.
        architecture: use this registered model type's adapter instead of ``config.json``'s.
        overwrite: replace an earlier abliterate output at ``output`` (only after everything was written
            successfully).
        progress: show a progress bar over the bytes processed.
        certify: run the weight certificate (``abliterate.prove.certificate``) on the written files before
            they are moved into place; a failure raises ``GateError`` and leaves nothing behind.
        declared: per-writer strengths of a searched edit (``abliterate.find.search``; its direction is
            ignored); ``None`` folds at strength 1 everywhere. Each tensor's group and block come from
            the model's structure (``certificate.read_structure``), as the certificate reads them.

    Returns:
        A ``StreamReport``. Tied embeddings are untied: the output stores ``lm_head`` with the original
        matrix and ``config.json`` says ``tie_word_embeddings: false``.
    """
    started = time.perf_counter()
    unit_direction(direction, "the direction")  # validation only: it raises on a bad vector
    # The vector goes to ``orthogonalize`` as given, like the in-memory fold, so both edits are bitwise equal.
    vector = direction.detach().cpu()
    refuse_prequantized(describe_source(str(checkpoint)), command="apply")
    target = prepare_output(output, checkpoint, overwrite)  # before the download and the plan
    source = _resolve_checkpoint(checkpoint)
    plan = _plan(source, vector, architecture)
    declared = _declared(vector, declared)
    with atomic_directory(target) as temp:
        counts, certificate = _write_and_certify(
            plan, source, temp, declared, architecture, progress, certify
        )
        card = apply_card(str(checkpoint), plan.model_type, certificate, _HUB_ID.match(str(checkpoint)))
        (temp / "README.md").write_text(card, "utf-8")
        write_apply_manifest(temp, str(checkpoint), "checkpoint")
    return StreamReport(*counts, time.perf_counter() - started, target.path, plan.model_type, certificate)


def stream_into(
    source: Path,
    direction: torch.Tensor,
    directory: Path,
    *,
    architecture: str | None = None,
    progress: bool = True,
    declared: DeclaredEdit | None = None,
) -> StreamReport:
    """``stream_apply`` into an existing, empty ``directory`` that the caller moves into place itself
    (``run`` of a dispatched model writes its staging directory this way), certificate included.

    Raises:
        GateError: the written files fail the weight certificate.
    """
    started = time.perf_counter()
    vector = direction.detach().cpu()
    plan = _plan(source, vector, architecture)
    declared = _declared(vector, declared)
    counts, certificate = _write_and_certify(plan, source, directory, declared, architecture, progress, True)
    return StreamReport(*counts, time.perf_counter() - started, directory, plan.model_type, certificate)


def _write_and_certify(
    plan: _Plan,
    source: Path,
    temp: Path,
    declared: DeclaredEdit,
    architecture: str | None,
    progress: bool,
    certify: bool,
) -> tuple[tuple[int, ...], Certificate | None]:
    edit_of = _edit_by_name(source, architecture, declared, plan)
    threads = torch.get_num_threads()
    try:
        # Slices this small gain nothing from intra-op threads, which only add a barrier per operation
        # (measured 3-10x slower with 2 threads on a busy 2-core machine).
        torch.set_num_threads(1)
        reuse_freed_memory()
        counts = _write_all(plan, source, temp, declared.direction, progress, edit_of)
        certificate = _certify(source, temp, declared, architecture, progress) if certify else None
    finally:
        torch.set_num_threads(threads)
    return counts, certificate


def _declared(vector: torch.Tensor, declared: DeclaredEdit | None) -> DeclaredEdit:
    return DeclaredEdit(vector) if declared is None else replace(declared, direction=vector)


# What one tensor's fold is given: its strength, and whether it is scaled by ``D`` (a norm-preserving
# edit's weights; never a bias).
TensorEdit = tuple[Strength, bool]


def _edit_by_name(
    source: Path, architecture: str | None, declared: DeclaredEdit, plan: _Plan
) -> Callable[[str], TensorEdit] | None:
    """Each edited tensor's strength and scaling by its on-disk name, or ``None`` for the plain edit.

    The group, block and whether a tensor is a bias come from the model's structure
    (``certificate.read_structure``), as the certificate reads them.

    Raises:
        ValueError: a tensor's writer group is unknown, the declared edit is out of range or zero
            (``DeclaredEdit.validate``), or a norm-preserving edit meets fused experts.
    """
    from abliterate.prove.structure import canonical, read_structure

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

    def edit(name: str) -> TensorEdit:
        tensor = required[canonical(name)]
        return declared.scales_for(tensor.group, tensor.layer), declared.norm_preserving and not tensor.bias

    return edit


def _certify(
    source: Path, written: Path, declared: DeclaredEdit, architecture: str | None, progress: bool
) -> Certificate:
    from abliterate.prove.certificate import certify_checkpoint

    certificate = certify_checkpoint(source, written, declared, architecture=architecture, progress=progress)
    if not certificate.passed:
        raise GateError(f"weight certificate failed: {certificate.reason}; nothing was written")
    files = compare_companions(source, written)
    if not files.passed:
        raise GateError(f"files beside the weights: {files.reason}; nothing was written")
    return certificate


def local_checkpoint(source: str | Path) -> tuple[Path | None, str]:
    """The local safetensors directory behind a model source, or ``(None, why not)``.

    ``demo`` is its converted cache directory; a Hub id is downloaded (safetensors and JSON only); a
    GGUF file or a directory without safetensors weights has none.

    Raises:
        ValueError: the checkpoint's ``config.json`` holds a malformed value (see ``sources.check_config``).
    """
    if str(source) == "demo":
        from abliterate.model.demo import converted_demo_dir

        return converted_demo_dir(), ""
    path = Path(source).expanduser()
    if path.is_file():
        return None, f"{source} is a single file, not a safetensors checkpoint directory"
    try:
        directory = _resolve_checkpoint(source)
        find_shards(directory)
    except ValueError as error:
        return None, str(error)
    describe_source(str(directory))  # a malformed config.json is refused, not a reason to skip
    return directory, ""


def _resolve_checkpoint(checkpoint: str | Path) -> Path:
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path.absolute()
    if path.exists():
        raise ValueError(f"{path} is a file; give the checkpoint directory (with config.json) instead")
    if not _HUB_ID.match(str(checkpoint)):
        raise ValueError(f"checkpoint {checkpoint} is neither a local directory nor a Hub id like owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logger.info("%s is not a local directory: downloading it from the Hub", checkpoint)
    try:
        local = snapshot_download(
            repo_id=str(checkpoint),
            allow_patterns=HUB_ALLOW_PATTERNS,
            ignore_patterns=["consolidated*"],  # Mistral's second, unsharded copy of the weights
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise ValueError(f"could not download {checkpoint} from the Hub: {error}") from error
    return Path(local)


def _plan(checkpoint: Path, direction: torch.Tensor, architecture: str | None) -> _Plan:
    """Read config and shard headers, decide every edit and validate it before anything is written."""
    config = read_json(checkpoint / "config.json", "config.json")
    adapter, model_type = _pick_adapter(config, architecture, checkpoint)
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    quantization = config.get("quantization_config") or text_config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise ValueError(
            f"{checkpoint} is pre-quantized ({method}); apply edits full-precision weights only: "
            "apply the direction to its unquantized release"
        )
    if not adapter.checkpoint_writers or not adapter.checkpoint_embeddings:
        raise ValueError(
            f"the {adapter.name} adapter has no checkpoint patterns; use `abliterate run` instead"
        )
    names, index = find_shards(checkpoint)
    shards = tuple(read_header(checkpoint / name) for name in names)
    if index is not None:
        _check_index(index, shards)
    writers = [(re.compile(pattern), layout) for pattern, layout in adapter.checkpoint_writers]
    embeddings = [re.compile(pattern) for pattern in adapter.checkpoint_embeddings]
    edits: dict[str, Layout] = {}
    found_embeddings: list[TensorEntry] = []
    by_name = {entry.name: entry for shard in shards for entry in shard.entries}
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
    # The token embedding (GPT-2 also edits its position embedding): the tensor named like the adapter's
    # first embedding module, e.g. ``...embed_tokens.weight`` or ``...wte.weight``.
    token_suffix = adapter.embeddings[0].rsplit(".", 1)[-1] + ".weight"
    named_like = [
        e for e in found_embeddings if e.name == token_suffix or e.name.endswith("." + token_suffix)
    ]
    token_embedding = (named_like or found_embeddings)[0]
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
    # The head takes the embedding's on-disk prefix: "lm_head.weight" beside "model.embed_tokens.weight",
    # "language_model.lm_head.weight" beside "language_model.model.embed_tokens.weight" (multimodal).
    embed_key, head_key = f"{adapter.embeddings[0]}.weight", f"{adapter.lm_head}.weight"
    on_disk = token_embedding.name
    prefix = on_disk[: -len(embed_key)] if on_disk.endswith("." + embed_key) else ""
    head = prefix + head_key
    has_head = any(name == head_key or name.endswith("." + head_key) for name in by_name)
    add_head = head if untie and not has_head else None
    return _Plan(shards, index, config, model_type, edits, token_embedding, add_head, untie)


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
    from abliterate.prove.structure import layer_of

    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    n_layers = next(
        (
            part[key]
            for part in (config, text_config)
            for key in ("num_hidden_layers", "n_layer", "num_layers")
            if isinstance(part.get(key), int)
        ),
        None,
    )
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
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    model_type = architecture or config.get("model_type")
    if architecture is None and get_adapter(str(model_type)) is None and text_config.get("model_type"):
        model_type = text_config["model_type"]
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
    weight_dims = 3 if layout in ("experts", "experts_t") else 2
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


def _write_all(
    plan: _Plan,
    source: Path,
    temp: Path,
    direction: torch.Tensor,
    progress: bool,
    edit_of: Callable[[str], TensorEdit] | None = None,
) -> tuple[int, ...]:
    """Write every shard, the index, config.json and the other files; return the report's counts."""
    head_shard = next(shard for shard in plan.shards if plan.embedding in shard.entries)
    total_bytes = sum(shard.path.stat().st_size for shard in plan.shards)
    # One read buffer, sized for the largest edited tensor and reused for all of them.
    by_name = {entry.name: entry for shard in plan.shards for entry in shard.entries}
    buffer = bytearray(max(by_name[name].end - by_name[name].start for name in plan.edits))

    def edit(entry: TensorEntry, weight: torch.Tensor) -> None:
        """Fold the direction out of one tensor that ``write_shard`` read, in place."""
        refuse_non_finite(entry.name, weight)  # raised before this tensor's fold; the output is removed
        strength, scaled = (1.0, False) if edit_of is None else edit_of(entry.name)
        orthogonalize_(weight, direction, plan.edits[entry.name], strength, scaled)

    # A writer of strength 0 is copied as it is, and not counted as edited.
    edits = {name for name in plan.edits if edit_of is None or changes(edit_of(name)[0])}

    # An untied head keeps the original embedding: its bytes are copied again, after the embedding's shard.
    head = None if plan.add_lm_head is None else (plan.add_lm_head, plan.embedding)
    tensors = edited = read = written = 0
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="apply", disable=not progress) as bar:
        for shard in plan.shards:
            append = head if shard is head_shard else None
            destination = temp / shard.path.name
            counts = write_shard(shard, destination, edits, edit, buffer, append, bar.update)
            tensors, edited = tensors + counts[0], edited + counts[1]
            read, written = read + counts[2], written + counts[3]
    if plan.index is not None:
        if plan.add_lm_head is None:
            copy_source_file(source / INDEX_NAME, temp / INDEX_NAME, source)
        else:
            index = json.loads(json.dumps(plan.index))
            index["weight_map"][plan.add_lm_head] = head_shard.path.name
            if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
                index["metadata"]["total_size"] += plan.embedding.end - plan.embedding.start
            _write_json(temp / INDEX_NAME, index, sort_keys=True)
    if plan.untie:
        config = json.loads(json.dumps(plan.config))
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
        _write_json(temp / "config.json", config, sort_keys=False)
    else:
        copy_source_file(source / "config.json", temp / "config.json", source)
    # The source's README.md is its own model card, and its abliterate.json (an abliterate output as the
    # source) describes another edit: the edited checkpoint gets its own of both instead.
    handled = {shard.path.name for shard in plan.shards} | {
        INDEX_NAME,
        "config.json",
        "README.md",
        MANIFEST_NAME,
    }
    _copy_other_files(source, temp, handled)
    return tensors, edited, read, written


def _copy_other_files(source: Path, temp: Path, handled: set[str]) -> None:
    """Copy tokenizer files, generation config and the like (content and mode, links followed:
    ``checkpoint.copy_source_file``); skip other weight files and hidden entries."""
    for folder, subfolders, files in os.walk(source):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = Path(folder).relative_to(source)
        for name in files:
            path = relative / name
            if str(path) in handled or name.startswith("."):
                continue
            if _STALE_WEIGHTS.fullmatch(name) or SHARD_NAME.fullmatch(name) or name.endswith(".gguf"):
                logger.warning("not copying %s: a weight file the edit does not cover", path)
                continue
            (temp / relative).mkdir(parents=True, exist_ok=True)
            copy_source_file(Path(folder) / name, temp / path, source)


def _write_json(path: Path, data: dict, sort_keys: bool) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")
