"""Chat formatting, including templates with a thinking block (Qwen3, DeepSeek-R1, gpt-oss channels).

Reasoning models answer after a thinking block. Two consequences for the method:

* Selection scores the model's *first* generated token; after an open thinking block that token is
  thinking, not an answer, and a refusal score on it means nothing. Extraction, selection, parity and the
  first-token KL therefore run on prompts whose thinking block is already closed (empty), and the EOI
  tokens are derived from that same rendering, so they include the closed block.
* The evaluation generates with the template as the user runs the model (block open unless
  ``--chat-template-kwargs`` closes it), far enough to get past the block, and judges refusals inside the
  block and in the answer separately.

Thinking formats are data: a marker that reveals the format in the template source, the texts that open
and close the block, and what closes it right after the generation prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ThinkingFormat:
    """How one family of chat templates writes its thinking block.

    Attributes:
        name: short name for reports.
        marker: text whose presence in the template source reveals the format.
        open: text that opens the block.
        close: text that ends it (the answer follows).
        skip: text appended to the generation prompt to give an empty, closed block.
    """

    name: str
    marker: str
    open: str
    close: str
    skip: str


THINKING_FORMATS = (
    # Qwen3 (``enable_thinking``), DeepSeek-R1 and its distills, QwQ, Phi-4-reasoning, SmolLM3, …
    ThinkingFormat("think", "<think>", "<think>", "</think>", "<think>\n\n</think>\n\n"),
    # gpt-oss (harmony): the analysis channel is the thinking, the final channel the answer.
    ThinkingFormat(
        "harmony",
        "<|channel|>",
        "<|channel|>analysis<|message|>",
        "<|end|>",
        "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>",
    ),
)


def parse_template_kwargs(text: str | None) -> dict[str, Any]:
    """``--chat-template-kwargs`` as a dict (``None`` → ``{}``).

    Raises:
        ValueError: the text is not a JSON object.
    """
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--chat-template-kwargs {text!r} is not valid JSON ({error.msg})") from error
    if not isinstance(value, dict):
        raise ValueError(
            f"--chat-template-kwargs {text!r}: give a JSON object, e.g. '{{\"enable_thinking\": false}}'"
        )
    return value


def detect_thinking(tokenizer: object) -> ThinkingFormat | None:
    """The thinking format of the tokenizer's chat template(s), or ``None`` for a template without one."""
    template = getattr(tokenizer, "chat_template", None) or ""
    source = " ".join(template.values()) if isinstance(template, dict) else str(template)
    return next((fmt for fmt in THINKING_FORMATS if fmt.marker in source), None)


@dataclass(frozen=True)
class ChatFormat:
    """How a prompt becomes the model's input text.

    Attributes:
        system_prompt: system message of every chat, or ``None``.
        template_kwargs: extra keyword arguments for ``apply_chat_template`` (``--chat-template-kwargs``).
        thinking: the template's thinking format, or ``None``.
        close_thinking: close the thinking block after the generation prompt (for first-token scoring).
    """

    system_prompt: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    thinking: ThinkingFormat | None = None
    close_thinking: bool = False

    def render(self, tokenizer: object, prompt: str) -> str:
        """``prompt`` as one chat turn with the generation prompt (and the block closed when asked)."""
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **self.template_kwargs
        )
        if self.close_thinking and self.thinking is not None and thinking_open(text, self.thinking):
            stripped = text.rstrip()
            if stripped.endswith(self.thinking.open):
                text = stripped[: -len(self.thinking.open)]
            text += self.thinking.skip
        return text

    def opens_thinking(self, tokenizer: object) -> bool:
        """Whether replies in this format start with (or inside) a thinking block."""
        if self.thinking is None or self.close_thinking:
            return False
        return thinking_open(self.render(tokenizer, "Hi"), self.thinking)


def thinking_open(text: str, thinking: ThinkingFormat) -> bool:
    """Whether a rendered prompt leaves the thinking block to the model (not already closed in it)."""
    tail = text.rstrip()
    return not tail.endswith(thinking.close) and not tail.endswith(thinking.skip.rstrip())


@dataclass(frozen=True)
class SplitReply:
    """A reply cut at its thinking block.

    Attributes:
        thinking: the text inside the block ("" when there is none).
        answer: the text after it ("" when the block never closed).
        finished: the block closed (or there was none) within the generated tokens.
    """

    thinking: str
    answer: str
    finished: bool


def split_reply(reply: str, thinking: ThinkingFormat, starts_inside: bool) -> SplitReply:
    """Split a generated reply into its thinking and its answer.

    Args:
        reply: the generated text (special tokens kept where the format needs them).
        thinking: the template's thinking format.
        starts_inside: the prompt ended inside an open block (DeepSeek-R1 appends ``<think>``).
    """
    opened = starts_inside or thinking.open.strip() in reply[: len(thinking.open) + 16]
    if thinking.close in reply:
        inside, _, answer = reply.partition(thinking.close)
        return SplitReply(inside.replace(thinking.open, "").strip(), _clean(answer), True)
    if opened:
        return SplitReply(reply.replace(thinking.open, "").strip(), "", False)
    return SplitReply("", reply.strip(), True)


def _clean(answer: str) -> str:
    # Harmony: the final channel's header follows the closed analysis message.
    for header in ("<|start|>assistant<|channel|>final<|message|>", "<|channel|>final<|message|>"):
        answer = answer.replace(header, "")
    return answer.strip()
