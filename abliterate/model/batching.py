"""Chat formatting, end-of-instruction tokens, and batched forward passes that share the common prefix.

Every chat-templated prompt starts with the same tokens (BOS, a default system prompt, the user
header). We run that prefix once per hook configuration and reuse its key/value cache for every
batch, so forward passes only pay for the tokens that differ. The shortcut is exact for the families
we support (tests/test_select.py compares it with one plain forward per prompt); nothing checks it at
run time, and nothing depends on it for the parity gate, whose forward passes never share a prefix.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from abliterate.adapters.spec import Adapter
from abliterate.model.chat import ChatFormat
from abliterate.model.dispatch import input_device
from abliterate.model.hooks import StopForward, ablated, add_to_block_input, projection

# Builds the hook context for one forward pass: (rows in the pass, whether it is the shared prefix).
HookFactory = Callable[[int, bool], AbstractContextManager]


def format_chat(tokenizer: object, prompts: list[str], *, chat: ChatFormat | None = None) -> list[str]:
    """Wrap each prompt in the model's chat template with the generation prompt appended.

    ``chat``: the system prompt, template kwargs and thinking block (default: the bare template).
    """
    chat = chat or ChatFormat()
    return [chat.render(tokenizer, prompt) for prompt in prompts]


def _token_ids(tokenizer: object, texts: list[str]) -> list[list[int]]:
    # Chat templates write their own special tokens (BOS included), so none are added here.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def eoi_length(tokenizer: object, *, chat: ChatFormat | None = None) -> int:
    """Number of end-of-instruction tokens: the template tokens that follow every instruction.

    Derived from the template itself, as the longest token suffix shared by chats with different
    instructions (their last characters differ, so the instruction's own tokens never match).
    """
    probes = ["Name a colour.", "What is 2 + 2?", "Say hi!", "Tell me about cats", "ok"]
    sequences = _token_ids(tokenizer, format_chat(tokenizer, probes, chat=chat))
    length = 0
    while all(len(ids) > length for ids in sequences) and len({ids[-1 - length] for ids in sequences}) == 1:
        length += 1
    if length == 0:
        raise ValueError("the chat template adds no tokens after the instruction; cannot find EOI tokens")
    return length


@dataclass
class EncodedPrompts:
    """Prompts tokenized for batched forward passes.

    Attributes:
        prefix: ``[1, P]`` token ids shared by every prompt (``P`` may be 0).
        batches: ``(input_ids, attention_mask)`` pairs ``[B, S]`` of the remaining tokens, left padded.
        count: number of prompts.
        order: prompt index of each batched row (prompts are grouped by length to save padding).
    """

    prefix: torch.Tensor
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    count: int
    order: list[int]


def encode(
    tokenizer: object,
    prompts: list[str],
    *,
    batch_size: int,
    share_prefix: bool = True,
    keep_last: int = 1,
    sort_by_length: bool = True,
    chat: ChatFormat | None = None,
) -> EncodedPrompts:
    """Tokenize chat-formatted prompts into left-padded batches after their common prefix.

    Args:
        tokenizer: the model's tokenizer.
        prompts: raw instructions.
        batch_size: prompts per batch.
        share_prefix: split off the common token prefix (``False``: ``prefix`` is empty).
        keep_last: tokens every prompt keeps after the prefix (at least the EOI tokens).
        sort_by_length: batch prompts of similar length together (rows then follow ``order``).
        chat: the chat format (default: the bare template).
    """
    sequences = _token_ids(tokenizer, format_chat(tokenizer, prompts, chat=chat))
    order = list(range(len(sequences)))
    if sort_by_length:
        order.sort(key=lambda index: len(sequences[index]))
        sequences = [sequences[index] for index in order]
    shared = 0
    if share_prefix:
        shortest = min(len(ids) for ids in sequences) - keep_last
        while shared < shortest and len({ids[shared] for ids in sequences}) == 1:
            shared += 1
    prefix = torch.tensor([sequences[0][:shared]], dtype=torch.long)
    pad_id = tokenizer.pad_token_id
    batches = []
    for start in range(0, len(sequences), batch_size):
        rows = [ids[shared:] for ids in sequences[start : start + batch_size]]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, width - len(row) :] = torch.tensor(row)
            attention_mask[index, width - len(row) :] = 1
        batches.append((input_ids, attention_mask))
    return EncodedPrompts(prefix, batches, len(sequences), order)


def _cache_keyword(model: nn.Module) -> str:
    # transformers renamed ``past_key_values`` to ``cache`` during the 5.x series.
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _prefix_cache(model: nn.Module, prefix: torch.Tensor, copies: int, hooks: HookFactory) -> object:
    from transformers import DynamicCache

    device = input_device(model)
    # Our own cache object fills block by block, so it stays usable when a hook ends the pass early.
    cache = DynamicCache(config=model.config)
    with hooks(copies, True):
        try:
            model(
                input_ids=prefix.to(device).expand(copies, -1),
                use_cache=True,
                **{_cache_keyword(model): cache},
                logits_to_keep=1,
            )
        except StopForward:
            pass
    return cache


def _no_hooks(rows: int, prefix: bool) -> AbstractContextManager:
    return nullcontext()


@torch.no_grad()
def forward_batches(
    model: nn.Module,
    encoded: EncodedPrompts,
    *,
    hooks: HookFactory = _no_hooks,
    copies: int = 1,
    logits: bool = True,
    all_positions: bool = False,
) -> Iterator[torch.Tensor | None]:
    """Run every batch (tiled ``copies`` times, copy-major) and yield its logits.

    Args:
        model: the causal LM.
        encoded: the prompts.
        hooks: builds the hook context for each pass from its row count and whether it is the
            prefix pass (``copies`` rows) or a batch (``copies × batch`` rows, copy-major), so
            per-row hooks line up. A ``StopForward`` raised by a hook ends that pass quietly.
        copies: how many times each batch is repeated (one copy per candidate direction).
        logits: compute logits (``False`` for recording activations only).
        all_positions: logits for every suffix position instead of the last one only.

    Yields:
        ``[copies × B, vocab]`` last-position logits (``[copies × B, S, vocab]`` with
        ``all_positions``), or ``None`` when ``logits`` is off.
    """
    device = input_device(model)
    prefix_length = encoded.prefix.shape[1]
    cache = _prefix_cache(model, encoded.prefix, copies, hooks) if prefix_length else None
    for input_ids, attention_mask in encoded.batches:
        batch = input_ids.shape[0]
        input_ids = input_ids.repeat(copies, 1).to(device)
        attention_mask = attention_mask.repeat(copies, 1).to(device)
        # Positions count real tokens only, so left padding does not shift them.
        position_ids = (prefix_length + attention_mask.cumsum(-1) - 1).clamp(min=prefix_length)
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(batch)
            prefix_mask = attention_mask.new_ones((attention_mask.shape[0], prefix_length))
            attention_mask = torch.cat([prefix_mask, attention_mask], dim=-1)
        with hooks(copies * batch, False):
            try:
                output = model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=past is not None,
                    **{_cache_keyword(model): past},
                    logits_to_keep=0 if all_positions else 1,
                )
            except StopForward:
                output = None
        if not logits or output is None:
            yield None
        else:
            yield output.logits if all_positions else output.logits[:, -1]


def all_position_logits(model: nn.Module, encoded: EncodedPrompts) -> torch.Tensor:
    """Float32 CPU logits ``[n, S, vocab]`` for every position of every batch (one batch: one width)."""
    return torch.cat([logits.float().cpu() for logits in forward_batches(model, encoded, all_positions=True)])


def last_logits(
    model: nn.Module,
    adapter: Adapter,
    encoded: EncodedPrompts,
    *,
    ablate: torch.Tensor | None = None,
    steer: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Last-position logits for every prompt, under optional ablation of one or several directions.

    Args:
        model: the causal LM.
        adapter: its architecture description.
        encoded: the prompts.
        ablate: ``[n_dirs, d_model]`` unit directions; each prompt is run once per direction.
        steer: ``(vector, layer)`` added to the input of block ``layer``.

    Returns:
        ``[n_dirs, n_prompts, vocab]`` float32 logits on the CPU (``n_dirs = 1`` without ``ablate``).
    """
    copies = 1 if ablate is None else ablate.shape[0]

    @contextmanager
    def hooks(rows: int, prefix: bool) -> Iterator[None]:
        if ablate is not None:
            per_row = ablate.repeat_interleave(rows // copies, dim=0)
            context = ablated(model, adapter, projection(per_row))
        elif steer is not None:
            context = add_to_block_input(model, adapter, steer[0], steer[1])
        else:
            context = nullcontext()
        with context:
            yield

    return copied_last_logits(model, encoded, hooks, copies)


def copied_last_logits(
    model: nn.Module, encoded: EncodedPrompts, hooks: HookFactory, copies: int
) -> torch.Tensor:
    """Last-position logits ``[copies, n_prompts, vocab]`` (float32, CPU) of every prompt run ``copies``
    times per forward pass, each copy under its own share of ``hooks``' rows."""
    chunks = [logits.float().cpu() for logits in forward_batches(model, encoded, hooks=hooks, copies=copies)]
    sizes = [batch[0].shape[0] for batch in encoded.batches]
    per_copy = [chunk.view(copies, size, -1) for chunk, size in zip(chunks, sizes, strict=True)]
    return torch.cat(per_copy, dim=1)


def auto_batch_size(
    model: nn.Module, tokenizer: object, prompts: list[str], *, start: int = 8, limit: int = 256
) -> int:
    """The largest batch (doubling from ``start`` up to ``limit``) whose forward pass fits in memory.

    Only accelerators run out of memory in a way we can catch; on the CPU, where memory is shared with
    the system, this returns ``start × 8`` (64): greedy generation of the demo on 2 cores costs 0.78 per
    reply at 64 rows of what it costs at 32, and 1.4× at 16 (BENCHMARKS §12c).

    Args:
        model: the causal LM.
        tokenizer: its tokenizer.
        prompts: the longest prompts of the run are tried, so every later batch fits too.
        start: first batch size tried.
        limit: largest batch size tried.
    """
    device = input_device(model)
    if device.type != "cuda":
        return start * 8
    longest = sorted(prompts, key=len, reverse=True)
    best = 0
    size = start
    while size <= limit:
        rows = (longest * (size // max(len(longest), 1) + 1))[:size]
        encoded = encode(tokenizer, rows, batch_size=size, share_prefix=False)
        try:
            for _ in forward_batches(model, encoded, all_positions=False):
                pass
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        best = size
        size *= 2
    if best == 0:
        raise ValueError(f"even a batch of {start} prompts does not fit in GPU memory; pass --batch-size")
    # Generation and the parity pass keep more activations alive: leave headroom.
    return max(1, best // 2)


@torch.no_grad()
def greedy_generate(
    model: nn.Module, encoded: Mapping[str, torch.Tensor], *, max_new_tokens: int, pad_token_id: int | None
) -> torch.Tensor:
    """Greedy generation for a batch of left-padded, tokenized prompts (the tokenizer's output on the
    model's input device): prompt and new tokens, one row per prompt.

    Each new token attends to cached keys and values instead of re-running the whole prefix.
    """
    return model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        use_cache=True,
        pad_token_id=pad_token_id,
    )
