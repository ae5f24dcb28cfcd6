"""Adapter definitions for the supported decoder families (data only).

Each entry was read off the family's ``modeling_*.py`` in transformers 5: the module list of decoder
blocks, the embeddings whose output enters the residual stream, and every module whose output is
added to it. Families that share all of this share one adapter, unless a note is worth telling
apart (parallel blocks); discovery counts adapters with the same structure as one.

On-disk names (``checkpoint_*``) cover what ``save_pretrained`` writes in transformers 5 (it turns
fused in-memory experts back into the original per-expert or fused tensors) and the common original
hub names where they differ. Layer prefixes also match the text model inside multimodal wrappers.
"""

from __future__ import annotations

from abliterate.adapters.registry import register
from abliterate.adapters.spec import Adapter, Writer

# A decoder layer on disk: plain causal LMs (``model.layers.N``) and the text model of multimodal
# wrappers, as transformers 5 writes it (``model.language_model.layers.N``) and as older hub
# checkpoints hold it (``language_model.model.layers.N``).
_TEXT = r"(?:model\.|model\.language_model\.|language_model\.model\.)"
_LAYER = _TEXT + r"layers\.\d+"
_EMBED_TOKENS = _TEXT + r"embed_tokens\.weight"
# GPT-2, GPT-J, Falcon keep everything under ``transformer.``; OpenAI's original GPT-2 files omit it.
_H = r"(?:transformer\.)?h\.\d+"

_ATTN_OUT = Writer("self_attn.o_proj")
_MLP_DOWN = Writer("mlp.down_proj")

LLAMA_LIKE = register(
    Adapter(
        model_types=(
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "granite",
            "olmo",
            "phi3",
            "stablelm",
            "smollm3",
            "helium",
            "arcee",
            "apertus",
            "seed_oss",
            "hunyuan_v1_dense",
            "glm",
            "nemotron",
            "ministral",
        ),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        writers=(_ATTN_OUT, _MLP_DOWN),
        checkpoint_writers=(
            (_LAYER + r"\.self_attn\.o_proj\.(weight|bias)", "linear"),
            (_LAYER + r"\.mlp\.down_proj\.(weight|bias)", "linear"),
        ),
        checkpoint_embeddings=(_EMBED_TOKENS,),
        note=(
            "pre-norm decoder; q/k/v biases (qwen2) are not residual writers; embedding and residual "
            "multipliers (gemma, granite) are scalars and commute with the projection"
        ),
    )
)

PARALLEL_LLAMA_LIKE = register(
    Adapter(
        model_types=("cohere", "cohere2"),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        writers=(_ATTN_OUT, _MLP_DOWN),
        checkpoint_writers=LLAMA_LIKE.checkpoint_writers,
        checkpoint_embeddings=LLAMA_LIKE.checkpoint_embeddings,
        note="parallel block: attention and MLP read the same normed input and both add to the residual",
    )
)

GEMMA2_LIKE = register(
    Adapter(
        model_types=("gemma2", "gemma3_text"),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        writers=(
            Writer("self_attn.o_proj", output_norm="post_attention_layernorm"),
            Writer("mlp.down_proj", output_norm="post_feedforward_layernorm"),
        ),
        post_norm=True,
        checkpoint_writers=LLAMA_LIKE.checkpoint_writers,
        checkpoint_embeddings=LLAMA_LIKE.checkpoint_embeddings,
        markers=("pre_feedforward_layernorm",),
        note="sandwich norms: o_proj and down_proj outputs pass through an RMSNorm before the residual add",
    )
)

OLMO2_LIKE = register(
    Adapter(
        model_types=("olmo2", "olmo3", "exaone4"),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        writers=(
            Writer("self_attn.o_proj", output_norm="post_attention_layernorm"),
            Writer("mlp.down_proj", output_norm="post_feedforward_layernorm"),
        ),
        post_norm=True,
        checkpoint_writers=LLAMA_LIKE.checkpoint_writers,
        checkpoint_embeddings=LLAMA_LIKE.checkpoint_embeddings,
        note="post-norm only: sublayer outputs are normed before the residual add, inputs are not",
    )
)

GLM4 = register(
    Adapter(
        model_types=("glm4",),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        writers=(
            Writer("self_attn.o_proj", output_norm="post_self_attn_layernorm"),
            Writer("mlp.down_proj", output_norm="post_mlp_layernorm"),
        ),
        post_norm=True,
        checkpoint_writers=LLAMA_LIKE.checkpoint_writers,
        checkpoint_embeddings=LLAMA_LIKE.checkpoint_embeddings,
        note="sandwich norms after attention and MLP (post_self_attn_layernorm, post_mlp_layernorm)",
    )
)

STARCODER2 = register(
    Adapter(
        model_types=("starcoder2",),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        writers=(_ATTN_OUT, Writer("mlp.c_proj")),
        checkpoint_writers=(
            (_LAYER + r"\.self_attn\.o_proj\.(weight|bias)", "linear"),
            (_LAYER + r"\.mlp\.c_proj\.(weight|bias)", "linear"),
        ),
        checkpoint_embeddings=(_EMBED_TOKENS,),
        note="biases on both writers; tied embeddings",
    )
)

PHI = register(
    Adapter(
        model_types=("phi",),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        writers=(Writer("self_attn.dense"), Writer("mlp.fc2")),
        checkpoint_writers=(
            (_LAYER + r"\.self_attn\.dense\.(weight|bias)", "linear"),
            (_LAYER + r"\.mlp\.fc2\.(weight|bias)", "linear"),
        ),
        checkpoint_embeddings=(_EMBED_TOKENS,),
        note="parallel block with biases; lm_head bias is not a residual writer",
    )
)

# Fused experts: in memory ``mlp.experts.down_proj`` is ``[n_experts, d_model, d_expert]``; the router
# (``mlp.gate`` / ``mlp.router``) and ``gate_up_proj`` read the residual stream and are never edited.
_MOE_EXPERTS = Writer("mlp.experts", layout="experts", weight="down_proj", bias=None, optional=True)

MOE = register(
    Adapter(
        model_types=("qwen3_moe", "olmoe", "mixtral", "phimoe"),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        # Qwen3-MoE may keep some blocks dense (``mlp_only_layers``): either writer may be absent.
        writers=(_ATTN_OUT, _MOE_EXPERTS, Writer("mlp.down_proj", optional=True)),
        checkpoint_writers=(
            (_LAYER + r"\.self_attn\.o_proj\.(weight|bias)", "linear"),
            (_LAYER + r"\.mlp\.down_proj\.(weight|bias)", "linear"),
            # qwen3_moe, olmoe: one tensor per expert, as on the hub and as save_pretrained writes it.
            (_LAYER + r"\.mlp\.experts\.\d+\.down_proj\.weight", "linear"),
            # mixtral, phimoe: the original per-expert names, which save_pretrained also writes back.
            (_LAYER + r"\.block_sparse_moe\.experts\.\d+\.w2\.weight", "linear"),
            # the fused in-memory form, should a checkpoint hold it.
            (_LAYER + r"\.mlp\.experts\.down_proj", "experts"),
        ),
        checkpoint_embeddings=(_EMBED_TOKENS,),
        markers=("mlp.experts",),
        note="fused experts in memory (down_proj [E, d_model, d_expert]); per-expert tensors on disk",
    )
)

QWEN2_MOE = register(
    Adapter(
        model_types=("qwen2_moe",),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        writers=(
            _ATTN_OUT,
            _MOE_EXPERTS,
            Writer("mlp.shared_expert.down_proj", optional=True),
            Writer("mlp.down_proj", optional=True),
        ),
        checkpoint_writers=(
            (_LAYER + r"\.self_attn\.o_proj\.(weight|bias)", "linear"),
            (_LAYER + r"\.mlp\.down_proj\.(weight|bias)", "linear"),
            (_LAYER + r"\.mlp\.experts\.\d+\.down_proj\.weight", "linear"),
            (_LAYER + r"\.mlp\.experts\.down_proj", "experts"),
            (_LAYER + r"\.mlp\.shared_expert\.down_proj\.weight", "linear"),
        ),
        checkpoint_embeddings=(_EMBED_TOKENS,),
        markers=("mlp.experts", "mlp.shared_expert"),
        note="fused experts plus a sigmoid-gated shared expert (a scalar gate commutes with the fold)",
    )
)

DEEPSEEK_LIKE = register(
    Adapter(
        model_types=("deepseek_v3", "deepseek_v2", "glm4_moe"),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        # The first ``first_k_dense_replace`` blocks have a dense MLP, the rest routed + shared experts.
        writers=(
            _ATTN_OUT,
            Writer("mlp.down_proj", optional=True),
            _MOE_EXPERTS,
            Writer("mlp.shared_experts.down_proj", optional=True),
        ),
        checkpoint_writers=(
            (_LAYER + r"\.self_attn\.o_proj\.(weight|bias)", "linear"),
            (_LAYER + r"\.mlp\.down_proj\.(weight|bias)", "linear"),
            (_LAYER + r"\.mlp\.experts\.\d+\.down_proj\.weight", "linear"),
            (_LAYER + r"\.mlp\.experts\.down_proj", "experts"),
            (_LAYER + r"\.mlp\.shared_experts\.down_proj\.weight", "linear"),
        ),
        checkpoint_embeddings=(_EMBED_TOKENS,),
        markers=("mlp.experts", "mlp.shared_experts"),
        note="dense first blocks, then routed + shared experts; MLA attention writes only through o_proj",
    )
)

GPT_OSS = register(
    Adapter(
        model_types=("gpt_oss",),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        writers=(
            _ATTN_OUT,
            # In memory and on disk: down_proj [E, d_expert, d_model] (x @ W), down_proj_bias [E, d_model].
            Writer("mlp.experts", layout="experts_t", weight="down_proj", bias="down_proj_bias"),
        ),
        checkpoint_writers=(
            (_LAYER + r"\.self_attn\.o_proj\.(weight|bias)", "linear"),
            (_LAYER + r"\.mlp\.experts\.down_proj(_bias)?", "experts_t"),
        ),
        checkpoint_embeddings=(_EMBED_TOKENS,),
        markers=("mlp.experts.down_proj_bias",),
        note=(
            "transposed fused experts with per-expert biases; MXFP4 hub files (down_proj_blocks) must "
            "be dequantized (bf16) before editing"
        ),
    )
)

GRANITEMOE = register(
    Adapter(
        model_types=("granitemoe",),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        writers=(
            _ATTN_OUT,
            Writer("block_sparse_moe.experts", layout="experts", weight="down_proj", bias=None),
        ),
        checkpoint_writers=(
            (_LAYER + r"\.self_attn\.o_proj\.(weight|bias)", "linear"),
            # Stored fused as [E, d_model, d_expert] under its original name.
            (_LAYER + r"\.block_sparse_moe\.output_linear\.weight", "experts"),
            (_LAYER + r"\.block_sparse_moe\.experts\.down_proj", "experts"),
        ),
        checkpoint_embeddings=(_EMBED_TOKENS,),
        note="fused experts stored fused on disk (output_linear); residual multiplier is a scalar",
    )
)

GPT2 = register(
    Adapter(
        model_types=("gpt2",),
        blocks="transformer.h",
        # Learned position embeddings are added to the residual stream too, so they are edited as well.
        embeddings=("transformer.wte", "transformer.wpe"),
        writers=(Writer("attn.c_proj", layout="conv1d"), Writer("mlp.c_proj", layout="conv1d")),
        checkpoint_writers=((_H + r"\.(attn|mlp)\.c_proj\.(weight|bias)", "conv1d"),),
        checkpoint_embeddings=(r"(?:transformer\.)?(wte|wpe)\.weight",),
        note="Conv1D writers ([in, out]) with biases; token and learned position embeddings; tied head",
    )
)

GPT_NEOX = register(
    Adapter(
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        writers=(Writer("attention.dense"), Writer("mlp.dense_4h_to_h")),
        checkpoint_writers=(
            (r"gpt_neox\.layers\.\d+\.attention\.dense\.(weight|bias)", "linear"),
            (r"gpt_neox\.layers\.\d+\.mlp\.dense_4h_to_h\.(weight|bias)", "linear"),
        ),
        checkpoint_embeddings=(r"gpt_neox\.embed_in\.weight",),
        note="parallel residual (use_parallel_residual) with biases; head stored as embed_out",
    )
)

GPTJ_LIKE = register(
    Adapter(
        model_types=("gptj", "codegen"),
        blocks="transformer.h",
        embeddings=("transformer.wte",),
        writers=(Writer("attn.out_proj"), Writer("mlp.fc_out")),
        checkpoint_writers=(
            (_H + r"\.attn\.out_proj\.(weight|bias)", "linear"),
            (_H + r"\.mlp\.fc_out\.(weight|bias)", "linear"),
        ),
        checkpoint_embeddings=(r"transformer\.wte\.weight",),
        note="parallel block; MLP output bias is folded too",
    )
)

FALCON = register(
    Adapter(
        model_types=("falcon",),
        blocks="transformer.h",
        embeddings=("transformer.word_embeddings",),
        writers=(Writer("self_attention.dense"), Writer("mlp.dense_4h_to_h")),
        checkpoint_writers=(
            (_H + r"\.self_attention\.dense\.(weight|bias)", "linear"),
            (_H + r"\.mlp\.dense_4h_to_h\.(weight|bias)", "linear"),
        ),
        checkpoint_embeddings=(r"transformer\.word_embeddings\.weight",),
        note="parallel attention and MLP (both decoder architectures); tied head",
    )
)
