"""A tiny random model written as a GGUF file in-process, as llama.cpp's converter would write it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tiny import VOCAB_SIZE, make_tokenizer

# Tensor types by GGUF tensor kind (``attn_output``, ``ffn_down``, ``token_embd``…); the rest are F32.
MIXED = {"attn_output": "Q8_0", "attn_q": "Q8_0", "ffn_down": "F16", "token_embd": "F16"}


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation of llama-family models (transformers' processor undoes it)."""
    rows = weights.shape[0]
    split = weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


def write_gguf(path: Path, model: torch.nn.Module, types: dict[str, str] | None = None) -> Path:
    """Write ``model`` (a tiny qwen2 or llama) and the tiny tokenizer with its chat template as ``path``.

    Args:
        path: the ``.gguf`` file to create.
        model: the model; a tied one is written without ``output.weight``, as llama.cpp does.
        types: GGML type name per tensor kind (``MIXED``); 1-D tensors stay F32.

    Returns:
        ``path``.
    """
    import gguf

    config = model.config
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA}[config.model_type]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    write_tokenizer(writer)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = config.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        weights = tensor.float().numpy()
        if config.model_type == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
            weights = _permute(weights, heads)
        kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
        qtype = gguf.GGMLQuantizationType[(types or {}).get(kind, "F32")]
        if weights.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, weights)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, weights.astype(np.float16))
        else:
            packed = gguf.quants.quantize(weights, qtype)
            writer.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tokenizer(writer: object, vocab_size: int = VOCAB_SIZE) -> None:
    """The tiny byte-level BPE tokenizer as GGUF metadata (``gpt2`` model), padded to ``vocab_size``."""
    import gguf

    tokenizer = make_tokenizer()
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = dict(data["model"]["vocab"])
    special = {added["id"] for added in data["added_tokens"]}
    vocab.update({added["content"]: added["id"] for added in data["added_tokens"]})
    by_id = {index: token for token, index in vocab.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        tokens.append(by_id.get(index, f"[PAD{index}]"))
        kind = gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL
        types.append(kind if index in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    writer.add_pad_token_id(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    writer.add_chat_template(tokenizer.chat_template)
