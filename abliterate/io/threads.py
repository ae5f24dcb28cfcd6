"""How many threads torch operations use, for code that runs small operations in a tight loop."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run torch operations on one intra-op thread: a tile is too small to split, and on a busy 2-core
    machine the per-operation barrier of a second thread made the loop up to 80x slower (measured)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
