"""What a GGUF apply edits, decided and validated from the source's tensor infos before anything is written.

llama.cpp names a block's residual writers the same way in every architecture it converts
(``blk.N.attn_output``, ``blk.N.ffn_down``, fused experts ``ffn_down_exps``, shared experts
``ffn_down_shexp``, and their biases), and the token embedding ``token_embd``. These names pick the
tensors to fold; the certificate does not trust them: it derives the writers from the model's structure
through transformers' GGUF name map (``abliterate.prove.gguf_certificate``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abliterate.adapters.spec import Layout
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.kernel import changes
from abliterate.prove.gguf_rules import EMBEDDING_TENSOR, OUTPUT_TENSOR, PREFIX, logical_shape, writer_type

# blk.N.<kind>.<weight|bias>: a residual writer, by llama.cpp's tensor names.
_WRITER = re.compile(r"blk\.(\d+)\.(attn_output|ffn_down|ffn_down_exps|ffn_down_shexp)\.(weight|bias)")
_GROUPS = {
    "attn_output": "attention",
    "ffn_down": "mlp",
    "ffn_down_exps": "experts",
    "ffn_down_shexp": "shared_experts",
}


@dataclass(frozen=True)
class GGUFWriter:
    """One tensor the edit folds: its fold (layout, group, block, bias) and the type it is stored in."""

    layout: Layout
    group: str
    layer: int
    bias: bool
    qtype: Any  # gguf.GGMLQuantizationType
    folded: bool  # False: strength 0, copied as it is


@dataclass(frozen=True)
class GGUFPlan:
    """A GGUF apply: the source, its reader, the writers to fold and whether an output head is added.

    Attributes:
        source: the GGUF file.
        reader: its ``gguf.GGUFReader`` (memory-mapped).
        architecture: ``general.architecture``.
        writers: GGUF tensor name → its fold.
        add_output: the source ties its head to ``token_embd`` (no ``output.weight``): the output adds
            ``output.weight``, the original embedding.
        gguf_type: ``--gguf-type``.
    """

    source: Path
    reader: Any
    architecture: str
    writers: dict[str, GGUFWriter]
    add_output: bool
    gguf_type: str

    def tensors(self) -> dict[str, Any]:
        """The source's tensors by name, in file order."""
        return {tensor.name: tensor for tensor in self.reader.tensors}


def open_gguf(path: Path) -> Any:
    """``gguf.GGUFReader`` of ``path``, or one line saying why it cannot be read.

    Raises:
        ValueError: not a GGUF file, truncated, or in the other byte order.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as error:
        raise ValueError(f"cannot read {path} as a GGUF file: {error}") from error
    if reader.byte_order != "I":
        raise ValueError(f"{path} is a byte-swapped GGUF; convert it to this machine's byte order first")
    return reader


def plan_gguf(source: Path, declared: DeclaredEdit, gguf_type: str) -> GGUFPlan:
    """Find every writer of ``source``, check the direction fits and every block is covered.

    Raises:
        ValueError: no embedding, a direction of another width, a block without an attention or MLP
            writer, a writer of an unexpected shape, or a type gguf-py cannot write.
    """
    reader = open_gguf(source)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    architecture = str(reader.fields["general.architecture"].contents())
    if EMBEDDING_TENSOR not in tensors:
        raise ValueError(f"{source} has no {EMBEDDING_TENSOR}: not a llama.cpp language model")
    d_model = logical_shape(tensors[EMBEDDING_TENSOR])[-1]
    if declared.direction.shape[-1] != d_model:
        raise ValueError(
            f"the direction has {declared.direction.shape[-1]} entries but {source.name}'s "
            f"{EMBEDDING_TENSOR} is {list(logical_shape(tensors[EMBEDDING_TENSOR]))} "
            f"(d_model={d_model}, {architecture}): "
            "the direction belongs to another model"
        )
    found = {EMBEDDING_TENSOR: ("embedding", "embedding", -1, False)}
    for name in tensors:
        match = _WRITER.fullmatch(name)
        if match:
            bias = match.group(3) == "bias"
            layout: Layout = (
                "embedding" if bias else ("experts" if match.group(2) == "ffn_down_exps" else "linear")
            )
            found[name] = (layout, _GROUPS[match.group(2)], int(match.group(1)), bias)
    writers = {}
    for name, (layout, group, layer, bias) in found.items():
        shape = logical_shape(tensors[name])
        _check_shape(name, shape, layout, d_model)
        folded = changes(declared.scales(group, layer))
        qtype = (
            writer_type(gguf_type, tensors[name].tensor_type, shape) if folded else tensors[name].tensor_type
        )
        writers[name] = GGUFWriter(layout, group, layer, bias, qtype, folded)
    declared.validate((writer.group, writer.layer) for writer in writers.values())
    if declared.norm_preserving and any(w.group == "experts" for w in writers.values()):
        raise ValueError("a norm-preserving edit cannot scale a fused expert's input; use a plain edit")
    _check_every_block(reader, architecture, writers, source)
    if any(key.startswith(PREFIX) for key in reader.fields):
        raise ValueError(
            f"{source.name} is already an abliterate output (it has {PREFIX}* metadata): "
            "apply to its original"
        )
    return GGUFPlan(source, reader, architecture, writers, OUTPUT_TENSOR not in tensors, gguf_type)


def _check_shape(name: str, shape: tuple[int, ...], layout: Layout, d_model: int) -> None:
    """A writer must have a ``d_model`` axis where its layout puts it (rows for the embedding and biases,
    the output axis ``-2`` for linear and expert weights)."""
    axis, dims = {"embedding": (-1, None), "linear": (0, 2), "experts": (-2, 3)}[layout]
    if (dims is not None and len(shape) != dims) or shape[axis] != d_model:
        raise ValueError(
            f"{name} has shape {list(shape)}, which has no d_model={d_model} axis where a {layout} writer "
            "has it: the direction does not fit this model"
        )


def _check_every_block(reader: Any, architecture: str, writers: dict[str, GGUFWriter], source: Path) -> None:
    """Every block (``<arch>.block_count``) has an attention and an MLP (or expert) writer."""
    field = reader.fields.get(f"{architecture}.block_count")
    if field is None:
        raise ValueError(
            f"{source.name} has no {architecture}.block_count: cannot check every block is edited"
        )
    roles: dict[int, set[str]] = {layer: set() for layer in range(int(field.contents()))}
    for writer in writers.values():
        if writer.layer in roles and not writer.bias:
            roles[writer.layer].add("attention" if writer.group == "attention" else "mlp")
    for layer, present in roles.items():
        missing = {"attention", "mlp"} - present
        if missing:
            raise ValueError(
                f"block {layer} of {source.name} has no {' or '.join(sorted(missing))} writer "
                "(blk.N.attn_output / blk.N.ffn_down*): nothing was written"
            )
