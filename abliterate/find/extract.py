"""Candidate refusal directions: difference of mean residual streams at the end-of-instruction tokens."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from abliterate.adapters.resolve import blocks_of
from abliterate.adapters.spec import Adapter
from abliterate.model.batching import EncodedPrompts, forward_batches
from abliterate.model.hooks import record_block_inputs, stop_before


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everything else accumulates in float64 as the method asks.
    return torch.float32 if device.type == "mps" else torch.float64


@torch.no_grad()
def mean_block_inputs(
    model: nn.Module,
    adapter: Adapter,
    encoded: EncodedPrompts,
    n_positions: int,
    layers: int,
    *,
    progress: bool = True,
    description: str = "extract",
) -> torch.Tensor:
    """Mean residual stream entering blocks ``0 … layers-1`` at the last ``n_positions`` tokens.

    The forward pass stops before block ``layers`` (no later block, final norm or logits run), and
    sums stay on the device where each block lives, in float64.

    Args:
        model: the causal LM.
        adapter: its architecture description.
        encoded: the prompts (left padded, so the EOI tokens are the last ``n_positions``).
        n_positions: number of end-of-instruction tokens.
        layers: number of leading blocks to record.
        progress: show a progress bar.
        description: progress bar label.

    Returns:
        ``[n_positions, layers, d_model]`` float64 means on the CPU.
    """
    sums: dict[int, torch.Tensor] = {}

    def record(layer: int, hidden: torch.Tensor) -> None:
        # [batch, seq, d_model] -> [n_positions, d_model] summed over the batch
        eoi = hidden[:, -n_positions:].to(_accumulator_dtype(hidden.device)).sum(0)
        sums[layer] = eoi if layer not in sums else sums[layer] + eoi

    _, blocks = blocks_of(model, adapter)

    @contextmanager
    def hooks(rows: int, prefix: bool) -> Iterator[None]:
        with ExitStack() as stack:
            if not prefix:
                stack.enter_context(record_block_inputs(model, adapter, record, range(layers)))
            # Registered after the recorder, so block ``layers - 1`` is recorded before the stop.
            stack.enter_context(stop_before(model, adapter, min(layers, len(blocks))))
            yield

    bar = tqdm(total=encoded.count, desc=description, unit="prompt", disable=not progress)
    with bar:
        for index, _ in enumerate(forward_batches(model, encoded, hooks=hooks, logits=False)):
            bar.update(encoded.batches[index][0].shape[0])
    return torch.stack([sums[layer].cpu() / encoded.count for layer in range(layers)], dim=1)


def candidate_directions(
    harmful_means: torch.Tensor, harmless_means: torch.Tensor, project_harmless: bool = False
) -> torch.Tensor:
    """``candidates[pos, layer] = mean_harmful − mean_harmless`` (float64, ``[n_pos, n_layers, d]``).

    Args:
        harmful_means: ``[n_pos, n_layers, d]`` mean residual streams on harmful prompts.
        harmless_means: the same on harmless prompts.
        project_harmless: remove from each candidate its component along the harmless mean at the
            same position and layer, so ablating it leaves the typical harmless activation alone
            (measured on the demo model: first-token KL 0.066 → 0.050 at the chosen candidate,
            0.35 → 0.09 one layer earlier; see BENCHMARKS.md).
    """
    if harmful_means.shape != harmless_means.shape:
        raise ValueError("harmful and harmless means must have the same shape")
    difference = harmful_means - harmless_means
    if project_harmless:
        unit = harmless_means / harmless_means.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        difference = difference - (difference * unit).sum(-1, keepdim=True) * unit
    return difference


def extract_candidates(
    model: nn.Module,
    adapter: Adapter,
    harmful: EncodedPrompts,
    harmless: EncodedPrompts,
    n_positions: int,
    layers: int | None = None,
    *,
    project_harmless: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """Candidate refusal directions for every (EOI position, layer).

    Args:
        model: the causal LM.
        adapter: its architecture description.
        harmful: encoded harmful training prompts.
        harmless: encoded harmless training prompts.
        n_positions: number of end-of-instruction tokens.
        layers: record only the first ``layers`` blocks (default: all).
        project_harmless: see ``candidate_directions``.
        progress: show progress bars.

    Returns:
        ``[n_positions, layers, d_model]`` float64 candidates.
    """
    prompts = {"harmful": harmful, "harmless": harmless}
    means = extract_means(model, adapter, prompts, n_positions, layers, progress=progress)
    return candidate_directions(means["harmful"], means["harmless"], project_harmless)


def extract_means(
    model: nn.Module,
    adapter: Adapter,
    prompts: Mapping[str, EncodedPrompts],
    n_positions: int,
    layers: int | None = None,
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Mean block inputs ``[n_positions, layers, d_model]`` (float64) of each named prompt set, in order.

    ``candidate_directions`` turns the harmful and harmless means into candidates; the search also uses
    the harmless means (directions orthogonal to them). A set's name labels its progress bar.
    """
    _, blocks = blocks_of(model, adapter)
    layers = len(blocks) if layers is None else layers
    return {
        name: mean_block_inputs(
            model, adapter, encoded, n_positions, layers, progress=progress, description=f"extract {name}"
        )
        for name, encoded in prompts.items()
    }
