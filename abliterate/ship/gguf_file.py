"""The GGUF container written by hand: the source's metadata copied as raw bytes, tensors streamed one by one.

gguf-py's ``GGUFWriter`` re-encodes every metadata value from its parsed form; copying each key's bytes
from the source file instead makes "every metadata key byte for byte" true by construction. The layout
is GGUF's: header (magic, version, tensor count, key count), the key/value pairs, the tensor infos
(name, dimensions, type, offset from the data section), padding to the alignment, then the tensor data,
each tensor starting at a multiple of the alignment.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# gguf-py's value type codes of the two types abliterate adds.
_UINT32, _STRING = 4, 8


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its name, logical (numpy) shape, GGML type code and stored size, and
    the function that produces its bytes when its turn comes (never before)."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    nbytes: int
    produce: Callable[[], np.ndarray]


def _string(value: str) -> bytes:
    encoded = value.encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded


def encode_field(key: str, value: str | int) -> bytes:
    """One key/value pair in GGUF's encoding: a string, or an unsigned 32-bit integer."""
    if isinstance(value, int):
        return _string(key) + struct.pack("<II", _UINT32, value)
    return _string(key) + struct.pack("<I", _STRING) + _string(value)


def _tensor_info(tensor: OutTensor, offset: int) -> bytes:
    dims = tuple(reversed(tensor.shape))  # GGUF lists ne[0] (the row length) first
    return (
        _string(tensor.name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", tensor.qtype, offset)
    )


def _padding(position: int, alignment: int) -> bytes:
    return b"\0" * (-position % alignment)


def write_gguf_file(
    path: Path,
    version: int,
    fields: Iterable[bytes | np.ndarray],
    tensors: list[OutTensor],
    alignment: int,
    advance: Callable[[int], Any] = lambda n: None,
) -> int:
    """Write a GGUF file: ``fields`` (encoded key/value pairs) and ``tensors``, produced one at a time.

    Args:
        path: the file to create.
        version: the GGUF version of the header (the source's).
        fields: the encoded key/value pairs, in order.
        tensors: the tensors, in order; each one's ``produce()`` must give exactly ``nbytes`` bytes.
        alignment: the data alignment (the source's ``general.alignment``, 32 by default).
        advance: called with each tensor's stored size once it is written (a progress bar).

    Returns:
        The bytes written.

    Raises:
        AssertionError: a tensor produced another size than declared (a bug of the caller).
    """
    fields = list(fields)
    offsets, position = [], 0
    for tensor in tensors:
        offsets.append(position)
        position += tensor.nbytes + len(_padding(tensor.nbytes, alignment))
    with open(path, "wb") as handle:
        handle.write(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(fields)))
        for field in fields:
            handle.write(field)
        for tensor, offset in zip(tensors, offsets, strict=True):
            handle.write(_tensor_info(tensor, offset))
        handle.write(_padding(handle.tell(), alignment))
        for tensor in tensors:
            data = tensor.produce()
            written = handle.write(data)
            assert written == tensor.nbytes, f"{tensor.name}: {written} bytes, {tensor.nbytes} declared"
            handle.write(_padding(tensor.nbytes, alignment))
            advance(tensor.nbytes)
        return handle.tell()
