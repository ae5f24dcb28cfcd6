"""What a model dequantized from GGUF must forget before it can be saved as a plain checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def drop_gguf_quantization(model: nn.Module) -> None:
    """Dequantized GGUF weights are plain tensors: forget the quantizer so the model saves cleanly.

    ``save_pretrained`` refuses a GGUF-loaded model while ``hf_quantizer`` is set, even after the
    config's ``quantization_config`` is deleted, so both go (see DESIGN.md, measured facts).
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
