"""Whether a tensor holds only finite values, checked at memory speed without a full-size temporary."""

from __future__ import annotations

import torch

# Elements per chunk of the finiteness check: its temporaries stay at a few MiB for any tensor (16M-element
# chunks raised streaming apply's peak memory by ~40 MiB, tests/test_streaming.py peak-memory test).
_FINITE_CHUNK = 1 << 20


# Per IEEE dtype: the integer view, and the bits of +Inf. With the sign bit cleared, an element is finite
# exactly when its bits are below Inf's (NaN and Inf have an all-ones exponent).
_FINITE_BITS = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of ``tensor`` is finite, checked a chunk at a time (no full-size temporary).

    On the CPU the check runs on the bits through numpy (12 GB/s measured for bf16, against 0.4 GB/s
    for ``torch.isfinite``, which dominated streaming ``apply`` and the certificate).
    """
    flat = tensor.reshape(-1)
    if flat.device.type == "cpu" and flat.dtype in _FINITE_BITS and flat.numel():
        integer, infinity = _FINITE_BITS[flat.dtype]
        bits = flat.view(integer).numpy()
        magnitude = (1 << (8 * bits.itemsize - 1)) - 1
        return all(
            int((bits[start : start + _FINITE_CHUNK] & magnitude).max()) < infinity
            for start in range(0, bits.size, _FINITE_CHUNK)
        )
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(_FINITE_CHUNK))
