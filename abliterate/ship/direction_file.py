"""``direction.safetensors``: the unit refusal direction (or an orthonormal subspace), where it came from,
and the edit it declares.

A searched point's strengths are stored in the file's metadata (``point_metadata``) and read back as the
declared edit (``declared_from_file``) that ``apply``, ``verify``, LoRA output and the certificate check;
an old file without them declares strength 1 on every writer.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.direction import unit_direction
from abliterate.find.point import EditPoint, declared_edit

TENSOR_NAME = "direction"


def save_direction(
    path: str | Path,
    vector: torch.Tensor,
    layer: int,
    position: int,
    source: str,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write a direction file: tensor ``direction`` (unit, float32, ``[d_model]``) plus metadata.

    Args:
        path: the file to write, conventionally ``<output>/direction.safetensors``.
        vector: the direction, ``[d_model]``; normalized here (in float64) before saving.
        layer: the decoder layer the candidate was taken from.
        position: the end-of-instruction position it was taken at (negative, from the end).
        source: the model it was extracted from (hub id or path).
        extra: further string metadata to store, e.g. scores; may not override the keys above.

    Returns:
        The path written.
    """
    unit = unit_direction(vector, f"the direction to save to {path}")
    metadata = {"layer": str(int(layer)), "position": str(int(position)), "source": str(source)}
    for key, value in (extra or {}).items():
        if key in metadata:
            raise ValueError(f"extra metadata key {key!r} would override the standard field of that name")
        metadata[str(key)] = str(value)
    path = Path(path)
    save_file({TENSOR_NAME: unit.contiguous()}, str(path), metadata=metadata)
    return path


def load_direction(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a direction file written by ``save_direction`` (or any file with a ``direction`` tensor).

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``(direction, metadata)``: the unit vector as float32 ``[d_model]`` and the file's string metadata
        (``layer``, ``position``, ``source`` when written by this package).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"direction file {path} does not exist (expected a direction.safetensors file)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = list(handle.keys())
            if TENSOR_NAME not in stored:
                names = ", ".join(sorted(stored)) or "none"
                raise ValueError(f"{path} has no tensor named {TENSOR_NAME!r} (it holds: {names})")
            vector = handle.get_tensor(TENSOR_NAME)
            metadata = dict(handle.metadata() or {})
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    return unit_direction(vector, f"the direction in {path}"), metadata


# Metadata key of ``direction.safetensors`` that holds a searched point (absent: strength 1 everywhere).
POINT_KEY = "edit_point"
STRENGTHS_KEY = "strengths"


def point_metadata(point: EditPoint, n_layers: int) -> dict[str, str]:
    """``direction.safetensors`` metadata for ``point``: the point itself and the edit it declares.

    ``strengths`` holds what ``apply`` and the certificate need (the embedding's strength and one
    strength per block for every writer group, ``declared_edit``), so a reader needs no knowledge of the
    profile's form; ``declared_from_file`` reads it back.
    """
    declared = declared_edit(torch.empty(0), point, n_layers)  # the strengths; the tensor holds the direction
    strengths = {"embedding": declared.strengths["embedding"], "layers": declared.layer_strengths}
    if declared.weights:
        strengths["weights"] = list(declared.weights)
    if declared.norm_preserving:
        strengths["norm_preserving"] = True
    return {POINT_KEY: json.dumps(asdict(point)), STRENGTHS_KEY: json.dumps(strengths)}


def declared_from_file(direction: torch.Tensor, metadata: dict[str, str]) -> DeclaredEdit:
    """The edit a direction file declares: its ``direction`` with the strengths of its metadata.

    Old direction files (no ``strengths`` key) declare strength 1 on every writer; a file without
    ``"norm_preserving": true`` declares the plain fold.

    Raises:
        ValueError: the ``strengths`` entry is not what ``point_metadata`` writes.
    """
    if STRENGTHS_KEY not in metadata:
        return DeclaredEdit(direction)
    try:
        stored = json.loads(metadata[STRENGTHS_KEY])
        layers = {group: tuple(float(s) for s in values) for group, values in stored["layers"].items()}
        weights = tuple(float(w) for w in stored.get("weights", ()))
        norm_preserving = stored.get("norm_preserving", False)
        if not isinstance(norm_preserving, bool):
            raise ValueError(f"norm_preserving must be true or false, got {norm_preserving!r}")
        embedding = {"embedding": float(stored["embedding"])}
        return DeclaredEdit(direction, embedding, 1.0, layers, weights, norm_preserving)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"the direction file's {STRENGTHS_KEY!r} metadata is malformed: {error}") from error
