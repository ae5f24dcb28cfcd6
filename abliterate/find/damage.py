"""Damage beyond the first token: the edited model's KL to the original over the original's own replies.

First-token KL sees only the distribution of a reply's first token; an edit can leave it alone and still
derail what follows (loops, a changed topic, lost reasoning). Here the original model writes greedy replies
to harmless prompts once (``record_reference``); the edited model then reads the same tokens (teacher
forcing) and at every reply token we measure ``KL(original ‖ edited)`` of the next-token distributions,
averaged over the reply's tokens per prompt and then over prompts (``multi_token_kl``).

Two ways to get the edited model's distributions:

* ``ablation``: a context manager factory whose body runs the edit as hooks on the *same* loaded model
  (hooks are proven equal to the fold). Each batch is run twice, without and with the hooks, so the
  original's full distributions are never stored and no second copy of the model is loaded. Exact.
* no ``ablation``: ``model`` is the edited model itself (a separate checkpoint), and the original's
  distributions come from ``reference``, recorded with ``keep_top`` > 0: the original's ``keep_top`` most
  likely tokens at each position plus one bucket for the rest. The KL of these coarsened distributions is
  a lower bound on the exact KL (merging outcomes never increases a KL divergence), and it is exact when
  the kept tokens cover the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from abliterate.model.batching import format_chat, greedy_generate
from abliterate.model.chat import ChatFormat
from abliterate.model.dispatch import input_device

Ablation = Callable[[], AbstractContextManager]

# A teacher-forced pass holds rows × reply positions × vocabulary float32 values several times over
# (logits, log-softmax, the other side's): with a 152k vocabulary, 32 rows of 64 tokens are 1.2 GB each.
# Passes are cut so that one such tensor stays under this many bytes; the values do not change.
LOGITS_BYTES = 256 << 20


@dataclass(frozen=True)
class ReferenceBatch:
    """One batch of the original's replies, ready to be read again.

    Attributes:
        input_ids: ``[batch, length]`` prompt and reply tokens, left padded.
        attention_mask: ``[batch, length]`` 1 on real tokens.
        scored: ``[batch, length]`` bool, true at positions whose next-token distribution predicts a reply
            token (the last prompt token up to the token before the reply's last one).
        prompt_length: the padded prompt's length (scored positions start at ``prompt_length - 1``).
        top_ids: ``[m, k]`` the original's ``k`` most likely tokens at the ``m`` scored positions (row-major
            order of ``scored``), or ``None`` when not kept.
        top_log_probs: ``[m, k]`` their log-probabilities (float32), or ``None``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    scored: torch.Tensor
    prompt_length: int
    top_ids: torch.Tensor | None = None
    top_log_probs: torch.Tensor | None = None


@dataclass(frozen=True)
class DamageReference:
    """The original model's greedy replies to a prompt set.

    Attributes:
        batches: the replies as token batches, in prompt order.
        replies: the decoded replies, in prompt order.
        max_new_tokens: the generation length.
    """

    batches: list[ReferenceBatch]
    replies: list[str]
    max_new_tokens: int

    @property
    def n_tokens(self) -> int:
        """Reply tokens scored over all prompts."""
        return int(sum(batch.scored.sum() for batch in self.batches))


@dataclass(frozen=True)
class KLSummary:
    """Teacher-forced KL(original ‖ edited) over the original's replies.

    Attributes:
        mean: the mean over prompts of each prompt's mean per-token KL (nats).
        per_prompt: each prompt's mean per-token KL, in prompt order.
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
    keep_top: int = 0,
    progress: bool = False,
) -> DamageReference:
    """The original model's greedy replies to ``prompts``, kept as tokens for ``multi_token_kl``.

    Args:
        model: the original (unedited) causal LM.
        tokenizer: its tokenizer (left padding).
        prompts: raw instructions, usually harmless ones.
        max_new_tokens: reply length (a reply that ends early is scored up to its end-of-sequence token).
        batch_size: prompts per generation batch (and per teacher-forced pass later).
        chat: the chat format (default: the bare template).
        keep_top: keep the original's ``keep_top`` most likely tokens per reply position, so a separately
            loaded edited model can be compared without ``ablation`` (0: keep none).
        progress: show a progress bar.

    Returns:
        The reference replies.

    Raises:
        ValueError: no prompts, or a size below 1.
    """
    if not prompts or max_new_tokens < 1 or batch_size < 1 or keep_top < 0:
        raise ValueError(
            "record_reference needs prompts, max_new_tokens >= 1, batch_size >= 1, keep_top >= 0"
        )
    texts = format_chat(tokenizer, prompts, chat=chat)
    batches, replies = [], []
    for start in tqdm(range(0, len(texts), batch_size), desc="reference", unit="batch", disable=not progress):
        batch, decoded = _reference_batch(model, tokenizer, texts[start : start + batch_size], max_new_tokens)
        if keep_top:
            tops = [
                _top(_log_probs(model, piece), keep_top)
                for piece in _split(batch, _rows_per_pass(model, batch))
            ]
            top_ids, top_log_probs = (torch.cat(parts) for parts in zip(*tops, strict=True))
            batch = replace(batch, top_ids=top_ids, top_log_probs=top_log_probs)
        batches.append(batch)
        replies += decoded
    return DamageReference(batches, replies, max_new_tokens)


def _reference_batch(
    model: nn.Module, tokenizer: object, texts: list[str], max_new_tokens: int
) -> tuple[ReferenceBatch, list[str]]:
    """Greedy replies to one batch of chat-formatted ``texts``, as tokens and as decoded text."""
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(
        input_device(model)
    )
    output = greedy_generate(
        model, encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
    )
    prompt_length = encoded["input_ids"].shape[1]
    new_tokens = output[:, prompt_length:].cpu()
    reply_mask = _reply_mask(new_tokens, _stop_ids(model, tokenizer))
    attention_mask = torch.cat([encoded["attention_mask"].cpu(), reply_mask.long()], dim=1)
    scored = torch.zeros_like(attention_mask, dtype=torch.bool)
    scored[:, prompt_length - 1 : -1] = reply_mask  # position t predicts token t + 1
    decoded = [
        tokenizer.decode(tokens[mask], skip_special_tokens=True)
        for tokens, mask in zip(new_tokens, reply_mask, strict=True)
    ]
    return ReferenceBatch(output.cpu(), attention_mask, scored, prompt_length), decoded


def _stop_ids(model: nn.Module, tokenizer: object) -> set[int]:
    """The token ids that end a reply (the generation config's, else the tokenizer's end of sequence)."""
    stop = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if stop is None:
        stop = tokenizer.eos_token_id
    return set(stop if isinstance(stop, list) else [stop]) - {None}


def _reply_mask(new_tokens: torch.Tensor, stop_ids: set[int]) -> torch.Tensor:
    """``[batch, new]`` bool: the reply's tokens up to and including its first end-of-sequence token
    (``generate`` pads a finished row with the pad token, which may equal the end-of-sequence token)."""
    stops = torch.zeros_like(new_tokens, dtype=torch.bool)
    for stop in stop_ids:
        stops |= new_tokens == stop
    # A token is in the reply when no stop token comes strictly before it.
    before = torch.cumsum(stops.long(), dim=1) - stops.long()
    return before == 0


def _log_probs(model: nn.Module, batch: ReferenceBatch) -> torch.Tensor:
    """``[m, vocab]`` float32 log-probabilities at ``batch``'s scored positions (one forward pass)."""
    device = input_device(model)
    attention_mask = batch.attention_mask.to(device)
    # Positions count real tokens only, as in generation, so left padding does not shift them.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # Only the reply's positions need logits: [batch, kept, vocab] instead of the whole sequence's.
    kept = batch.input_ids.shape[1] - batch.prompt_length + 1
    logits = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=kept,
    ).logits
    scored = batch.scored[:, batch.prompt_length - 1 :].to(logits.device)
    return torch.log_softmax(logits[scored].float(), dim=-1).cpu()


def _top(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely token ids per row and their log-probabilities."""
    values, ids = torch.topk(log_probs, min(k, log_probs.shape[-1]), dim=-1)
    return ids, values


def _kl_rows(original: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """``[m]`` KL(original ‖ edited) of rows of log-probabilities."""
    return (original.exp() * (original - edited)).sum(-1).clamp(min=0.0)


def _coarse_kl_rows(top_ids: torch.Tensor, top_log_probs: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """``[m]`` KL between the original and ``edited`` coarsened to the original's kept tokens plus one
    bucket for all other tokens (a lower bound on the full KL)."""
    edited_top = edited.gather(-1, top_ids)
    rest_original = torch.log1p(-top_log_probs.exp().sum(-1).clamp(max=1.0 - 1e-7))
    rest_edited = torch.log1p(-edited_top.exp().sum(-1).clamp(max=1.0 - 1e-7))
    kept = (top_log_probs.exp() * (top_log_probs - edited_top)).sum(-1)
    # The bucket's term, dropped when the kept tokens already hold (numerically) all of the mass.
    mass = rest_original.exp()
    bucket = torch.where(mass > 1e-6, mass * (rest_original - rest_edited), torch.zeros_like(mass))
    return (kept + bucket).clamp(min=0.0)


@torch.no_grad()
def multi_token_kl(
    model: nn.Module,
    reference: DamageReference,
    ablation: Ablation | None = None,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> KLSummary:
    """Teacher-forced KL(original ‖ edited) per reply token, averaged per prompt, then over prompts.

    Args:
        model: with ``ablation``, the original model (the one that recorded ``reference``); without, the
            edited model.
        reference: the original's replies (``record_reference``).
        ablation: a factory of the context manager that puts the edit on ``model`` as hooks; ``None``
            compares ``model`` as it is against the top tokens stored in ``reference``.
        batch_size: prompts per teacher-forced pass (each holds ``batch × reply length × vocab`` logits).
        progress: show a progress bar.

    Returns:
        The mean over prompts, each prompt's value, and the counts.

    Raises:
        ValueError: no ``ablation`` and ``reference`` was recorded without ``keep_top``, or ``batch_size``
            is below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    per_prompt: list[float] = []
    chunks = [
        piece
        for batch in reference.batches
        for piece in _split(batch, min(batch_size, _rows_per_pass(model, batch)))
    ]
    for batch in tqdm(chunks, desc="multi-token KL", unit="batch", disable=not progress):
        rows = _batch_kl(model, batch, ablation)
        # Each scored position belongs to one prompt (its row); average the positions per row.
        owners = batch.scored.nonzero()[:, 0]
        sums = torch.zeros(batch.scored.shape[0], dtype=torch.float64).index_add_(0, owners, rows.double())
        counts = batch.scored.sum(-1).clamp(min=1)
        per_prompt += (sums / counts).tolist()
    mean = sum(per_prompt) / len(per_prompt) if per_prompt else float("nan")
    return KLSummary(mean, per_prompt, len(per_prompt), reference.n_tokens)


def _rows_per_pass(model: nn.Module, batch: ReferenceBatch) -> int:
    """Rows of ``batch`` whose reply-position logits fit in ``LOGITS_BYTES`` (at least one)."""
    output = model.get_output_embeddings()
    vocab = output.weight.shape[0] if output is not None else model.config.vocab_size
    positions = batch.input_ids.shape[1] - batch.prompt_length + 1
    return max(1, LOGITS_BYTES // (positions * vocab * 4))


def _split(batch: ReferenceBatch, size: int) -> list[ReferenceBatch]:
    """``batch`` in pieces of at most ``size`` rows (the stored top tokens split with their rows)."""
    pieces = []
    per_row = batch.scored.sum(-1).tolist()
    for start in range(0, batch.input_ids.shape[0], size):
        stop = min(start + size, batch.input_ids.shape[0])
        first, last = sum(per_row[:start]), sum(per_row[:stop])
        pieces.append(
            ReferenceBatch(
                batch.input_ids[start:stop],
                batch.attention_mask[start:stop],
                batch.scored[start:stop],
                batch.prompt_length,
                None if batch.top_ids is None else batch.top_ids[first:last],
                None if batch.top_log_probs is None else batch.top_log_probs[first:last],
            )
        )
    return pieces


def _batch_kl(model: nn.Module, batch: ReferenceBatch, ablation: Ablation | None) -> torch.Tensor:
    """``[m]`` per-position KL(original ‖ edited) of one batch."""
    if ablation is not None:
        original = _log_probs(model, batch)
        with ablation():
            edited = _log_probs(model, batch)
        return _kl_rows(original, edited)
    if batch.top_ids is None or batch.top_log_probs is None:
        raise ValueError(
            "without an ablation the reference must keep the original's top tokens: "
            "record_reference(..., keep_top=K)"
        )
    return _coarse_kl_rows(batch.top_ids, batch.top_log_probs, _log_probs(model, batch))


def identity_ablation() -> AbstractContextManager:
    """The ablation that changes nothing (``multi_token_kl``'s negative control)."""
    return nullcontext()
