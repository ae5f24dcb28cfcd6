"""The weight certificate: an edited checkpoint equals the declared edit of its original, tensor by tensor.

No forward pass, no model in memory, no GPU: both checkpoints are read one tensor at a time, so a 70B
checkpoint is certified within the streaming memory bound. What it proves:

* **Which tensors must change comes from the model's structure**, not from the on-disk name patterns
  ``apply`` uses: a model is built on the meta device from ``config.json`` (no weights), the adapter's
  writer modules are resolved on it, and transformers' own save-time conversion maps each writer
  parameter to its on-disk name(s) (fused experts become per-expert tensors, Mixtral's ``w2``, …).
* **Every such tensor equals the fold of the original** (a norm-preserving edit's weights with ``D``, its
  biases without, as ``RequiredEdit.bias`` tells them apart), recomputed here: bitwise when the
  checkpoint was written by this machine's kernel (``exact``); otherwise within a stated bound
  (``bounded``): every element within one unit in the last place of the exact float64 fold plus the
  float32 working precision (2^-16 of the original element), and the part of the error along the
  direction at most ``LEAK_RATIO_LIMIT`` times that of the correctly rounded fold. The second test
  is what rejects a direction a few degrees off, whose per-element change is below one bf16 ulp but
  adds up along r̂.
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

import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from abliterate.adapters.spec import Layout
from abliterate.edit.kernel import (
    ROWS_WRITE,
    all_finite,
    changes,
    compute_dtype,
    non_finite_writer,
    norm_factors,
    orthogonalize_,
    ulp,
)
from abliterate.find.search import MAX_STRENGTH  # the largest strength a declared edit may give a writer
from abliterate.io.chunked import ChunkedReader
from abliterate.io.safetensors import DTYPES, Shard, TensorEntry, find_shards, read_header

logger = logging.getLogger(__name__)

# A correctly rounded fold leaves, along r̂, only its rounding error; a bounded (non-bitwise) tensor may
# carry at most this many times as much. A float32-computed fold measures 1.00-1.02 (a few elements one
# ulp off); a direction 3° off measures > 10 on the demo model (BENCHMARKS.md, certificate table).
LEAK_RATIO_LIMIT = 2.0
# The float32 working precision of a 16-bit fold, as a fraction of the terms of ``w − s r_i p_j``: 2^-16
# leaves a factor 128 over float32's 2^-23 for the few operations per element and the reduction in p_j.
_WORKING_PRECISION = 2.0**-16
_TEXT_PREFIXES = (
    "model.language_model.",
    "language_model.model.",
    "language_model.",
    "model.",
    "transformer.",
)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_MAX_LISTED_FAILURES = 20


@dataclass(frozen=True)
class DeclaredEdit:
    """The edit a checkpoint claims to carry: ``W ← (I − s r̂ r̂ᵀ) W`` on every residual writer.

    Attributes:
        direction: ``[d_model]`` unit direction (as stored in ``direction.safetensors``).
        strengths: ``s`` per writer group (``embedding``, ``attention``, ``mlp``, ``experts``,
            ``shared_experts``); a group not named has strength ``default_strength``.
        default_strength: the strength of every group not in ``strengths``.
        layer_strengths: per group, one strength per decoder block (a layer profile); where given it
            overrides ``strengths`` for that group's writers in blocks ``0 … len − 1``.
        weights: for a subspace ``direction`` ``[k, d_model]`` (orthonormal rows ``q_i``), the weight
            ``w_i`` of each row: a writer of strength ``s`` gets ``W ← (I − Σ_i s w_i q_i q_iᵀ) W``.
        norm_preserving: every weight gets ``W ← (I − s r̂ r̂ᵀ) W D`` (``abliterate.edit.kernel.norm_factors``);
            biases are projected, never scaled.
    """

    direction: torch.Tensor
    strengths: dict[str, float] = field(default_factory=dict)
    default_strength: float = 1.0
    layer_strengths: dict[str, tuple[float, ...]] = field(default_factory=dict)
    weights: tuple[float, ...] = ()
    norm_preserving: bool = False

    def validate(self, writers: Iterable[tuple[str, int]] | None = None) -> DeclaredEdit:
        """Check that this is an edit: finite strengths in ``[0, MAX_STRENGTH]`` (the search's range),
        subspace weights in ``[0, 1]``, and, given the ``(group, layer)`` of every writer it applies to,
        not zero on all of them (a no-op would certify the unmodified source as edited).

        Every consumer (``apply``, ``verify``, LoRA output, the certificate) calls this one check.

        Args:
            writers: the writers the edit is applied to; ``None`` skips the no-op check.

        Returns:
            ``self``.

        Raises:
            ValueError: one line naming the first value out of range, or saying the edit is a no-op.
        """
        values = [("every other writer", self.default_strength)]
        values += [(f"the {group}", strength) for group, strength in self.strengths.items()]
        for group, profile in self.layer_strengths.items():
            values += [(f"block {layer}'s {group}", s) for layer, s in enumerate(profile)]
        for where, value in values:
            _check_range(f"{where} strength", value, MAX_STRENGTH)
        for row, weight in enumerate(self.weights):
            _check_range(f"subspace row {row} weight", weight, 1.0)
        if writers is not None and not any(changes(self.scales_for(g, layer)) for g, layer in writers):
            raise ValueError(
                "the direction file declares a zero edit (strength 0 on every writer): a no-op, "
                "the output would equal the source"
            )
        return self

    def is_plain(self) -> bool:
        """Strength 1 on every writer along one direction, not norm-preserving: the paper's edit."""
        plain = not self.strengths and not self.layer_strengths and self.default_strength == 1.0
        return plain and self.direction.dim() == 1 and not self.weights and not self.norm_preserving

    def scales_for(self, group: str, layer: int) -> float | tuple[float, ...]:
        """What the fold of a writer of ``group`` in block ``layer`` is given: ``strength_for``, or for a
        subspace ``[k, d_model]`` that strength times each row's weight (``weights``; 1 when empty)."""
        strength = self.strength_for(group, layer)
        if self.direction.dim() != 2:
            return strength
        weights = self.weights or (1.0,) * self.direction.shape[0]
        return tuple(strength * weight for weight in weights)

    def strength(self, group: str) -> float:
        """The strength the declared edit applies to writers of ``group``."""
        return self.strengths.get(group, self.default_strength)

    def strength_for(self, group: str, layer: int) -> float:
        """The strength at the writers of ``group`` in block ``layer`` (``-1``: embeddings).

        ``layer_strengths[group][layer]`` when the edit declares a per-layer profile for the group,
        else ``strength(group)``.
        """
        profile = self.layer_strengths.get(group)
        if profile is not None and 0 <= layer < len(profile):
            return float(profile[layer])
        return self.strength(group)


def _check_range(what: str, value: float, upper: float) -> None:
    """One line unless ``value`` is finite and in ``[0, upper]`` (``what``: e.g. "the embedding strength")."""
    if not math.isfinite(value):
        raise ValueError(f"the declared edit gives {what} {value}: strengths and weights must be finite")
    if not 0.0 <= value <= upper:
        raise ValueError(f"the declared edit gives {what} {value:g}, outside [0, {upper:g}]")


@dataclass(frozen=True)
class RequiredEdit:
    """A tensor the structure says the edit must change (``bias``: a writer's bias, which a
    norm-preserving edit projects but never scales; it is folded with the ``embedding`` layout)."""

    layout: Layout
    group: str
    layer: int
    bias: bool = False


@dataclass(frozen=True)
class Structure:
    """What the model's structure says about its checkpoint.

    Attributes:
        edits: canonical on-disk name → the edit it must carry.
        alternatives: per writer parameter, its in-memory name and the names it is saved under.
        head: canonical name of the output head's weight.
        embedding: canonical name of the token embedding's weight.
        tied: whether the original ties the head to the embedding.
        model_type: the adapter's model type.
    """

    edits: dict[str, RequiredEdit]
    alternatives: list[tuple[str, tuple[str, ...]]]
    head: str
    embedding: str
    tied: bool
    model_type: str


class TensorSource(Protocol):
    """An original that is not a safetensors directory (``abliterate.model.gguf_source.GGUFSource``).

    Attributes:
        config: the model's config, built from the source's own metadata.
        cast_after_fold: the run folds the source's tensors in their own dtype and casts the result once.
    """

    config: Any
    cast_after_fold: bool

    def index(self) -> dict[str, tuple[Any, TensorEntry]]: ...  # saved name → location for ``reader()``

    def reader(self) -> ChunkedReader: ...  # a ChunkedReader that also reads this source's locations

    def check_config(self, edited: Path, structure: Structure, declared: DeclaredEdit, fail: Any) -> None: ...


@dataclass(frozen=True)
class Certificate:
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

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary for JSON output."""
        return asdict(self)

    @property
    def reason(self) -> str:
        """The first failure, or an empty string when passed."""
        if self.passed:
            return ""
        if self.n_tensors == 0:  # refused before any tensor was read: the declared edit itself
            return self.failures[0]
        return f"{self.n_failures} tensor(s) fail the certificate: {self.failures[0]}"


def canonical(name: str) -> str:
    """An on-disk tensor name without the text-model prefix it may carry (``model.``, ``transformer.``…)."""
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def layer_of(name: str) -> int:
    """The decoder-block index in a tensor name, or -1 (embeddings, head, norms)."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else -1


def read_structure(checkpoint: Path | TensorSource, architecture: str | None = None) -> Structure:
    """Build the model on the meta device from ``checkpoint/config.json`` and list what the edit must change.

    Raises:
        ValueError: the config cannot be built into a model without remote code.
    """
    from transformers import AutoModelForCausalLM

    from abliterate.adapters import resolve_adapter
    from abliterate.adapters.resolve import embeddings_of, locate, resolve_writers

    try:
        config = _config_of(checkpoint, architecture)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(
            f"cannot build {checkpoint}'s model from its config.json to certify it: {error}"
        ) from error
    adapter = resolve_adapter(model, architecture)
    parameters: dict[str, RequiredEdit] = {}
    for embedding in embeddings_of(model, adapter):
        parameters[f"{embedding.name}.weight"] = RequiredEdit("embedding", "embedding", -1)
    for writer in resolve_writers(model, adapter):
        group = writer.group
        parameters[f"{writer.name}.{writer.weight}"] = RequiredEdit(writer.layout, group, writer.layer)
        if writer.bias_tensor() is not None:
            parameters[f"{writer.name}.{writer.bias}"] = RequiredEdit("embedding", group, writer.layer, True)
    edits, alternatives = _on_disk_names(model, parameters)
    head_name = locate(model, adapter.lm_head)
    embedding_name = embeddings_of(model, adapter)[0].name
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    head, embedding = canonical(f"{head_name}.weight"), canonical(f"{embedding_name}.weight")
    return Structure(edits, alternatives, head, embedding, tied, adapter.name)


def _config_of(checkpoint: Path | TensorSource, architecture: str | None) -> Any:
    """The checkpoint's config; a model type transformers does not know is read as ``architecture``."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from abliterate.io.safetensors import read_json

    if not isinstance(checkpoint, Path):  # a GGUF source: the config transformers builds from its metadata
        return checkpoint.config
    fields = read_json(checkpoint / "config.json", "config.json")
    if architecture is not None and fields.get("model_type") not in CONFIG_MAPPING:
        fields = {key: value for key, value in fields.items() if key != "model_type"}
        return AutoConfig.for_model(architecture, **fields)
    return AutoConfig.from_pretrained(str(checkpoint), trust_remote_code=False)


def _on_disk_names(
    model: torch.nn.Module, parameters: dict[str, RequiredEdit]
) -> tuple[dict[str, RequiredEdit], list[tuple[str, tuple[str, ...]]]]:
    """Map in-memory parameter names to the names ``save_pretrained`` writes.

    Fused experts are written per expert by some families: ``[E, d_model, d_in]`` becomes E tensors
    ``[d_model, d_in]`` (layout ``linear``), ``[E, d_in, d_model]`` becomes E ``conv1d``-like ones. A
    checkpoint may hold either naming (hub originals differ), so both are kept.

    Returns:
        ``(edits, alternatives)``: every acceptable canonical name → its edit, and per parameter its
        in-memory name and the names it is saved under (one of the two must be on disk).
    """
    from transformers.core_model_loading import revert_weight_conversion

    state = dict(model.state_dict(keep_vars=True))
    edits: dict[str, RequiredEdit] = {}
    alternatives = []
    for name, required in parameters.items():
        edits[canonical(name)] = required
        try:
            reverted = revert_weight_conversion(model, {name: state[name]})
        except Exception as error:
            logger.info("no save-time conversion for %s (%s): kept its in-memory name", name, error)
            reverted = {}
        for disk_name, tensor in reverted.items():
            layout = required.layout
            if tensor.dim() < state[name].dim() and layout in ("experts", "experts_t"):
                layout = "linear" if layout == "experts" else "conv1d"
            edits[canonical(disk_name)] = replace(required, layout=layout)
        alternatives.append((canonical(name), tuple(sorted(canonical(n) for n in reverted))))
    return edits, alternatives


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
    source = _tensor_index(original) if isinstance(original, Path) else original.index()
    target = _tensor_index(edited)
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


def _tensor_index(checkpoint: Path) -> dict[str, tuple[Path, TensorEntry]]:
    names, _ = find_shards(checkpoint)
    index: dict[str, tuple[Path, TensorEntry]] = {}
    for file in names:
        shard: Shard = read_header(checkpoint / file)
        for entry in shard.entries:
            index[entry.name] = (shard.path, entry)
    return index


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
    from abliterate.adapters.tying import ties_embeddings
    from abliterate.io.safetensors import read_json

    before = read_json(original / "config.json", "config.json")
    after = read_json(edited / "config.json", "config.json")
    if before.get("model_type") != after.get("model_type"):
        tally.fail(
            f"config.json: model_type {after.get('model_type')!r} differs from {before.get('model_type')!r}"
        )
    if declared.strength("embedding") != 0 and ties_embeddings(after, str(after.get("model_type"))):
        tally.fail(
            "config.json ties the output head to the edited embedding (tie_word_embeddings must be false)"
        )


class _Tally:
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
            failures=self.failures[:_MAX_LISTED_FAILURES],
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
    tally.n_tensors += 1
    source_entry, target_entry = original[1], edited[1]
    if source_entry.shape != target_entry.shape:
        was, now = list(source_entry.shape), list(target_entry.shape)
        tally.fail(f"{name}: shape {now} differs from the original's {was}")
        return
    if required is None and source_entry.dtype == target_entry.dtype:
        if reader.same_bytes(original, edited):
            tally.n_unchanged += 1
        else:
            tally.fail(f"{name}: changed, but the structure says no residual writer lives there")
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
        if reader.matches(expected.to(target_dtype), edited):
            tally.n_unchanged += 1
        else:
            tally.fail(f"{name}: changed, but the structure says no residual writer lives there")
        return
    if not all_finite(expected):  # a fold spreads it over a row, where any value would then pass
        tally.fail(non_finite_writer(name))
        return
    strength = declared.scales_for(required.group, required.layer)
    if not changes(strength):  # strength 0: this writer must be left as it was
        if reader.matches(expected.to(target_dtype), edited):
            tally.n_unchanged += 1
        else:
            tally.fail(f"{name}: changed, but the declared edit gives it strength 0")
        return
    if declared.norm_preserving and required.group == "experts":
        tally.fail(f"{name}: a norm-preserving edit is declared, but fused experts cannot carry one")
        return
    scaled = declared.norm_preserving and not required.bias
    orthogonalize_(expected, declared.direction, required.layout, strength, scaled)
    where = f"{name} ({required.group} {required.layer})"
    expected = expected.to(target_dtype)
    if reader.matches(expected, edited):
        if all_finite(expected):
            tally.edited(required.group, required.layer, exact=True, leak=1.0)
        else:
            tally.fail(f"{where}: the declared fold overflows to NaN/Inf in {target_entry.dtype}")
        return
    del expected
    target = reader.tensor(edited, fresh=True)
    if not all_finite(target):  # the original and its fold are finite: these values are not the edit
        tally.fail(f"{where}: holds NaN/Inf values, where the declared edit of the original is finite")
        return
    source = reader.tensor(original, fresh=True).to(fold_dtype)
    exact = _exact_fold(source, declared.direction, required.layout, strength, scaled)
    leak = _leak_ratio(exact, target, declared.direction, required.layout)
    worst = _worst_bound_ratio(source, exact, target, declared.direction, required.layout, strength, scaled)
    tally.edited(required.group, required.layer, exact=False, leak=leak)
    # Written as "not within": a comparison with NaN is false, and a NaN must fail, never pass.
    if not worst <= 1.0:
        tally.fail(
            f"{where}: an element is {worst:.3g}× the bound (1 ulp of the exact fold + working precision)"
        )
    elif not leak <= LEAK_RATIO_LIMIT:
        tally.fail(
            f"{where}: leak along the direction {leak:.3g}× its rounding floor (limit {LEAK_RATIO_LIMIT})"
        )


def _exact_fold(
    source: torch.Tensor,
    direction: torch.Tensor,
    layout: Layout,
    strength: float | tuple[float, ...],
    norm_preserving: bool = False,
) -> torch.Tensor:
    """The fold in float64, unrounded (the reference of the bound)."""
    wide = source.to(torch.float64)
    orthogonalize_(wide, direction, layout, strength, norm_preserving)
    return wide


def _worst_bound_ratio(
    source: torch.Tensor,
    exact: torch.Tensor,
    target: torch.Tensor,
    direction: torch.Tensor,
    layout: Layout,
    strength: float | tuple[float, ...],
    norm_preserving: bool = False,
) -> float:
    """The largest |edited − exact fold| over its bound; ≤ 1 passes.

    The bound of ``w' = w − s r_i p_j`` computed in float32 by any correct kernel, then rounded once:
    1 ulp of the exact fold, plus ``_WORKING_PRECISION`` of its terms ``|w|`` and ``|w − exact|``, plus
    the float32 error of the reduction ``p_j = Σ_l r_l w_lj`` in any summation order,
    ``(d_model + 2) 2^-24 Σ_l |r_l w_lj|``, carried into the element by ``s r_i``. The last term is what a
    GPU's blocked reductions need where ``p_j`` cancels (a random 8B down-projection folded on an H100
    exceeded the bound without it, BENCHMARKS §9); a rotated direction still fails the leak ratio.

    A norm-preserving fold ``(w − s r_i p_j) D_j`` carries those terms times ``D_j``, plus ``D_j``'s own
    float32 error times the element (``_factor_error``).
    """
    error = (target.to(torch.float64) - exact).abs()
    bound = ulp(exact, target.dtype)
    if compute_dtype(target.dtype) != torch.float64:
        wide = source.to(torch.float64)
        factors = torch.ones((), dtype=torch.float64)
        plain = exact
        if norm_preserving:
            factors = _broadcast(norm_factors(wide, direction, layout, strength), layout)
            plain = exact / factors
        working = _WORKING_PRECISION * (wide.abs() + (wide - plain).abs())
        working = working + _reduction_bound(wide, direction, layout, strength)
        bound = bound + working * factors
        if norm_preserving:
            bound = bound + _factor_error(factors, direction, strength) * exact.abs()
    return (error / bound).max().item() if error.numel() else 0.0


def _broadcast(factors: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``norm_factors`` shaped to multiply the weight: per column (``[..., 1, d_in]``) or per row."""
    return factors[..., None] if layout in ROWS_WRITE else factors[..., None, :]


def _factor_error(
    factors: torch.Tensor, direction: torch.Tensor, strength: float | tuple[float, ...]
) -> torch.Tensor:
    """The relative float32 error of ``D = sqrt(n / (n − Σ_k c_k p_k²))``, ``c_k = s_k (2 − s_k)``: the sums
    ``n`` and ``p_k`` err by ``γ n`` and ``γ √n`` (``|q_k| = 1``, Cauchy-Schwarz), so the denominator by
    ``γ n (1 + 3 Σ|c_k|)``, i.e. ``γ (1 + 3 Σ|c_k|) D²`` of itself; ``D`` by half of that and of ``n``'s
    ``γ``, bounded by the whole (the other half covers the division and the square root)."""
    rows = direction.reshape(-1, direction.shape[-1])
    scales = strength if isinstance(strength, tuple) else (strength,) * rows.shape[0]
    gamma = (rows.shape[-1] + 2) * 2.0**-24
    spread = sum(abs(s * (2 - s)) for s in scales)
    return gamma * (2 + 3 * spread) * factors.square()


def _reduction_bound(
    wide: torch.Tensor, direction: torch.Tensor, layout: Layout, strength: float | tuple[float, ...]
) -> torch.Tensor:
    """``γ Σ_k |s_k| |q_ki| Σ_l |q_kl w_lj|`` per element, with ``γ = (d_model + 2) 2^-24``: the float32
    error of the dot products ``p`` in any summation order."""
    basis = _unit_rows(direction).abs()
    scales = torch.tensor(strength if isinstance(strength, tuple) else (strength,), dtype=torch.float64).abs()
    gamma = (basis.shape[-1] + 2) * 2.0**-24
    spread = _along(wide.abs(), basis, layout)  # S = Σ_l |q_kl w_lj| per written vector and row of Q
    if layout in ROWS_WRITE:  # [..., k] ⊗ |q|
        return gamma * torch.einsum("...k,kd->...d", spread * scales, basis)
    return gamma * torch.einsum("...ki,kd->...di", spread * scales[:, None], basis)


def _unit_rows(direction: torch.Tensor) -> torch.Tensor:
    """``direction`` as float64 unit rows ``[k, d_model]`` (``k = 1`` for a single direction)."""
    rows = direction.to(torch.float64).reshape(-1, direction.shape[-1])
    return rows / rows.norm(dim=-1, keepdim=True)


def _along(tensor: torch.Tensor, r: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The component of each written vector along r̂: ``W r̂`` (rows layouts) or ``r̂ᵀ W`` (column layouts);
    for a subspace ``r`` ``[k, d_model]``, along each of its rows."""
    if layout in ROWS_WRITE:
        return tensor @ (r if r.dim() == 1 else r.T)
    return torch.einsum("d,...di->...i" if r.dim() == 1 else "kd,...di->...ki", r, tensor)


def _leak_ratio(exact: torch.Tensor, target: torch.Tensor, direction: torch.Tensor, layout: Layout) -> float:
    """|r̂-component of (edited − exact fold)| over that of (correctly rounded fold − exact fold); for a
    subspace, the components along all of its rows together."""
    rounded = exact.to(target.dtype).to(torch.float64)
    r = _unit_rows(direction)
    leak = _along(target.to(torch.float64) - exact, r, layout).norm().item()
    floor = _along(rounded - exact, r, layout).norm().item()
    return leak / max(floor, torch.finfo(torch.float64).tiny)
