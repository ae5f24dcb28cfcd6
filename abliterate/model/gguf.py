"""What a model dequantized from GGUF must forget before it can be saved as a plain checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def drop_gguf_quantization(model: nn.Module) -> None:
    """Dequantized GGUF weights are plain tensors: forget the quantizer so the model saves cleanly.

    ``save_pretrained`` refuses a GGUF-loaded model while ``hf_quantizer`` is set, even after the
    config's ``quantization_config`` is deleted, so both go.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


# The dtype a GGUF run saves for each ``--dtype``: bf16 unless asked otherwise (float32 is twice the size
# and the quantized source never had float32 precision to keep).
_GGUF_OUTPUT = {"auto": "bfloat16", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def gguf_output_dtype(dtype: str) -> str:
    """The dtype a run on a GGUF file saves for ``--dtype`` (``auto`` → bfloat16).

    Such a run loads the dequantized weights in float32, computes the fold from them and casts once, at
    the end: one rounding instead of two (to 16 bits on load, then again after the fold).
    """
    if dtype not in _GGUF_OUTPUT:
        raise ValueError(f"--dtype {dtype!r}: choose {', '.join(_GGUF_OUTPUT)}")
    return _GGUF_OUTPUT[dtype]
