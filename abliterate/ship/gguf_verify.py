"""``abliterate verify`` of a GGUF output, and where a GGUF source or output is found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from abliterate.edit.declared import DeclaredEdit
from abliterate.io.output import MANIFEST_NAME
from abliterate.prove.gate import GateReport


def gguf_source_path(model: str) -> Path:
    """The GGUF file a ``--format gguf`` output is written from: a ``.gguf`` file, or the demo's.

    Raises:
        ValueError: ``model`` is no GGUF file; the line names the commands that make one.
    """
    if model == "demo":
        from abliterate.model.demo import assemble_gguf

        return assemble_gguf()
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise ValueError(
        f"--format gguf writes from a GGUF source and {model} is not a .gguf file: convert it with "
        "llama.cpp (python convert_hf_to_gguf.py MODEL_DIR --outfile MODEL.gguf), then "
        "`abliterate apply MODEL.gguf "
        "--direction OUT/direction.safetensors --format gguf --output DIR` with this run's direction "
        "(run --direction-only --output OUT finds it)"
    )


def find_gguf_output(edited: str) -> Path | None:
    """The ``.gguf`` file of a GGUF output: ``edited`` itself, or the one ``.gguf`` in the directory
    ``edited`` whose ``abliterate.json`` says ``format: gguf``; ``None`` for anything else.

    Raises:
        ValueError: such a directory holds no ``.gguf`` file, or several.
    """
    path = Path(edited).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        content = json.loads(manifest.read_text("utf-8"))
    except ValueError:
        return None
    weights = content.get("weights") if isinstance(content, dict) else None
    formats = (content.get("format"), weights.get("format") if isinstance(weights, dict) else None)
    if "gguf" not in formats:
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) != 1:
        raise ValueError(f"{edited} is a GGUF output with {len(files)} .gguf files: give the file itself")
    return files[0]


def verify_gguf(
    original: str,
    edited: Path,
    declared: DeclaredEdit,
    metadata: dict[str, str],
    *,
    architecture: str | None = None,
    certificate: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Certify a GGUF output against its GGUF source (``abliterate.prove.gguf_certificate``).

    The certificate is the whole proof: every writer bitwise equal to the recomputed quantized fold,
    every other tensor and key bitwise the source's. No forward check runs (the re-quantized writers
    make the logits differ from the hooked original by the quantization error, which a bitwise proof
    of the weights does not need).

    Returns:
        The gate report as a plain dictionary, as ``verify_checkpoints`` returns it.
    """
    from abliterate.prove.gguf_certificate import certify_gguf

    source = gguf_source_path(original)
    gate = GateReport()
    why = "GGUF output: the GGUF certificate proves every tensor and metadata key bitwise"
    gate.skipped.update(completeness=why, parity=why, files="GGUF output: its metadata is in the certificate")
    if certificate:
        gate.certificate = certify_gguf(
            source, edited, declared, architecture=architecture, progress=progress
        )
    else:
        gate.skipped["certificate"] = "not asked for (--no-certificate)"
    return {
        "original": str(source),
        "edited": str(edited),
        "direction_layer": metadata.get("layer"),
        "direction_position": metadata.get("position"),
        **gate.to_dict(),
    }
