"""Tiny random models and a real tokenizer with a chat template, built in-process (no network)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

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
# Special token ids inside the tiny vocabulary (defaults of most families point past it).
_IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=2)
# Mixture of experts: enough experts and top-k >= 2 that every forward pass mixes several of them.
_EXPERTS = dict(num_experts_per_tok=2, moe_intermediate_size=32)
# Alternate local and global attention where a family has both; 8 tokens is shorter than the prompts.
_SLIDING = dict(
    sliding_window=8,
    layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
)
# Families with GPT-2 style config names.
_GPT = dict(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=4, n_head=4, n_positions=256, **_IDS)


def _config(*parts: dict, **fields: object) -> dict:
    merged: dict = {}
    for part in parts:
        merged.update(part)
    merged.update(fields)
    return merged


CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON, tie_word_embeddings=False),
    "qwen2": dict(_COMMON, tie_word_embeddings=False),
    "mistral": dict(_COMMON, tie_word_embeddings=False),
    "qwen3": _config(_COMMON, _IDS, head_dim=16, tie_word_embeddings=True),
    "gemma": _config(_COMMON, _IDS, head_dim=16),
    "granite": _config(
        _COMMON,
        _IDS,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.25,
        logits_scaling=2.0,
    ),
    "olmo": _config(_COMMON, _IDS),
    "phi3": _config(_COMMON, _IDS),
    "stablelm": _config(_COMMON, _IDS),
    "smollm3": _config(_COMMON, _IDS),
    "helium": _config(_COMMON, _IDS, head_dim=16),
    "arcee": _config(_COMMON, _IDS, head_dim=16),
    "apertus": _config(_COMMON, _IDS),
    "seed_oss": _config(_COMMON, _IDS, head_dim=16, attention_bias=True),
    "hunyuan_v1_dense": _config(_COMMON, _IDS, head_dim=16),
    "glm": _config(_COMMON, _IDS, head_dim=16),
    "nemotron": _config(_COMMON, _IDS, head_dim=16),
    "ministral": _config(_COMMON, _IDS, _SLIDING, head_dim=16),
    "cohere": _config(_COMMON, _IDS),
    "cohere2": _config(_COMMON, _IDS, _SLIDING, head_dim=16),
    "gemma2": _config(_COMMON, _IDS, head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
    "gemma3_text": _config(_COMMON, _IDS, _SLIDING, head_dim=16, query_pre_attn_scalar=16),
    "olmo2": _config(_COMMON, _IDS),
    "olmo3": _config(_COMMON, _IDS, _SLIDING),
    "exaone4": _config(_COMMON, _IDS, _SLIDING),
    "glm4": _config(_COMMON, _IDS, head_dim=16),
    "starcoder2": _config(_COMMON, _IDS),
    "phi": _config(_COMMON, _IDS),
    "qwen3_moe": _config(_COMMON, _IDS, _EXPERTS, head_dim=16, num_experts=8, mlp_only_layers=[1]),
    "olmoe": _config(_COMMON, _IDS, num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "mixtral": _config(_COMMON, _IDS, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "phimoe": _config(_COMMON, _IDS, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "qwen2_moe": _config(
        _COMMON, _IDS, _EXPERTS, num_experts=8, shared_expert_intermediate_size=64, mlp_only_layers=[1]
    ),
    "deepseek_v3": _config(
        _COMMON,
        _IDS,
        _EXPERTS,
        first_k_dense_replace=1,  # block 0 dense, blocks 1-3 routed + shared experts
        n_routed_experts=8,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
    ),
    "deepseek_v2": _config(
        _COMMON,
        _IDS,
        _EXPERTS,
        first_k_dense_replace=1,
        n_routed_experts=8,
        n_shared_experts=1,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
    ),
    "glm4_moe": _config(
        _COMMON, _IDS, _EXPERTS, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, head_dim=16
    ),
    "gpt_oss": _config(
        _COMMON,
        _IDS,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=32,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    "granitemoe": _config(
        _COMMON,
        _IDS,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=32,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.25,
        logits_scaling=2.0,
    ),
    "gpt2": dict(_GPT),
    "gptj": _config(_GPT, rotary_dim=8),
    "codegen": _config(_GPT, n_ctx=256, rotary_dim=8),
    "gpt_neox": _config(_COMMON, _IDS),
    "falcon": _config(
        vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, bias=True, **_IDS
    ),
}

# A vision-language wrapper whose text model sits under ``model.language_model`` (Gemma 3).
MULTIMODAL_CONFIG: dict = dict(
    text_config=_config(_COMMON, _IDS, _SLIDING, head_dim=16, query_pre_attn_scalar=16),
    vision_config=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    ),
    mm_tokens_per_image=4,
    image_token_index=VOCAB_SIZE - 3,
    boi_token_index=VOCAB_SIZE - 2,
    eoi_token_index=VOCAB_SIZE - 1,
)


# Expert routers: ``mlp.gate``, ``mlp.router``, ``block_sparse_moe.router``, never ``gate_proj``.
_ROUTER = re.compile(r".*\.(gate|router)\.weight")


def _scale_up(model: torch.nn.Module) -> None:
    # Larger-than-default weights give the logits real top-1 margins; norms keep their identity init.
    # Routers get a larger scale still, so expert choices have margins too: with near-ties, bf16
    # rounding alone flips experts and makes every bf16 comparison a coin toss.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if _ROUTER.fullmatch(name):
                param.normal_(0.0, 0.5)
            elif param.dim() >= 2:
                param.normal_(0.0, 0.08)
            elif "norm" not in name and "ln" not in name:
                param.normal_(0.0, 0.05)


def make_model(
    model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object
) -> torch.nn.Module:
    """A seeded tiny random causal LM of ``model_type`` in eval mode.

    Weights are drawn with a larger-than-default scale so logits have real top-1 margins.

    Args:
        model_type: a key of ``CONFIGS`` (every registered adapter has one).
        seed: torch seed for the weights.
        dtype: dtype of the returned model (weights are drawn in float32 first).
        **overrides: config fields replacing the tiny defaults.
    """
    config = AutoConfig.for_model(model_type, **{**CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _scale_up(model)
    return model.to(dtype).eval()


def make_multimodal_model(seed: int = 0) -> torch.nn.Module:
    """A seeded tiny ``Gemma3ForConditionalGeneration`` (text model under ``model.language_model``)."""
    config = AutoConfig.for_model("gemma3", **MULTIMODAL_CONFIG)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _scale_up(model)
    return model.eval()


def quick_run_args(
    n_train: int, n_val: int, n_eval: int = 2, layer: int | None = None, evaluate: bool = True
) -> list[str]:
    """``abliterate run`` flags for a fast run on a tiny model: few prompts, no progress bars, and with
    ``layer`` the candidate at that layer and EOI position −1 instead of the selection."""
    args = ["--n-train", str(n_train), "--n-val", str(n_val), "--n-eval", str(n_eval), "--no-progress"]
    args += ["--max-new-tokens", "16", "--n-over-refusal", "2"]  # short replies: a tiny model's are noise
    args += ["--confirm-tokens", "8"]  # a searched run's confirmation replies: short, as the evaluation's
    if not evaluate:
        args.append("--no-evaluate")
    if layer is not None:
        args += ["--layer", str(layer), "--position", "-1"]
    return args


def open_selection_config(model: Path | str, output: Path | str, **fields: object) -> object:
    """A ``RunConfig`` for a quick run on a tiny random model whose selection filters are open (a random
    model never refuses, so the paper's thresholds would reject every candidate); ``fields`` (flat, as
    ``RunConfig.from_options`` takes them) override."""
    from abliterate import RunConfig

    settings: dict[str, object] = {
        "n_train": 8,
        "n_val": 4,
        "n_eval": 2,
        "max_new_tokens": 16,
        "n_over_refusal": 2,
        "screen_prompts": 2,
        "screen_keep": 3,
        "confirm_tokens": 8,
        "damage_tokens": 8,
        "max_kl": float("inf"),
        "min_steering": -float("inf"),
        "progress": False,
    }
    return RunConfig.from_options(str(model), output=str(output), **{**settings, **fields})


def quick_lora_config(model: Path | str, output: Path | str) -> object:
    """A ``RunConfig`` for a quick ``run --format lora`` on a tiny model: the candidate at layer 1 and EOI
    position −1 (no selection), few prompts, no progress bars."""
    from abliterate import PromptConfig, PublishingConfig, RunConfig, SelectionConfig

    return RunConfig(
        model=str(model),
        publishing=PublishingConfig(output=str(output), format="lora"),
        selection=SelectionConfig(layer=1, position=-1),
        prompts=PromptConfig(n_train=8, n_val=4, n_eval=2),
        progress=False,
    )
