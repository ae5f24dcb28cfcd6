"""Logit parity of a PEFT LoRA adapter: the gate's candidate is the original with the adapter loaded
through peft (``PeftModel.from_pretrained``), judged by the same runner as an edited checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from abliterate.adapters.spec import Adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.model.batching import EncodedPrompts, all_position_logits
from abliterate.prove.gate import Candidate, candidate_parity, gate_reference
from abliterate.prove.parity import ParityReport


def load_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """``PeftModel.from_pretrained(model, directory)`` in eval mode (the parity gate's edited model)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory)).eval()


def peft_candidate(model: nn.Module, directory: str | Path) -> Candidate:
    """The gate's candidate for the adapter in ``directory`` on ``model``.

    The adapter is loaded onto ``model`` itself for each forward pass and unloaded afterwards, so the
    original weights are never copied, and the rounding floor's siblings dither the base weights under
    it. Unlike a checkpoint's, its 16-bit parity stays gating for MoE families too (``may_advise``): no
    weight certificate stands behind an adapter the parity check alone judges.
    """

    def logits(base: nn.Module, prompts: EncodedPrompts) -> torch.Tensor:
        wrapped = load_lora(base, directory)
        try:
            return all_position_logits(wrapped, prompts)
        finally:
            wrapped.unload()

    return Candidate(model, logits, may_advise=False)


def peft_parity(
    model: nn.Module,
    adapter: Adapter,
    declared: DeclaredEdit,
    directory: str | Path,
    prompts: EncodedPrompts,
    dtype: str,
) -> ParityReport:
    """Logit parity of ``PeftModel.from_pretrained(model, directory)`` against the hooked original
    (``abliterate.prove.gate``, without the completeness check): in float32 the gate's fixed tolerances,
    in 16-bit the model's own rounding floor, measured as for a checkpoint.

    Returns:
        The ``ParityReport``.
    """
    reference = gate_reference(model, adapter, prompts, declared, dtype, completeness=False)
    return candidate_parity(reference, adapter, peft_candidate(model, directory))
