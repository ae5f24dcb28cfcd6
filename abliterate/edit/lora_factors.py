"""The edit as PEFT LoRA factors: rank k per residual writer, exact up to float rounding.

The fold ``W' = (I − Qᵀ diag(s) Q) W`` (``Q`` ``[k, d_model]``: one unit direction, or the orthonormal
rows of a subspace; ``s`` the writer's strength per row) changes every writer by a product of rank k, so a
LoRA of rank ``r = k`` with scaling 1 (``lora_alpha = r``) expresses it: ``B = −Qᵀ diag(s)``
(``[d_model, k]``) and ``A = Q W`` (``[k, d_in]``), computed from the weights the LoRA adapter will be
loaded on. Per layout, in peft's terms:

* linear ``[d_model, d_in]``: ``lora_A = Q W``;
* GPT-2 ``Conv1D`` ``[d_in, d_model]`` (``fan_in_fan_out``): ``lora_A = (W Qᵀ)ᵀ``;
* embedding ``[vocab, d_model]``: ``lora_embedding_A = (E Qᵀ)ᵀ`` (``[k, vocab]``),
  ``lora_embedding_B = B``; a tied head is untouched, as in the fold;
* fused experts ``[E, d_model, d_in]`` / transposed ``[E, d_in, d_model]`` (``target_parameters``, peft's
  ``ParamWrapper``): per expert ``A_e = Q W_e`` (``W_e`` as ``[d_model, d_in]``), stacked expert-major
  into ``lora_A`` ``[E·k, d_in]``, and ``B`` repeated rank-major into ``lora_B`` ``[d_model, k·E]``;
* a writer bias ``b``: ``lora_bias`` (a bias on ``lora_B``) of ``−Qᵀ diag(s) Q b``;
* a linear writer that peft's transformers-5 MoE shim would re-read as an expert name (a dense block's
  ``mlp.down_proj`` in Qwen3-MoE, DeepSeek, GLM-4-MoE) is targeted as the parameter ``<name>.weight``
  (``ParamWrapper`` with one "expert"): the same tensors, wrapped instead of silently dropped.

peft has one ``lora_bias`` switch per LoRA adapter and refuses it on embeddings and on ``target_parameters``:
an edit that touches a writer bias together with an embedding or fused experts, or a bias on a fused
expert tensor, cannot be one exact LoRA adapter and is refused in one line naming the writer. The factors are
exact only on the weights they were computed from. ``abliterate.ship.lora`` writes them as a LoRA adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from abliterate.adapters.resolve import ResolvedWriter, residual_writers
from abliterate.adapters.spec import FUSED_LAYOUTS, Adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.direction import unit_rows
from abliterate.edit.kernel import check_basis
from abliterate.edit.walker import check_finite

LORA_LAYOUTS = ("linear", "conv1d", "embedding", "experts", "experts_t")
_REFUSED = "use --format checkpoint"
# ``(I − s r̂ r̂ᵀ) W D`` differs from ``W`` in every column, so no rank-k adapter holds it.
NORM_PRESERVING_REFUSAL = f"a norm-preserving edit is full rank; {_REFUSED}"


def lora_state(
    model: nn.Module,
    adapter: Adapter,
    declared: DeclaredEdit,
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The LoRA adapter's tensors (peft's on-disk names) and its ``LoraConfig`` fields.

    Args:
        model: the original model (not edited), on any device.
        adapter: its architecture description.
        declared: the edit (not norm-preserving: that one is full rank); its direction ``[d_model]``
            (normalized here), or an orthonormal subspace ``[k, d_model]`` (``check_basis``), sets the
            adapter's rank ``k``, and each writer gets ``declared.scales`` (a writer whose scales are all 0
            gets no LoRA).

    Returns:
        ``(tensors, config fields)``; ``config["r"]`` is the edit's rank.

    Raises:
        ValueError: a writer peft cannot express exactly, named in one line.
    """
    basis = _basis(declared.direction)  # [k, d_model], float64
    tensors, chosen = _writer_factors(model, adapter, basis, declared)
    by_parameter = _targeted_by_parameter(model, chosen)
    biased = [f"{w.name}.{w.bias}" for w in chosen if w.bias_tensor() is not None]
    fan_in_fan_out = any(w.layout == "conv1d" for w in chosen)
    _check_combination(
        biased,
        [w.name for w in chosen if w.layout == "embedding"],
        [f"{w.name}.{w.weight}" for w in by_parameter],
        fan_in_fan_out,
    )
    if biased:
        _add_zero_biases(tensors, chosen)
    rank = basis.shape[0]
    config: dict[str, object] = {
        "r": rank,
        "lora_alpha": rank,  # scaling lora_alpha / r = 1
        "lora_dropout": 0.0,
        "target_modules": [w.name for w in chosen if w not in by_parameter],
        "fan_in_fan_out": fan_in_fan_out,
        "lora_bias": bool(biased),
        "bias": "none",
    }
    if by_parameter:
        config["target_parameters"] = [f"{w.name}.{w.weight}" for w in by_parameter]
    return tensors, config


def _writer_factors(
    model: nn.Module,
    adapter: Adapter,
    basis: torch.Tensor,
    declared: DeclaredEdit,
) -> tuple[dict[str, torch.Tensor], list[ResolvedWriter]]:
    """Every changed writer's factors in float32 under peft's names, and those writers in model order."""
    tensors: dict[str, torch.Tensor] = {}
    chosen: list[ResolvedWriter] = []
    for writer in residual_writers(model, adapter):
        scales = _scales(writer, declared, basis.shape[0])
        if not bool((scales != 0).any()):
            continue
        _check_expressible(writer)
        check_finite([writer])  # NaN/Inf in a weight or bias would make its factors NaN
        prefix = f"base_model.model.{writer.name}"
        for suffix, factor in _factors(writer, basis, scales).items():
            tensors[f"{prefix}.{suffix}"] = factor.float()
        chosen.append(writer)
    return tensors, chosen


def _targeted_by_parameter(model: nn.Module, chosen: list[ResolvedWriter]) -> list[ResolvedWriter]:
    """The writers targeted as parameters: fused experts, and linear writers peft would not target by
    module name (the same tensors, wrapped instead of silently dropped).

    Raises:
        ValueError: peft re-reads a non-linear target as an expert name.
    """
    relabelled = _rewritten_by_peft(model, [w.name for w in chosen if w.layout not in FUSED_LAYOUTS])
    for writer in chosen:
        if writer.name in relabelled and writer.layout != "linear":
            raise ValueError(f"peft re-reads the target {writer.name} as an expert name; {_REFUSED}")
    return [w for w in chosen if w.layout in FUSED_LAYOUTS or w.name in relabelled]


def _add_zero_biases(tensors: dict[str, torch.Tensor], chosen: list[ResolvedWriter]) -> None:
    """lora_bias is one switch for every target: the writers without a bias get a zero one."""
    for writer in chosen:
        key = f"base_model.model.{writer.name}.lora_B"
        if writer.layout != "embedding" and f"{key}.bias" not in tensors:
            tensors[f"{key}.bias"] = torch.zeros(tensors[f"{key}.weight"].shape[0])


def _factors(writer: ResolvedWriter, basis: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """One writer's LoRA tensors in float64, keyed by peft's name suffix (see the module docstring)."""
    weight = writer.weight_tensor().detach().double().cpu()
    up = -(basis.T * scales)  # [d_model, k]: B = −Qᵀ diag(s)
    if writer.layout == "embedding":  # weight [vocab, d_model]
        return {"lora_embedding_A": basis @ weight.T, "lora_embedding_B": up}  # A [k, vocab]
    if writer.layout in FUSED_LAYOUTS:
        experts = weight.shape[0]
        # Per expert A_e = Q W_e with W_e as [d_model, d_in]; peft reads lora_A as [E, k, d_in] (expert-major)
        # and lora_B as [d_model, k, E] (rank-major), see ParamWrapper.get_delta_weight.
        equation = "kd,edi->eki" if writer.layout == "experts" else "kd,eid->eki"
        down = torch.einsum(equation, basis, weight).reshape(experts * basis.shape[0], -1)
        return {"lora_A.weight": down, "lora_B.weight": up.repeat_interleave(experts, dim=1)}
    # linear [d_model, d_in]: A = Q W; conv1d [d_in, d_model]: A = (W Qᵀ)ᵀ. Both [k, d_in].
    factors = {"lora_A.weight": basis @ weight if writer.layout == "linear" else basis @ weight.T}
    factors["lora_B.weight"] = up
    bias = writer.bias_tensor()
    if bias is not None:
        factors["lora_B.bias"] = up @ (basis @ bias.detach().double().cpu())  # −Qᵀ diag(s) Q b
    return factors


def _rewritten_by_peft(model: nn.Module, modules: list[str]) -> set[str]:
    """The ``target_modules`` that peft would not wrap by name on this model.

    peft's shim for transformers 5 (``convert_peft_config_for_transformers``) re-reads, on MoE types it maps
    to Qwen2-MoE or Mixtral, every target ending in ``.down_proj`` (``.gate_proj``, ``.up_proj``, ``.gate``,
    ``.w2``, …) as a v4 per-expert name and drops it from ``target_modules``: a dense block's or a shared
    expert's ``mlp.down_proj`` (qwen3_moe ``mlp_only_layers``, deepseek, glm4_moe) would silently get no
    LoRA. Asking the shim itself which names it drops keeps this right for the installed peft.
    """
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # peft without the shim (transformers 4 era) wraps every name it is given
        return set()
    probe = LoraConfig(r=1, target_modules=list(modules))
    convert_peft_config_for_transformers(probe, model=model, conversions=None)
    return set(modules) - set(probe.target_modules or ())


def _basis(direction: torch.Tensor) -> torch.Tensor:
    """``[k, d_model]`` float64 rows: the normalized direction (k = 1) or the checked subspace."""
    if direction.dim() == 2:
        return check_basis(direction.detach().cpu())
    return unit_rows(direction.detach().double().cpu().flatten())[None, :]


def _scales(writer: ResolvedWriter, declared: DeclaredEdit, rank: int) -> torch.Tensor:
    """The writer's strength per row of the basis, ``[k]`` float64."""
    scales = torch.as_tensor(declared.scales(writer.group, writer.layer), dtype=torch.float64).flatten()
    if scales.numel() == 1:
        return scales.expand(rank)
    if scales.numel() != rank:
        raise ValueError(f"{writer.name}: {scales.numel()} strengths for a subspace of rank {rank}")
    return scales


def _check_expressible(writer: ResolvedWriter) -> None:
    """Refuse a writer no peft LoRA layer reproduces exactly."""
    if writer.layout not in LORA_LAYOUTS:
        raise ValueError(f"{writer.name} ({writer.layout} layout) has no exact peft LoRA layer; {_REFUSED}")
    if writer.layout not in FUSED_LAYOUTS:
        return
    if writer.bias_tensor() is not None:
        raise ValueError(
            f"{writer.name}.{writer.bias}: peft cannot put a bias on a target_parameters tensor "
            f"(its ParamWrapper refuses lora_bias); {_REFUSED}"
        )
    # ParamWrapper reads a 3-d parameter as [E, d_out, d_in] unless the module says it is transposed.
    transposed = bool(getattr(writer.module, "is_transposed", False))
    if transposed != (writer.layout == "experts_t"):
        raise ValueError(
            f"{writer.name}.{writer.weight}: peft's target_parameters would read this {writer.layout} tensor "
            f"the other way round (is_transposed={transposed}); {_REFUSED}"
        )


def _check_combination(
    biased: list[str], embedded: list[str], parameters: list[str], fan_in_fan_out: bool
) -> None:
    """Refuse what one ``LoraConfig`` cannot hold together (``lora_bias`` is one switch per LoRA adapter)."""
    if biased and embedded:
        raise ValueError(
            f"the writer bias {biased[0]} and the embedding {embedded[0]} cannot share one exact peft "
            f"adapter (lora_bias is one switch per adapter and peft's Embedding refuses it); {_REFUSED}"
        )
    if parameters and (biased or fan_in_fan_out):
        switch = f"the writer bias {biased[0]} (lora_bias)" if biased else "a Conv1D writer (fan_in_fan_out)"
        raise ValueError(
            f"{switch} and the target_parameters tensor {parameters[0]} cannot share one exact peft "
            f"adapter (peft's ParamWrapper refuses that switch); {_REFUSED}"
        )
