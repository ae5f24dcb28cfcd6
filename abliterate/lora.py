"""The edit as a PEFT LoRA adapter: rank 1 per residual writer, exact up to float rounding (issue 9.4).

The fold ``W' = W − s r̂ (r̂ᵀ W)`` is a rank-1 update of every writer, so a LoRA of rank 1 with scaling 1
(``lora_alpha = r = 1``) expresses it: ``B = −s r̂`` (``[d_model, 1]``) and ``A = r̂ᵀ W`` (``[1, d_in]``),
computed from the weights the adapter will be loaded on. Per layout:

* linear ``[d_model, d_in]``: ``A = r̂ᵀ W``;
* GPT-2 ``Conv1D`` ``[d_in, d_model]`` (peft ``fan_in_fan_out``): ``A = (W r̂)ᵀ``;
* embedding ``[vocab, d_model]``: peft's ``lora_embedding_A = (E r̂)ᵀ`` (``[1, vocab]``),
  ``lora_embedding_B = −s r̂``; a tied head is untouched, as in the fold;
* a writer bias ``b``: peft's ``lora_bias`` (a bias on ``lora_B``) of ``−s r̂ (r̂ᵀ b)``.

Fused expert tensors have no LoRA module peft can attach a bias to or that this module writes yet: such
a model is refused with one line. The adapter is exact only on the weights it was computed from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from abliterate.adapters import Adapter, ResolvedWriter, residual_writers

LORA_LAYOUTS = ("linear", "conv1d", "embedding")


def lora_state(
    model: nn.Module,
    adapter: Adapter,
    direction: torch.Tensor,
    strength_of: Callable[[ResolvedWriter], float] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The adapter's tensors (peft's on-disk names) and its ``LoraConfig`` fields.

    Args:
        model: the original model (not edited), on any device.
        adapter: its architecture description.
        direction: ``[d_model]`` direction (normalized here).
        strength_of: per-writer strength (default 1); writers of strength 0 get no LoRA.

    Raises:
        ValueError: a writer peft cannot express exactly (fused experts), named in one line.
    """
    r = direction.detach().double().cpu()
    r = r / r.norm()
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    fan_in_fan_out = False
    has_bias = False
    for writer in residual_writers(model, adapter):
        strength = 1.0 if strength_of is None else float(strength_of(writer))
        if strength == 0:
            continue
        if writer.layout not in LORA_LAYOUTS:
            raise ValueError(
                f"{writer.name} ({writer.layout} layout) cannot be written as an exact LoRA adapter; "
                "use --format checkpoint"
            )
        weight = writer.weight_tensor().detach().double().cpu()
        key = f"base_model.model.{writer.name}"
        b = (-strength * r)[:, None].float()
        if writer.layout == "embedding":
            tensors[f"{key}.lora_embedding_A"] = (weight @ r)[None, :].float()
            tensors[f"{key}.lora_embedding_B"] = b
        else:
            a = r @ weight if writer.layout == "linear" else weight @ r  # [d_in]
            tensors[f"{key}.lora_A.weight"] = a[None, :].float()
            tensors[f"{key}.lora_B.weight"] = b
            fan_in_fan_out |= writer.layout == "conv1d"
        bias = writer.bias_tensor()
        if bias is not None:
            value = bias.detach().double().cpu()
            tensors[f"{key}.lora_B.bias"] = (-strength * (value @ r) * r).float()
            has_bias = True
        targets.append(writer.name)
    embedded = [name for name in targets if name in {w.name for w in _embeddings(model, adapter)}]
    if has_bias and embedded:
        # peft's lora_bias is one switch for every target, and its Embedding layer refuses it.
        raise ValueError(
            f"peft cannot hold both the writer biases and the embedding {embedded[0]} in one exact "
            "adapter (lora_bias is not supported on Embedding); use --format checkpoint"
        )
    config = {
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_bias": has_bias,
        "bias": "none",
    }
    return tensors, config


def write_lora(
    model: nn.Module,
    adapter: Adapter,
    direction: torch.Tensor,
    output: str | Path,
    *,
    base_model: str,
    strength_of: Callable[[ResolvedWriter], float] | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``output``.

    Args:
        model: the original model the adapter is computed from (and is exact on).
        adapter: its architecture description.
        direction: ``[d_model]`` direction.
        output: an existing directory.
        base_model: what the adapter must be loaded on, as recorded in ``base_model_name_or_path``.
        strength_of: per-writer strengths of a searched edit.

    Returns:
        ``output``.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors, fields = lora_state(model, adapter, direction, strength_of)
    config = LoraConfig(base_model_name_or_path=base_model, task_type="CAUSAL_LM", **fields)
    output = Path(output)
    config.save_pretrained(str(output))
    save_file(
        {name: t.contiguous() for name, t in tensors.items()}, str(output / "adapter_model.safetensors")
    )
    return output


def load_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """``PeftModel.from_pretrained(model, directory)`` in eval mode (the parity gate's edited model)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory)).eval()


def adapter_size(directory: str | Path) -> int:
    """Bytes of the adapter's weights file."""
    return (Path(directory) / "adapter_model.safetensors").stat().st_size


def describe(directory: str | Path) -> dict[str, object]:
    """The adapter's config as a dictionary (for manifests and tests)."""
    return json.loads((Path(directory) / "adapter_config.json").read_text("utf-8"))


def _embeddings(model: nn.Module, adapter: Adapter) -> list[ResolvedWriter]:
    from abliterate.adapters.resolve import embeddings_of

    return embeddings_of(model, adapter)


def peft_parity(
    model: nn.Module,
    adapter: Adapter,
    declared: object,
    directory: str | Path,
    prompts: object,
    dtype: str,
) -> object:
    """Logit parity of ``PeftModel.from_pretrained(model, directory)`` against the hooked original.

    The adapter is loaded onto ``model`` itself and unloaded afterwards, so the original weights are
    never copied. Returns the ``ParityReport``.
    """
    from abliterate.batching import all_position_logits
    from abliterate.hooks import ablate_with_strengths
    from abliterate.parity import compare_logits
    from abliterate.search import writer_strengths

    strength_of = writer_strengths(declared) or (lambda writer: 1.0)
    with ablate_with_strengths(model, adapter, declared.direction, strength_of):
        reference = all_position_logits(model, prompts)
    wrapped = load_lora(model, directory)
    try:
        edited = all_position_logits(wrapped, prompts)
    finally:
        wrapped.unload()
    return compare_logits(reference, edited, dtype, prompts.batches[0][1])


def apply_lora(
    checkpoint: str,
    declared: object,
    output: str | Path,
    *,
    architecture: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, object]:
    """``abliterate apply --format lora``: the adapter of a direction file's edit for ``checkpoint``.

    The model is loaded (not streamed: the adapter is computed from its weights), the adapter written,
    loaded back through peft and compared with the hooked original on 4 + 4 bundled prompts.

    Returns:
        ``(output, parity report)``.

    Raises:
        ParityError: the adapter does not reproduce the edit (nothing is written).
        ValueError: a writer peft cannot express exactly.
    """
    from abliterate.adapters import resolve_adapter
    from abliterate.batching import encode
    from abliterate.checkpoint import atomic_directory, check_output_dir
    from abliterate.gate import ParityError
    from abliterate.loading import load_model
    from abliterate.prompts import bundled
    from abliterate.search import writer_strengths

    target = check_output_dir(output, overwrite)
    loaded = load_model(checkpoint)
    adapter = resolve_adapter(loaded.model, architecture)
    texts = bundled("harmful", "eval")[:4] + bundled("harmless", "eval")[:4]
    prompts = encode(loaded.tokenizer, texts, batch_size=len(texts), share_prefix=False)
    with atomic_directory(target) as staging:
        write_lora(
            loaded.model,
            adapter,
            declared.direction,
            staging,
            base_model=loaded.base_model or checkpoint,
            strength_of=writer_strengths(declared),
        )
        report = peft_parity(loaded.model, adapter, declared, staging, prompts, loaded.dtype_name)
        if not report.passed:
            raise ParityError(
                f"the LoRA adapter fails parity through peft: {report.reason}; nothing was written"
            )
        (staging / "README.md").write_text(lora_card(checkpoint, report), "utf-8")
    return target, report


def lora_card(source: str, report: object) -> str:
    """The adapter's README: what it is exact on, and its parity."""
    return "\n".join(
        [
            "---",
            "library_name: peft",
            "tags:",
            "- abliterated",
            "- abliterate",
            "- lora",
            "---",
            "",
            "# Abliteration as a LoRA adapter",
            "",
            f"A rank-1 LoRA per residual writer that reproduces abliterate's weight edit of `{source}`.",
            f"It is exact only on the weights it was computed from: `{source}` as loaded by abliterate",
            "(for the demo, the dequantized GGUF, not the Hub release). Load it with",
            "`PeftModel.from_pretrained(model, this_directory)`.",
            "",
            f"Parity through peft vs. the hooked original: max |Δlogit| {report.max_abs_logit_diff:.3g}, "
            f"mean KL {report.mean_kl:.3g}, top-1 agreement {report.top1_agreement:.3f}.",
            "",
        ]
    )
