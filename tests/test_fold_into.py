"""``fold_into``: the fold of a read-only source written into another buffer, tile by tile, is bitwise the
in-place fold, leaves the source alone, and shows every element to the visitor exactly once."""

from __future__ import annotations

import threading

import pytest
import torch

from abliterate.edit import tiles
from abliterate.edit.kernel import fold_into, orthogonalize

_SHAPES = {
    "linear": (48, 40),
    "embedding": (70, 48),
    "conv1d": (40, 48),
    "experts": (3, 48, 20),
    "experts_t": (3, 20, 48),
}


def _case(layout: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(_SHAPES[layout], generator=generator, dtype=torch.float64).to(dtype)
    return weight, torch.randn(48, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", sorted(_SHAPES))
@pytest.mark.parametrize("threads", [1, 2])
def test_fold_into_is_the_fold_and_leaves_the_source(
    monkeypatch: pytest.MonkeyPatch, layout: str, dtype: torch.dtype, threads: int
) -> None:
    monkeypatch.setattr(tiles, "TILE_ELEMENTS", 256)  # many tiles, so the visitor and threads matter
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight, direction = _case(layout, dtype)
        before = weight.clone()
        out = torch.full_like(weight, float("nan"))
        seen = torch.zeros(weight.numel(), dtype=torch.int64)
        lock = threading.Lock()

        def visit(offset: int, tile: torch.Tensor) -> None:
            flat = tile.reshape(-1)
            with lock:
                seen[offset : offset + flat.numel()] += 1
            # The visitor sees the finished values, at the offset they have in the whole tensor.
            assert torch.equal(
                flat.view(torch.uint8), out.reshape(-1)[offset : offset + flat.numel()].view(torch.uint8)
            )

        fold_into(weight, out, direction, layout, 0.7, visit=visit)
        expected = orthogonalize(weight, direction, layout, 0.7)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(weight.view(torch.uint8), before.view(torch.uint8)), "the source was written"
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    assert bool((seen == 1).all()), "every element is visited exactly once"


def test_fold_into_a_subspace_and_norm_preserving_match_the_fold() -> None:
    weight, _ = _case("linear", torch.bfloat16)
    basis, _ = torch.linalg.qr(
        torch.randn(48, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    )
    out = torch.empty_like(weight)
    fold_into(weight, out, basis.T, "linear", [0.9, 0.4])
    assert torch.equal(out, orthogonalize(weight, basis.T, "linear", [0.9, 0.4]))
    fold_into(weight, out, basis[:, 0], "linear", 1.0, norm_preserving=True)
    assert torch.equal(out, orthogonalize(weight, basis[:, 0], "linear", 1.0, norm_preserving=True))


def test_fold_into_refuses_mismatched_or_strided_buffers() -> None:
    weight, direction = _case("linear", torch.bfloat16)
    with pytest.raises(ValueError, match="fold into"):
        fold_into(weight, torch.empty_like(weight, dtype=torch.float32), direction, "linear")
    with pytest.raises(ValueError, match="contiguous"):
        fold_into(weight.T, torch.empty_like(weight.T), direction, "linear")
