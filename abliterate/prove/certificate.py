"""The weight certificate: an edited checkpoint equals the declared edit of its original, tensor by tensor.

No forward pass, no model in memory, no GPU needed: both checkpoints are read one tensor at a time, so a 70B
checkpoint is certified within the streaming memory bound. What it proves:

* **Which tensors must change comes from the model's structure** (``abliterate.prove.structure``), not
  from the on-disk name patterns ``apply`` uses: a model is built on the meta device from ``config.json``
  (no weights), and transformers' own save-time conversion maps each writer parameter to its on-disk
  name(s).
* **Every such tensor equals the fold of the original** (a norm-preserving edit's weights with ``D``, its
  biases without, as ``RequiredEdit.bias`` tells them apart), recomputed here: bitwise when the
  checkpoint was written by this machine's kernel (``exact``); otherwise within a stated bound
  (``bounded``, ``abliterate.prove.bounds``): every element within one unit in the last place of the
  exact float64 fold plus the float32 working precision, and the part of the error along the direction at
  most ``LEAK_RATIO_LIMIT`` times that of the correctly rounded fold.
* **Every compared value is finite**: an edited tensor holding NaN or Inf fails (a comparison with NaN
  is false, so every bound is checked as "not within"), and a source whose writers hold NaN or Inf is
  refused, since the fold spreads one such value over a whole row, where any value would then pass.
* **The declared edit is an edit** (``DeclaredEdit.validate``): finite strengths in the search's range,
  and not zero on every writer (a no-op would certify the unmodified source as edited).
* **Every other tensor is bitwise equal** to the original (cast to the edited checkpoint's dtype when
  the run saved another dtype), and the head added when untying a tied embedding equals the original
  embedding.

What it cannot see is a writer the adapter does not list: that is the residual-stream completeness
check's job (``abliterate.prove.residual.completeness``), which runs on real prompts.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from abliterate.edit.declared import DeclaredEdit, RequiredEdit
from abliterate.edit.kernel import all_finite, changes, non_finite_writer
from abliterate.io.chunked import ChunkedReader
from abliterate.io.safetensors import DTYPES, TensorEntry
from abliterate.prove.bounds import TensorFold, judge_bounded
from abliterate.prove.checks import check_config, check_declared, check_names
from abliterate.prove.refold import device_fold, host_fold, mapped_host_fold
from abliterate.prove.structure import Structure, TensorSource, canonical, read_structure, tensor_index
from abliterate.prove.tally import Certificate, Tally

# The failure of a tensor that no residual writer lives in, yet differs from the original.
_NO_WRITER_THERE = "changed, but the structure says no residual writer lives there"


def certify_checkpoint(
    original: str | Path | TensorSource,
    edited: str | Path,
    declared: DeclaredEdit,
    *,
    architecture: str | None = None,
    progress: bool = True,
    structure: Structure | None = None,
    device: str | torch.device | None = None,
) -> Certificate:
    """Certify that ``edited`` is ``original`` with ``declared`` folded into every residual writer.

    Args:
        original: the unedited safetensors checkpoint directory, or a ``TensorSource`` (a GGUF file).
        edited: the edited safetensors checkpoint directory.
        declared: the direction and strengths the edit claims.
        architecture: adapter override.
        progress: show a progress bar over the bytes read.
        structure: ``read_structure(original, architecture)``, when the caller has it already.
        device: fold and compare every edited tensor on this device (both checkpoints streamed through
            it one tensor at a time: the fold of a run on CUDA is bitwise that device's, never the host's);
            ``None`` folds on the host (``certificate_device`` picks it for a run's or verify's device).

    Returns:
        The certificate (``passed`` tells the verdict; nothing is raised for a failing checkpoint).
    """
    started = time.perf_counter()
    device = None if device is None else torch.device(device)
    original = Path(original) if isinstance(original, str | Path) else original
    edited = Path(edited)
    structure = structure or read_structure(original, architecture)
    source = tensor_index(original) if isinstance(original, Path) else original.index()
    target = tensor_index(edited)
    tally = Tally()
    names_by_canonical = {canonical(name): name for name in source}
    if not check_declared(declared, structure, source, names_by_canonical, tally):
        return tally.certificate(time.perf_counter() - started)
    check_names(structure, source, target, tally)
    if isinstance(original, Path):
        check_config(original, edited, structure, declared, tally)
    else:
        original.check_config(edited, structure, declared, tally.fail)
    work = _Work(
        declared,
        tally,
        device,
        _reader(original),
        _Background(_reader(original), tally, isinstance(original, Path)),
    )
    try:
        _certify_tensors(source, target, structure, work, progress)
    finally:
        work.background.close()
        work.reader.close()
    tally.bytes_read = work.reader.bytes_read + work.background.reader.bytes_read
    return tally.certificate(time.perf_counter() - started)


def _certify_tensors(source: dict, target: dict, structure: Structure, work: _Work, progress: bool) -> None:
    """Check every tensor of the edited checkpoint against its original (names: ``check_names``)."""
    names_by_canonical = {canonical(name): name for name in source}
    total = sum(entry.end - entry.start for _, entry in target.values())
    with tqdm(total=2 * total, unit="B", unit_scale=True, desc="certify", disable=not progress) as bar:
        for name, (path, entry) in target.items():
            key = canonical(name)
            original_name = names_by_canonical.get(key)
            if original_name is None and key == structure.head and structure.tied:
                original_name = names_by_canonical.get(structure.embedding)
            if original_name is None:
                continue  # reported by check_names
            required = structure.edits.get(key)
            _certify_tensor(name, source[original_name], (path, entry), required, work)
            bar.update(2 * (entry.end - entry.start))
        work.background.collect()


def _reader(original: Path | TensorSource) -> ChunkedReader:
    return ChunkedReader() if isinstance(original, Path) else original.reader()


class _Background:
    """Byte comparisons of the tensors the edit must leave alone, run in a second thread beside the folds
    (numpy and torch release the GIL) with a reader of their own; tallied in the order they were asked."""

    def __init__(self, reader: ChunkedReader, tally: Tally, threaded: bool) -> None:
        self.reader, self.tally = reader, tally
        # A GGUF source dequantizes through state of its own (a fused tensor's group): one thread only.
        self.pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="certify-compare") if threaded else None
        )
        self.pending: deque[tuple[str, Future[bool]]] = deque()

    def same_bytes(
        self, name: str, original: tuple[Path, TensorEntry], edited: tuple[Path, TensorEntry]
    ) -> None:
        if self.pool is None:
            self.tally.unchanged(self.reader.same_bytes(original, edited), f"{name}: {_NO_WRITER_THERE}")
            return
        self.pending.append((name, self.pool.submit(self.reader.same_bytes, original, edited)))
        while self.pending and self.pending[0][1].done():
            self._tally_first()

    def collect(self) -> None:
        """Wait for every comparison asked for and tally it."""
        while self.pending:
            self._tally_first()

    def _tally_first(self) -> None:
        name, future = self.pending.popleft()
        self.tally.unchanged(future.result(), f"{name}: {_NO_WRITER_THERE}")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()


@dataclass(frozen=True)
class _Work:
    """What every tensor's check uses: the declared edit, the tally, the device that folds (``None``: the
    host path), the reader of both checkpoints and the background comparisons."""

    declared: DeclaredEdit
    tally: Tally
    device: torch.device | None
    reader: ChunkedReader
    background: _Background


def _certify_tensor(
    name: str,
    original: tuple[Path, TensorEntry],
    edited: tuple[Path, TensorEntry],
    required: RequiredEdit | None,
    work: _Work,
) -> None:
    """One tensor of the edited checkpoint: the original's (``required`` is ``None``) or its declared fold."""
    tally, reader = work.tally, work.reader
    tally.n_tensors += 1
    source_entry, target_entry = original[1], edited[1]
    if source_entry.shape != target_entry.shape:
        was, now = list(source_entry.shape), list(target_entry.shape)
        tally.fail(f"{name}: shape {now} differs from the original's {was}")
        return
    if required is None and source_entry.dtype == target_entry.dtype:
        work.background.same_bytes(name, original, edited)
        return
    if source_entry.dtype not in DTYPES or target_entry.dtype not in DTYPES:
        tally.fail(f"{name}: dtype {target_entry.dtype} (original {source_entry.dtype}) cannot be compared")
        return
    if required is not None:
        _certify_writer(name, original, edited, required, work)
        return
    expected = _original_for_fold(original, edited, reader)
    # Bitwise equality holds NaN and Inf to their own bits, so a non-writer may carry them unchanged.
    target_dtype = DTYPES[target_entry.dtype]
    tally.unchanged(reader.matches(expected.to(target_dtype), edited), f"{name}: {_NO_WRITER_THERE}")


def _original_for_fold(
    original: tuple[Path, TensorEntry], edited: tuple[Path, TensorEntry], reader: ChunkedReader
) -> torch.Tensor:
    """The original read in the dtype the run folded it in: the edited checkpoint's (the run loaded the
    original in it), or for a GGUF run its own (it folds the dequantized float32, then casts)."""
    cast_after_fold = getattr(original[0], "cast_after_fold", False)
    fold_dtype = DTYPES[original[1].dtype] if cast_after_fold else DTYPES[edited[1].dtype]
    return reader.tensor(original).to(fold_dtype)


def _certify_writer(
    name: str,
    original: tuple[Path, TensorEntry],
    edited: tuple[Path, TensorEntry],
    required: RequiredEdit,
    work: _Work,
) -> None:
    """A tensor the structure says the edit must change: the fold of the host (or of ``work.device``)
    bitwise, or within the bound; on the host first through memory maps (``_certified_in_place``)."""
    tally, reader, declared = work.tally, work.reader, work.declared
    target_dtype = DTYPES[edited[1].dtype]
    scales = declared.scales(required.group, required.layer)
    fused_norm_preserving = declared.norm_preserving and required.group == "experts"
    fold = TensorFold(
        declared.direction, required.layout, scales, declared.norm_preserving and not required.bias
    )
    where = f"{name} ({required.group} {required.layer})"
    foldable = changes(scales) and not fused_norm_preserving
    if foldable and _certified_in_place(where, (original, edited), required, fold, work):
        return
    expected = _original_for_fold(original, edited, reader)
    if not all_finite(expected):  # a fold spreads it over a row, where any value would then pass
        tally.fail(non_finite_writer(name))
        return
    if not changes(scales):  # strength 0: this writer must be left as it was
        same = reader.matches(expected.to(target_dtype), edited)
        tally.unchanged(same, f"{name}: changed, but the declared edit gives it strength 0")
        return
    if fused_norm_preserving:
        tally.fail(f"{name}: a norm-preserving edit is declared, but fused experts cannot carry one")
        return
    if work.device is None:
        source, target, failure = host_fold(original, edited, fold, reader, expected)
    else:
        source, target, failure = device_fold(edited, fold, reader, expected, work.device)
        fold = replace(fold, direction=fold.direction.to(work.device))
    if target is None:  # bitwise this machine's fold: exact, unless the fold itself overflows
        if failure:
            tally.fail(f"{where}: the declared fold overflows to NaN/Inf in {edited[1].dtype}")
        else:
            tally.edited(required.group, required.layer, exact=True, leak=1.0)
        return
    _tally_bounded(where, required, (source, target), fold, tally)


def _tally_bounded(
    where: str,
    required: RequiredEdit,
    pair: tuple[torch.Tensor, torch.Tensor],
    fold: TensorFold,
    tally: Tally,
) -> None:
    """A writer that is not bitwise this machine's fold of its finite original: within the bound or not."""
    source, target = pair
    if not all_finite(target):  # the original and its fold are finite: these values are not the edit
        tally.fail(f"{where}: holds NaN/Inf values, where the declared edit of the original is finite")
        return
    leak, failure = judge_bounded(source, target, fold)
    tally.edited(required.group, required.layer, exact=False, leak=leak)
    if failure:
        tally.fail(f"{where}: {failure}")


def _certified_in_place(
    where: str,
    pair: tuple[tuple[Path, TensorEntry], tuple[Path, TensorEntry]],
    required: RequiredEdit,
    fold: TensorFold,
    work: _Work,
) -> bool:
    """The host's check of a writer stored in one dtype in both checkpoints (``pair``: original, edited),
    reading both through memory maps once (``mapped_host_fold``); ``False`` when it does not apply or saw
    a non-finite value, so the general path (``_certify_writer``) reads the tensors and says what is wrong."""
    original, edited = pair
    if work.device is not None or not isinstance(original[0], Path):
        return False
    seen = mapped_host_fold(original, edited, fold, work.reader)
    if seen is None or not seen.finite:
        return False
    if seen.equal:
        work.tally.edited(required.group, required.layer, exact=True, leak=1.0)
        return True
    # Read again for the bound, in their stored dtype, as host_fold does.
    tensors = (work.reader.tensor(original, fresh=True), work.reader.tensor(edited, fresh=True))
    _tally_bounded(where, required, tensors, fold, work.tally)
    return True
