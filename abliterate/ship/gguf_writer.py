"""``apply --format gguf`` and ``run --format gguf``: a GGUF source with the declared edit folded in, as GGUF.

Streamed tensor by tensor from the memory-mapped source (``abliterate.ship.gguf_file``): every tensor that
is not a residual writer and every metadata key is copied byte for byte; each writer is dequantized by
gguf-py, folded in float32 by the same kernel as every other output (``orthogonalize_``) and quantized
into the type ``--gguf-type`` names (``abliterate.prove.gguf_rules.writer_type``). A source whose head is
tied to its embedding gets ``output.weight``, the original embedding in its own type, so llama.cpp's head
stays the original while the embedding is edited. The ``abliterate.*`` keys name the base model, the
direction and the edit. The output is certified (``abliterate.prove.gguf_certificate``) before it is
moved into place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from abliterate.config import PublishingConfig
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.kernel import orthogonalize_, refuse_non_finite
from abliterate.errors import GateError
from abliterate.io.output import atomic_directory, prepare_output, write_apply_manifest
from abliterate.prove.certificate import Certificate
from abliterate.prove.gguf_rules import (
    EMBEDDING_TENSOR,
    OUTPUT_TENSOR,
    PREFIX,
    declared_metadata,
    field_bytes,
    logical_shape,
    stored_bytes,
    tensor_bytes,
)
from abliterate.ship.gguf_file import OutTensor, encode_field, write_gguf_file
from abliterate.ship.gguf_plan import GGUFPlan, GGUFWriter, plan_gguf
from abliterate.ship.report import apply_card


@dataclass(frozen=True)
class GGUFReport:
    """What a GGUF apply wrote.

    Attributes:
        path: the written ``.gguf`` file (inside the output directory once moved into place).
        tensors_total: tensors written (with an added ``output.weight``).
        tensors_edited: tensors folded.
        source_bytes: the source file's size.
        bytes_written: the output file's size.
        seconds: wall-clock time of the write (without the certificate).
        certificate: the GGUF certificate of the written file, or ``None`` when not asked for.
    """

    path: Path
    tensors_total: int
    tensors_edited: int
    source_bytes: int
    bytes_written: int
    seconds: float
    certificate: Certificate | None

    def manifest_entry(self) -> dict[str, object]:
        """The manifest's ``weights`` entry of a GGUF output."""
        return {
            "format": "gguf",
            "file": self.path.name,
            "bytes": self.bytes_written,
            "source_bytes": self.source_bytes,
            "tensors_edited": self.tensors_edited,
        }


def output_name(source: Path) -> str:
    """The output file's name: the source's stem, marked (its quantization label no longer holds for
    the edited writers)."""
    return f"{source.stem}-abliterated.gguf"


def _folded(plan: GGUFPlan, name: str, writer: GGUFWriter, declared: DeclaredEdit) -> np.ndarray:
    """One writer: dequantized, folded in float32 (the fold computes in float64, rounds once) and
    quantized into its output type."""
    from gguf.quants import dequantize, quantize

    tensor = plan.tensors()[name]
    weight = torch.from_numpy(
        np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    )
    refuse_non_finite(name, weight)
    scales = declared.scales(writer.group, writer.layer)
    orthogonalize_(
        weight, declared.direction, writer.layout, scales, declared.norm_preserving and not writer.bias
    )
    return np.ascontiguousarray(quantize(weight.numpy(), writer.qtype))


def _out_tensors(plan: GGUFPlan, declared: DeclaredEdit) -> list[OutTensor]:
    """Every tensor of the output, in the source's order, with ``output.weight`` after ``token_embd``."""
    out = []
    for name, tensor in plan.tensors().items():
        shape = logical_shape(tensor)
        writer = plan.writers.get(name)
        if writer is not None and writer.folded:
            size = stored_bytes(writer.qtype, shape)
            produce = lambda n=name, w=writer: _folded(plan, n, w, declared)  # noqa: E731
            out.append(OutTensor(name, shape, int(writer.qtype), size, produce))
        else:
            produce = lambda t=tensor: tensor_bytes(plan.reader, t)  # noqa: E731
            out.append(OutTensor(name, shape, int(tensor.tensor_type), int(tensor.n_bytes), produce))
        if name == EMBEDDING_TENSOR and plan.add_output:
            produce = lambda t=tensor: tensor_bytes(plan.reader, t)  # noqa: E731
            out.append(OutTensor(OUTPUT_TENSOR, shape, int(tensor.tensor_type), int(tensor.n_bytes), produce))
    return out


def write_gguf(
    plan: GGUFPlan, declared: DeclaredEdit, path: Path, base_model: str, progress: bool = True
) -> tuple[int, int]:
    """Write the edited GGUF to ``path``; ``(tensors written, tensors folded)``."""
    reader = plan.reader
    fields = [field_bytes(reader, key) for key in reader.fields if not key.startswith("GGUF.")]
    added = declared_metadata(declared, base_model, plan.gguf_type, OUTPUT_TENSOR if plan.add_output else "")
    fields += [encode_field(key, value) for key, value in added.items()]
    tensors = _out_tensors(plan, declared)
    version = int(reader.fields["GGUF.version"].contents())
    total = sum(tensor.nbytes for tensor in tensors)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # tiles this small gain nothing from intra-op threads (streaming.py)
        with tqdm(total=total, unit="B", unit_scale=True, desc="gguf", disable=not progress) as bar:
            write_gguf_file(path, version, fields, tensors, int(reader.alignment), bar.update)
    finally:
        torch.set_num_threads(threads)
    return len(tensors), sum(writer.folded for writer in plan.writers.values())


def gguf_into(
    source: Path,
    declared: DeclaredEdit,
    directory: Path,
    *,
    base_model: str,
    gguf_type: str = "q8_0",
    certify: bool = True,
    progress: bool = True,
) -> GGUFReport:
    """Write the edited GGUF of ``source`` into the empty ``directory`` and certify it.

    Args:
        source: the GGUF file.
        declared: the edit.
        directory: a staging directory the caller moves into place.
        base_model: the source as the user named it, recorded in ``abliterate.base_model``.
        gguf_type: the edited writers' type (``abliterate.prove.gguf_rules.GGUF_TYPES``).
        certify: run the GGUF certificate on the written file.
        progress: show progress bars.

    Raises:
        ValueError: the source does not fit the direction or cannot be written (``plan_gguf``).
        GateError: the written file fails the certificate.
    """
    started = time.perf_counter()
    declared = replace(declared, direction=declared.direction.detach().cpu())
    plan = plan_gguf(source, declared, gguf_type)
    path = directory / output_name(source)
    total, edited = write_gguf(plan, declared, path, base_model, progress)
    seconds = time.perf_counter() - started
    certificate = None
    if certify:
        # Looked up when called, so tests can replace the certificate.
        from abliterate.prove.gguf_certificate import certify_gguf

        certificate = certify_gguf(source, path, declared, progress=progress)
        if not certificate.passed:
            raise GateError(f"GGUF certificate failed: {certificate.reason}; nothing was written")
    size = source.stat().st_size
    return GGUFReport(path, total, edited, size, path.stat().st_size, seconds, certificate)


def apply_gguf(
    source: str | Path,
    declared: DeclaredEdit,
    publishing: PublishingConfig,
    *,
    certify: bool = True,
    progress: bool = True,
    direction_file: str | Path | None = None,
) -> GGUFReport:
    """``abliterate apply SOURCE.gguf --format gguf``: write ``output/<name>-abliterated.gguf``, its
    ``abliterate.json``, model card and the direction file, atomically, after the certificate passed.

    Args:
        source: the ``.gguf`` file.
        declared: the edit.
        publishing: ``output``, ``overwrite`` and ``gguf_type``.
        certify: run the GGUF certificate before the output is moved into place.
        progress: show progress bars.
        direction_file: the file ``declared`` was read from, copied in for ``verify OUTPUT``.

    Returns:
        The report, its ``path`` inside ``output``.
    """
    path = Path(source).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise ValueError(
            f"--format gguf folds into a .gguf file, and {source} is not one: convert the model with "
            "llama.cpp's convert_hf_to_gguf.py first"
        )
    target = prepare_output(publishing.output, source, publishing.overwrite)
    with atomic_directory(target) as staging:
        report = gguf_into(
            path, declared, staging, base_model=str(source), gguf_type=publishing.gguf_type, certify=certify,
            progress=progress,
        )  # fmt: skip
        card = apply_card(str(source), _architecture(report.path), report.certificate, False)
        (staging / "README.md").write_text(card + _gguf_card(report), "utf-8")
        write_apply_manifest(staging, str(source), "gguf", direction_file=direction_file)
    return replace(report, path=target.path / report.path.name)


def _architecture(path: Path) -> str:
    from gguf import GGUFReader

    return str(GGUFReader(str(path)).fields["general.architecture"].contents())


def _gguf_card(report: GGUFReport) -> str:
    """The GGUF part of the card: the file, its size against the source, how to check it."""
    return (
        f"\n## GGUF\n\n`{report.path.name}`: {report.bytes_written / 1e6:.0f} MB "
        f"(source {report.source_bytes / 1e6:.0f} MB). The residual writers are re-quantized; every other "
        f"tensor and metadata key is the source's, byte for byte, plus `{PREFIX}*` keys naming the edit.\n\n"
        "Check it: `abliterate verify THIS_DIRECTORY` (reads abliterate.json and direction.safetensors).\n"
    )


def gguf_lines(report: GGUFReport) -> list[str]:
    """What ``apply --format gguf`` prints: the file, the size against the source, the certificate."""
    from abliterate.ship.report import gate_lines

    ratio = report.bytes_written / report.source_bytes
    lines = [
        f"edited {report.tensors_edited} of {report.tensors_total} tensors in {report.seconds:.1f}s; "
        f"saved {report.path} ({report.bytes_written / 1e6:.0f} MB, {ratio:.2f}x the source's "
        f"{report.source_bytes / 1e6:.0f} MB)"
    ]
    if report.certificate is not None:
        lines += gate_lines({"passed": True, "certificate": report.certificate.to_dict()})[1:]
    return lines
