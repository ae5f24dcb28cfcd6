"""Damage beyond the first token: the KL of an edited model to the original over the original's own greedy
replies, teacher-forced (stand-in until the shared evaluation's module lands: the same names and
signatures, so a merge takes that module's bodies).

This stand-in keeps the reference's token ids only and recomputes the original's distributions with
``model`` un-hooked at each call, so it measures an edit given as ``ablation`` (hooks on the original).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from abliterate.model.batching import format_chat
from abliterate.model.chat import ChatFormat
from abliterate.model.dispatch import input_device


@dataclass(frozen=True)
class DamageReference:
    """The original model's greedy replies to some prompts, as token ids.

    Attributes:
        sequences: per prompt, the chat-formatted prompt's ids followed by the reply's ids.
        prompt_lengths: per prompt, how many of those ids are the prompt.
    """

    sequences: list[torch.Tensor]
    prompt_lengths: list[int]


@dataclass(frozen=True)
class KLSummary:
    """Teacher-forced KL(original ‖ edited) over the reference replies.

    Attributes:
        mean: mean over prompts of each prompt's mean KL per reply token.
        per_prompt: that per-prompt mean.
        n_prompts: prompts measured.
        n_tokens: reply tokens measured in all.
    """

    mean: float
    per_prompt: list[float]
    n_prompts: int
    n_tokens: int


@torch.no_grad()
def record_reference(
    model: nn.Module,
    tokenizer: object,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    chat: ChatFormat | None = None,
) -> DamageReference:
    """Greedy replies of ``model`` (the original) to ``prompts``, each cut after its end-of-sequence token."""
    device = input_device(model)
    texts = format_chat(tokenizer, prompts, chat=chat)
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    sequences, lengths = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt"
        ).to(device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        width = batch["input_ids"].shape[1]
        for row, mask in zip(output.cpu(), batch["attention_mask"].cpu(), strict=True):
            prompt = row[:width][mask.bool()]
            reply = row[width:].tolist()
            ends = [index for index, token in enumerate(reply) if token in stop]
            reply = reply[: ends[0] + 1] if ends else reply
            sequences.append(torch.cat([prompt, torch.tensor(reply, dtype=prompt.dtype)]))
            lengths.append(len(prompt))
    return DamageReference(sequences, lengths)


@torch.no_grad()
def multi_token_kl(
    model: nn.Module,
    reference: DamageReference,
    ablation: Callable[[], AbstractContextManager] | None = None,
    *,
    batch_size: int = 16,
) -> KLSummary:
    """KL(original ‖ edited) per reply token, teacher-forced over ``reference``'s replies.

    Args:
        model: the original model.
        reference: its greedy replies (``record_reference``).
        ablation: returns the hooks context of the edit; ``None`` measures the model against itself.
        batch_size: sequences per forward pass.
    """
    device = input_device(model)
    per_prompt: list[float] = []
    n_tokens = 0
    for start in range(0, len(reference.sequences), batch_size):
        sequences = reference.sequences[start : start + batch_size]
        lengths = reference.prompt_lengths[start : start + batch_size]
        # Right padding: causal attention keeps every real token's logits independent of the pads.
        width = max(len(sequence) for sequence in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        ids, mask = ids.to(device), mask.to(device)
        original = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
        with (ablation or nullcontext)():
            edited = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
        for row, (sequence, prompt_length) in enumerate(zip(sequences, lengths, strict=True)):
            # Position t predicts token t + 1: the reply's tokens are predicted from prompt_length − 1 on.
            span = slice(prompt_length - 1, len(sequence) - 1)
            log_p = torch.log_softmax(original[row, span].double(), dim=-1)
            log_q = torch.log_softmax(edited[row, span].double(), dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            per_prompt.append(kl.mean().item() if kl.numel() else 0.0)
            n_tokens += kl.numel()
    mean = sum(per_prompt) / len(per_prompt) if per_prompt else 0.0
    return KLSummary(mean, per_prompt, len(per_prompt), n_tokens)
