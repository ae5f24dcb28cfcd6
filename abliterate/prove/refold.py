"""The certificate's refold of one edited tensor: on the host, compared with the stored bytes through memory
maps, or on a device (the GPU a run folded on), both tensors streamed there one at a time and compared
bitwise with that device's fold. Either way a tensor that is not bitwise equal is returned for the bound."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from abliterate.edit.kernel import all_finite, fold_into, orthogonalize_
from abliterate.io.chunked import ChunkedReader, equal_bytes
from abliterate.io.safetensors import DTYPES, TensorEntry
from abliterate.prove.bounds import TensorFold


def certificate_device(device: str | torch.device | None) -> torch.device | None:
    """The device the certificate folds on for a run or ``verify`` on ``device``: a CUDA device itself (the
    fold there is bitwise the run's), ``None`` (the host path) for the CPU, MPS (no float64 for the bound)
    and ``auto`` without CUDA."""
    if device is None:
        return None
    if str(device) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    parsed = torch.device(device)
    return parsed if parsed.type == "cuda" else None


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, one tensor at a time (looked up when called, so tests can watch it)."""
    return tensor.to(device)


def host_fold(
    original: tuple[Path, TensorEntry],
    edited: tuple[Path, TensorEntry],
    fold: TensorFold,
    reader: ChunkedReader,
    expected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Fold ``expected`` in place on the host and compare its bytes with the stored tensor's through memory
    maps: ``(_, None, overflow)`` when bitwise equal, else ``(original, stored)`` read again for the bound."""
    fold_dtype = expected.dtype
    orthogonalize_(expected, fold.direction, fold.layout, fold.scales, fold.norm_preserving)
    folded = expected.to(DTYPES[edited[1].dtype])
    if reader.matches(folded, edited):
        return folded, None, "" if all_finite(folded) else "overflow"
    del expected, folded
    return reader.tensor(original, fresh=True).to(fold_dtype), reader.tensor(edited, fresh=True), ""


@dataclass
class MappedFold:
    """What ``mapped_host_fold`` saw: whether every tile of the host's fold equals the stored bytes, and
    whether every tile is finite. ``None`` when the tensors could not be mapped (the caller reads them)."""

    equal: bool = True
    finite: bool = True


def mapped_host_fold(
    original: tuple[Path, TensorEntry],
    edited: tuple[Path, TensorEntry],
    fold: TensorFold,
    reader: ChunkedReader,
) -> MappedFold | None:
    """Fold the original on the host reading it in place through a memory map, and compare each finished
    tile with the stored tensor's bytes while it is in the cache (``abliterate.edit.kernel.fold_into``):
    one read of each checkpoint's bytes, no copy of the original, no second pass for the comparison or
    the finiteness check. For tensors of one dtype in both checkpoints; ``None`` when either cannot be
    mapped as that dtype."""
    dtype = DTYPES[original[1].dtype]
    if (
        DTYPES[edited[1].dtype] != dtype
        or edited[1].end - edited[1].start != original[1].end - original[1].start
    ):
        return None
    seen = MappedFold()
    with reader.stored(original) as source, reader.stored(edited) as stored_tensor:
        if source is None or stored_tensor is None:
            return None
        stored = stored_tensor.reshape(-1).view(torch.uint8)
        out = reader.scratch(dtype, original[1].shape)
        itemsize = dtype.itemsize

        def visit(offset: int, tile: torch.Tensor) -> None:
            flat = tile.reshape(-1)
            start = offset * itemsize
            if not equal_bytes(flat.view(torch.uint8), stored[start : start + flat.numel() * itemsize]):
                seen.equal = False
            if not all_finite(flat):
                seen.finite = False

        # One core is left to the certificate's background comparisons: on the 2-core development VM two
        # fold threads beside them cost 1.75x the CPU time and ran 1.7x slower.
        workers = max(1, torch.get_num_threads() - 1)
        fold_into(source, out, fold.direction, fold.layout, fold.scales, fold.norm_preserving, visit, workers)
    return seen


def device_fold(
    edited: tuple[Path, TensorEntry],
    fold: TensorFold,
    reader: ChunkedReader,
    expected: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Move the original (``expected``) and the stored tensor to ``device``, fold there and compare bits:
    ``(_, None, overflow)`` when bitwise equal to that device's fold, else both tensors, on the device."""
    source = to_device(expected, device)
    folded = source.clone()
    orthogonalize_(folded, fold.direction, fold.layout, fold.scales, fold.norm_preserving)
    folded = folded.to(DTYPES[edited[1].dtype])
    target = to_device(reader.tensor(edited, fresh=True), device)
    if torch.equal(folded.reshape(-1).view(torch.uint8), target.reshape(-1).view(torch.uint8)):
        return source, None, "" if all_finite(folded) else "overflow"
    return source, target, ""
