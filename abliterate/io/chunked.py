"""Stored tensors read and compared a chunk at a time, for the certificate and a GGUF source.

``ChunkedReader`` reads a tensor of a safetensors (or GGUF) file into one reused buffer, and compares
stored tensors with each other or with a tensor in memory through memory maps, so resident memory stays
near the one tensor being checked whatever the file size.
"""

from __future__ import annotations

import math
import mmap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy
import torch

from abliterate.io.safetensors import DTYPES, TensorEntry, read_tensor

COMPARE_CHUNK = 16 << 20


class ChunkedReader:
    """Reads stored tensors through memory maps, one range at a time, and compares them at memory speed.

    Comparisons map ``COMPARE_CHUNK`` bytes of each file at a time, so resident memory stays at the
    one tensor being folded (a reused buffer, as in streaming ``apply``) plus two chunks; only a
    tensor that is not bitwise equal to this machine's fold (the bounded path) is read a second time
    into memory of its own.
    """

    def __init__(self) -> None:
        self.files: dict[Path, BinaryIO] = {}
        self.buffer = bytearray(0)
        self.bytes_read = 0

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()

    def _file(self, path: Path) -> BinaryIO:
        if path not in self.files:
            self.files[path] = open(path, "rb")
        return self.files[path]

    def _shared(self, size: int) -> bytearray:
        """The shared buffer, grown to at least ``size`` bytes."""
        if len(self.buffer) < size:
            self.buffer = bytearray(size)
        return self.buffer

    def scratch(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised tensor of ``dtype`` and ``shape`` in the shared buffer (grown when needed)."""
        size = dtype.itemsize * math.prod(shape)
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._shared(size), dtype=torch.uint8, count=size).view(dtype).view(shape)

    def tensor(self, location: tuple[Path, TensorEntry], fresh: bool = False) -> torch.Tensor:
        """The tensor at ``location``, in the shared buffer (or its own memory with ``fresh``)."""
        path, entry = location
        size = entry.end - entry.start
        buffer = bytearray(size) if fresh else self._shared(size)
        _, tensor = read_tensor(self._file(path), entry, buffer)
        self.bytes_read += size
        return tensor

    @contextmanager
    def _mapped(self, path: Path, start: int, length: int) -> Iterator[torch.Tensor]:
        """``length`` bytes of ``path`` from ``start`` as a read-only uint8 tensor over a memory map."""
        with mapped(self._file(path).fileno(), start, length) as view:
            self.bytes_read += length
            yield view

    @contextmanager
    def stored(self, location: tuple[Path, TensorEntry]) -> Iterator[torch.Tensor | None]:
        """The stored tensor at ``location`` over a memory map (``mapped_tensor``), for a fold that reads
        its source in place; ``None`` when its offset does not suit its dtype."""
        path, entry = location
        with mapped_tensor(self._file(path).fileno(), entry) as tensor:
            if tensor is not None:
                self.bytes_read += entry.end - entry.start
            yield tensor

    def _ranges(self, entry: TensorEntry) -> Iterator[tuple[int, int]]:
        for offset in range(0, entry.end - entry.start, COMPARE_CHUNK):
            yield offset, min(COMPARE_CHUNK, entry.end - entry.start - offset)

    def same_bytes(self, first: tuple[Path, TensorEntry], second: tuple[Path, TensorEntry]) -> bool:
        """Whether two stored tensors of the same size hold the same bytes."""
        (left_path, left), (right_path, right) = first, second
        for offset, length in self._ranges(right):
            with self._mapped(left_path, left.start + offset, length) as a:
                with self._mapped(right_path, right.start + offset, length) as b:
                    if not equal_bytes(a, b):
                        return False
        return True

    def matches(self, expected: torch.Tensor, location: tuple[Path, TensorEntry]) -> bool:
        """Whether the stored tensor at ``location`` has exactly the bytes of ``expected``."""
        path, entry = location
        flat = expected.contiguous().view(-1).view(torch.uint8)
        if flat.numel() != entry.end - entry.start:
            return False
        for offset, length in self._ranges(entry):
            with self._mapped(path, entry.start + offset, length) as stored:
                if not equal_bytes(flat[offset : offset + length], stored):
                    return False
        return True


@contextmanager
def mapped(fileno: int, start: int, length: int) -> Iterator[torch.Tensor]:
    """``length`` bytes of the open file ``fileno`` from ``start`` as a read-only uint8 tensor over a memory
    map, unmapped on exit (so resident memory stays at the pages of one range)."""
    if length == 0:
        yield torch.zeros(0, dtype=torch.uint8)
        return
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(fileno, length + start - aligned, offset=aligned, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_SEQUENTIAL"):
        # Every range is read front to back once: a larger readahead when the pages are on the disk
        # (the certificate of an uncached 2 GB checkpoint: 3.79 → 3.23 s, median of 6 alternating runs).
        mapping.madvise(mmap.MADV_SEQUENTIAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the view is only ever read
            view = torch.frombuffer(mapping, dtype=torch.uint8, offset=start - aligned, count=length)
        yield view
        del view
    finally:
        try:
            mapping.close()
        except BufferError:  # a view is still referenced (an exception in flight): the GC closes it
            pass


@contextmanager
def mapped_tensor(fileno: int, entry: TensorEntry) -> Iterator[torch.Tensor | None]:
    """The stored tensor ``entry`` of the open file ``fileno`` as a read-only tensor of its dtype and shape
    over a memory map of its bytes (unmapped on exit); ``None`` when its offset is not a multiple of its
    element size (a view of that dtype needs one)."""
    dtype = DTYPES[entry.dtype]
    if entry.start % dtype.itemsize:
        yield None
        return
    with mapped(fileno, entry.start, entry.end - entry.start) as view:
        yield view.view(dtype).view(entry.shape)


def same_file_bytes(first: tuple[int, int], second: tuple[int, int], length: int) -> bool:
    """Whether ``length`` bytes at ``(fileno, offset)`` ``first`` equal those at ``second``, compared a
    ``COMPARE_CHUNK`` at a time through memory maps."""
    for done in range(0, length, COMPARE_CHUNK):
        size = min(COMPARE_CHUNK, length - done)
        with mapped(first[0], first[1] + done, size) as a, mapped(second[0], second[1] + done, size) as b:
            if not equal_bytes(a, b):
                return False
    return True


def file_holds(fileno: int, offset: int, data: torch.Tensor) -> bool:
    """Whether the open file ``fileno`` holds the uint8 tensor ``data`` at ``offset`` (read-back compare)."""
    for done in range(0, data.numel(), COMPARE_CHUNK):
        size = min(COMPARE_CHUNK, data.numel() - done)
        with mapped(fileno, offset + done, size) as stored:
            if not equal_bytes(data[done : done + size], stored):
                return False
    return True


def equal_bytes(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Bytewise equality of two uint8 CPU tensors, eight bytes at a time where aligned, through numpy
    (6 GB/s measured, against 3.4 GB/s for an int64 ``torch.equal`` and 0.3 GB/s for ``memoryview ==``;
    numpy releases the GIL, so a comparison overlaps a fold running in another thread)."""
    if first.numel() != second.numel():
        return False
    left, right = first.numpy(), second.numpy()
    if first.numel() % 8 == 0 and first.data_ptr() % 8 == 0 and second.data_ptr() % 8 == 0:
        left, right = left.view(numpy.int64), right.view(numpy.int64)
    return bool(numpy.array_equal(left, right))
