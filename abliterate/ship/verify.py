"""``abliterate verify`` and ``abliterate evaluate``: compare checkpoints on disk."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from abliterate.config import LoadConfig
from abliterate.model.batching import all_position_logits, encode, forward_batches
from abliterate.model.prompts import bundled, read_prompts

if TYPE_CHECKING:
    from abliterate.prove.gate import GateReport


def verify_checkpoints(
    original: str,
    edited: str,
    direction_file: str,
    *,
    load: LoadConfig | None = None,
    prompts: list[str] | None = None,
    forward: bool = True,
    certificate: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Prove that ``edited`` is ``original`` with the saved direction folded in (``abliterate.prove.gate``).

    Runs the weight certificate (both checkpoints as safetensors, streamed), then, with ``forward``, the
    completeness check on the original and logit parity against the hooked original. For post-norm
    families it also reports the distance to a full residual-stream ablation (hooks on every term
    added to the residual stream), which is what a weight edit cannot express there.

    Args:
        original: the unedited model (hub id, directory, .gguf, or ``demo``).
        edited: the edited checkpoint.
        direction_file: ``direction.safetensors``.
        load: how both models are loaded (default ``LoadConfig()``): ``dtype`` ``auto`` is the edited
            checkpoint's; ``architecture`` overrides the adapter.
        prompts: prompts to compare on (default: 8 bundled harmful + 8 harmless evaluation prompts).
        forward: run the checks that load the models (completeness, logit parity).
        certificate: run the weight certificate.
        progress: show progress bars.

    Returns:
        The gate report as a plain dictionary (``passed`` tells the verdict).
    """
    from abliterate.edit.direction import load_direction
    from abliterate.model.gguf_source import certificate_source
    from abliterate.model.loading import check_device
    from abliterate.prove.certificate import certify_checkpoint
    from abliterate.prove.gate import GateReport
    from abliterate.prove.lora_certificate import is_adapter, verify_adapter
    from abliterate.ship.search_io import declared_from_file
    from abliterate.ship.streaming import local_checkpoint

    load = load or LoadConfig()
    check_device(load.device)  # before the certificate's minutes, not after them
    if is_adapter(edited):  # a PEFT adapter directory (run/apply --format lora): the adapter certificate
        options = _load_options(load, load.dtype)
        return verify_adapter(
            original, edited, direction_file, options, architecture=load.architecture, prompts=prompts,
            forward=forward, certificate=certificate,
        )  # fmt: skip
    direction, metadata = load_direction(direction_file)
    declared = declared_from_file(direction, metadata)  # a searched edit's strengths, 1 for old files
    gate = GateReport()
    original_dir, why_not = local_checkpoint(original)
    edited_dir, why_not_edited = local_checkpoint(edited)
    _compare_files(original, original_dir, edited_dir, gate)
    if certificate:
        original_source, why_not = certificate_source(original)  # a .gguf is read tensor by tensor
        if original_source is not None and edited_dir is not None:
            gate.certificate = certify_checkpoint(
                original_source,
                edited_dir,
                declared,
                architecture=load.architecture,
                progress=progress,
            )
        else:
            gate.skipped["certificate"] = why_not or why_not_edited
    else:
        gate.skipped["certificate"] = "not asked for (--no-certificate)"
    extra: dict[str, Any] = {}
    invalid = _why_invalid(declared)
    if invalid:  # the certificate reports it too; no forward check can stand for such an edit
        gate.skipped["completeness"] = gate.skipped["parity"] = invalid
    elif forward:
        dtype = load.dtype if load.dtype != "auto" else _checkpoint_dtype(edited) or "auto"
        extra = _forward_checks(
            original, edited, declared, gate, _load_options(load, dtype), load.architecture, prompts
        )
    else:
        gate.skipped["completeness"] = gate.skipped["parity"] = "not asked for (--no-forward)"
    return {
        "original": original,
        "edited": edited,
        "direction_layer": metadata.get("layer"),
        "direction_position": metadata.get("position"),
        **extra,
        **gate.to_dict(),
    }


def _load_options(load: LoadConfig, dtype: str) -> dict[str, Any]:
    """``load_model``'s keyword arguments for ``load``, at ``dtype``."""
    return dict(
        dtype=dtype, device=load.device, trust_remote_code=load.trust_remote_code, dispatch=load.dispatch
    )


def _why_invalid(declared: Any) -> str:
    """``DeclaredEdit.validate``'s one line, or an empty string for a valid declared edit."""
    try:
        declared.validate()
    except ValueError as error:
        return str(error)
    return ""


def _compare_files(
    original: str, original_dir: Path | None, edited_dir: Path | None, gate: GateReport
) -> None:
    """Add the comparison of everything beside the weights to ``gate``: ``config.json`` and the companion
    files byte for byte, or for a GGUF original its tokenizer as read from both."""
    from abliterate.prove.files import compare_companions, compare_gguf_tokenizer

    if edited_dir is None:
        gate.skipped["files"] = "the edited checkpoint is not a local or Hub checkpoint directory"
    elif original_dir is not None:
        gate.files = compare_companions(original_dir, edited_dir)
    elif Path(original).suffix == ".gguf" and Path(original).is_file():
        gate.files = compare_gguf_tokenizer(Path(original), edited_dir)
    else:
        gate.skipped["files"] = f"{original} is not a checkpoint directory or a .gguf file"


def _checkpoint_dtype(checkpoint: str) -> str | None:
    """The dtype a local checkpoint's config.json declares, if any."""
    import json

    config = Path(checkpoint).expanduser() / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    value = data.get("dtype") or data.get("torch_dtype")
    return value if isinstance(value, str) else None


def _forward_checks(
    original: str,
    edited: str,
    declared: Any,
    gate: Any,
    options: dict[str, Any],
    architecture: str | None,
    prompts: list[str] | None,
) -> dict[str, Any]:
    """Completeness on the original, then logit parity of the edited model against the hooked original."""
    from abliterate.adapters import resolve_adapter
    from abliterate.model.loading import load_model
    from abliterate.prove.gate import completeness_on, edited_parity, hooked_reference
    from abliterate.prove.parity import compare_logits
    from abliterate.ship.search_io import writer_strengths

    direction = declared.direction
    reference_model = load_model(original, **options)
    model = reference_model.model
    adapter = resolve_adapter(model, architecture)
    d_model = model.get_input_embeddings().weight.shape[-1]
    if direction.shape[-1] != d_model:
        raise ValueError(f"direction has {direction.shape[-1]} dimensions, the model has {d_model}")
    prompts = prompts or bundled("harmful", "eval")[:8] + bundled("harmless", "eval")[:8]
    encoded = encode(reference_model.tokenizer, prompts, batch_size=len(prompts), share_prefix=False)
    gate.completeness = completeness_on(model, adapter, encoded)
    reference = hooked_reference(
        model,
        adapter,
        direction,
        encoded,
        reference_model.dtype_name,
        writer_strengths(declared),
        declared.norm_preserving,
    )
    residual_reference = None
    if adapter.post_norm:
        from abliterate.prove.residual import ablate_residual_stream

        with ablate_residual_stream(model, adapter, direction):
            residual_reference = all_position_logits(model, encoded)
    del reference_model, model
    edited_model = load_model(edited, **options)
    gate.parity = edited_parity(edited_model.model, adapter, encoded, reference)
    extra: dict[str, Any] = {"adapter": adapter.name}
    if residual_reference is not None:
        candidate = all_position_logits(edited_model.model, encoded)
        residual = compare_logits(residual_reference, candidate, "float32", reference.mask)
        extra["post_norm"] = True
        extra["full_residual_ablation_max_abs_logit_diff"] = residual.max_abs_logit_diff
        extra["full_residual_ablation_mean_kl"] = residual.mean_kl
        extra["full_residual_ablation_top1_agreement"] = residual.top1_agreement
    return extra


def evaluate_model(
    model: str,
    *,
    baseline: str | None = None,
    harmful: str | None = None,
    harmless: str | None = None,
    n_prompts: int = 50,
    load: LoadConfig | None = None,
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """Refusal rate of ``model`` on harmful prompts, and first-token KL to ``baseline`` on harmless ones.

    Returns:
        ``{"refusal_rate" (markers), "judged_refusal_rate" (judge), "judged_interval_95", "n", ...}`` plus
        ``baseline_refusal_rate``, ``baseline_judged_refusal_rate`` and ``kl_harmless`` with a baseline.

    Raises:
        ValueError: ``n_prompts`` is below 1, ``load.device`` is not a device of this machine, or a prompt
            source is malformed.
    """
    from abliterate.find.evaluate import refusal_rate
    from abliterate.find.judge import wilson_interval
    from abliterate.model.loading import check_device, load_model
    from abliterate.prove.parity import kl_divergence

    if n_prompts < 1:  # a negative count would slice from the end: -3 evaluated 47 prompts
        raise ValueError(f"--n must be at least 1, got {n_prompts}")
    load = load or LoadConfig()
    check_device(load.device)
    options = dict(dtype=load.dtype, device=load.device, dispatch=load.dispatch)
    harmful_prompts = (read_prompts(harmful) if harmful else bundled("harmful", "eval"))[:n_prompts]
    harmless_prompts = (read_prompts(harmless) if harmless else bundled("harmless", "eval"))[:n_prompts]

    def measure(source: str) -> tuple[Any, torch.Tensor]:
        loaded = load_model(source, **options)
        evaluation = refusal_rate(
            loaded.model, loaded.tokenizer, harmful_prompts, max_new_tokens=max_new_tokens
        )
        encoded = encode(loaded.tokenizer, harmless_prompts, batch_size=32)
        logits = torch.cat([chunk.float().cpu() for chunk in forward_batches(loaded.model, encoded)])
        return evaluation, logits

    evaluation, logits = measure(model)
    judged = round(evaluation.judged_refusal_rate * evaluation.n)
    result: dict[str, Any] = {
        "model": model,
        "refusal_rate": evaluation.refusal_rate,
        "judged_refusal_rate": evaluation.judged_refusal_rate,
        "judged_interval_95": wilson_interval(judged, evaluation.n),
        "n": evaluation.n,
    }
    if baseline is not None:
        base, base_logits = measure(baseline)
        result["baseline"] = baseline
        result["baseline_refusal_rate"] = base.refusal_rate
        result["baseline_judged_refusal_rate"] = base.judged_refusal_rate
        result["kl_harmless"] = kl_divergence(base_logits, logits).mean().item()
    return result
