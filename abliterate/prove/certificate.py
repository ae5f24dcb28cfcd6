"""The weight certificate: an edited checkpoint equals the declared edit of its original, tensor by tensor.

No forward pass, no model in memory, no GPU: both checkpoints are read one tensor at a time, so a 70B
checkpoint is certified within the streaming memory bound. What it proves:

* **Which tensors must change comes from the model's structure** (``abliterate.prove.structure``), not
  from the on-disk name patterns ``apply`` uses: a model is built on the meta device from ``config.json``
  (no weights), and transformers' own save-time conversion maps each writer parameter to its on-disk
  name(s).
* **Every such tensor equals the fold of the original** (a norm-preserving edit's weights with ``D``, its
  biases without, as ``RequiredEdit.bias`` tells them apart), recomputed here: bitwise when the
  checkpoint was written by this machine's kernel (``exact``); otherwise within a stated bound
  (``bounded``, ``abliterate.prove.bounds``): every element within one unit in the last place of the
  exact float64 fold plus the float32 working precision, and the part of the error along the direction at
  most ``LEAK_RATIO_LIMIT`` times that of the correctly rounded fold.
* **Every compared value is finite**: an edited tensor holding NaN or Inf fails (a comparison with NaN
  is false, so every bound is checked as "not within"), and a source whose writers hold NaN or Inf is
  refused, since the fold spreads one such value over a whole row, where any value would then pass.
* **The declared edit is an edit** (``DeclaredEdit.validate``): finite strengths in the search's range,
  and not zero on every writer (a no-op would certify the unmodified source as edited).
* **Every other tensor is bitwise equal** to the original (cast to the edited checkpoint's dtype when
  the run saved another dtype), and the head added when untying a tied embedding equals the original
  embedding.

What it cannot see is a writer the adapter does not list: that is the residual-stream completeness
check's job (``abliterate.prove.residual.completeness``), which runs on real prompts.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from abliterate.adapters.tying import ties_embeddings
from abliterate.edit.declared import DeclaredEdit, RequiredEdit
from abliterate.edit.kernel import all_finite, changes, non_finite_writer, orthogonalize_
from abliterate.io.chunked import ChunkedReader
from abliterate.io.safetensors import DTYPES, TensorEntry, read_json
from abliterate.prove.bounds import LEAK_RATIO_LIMIT, TensorFold, judge_bounded
from abliterate.prove.structure import Structure, TensorSource, canonical, read_structure, tensor_index
from abliterate.prove.verdict import MAX_LISTED_FAILURES, Verdict

# The failure of a tensor that no residual writer lives in, yet differs from the original.
_NO_WRITER_THERE = "changed, but the structure says no residual writer lives there"


@dataclass(frozen=True)
class Certificate(Verdict):
    """The verdict of ``certify_checkpoint``.

    Attributes:
        passed: every tensor holds what the declared edit says.
        n_tensors: tensors in the edited checkpoint.
        n_edited: tensors the structure requires to be edited (all found and checked).
        n_exact: edited tensors bitwise equal to this machine's fold.
        n_bounded: edited tensors within the stated bound but not bitwise equal.
        n_unchanged: tensors verified bitwise equal to the original.
        max_leak_ratio: the largest leak ratio of a bounded tensor (1.0 when all are exact).
        leak_ratio_limit: the limit it was judged against.
        groups: per writer group, how many tensors were certified and over how many layers.
        failures: the first failures, one line each.
        n_failures: how many tensors failed.
        bytes_read: bytes read from both checkpoints.
        seconds: wall-clock time.
    """

    passed: bool
    n_tensors: int
    n_edited: int
    n_exact: int
    n_bounded: int
    n_unchanged: int
    max_leak_ratio: float
    leak_ratio_limit: float
    groups: dict[str, dict[str, int]]
    failures: list[str]
    n_failures: int
    bytes_read: int
    seconds: float

    failing = "tensor(s) fail the certificate"

    @property
    def reason(self) -> str:
        """The first failure, or an empty string when passed."""
        if not self.passed and self.n_tensors == 0:  # refused before any tensor was read: the declared edit
            return self.failures[0]  # itself, said in its own words
        return super().reason


def certify_checkpoint(
    original: str | Path | TensorSource,
    edited: str | Path,
    declared: DeclaredEdit,
    *,
    architecture: str | None = None,
    progress: bool = True,
    structure: Structure | None = None,
) -> Certificate:
    """Certify that ``edited`` is ``original`` with ``declared`` folded into every residual writer.

    Args:
        original: the unedited safetensors checkpoint directory, or a ``TensorSource`` (a GGUF file).
        edited: the edited safetensors checkpoint directory.
        declared: the direction and strengths the edit claims.
        architecture: adapter override.
        progress: show a progress bar over the bytes read.
        structure: ``read_structure(original, architecture)``, when the caller has it already.

    Returns:
        The certificate (``passed`` tells the verdict; nothing is raised for a failing checkpoint).
    """
    started = time.perf_counter()
    original = Path(original) if isinstance(original, str | Path) else original
    edited = Path(edited)
    structure = structure or read_structure(original, architecture)
    source = tensor_index(original) if isinstance(original, Path) else original.index()
    target = tensor_index(edited)
    tally = _Tally()
    names_by_canonical = {canonical(name): name for name in source}
    if not _check_declared(declared, structure, source, names_by_canonical, tally):
        return tally.certificate(time.perf_counter() - started)
    _check_names(structure, source, target, tally)
    if isinstance(original, Path):
        _check_config(original, edited, structure, declared, tally)
    else:
        original.check_config(edited, structure, declared, tally.fail)
    total = sum(entry.end - entry.start for _, entry in target.values())
    reader = ChunkedReader() if isinstance(original, Path) else original.reader()
    try:
        with tqdm(total=2 * total, unit="B", unit_scale=True, desc="certify", disable=not progress) as bar:
            for name, (path, entry) in target.items():
                key = canonical(name)
                original_name = names_by_canonical.get(key)
                if original_name is None and key == structure.head and structure.tied:
                    original_name = names_by_canonical.get(structure.embedding)
                if original_name is None:
                    continue  # reported by _check_names
                required = structure.edits.get(key)
                _certify_tensor(name, source[original_name], (path, entry), required, declared, tally, reader)
                bar.update(2 * (entry.end - entry.start))
    finally:
        reader.close()
    tally.bytes_read = reader.bytes_read
    return tally.certificate(time.perf_counter() - started)


def _check_declared(
    declared: DeclaredEdit, structure: Structure, source: dict, names_by_canonical: dict, tally: _Tally
) -> bool:
    """The declared edit is an edit of this model (``DeclaredEdit.validate``, the direction's width is
    the model's ``d_model``); on failure it is the one failure reported, and no tensor is read."""
    try:
        declared.validate((edit.group, edit.layer) for edit in structure.edits.values())
    except ValueError as error:
        tally.fail(str(error))
        return False
    embedding = names_by_canonical.get(structure.embedding)
    if embedding is not None:
        width, shape = declared.direction.shape[-1], list(source[embedding][1].shape)
        if width != shape[-1]:
            tally.fail(
                f"the direction has {width} entries but the model's embedding is {shape} "
                f"(d_model={shape[-1]}): the direction belongs to another model"
            )
            return False
    return True


def _check_names(structure: Structure, source: dict, target: dict, tally: _Tally) -> None:
    """Same tensors in both (plus an untied head); every structurally required tensor present."""
    source_keys = {canonical(name) for name in source}
    target_keys = {canonical(name) for name in target}
    allowed_extra = {structure.head} if structure.tied else set()
    for key in sorted(target_keys - source_keys - allowed_extra):
        tally.fail(f"{key}: in the edited checkpoint but not in the original")
    for key in sorted(source_keys - target_keys):
        tally.fail(f"{key}: in the original but missing from the edited checkpoint")
    for memory_name, saved_names in structure.alternatives:
        if memory_name in source_keys or (saved_names and all(n in source_keys for n in saved_names)):
            continue
        tally.fail(
            f"{memory_name}: the model's structure says it must be edited, but the checkpoint lacks it"
        )


def _check_config(
    original: Path, edited: Path, structure: Structure, declared: DeclaredEdit, tally: _Tally
) -> None:
    """The edited config must load the same architecture, with its head not tied to an edited embedding."""
    before = read_json(original / "config.json", "config.json")
    after = read_json(edited / "config.json", "config.json")
    if before.get("model_type") != after.get("model_type"):
        tally.fail(
            f"config.json: model_type {after.get('model_type')!r} differs from {before.get('model_type')!r}"
        )
    if changes(declared.scales("embedding", -1)) and ties_embeddings(after, str(after.get("model_type"))):
        tally.fail(
            "config.json ties the output head to the edited embedding (tie_word_embeddings must be false)"
        )


class _Tally:
    """The counts and failure lines gathered while the checkpoint is read, then made a ``Certificate``."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.n_tensors = self.n_edited = self.n_exact = self.n_bounded = self.n_unchanged = 0
        self.max_leak = 1.0
        self.bytes_read = 0
        self.groups: dict[str, dict[str, set[int] | int]] = defaultdict(
            lambda: {"tensors": 0, "layers": set()}
        )

    def fail(self, line: str) -> None:
        self.failures.append(line)

    def unchanged(self, same: bool, failure: str) -> None:
        """A tensor that must equal the original: counted when it does (``same``), else ``failure``."""
        if same:
            self.n_unchanged += 1
        else:
            self.fail(failure)

    def edited(self, group: str, layer: int, exact: bool, leak: float) -> None:
        self.n_edited += 1
        self.n_exact += exact
        self.n_bounded += not exact
        if not leak <= self.max_leak:  # a NaN leak is kept too (``max`` would drop it)
            self.max_leak = leak
        self.groups[group]["tensors"] += 1
        self.groups[group]["layers"].add(layer)

    def certificate(self, seconds: float) -> Certificate:
        groups = {
            name: {"tensors": int(values["tensors"]), "layers": len(values["layers"])}
            for name, values in sorted(self.groups.items())
        }
        return Certificate(
            passed=not self.failures,
            n_tensors=self.n_tensors,
            n_edited=self.n_edited,
            n_exact=self.n_exact,
            n_bounded=self.n_bounded,
            n_unchanged=self.n_unchanged,
            max_leak_ratio=self.max_leak,
            leak_ratio_limit=LEAK_RATIO_LIMIT,
            groups=groups,
            failures=self.failures[:MAX_LISTED_FAILURES],
            n_failures=len(self.failures),
            bytes_read=self.bytes_read,
            seconds=round(seconds, 3),
        )


def _certify_tensor(
    name: str,
    original: tuple[Path, TensorEntry],
    edited: tuple[Path, TensorEntry],
    required: RequiredEdit | None,
    declared: DeclaredEdit,
    tally: _Tally,
    reader: ChunkedReader,
) -> None:
    """One tensor of the edited checkpoint: the original's (``required`` is ``None``) or its declared fold."""
    tally.n_tensors += 1
    source_entry, target_entry = original[1], edited[1]
    if source_entry.shape != target_entry.shape:
        was, now = list(source_entry.shape), list(target_entry.shape)
        tally.fail(f"{name}: shape {now} differs from the original's {was}")
        return
    if required is None and source_entry.dtype == target_entry.dtype:
        tally.unchanged(reader.same_bytes(original, edited), f"{name}: {_NO_WRITER_THERE}")
        return
    if source_entry.dtype not in DTYPES or target_entry.dtype not in DTYPES:
        tally.fail(f"{name}: dtype {target_entry.dtype} (original {source_entry.dtype}) cannot be compared")
        return
    target_dtype = DTYPES[target_entry.dtype]
    # The run loaded the original in this dtype; a GGUF run folds the dequantized float32, then casts.
    cast_after_fold = getattr(original[0], "cast_after_fold", False)
    fold_dtype = DTYPES[source_entry.dtype] if cast_after_fold else target_dtype
    expected = reader.tensor(original).to(fold_dtype)
    if required is None:
        # Bitwise equality holds NaN and Inf to their own bits, so a non-writer may carry them unchanged.
        tally.unchanged(reader.matches(expected.to(target_dtype), edited), f"{name}: {_NO_WRITER_THERE}")
        return
    _certify_writer(name, original, edited, required, declared, tally, reader, expected)


def _certify_writer(
    name: str,
    original: tuple[Path, TensorEntry],
    edited: tuple[Path, TensorEntry],
    required: RequiredEdit,
    declared: DeclaredEdit,
    tally: _Tally,
    reader: ChunkedReader,
    expected: torch.Tensor,
) -> None:
    """A tensor the structure says the edit must change, given the original read in the fold's dtype
    (``expected``, folded in place): this machine's fold bitwise, or within the bound."""
    target_dtype = DTYPES[edited[1].dtype]
    if not all_finite(expected):  # a fold spreads it over a row, where any value would then pass
        tally.fail(non_finite_writer(name))
        return
    scales = declared.scales(required.group, required.layer)
    if not changes(scales):  # strength 0: this writer must be left as it was
        same = reader.matches(expected.to(target_dtype), edited)
        tally.unchanged(same, f"{name}: changed, but the declared edit gives it strength 0")
        return
    if declared.norm_preserving and required.group == "experts":
        tally.fail(f"{name}: a norm-preserving edit is declared, but fused experts cannot carry one")
        return
    scaled = declared.norm_preserving and not required.bias
    fold_dtype = expected.dtype
    orthogonalize_(expected, declared.direction, required.layout, scales, scaled)
    where = f"{name} ({required.group} {required.layer})"
    expected = expected.to(target_dtype)
    if reader.matches(expected, edited):
        if all_finite(expected):
            tally.edited(required.group, required.layer, exact=True, leak=1.0)
        else:
            tally.fail(f"{where}: the declared fold overflows to NaN/Inf in {edited[1].dtype}")
        return
    del expected
    target = reader.tensor(edited, fresh=True)
    if not all_finite(target):  # the original and its fold are finite: these values are not the edit
        tally.fail(f"{where}: holds NaN/Inf values, where the declared edit of the original is finite")
        return
    source = reader.tensor(original, fresh=True).to(fold_dtype)
    leak, failure = judge_bounded(
        source, target, TensorFold(declared.direction, required.layout, scales, scaled)
    )
    tally.edited(required.group, required.layer, exact=False, leak=leak)
    if failure:
        tally.fail(f"{where}: {failure}")
