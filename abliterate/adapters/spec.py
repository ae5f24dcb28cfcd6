"""The data that describes one decoder family: where its blocks are and what writes into the residual."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from abliterate.adapters.names import ATTENTION_MODULES, EXPERT_INDEX, TEXT_PREFIXES

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
        aliases: other on-disk names of this writer's tensors, relative to the block, each with its
            layout: the per-expert tensors ``save_pretrained`` writes for fused experts (``*`` stands
            for the expert index) or the original hub name. Its own ``path.weight`` (and
            ``path.bias``) are always accepted.
    """

    path: str
    layout: Layout = "linear"
    weight: str = "weight"
    bias: str | None = "bias"
    optional: bool = False
    output_norm: str | None = None
    aliases: tuple[tuple[str, Layout], ...] = ()


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
        aliases: ``(path, on-disk path)`` pairs for the block list or an embedding that checkpoints
            also store under another name (OpenAI's GPT-2 files omit ``transformer.``). Paths under
            ``model.`` need none: a checkpoint may put any of ``TEXT_PREFIXES`` there.
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
    aliases: tuple[tuple[str, str], ...] = ()
    markers: tuple[str, ...] = field(default_factory=tuple)
    note: str = ""

    @property
    def name(self) -> str:
        """The first model type, used as the adapter's display name."""
        return self.model_types[0]

    @property
    def checkpoint_writers(self) -> tuple[tuple[str, Layout], ...]:
        """Regular expressions (full match) for the on-disk names of residual writers, as ``(pattern,
        layout)``: each writer's weight and bias under every spelling of the block list, and its aliases.
        Streaming apply, which never instantiates a model, edits what they match."""
        block = self._spelled(self.blocks) + r"\.\d+\."
        patterns: list[tuple[str, Layout]] = []
        for writer in self.writers:
            tensors = (writer.weight,) if writer.bias is None else (writer.weight, writer.bias)
            patterns.append((block + re.escape(writer.path) + r"\." + _one_of(tensors), writer.layout))
            for alias, layout in writer.aliases:
                expert_index = r"\d+".join(re.escape(part) for part in alias.split(EXPERT_INDEX))
                patterns.append((block + expert_index, layout))
        return tuple(patterns)

    @property
    def checkpoint_embeddings(self) -> tuple[str, ...]:
        """Regular expressions (full match) for the on-disk names of the embeddings' weights."""
        return tuple(self._spelled(path) + r"\.weight" for path in self.embeddings)

    def _spelled(self, path: str) -> str:
        """A regular expression for every name a checkpoint may give the module at ``path``."""
        names = [path, *(alias for original, alias in self.aliases if original == path)]
        spellings = []
        for name in names:
            rest = name.removeprefix("model.")
            spellings += [prefix + rest for prefix in TEXT_PREFIXES] if rest != name else [name]
        return _one_of(spellings)


def _one_of(names: tuple[str, ...] | list[str]) -> str:
    """A regular expression matching exactly one of ``names``."""
    return "(?:" + "|".join(re.escape(name) for name in names) + ")"


# Writer groups, as the certificate and the negative controls name them; "attention" is one role, every
# other group is the MLP role (a block needs at least one writer of each role).
WRITER_GROUPS = ("embedding", "attention", "mlp", "experts", "shared_experts")


def writer_group(writer: Writer) -> str:
    """The group a block writer belongs to: ``attention``, ``mlp``, ``experts`` or ``shared_experts``."""
    if writer.layout in FUSED_LAYOUTS:
        return "experts"
    first = writer.path.split(".")[0]
    if first in ATTENTION_MODULES:
        return "attention"
    if "shared_expert" in writer.path:
        return "shared_experts"
    return "mlp"


def writer_role(writer: Writer) -> str:
    """``attention`` or ``mlp``: what part of the block the writer finishes."""
    return "attention" if writer_group(writer) == "attention" else "mlp"
