"""``abliterate verify``: prove that an edited checkpoint on disk is the declared edit of its original."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from abliterate.adapters.resolve import resolve_adapter
from abliterate.config import LoadConfig
from abliterate.edit.declared import DeclaredEdit
from abliterate.io.locations import HUB_ID
from abliterate.io.output import DIRECTION_NAME, MANIFEST_NAME
from abliterate.model import loading  # called through its module, so tests can replace a load
from abliterate.model.batching import all_position_logits, encode
from abliterate.model.hooks import ablated
from abliterate.model.prompts import bundled
from abliterate.model.sources import local_checkpoint, resolve_checkpoint
from abliterate.prove.files import compare_companions, compare_gguf_tokenizer
from abliterate.prove.gate import Candidate, GateReport, gate_candidate, gate_reference
from abliterate.prove.gguf_source import certificate_source
from abliterate.prove.lora_certificate import is_adapter, verify_adapter
from abliterate.prove.parity import compare_logits
from abliterate.prove.residual import full_projection, residual_sites
from abliterate.ship.direction_file import declared_from_file, load_direction
from abliterate.ship.fetch import fetch_edit, is_hub_edit
from abliterate.ship.gguf_verify import find_gguf_output, verify_gguf


@dataclass(frozen=True)
class ManifestInputs:
    """What ``abliterate verify EDITED`` reads from EDITED's ``abliterate.json``.

    Attributes:
        original: the base model as the run or apply named it (Hub id, path, ``demo``).
        revision: its Hub commit hash, or ``None`` (a local path, or not recorded).
        direction_file: the direction file inside EDITED, or ``None`` when it has none.
    """

    original: str
    revision: str | None
    direction_file: Path | None


def manifest_inputs(edited: str) -> ManifestInputs:
    """The base model, its revision and the direction file recorded in a local output's ``abliterate.json``.

    Raises:
        ValueError: ``edited`` holds no readable ``abliterate.json`` naming its base model.
    """
    manifest_path = Path(edited).expanduser() / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ValueError(
            f"{edited} has no {MANIFEST_NAME}: give the base model too (abliterate verify ORIGINAL EDITED "
            "--direction FILE)"
        )
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
    except ValueError as error:
        raise ValueError(f"{manifest_path} is not valid JSON: {error}") from error
    # run writes {"model": {"source", "revision"}}; apply writes "source" and "revision" at the top.
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else manifest
    original = model.get("source") if isinstance(model, dict) else None
    if not isinstance(original, str) or not original:
        raise ValueError(f"{manifest_path} names no base model: give it (abliterate verify ORIGINAL EDITED)")
    revision = model.get("revision")
    direction = Path(edited).expanduser() / DIRECTION_NAME
    return ManifestInputs(
        original, revision if isinstance(revision, str) else None, direction if direction.is_file() else None
    )


def local_edited(edited: str, revision: str | None = None) -> tuple[str, str]:
    """EDITED as a local directory (a Hub id downloaded at ``revision``, ``ship.fetch``), and a line saying
    what was fetched (empty for a local path).

    Raises:
        ValueError: ``revision`` for a local path, or the fetch failed (see ``fetch_edit``).
    """
    if not is_hub_edit(edited):
        if revision is not None:
            raise ValueError(f"--revision is for a Hub id; {edited} is a local path")
        return edited, ""
    fetched = fetch_edit(edited, revision)
    return str(fetched.directory), f"fetched {edited} at {fetched.commit or revision or 'main'}"


def pinned_original(inputs: ManifestInputs) -> str:
    """The base model to verify against: a Hub id with a recorded revision is downloaded at that commit
    (its local snapshot directory returned); anything else as recorded."""
    if inputs.revision is None or not HUB_ID.match(inputs.original) or Path(inputs.original).exists():
        return inputs.original
    return str(resolve_checkpoint(inputs.original, revision=inputs.revision))


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
    load = load or LoadConfig()
    loading.check_device(load.device)  # before the certificate's minutes, not after them
    options = _load_options(load, load.dtype)
    direction, metadata = load_direction(direction_file)
    declared = declared_from_file(direction, metadata)  # a searched edit's strengths, 1 for old files
    if is_adapter(edited):  # a PEFT adapter directory (run/apply --format lora): the adapter certificate
        return verify_adapter(
            original, edited, declared, metadata, options, architecture=load.architecture,
            prompts=prompts, forward=forward, certificate=certificate,
        )  # fmt: skip
    gguf_output = find_gguf_output(edited)
    if gguf_output is not None:  # a GGUF file, or the output of run/apply --format gguf
        return verify_gguf(
            original, gguf_output, declared, metadata, architecture=load.architecture,
            certificate=certificate, progress=progress,
        )  # fmt: skip
    gate = GateReport()
    _check_on_disk(original, edited, declared, gate, certificate, load.architecture, progress, load.device)
    extra = _check_forward(original, edited, declared, gate, forward, options, load.architecture, prompts)
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


def _check_on_disk(
    original: str,
    edited: str,
    declared: DeclaredEdit,
    gate: GateReport,
    certificate: bool,
    architecture: str | None,
    progress: bool,
    device: str = "cpu",
) -> None:
    """Add to ``gate`` the files beside the weights and, when asked, the weight certificate (or why not),
    its folds on ``device`` when that is a GPU (``certificate_device``)."""
    original_dir, _ = local_checkpoint(original)
    edited_dir, why_not_edited = local_checkpoint(edited)
    _compare_files(original, original_dir, edited_dir, gate)
    if not certificate:
        gate.skipped["certificate"] = "not asked for (--no-certificate)"
        return
    # Looked up when called, so tests can replace the certificate (one that must not run).
    from abliterate.prove.certificate import certify_checkpoint
    from abliterate.prove.refold import certificate_device

    original_source, why_not = certificate_source(original)  # a .gguf is read tensor by tensor
    if original_source is None or edited_dir is None:
        gate.skipped["certificate"] = why_not or why_not_edited
        return
    gate.certificate = certify_checkpoint(
        original_source,
        edited_dir,
        declared,
        architecture=architecture,
        progress=progress,
        device=certificate_device(device),
    )


def _why_invalid(declared: DeclaredEdit) -> str:
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
    config = Path(checkpoint).expanduser() / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    value = data.get("dtype") or data.get("torch_dtype")
    return value if isinstance(value, str) else None


def _check_forward(
    original: str,
    edited: str,
    declared: DeclaredEdit,
    gate: GateReport,
    forward: bool,
    options: dict[str, Any],
    architecture: str | None,
    prompts: list[str] | None,
) -> dict[str, Any]:
    """Completeness on the original, then logit parity of the edited model against the hooked original.

    Skipped, saying why in ``gate``, without ``forward`` or for an invalid declared edit.
    """
    invalid = _why_invalid(declared)
    if invalid:  # the certificate reports it too; no forward check can stand for such an edit
        gate.skipped["completeness"] = gate.skipped["parity"] = invalid
        return {}
    if not forward:
        gate.skipped["completeness"] = gate.skipped["parity"] = "not asked for (--no-forward)"
        return {}
    if options["dtype"] == "auto":
        options = {**options, "dtype": _checkpoint_dtype(edited) or "auto"}
    direction = declared.direction
    reference_model = loading.load_model(original, **options)
    model = reference_model.model
    adapter = resolve_adapter(model, architecture)
    d_model = model.get_input_embeddings().weight.shape[-1]
    if direction.shape[-1] != d_model:
        raise ValueError(f"direction has {direction.shape[-1]} dimensions, the model has {d_model}")
    prompts = prompts or bundled("harmful", "eval")[:8] + bundled("harmless", "eval")[:8]
    encoded = encode(reference_model.tokenizer, prompts, batch_size=len(prompts), share_prefix=False)
    reference = gate_reference(model, adapter, encoded, declared, reference_model.dtype_name)
    residual_reference = None
    if adapter.post_norm:
        with ablated(model, adapter, full_projection(direction), where=residual_sites):
            residual_reference = all_position_logits(model, encoded)
    del reference_model, model
    edited_model = loading.load_model(edited, **options)
    checked = gate_candidate(reference, adapter, Candidate(edited_model.model))
    gate.completeness, gate.parity = checked.completeness, checked.parity
    extra: dict[str, Any] = {"adapter": adapter.name}
    if residual_reference is not None:
        candidate = all_position_logits(edited_model.model, encoded)
        extra.update(_full_residual_ablation(residual_reference, candidate, reference.hooked.mask))
    return extra


def _full_residual_ablation(
    residual_reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor
) -> dict[str, Any]:
    """How far a post-norm model's edited logits are from a full residual-stream ablation's."""
    residual = compare_logits(residual_reference, candidate, "float32", mask)
    return {
        "post_norm": True,
        "full_residual_ablation_max_abs_logit_diff": residual.max_abs_logit_diff,
        "full_residual_ablation_mean_kl": residual.mean_kl,
        "full_residual_ablation_top1_agreement": residual.top1_agreement,
    }
