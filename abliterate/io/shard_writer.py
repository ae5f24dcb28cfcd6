"""One output shard of a streamed apply, written with its copies overlapped and, when asked, read back.

Runs of unchanged tensors are copied in the kernel (``copy_range``) by a second thread while the caller's
thread reads, edits and writes the tensors between them, so copying and folding overlap. With ``verify``
every byte is read back after it is written: each copied run compared with the source, each edited tensor
with the bytes just computed, and the written header parsed again and compared with the one intended, so
``apply`` can certify its own output without folding a second time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from abliterate.io.chunked import file_holds, mapped_tensor, same_file_bytes
from abliterate.io.safetensors import (
    EditTensor,
    Shard,
    TensorEntry,
    buffer_tensor,
    copy_range,
    header_with,
    read_header,
    read_tensor,
    write_at,
)


@dataclass
class ShardWrite:
    """What ``write_shard`` did.

    Attributes:
        tensors: tensors written (an appended one included).
        edited: tensors passed through the edit.
        read: bytes read from the source shard.
        written: bytes of the output shard.
        mismatches: with ``verify``, what read back differently from what was meant (one line each).
    """

    tensors: int
    edited: int
    read: int
    written: int
    mismatches: list[str] = field(default_factory=list)


class _Copier:
    """Copies byte ranges of the source shard into the output in a background thread, each compared with
    the source after its copy when ``verify``; its own file handles, so offsets never race the caller's."""

    def __init__(self, source: Path, destination: Path, verify: bool) -> None:
        self.source = open(source, "rb", buffering=0)
        self.target = open(destination, "r+b", buffering=0)
        self.verify = verify
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply-copy")
        self.futures: list[tuple[str, Future[bool]]] = []

    def copy(self, what: str, offset: int, at: int, length: int) -> None:
        if length:
            self.futures.append((what, self.pool.submit(self._copy, offset, at, length)))

    def _copy(self, offset: int, at: int, length: int) -> bool:
        copy_range(self.source, self.target, offset, at, length)
        if not self.verify:
            return True
        return same_file_bytes((self.source.fileno(), offset), (self.target.fileno(), at), length)

    def finish(self) -> list[str]:
        """Wait for every copy (re-raising its error); the copied ranges that read back differently."""
        return [
            f"{what}: copied bytes differ from the source's" for what, f in self.futures if not f.result()
        ]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.source.close()
        self.target.close()


def write_shard(
    shard: Shard,
    destination: Path,
    edits: Collection[str],
    edit: EditTensor,
    buffer: bytearray,
    append: tuple[str, TensorEntry] | None,
    advance: Callable[[int], object],
    verify: bool = False,
) -> ShardWrite:
    """Write one output shard: its header, each tensor copied or edited, then an appended tensor.

    Every tensor keeps its offset, shifted by the longer header when a tensor is appended; runs of unedited
    tensors are copied in the kernel, by a second thread, without passing through this process's memory.

    Args:
        shard: the source shard.
        destination: the output file to create.
        edits: names of the tensors to pass through ``edit``; each must have a dtype in ``DTYPES``.
        edit: changes one tensor in place (see ``EditTensor``).
        buffer: scratch space at least as large as the largest edited tensor, reused for all of them.
        append: ``(name, like)`` to add a tensor ``name`` after the data, holding a copy of the source
            tensor ``like`` (same dtype, shape and bytes); ``None`` to add nothing.
        advance: called with the number of source bytes processed, for a progress bar.
        verify: read every written byte back and compare it with what was meant (``ShardWrite.mismatches``).

    Returns:
        A ``ShardWrite``.
    """
    header = shard.header if append is None else header_with(shard, *append)
    shift = len(header) - len(shard.header)
    with open(shard.path, "rb", buffering=0) as source, open(destination, "w+b", buffering=0) as target:
        write_at(target, memoryview(header), 0)
        copier = _Copier(shard.path, destination, verify)
        try:
            edited, data_end, mismatches = _write_tensors(shard, (source, target), shift, copier, edits, edit,
                                                          buffer, advance)  # fmt: skip
            added = 0
            if append is not None:  # the appended tensor is copied again from the source
                like = append[1]
                added = like.end - like.start
                copier.copy(append[0], like.start, data_end + shift, added)
            mismatches += copier.finish()
        finally:
            copier.close()
    if verify:
        mismatches += _header_mismatches(shard, destination, header, append)
    read = shard.path.stat().st_size + added
    return ShardWrite(len(shard.entries) + (append is not None), edited, read, destination.stat().st_size,
                      mismatches)  # fmt: skip


def _write_tensors(
    shard: Shard,
    files: tuple[BinaryIO, BinaryIO],
    shift: int,
    copier: _Copier,
    edits: Collection[str],
    edit: EditTensor,
    buffer: bytearray,
    advance: Callable[[int], object],
) -> tuple[int, int, list[str]]:
    """Every tensor of ``shard``: runs of unedited ones handed to ``copier``, edited ones read, edited and
    written here (and read back with ``copier.verify``); ``(edited, end of the data, mismatches)``."""
    (source, target), edited, mismatches = files, 0, []
    run_start = data_end = len(shard.header)
    for entry in shard.entries:
        data_end = entry.end
        if entry.name not in edits or entry.end == entry.start:
            continue
        copier.copy(f"before {entry.name}", run_start, run_start + shift, entry.start - run_start)
        view = _edit_into(source, entry, buffer, edit)
        write_at(target, view, entry.start + shift)
        if copier.verify and not file_holds(target.fileno(), entry.start + shift, _bytes(buffer, len(view))):
            mismatches.append(f"{entry.name}: the bytes read back differ from the fold written")
        edited += 1
        advance(entry.end - run_start)
        run_start = entry.end
    copier.copy(f"after the last edited tensor of {shard.path.name}", run_start, run_start + shift,
                data_end - run_start)  # fmt: skip
    advance(data_end - run_start + len(shard.header))
    return edited, data_end, mismatches


def _edit_into(source: BinaryIO, entry: TensorEntry, buffer: bytearray, edit: EditTensor) -> memoryview:
    """``edit`` the stored tensor into the start of ``buffer``, reading it in place through a memory map
    (one pass over its bytes, no copy first); a tensor whose offset does not suit its dtype is read into
    the buffer and edited there. Returns the buffer's bytes to write."""
    with mapped_tensor(source.fileno(), entry) as stored:
        if stored is None:
            view, tensor = read_tensor(source, entry, buffer)
            edit(entry, tensor, tensor)
            return view
        view, out = buffer_tensor(entry, buffer)
        edit(entry, stored, out)
    return view


def _bytes(buffer: bytearray, length: int) -> torch.Tensor:
    return (
        torch.frombuffer(buffer, dtype=torch.uint8, count=length)
        if length
        else torch.zeros(0, dtype=torch.uint8)
    )


def _header_mismatches(
    shard: Shard, destination: Path, header: bytes, append: tuple[str, TensorEntry] | None
) -> list[str]:
    """The written header parsed again: every tensor where it was meant to be written, with its dtype and
    shape (so the read-back compares above were made where a loader will read)."""
    shift = len(header) - len(shard.header)
    meant = [(e.name, e.dtype, e.shape, e.start + shift, e.end + shift) for e in shard.entries]
    if append is not None:
        like, end = append[1], (shard.entries[-1].end if shard.entries else len(shard.header)) + shift
        meant.append((append[0], like.dtype, like.shape, end, end + like.end - like.start))
    reread = read_header(destination)
    written = [(e.name, e.dtype, e.shape, e.start, e.end) for e in reread.entries]
    if written == meant and reread.header == header:
        return []
    return [f"{destination.name}: its header does not place the tensors where they were written"]
