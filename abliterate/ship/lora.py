"""The edit as a PEFT LoRA adapter on disk: ``adapter_config.json``, ``adapter_model.safetensors``, its card,
and ``apply --format lora`` with its parity through peft (``abliterate.prove.lora_parity``).

The factors themselves (rank k per residual writer, exact up to float rounding, and what peft cannot
express) are computed by ``abliterate.edit.lora_factors``. The LoRA adapter is exact only on the weights
it was computed from. ``adapter`` arguments are the architecture description
(``abliterate.adapters.spec.Adapter``), never the LoRA adapter, which is always a directory here.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from abliterate.adapters.resolve import residual_writers, resolve_adapter
from abliterate.adapters.spec import Adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.lora_factors import NORM_PRESERVING_REFUSAL, lora_state
from abliterate.errors import GateError
from abliterate.io.output import atomic_directory, prepare_output, write_apply_manifest
from abliterate.model import loading  # called through its module, so tests can replace a load
from abliterate.model.batching import encode
from abliterate.model.prompts import bundled
from abliterate.model.sources import hub_revision
from abliterate.prove.lora_parity import peft_parity
from abliterate.prove.parity import ParityReport
from abliterate.ship.report import verify_lines


def write_lora(
    model: nn.Module,
    adapter: Adapter,
    declared: DeclaredEdit,
    output: str | Path,
    *,
    base_model: str,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``output``.

    Args:
        model: the original model the LoRA adapter is computed from (and is exact on).
        adapter: its architecture description.
        declared: the edit (``lora_state``): a direction ``[d_model]``, or an orthonormal subspace
            ``[k, d_model]`` (rank-k adapter), at each writer's ``declared.scales``.
        output: an existing directory.
        base_model: what the adapter must be loaded on, as recorded in ``base_model_name_or_path``.

    Returns:
        ``output``.

    Raises:
        ValueError: a writer peft cannot express exactly (nothing is written).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors, fields = lora_state(model, adapter, declared)
    config = LoraConfig(base_model_name_or_path=base_model, task_type="CAUSAL_LM", **fields)
    output = Path(output)
    config.save_pretrained(str(output))
    save_file(
        {name: t.contiguous() for name, t in tensors.items()}, str(output / "adapter_model.safetensors")
    )
    return output


def adapter_size(directory: str | Path) -> int:
    """Bytes of the LoRA adapter's weights file."""
    return (Path(directory) / "adapter_model.safetensors").stat().st_size


def describe(directory: str | Path) -> dict[str, object]:
    """The LoRA adapter's config as a dictionary (for manifests and tests)."""
    return json.loads((Path(directory) / "adapter_config.json").read_text("utf-8"))


def apply_lora(
    checkpoint: str,
    declared: DeclaredEdit,
    output: str | Path,
    *,
    architecture: str | None = None,
    overwrite: bool = False,
    direction_file: str | Path | None = None,
) -> tuple[Path, ParityReport]:
    """``abliterate apply --format lora``: the LoRA adapter of a direction file's edit for ``checkpoint``.

    The model is loaded (not streamed: the LoRA adapter is computed from its weights); the LoRA adapter is
    written, loaded back through peft and compared with the hooked original on 4 + 4 bundled prompts.
    ``output`` is checked before the load (``checkpoint.prepare_output``: never over or around the source, and
    ``overwrite`` replaces only an earlier abliterate output); an ``abliterate.json`` marks it.

    Returns:
        ``(output, parity report)``.

    Raises:
        GateError: the LoRA adapter does not reproduce the edit (nothing is written).
        ValueError: a writer peft cannot express exactly, or a norm-preserving edit (full rank).
    """
    declared.validate()  # finite and in range, before the model is loaded
    if declared.norm_preserving:
        raise ValueError(NORM_PRESERVING_REFUSAL)
    target = prepare_output(output, checkpoint, overwrite)
    loaded = loading.load_model(checkpoint)
    adapter = resolve_adapter(loaded.model, architecture)
    declared.validate((w.group, w.layer) for w in residual_writers(loaded.model, adapter))  # not a no-op
    texts = bundled("harmful", "eval")[:4] + bundled("harmless", "eval")[:4]
    prompts = encode(loaded.tokenizer, texts, batch_size=len(texts), share_prefix=False)
    with atomic_directory(target) as staging:
        write_lora(
            loaded.model,
            adapter,
            declared,
            staging,
            base_model=loaded.base_model or checkpoint,
        )
        report = peft_parity(loaded.model, adapter, declared, staging, prompts, loaded.dtype_name)
        if not report.passed:
            raise GateError(
                f"the LoRA adapter fails parity through peft: {report.reason}; nothing was written"
            )
        card = lora_card(checkpoint, report, rank=int(describe(staging)["r"]))
        (staging / "README.md").write_text(card, "utf-8")
        revision = hub_revision(checkpoint)
        write_apply_manifest(staging, checkpoint, "lora", revision=revision, direction_file=direction_file)
    return target.path, report


def lora_card(source: str, report: ParityReport, rank: int | None = None) -> str:
    """The LoRA adapter's README: what it is exact on, and its parity.

    Args:
        source: the checkpoint the LoRA adapter was computed from.
        report: its parity through peft.
        rank: the LoRA adapter's rank (the edit's: 1 for a direction, k for a subspace), when known.
    """
    what = "A LoRA" if rank is None else f"A rank-{rank} LoRA"
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
            f"{what} per residual writer that reproduces abliterate's weight edit of `{source}`.",
            f"It is exact only on the weights it was computed from: `{source}` as loaded by abliterate",
            "(for the demo, the dequantized GGUF, not the Hub release). Load it with",
            "`PeftModel.from_pretrained(model, this_directory)`.",
            "",
            f"Parity through peft vs. the hooked original: max |Δlogit| {report.max_abs_logit_diff:.3g}, "
            f"mean KL {report.mean_kl:.3g}, top-1 agreement {report.top1_agreement:.3f}.",
            "",
            *verify_lines(),
        ]
    )
