"""Ctrl-C and SIGTERM stop abliterate the same way: as an exception, so every ``finally`` runs.

SIGTERM is what ``timeout``, Slurm and ``docker stop`` send; by default it ends the process on the spot,
which would leave temporary output folders (whole uncertified checkpoints) behind. Inside
``terminate_as_interrupt`` it raises ``Interrupted`` instead, like Ctrl-C raises ``KeyboardInterrupt``.
``deferred_signals`` holds both signals over a few steps that must not be cut in half (the renames that
put a new output in place) and delivers them right after.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
NOTHING_WRITTEN = "nothing was written"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what exists on disk when it arrived.

    Attributes:
        signum: the signal that stopped the command.
        state: what the user is told exists now, e.g. ``"nothing was written"``.
    """

    def __init__(self, signum: int = signal.SIGINT, state: str = NOTHING_WRITTEN) -> None:
        super().__init__(state)
        self.signum = signum
        self.state = state


def signal_number(interrupt: BaseException) -> int:
    """The signal behind ``interrupt``: its own for ``Interrupted``, SIGINT for a plain Ctrl-C."""
    return getattr(interrupt, "signum", signal.SIGINT)


def interrupted_state(interrupt: BaseException) -> str:
    """What exists after ``interrupt``: ``Interrupted.state``; nothing was written for a plain Ctrl-C
    (every writer stages its output and removes the staging folder when interrupted)."""
    return getattr(interrupt, "state", NOTHING_WRITTEN)


def _in_main_thread() -> bool:
    # Python lets only the main thread install signal handlers.
    return threading.current_thread() is threading.main_thread()


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises ``Interrupted(SIGTERM)``; the previous handler is restored after.

    A handler already installed by the program (anything but the default) is left alone, and so is a
    block entered outside the main thread, where handlers cannot be installed.
    """
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block has finished, then deliver them to the previous handlers.

    The handlers are swapped at the Python level rather than masked: a signal that the kernel hands to
    another thread (torch keeps several) still runs its Python handler in the main thread, between two
    bytecodes of the block. Outside the main thread the block runs unprotected.
    """
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {number: signal.getsignal(number) for number in _STOP_SIGNALS}
    # A handler installed from C (``getsignal`` gives None) cannot be put back: leave that signal alone.
    held = [number for number, handler in previous.items() if handler is not None]
    for number in held:
        signal.signal(number, hold)
    try:
        yield
    finally:
        for number in held:
            signal.signal(number, previous[number])
        for number in dict.fromkeys(pending):
            # The restored handler runs now, as if the signal had just arrived: Ctrl-C raises
            # KeyboardInterrupt, SIGTERM inside ``terminate_as_interrupt`` raises Interrupted.
            signal.raise_signal(number)
