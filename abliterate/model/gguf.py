"""GGUF sources: loading one tensor at a time, and what the dequantized model must forget before it is saved
as a plain checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def drop_gguf_quantization(model: nn.Module) -> None:
    """Dequantized GGUF weights are plain tensors: forget the quantizer so the model saves cleanly.

    ``save_pretrained`` refuses a GGUF-loaded model while ``hf_quantizer`` is set, even after the
    config's ``quantization_config`` is deleted, so both go.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


# The dtype a GGUF run saves for each ``--dtype``: bf16 unless asked otherwise (float32 is twice the size
# and the quantized source never had float32 precision to keep).
_GGUF_OUTPUT = {"auto": "bfloat16", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def gguf_output_dtype(dtype: str) -> str:
    """The dtype a run on a GGUF file saves for ``--dtype`` (``auto`` → bfloat16).

    Such a run loads the dequantized weights in float32, computes the fold from them and casts once, at
    the end: one rounding instead of two (to 16 bits on load, then again after the fold).
    """
    if dtype not in _GGUF_OUTPUT:
        raise ValueError(f"--dtype {dtype!r}: choose {', '.join(_GGUF_OUTPUT)}")
    return _GGUF_OUTPUT[dtype]


def load_gguf_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module | None:
    """The model a GGUF file holds, dequantized one tensor at a time straight into its parameters.

    transformers' own GGUF loading dequantizes every tensor into a float32 state dict first, and the
    model is built from it: the whole model in float32 beside the memory-mapped file and the working copy
    (a 1.5B model peaked at 21 GB). Here the model is built with empty, never-touched parameters and each
    tensor is dequantized, converted by transformers' own tensor processor for the architecture (the same
    name map and layout changes as ``load_gguf_checkpoint``, so the values are the same bits) and becomes
    its parameter: the model once, one tensor's temporaries, and the touched pages of the file.

    Args:
        path: the ``.gguf`` file.
        dtype: the parameters' dtype (each tensor rounded once, from its float32 dequantization).
        device: where the parameters go, one tensor at a time.

    Returns:
        The model (tied weights tied), or ``None`` when its tensors do not map one-to-one onto the
        model's parameters this way (loading through transformers then does it, with its memory cost).

    Raises:
        ValueError: a tensor's shape differs from the parameter's.
    """
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    model, parsed_config = _unfilled_model(path, dtype, device)
    reader = GGUFReader(str(path))  # memory-mapped: a tensor's bytes are read when it is dequantized
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed_config)
    key_mapping = get_gguf_hf_weights_map(model, processor)
    slots = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    produced_by = _produced_names(reader, processor, key_mapping)
    if not _covers(model, slots, produced_by):
        logger.info("%s: tensors map onto the model in ways this loader does not cover", path.name)
        return None
    accumulated: dict[str, dict] = {"tensors": {}}  # what a processor assembles over several tensors
    for tensor in tqdm(reader.tensors, desc="load GGUF", unit="tensor", leave=False, disable=None):
        if not produced_by[tensor.name]:
            continue
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=key_mapping, parsed_parameters=accumulated
        )
        if result.name is not None and result.name in key_mapping:
            _assign(slots, key_mapping[result.name], result.weights, path)
        del weights, result
    for name in list(accumulated["tensors"]):
        _assign(slots, name, accumulated["tensors"].pop(name), path)
    model.tie_weights()
    return model


def _unfilled_model(path: Path, dtype: torch.dtype, device: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model the GGUF's metadata describes, its parameters allocated but never written (no init:
    their pages stay unbacked until replaced), tied weights tied; and the parsed config dict."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # config (and tokenizer) metadata only
    # What ``AutoConfig.from_pretrained(gguf_file=…)`` builds from the same dict.
    config = CONFIG_MAPPING[parsed["config"]["model_type"]].from_dict(dict(parsed["config"]))
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # a tied head is the embedding's parameter, filled with it
    return model, parsed["config"]


def _produced_names(reader: Any, processor: Any, key_mapping: dict[str, str]) -> dict[str, set[str]]:
    """GGUF tensor name → the parameter names the processor makes of it, learnt on zero stand-ins of each
    tensor's shape (nothing dequantized; one stand-in's worth of memory at a time)."""
    produced: dict[str, set[str]] = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # what ``dequantize`` returns
        stand_in = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, (0,) * len(shape))
        scratch: dict[str, dict] = {"tensors": {}}
        with np.errstate(all="ignore"):  # a processor's log(-w) on the zero stand-in
            result = processor.process(
                weights=stand_in, name=tensor.name, tensor_key_mapping=key_mapping, parsed_parameters=scratch
            )
        names = set(scratch["tensors"])
        if result.name is not None and result.name in key_mapping:
            names.add(key_mapping[result.name])
        produced[tensor.name] = names
    return produced


def _covers(model: nn.Module, slots: dict[str, torch.Tensor], produced_by: dict[str, set[str]]) -> bool:
    """Every produced name is a parameter or buffer of the model, once, and every parameter is produced
    or tied to one that is (a parameter left as allocated would hold garbage)."""
    produced = [name for names in produced_by.values() for name in names]
    if len(produced) != len(set(produced)) or not set(produced) <= set(slots):
        return False
    filled = {id(slots[name]) for name in produced}
    return all(id(parameter) in filled for parameter in model.parameters())


def _assign(slots: dict[str, torch.Tensor], name: str, value: Any, path: Path) -> None:
    """Make ``value`` (a processed GGUF tensor) the data of the parameter or buffer ``name``, cast once."""
    slot = slots[name]
    if isinstance(value, np.ndarray):
        # A copy of its own: an F32 tensor may still be a view of the file, which the fold must not write.
        value = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))
    if tuple(value.shape) != tuple(slot.shape):
        shapes = f"{list(value.shape)}, the model expects {list(slot.shape)}"
        raise ValueError(f"{path}: {name} has shape {shapes}")
    slot.data = value.to(device=slot.device, dtype=slot.dtype)


def rounded_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` with its floating parameters and buffers rounded to ``dtype`` once, made one
    tensor at a time: ``copy.deepcopy(model).to(dtype)`` would first hold a second full-precision model.

    Args:
        model: the model (left unchanged).
        dtype: the dtype of the copy (``Module.to(dtype)``'s rule: floating tensors only).

    Returns:
        The copy, sharing nothing with ``model``.
    """
    import copy

    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in memo and tensor.is_floating_point():
            rounded = tensor.detach().to(dtype, copy=True)
            is_parameter = isinstance(tensor, nn.Parameter)
            memo[id(tensor)] = nn.Parameter(rounded, tensor.requires_grad) if is_parameter else rounded
    return copy.deepcopy(model, memo).to(dtype)
