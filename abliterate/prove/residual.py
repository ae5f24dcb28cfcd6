"""Full residual-stream ablation: the reference that post-norm families can only approximate.

``abliterate.model.hooks.ablated`` projects r̂ out of what each writer emits, which is exactly what the
weight fold reproduces. Where a norm sits between a writer and the residual add (Gemma-2/3,
OLMo-2), the normed output can point along r̂ again, so the residual stream still carries r̂. The
placement here, ``residual_sites`` with the ``full_projection`` operator, projects r̂ out of every term
that is actually added to the residual stream (the embeddings, and each writer's output norm where it
has one, else the writer), so r̂ is absent from the residual stream everywhere. For pre-norm families
it installs the same hooks as the writer-level ablation; for post-norm families the logit distance
between the two is the price of the fold.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from abliterate.adapters.paths import module_at
from abliterate.adapters.resolve import blocks_of, embeddings_of
from abliterate.adapters.spec import Adapter
from abliterate.edit.direction import unit_rows
from abliterate.edit.kernel import ulp
from abliterate.model.dispatch import input_device
from abliterate.model.hooks import Operator, projection, registered, subspace_projection


def residual_terms(model: nn.Module, adapter: Adapter) -> list[nn.Module]:
    """Every module whose output is added to the residual stream as it is.

    Args:
        model: the causal LM.
        adapter: its architecture description.

    Returns:
        The embeddings, then per block each present writer, or the norm applied to its output.
    """
    terms = [embedding.module for embedding in embeddings_of(model, adapter)]
    _, blocks = blocks_of(model, adapter)
    for index, block in enumerate(blocks):
        for writer in adapter.writers:
            path = writer.output_norm or writer.path
            try:
                terms.append(block.get_submodule(path))
            except AttributeError:
                if writer.optional:
                    continue
                raise LookupError(f"adapter {adapter.name!r}: block {index} has no module {path!r}") from None
    return terms


def residual_sites(model: nn.Module, adapter: Adapter) -> list[tuple[nn.Module, None]]:
    """The placement of an ablation on every term added to the residual stream (``residual_terms``);
    these sites are no writers, so operators get ``None`` for them."""
    return [(module, None) for module in residual_terms(model, adapter)]


def full_projection(direction: torch.Tensor) -> Operator:
    """All of ``direction`` projected out at every site (strength 1), for ``residual_sites``.

    Args:
        direction: ``[d_model]``, normalized here; or an orthonormal subspace ``[k, d_model]`` (each
            row normalized here).
    """
    if direction.dim() == 2:
        rows = direction.shape[0]
        return subspace_projection(unit_rows(direction), lambda site: [1.0] * rows)
    return projection(direction)


@dataclass(frozen=True)
class CompletenessReport:
    """Do the adapter's listed terms account for everything added to the residual stream?

    For every block (and the embeddings before block 0), the increment of the residual stream over the
    block, per token, must equal a combination of the listed terms' outputs (writer outputs, or the
    output norms of post-norm families) up to rounding: ``Δ = Σ c_k t_k + e`` with the coefficients
    fitted per token (they absorb scalar multipliers and per-token gates such as a shared expert's).
    The statistic is ``|e| / |rounding bound|`` over the block's tokens: at most 1 when the list is
    complete. The check's built-in negative control removes one listed writer from the adapter (from
    every block) and reports what the statistic would then be: ``leave_one_out`` per writer (the
    largest over blocks), and its smallest value ``min_leave_one_out``, which must be far above 1 for
    the check to see any missing writer. (In a single block a writer's output can be within rounding
    of the residual stream's size, e.g. a bf16 model's massive-activation layers: ``per_block`` shows
    where.)

    Attributes:
        passed: ``max_statistic <= 1``.
        max_statistic: the largest per-block statistic with every listed term.
        min_leave_one_out: the smallest, over listed writers, of the statistic without that writer.
        leave_one_out: writer path (``embedding:…`` for embeddings) → statistic without it.
        per_block: ``[block, statistic, smallest statistic with one term left out]`` rows
            (block -1: the embeddings).
        n_tokens: tokens measured.
        reason: why it failed (empty when passed).
    """

    passed: bool
    max_statistic: float
    min_leave_one_out: float
    leave_one_out: dict[str, float]
    per_block: list[list[float]]
    n_tokens: int
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary for JSON output."""
        return asdict(self)


def _first_tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def block_terms(block: nn.Module, adapter: Adapter) -> list[tuple[str, nn.Module]]:
    """``(writer path, module)`` of one block whose outputs are added to the residual stream."""
    terms = []
    for writer in adapter.writers:
        module = module_at(block, writer.output_norm or writer.path)
        if module is not None:
            terms.append((writer.path, module))
    return terms


class _Recorder:
    """Collects, per block, the residual stream entering it, leaving it, and each listed term's output."""

    def __init__(self, n_blocks: int) -> None:
        self.inputs: dict[int, torch.Tensor] = {}
        self.terms: dict[int, list[tuple[str, torch.Tensor]]] = {index: [] for index in range(-1, n_blocks)}
        self.last_output: torch.Tensor | None = None

    def handles(self, model: nn.Module, adapter: Adapter) -> Iterator[torch.utils.hooks.RemovableHandle]:
        _, blocks = blocks_of(model, adapter)

        def block_input(index: int) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                self.inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

            return hook

        def term_output(index: int, name: str) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                self.terms[index].append((name, _first_tensor(output).detach().clone()))

            return hook

        def final_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.last_output = _first_tensor(output).detach().clone()

        for embedding in embeddings_of(model, adapter):
            yield embedding.module.register_forward_hook(term_output(-1, f"embedding:{embedding.name}"))
        for index, block in enumerate(blocks):
            yield block.register_forward_pre_hook(block_input(index), with_kwargs=True)
            for name, module in block_terms(block, adapter):
                yield module.register_forward_hook(term_output(index, name))
        yield blocks[len(blocks) - 1].register_forward_hook(final_output)


def _as_stream(term: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """A term's output as ``[tokens, d_model]`` rows aligned with the residual stream's."""
    if term.numel() == stream.numel():  # MoE experts may return flattened tokens [batch·seq, d]
        return term.reshape(-1, stream.shape[-1])
    # Position embeddings broadcast over the batch ([1, seq, d] or [seq, d]).
    return torch.broadcast_to(term, stream.shape).reshape(-1, stream.shape[-1])


def _fit_residuals(increment: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """Per token, ``|Δ − T c|`` with ``c`` the least-squares fit; ``Δ`` is ``[N, d]``, ``T`` ``[N, d, k]``."""
    if terms.shape[-1] == 0:
        return increment.norm(dim=-1)
    gram = terms.transpose(1, 2) @ terms  # [N, k, k]
    ridge = 1e-12 * gram.diagonal(dim1=1, dim2=2).amax(-1).clamp_min(1e-300)
    gram = gram + ridge[:, None, None] * torch.eye(terms.shape[-1], dtype=terms.dtype)
    coefficients = torch.linalg.solve(gram, (terms.transpose(1, 2) @ increment[..., None]))
    return (increment - (terms @ coefficients)[..., 0]).norm(dim=-1)


def _block_statistics(
    before: torch.Tensor, after: torch.Tensor, terms: list[tuple[str, torch.Tensor]], mask: torch.Tensor
) -> tuple[float, dict[str, float]]:
    """(statistic with all terms, term name → statistic with that term left out) for one block."""
    dtype = after.dtype
    keep = mask.reshape(-1).bool()
    names = [name for name, _ in terms]
    flat = [_as_stream(term, after)[keep].double() for _, term in terms]
    start = before.reshape(-1, before.shape[-1])[keep].double()
    end = after.reshape(-1, after.shape[-1])[keep].double()
    stacked = torch.stack(flat, dim=-1) if flat else end.new_zeros((*end.shape, 0))
    magnitude = torch.maximum(start.abs(), end.abs()) + stacked.abs().sum(-1)
    # Each residual add rounds its result to the model dtype; a block adds a few terms (and may scale them
    # first), so its increment can differ from the sum of the listed terms by a few ulps per element:
    # the bound allows ``terms + 1`` of them.
    bound = (len(flat) + 1) * ulp(magnitude, dtype)
    bound_norm = bound.norm(dim=-1).pow(2).sum().sqrt().clamp_min(1e-300)
    increment = end - start

    def statistic(columns: torch.Tensor) -> float:
        return (_fit_residuals(increment, columns).pow(2).sum().sqrt() / bound_norm).item()

    full = statistic(stacked)
    left_out: dict[str, float] = {}
    for name in set(names):  # a module called twice in a block is left out with all its calls
        kept = [k for k, other in enumerate(names) if other != name]
        left_out[name] = statistic(stacked[..., kept])
    return full, left_out


@torch.no_grad()
def check_completeness(
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, mask: torch.Tensor
) -> CompletenessReport:
    """Check on real tokens that the adapter's terms account for every residual-stream increment.

    Args:
        model: the unedited causal LM (any dtype; no hooks of ours may be installed).
        adapter: its architecture description.
        input_ids: ``[batch, seq]`` prompts, padded.
        mask: ``[batch, seq]`` attention mask (1 = real token).

    Returns:
        The report; experts no token is routed to are invisible here (the certificate covers them).
    """
    _, blocks = blocks_of(model, adapter)
    recorder = _Recorder(len(blocks))
    device = input_device(model)  # never a meta tensor's device: the embedding may be offloaded
    with registered(recorder.handles(model, adapter)):
        model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
    mask = mask.cpu()
    rows = []
    leave_one_out: dict[str, float] = {}
    zero = torch.zeros_like(recorder.inputs[0])
    for index in range(-1, len(blocks)):
        before = zero if index == -1 else recorder.inputs[index]
        after = recorder.inputs[index + 1] if index + 1 < len(blocks) else recorder.last_output
        terms = [(name, term.to("cpu")) for name, term in recorder.terms[index]]
        full, left_out = _block_statistics(before.cpu(), after.cpu(), terms, mask)
        rows.append([index, full, min(left_out.values(), default=float("inf"))])
        for name, value in left_out.items():
            leave_one_out[name] = max(leave_one_out.get(name, 0.0), value)
    worst = max(row[1] for row in rows)
    least = min(leave_one_out.values(), default=float("inf"))
    failing = [row for row in rows if not row[1] <= 1.0]
    reason = ""
    if failing:
        block = int(failing[0][0])
        where = "the embeddings" if block == -1 else f"block {block}"
        reason = (
            f"the adapter's writers do not account for the residual stream at {where} "
            f"(statistic {failing[0][1]:.3g} > 1): a residual writer is missing from adapter {adapter.name!r}"
        )
    return CompletenessReport(not failing, worst, least, leave_one_out, rows, int(mask.sum()), reason)
