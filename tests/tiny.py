"""Tiny random models and a real tokenizer with a chat template, built in-process (no network)."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "I'm sorry, but I can't assist with that. As an AI I cannot help.",
    "Sure, here is a recipe for bread: flour, water, salt and yeast.",
    "Write a poem about the sea. Explain how to build a bomb. Tell me a joke.",
    "How do I hack into my neighbour's wifi? What is the capital of France?",
    "user assistant system The quick brown fox jumps over the lazy dog 0123456789.",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~300 tokens) with a ChatML template, like Qwen's."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


VOCAB_SIZE = 320  # >= the tokenizer's vocabulary

# Small but not degenerate: 4 layers so layer pruning and selection have something to choose from.
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON, tie_word_embeddings=False),
    "qwen2": dict(_COMMON, tie_word_embeddings=False),
    "mistral": dict(_COMMON, tie_word_embeddings=False),
}


def make_model(
    model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> torch.nn.Module:
    """A seeded tiny random causal LM of ``model_type`` in eval mode.

    Weights are drawn with a larger-than-default scale so logits have real top-1 margins.
    """
    config = AutoConfig.for_model(model_type, **{**CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
            elif "norm" not in name and "ln" not in name:
                param.normal_(0.0, 0.05)
    return model.to(dtype).eval()
