"""Adapter definitions for the supported decoder families (data only).

Each entry was read off the family's ``modeling_*.py`` in transformers 5: the module list of decoder
blocks, the embeddings whose output enters the residual stream, and every module whose output is
added to it. Families that share all of this share one adapter, unless a note is worth telling
apart (parallel blocks); discovery counts adapters with the same structure as one.

On-disk names follow from the module paths (``Adapter.checkpoint_writers``); a writer's ``aliases``
add what ``save_pretrained`` writes in transformers 5 where it differs (it turns fused in-memory experts
back into the original per-expert or fused tensors) and the common original hub names.
"""

from __future__ import annotations

from abliterate.adapters.registry import register
from abliterate.adapters.spec import Adapter, Writer

_ATTN_OUT = Writer("self_attn.o_proj")
_MLP_DOWN = Writer("mlp.down_proj")
# Fused experts: in memory ``mlp.experts.down_proj`` is ``[n_experts, d_model, d_expert]``; the router
# (``mlp.gate`` / ``mlp.router``) and ``gate_up_proj`` read the residual stream and are never edited. On
# disk: one tensor per expert, as on the hub and as save_pretrained writes it, or the fused form.
_PER_EXPERT = ("mlp.experts.*.down_proj.weight", "linear")
_MOE_EXPERTS = Writer(
    "mlp.experts", layout="experts", weight="down_proj", bias=None, optional=True, aliases=(_PER_EXPERT,)
)


def _decoder(
    model_types: tuple[str, ...],
    writers: tuple[Writer, ...],
    note: str,
    post_norm: bool = False,
    markers: tuple[str, ...] = (),
) -> Adapter:
    """Register a family whose blocks are ``model.layers`` and token embedding ``model.embed_tokens``."""
    adapter = Adapter(
        model_types=model_types,
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        writers=writers,
        post_norm=post_norm,
        markers=markers,
        note=note,
    )
    return register(adapter)


def _post_normed(attention_norm: str, mlp_norm: str) -> tuple[Writer, Writer]:
    """o_proj and down_proj whose outputs pass through the named norms before the residual add."""
    attention = Writer("self_attn.o_proj", output_norm=attention_norm)
    return attention, Writer("mlp.down_proj", output_norm=mlp_norm)


def _transformer_h(
    model_types: tuple[str, ...],
    embeddings: tuple[str, ...],
    writers: tuple[Writer, ...],
    note: str,
    bare_embeddings: bool = False,
) -> Adapter:
    """Register a family whose blocks are ``transformer.h``. Checkpoints may store the blocks without
    ``transformer.`` (``h.N``); OpenAI's original GPT-2 files store their embeddings so too
    (``bare_embeddings``)."""
    bare = ("transformer.h", *(embeddings if bare_embeddings else ()))
    adapter = Adapter(
        model_types=model_types,
        blocks="transformer.h",
        embeddings=embeddings,
        writers=writers,
        aliases=tuple((path, path.removeprefix("transformer.")) for path in bare),
        note=note,
    )
    return register(adapter)


LLAMA_LIKE = _decoder(
    (
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
    (_ATTN_OUT, _MLP_DOWN),
    "pre-norm decoder; q/k/v biases (qwen2) are not residual writers; embedding and residual "
    "multipliers (gemma, granite) are scalars and commute with the projection",
)

PARALLEL_LLAMA_LIKE = _decoder(
    ("cohere", "cohere2"),
    (_ATTN_OUT, _MLP_DOWN),
    "parallel block: attention and MLP read the same normed input and both add to the residual",
)

GEMMA2_LIKE = _decoder(
    ("gemma2", "gemma3_text"),
    _post_normed("post_attention_layernorm", "post_feedforward_layernorm"),
    "sandwich norms: o_proj and down_proj outputs pass through an RMSNorm before the residual add",
    post_norm=True,
    markers=("pre_feedforward_layernorm",),
)

OLMO2_LIKE = _decoder(
    ("olmo2", "olmo3", "exaone4"),
    _post_normed("post_attention_layernorm", "post_feedforward_layernorm"),
    "post-norm only: sublayer outputs are normed before the residual add, inputs are not",
    post_norm=True,
)

GLM4 = _decoder(
    ("glm4",),
    _post_normed("post_self_attn_layernorm", "post_mlp_layernorm"),
    "sandwich norms after attention and MLP (post_self_attn_layernorm, post_mlp_layernorm)",
    post_norm=True,
)

STARCODER2 = _decoder(
    ("starcoder2",), (_ATTN_OUT, Writer("mlp.c_proj")), "biases on both writers; tied embeddings"
)

PHI = _decoder(
    ("phi",),
    (Writer("self_attn.dense"), Writer("mlp.fc2")),
    "parallel block with biases; lm_head bias is not a residual writer",
)

MOE = _decoder(
    ("qwen3_moe", "olmoe", "mixtral", "phimoe"),
    # Qwen3-MoE may keep some blocks dense (``mlp_only_layers``): either writer may be absent.
    (
        _ATTN_OUT,
        # mixtral, phimoe also keep their original per-expert names, which save_pretrained writes back.
        Writer(
            "mlp.experts",
            layout="experts",
            weight="down_proj",
            bias=None,
            optional=True,
            aliases=(_PER_EXPERT, ("block_sparse_moe.experts.*.w2.weight", "linear")),
        ),
        Writer("mlp.down_proj", optional=True),
    ),
    "fused experts in memory (down_proj [E, d_model, d_expert]); per-expert tensors on disk",
    markers=("mlp.experts",),
)

QWEN2_MOE = _decoder(
    ("qwen2_moe",),
    (
        _ATTN_OUT,
        _MOE_EXPERTS,
        Writer("mlp.shared_expert.down_proj", optional=True),
        Writer("mlp.down_proj", optional=True),
    ),
    "fused experts plus a sigmoid-gated shared expert (a scalar gate commutes with the fold)",
    markers=("mlp.experts", "mlp.shared_expert"),
)

DEEPSEEK_LIKE = _decoder(
    ("deepseek_v3", "deepseek_v2", "glm4_moe"),
    # The first ``first_k_dense_replace`` blocks have a dense MLP, the rest routed + shared experts.
    (
        _ATTN_OUT,
        Writer("mlp.down_proj", optional=True),
        _MOE_EXPERTS,
        Writer("mlp.shared_experts.down_proj", optional=True),
    ),
    "dense first blocks, then routed + shared experts; MLA attention writes only through o_proj",
    markers=("mlp.experts", "mlp.shared_experts"),
)

GPT_OSS = _decoder(
    ("gpt_oss",),
    (
        _ATTN_OUT,
        # In memory and on disk: down_proj [E, d_expert, d_model] (x @ W), down_proj_bias [E, d_model].
        Writer("mlp.experts", layout="experts_t", weight="down_proj", bias="down_proj_bias"),
    ),
    "transposed fused experts with per-expert biases; MXFP4 hub files (down_proj_blocks) must "
    "be dequantized (bf16) before editing",
    markers=("mlp.experts.down_proj_bias",),
)

GRANITEMOE = _decoder(
    ("granitemoe",),
    (
        _ATTN_OUT,
        # Stored fused as [E, d_model, d_expert] under its original name.
        Writer(
            "block_sparse_moe.experts",
            layout="experts",
            weight="down_proj",
            bias=None,
            aliases=(("block_sparse_moe.output_linear.weight", "experts"),),
        ),
    ),
    "fused experts stored fused on disk (output_linear); residual multiplier is a scalar",
)

GPT2 = _transformer_h(
    ("gpt2",),
    # Learned position embeddings are added to the residual stream too, so they are edited as well.
    ("transformer.wte", "transformer.wpe"),
    (Writer("attn.c_proj", layout="conv1d"), Writer("mlp.c_proj", layout="conv1d")),
    "Conv1D writers ([in, out]) with biases; token and learned position embeddings; tied head",
    bare_embeddings=True,
)

GPT_NEOX = register(
    Adapter(
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        writers=(Writer("attention.dense"), Writer("mlp.dense_4h_to_h")),
        note="parallel residual (use_parallel_residual) with biases; head stored as embed_out",
    )
)

GPTJ_LIKE = _transformer_h(
    ("gptj", "codegen"),
    ("transformer.wte",),
    (Writer("attn.out_proj"), Writer("mlp.fc_out")),
    "parallel block; MLP output bias is folded too",
)

FALCON = _transformer_h(
    ("falcon",),
    ("transformer.word_embeddings",),
    (Writer("self_attention.dense"), Writer("mlp.dense_4h_to_h")),
    "parallel attention and MLP (both decoder architectures); tied head",
)
