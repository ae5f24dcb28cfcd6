"""The tampering corpus: checkpoints and direction files a dishonest publisher (or a careless one) could
ship, each of which ``abliterate verify`` must reject with a one-line reason.

A case starts from a clean triple, built in-process from a tiny qwen2 model in float32 or bfloat16:
``original`` (the source checkpoint), ``edited`` (``original`` with ``direction`` folded in by the
streaming ``apply``, certified) and ``direction`` (its ``direction.safetensors``). The clean triple passes
``verify``; each case changes a fresh copy of it and must make ``verify`` fail.

How to add a case:

1. Write ``mutate(original, edited, direction)``: it changes the copy in place (the helpers below read and
   write one tensor of a checkpoint, drop or add one, and rewrite a direction file's strengths). It may
   touch ``original`` too (a source that is itself broken), never anything outside the three paths.
2. Register it, at import time of your test module::

       register(TamperCase("my case", mutate, expect="substring of the one-line reason"))

   ``expect`` is matched against the one line ``verify`` prints on failure (``error: …``), so name the
   part that tells the user what is wrong, not the whole message. ``forward=True`` runs the full
   ``verify`` (both models loaded, completeness and logit parity) instead of ``--no-forward``;
   ``exit_code`` is what ``verify`` must exit with (2: the proof failed; 1: the input was refused).
   ``dtypes`` restricts a case to some of ``DTYPES``.
3. Parametrize a test over ``cases_in(MODULE_CASES)`` × ``DTYPES`` and call ``assert_rejected`` (see
   ``tests/test_tampering.py``); ``benchmarks/tampering_corpus.py`` runs every registered case and prints
   the verdict table for BENCHMARKS.md.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = ("float32", "bfloat16")
MODEL_TYPE = "qwen2"
D_MODEL = 64
N_LAYERS = 4
EMBEDDING = "model.embed_tokens.weight"
NORM = "model.norm.weight"
# Fixed seeds: the corpus is the same on every machine.
DIRECTION_SEED = 1
OTHER_DIRECTION_SEED = 2

Mutate = Callable[[Path, Path, Path], None]


@dataclass(frozen=True)
class TamperCase:
    """One tampered (original, edited, direction) triple and the rejection it must get.

    Attributes:
        name: a short description, the row of the corpus table.
        mutate: changes the copied triple in place: ``mutate(original, edited, direction)``.
        expect: a substring of the one-line reason ``verify`` must give (case-insensitive).
        forward: run the full ``verify`` (models loaded) instead of ``--no-forward``.
        exit_code: the exit status ``verify`` must end with (2: not verified; 1: input refused).
        dtypes: the checkpoint dtypes the case applies to.
        kind: which clean triple the case starts from, a key of ``BUILDERS`` (``"checkpoint"``; a module
            that registers another kind, e.g. a LoRA adapter in place of ``edited``, adds its builder).
    """

    name: str
    mutate: Mutate
    expect: str
    forward: bool = False
    exit_code: int = 2
    dtypes: tuple[str, ...] = DTYPES
    kind: str = "checkpoint"


@dataclass(frozen=True)
class Triple:
    """A source checkpoint, its edited copy and the direction file of the edit."""

    original: Path
    edited: Path
    direction: Path


# Every registered case, in registration order; test modules append theirs with ``register``.
CASES: list[TamperCase] = []


def register(*cases: TamperCase) -> tuple[TamperCase, ...]:
    """Add ``cases`` to ``CASES`` (once each, by name) and return them, for a module's own list."""
    known = {case.name for case in CASES}
    for case in cases:
        if case.name in known:
            raise ValueError(f"a tampering case named {case.name!r} is registered twice")
        known.add(case.name)
        CASES.append(case)
    return cases


def cases_in(cases: tuple[TamperCase, ...] | list[TamperCase]) -> list[tuple[TamperCase, str]]:
    """``(case, dtype)`` pairs for ``pytest.mark.parametrize``, each case over its dtypes."""
    return [(case, dtype) for case in cases for dtype in case.dtypes]


def case_id(value: object) -> str:
    """A readable pytest id for a ``TamperCase`` or a dtype."""
    return value.name.replace(" ", "-") if isinstance(value, TamperCase) else str(value)


# ---------------------------------------------------------------------------------------------- building


def build_clean(root: Path, dtype: str) -> Triple:
    """A clean triple under ``root``: a tiny qwen2 checkpoint in ``dtype``, a seeded direction, and the
    checkpoint ``abliterate apply`` (streamed, certified) writes from them."""
    from conftest import save_tiny

    from abliterate.edit.declared import DeclaredEdit
    from abliterate.ship.direction_file import load_direction, save_direction
    from abliterate.ship.streaming import stream_apply

    root.mkdir(parents=True, exist_ok=True)
    original = save_tiny(root / "original", MODEL_TYPE, dtype=getattr(torch, dtype))
    direction = root / "direction.safetensors"
    save_direction(direction, seeded_direction(DIRECTION_SEED), 2, -1, "corpus")
    edited = root / "edited"
    # The saved (normalized) vector, as `abliterate apply --direction` folds it.
    stream_apply(original, DeclaredEdit(load_direction(direction)[0]), edited, progress=False)
    return Triple(original, edited, direction)


# Clean-triple builders by case kind: ``builder(root, dtype)``; test modules add their own kinds.
BUILDERS: dict[str, Callable[[Path, str], Triple]] = {"checkpoint": build_clean}


def copy_triple(clean: Triple, into: Path) -> Triple:
    """A copy of ``clean`` under ``into`` that a case may change."""
    into.mkdir(parents=True, exist_ok=True)
    original, edited = into / "original", into / "edited"
    shutil.copytree(clean.original, original)
    shutil.copytree(clean.edited, edited)
    direction = into / "direction.safetensors"
    shutil.copyfile(clean.direction, direction)
    return Triple(original, edited, direction)


def seeded_direction(seed: int, d_model: int = D_MODEL) -> torch.Tensor:
    """A random direction ``[d_model]`` from a fixed seed (normalized when saved)."""
    return torch.randn(d_model, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ changing a checkpoint


def _shard_of(checkpoint: Path, name: str) -> Path:
    """The safetensors file of ``checkpoint`` that holds tensor ``name``."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        return checkpoint / json.loads(index.read_text("utf-8"))["weight_map"][name]
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            if name in handle.keys():
                return shard
    raise KeyError(f"{checkpoint} holds no tensor {name}")


def _load_shard(shard: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(shard), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def read_tensor(checkpoint: Path, name: str) -> torch.Tensor:
    """Tensor ``name`` of ``checkpoint``, as stored (its own dtype)."""
    with safe_open(str(_shard_of(checkpoint, name)), framework="pt") as handle:
        return handle.get_tensor(name)


def write_tensor(checkpoint: Path, name: str, tensor: torch.Tensor) -> None:
    """Replace tensor ``name`` of ``checkpoint`` in place (its shard is rewritten, metadata kept)."""
    shard = _shard_of(checkpoint, name)
    tensors, metadata = _load_shard(shard)
    tensors[name] = tensor.contiguous()
    save_file(tensors, str(shard), metadata=metadata)


def change_tensor(checkpoint: Path, name: str, change: Callable[[torch.Tensor], None]) -> None:
    """Read tensor ``name``, let ``change`` modify a copy in place, write it back."""
    tensor = read_tensor(checkpoint, name).clone()
    change(tensor)
    write_tensor(checkpoint, name, tensor)


def remove_tensor(checkpoint: Path, name: str) -> None:
    """Drop tensor ``name`` from ``checkpoint`` (and from its index, when sharded)."""
    shard = _shard_of(checkpoint, name)
    tensors, metadata = _load_shard(shard)
    del tensors[name]
    save_file(tensors, str(shard), metadata=metadata)
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text("utf-8"))
        del data["weight_map"][name]
        index.write_text(json.dumps(data, indent=2), "utf-8")


def add_tensor(checkpoint: Path, name: str, tensor: torch.Tensor, beside: str = EMBEDDING) -> None:
    """Add tensor ``name`` to the shard that holds ``beside`` (and to the index, when sharded)."""
    shard = _shard_of(checkpoint, beside)
    tensors, metadata = _load_shard(shard)
    tensors[name] = tensor.contiguous()
    save_file(tensors, str(shard), metadata=metadata)
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text("utf-8"))
        data["weight_map"][name] = shard.name
        index.write_text(json.dumps(data, indent=2), "utf-8")


def writer_names(layer_count: int = N_LAYERS) -> list[str]:
    """The residual writers' weight names of the tiny qwen2 (attention out, MLP down) per block."""
    names = []
    for layer in range(layer_count):
        names.append(f"model.layers.{layer}.self_attn.o_proj.weight")
        names.append(f"model.layers.{layer}.mlp.down_proj.weight")
    return names


# ------------------------------------------------------------------------- changing a direction file


def rewrite_direction(
    path: Path, vector: torch.Tensor | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Rewrite a direction file in place: another ``vector`` and/or metadata entries added or replaced."""
    with safe_open(str(path), framework="pt") as handle:
        stored, old = handle.get_tensor("direction"), dict(handle.metadata() or {})
    new = stored if vector is None else vector.to(torch.float32)
    save_file({"direction": new.contiguous()}, str(path), metadata={**old, **(metadata or {})})


def set_strengths(path: Path, strength: float, layers: int = N_LAYERS) -> None:
    """Declare ``strength`` on every writer (embedding and every block of every group) in ``path``.

    ``json.dumps`` writes NaN and Infinity as the bare words ``json.loads`` reads back, so a non-finite
    strength reaches the reader as the float it is.
    """
    groups = ("attention", "mlp", "experts", "shared_experts")
    strengths = {"embedding": strength, "layers": {group: [strength] * layers for group in groups}}
    rewrite_direction(path, metadata={"strengths": json.dumps(strengths)})


# ------------------------------------------------------------------------------------------- verdicts


def verify(triple: Triple, forward: bool = False) -> tuple[int, str]:
    """Run ``abliterate verify`` on ``triple`` through the CLI.

    Returns:
        ``(exit status, the error line)``: the last line starting with ``error:`` (empty when none),
        or the whole output when the command raised something other than ``SystemExit``.
    """
    from click.testing import CliRunner

    from abliterate.cli import main

    args = ["verify", str(triple.original), str(triple.edited), "--direction", str(triple.direction)]
    args += ["--no-progress", "--device", "cpu"] + ([] if forward else ["--no-forward"])
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        trace = "".join(traceback.format_exception(result.exception))
        return result.exit_code, f"{result.output}\n{trace}"
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    return result.exit_code, errors[-1] if errors else ""


def run_case(case: TamperCase, clean: Triple, workdir: Path) -> tuple[int, str]:
    """Copy ``clean`` into ``workdir``, apply ``case`` and verify it: ``(exit status, error line)``."""
    triple = copy_triple(clean, workdir)
    case.mutate(triple.original, triple.edited, triple.direction)
    return verify(triple, forward=case.forward)


def assert_rejected(case: TamperCase, clean: Triple, workdir: Path) -> None:
    """``verify`` rejects the tampered copy with ``case.exit_code`` and a one-line reason naming
    ``case.expect``."""
    status, line = run_case(case, clean, workdir)
    assert status == case.exit_code, f"{case.name}: exit {status}, expected {case.exit_code}: {line}"
    assert case.expect.lower() in line.lower(), f"{case.name}: {line!r} does not say {case.expect!r}"
    assert "\n" not in line.strip(), f"{case.name}: the reason is not one line: {line!r}"
