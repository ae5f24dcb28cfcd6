"""The errors abliterate raises on purpose, beside the built-in ones it uses for bad input.

Bad input (a path, a flag, a file a user gave) is a ``ValueError``, ``LookupError`` or ``OSError`` raised
by abliterate's own code, which the command line reports in one line with exit code 1. A failed proof is
a ``GateError``: exit code 2, and nothing was saved, written or pushed.
"""

from __future__ import annotations


class GateError(RuntimeError):
    """The output is not proven to be the declared edit (weight certificate, completeness, logit parity,
    the files beside the weights, or an adapter's parity); nothing was saved, written or pushed."""
