"""Read and write ``direction.safetensors``: the unit refusal direction and where it came from."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from abliterate.edit.kernel import check_basis

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


def unit_direction(vector: torch.Tensor, what: str = "the direction") -> torch.Tensor:
    """Validate a refusal direction and return it as a unit float32 vector.

    Args:
        vector: the candidate direction, ``[d_model]``, any floating dtype and device.
        what: how error messages name it, e.g. ``"the direction in FILE"``.

    A subspace ``[k, d_model]`` (``1 ≤ k ≤ MAX_RANK``) is accepted too: its rows must be orthogonal
    (each is normalized; ``abliterate.edit.kernel.check_basis`` states the tolerance).

    Returns:
        ``vector / |vector|`` (normalized in float64), float32, on the CPU; for a subspace, each row so.
    """
    if vector.dim() not in (1, 2):
        raise ValueError(
            f"{what} must be [d_model] (or a subspace [k, d_model]), got shape {list(vector.shape)}"
        )
    if not vector.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {vector.dtype}")
    wide = vector.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(wide).all()):
        raise ValueError(f"{what} contains NaN or infinite values")
    norm = wide.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError(f"{what} is the zero vector" if vector.dim() == 1 else f"{what} has a zero row")
    unit = (wide / norm).to(torch.float32)
    if unit.dim() == 2:
        try:
            check_basis(unit)
        except ValueError as error:
            raise ValueError(f"{what}: {error}") from None
    return unit
