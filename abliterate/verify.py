"""``abliterate verify`` and ``abliterate evaluate``: compare checkpoints on disk."""

from __future__ import annotations

from typing import Any

import torch

from abliterate.batching import all_position_logits, encode, forward_batches
from abliterate.prompts import bundled, read_prompts


def verify_checkpoints(
    original: str,
    edited: str,
    direction_file: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    architecture: str | None = None,
    trust_remote_code: bool = False,
    prompts: list[str] | None = None,
) -> dict[str, Any]:
    """Compare ``edited`` with ``original`` under the adapter's writer hooks for the saved direction.

    For post-norm families it also reports the distance to a full residual-stream ablation (hooks on
    every block input), which is what a weight edit cannot express there.

    Args:
        original: the unedited model (hub id, directory, .gguf, or ``demo``).
        edited: the edited checkpoint.
        direction_file: ``direction.safetensors``.
        dtype: model dtype for both.
        device: device for both.
        architecture: adapter override.
        trust_remote_code: allow repository code.
        prompts: prompts to compare on (default: 8 bundled harmful + 8 harmless evaluation prompts).

    Returns:
        The report as a plain dictionary (``passed`` tells the verdict).
    """
    from abliterate.adapters import resolve_adapter
    from abliterate.direction import load_direction
    from abliterate.hooks import ablate_direction
    from abliterate.loading import load_model
    from abliterate.parity import compare_logits

    direction, metadata = load_direction(direction_file)
    options = dict(dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    reference_model = load_model(original, **options)
    adapter = resolve_adapter(reference_model.model, architecture)
    d_model = reference_model.model.get_input_embeddings().weight.shape[-1]
    if direction.shape[-1] != d_model:
        raise ValueError(f"direction has {direction.shape[-1]} dimensions, the model has {d_model}")
    prompts = prompts or bundled("harmful", "eval")[:8] + bundled("harmless", "eval")[:8]
    tokenizer = reference_model.tokenizer
    encoded = encode(tokenizer, prompts, batch_size=len(prompts), share_prefix=False)
    mask = encoded.batches[0][1]
    with ablate_direction(reference_model.model, adapter, direction):
        reference = all_position_logits(reference_model.model, encoded)
    residual_report = None
    if adapter.post_norm:
        from abliterate.residual import ablate_residual_stream

        with ablate_residual_stream(reference_model.model, adapter, direction):
            residual_reference = all_position_logits(reference_model.model, encoded)
    dtype_name = reference_model.dtype_name
    del reference_model
    edited_model = load_model(edited, **options)
    candidate = all_position_logits(edited_model.model, encoded)
    report = compare_logits(reference, candidate, dtype_name, mask)
    result: dict[str, Any] = {
        "original": original,
        "edited": edited,
        "adapter": adapter.name,
        "direction_layer": metadata.get("layer"),
        "direction_position": metadata.get("position"),
        **report.to_dict(),
    }
    if adapter.post_norm:
        residual_report = compare_logits(residual_reference, candidate, dtype_name, mask)
        result["post_norm"] = True
        result["full_residual_ablation_max_abs_logit_diff"] = residual_report.max_abs_logit_diff
        result["full_residual_ablation_mean_kl"] = residual_report.mean_kl
        result["full_residual_ablation_top1_agreement"] = residual_report.top1_agreement
    return result


def evaluate_model(
    model: str,
    *,
    baseline: str | None = None,
    harmful: str | None = None,
    harmless: str | None = None,
    n_prompts: int = 50,
    dtype: str = "auto",
    device: str = "auto",
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """Refusal rate of ``model`` on harmful prompts, and first-token KL to ``baseline`` on harmless ones.

    Returns:
        ``{"refusal_rate", "n", ...}`` plus ``baseline_refusal_rate`` and ``kl_harmless`` with a baseline.
    """
    from abliterate.evaluate import refusal_rate
    from abliterate.loading import load_model
    from abliterate.parity import kl_divergence

    harmful_prompts = (read_prompts(harmful) if harmful else bundled("harmful", "eval"))[:n_prompts]
    harmless_prompts = (read_prompts(harmless) if harmless else bundled("harmless", "eval"))[:n_prompts]

    def measure(source: str) -> tuple[float, int, torch.Tensor]:
        loaded = load_model(source, dtype=dtype, device=device)
        evaluation = refusal_rate(
            loaded.model, loaded.tokenizer, harmful_prompts, max_new_tokens=max_new_tokens
        )
        encoded = encode(loaded.tokenizer, harmless_prompts, batch_size=32)
        logits = torch.cat([chunk.float().cpu() for chunk in forward_batches(loaded.model, encoded)])
        return evaluation.refusal_rate, evaluation.n, logits

    rate, n, logits = measure(model)
    result: dict[str, Any] = {"model": model, "refusal_rate": rate, "n": n}
    if baseline is not None:
        base_rate, _, base_logits = measure(baseline)
        result["baseline"] = baseline
        result["baseline_refusal_rate"] = base_rate
        result["kl_harmless"] = kl_divergence(base_logits, logits).mean().item()
    return result
