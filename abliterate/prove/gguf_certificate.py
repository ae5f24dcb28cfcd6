"""The certificate of a GGUF output: an edited GGUF equals the declared edit of its GGUF source, bitwise.

Both files are memory-mapped and read one tensor at a time. What it proves:

* **Every metadata key of the source is in the output, byte for byte** (the chat template, the vocabulary,
  ``general.file_type``…), and the output adds nothing but the declared ``abliterate.*`` keys, whose
  direction hash, edit and added output tensor must be those of the declared edit.
* **The same tensors**: nothing missing, nothing extra, except ``output.weight`` where the source ties its
  head to ``token_embd``, which must then be the source's ``token_embd``: same type, shape and bytes.
* **Which tensors must change comes from the model's structure** (``abliterate.prove.structure``, built
  from the GGUF's metadata), mapped to GGUF tensor names by transformers' GGUF name map
  (``abliterate.prove.gguf_source``), not from the names ``apply`` matches.
* **Every writer is quantize(fold(dequantize(source)))**, recomputed here from transformers' dequantized
  tensor (not from the output's bytes) by the same kernel, in the type ``abliterate.writer_type``
  declares (``abliterate.prove.gguf_rules.writer_type``), and compared byte for byte; a source writer
  holding NaN or Inf is refused (the fold spreads one such value over a row).
* **Every other tensor is bitwise equal** to the source: bytes, type and shape.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from abliterate.edit.declared import DeclaredEdit, RequiredEdit
from abliterate.edit.kernel import all_finite, changes, non_finite_writer, orthogonalize_
from abliterate.prove.certificate import Certificate
from abliterate.prove.gguf_layout import GGUFLayout
from abliterate.prove.gguf_rules import (
    EMBEDDING_TENSOR,
    GGUF_TYPES,
    OUTPUT_TENSOR,
    PREFIX,
    declared_metadata,
    same_bytes,
    writer_type,
)
from abliterate.prove.structure import canonical, read_structure
from abliterate.prove.tally import Tally

_NO_WRITER_THERE = "changed, but the structure says no residual writer lives there"


def certify_gguf(
    original: str | Path,
    edited: str | Path,
    declared: DeclaredEdit,
    *,
    architecture: str | None = None,
    progress: bool = True,
) -> Certificate:
    """Certify that the GGUF ``edited`` is the GGUF ``original`` with ``declared`` folded into every writer.

    Args:
        original: the source ``.gguf`` file.
        edited: the edited ``.gguf`` file.
        declared: the direction and strengths the edit claims.
        architecture: adapter override.
        progress: show a progress bar over the edited file's tensors.

    Returns:
        The certificate (``passed`` tells the verdict; nothing is raised for a failing file).
    """
    started, tally = time.perf_counter(), Tally()
    opened = _open(Path(original), Path(edited), declared, architecture, tally)
    if opened is None:
        return tally.certificate(time.perf_counter() - started)
    layouts, source, structure = opened
    writers = _writers(source, structure, tally)
    before = layouts[0].tensors
    added = OUTPUT_TENSOR not in before
    choice = _check_metadata(layouts, declared, OUTPUT_TENSOR if added else "", tally)
    after = layouts[1].tensors
    expected = set(before) | ({OUTPUT_TENSOR} if added else set())
    for name in sorted(set(after) - expected):
        tally.fail(f"{name}: in the edited GGUF but not in the original")
    for name in sorted(expected - set(after)):
        tally.fail(f"{name}: in the original but missing from the edited GGUF")
    total = sum(int(tensor.n_bytes) for tensor in after.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="certify", disable=not progress) as bar:
        for name, tensor in after.items():
            origin = before.get(EMBEDDING_TENSOR if added and name == OUTPUT_TENSOR else name)
            if origin is not None:
                tally.n_tensors += 1
                pair = (layouts[0], origin), (layouts[1], tensor)
                if name in writers:
                    _certify_writer(name, pair, source, *writers[name], declared, choice, tally)
                else:
                    head = name not in before
                    what = "the untied head is not the original token_embd" if head else _NO_WRITER_THERE
                    tally.unchanged(_same_tensor(*pair), f"{name}: {what}")
                tally.bytes_read += int(origin.n_bytes) + int(tensor.n_bytes)
            bar.update(int(tensor.n_bytes))
    return tally.certificate(time.perf_counter() - started)


def _open(
    original: Path, edited: Path, declared: DeclaredEdit, architecture: str | None, tally: Tally
) -> tuple[tuple[Any, Any], Any, Any] | None:
    """``((original layout, edited layout), GGUFSource, structure)``, or ``None`` after failing: a file
    that is no GGUF, an architecture the source reader does not cover, a declared edit that is no edit
    (``DeclaredEdit.validate``) or a direction of another width."""
    from abliterate.prove.gguf_source import GGUFSource

    source, why_not = GGUFSource.open(original)  # raises ValueError for a file that is no GGUF
    if source is None:
        tally.fail(why_not)
        return None
    try:
        layouts = GGUFLayout(original), GGUFLayout(edited)
    except ValueError as error:
        tally.fail(str(error))
        return None
    if layouts[1].trailing >= layouts[1].alignment:  # more than the last tensor's padding: hidden data
        tally.fail(f"{edited.name}: {layouts[1].trailing} bytes after the last tensor, which no tensor holds")
    disagreement = layouts[0].check_against(source.gguf_reader)
    if disagreement:  # this fast reader's view of the original must be gguf-py's
        tally.fail(f"{original.name}: {disagreement}")
        return None
    structure = read_structure(source, architecture)
    try:
        declared.validate((edit.group, edit.layer) for edit in structure.edits.values())
    except ValueError as error:
        tally.fail(str(error))
        return None
    embedding = layouts[0].tensors.get(EMBEDDING_TENSOR)
    if embedding is None:
        tally.fail(f"the original has no {EMBEDDING_TENSOR}")
        return None
    width, d_model = declared.direction.shape[-1], embedding.shape[-1]
    if width != d_model:
        tally.fail(f"the direction has {width} entries but the model's d_model is {d_model}: another model")
        return None
    return layouts, source, structure


def _same_tensor(first: tuple[Any, Any], second: tuple[Any, Any]) -> bool:
    """Same type, shape and bytes."""
    (layout_a, a), (layout_b, b) = first, second
    if a.tensor_type != b.tensor_type or a.shape != b.shape:
        return False
    return same_bytes(layout_a.tensor_bytes(a.name), layout_b.tensor_bytes(b.name))


def _check_metadata(
    layouts: tuple[GGUFLayout, GGUFLayout], declared: DeclaredEdit, output_tensor: str, tally: Tally
) -> str:
    """Every source key byte for byte, nothing added but the declared ``abliterate.*`` keys; returns the
    declared writer type (``abliterate.writer_type``; ``q8_0`` when it is missing or unknown, after
    failing)."""
    before, after = layouts
    if before.version != after.version:
        tally.fail("the GGUF version differs from the original's")
    keys = [key for key in before.fields if not key.startswith(PREFIX)]
    for key in keys:
        if key not in after.fields:
            tally.fail(f"metadata {key}: in the original but missing from the edited GGUF")
        elif not same_bytes(before.field_bytes(key), after.field_bytes(key)):
            tally.fail(f"metadata {key}: differs from the original's")
    ours = {key for key in after.fields if key.startswith(PREFIX)}
    for key in sorted(set(after.fields) - set(keys) - ours):
        if not key.startswith("GGUF."):
            tally.fail(f"metadata {key}: in the edited GGUF but not in the original")
    field = after.fields.get(f"{PREFIX}writer_type")
    choice = str(field.value) if field is not None else ""
    if choice not in GGUF_TYPES:
        tally.fail(f"metadata {PREFIX}writer_type {choice!r}: not one of {', '.join(GGUF_TYPES)}")
        choice = "q8_0"
    expected = declared_metadata(declared, "", choice, output_tensor)
    for key in sorted(ours - set(expected)):
        tally.fail(f"metadata {key}: not a key abliterate declares")
    for key, value in expected.items():
        if key == f"{PREFIX}base_model":
            continue  # the source as named where it was written: informational
        if key not in after.fields:
            tally.fail(f"metadata {key}: missing (the output must name its edit)")
        elif after.fields[key].value != value:
            tally.fail(f"metadata {key}: {after.fields[key].value!r}, the declared edit says {value!r}")
    return choice


def _certify_writer(
    name: str,
    pair: tuple[tuple[Any, Any], tuple[Any, Any]],
    source: Any,
    saved: str,
    required: RequiredEdit,
    declared: DeclaredEdit,
    choice: str,
    tally: Tally,
) -> None:
    """One writer: the source's (strength 0), or quantize(fold(transformers' dequantized source))."""
    from gguf.quants import dequantize, quantize

    (_, origin), (layout, tensor) = pair
    where = f"{name} ({required.group} {required.layer})"
    scales = declared.scales(required.group, required.layer)
    if not changes(scales):
        tally.unchanged(_same_tensor(*pair), f"{name}: changed, but the declared edit gives it strength 0")
        return
    shape = origin.shape
    try:
        qtype = writer_type(choice, origin.tensor_type, shape)
    except ValueError as error:
        tally.fail(f"{where}: {error}")
        return
    if tensor.tensor_type != qtype or tensor.shape != shape:
        tally.fail(f"{where}: stored as {tensor.tensor_type.name} {list(tensor.shape)}, "
                   f"the declared edit says {qtype.name} {list(shape)}")  # fmt: skip
        return
    value = source.tensor(saved)
    if tuple(value.shape) != shape:
        tally.fail(f"{where}: transformers loads it as {list(value.shape)}, not in the GGUF's layout")
        return
    if not all_finite(value):
        tally.fail(non_finite_writer(name))
        return
    orthogonalize_(
        value, declared.direction, required.layout, scales, declared.norm_preserving and not required.bias
    )
    expected = np.ascontiguousarray(quantize(value.numpy(), qtype))
    if same_bytes(expected, layout.tensor_bytes(name)):
        if all_finite(torch.from_numpy(np.ascontiguousarray(dequantize(expected, qtype)))):
            tally.edited(required.group, required.layer, exact=True, leak=1.0)
        else:
            tally.fail(f"{where}: the declared fold overflows to NaN/Inf in {qtype.name}")
        return
    stored = torch.from_numpy(np.ascontiguousarray(dequantize(layout.tensor_data(name), tensor.tensor_type)))
    if not all_finite(stored):
        tally.fail(f"{where}: holds NaN/Inf values, where the declared edit of the original is finite")
        return
    differ = int(
        np.count_nonzero(expected.reshape(-1).view(np.uint8) != layout.tensor_bytes(name).reshape(-1))
    )
    tally.fail(
        f"{where}: {differ} of {expected.nbytes} bytes differ from quantize(fold(dequantize(original)))"
    )


def _writers(source: Any, structure: Any, tally: Tally) -> dict[str, tuple[str, RequiredEdit]]:
    """GGUF tensor name → (saved name, required edit) of every writer the structure lists."""
    writers: dict[str, tuple[str, RequiredEdit]] = {}
    present = set()
    for saved in source.index():
        key = canonical(saved)
        present.add(key)
        required = structure.edits.get(key)
        if required is None:
            continue
        names = source.gguf_names(saved)
        if len(names) != 1:
            tally.fail(f"{saved}: a writer computed from {len(names)} GGUF tensors cannot be certified")
            continue
        writers[names[0]] = (saved, required)
    for memory_name, saved_names in structure.alternatives:
        if memory_name in present or (saved_names and all(n in present for n in saved_names)):
            continue
        tally.fail(f"{memory_name}: the model's structure says it must be edited, but the GGUF lacks it")
    return writers
