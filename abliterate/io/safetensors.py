"""Low-level safetensors I/O for streaming apply and the certificate: headers, byte copies and tensor reads.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor names to dtype,
shape and data offsets, then the raw tensor bytes. ``read_header`` parses and validates that layout
without reading any tensor data; ``copy_range`` copies bytes in the kernel (``copy_file_range``, with a
user-space fallback) and ``read_tensor`` reads one tensor into a reused buffer; ``abliterate.io.shard_writer``
writes an output shard from them. Nothing here knows about models, adapters or directions;
``abliterate.io.chunked`` compares stored tensors through memory maps.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

# The dtypes that can be read into tensors (and so edited); every other dtype is only ever copied.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")
_MAX_HEADER_BYTES = 100 << 20
_COPY_BLOCK = 64 << 20
_WRITE_PIECE = 1 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)

# Called with the stored tensor (read-only, in its dtype and shape; over a memory map of the source, or the
# buffer itself) and a tensor of the same dtype and shape in the shared buffer, to fill with the edited
# values before their bytes are written.
EditTensor = Callable[["TensorEntry", torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its header describes it.

    Attributes:
        name: the tensor's name in the header.
        dtype: the safetensors dtype string, e.g. ``"BF16"``.
        shape: the tensor's shape.
        start: absolute file offset of the tensor's first byte.
        end: absolute file offset just past its last byte.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Shard:
    """A safetensors file's parsed header.

    Attributes:
        path: the file.
        header: the 8-byte length and the JSON header, verbatim.
        entries: the tensors, in data order.
    """

    path: Path
    header: bytes
    entries: tuple[TensorEntry, ...]


def reuse_freed_memory() -> None:
    """Let glibc keep the slices' freed float64 temporaries for reuse instead of returning them at once.

    Each slice allocates a few 4 MiB temporaries; by default glibc takes them from the kernel as fresh
    pages and hands them back when freed, so every slice faults its memory in again (measured 3x slower
    in a fresh process). Raising the mmap and trim thresholds (8 and 32 MiB) keeps them in the heap; this
    stays in effect for the process. Other C libraries are left alone.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    mallopt = ctypes.CDLL(None).mallopt
    mallopt(_M_MMAP_THRESHOLD, 8 << 20)
    mallopt(_M_TRIM_THRESHOLD, 32 << 20)


def read_header(path: Path) -> Shard:
    """Parse and validate a safetensors file's header without reading its tensor data.

    Args:
        path: the safetensors file.

    Returns:
        A ``Shard`` whose entries are sorted by offset.

    Raises:
        ValueError: the file is not safetensors, its header is corrupt, or its tensors do not tile the
            data section exactly (a gap, an overlap or a truncated file).
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"{path} is not a safetensors file (bad header length)")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise ValueError(f"{path} has a corrupt safetensors header: {error}") from error
    data_start = 8 + length
    try:
        entries = sorted(
            (
                TensorEntry(
                    name,
                    info["dtype"],
                    tuple(info["shape"]),
                    *(data_start + int(o) for o in info["data_offsets"]),
                )
                for name, info in header.items()
                if name != "__metadata__"
            ),
            key=lambda entry: (entry.start, entry.end),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} has a corrupt safetensors header: {error!r}") from error
    position = data_start
    for entry in entries:
        if entry.start != position or entry.end < entry.start:
            raise ValueError(f"{path} is corrupt: tensor {entry.name} does not follow the previous one")
        position = entry.end
    if position != size:
        raise ValueError(f"{path} is truncated or corrupt: data ends at {position}, file has {size} bytes")
    return Shard(path, prefix + raw, tuple(entries))


def header_with(shard: Shard, name: str, like: TensorEntry) -> bytes:
    """The shard's header plus one tensor appended after its data, padded to 8 bytes like safetensors does.

    Args:
        shard: the shard whose header to extend.
        name: the new tensor's name.
        like: the tensor whose dtype, shape and byte count the new one takes.

    Returns:
        The new 8-byte length and JSON header.
    """
    header = json.loads(shard.header[8:])
    data_length = (shard.entries[-1].end if shard.entries else len(shard.header)) - len(shard.header)
    offsets = [data_length, data_length + like.end - like.start]
    header[name] = {"dtype": like.dtype, "shape": list(like.shape), "data_offsets": offsets}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_tensor(source: BinaryIO, entry: TensorEntry, buffer: bytearray) -> tuple[memoryview, torch.Tensor]:
    """Read one tensor's bytes into the start of ``buffer``.

    Args:
        source: the shard, opened for binary reading.
        entry: the tensor to read; its dtype must be in ``DTYPES``.
        buffer: scratch space at least ``entry.end - entry.start`` bytes long.

    Returns:
        The bytes read, and a tensor of the entry's dtype and shape sharing them (so an in-place change
        of the tensor changes the bytes).
    """
    view, tensor = buffer_tensor(entry, buffer)
    source.seek(entry.start)
    filled = 0
    while filled < len(view):
        count = source.readinto(view[filled:])
        if not count:
            raise ValueError(f"{entry.name}: unexpected end of file while reading it")
        filled += count
    return view, tensor


def buffer_tensor(entry: TensorEntry, buffer: bytearray) -> tuple[memoryview, torch.Tensor]:
    """The start of ``buffer`` as ``entry``'s bytes and as a tensor of its dtype and shape sharing them."""
    view = memoryview(buffer)[: entry.end - entry.start]
    numel = len(view) // DTYPES[entry.dtype].itemsize
    tensor = torch.frombuffer(buffer, dtype=DTYPES[entry.dtype], count=numel).reshape(entry.shape)
    return view, tensor


def copy_range(source: BinaryIO, target: BinaryIO, offset: int, at: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of ``source`` to offset ``at`` of ``target``, in the kernel."""
    kernel_copy = getattr(os, "copy_file_range", None)  # Linux only
    while length > 0:
        count = 0
        if kernel_copy is not None:
            try:
                count = kernel_copy(source.fileno(), target.fileno(), min(length, 1 << 30), offset, at)
            except OSError as error:
                if error.errno not in (
                    errno.EXDEV,
                    errno.ENOSYS,
                    errno.EINVAL,
                    errno.EOPNOTSUPP,
                    errno.EPERM,
                ):
                    raise
                kernel_copy = None
        if count == 0:  # no kernel copy here: read and write instead
            source.seek(offset)
            chunk = source.read(min(length, _COPY_BLOCK))
            if not chunk:
                raise ValueError(f"{source.name}: unexpected end of file at byte {offset}")
            write_at(target, memoryview(chunk), at)
            count = len(chunk)
        offset, at, length = offset + count, at + count, length - count


def write_at(target: BinaryIO, data: memoryview, at: int) -> None:
    """Write ``data`` at offset ``at`` of ``target``, however many calls the OS needs."""
    # In 1 MiB pieces: single writes of tens of MiB were measured ~10x slower (0.15 vs 2 GB/s) here.
    target.seek(at)
    while data:
        data = data[target.write(data[:_WRITE_PIECE]) :]


def find_shards(checkpoint: Path) -> tuple[list[str], dict | None]:
    """The shard file names of a checkpoint directory, and its index (``None`` for a single file).

    Raises:
        ValueError: no safetensors weights, a missing index, a shard the index names is missing, or a
            shard name that is not a plain file name in the checkpoint directory.
    """
    if (checkpoint / INDEX_NAME).is_file():
        index = read_json(checkpoint / INDEX_NAME, INDEX_NAME)
        if not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
            raise ValueError(f"{checkpoint / INDEX_NAME} has no weight_map")
        for name in index["weight_map"].values():
            _check_shard_name(name, checkpoint)
        names = sorted(set(index["weight_map"].values()))
        missing = [name for name in names if not (checkpoint / name).is_file()]
        if missing:
            raise ValueError(f"{checkpoint} lacks shard(s) named in {INDEX_NAME}: {', '.join(missing)}")
        return names, index
    if (checkpoint / SINGLE_NAME).is_file():
        return [SINGLE_NAME], None
    found = sorted(path.name for path in checkpoint.glob("*.safetensors"))
    if any(SHARD_NAME.fullmatch(name) for name in found):
        raise ValueError(
            f"{checkpoint} has shards ({found[0]}, …) but no {INDEX_NAME} mapping tensors to them"
        )
    raise ValueError(
        f"no {SINGLE_NAME} or {INDEX_NAME} in {checkpoint}"
        + (f" (found only {', '.join(found)})" if found else "; only safetensors checkpoints can be streamed")
    )


def _check_shard_name(name: object, checkpoint: Path) -> None:
    """Refuse an index entry that is not a plain file name: ``../x``, ``/etc/passwd`` and ``sub/x`` would
    read (and ``apply`` copy) a file outside the checkpoint, and ``./x`` names a shard twice."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(
            f"{checkpoint / INDEX_NAME} names the shard {name!r}: a shard must be a file name in {checkpoint}"
        )


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; ``what`` names it in errors."""
    if not path.is_file():
        raise ValueError(f"{path.parent} has no {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if isinstance(data, dict):
        return data
    raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
