"""What a GGUF output declares and which tensor type each edited writer is stored in.

The writer (``abliterate.ship.gguf_writer``) and the GGUF certificate (``abliterate.prove.gguf_certificate``)
both follow these rules, which are part of the declaration, not of the computation: the certificate
recomputes every edited tensor itself and only takes from here what the output must say and in which
type it must store it.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

    from abliterate.edit.declared import DeclaredEdit

# Every metadata key abliterate adds starts with this; every other key is the source's, byte for byte.
PREFIX = "abliterate."
FORMAT_VERSION = 1
# ``--gguf-type``: the tensor type of the edited writers (gguf-py writes no K-quants).
GGUF_TYPES = ("q8_0", "f16", "bf16", "source")
# The tensor an untied output adds: llama.cpp's output head, the original token embedding.
OUTPUT_TENSOR = "output.weight"
EMBEDDING_TENSOR = "token_embd.weight"


def writable(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf-py can quantize into ``qtype`` (it quantizes no K-quants and no i-quants)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import quantize

    block = GGML_QUANT_SIZES[qtype][0]
    try:
        quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def writer_type(
    choice: str, source_type: GGMLQuantizationType, shape: tuple[int, ...]
) -> GGMLQuantizationType:
    """The type an edited writer is stored in: F32 for a bias (one axis; llama.cpp adds biases in F32),
    else ``choice`` (``source``: the source tensor's own type).

    Args:
        choice: one of ``GGUF_TYPES``.
        source_type: the source tensor's type.
        shape: its logical (numpy) shape.

    Raises:
        ValueError: an unknown choice, a source type gguf-py cannot write, or rows the type's blocks
            do not divide.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if choice not in GGUF_TYPES:
        raise ValueError(f"--gguf-type {choice!r}: choose one of {', '.join(GGUF_TYPES)}")
    if len(shape) == 1:
        return GGMLQuantizationType.F32
    if choice == "source":
        if not writable(source_type):
            raise ValueError(
                f"--gguf-type source: the source stores writers as {source_type.name}, which gguf-py cannot "
                "write; choose --gguf-type q8_0, f16 or bf16"
            )
        qtype = source_type
    else:
        qtype = GGMLQuantizationType[choice.upper()]
    block = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} values cannot be stored as {qtype.name} (blocks of {block})")
    return qtype


def stored_bytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of logical ``shape`` takes in ``qtype``."""
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block * type_size


def direction_sha256(declared: DeclaredEdit) -> str:
    """SHA-256 of the declared direction as float32 bytes (a subspace: its rows in order)."""
    vector = declared.direction.detach().cpu().float().contiguous().numpy()
    return hashlib.sha256(vector.tobytes()).hexdigest()


def edit_json(declared: DeclaredEdit) -> str:
    """The declared strengths as one canonical JSON line."""
    edit = {
        "default": declared.default_strength,
        "strengths": dict(sorted(declared.strengths.items())),
        "layers": {group: list(values) for group, values in sorted(declared.layer_strengths.items())},
        "weights": list(declared.weights),
        "norm_preserving": declared.norm_preserving,
    }
    return json.dumps(edit, sort_keys=True, separators=(",", ":"))


def declared_metadata(
    declared: DeclaredEdit, base_model: str, gguf_type: str, output_tensor: str
) -> dict[str, str | int]:
    """The ``abliterate.*`` keys of a GGUF output: what it is and which edit it carries.

    Args:
        declared: the edit.
        base_model: the source as the user named it (informational; the certificate does not compare it).
        gguf_type: ``--gguf-type``.
        output_tensor: ``OUTPUT_TENSOR`` when the output adds it (a tied source), else ``""``.
    """
    return {
        f"{PREFIX}format_version": FORMAT_VERSION,
        f"{PREFIX}base_model": base_model,
        f"{PREFIX}direction_sha256": direction_sha256(declared),
        f"{PREFIX}edit": edit_json(declared),
        f"{PREFIX}writer_type": gguf_type,
        f"{PREFIX}output_tensor": output_tensor,
    }


def field_bytes(reader: Any, key: str) -> np.ndarray:
    """The stored bytes of one key/value pair of ``reader``'s file (key, type and value), as ``uint8``."""
    field = reader.fields[key]
    size = sum(int(part.nbytes) for part in field.parts)
    return reader.data[field.offset : field.offset + size]


def tensor_bytes(reader: Any, tensor: Any) -> np.ndarray:
    """The stored bytes of one ``ReaderTensor``, a ``uint8`` view of the memory-mapped file."""
    return reader.data[tensor.data_offset : tensor.data_offset + tensor.n_bytes]


def same_bytes(first: np.ndarray, second: np.ndarray, chunk: int = 1 << 26) -> bool:
    """Whether two ``uint8`` arrays hold the same bytes, a chunk at a time (no full-size temporary)."""
    first, second = first.reshape(-1).view(np.uint8), second.reshape(-1).view(np.uint8)
    if first.size != second.size:
        return False
    return all(
        np.array_equal(first[i : i + chunk], second[i : i + chunk]) for i in range(0, first.size, chunk)
    )


def logical_shape(tensor: Any) -> tuple[int, ...]:
    """The logical (numpy) shape of a ``ReaderTensor``: GGUF's dimensions reversed."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))
