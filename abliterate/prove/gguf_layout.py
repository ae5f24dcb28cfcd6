"""Where every key/value pair and tensor of a GGUF file lies, read in one pass over its header.

gguf-py's ``GGUFReader`` builds a numpy view for every element of every array (a 151k-token vocabulary
and its merges: 60 s on the demo on a busy machine); copying and comparing the pairs byte for byte only
needs where each one starts and ends, which one walk over the lengths gives in well under a second. The
certificate checks this view of the original against gguf-py's (``check_against``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value types: struct format of the scalars; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class FieldSpan:
    """One key/value pair: where it starts, how many bytes, and its value (``None`` for an array)."""

    offset: int
    size: int
    value: Any


@dataclass(frozen=True)
class TensorSpan:
    """One tensor: its name, logical (numpy) shape, type, absolute data offset and stored size."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    data_offset: int
    n_bytes: int


class GGUFLayout:
    """The layout of a GGUF file, memory-mapped.

    Attributes:
        path: the file.
        version: the header's GGUF version.
        fields: key → its span, in file order.
        tensors: name → its span, in file order.
        alignment: ``general.alignment`` (32 when absent).
        data: the whole file as ``uint8``.
        trailing: bytes after the end of the last tensor.
    """

    def __init__(self, path: Path) -> None:
        """Read the header, every key/value pair and every tensor info.

        Raises:
            ValueError: not a GGUF file, a version other than 2 or 3, a truncated or inconsistent header.
        """
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self._position = 0
        try:
            magic, self.version, n_tensors, n_fields = struct.unpack_from("<4sIQQ", self.data, 0)
            if magic != b"GGUF" or self.version not in (2, 3):
                raise ValueError(f"not a little-endian GGUF file of version 2 or 3 (magic {magic!r})")
            self._position = 24
            self.fields: dict[str, FieldSpan] = {}
            for _ in range(n_fields):
                start, key = self._position, self._string()
                (kind,) = self._unpack("<I")
                value = self._value(kind)
                self.fields[key] = FieldSpan(start, self._position - start, value)
            infos = []
            for _ in range(n_tensors):
                name = self._string()
                (n_dims,) = self._unpack("<I")
                dims = self._unpack(f"<{n_dims}Q")
                kind, offset = self._unpack("<IQ")
                infos.append(
                    (name, tuple(int(d) for d in reversed(dims)), GGMLQuantizationType(kind), offset)
                )
        except (struct.error, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"cannot read {path} as a GGUF file: {error}") from error
        alignment = self.fields.get("general.alignment")
        self.alignment = int(alignment.value) if alignment is not None else 32
        start = self._position + (-self._position % self.alignment)
        self.tensors: dict[str, TensorSpan] = {}
        for name, shape, kind, offset in infos:
            block, type_size = GGML_QUANT_SIZES[kind]
            n_bytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
            if start + offset + n_bytes > self.data.size:
                raise ValueError(f"cannot read {path} as a GGUF file: {name} lies past its end (truncated?)")
            self.tensors[name] = TensorSpan(name, shape, kind, start + offset, n_bytes)
        end = max((t.data_offset + t.n_bytes for t in self.tensors.values()), default=start)
        self.trailing = int(self.data.size) - end  # bytes after the last tensor (its padding, or more)

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self.data, self._position)
        self._position += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        end = self._position + length
        if end > self.data.size:
            raise ValueError("a string runs past the end of the file")
        text = bytes(self.data[self._position : end]).decode("utf-8")
        self._position = end
        return text

    def _value(self, kind: int) -> Any:
        """Read one value of type ``kind``; an array is skipped (its elements' lengths walked)."""
        if kind in _SCALARS:
            return self._unpack("<" + _SCALARS[kind])[0]
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        element, count = self._unpack("<IQ")
        if element in _SCALARS:
            self._position += count * struct.calcsize(_SCALARS[element])
        elif element == _STRING:
            data, position = self.data, self._position
            for _ in range(count):  # one length per string: a walk, no string is decoded
                position += 8 + struct.unpack_from("<Q", data, position)[0]
            self._position = position
        else:
            for _ in range(count):
                self._value(element)
        if self._position > self.data.size:
            raise ValueError("an array runs past the end of the file")
        return None

    def field_bytes(self, key: str) -> np.ndarray:
        """The stored bytes of one key/value pair (key, type and value)."""
        span = self.fields[key]
        return self.data[span.offset : span.offset + span.size]

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The stored bytes of one tensor."""
        span = self.tensors[name]
        return self.data[span.data_offset : span.data_offset + span.n_bytes]

    def tensor_data(self, name: str) -> np.ndarray:
        """One tensor's bytes shaped as ``gguf.quants.dequantize`` takes them: rows of stored bytes."""
        from gguf import GGML_QUANT_SIZES

        span = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[span.tensor_type]
        return self.tensor_bytes(name).reshape(*span.shape[:-1], span.shape[-1] // block * type_size)

    def check_against(self, reader: Any) -> str:
        """Where this layout disagrees with gguf-py's ``GGUFReader`` of the same file ('' when nowhere)."""
        theirs = {
            key: (field.offset, sum(int(p.nbytes) for p in field.parts))
            for key, field in reader.fields.items()
        }
        for key, span in self.fields.items():
            if theirs.get(key) != (span.offset, span.size):
                return f"metadata {key}: read at {span.offset}+{span.size}, gguf-py says {theirs.get(key)}"
        ours = {(t.name, t.tensor_type, t.data_offset, t.n_bytes) for t in self.tensors.values()}
        gguf_py = {(t.name, t.tensor_type, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
        if ours != gguf_py or len(self.fields) != len(theirs) - 3:  # gguf-py adds three GGUF.* header fields
            return "the tensors or keys differ from what gguf-py reads"
        return ""
