"""Adapter definitions for the supported decoder families (data only)."""

from __future__ import annotations

from abliterate.adapters.registry import register
from abliterate.adapters.spec import Adapter, Writer

_LAYER = r"model\.layers\.\d+"

LLAMA_LIKE = register(
    Adapter(
        model_types=("llama", "mistral", "qwen2"),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        writers=(Writer("self_attn.o_proj"), Writer("mlp.down_proj")),
        checkpoint_writers=(
            (_LAYER + r"\.self_attn\.o_proj\.(weight|bias)", "linear"),
            (_LAYER + r"\.mlp\.down_proj\.(weight|bias)", "linear"),
        ),
        checkpoint_embeddings=(r"model\.embed_tokens\.weight",),
        note="pre-norm decoder; q/k/v biases (qwen2) are not residual writers",
    )
)
