"""Apply a refusal direction to a safetensors checkpoint on disk, one tensor at a time.

Never instantiates a model: ``abliterate.ship.plan`` decides from ``config.json`` and the shard headers
which tensors to edit and validates it before anything is written. Edited tensors go through the same
``orthogonalize`` as the in-memory fold; every other byte is copied as is, so shard names, tensor order,
dtypes and header metadata are preserved. The byte-level work (header parsing, kernel copies,
incremental shard writing) lives in ``abliterate.io.safetensors``; this module writes the shards, the
index, config, a tied head and the companion files, certifies what it wrote, and places the output
atomically (a temporary sibling directory renamed into place at the end).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.direction import unit_direction
from abliterate.edit.kernel import all_finite, changes, fold_into, refuse_non_finite
from abliterate.errors import GateError
from abliterate.io.locations import HUB_ID
from abliterate.io.output import (
    MANIFEST_NAME,
    atomic_directory,
    copy_source_file,
    prepare_output,
    write_apply_manifest,
)
from abliterate.io.safetensors import (
    INDEX_NAME,
    SHARD_NAME,
    Shard,
    TensorEntry,
    reuse_freed_memory,
)
from abliterate.io.shard_writer import write_shard
from abliterate.model.sources import describe_source, hub_revision, refuse_prequantized, resolve_checkpoint
from abliterate.prove.certificate import Certificate
from abliterate.prove.files import compare_companions
from abliterate.prove.structure import read_structure
from abliterate.ship.plan import StreamPlan, plan_edit, tensor_scales
from abliterate.ship.report import apply_card
from abliterate.ship.written import WriterFold, certify_written, structural_folds

logger = logging.getLogger(__name__)

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


def stream_apply(
    checkpoint: str | Path,
    declared: DeclaredEdit,
    output: str | Path,
    *,
    architecture: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    certify: bool = True,
    direction_file: str | Path | None = None,
) -> StreamReport:
    """Write a copy of ``checkpoint`` with the declared edit folded into every residual writer.

    Args:
        checkpoint: a local directory with ``config.json`` and ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``, or a Hub id ``owner/name`` (downloaded when not a local path).
        declared: the edit: its direction ``[d_model]``, any non-zero length (``orthogonalize`` normalizes
            it), or an orthonormal subspace ``[k, d_model]``, at each writer's ``declared.scales``. Each
            tensor's group and block come from the model's structure (``certificate.read_structure``), as
            the certificate reads them; the paper's plain edit needs no structure.
        output: directory to create; written atomically (temporary sibling, renamed at the end). It may
            not overlap the checkpoint (``checkpoint.prepare_output``); an ``abliterate.json`` marks it.
        architecture: use this registered model type's adapter instead of ``config.json``'s.
        overwrite: replace an earlier abliterate output at ``output`` (only after everything was written
            successfully).
        progress: show a progress bar over the bytes processed.
        certify: run the weight certificate (``abliterate.prove.certificate``) on the written files before
            they are moved into place; a failure raises ``GateError`` and leaves nothing behind.
        direction_file: the file ``declared`` was read from, copied into the output and named in its
            manifest (with the source's Hub revision), so that ``abliterate verify OUTPUT`` needs no more.

    Returns:
        A ``StreamReport``. Tied embeddings are untied: the output stores ``lm_head`` with the original
        matrix and ``config.json`` says ``tie_word_embeddings: false``.
    """
    started = time.perf_counter()
    unit_direction(declared.direction, "the direction")  # validation only: it raises on a bad vector
    refuse_prequantized(describe_source(str(checkpoint)), command="apply")
    target = prepare_output(output, checkpoint, overwrite)  # before the download and the plan
    source = resolve_checkpoint(checkpoint)
    plan, declared = _planned(source, declared, architecture)  # before the staging directory
    with atomic_directory(target) as temp:
        report = _write_and_certify(plan, source, temp, declared, architecture, progress, certify, started)
        card = apply_card(str(checkpoint), plan.model_type, report.certificate, HUB_ID.match(str(checkpoint)))
        (temp / "README.md").write_text(card, "utf-8")
        revision = hub_revision(str(checkpoint))
        write_apply_manifest(
            temp, str(checkpoint), "checkpoint", revision=revision, direction_file=direction_file
        )
    return replace(report, seconds=time.perf_counter() - started, output=target.path)


def stream_into(
    source: Path,
    declared: DeclaredEdit,
    directory: Path,
    *,
    architecture: str | None = None,
    progress: bool = True,
) -> StreamReport:
    """``stream_apply`` into an existing, empty ``directory`` that the caller moves into place itself
    (``run`` of a dispatched model writes its staging directory this way), certificate included.

    Raises:
        GateError: the written files fail the weight certificate.
    """
    started = time.perf_counter()
    plan, declared = _planned(source, declared, architecture)
    return _write_and_certify(plan, source, directory, declared, architecture, progress, True, started)


def _planned(
    source: Path, declared: DeclaredEdit, architecture: str | None
) -> tuple[StreamPlan, DeclaredEdit]:
    """The plan, and the declared edit with its direction on the CPU.

    The vector goes to ``orthogonalize`` as given (not normalized here), like the in-memory fold, so both
    edits are bitwise equal.
    """
    vector = declared.direction.detach().cpu()
    plan = plan_edit(source, vector, architecture)
    return plan, replace(declared, direction=vector)


def _write_and_certify(
    plan: StreamPlan,
    source: Path,
    directory: Path,
    declared: DeclaredEdit,
    architecture: str | None,
    progress: bool,
    certify: bool,
    started: float,
) -> StreamReport:
    """Write every file of the edited checkpoint into ``directory`` and certify it (when asked): folded as the
    model's structure says, every written byte read back (``abliterate.ship.written``).

    Raises:
        GateError: the written files fail the weight certificate or the companion-file comparison.
    """
    scales_by_name = tensor_scales(source, architecture, declared, plan)  # validates a searched edit
    structure = read_structure(source, architecture) if certify else None
    if structure is not None:
        folds = structural_folds(source, plan.edits, structure, declared)
    else:
        folds = {}
        for name, layout in plan.edits.items():
            scales, scaled = (1.0, False) if scales_by_name is None else scales_by_name(name)
            if changes(scales):  # a writer of strength 0 is copied as it is, and not counted as edited
                folds[name] = WriterFold(layout, scales, scaled, "", -1)
    threads = torch.get_num_threads()
    try:
        # One fold thread: kernel copies (and read-back compares) run beside it in a second thread, and
        # slices this small gain nothing from intra-op threads, which only add a barrier per operation
        # (measured 3-10x slower with 2 threads on a busy 2-core machine).
        torch.set_num_threads(1)
        reuse_freed_memory()
        counts, mismatches = _write_all(plan, source, directory, declared.direction, progress, folds, certify)
    finally:
        torch.set_num_threads(threads)
    certificate = None
    if structure is not None:
        certificate = certify_written(source, directory, structure, declared, folds, mismatches, started)
        _raise_unless_passed(certificate, source, directory)
    seconds = time.perf_counter() - started
    return StreamReport(*counts, seconds, directory, plan.model_type, certificate)


def _raise_unless_passed(certificate: Certificate, source: Path, written: Path) -> None:
    if not certificate.passed:
        raise GateError(f"weight certificate failed: {certificate.reason}; nothing was written")
    files = compare_companions(source, written)
    if not files.passed:
        raise GateError(f"files beside the weights: {files.reason}; nothing was written")


def _write_all(
    plan: StreamPlan,
    source: Path,
    temp: Path,
    direction: torch.Tensor,
    progress: bool,
    folds: dict[str, WriterFold],
    verify: bool,
) -> tuple[tuple[int, int, int, int], list[str]]:
    """Write every shard, the index, config.json and the other files; return the report's counts and,
    with ``verify``, what read back differently from what was meant."""
    head_shard = next(shard for shard in plan.shards if plan.embedding in shard.entries)
    counts = _write_shards(plan, head_shard, temp, direction, progress, folds, verify)
    _write_index(plan, head_shard, source, temp)
    _write_config(plan, source, temp)
    # The source's README.md is its own model card, and its abliterate.json (an abliterate output as the
    # source) describes another edit: the edited checkpoint gets its own of both instead.
    handled = {shard.path.name for shard in plan.shards} | {
        INDEX_NAME,
        "config.json",
        "README.md",
        MANIFEST_NAME,
    }
    _copy_other_files(source, temp, handled)
    return counts


def _write_shards(
    plan: StreamPlan,
    head_shard: Shard,
    temp: Path,
    direction: torch.Tensor,
    progress: bool,
    folds: dict[str, WriterFold],
    verify: bool,
) -> tuple[tuple[int, int, int, int], list[str]]:
    """Write every shard with the tensors of ``folds`` folded; ``(tensors, edited, bytes read, bytes
    written)`` and the read-back mismatches."""
    total_bytes = sum(shard.path.stat().st_size for shard in plan.shards)
    # One read buffer, sized for the largest edited tensor and reused for all of them.
    by_name = {entry.name: entry for shard in plan.shards for entry in shard.entries}
    buffer = bytearray(max((by_name[name].end - by_name[name].start for name in folds), default=0))
    overflows: list[str] = []

    def edit(entry: TensorEntry, stored: torch.Tensor, out: torch.Tensor) -> None:
        """Fold the direction out of one stored tensor into ``out``, each tile checked finite in the cache."""
        fold, finite = folds[entry.name], [True]

        def visit(_: int, tile: torch.Tensor) -> None:
            finite[0] = finite[0] and all_finite(tile)

        fold_into(stored, out, direction, fold.layout, fold.scales, fold.scaled, visit)
        if finite[0]:  # a NaN or Inf in the source leaves one in its fold: a finite fold had a finite source
            return
        refuse_non_finite(entry.name, stored)  # the source's own: one line; the output is removed
        if verify:
            overflows.append(f"{entry.name}: the declared fold overflows to NaN/Inf in {entry.dtype}")

    # An untied head keeps the original embedding: its bytes are copied again, after the embedding's shard.
    head = None if plan.add_lm_head is None else (plan.add_lm_head, plan.embedding)
    tensors = edited = read = written = 0
    mismatches: list[str] = []
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="apply", disable=not progress) as bar:
        for shard in plan.shards:
            append = head if shard is head_shard else None
            destination = temp / shard.path.name
            result = write_shard(shard, destination, folds, edit, buffer, append, bar.update, verify)
            tensors, edited = tensors + result.tensors, edited + result.edited
            read, written = read + result.read, written + result.written
            mismatches += result.mismatches
    return (tensors, edited, read, written), overflows + mismatches


def _write_index(plan: StreamPlan, head_shard: Shard, source: Path, temp: Path) -> None:
    """The shard index: copied as is, or with an added ``lm_head`` placed beside the embedding."""
    if plan.index is None:
        return
    if plan.add_lm_head is None:
        copy_source_file(source / INDEX_NAME, temp / INDEX_NAME, source)
        return
    index = json.loads(json.dumps(plan.index))
    index["weight_map"][plan.add_lm_head] = head_shard.path.name
    if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
        index["metadata"]["total_size"] += plan.embedding.end - plan.embedding.start
    _write_json(temp / INDEX_NAME, index, sort_keys=True)


def _write_config(plan: StreamPlan, source: Path, temp: Path) -> None:
    """``config.json``: copied as is, or saying ``tie_word_embeddings: false`` (also in a ``text_config``)."""
    if not plan.untie:
        copy_source_file(source / "config.json", temp / "config.json", source)
        return
    config = json.loads(json.dumps(plan.config))
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    _write_json(temp / "config.json", config, sort_keys=False)


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
