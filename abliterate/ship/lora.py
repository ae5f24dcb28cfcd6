"""The edit as a PEFT LoRA adapter: rank k per residual writer, exact up to float rounding (issue 9.4).

The fold ``W' = (I − Qᵀ diag(s) Q) W`` (``Q`` ``[k, d_model]``: one unit direction, or the orthonormal
rows of a subspace; ``s`` the writer's strength per row) changes every writer by a product of rank k, so a
LoRA of rank ``r = k`` with scaling 1 (``lora_alpha = r``) expresses it: ``B = −Qᵀ diag(s)``
(``[d_model, k]``) and ``A = Q W`` (``[k, d_in]``), computed from the weights the adapter will be loaded
on. Per layout, in peft's terms:

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

peft has one ``lora_bias`` switch per adapter and refuses it on embeddings and on ``target_parameters``:
an edit that touches a writer bias together with an embedding or fused experts, or a bias on a fused
expert tensor, cannot be one exact adapter and is refused in one line naming the writer. The adapter is
exact only on the weights it was computed from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from abliterate.adapters import Adapter, ResolvedWriter, residual_writers
from abliterate.edit.kernel import check_basis, refuse_non_finite
from abliterate.errors import GateError

if TYPE_CHECKING:
    from abliterate.edit.declared import DeclaredEdit
    from abliterate.model.batching import EncodedPrompts
    from abliterate.prove.parity import ParityReport

LORA_LAYOUTS = ("linear", "conv1d", "embedding", "experts", "experts_t")
_FUSED = ("experts", "experts_t")
_REFUSED = "use --format checkpoint"
# ``(I − s r̂ r̂ᵀ) W D`` differs from ``W`` in every column, so no rank-k adapter holds it.
NORM_PRESERVING_REFUSAL = f"a norm-preserving edit is full rank; {_REFUSED}"


def lora_state(
    model: nn.Module,
    adapter: Adapter,
    direction: torch.Tensor,
    strength_of: Callable[[ResolvedWriter], Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The adapter's tensors (peft's on-disk names) and its ``LoraConfig`` fields.

    Args:
        model: the original model (not edited), on any device.
        adapter: its architecture description.
        direction: ``[d_model]`` direction (normalized here), or an orthonormal subspace ``[k, d_model]``
            (``abliterate.edit.kernel.check_basis``); the adapter's rank is ``k``.
        strength_of: per-writer strength (default 1): a float for a direction, one per row for a subspace
            (``DeclaredEdit.scales_for``); writers whose strengths are all 0 get no LoRA.

    Returns:
        ``(tensors, config fields)``; ``config["r"]`` is the edit's rank.

    Raises:
        ValueError: a writer peft cannot express exactly, named in one line.
    """
    basis = _basis(direction)  # [k, d_model], float64
    rank = basis.shape[0]
    tensors: dict[str, torch.Tensor] = {}
    chosen: list[ResolvedWriter] = []
    for writer in residual_writers(model, adapter):
        scales = _scales(writer, strength_of, rank)
        if not bool((scales != 0).any()):
            continue
        _check_expressible(writer)
        refuse_non_finite(f"{writer.name}.{writer.weight}", writer.weight_tensor())  # factors would be NaN
        prefix = f"base_model.model.{writer.name}"
        for suffix, factor in _factors(writer, basis, scales).items():
            tensors[f"{prefix}.{suffix}"] = factor.float()
        chosen.append(writer)
    # Linear writers peft would not target by module name are targeted by parameter (same tensors).
    relabelled = _rewritten_by_peft(model, [w.name for w in chosen if w.layout not in _FUSED])
    for writer in chosen:
        if writer.name in relabelled and writer.layout != "linear":
            raise ValueError(f"peft re-reads the target {writer.name} as an expert name; {_REFUSED}")
    by_parameter = [w for w in chosen if w.layout in _FUSED or w.name in relabelled]
    biased = [f"{w.name}.{w.bias}" for w in chosen if w.bias_tensor() is not None]
    fan_in_fan_out = any(w.layout == "conv1d" for w in chosen)
    _check_combination(
        biased,
        [w.name for w in chosen if w.layout == "embedding"],
        [f"{w.name}.{w.weight}" for w in by_parameter],
        fan_in_fan_out,
    )
    if biased:
        # lora_bias is one switch for every target: the writers without a bias get a zero one.
        for writer in chosen:
            key = f"base_model.model.{writer.name}.lora_B"
            if writer.layout != "embedding" and f"{key}.bias" not in tensors:
                tensors[f"{key}.bias"] = torch.zeros(tensors[f"{key}.weight"].shape[0])
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


def _factors(writer: ResolvedWriter, basis: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """One writer's LoRA tensors in float64, keyed by peft's name suffix (see the module docstring)."""
    weight = writer.weight_tensor().detach().double().cpu()
    up = -(basis.T * scales)  # [d_model, k]: B = −Qᵀ diag(s)
    if writer.layout == "embedding":  # weight [vocab, d_model]
        return {"lora_embedding_A": basis @ weight.T, "lora_embedding_B": up}  # A [k, vocab]
    if writer.layout in _FUSED:
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
    unit = direction.detach().double().cpu().flatten()
    return (unit / unit.norm())[None, :]


def _scales(
    writer: ResolvedWriter, strength_of: Callable[[ResolvedWriter], Any] | None, rank: int
) -> torch.Tensor:
    """The writer's strength per row of the basis, ``[k]`` float64."""
    value = 1.0 if strength_of is None else strength_of(writer)
    scales = torch.as_tensor(value, dtype=torch.float64).flatten()
    if scales.numel() == 1:
        return scales.expand(rank)
    if scales.numel() != rank:
        raise ValueError(f"{writer.name}: {scales.numel()} strengths for a subspace of rank {rank}")
    return scales


def _check_expressible(writer: ResolvedWriter) -> None:
    """Refuse a writer no peft LoRA layer reproduces exactly."""
    if writer.layout not in LORA_LAYOUTS:
        raise ValueError(f"{writer.name} ({writer.layout} layout) has no exact peft LoRA layer; {_REFUSED}")
    if writer.layout not in _FUSED:
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
    """Refuse what one ``LoraConfig`` cannot hold together (``lora_bias`` is one switch per adapter)."""
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


def write_lora(
    model: nn.Module,
    adapter: Adapter,
    direction: torch.Tensor,
    output: str | Path,
    *,
    base_model: str,
    strength_of: Callable[[ResolvedWriter], Any] | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``output``.

    Args:
        model: the original model the adapter is computed from (and is exact on).
        adapter: its architecture description.
        direction: ``[d_model]`` direction, or an orthonormal subspace ``[k, d_model]`` (rank-k adapter).
        output: an existing directory.
        base_model: what the adapter must be loaded on, as recorded in ``base_model_name_or_path``.
        strength_of: per-writer strengths of a searched edit (one per row for a subspace).

    Returns:
        ``output``.

    Raises:
        ValueError: a writer peft cannot express exactly (nothing is written).
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


def peft_parity(
    model: nn.Module,
    adapter: Adapter,
    declared: DeclaredEdit,
    directory: str | Path,
    prompts: EncodedPrompts,
    dtype: str,
) -> ParityReport:
    """Logit parity of ``PeftModel.from_pretrained(model, directory)`` against the hooked original.

    The adapter is loaded onto ``model`` itself and unloaded afterwards, so the original weights are
    never copied. In float32 the gate's fixed tolerances apply; in 16-bit the limit is the model's own
    rounding floor, measured as the gate measures it (``abliterate.prove.gate.edited_parity``): the distance
    between the adapter on the model and the adapter on siblings whose writer weights carry a one-ulp
    dither. Unlike the checkpoint gate, MoE families stay gating here: no certificate stands behind an
    adapter.

    Returns:
        The ``ParityReport``.
    """
    from abliterate.prove.gate import dithered, hooked_reference
    from abliterate.prove.parity import SIXTEEN_BIT, RoundingFloor, compare_logits, measure_floor
    from abliterate.ship.search_io import writer_strengths

    strength_of = writer_strengths(declared)
    reference = hooked_reference(model, adapter, declared.direction, prompts, dtype, strength_of)
    edited = _adapted_logits(model, directory, prompts)
    if dtype not in SIXTEEN_BIT:
        return compare_logits(reference.logits, edited, dtype, reference.mask)
    floors = []
    for seed in range(_SIBLINGS):
        with dithered(model, adapter, seed):
            sibling = _adapted_logits(model, directory, prompts)
        floors.append(measure_floor(edited, sibling, reference.mask))
    floor = RoundingFloor(max(f.mean_kl for f in floors), max(f.top1_disagreement for f in floors))
    return compare_logits(reference.logits, edited, dtype, reference.mask, floor)


# Dithered siblings whose largest distance makes the 16-bit floor (as ``abliterate.prove.gate``'s).
_SIBLINGS = 2


def _adapted_logits(model: nn.Module, directory: str | Path, prompts: EncodedPrompts) -> torch.Tensor:
    """All-position logits of ``model`` with the adapter loaded through peft, then unloaded again."""
    from abliterate.model.batching import all_position_logits

    wrapped = load_lora(model, directory)
    try:
        return all_position_logits(wrapped, prompts)
    finally:
        wrapped.unload()


def apply_lora(
    checkpoint: str,
    declared: DeclaredEdit,
    output: str | Path,
    *,
    architecture: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, ParityReport]:
    """``abliterate apply --format lora``: the adapter of a direction file's edit for ``checkpoint``.

    The model is loaded (not streamed: the adapter is computed from its weights), the adapter written,
    loaded back through peft and compared with the hooked original on 4 + 4 bundled prompts. ``output``
    is checked before the load (``checkpoint.prepare_output``: never over or around the source, and
    ``overwrite`` replaces only an earlier abliterate output); an ``abliterate.json`` marks it.

    Returns:
        ``(output, parity report)``.

    Raises:
        GateError: the adapter does not reproduce the edit (nothing is written).
        ValueError: a writer peft cannot express exactly, or a norm-preserving edit (full rank).
    """
    from abliterate.adapters import resolve_adapter
    from abliterate.io.output import atomic_directory, prepare_output, write_apply_manifest
    from abliterate.model.batching import encode
    from abliterate.model.loading import load_model
    from abliterate.model.prompts import bundled
    from abliterate.ship.search_io import writer_strengths

    declared.validate()  # finite and in range, before the model is loaded
    if declared.norm_preserving:
        raise ValueError(NORM_PRESERVING_REFUSAL)
    target = prepare_output(output, checkpoint, overwrite)
    loaded = load_model(checkpoint)
    adapter = resolve_adapter(loaded.model, architecture)
    declared.validate((w.group, w.layer) for w in residual_writers(loaded.model, adapter))  # not a no-op
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
            raise GateError(
                f"the LoRA adapter fails parity through peft: {report.reason}; nothing was written"
            )
        card = lora_card(checkpoint, report, rank=int(describe(staging)["r"]))
        (staging / "README.md").write_text(card, "utf-8")
        write_apply_manifest(staging, checkpoint, "lora")
    return target.path, report


def lora_card(source: str, report: ParityReport, rank: int | None = None) -> str:
    """The adapter's README: what it is exact on, and its parity.

    Args:
        source: the checkpoint the adapter was computed from.
        report: its parity through peft.
        rank: the adapter's rank (the edit's: 1 for a direction, k for a subspace), when known.
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
        ]
    )
