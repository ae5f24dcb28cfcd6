"""The adapter certificate: a PEFT LoRA adapter equals the declared edit of its base model, tensor by tensor.

``abliterate verify ORIGINAL ADAPTER_DIR --direction FILE`` proves an adapter written by ``run --format lora``
or ``apply --format lora`` (``abliterate.lora``). The expected adapter is recomputed here from ORIGINAL's
weights, as abliterate loads them, and the direction file's declared edit, with the writer's own factor math
(``lora_state``), never from anything the adapter's files record. Then:

* **Every tensor in ``adapter_model.safetensors`` is one the recomputation produces**: a LoRA pair on a module
  the edit does not change (an ``q_proj``, a writer of a block whose strength is 0, any other key) fails, and
  so does a missing one. Each has the recomputed name, shape and dtype (float32, whatever the model's dtype).
* **Every value is finite and equals the recomputation**, bitwise or within ``ULP_BOUND`` float32 ulps of it:
  the factors are computed in float64 from the stored weights (16-bit values are exact in float64) and
  rounded once to float32, so another BLAS's float64 reduction order can move an element by at most one
  rounding step; the ulp is taken at the element's magnitude, floored at ``_SCALE_FLOOR`` times the tensor's
  largest element (where cancellation leaves an element near zero). The bound is the same for a float32 and
  a 16-bit base model. A B scaled by 0.9 is about 10^6 ulps off.
* **``adapter_config.json`` equals the config the writer produces** in every field but
  ``PROVENANCE_FIELDS`` (which do not change what peft computes); a field it omits is read as peft's
  default, as peft reads it; a field the installed peft does not know fails. ``lora_alpha`` doubled (the
  delta scaled by 2), another ``r``, ``use_rslora``, ``use_dora``, an extra ``target_modules`` entry all fail.
  ``base_model_name_or_path`` is reported, not compared: the adapter is exact on ORIGINAL as loaded here.
* A second weights file (``adapter_model.bin``) fails: peft could load it instead.

The forward part (``verify`` without ``--no-forward``) adds the completeness check on ORIGINAL and logit
parity of the adapter loaded through peft against the hooked original (``abliterate.lora.peft_parity``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abliterate.adapters import Adapter, residual_writers
from abliterate.certificate import DeclaredEdit
from abliterate.edit import all_finite, ulp

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Fields of adapter_config.json that say where the adapter came from or how it was loaded, not what it
# computes: the base model is reported instead, peft_version and revision are provenance, inference_mode
# only freezes the LoRA parameters.
PROVENANCE_FIELDS = ("base_model_name_or_path", "revision", "peft_version", "inference_mode")
# Another machine's float64 factors may round to the neighbouring float32 value (see the module docstring).
ULP_BOUND = 1.0
_SCALE_FLOOR = 2.0**-24
_STORED_DTYPE = torch.float32  # lora_state's tensors, whatever the model's dtype
_MAX_LISTED_FAILURES = 20
KIND = "lora adapter"  # the certificate's "kind" in reports (abliterate.report.gate_lines)
NORM_PRESERVING = (
    "the direction file declares a norm-preserving edit, which is full rank: no LoRA adapter holds it"
)


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class AdapterCertificate:
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

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary for JSON output."""
        return asdict(self)

    @property
    def reason(self) -> str:
        """The first failure, or an empty string when passed."""
        if self.passed:
            return ""
        return f"{self.n_failures} check(s) of the LoRA adapter fail: {self.failures[0]}"


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
    from abliterate.lora import lora_state
    from abliterate.search_io import writer_strengths

    started = time.perf_counter()
    directory = Path(directory).expanduser()
    stored_config = _read_config(directory)
    base_model = stored_config.get("base_model_name_or_path")
    failures: list[str] = []
    try:
        declared.validate((w.group, w.layer) for w in residual_writers(model, adapter))
        if declared.norm_preserving:
            raise ValueError(NORM_PRESERVING)
        expected, fields = lora_state(model, adapter, declared.direction, writer_strengths(declared))
    except ValueError as error:  # no adapter can be this declared edit
        return AdapterCertificate(False, 0, 0, 0, 0, 0, 0, 0, base_model, [str(error)], 1, 0.0)
    config_failures, n_fields = _compare_config(stored_config, fields)
    failures += config_failures
    stored = _read_tensors(directory, failures)
    n_exact = n_bounded = 0
    for name in sorted(set(stored) - set(expected)):
        failures.append(f"{name}: not produced by the declared edit (an extra target or tensor)")
    for name in sorted(set(expected) - set(stored)):
        failures.append(f"{name}: missing (the declared edit changes this writer)")
    for name in sorted(set(expected) & set(stored)):
        verdict = _compare_tensor(name, stored[name], expected[name])
        if verdict == "exact":
            n_exact += 1
        elif verdict == "bounded":
            n_bounded += 1
        else:
            failures.append(verdict)
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
        base_model=base_model if isinstance(base_model, str) else None,
        failures=failures[:_MAX_LISTED_FAILURES],
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

    expected = _plain(LoraConfig(task_type="CAUSAL_LM", **fields).to_dict())
    defaults = _plain(LoraConfig().to_dict())
    failures = []
    compared = 0
    for key in sorted((set(expected) | set(stored)) - set(PROVENANCE_FIELDS)):
        if key not in expected:
            failures.append(f"{ADAPTER_CONFIG}: field {key!r} is unknown to the installed peft")
            continue
        have = _plain(stored[key]) if key in stored else defaults.get(key)
        want = expected[key]
        compared += 1
        if _normalized(key, have) == _normalized(key, want):
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


def _plain(value: Any) -> Any:
    """``value`` as JSON would hold it (sets become sorted lists), so written and recomputed compare equal."""
    if isinstance(value, set | frozenset):
        return sorted(_plain(item) for item in value)
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


# Fields whose order means nothing to peft (module and parameter names it matches).
_UNORDERED = ("target_modules", "target_parameters", "modules_to_save", "exclude_modules")


def _normalized(key: str, value: Any) -> Any:
    if key in _UNORDERED and isinstance(value, list):
        return sorted(map(str, value))
    return value


def verify_adapter(
    original: str,
    directory: str,
    direction_file: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    architecture: str | None = None,
    trust_remote_code: bool = False,
    dispatch: Any = None,
    prompts: list[str] | None = None,
    forward: bool = True,
    certificate: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """``abliterate verify ORIGINAL ADAPTER_DIR``: the adapter certificate, then completeness and parity.

    ORIGINAL is loaded as ``run``/``apply`` load it (``dtype`` ``auto``: as stored), since the adapter is
    computed from, and exact on, those weights. The forward checks run only when the certificate passed
    (or was not asked for): peft would load a tampered adapter as something else than the declared one, or
    not at all.

    Args:
        original: the base model (hub id, directory, .gguf, or ``demo``).
        directory: the adapter directory.
        direction_file: ``direction.safetensors`` of the edit.
        dtype: dtype ORIGINAL is loaded in (the one the adapter was computed from).
        device: its device.
        architecture: adapter override.
        trust_remote_code: allow repository code.
        dispatch: accelerate placement options.
        prompts: parity prompts (default: 8 bundled harmful + 8 harmless evaluation prompts).
        forward: run completeness and parity through peft.
        certificate: run the adapter certificate.
        progress: unused (no streamed stage); accepted for ``verify_checkpoints``' signature.

    Returns:
        The gate report as a plain dictionary, as ``verify_checkpoints`` returns it.
    """
    from abliterate.adapters import resolve_adapter
    from abliterate.batching import encode
    from abliterate.direction import load_direction
    from abliterate.gate import GateReport, completeness_on
    from abliterate.loading import load_model
    from abliterate.lora import peft_parity
    from abliterate.prompts import bundled
    from abliterate.search_io import declared_from_file

    del progress
    direction, metadata = load_direction(direction_file)
    declared = declared_from_file(direction, metadata)
    gate = GateReport()
    base_model = _read_config(Path(directory).expanduser()).get("base_model_name_or_path")
    extra: dict[str, Any] = {}
    if certificate or forward:
        loaded = load_model(
            original, dtype=dtype, device=device, trust_remote_code=trust_remote_code, dispatch=dispatch
        )
        model = loaded.model
        adapter = resolve_adapter(model, architecture)
        extra["adapter"] = adapter.name
        d_model = model.get_input_embeddings().weight.shape[-1]
        if direction.shape[-1] != d_model:
            raise ValueError(f"direction has {direction.shape[-1]} dimensions, the model has {d_model}")
    if certificate:
        gate.certificate = certify_adapter(model, adapter, declared, directory)  # type: ignore[assignment]
    else:
        gate.skipped["certificate"] = "not asked for (--no-certificate)"
    invalid = _why_invalid(declared)
    if not forward:
        gate.skipped["completeness"] = gate.skipped["parity"] = "not asked for (--no-forward)"
    elif invalid or (gate.certificate is not None and not gate.certificate.passed):
        why = invalid or "the adapter certificate failed: peft would not load the declared edit's adapter"
        gate.skipped["completeness"] = gate.skipped["parity"] = why
    else:
        texts = prompts or bundled("harmful", "eval")[:8] + bundled("harmless", "eval")[:8]
        encoded = encode(loaded.tokenizer, texts, batch_size=len(texts), share_prefix=False)
        gate.completeness = completeness_on(model, adapter, encoded)
        gate.parity = peft_parity(model, adapter, declared, directory, encoded, loaded.dtype_name)
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


def _why_invalid(declared: DeclaredEdit) -> str:
    """Why no adapter can be ``declared`` (out of range, or norm-preserving), or an empty string."""
    try:
        declared.validate()
    except ValueError as error:
        return str(error)
    return NORM_PRESERVING if declared.norm_preserving else ""
