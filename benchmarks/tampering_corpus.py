"""Run every case of the tampering corpus (``tests/corpus.py``) and print the verdict table for BENCHMARKS.md.

The cases are registered by the test modules that define them (``tests/test_tampering.py`` and, where they
exist, ``tests/test_tampering_files.py`` and ``tests/test_tampering_lora.py``); each runs on a fresh copy of
the clean float32 and bfloat16 triple of its kind (a checkpoint, or a LoRA adapter), through ``abliterate
verify`` as a user calls it. A row's verdict is "rejected" when ``verify`` exits with the status the case
expects and its one-line reason names what the case expects.

Usage::

    python benchmarks/tampering_corpus.py            # markdown table on stdout
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
CASE_MODULES = ("test_tampering", "test_tampering_files", "test_tampering_lora")


def main() -> int:
    """Print the table; exit 1 when any case is not rejected as expected (or the clean edit fails)."""
    import torch

    sys.path.insert(0, str(TESTS))
    import corpus

    for module in CASE_MODULES:
        if (TESTS / f"{module}.py").is_file():
            importlib.import_module(module)
    torch.set_num_threads(1)  # tiny models gain nothing from more threads
    started = time.perf_counter()
    failures = 0
    rows = ["| case | dtype | verify | exit | verdict | reason |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        # One clean triple per case kind (a checkpoint, a LoRA adapter, ...) and dtype.
        kinds = sorted({case.kind for case in corpus.CASES} | {"checkpoint"}, key=lambda k: k != "checkpoint")
        clean = {}
        for kind in kinds:
            for dtype in corpus.DTYPES:
                triple = corpus.BUILDERS[kind](root / f"clean-{kind.replace(' ', '-')}-{dtype}", dtype)
                clean[kind, dtype] = triple
                for forward in (False, True):
                    status, line = corpus.verify(triple, forward=forward)
                    verdict = "passed (negative control)" if status == 0 else "**FAILED**"
                    failures += status != 0
                    name = "clean edit" if kind == "checkpoint" else f"clean {kind}"
                    rows.append(f"| {name} | {dtype} | {_how(forward)} | {status} | {verdict} | {line} |")
        for number, (case, dtype) in enumerate(corpus.cases_in(corpus.CASES)):
            status, line = corpus.run_case(case, clean[case.kind, dtype], root / f"case-{number}")
            rejected = status == case.exit_code and case.expect.lower() in line.lower()
            failures += not rejected
            verdict = "rejected" if rejected else "**NOT REJECTED AS EXPECTED**"
            reason = line.removeprefix("error: ").replace("|", "\\|").splitlines()[0] if line else ""
            rows.append(f"| {case.name} | {dtype} | {_how(case.forward)} | {status} | {verdict} | {reason} |")
    print("\n".join(rows))
    print(f"\n{len(corpus.CASES)} cases, {time.perf_counter() - started:.0f} s, {failures} not as expected")
    return 1 if failures else 0


def _how(forward: bool) -> str:
    return "full" if forward else "--no-forward"


if __name__ == "__main__":
    sys.exit(main())
