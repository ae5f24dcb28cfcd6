"""The on-disk patterns derived from each adapter's writers match what the hand-written ones matched.

Each family used to list its on-disk tensor names a second time, as regular expressions. They are now
derived from the block list, the embeddings and each writer (with aliases where the hub names differ);
this test keeps the hand-written patterns they replaced and checks, for every registered model type,
that both match the same names with the same layouts: the tiny model's state_dict keys, the names
``save_pretrained`` writes, and those names as other checkpoints spell them (multimodal and older hub
prefixes, GPT-2's bare names, a bias beside each weight).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from abliterate.adapters.registry import get_adapter, registered_model_types
from abliterate.adapters.spec import Adapter
from abliterate.io.safetensors import find_shards, read_header
from tests import tiny

_TEXT = r"(?:model\.|model\.language_model\.|language_model\.model\.)"
_LAYER = _TEXT + r"layers\.\d+"
_EMBED_TOKENS = (_TEXT + r"embed_tokens\.weight",)
_H = r"(?:transformer\.)?h\.\d+"
_O_PROJ = (_LAYER + r"\.self_attn\.o_proj\.(weight|bias)", "linear")
_DOWN_PROJ = (_LAYER + r"\.mlp\.down_proj\.(weight|bias)", "linear")
_PER_EXPERT = (_LAYER + r"\.mlp\.experts\.\d+\.down_proj\.weight", "linear")
_FUSED = (_LAYER + r"\.mlp\.experts\.down_proj", "experts")
_LLAMA = ((_O_PROJ, _DOWN_PROJ), _EMBED_TOKENS)

# The hand-written (checkpoint_writers, checkpoint_embeddings) of each adapter, by adapter name.
HAND_WRITTEN: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    "llama": _LLAMA,
    "cohere": _LLAMA,
    "gemma2": _LLAMA,
    "olmo2": _LLAMA,
    "glm4": _LLAMA,
    "starcoder2": ((_O_PROJ, (_LAYER + r"\.mlp\.c_proj\.(weight|bias)", "linear")), _EMBED_TOKENS),
    "phi": (
        (
            (_LAYER + r"\.self_attn\.dense\.(weight|bias)", "linear"),
            (_LAYER + r"\.mlp\.fc2\.(weight|bias)", "linear"),
        ),
        _EMBED_TOKENS,
    ),
    "qwen3_moe": (
        (
            _O_PROJ,
            _DOWN_PROJ,
            _PER_EXPERT,
            (_LAYER + r"\.block_sparse_moe\.experts\.\d+\.w2\.weight", "linear"),
            _FUSED,
        ),
        _EMBED_TOKENS,
    ),
    "qwen2_moe": (
        (
            _O_PROJ,
            _DOWN_PROJ,
            _PER_EXPERT,
            _FUSED,
            (_LAYER + r"\.mlp\.shared_expert\.down_proj\.weight", "linear"),
        ),
        _EMBED_TOKENS,
    ),
    "deepseek_v3": (
        (
            _O_PROJ,
            _DOWN_PROJ,
            _PER_EXPERT,
            _FUSED,
            (_LAYER + r"\.mlp\.shared_experts\.down_proj\.weight", "linear"),
        ),
        _EMBED_TOKENS,
    ),
    "gpt_oss": ((_O_PROJ, (_LAYER + r"\.mlp\.experts\.down_proj(_bias)?", "experts_t")), _EMBED_TOKENS),
    "granitemoe": (
        (
            _O_PROJ,
            (_LAYER + r"\.block_sparse_moe\.output_linear\.weight", "experts"),
            (_LAYER + r"\.block_sparse_moe\.experts\.down_proj", "experts"),
        ),
        _EMBED_TOKENS,
    ),
    "gpt2": (
        ((_H + r"\.(attn|mlp)\.c_proj\.(weight|bias)", "conv1d"),),
        (r"(?:transformer\.)?(wte|wpe)\.weight",),
    ),
    "gpt_neox": (
        (
            (r"gpt_neox\.layers\.\d+\.attention\.dense\.(weight|bias)", "linear"),
            (r"gpt_neox\.layers\.\d+\.mlp\.dense_4h_to_h\.(weight|bias)", "linear"),
        ),
        (r"gpt_neox\.embed_in\.weight",),
    ),
    "gptj": (
        (
            (_H + r"\.attn\.out_proj\.(weight|bias)", "linear"),
            (_H + r"\.mlp\.fc_out\.(weight|bias)", "linear"),
        ),
        (r"transformer\.wte\.weight",),
    ),
    "falcon": (
        (
            (_H + r"\.self_attention\.dense\.(weight|bias)", "linear"),
            (_H + r"\.mlp\.dense_4h_to_h\.(weight|bias)", "linear"),
        ),
        (r"transformer\.word_embeddings\.weight",),
    ),
}

_SHARED_EXPERT_BIAS = re.compile(r".*\.layers\.\d+\.mlp\.shared_experts?\.down_proj\.bias")

# How other checkpoints spell a name: (prefix it starts with, prefix they write instead).
_RESPELLINGS = (
    ("model.", "model.language_model."),
    ("model.", "language_model.model."),
    ("", "language_model."),
    ("transformer.", ""),
    ("", "transformer."),
)


def _matched(
    names: set[str], writers: tuple[tuple[str, str], ...], embeddings: tuple[str, ...]
) -> dict[str, str]:
    """name -> layout of every name the patterns match, the first matching pattern deciding (as apply)."""
    compiled = [(re.compile(pattern), layout) for pattern, layout in writers]
    matched = {}
    for name in names:
        if any(re.fullmatch(pattern, name) for pattern in embeddings):
            matched[name] = "embedding"
            continue
        layout = next((layout for pattern, layout in compiled if pattern.fullmatch(name)), None)
        if layout is not None:
            matched[name] = layout
    return matched


def _respelled(names: set[str]) -> set[str]:
    spelled = set(names)
    for name in names:
        for prefix, replacement in _RESPELLINGS:
            if name.startswith(prefix):
                spelled.add(replacement + name[len(prefix) :])
    return spelled


def _with_biases(names: set[str]) -> set[str]:
    return names | {name.removesuffix(".weight") + ".bias" for name in names if name.endswith(".weight")}


def _saved_names(model: torch.nn.Module, directory: Path) -> set[str]:
    model.save_pretrained(directory)
    files, _ = find_shards(directory)
    return {entry.name for file in files for entry in read_header(directory / file).entries}


def _adapter(model_type: str) -> Adapter:
    adapter = get_adapter(model_type)
    assert adapter is not None
    return adapter


def test_every_adapter_has_its_hand_written_patterns() -> None:
    assert {_adapter(model_type).name for model_type in registered_model_types()} == set(HAND_WRITTEN)


@pytest.mark.parametrize("model_type", registered_model_types())
def test_derived_patterns_match_what_the_hand_written_ones_did(model_type: str, tmp_path: Path) -> None:
    adapter = _adapter(model_type)
    model = tiny.make_model(model_type)
    in_memory = set(model.state_dict())
    on_disk = _saved_names(model, tmp_path)
    names = _respelled(in_memory | on_disk)
    derived = _matched(names, adapter.checkpoint_writers, adapter.checkpoint_embeddings)
    assert derived == _matched(names, *HAND_WRITTEN[adapter.name])
    # The comparison means something: the saved checkpoint has its writers and embeddings matched.
    assert {layout for name, layout in derived.items() if name in on_disk} >= {"embedding"}
    assert len([name for name in derived if name in on_disk]) > len(adapter.embeddings)
    # With a bias beside every weight, the derived patterns add only the shared experts' biases: their
    # writers fold a bias when a model has one, which the hand-written patterns left out.
    names = _with_biases(names)
    derived = _matched(names, adapter.checkpoint_writers, adapter.checkpoint_embeddings)
    hand_written = _matched(names, *HAND_WRITTEN[adapter.name])
    assert hand_written.items() <= derived.items()
    assert all(_SHARED_EXPERT_BIAS.fullmatch(name) for name in derived.keys() - hand_written.keys())


def test_multimodal_wrapper_names_match_the_same() -> None:
    adapter = _adapter("gemma3_text")
    names = _respelled(set(tiny.make_multimodal_model().state_dict()))
    derived = _matched(names, adapter.checkpoint_writers, adapter.checkpoint_embeddings)
    assert derived == _matched(names, *HAND_WRITTEN[adapter.name])
    assert any(name.startswith("model.language_model.layers.") for name in derived)
