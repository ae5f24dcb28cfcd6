"""The data that describes one decoder family: where its blocks are and what writes into the residual."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# How a writer's weight is laid out in memory.
#   "linear":        nn.Linear weight  [d_model, d_in]            (out × in)
#   "conv1d":        GPT-2 Conv1D       [d_in, d_model]            (in × out, transposed)
#   "experts":       fused experts      [n_experts, d_model, d_in] (out × in per expert)
#   "experts_t":     fused experts      [n_experts, d_in, d_model] (in × out per expert)
#   "embedding":     embedding table    [vocab, d_model]           (rows are written)
Layout = Literal["linear", "conv1d", "experts", "experts_t", "embedding"]
# The fused-experts layouts: one 3-d tensor holds every expert's weight, with no module per expert.
FUSED_LAYOUTS: tuple[Layout, ...] = ("experts", "experts_t")


@dataclass(frozen=True)
class Writer:
    """One module inside a decoder block whose output is added to the residual stream.

    Attributes:
        path: dotted module path relative to the block, e.g. ``"self_attn.o_proj"``.
        layout: how the weight matrix is laid out (see ``Layout``).
        weight: attribute name of the weight parameter on that module.
        bias: attribute name of the bias parameter, or ``None`` if the family never has one.
        optional: the module exists only in some blocks (dense vs MoE layers, shared experts).
        output_norm: dotted path (relative to the block) of a norm applied to this writer's output
            before the residual add (Gemma-2/3, OLMo-2 post-norms), or ``None``.
    """

    path: str
    layout: Layout = "linear"
    weight: str = "weight"
    bias: str | None = "bias"
    optional: bool = False
    output_norm: str | None = None


@dataclass(frozen=True)
class Adapter:
    """Architecture knowledge for one or more ``config.model_type`` values, as data.

    Attributes:
        model_types: the ``config.model_type`` values this adapter handles.
        blocks: dotted path from the causal-LM module to the ``nn.ModuleList`` of decoder blocks.
        embeddings: dotted paths of every embedding whose output enters the residual stream
            (token embedding first; GPT-2 adds learned position embeddings).
        writers: residual writers inside each block.
        lm_head: dotted path of the output projection.
        post_norm: writers pass through a norm before the residual add (Gemma-2/3, OLMo-2): the fold
            is then exact only with respect to hooks on the writers themselves.
        checkpoint_writers: regular expressions (full match) for on-disk tensor names that are residual
            writers, as ``(pattern, layout)``; used by streaming apply, which never instantiates a model.
        checkpoint_embeddings: regular expressions for on-disk embedding tensor names.
        markers: dotted paths relative to a block (modules or parameters) that must exist in at least
            one block for discovery to recognise this structure, e.g. Gemma-2's
            ``"pre_feedforward_layernorm"``; they tell apart families whose writers have the same names.
        note: a sentence for the support matrix.
    """

    model_types: tuple[str, ...]
    blocks: str
    embeddings: tuple[str, ...]
    writers: tuple[Writer, ...]
    lm_head: str = "lm_head"
    post_norm: bool = False
    checkpoint_writers: tuple[tuple[str, Layout], ...] = field(default_factory=tuple)
    checkpoint_embeddings: tuple[str, ...] = field(default_factory=tuple)
    markers: tuple[str, ...] = field(default_factory=tuple)
    note: str = ""

    @property
    def name(self) -> str:
        """The first model type, used as the adapter's display name."""
        return self.model_types[0]


# Writer groups, as the certificate and the negative controls name them; "attention" is one role, every
# other group is the MLP role (a block needs at least one writer of each role).
WRITER_GROUPS = ("embedding", "attention", "mlp", "experts", "shared_experts")
_ATTENTION_MODULES = ("self_attn", "attn", "attention", "self_attention")


def writer_group(writer: Writer) -> str:
    """The group a block writer belongs to: ``attention``, ``mlp``, ``experts`` or ``shared_experts``."""
    if writer.layout in FUSED_LAYOUTS:
        return "experts"
    first = writer.path.split(".")[0]
    if first in _ATTENTION_MODULES:
        return "attention"
    if "shared_expert" in writer.path:
        return "shared_experts"
    return "mlp"


def writer_role(writer: Writer) -> str:
    """``attention`` or ``mlp``: what part of the block the writer finishes."""
    return "attention" if writer_group(writer) == "attention" else "mlp"
