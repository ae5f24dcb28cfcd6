"""The adapter certificate: a PEFT LoRA adapter equals the declared edit of its base model, tensor by tensor.

``abliterate verify ORIGINAL ADAPTER_DIR --direction FILE`` proves an adapter written by ``--format lora``.
The expected adapter is recomputed from ORIGINAL's weights, as abliterate loads them, and the direction file's
declared edit with the writer's own factor math (``abliterate.ship.lora.lora_state``), never from what the
adapter records. Then every tensor of ``adapter_model.safetensors`` must be one the recomputation produces (a
LoRA on ``q_proj`` or on a writer at strength 0 fails, naming it), every required one present with its name,
shape and dtype (float32), finite, and bitwise equal or within ``ULP_BOUND`` float32 ulp: the factors are
float64 (16-bit weights are exact in float64) rounded once to float32, so another BLAS's reduction order moves
an element by at most one rounding step (the ulp is floored at ``_SCALE_FLOOR`` of the tensor's largest
element, for elements that cancel to near zero); the same bound for float32 and 16-bit models.
``adapter_config.json`` must equal the writer's ``LoraConfig`` in every field but ``PROVENANCE_FIELDS`` (an
omitted field is peft's default, as peft reads it; a field the installed peft does not know fails), so
``lora_alpha`` doubled, another ``r``, ``alpha_pattern`` or ``use_dora`` fail. ``verify`` without
``--no-forward`` adds completeness on ORIGINAL and logit parity through peft
(``abliterate.prove.lora_parity.peft_candidate``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abliterate.adapters.resolve import residual_writers
from abliterate.adapters.spec import Adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.kernel import all_finite, ulp
from abliterate.prove.gate import GateReport, gate_candidate, gate_reference
from abliterate.prove.lora_parity import peft_candidate
from abliterate.prove.verdict import MAX_LISTED_FAILURES, Verdict

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# adapter_config.json fields that say where the adapter came from, not what it computes (the base model is
# reported instead; inference_mode only freezes the LoRA parameters).
PROVENANCE_FIELDS = ("base_model_name_or_path", "revision", "peft_version", "inference_mode")
# Another machine's float64 factors may round to the neighbouring float32 value (see the module docstring).
ULP_BOUND = 1.0
_SCALE_FLOOR = 2.0**-24
_STORED_DTYPE = torch.float32  # lora_state's tensors, whatever the model's dtype
KIND = "lora adapter"  # the certificate's "kind" in reports (abliterate.ship.report.gate_lines)
NORM_PRESERVING = (
    "the direction file declares a norm-preserving edit, which is full rank: no LoRA adapter holds it"
)


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class AdapterCertificate(Verdict):
    """The verdict of ``certify_adapter``.

    Attributes:
        passed: the adapter is the declared edit's adapter.
        n_tensors: tensors in the adapter file.
        n_required: tensors the recomputation produces (one LoRA pair per changed writer, plus biases).
        n_exact: required tensors bitwise equal to the recomputation.
        n_bounded: required tensors within ``ULP_BOUND`` float32 ulps but not bitwise equal.
        n_targets: writers the declared edit changes (the adapter's targets).
        rank: the recomputed adapter's rank.
        n_config_fields: ``adapter_config.json`` fields compared with the writer's config.
        base_model: the adapter's ``base_model_name_or_path`` (reported, not compared).
        failures: the first failures, one line each.
        n_failures: how many checks failed.
        seconds: wall-clock time.
        kind: ``"lora adapter"``, which tells reports this from a checkpoint's ``Certificate``.
    """

    passed: bool
    n_tensors: int
    n_required: int
    n_exact: int
    n_bounded: int
    n_targets: int
    rank: int
    n_config_fields: int
    base_model: str | None
    failures: list[str]
    n_failures: int
    seconds: float
    kind: str = KIND

    failing = "check(s) of the LoRA adapter fail"


def certify_adapter(
    model: nn.Module, adapter: Adapter, declared: DeclaredEdit, directory: str | Path
) -> AdapterCertificate:
    """Compare the adapter in ``directory`` with the declared edit's adapter recomputed from ``model``.

    Args:
        model: the original model, with the weights the adapter must be exact on.
        adapter: its architecture description.
        declared: the direction file's edit.
        directory: the adapter directory (``adapter_config.json``, ``adapter_model.safetensors``).

    Returns:
        The certificate; every failure is one line.

    Raises:
        ValueError: ``adapter_config.json`` is not a JSON object.
    """
    from abliterate.edit.lora_factors import lora_state

    started = time.perf_counter()
    directory = Path(directory).expanduser()
    stored_config = _read_config(directory)
    base_model = stored_config.get("base_model_name_or_path")
    base_model = base_model if isinstance(base_model, str) else None
    try:
        declared.validate((w.group, w.layer) for w in residual_writers(model, adapter))
        if declared.norm_preserving:
            raise ValueError(NORM_PRESERVING)
        expected, fields = lora_state(model, adapter, declared)
    except ValueError as error:  # no adapter can be this declared edit
        return AdapterCertificate(False, 0, 0, 0, 0, 0, 0, 0, base_model, [str(error)], 1, 0.0)
    failures, n_fields = _compare_config(stored_config, fields)
    stored = _read_tensors(directory, failures)
    n_exact, n_bounded = _compare_tensors(stored, expected, failures)
    if (directory / "adapter_model.bin").exists():
        failures.append("adapter_model.bin: a second weights file, which peft may load instead")
    targets = {name.split(".lora_")[0] for name in expected}
    return AdapterCertificate(
        passed=not failures,
        n_tensors=len(stored),
        n_required=len(expected),
        n_exact=n_exact,
        n_bounded=n_bounded,
        n_targets=len(targets),
        rank=int(fields["r"]),  # type: ignore[call-overload]
        n_config_fields=n_fields,
        base_model=base_model,
        failures=failures[:MAX_LISTED_FAILURES],
        n_failures=len(failures),
        seconds=time.perf_counter() - started,
    )


def _read_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dictionary."""
    path = directory / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON file: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def _read_tensors(directory: Path, failures: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of ``adapter_model.safetensors`` (a failure line instead when it cannot be read)."""
    from safetensors import SafetensorError, safe_open

    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        failures.append(f"{ADAPTER_WEIGHTS}: missing")
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as error:
        failures.append(f"{ADAPTER_WEIGHTS}: not a readable safetensors file ({error})")
        return {}


def _compare_tensors(
    stored: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], failures: list[str]
) -> tuple[int, int]:
    """Append a line per extra, missing or wrong tensor to ``failures``; return ``(exact, bounded)``."""
    names, required = set(stored), set(expected)
    verdicts = [_compare_tensor(name, stored[name], expected[name]) for name in sorted(names & required)]
    failures += [
        f"{n}: not produced by the declared edit (an extra target)" for n in sorted(names - required)
    ]
    failures += [f"{n}: missing (the declared edit changes this writer)" for n in sorted(required - names)]
    failures += [verdict for verdict in verdicts if verdict not in ("exact", "bounded")]
    return verdicts.count("exact"), verdicts.count("bounded")


def _compare_tensor(name: str, stored: torch.Tensor, expected: torch.Tensor) -> str:
    """``"exact"``, ``"bounded"``, or the one-line failure of one adapter tensor."""
    if stored.dtype != _STORED_DTYPE:
        return f"{name}: stored as {stored.dtype}, the declared edit's adapter holds {_STORED_DTYPE}"
    if stored.shape != expected.shape:
        return f"{name}: shape {list(stored.shape)}, the declared edit's adapter has {list(expected.shape)}"
    if not all_finite(stored):
        return f"{name}: holds NaN/Inf values"
    if torch.equal(stored, expected):
        return "exact"
    exact = expected.double()
    floor = _SCALE_FLOOR * float(exact.abs().max())
    bound = ULP_BOUND * ulp(exact.abs().clamp_min(floor), _STORED_DTYPE)
    error = (stored.double() - exact).abs()
    outside = ~(error <= bound)  # "not within": a NaN is outside
    if not bool(outside.any()):
        return "bounded"
    worst = float((error / bound).max())
    return (
        f"{name}: {int(outside.sum())} of {stored.numel()} elements differ from the declared edit's "
        f"recomputation by more than {ULP_BOUND:g} float32 ulp (up to {worst:.3g} ulp)"
    )


def _compare_config(stored: dict[str, Any], fields: dict[str, object]) -> tuple[list[str], int]:
    """Compare ``adapter_config.json`` with the ``LoraConfig`` the writer produces from ``fields``.

    Returns:
        ``(failure lines, fields compared)``.
    """
    from peft import LoraConfig

    expected = {
        key: _plain(value, key)
        for key, value in LoraConfig(task_type="CAUSAL_LM", **fields).to_dict().items()
    }
    defaults = {key: _plain(value, key) for key, value in LoraConfig().to_dict().items()}
    failures = []
    compared = 0
    for key in sorted((set(expected) | set(stored)) - set(PROVENANCE_FIELDS)):
        if key not in expected:
            failures.append(f"{ADAPTER_CONFIG}: field {key!r} is unknown to the installed peft")
            continue
        have, want = (_plain(stored[key], key) if key in stored else defaults.get(key)), expected[key]
        compared += 1
        if have == want:
            continue
        if isinstance(want, list) and isinstance(have, list):
            extra = sorted(set(map(str, have)) - set(map(str, want)))
            missing = sorted(set(map(str, want)) - set(map(str, have)))
            what = f"has {extra[0]}, which" if extra else f"lacks {missing[0]}, which" if missing else ""
            if what:
                verb = "does not target" if extra else "targets"
                failures.append(f"{ADAPTER_CONFIG}: {key} {what} the declared edit's adapter {verb}")
                continue
        failures.append(f"{ADAPTER_CONFIG}: {key} is {have!r}, the declared edit's adapter has {want!r}")
    return failures, compared


def _plain(value: Any, key: str = "") -> Any:
    """``value`` as JSON holds it (sets become lists), lists of names sorted: their order means nothing."""
    if isinstance(value, dict):
        return {str(name): _plain(item) for name, item in value.items()}
    if isinstance(value, set | frozenset | list | tuple):
        items = [_plain(item) for item in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) or key in _UNORDERED else items
    return value


# Fields whose order means nothing to peft (module and parameter names it matches).
_UNORDERED = ("target_modules", "target_parameters", "modules_to_save", "exclude_modules")


def verify_adapter(
    original: str,
    directory: str,
    declared: DeclaredEdit,
    metadata: dict[str, str],
    options: dict[str, Any],
    *,
    architecture: str | None = None,
    prompts: list[str] | None = None,
    forward: bool = True,
    certificate: bool = True,
) -> dict[str, Any]:
    """``abliterate verify ORIGINAL ADAPTER_DIR``: the adapter certificate, then completeness and parity.

    ORIGINAL is loaded as ``run``/``apply`` load it (``dtype`` ``auto``: as stored): the adapter is computed
    from, and exact on, those weights. The forward checks run only when the certificate passed (or was not
    asked for): peft would load a tampered adapter as another one, or not at all. ``options`` are
    ``load_model``'s (dtype, device, trust_remote_code, dispatch); ``declared`` and ``metadata`` are the
    direction file's (``ship.direction_file``); the rest as ``verify_checkpoints``.

    Returns:
        The gate report as a plain dictionary, as ``verify_checkpoints`` returns it.
    """
    from abliterate.adapters.resolve import resolve_adapter
    from abliterate.model.loading import load_model

    direction = declared.direction
    gate = GateReport()
    base_model = _read_config(Path(directory).expanduser()).get("base_model_name_or_path")
    extra = {}
    if certificate or forward:
        loaded = load_model(original, **options)
        adapter = resolve_adapter(loaded.model, architecture)
        extra["adapter"] = adapter.name
        d_model = loaded.model.get_input_embeddings().weight.shape[-1]
        if direction.shape[-1] != d_model:
            raise ValueError(f"direction has {direction.shape[-1]} dimensions, the model has {d_model}")
    if certificate:
        gate.certificate = certify_adapter(loaded.model, adapter, declared, directory)  # type: ignore[assignment]
    else:
        gate.skipped["certificate"] = "not asked for (--no-certificate)"
    if forward:
        _forward_checks(gate, loaded, adapter, declared, directory, prompts)
    else:
        gate.skipped["completeness"] = gate.skipped["parity"] = "not asked for (--no-forward)"
    return {
        "original": original,
        "edited": directory,
        "format": "lora",
        "base_model_name_or_path": base_model,
        "direction_layer": metadata.get("layer"),
        "direction_position": metadata.get("position"),
        **extra,
        **gate.to_dict(),
    }


def _forward_checks(
    gate: Any, loaded: Any, adapter: Adapter, declared: DeclaredEdit, directory: str, prompts: Any
) -> None:
    """Completeness on the original, then parity of the adapter loaded through peft, into ``gate``; or
    why neither can stand (a declared edit no adapter can be, or a failed certificate)."""
    from abliterate.model.batching import encode
    from abliterate.model.prompts import bundled

    try:
        why = NORM_PRESERVING if declared.validate().norm_preserving else ""
    except ValueError as error:
        why = str(error)
    if not why and gate.certificate is not None and not gate.certificate.passed:
        why = "the adapter certificate failed: peft would not load the declared edit's adapter"
    if why:
        gate.skipped["completeness"] = gate.skipped["parity"] = why
        return
    texts = prompts or bundled("harmful", "eval")[:8] + bundled("harmless", "eval")[:8]
    encoded = encode(loaded.tokenizer, texts, batch_size=len(texts), share_prefix=False)
    reference = gate_reference(loaded.model, adapter, encoded, declared, loaded.dtype_name)
    checked = gate_candidate(reference, adapter, peft_candidate(loaded.model, directory))
    gate.completeness, gate.parity = checked.completeness, checked.parity
