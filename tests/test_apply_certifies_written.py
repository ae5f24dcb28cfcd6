"""``apply`` certifies what it wrote from the bytes it computed, and the certificate folds on a device.

Attacker's inputs for the self-certificate: a copy that lands a wrong byte, a folded tensor whose bytes
reach the disk changed, name patterns that edit a tensor the structure calls no writer, and patterns that
miss a writer the structure lists; each must fail with nothing written. The device path of the certificate
(``device="cpu"`` runs the same code as CUDA) must move every edited tensor of both checkpoints through
the device one at a time, pass an honest output and fail a tampered one.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_model

from abliterate.edit.declared import DeclaredEdit
from abliterate.errors import GateError
from abliterate.io import shard_writer
from abliterate.prove import refold
from abliterate.prove.certificate import certify_checkpoint
from abliterate.prove.refold import certificate_device
from abliterate.ship import streaming
from abliterate.ship.streaming import stream_apply

O_PROJ = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "original"
    make_model("llama", dtype=torch.bfloat16).save_pretrained(path)
    return path


def _declared() -> DeclaredEdit:
    return DeclaredEdit(torch.randn(64, generator=torch.Generator().manual_seed(1)))


def test_an_honest_apply_certifies_every_writer_exact(checkpoint: Path, tmp_path: Path) -> None:
    report = stream_apply(checkpoint, _declared(), tmp_path / "out", progress=False)
    certificate = report.certificate
    assert certificate is not None and certificate.passed, certificate
    assert certificate.n_exact == certificate.n_edited == report.tensors_edited > 0
    assert certificate.n_unchanged == report.tensors_total - report.tensors_edited
    # verify's certificate refolds independently and agrees
    assert certify_checkpoint(checkpoint, tmp_path / "out", _declared(), progress=False).passed


def test_a_wrong_byte_in_a_kernel_copy_fails_apply(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = shard_writer.copy_range

    def corrupting(source: object, target: object, offset: int, at: int, length: int) -> None:
        real_copy(source, target, offset, at, length)
        byte = os.pread(target.fileno(), 1, at + length // 2)  # type: ignore[attr-defined]
        os.pwrite(target.fileno(), bytes([byte[0] ^ 1]), at + length // 2)  # type: ignore[attr-defined]

    monkeypatch.setattr(shard_writer, "copy_range", corrupting)
    with pytest.raises(GateError, match="copied bytes differ from the source's"):
        stream_apply(checkpoint, _declared(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # Unchecked, the same corruption is written, and the independent certificate catches it.
    stream_apply(checkpoint, _declared(), tmp_path / "unchecked", progress=False, certify=False)
    assert not certify_checkpoint(checkpoint, tmp_path / "unchecked", _declared(), progress=False).passed


def test_a_fold_changed_on_its_way_to_disk_fails_apply(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = shard_writer.write_at

    def corrupting(target: object, data: memoryview, at: int) -> None:
        real_write(target, data, at)
        if at > 0:  # a tensor's bytes, not the header
            os.pwrite(target.fileno(), bytes([data[3] ^ 4]), at + 3)  # type: ignore[attr-defined]

    monkeypatch.setattr(shard_writer, "write_at", corrupting)
    with pytest.raises(GateError, match="the bytes read back differ from the fold written"):
        stream_apply(checkpoint, _declared(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_patterns_that_disagree_with_the_structure_fail_before_writing(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    real_plan = streaming.plan_edit

    def disagreeing(*args: object, **kwargs: object) -> streaming.StreamPlan:
        plan = real_plan(*args, **kwargs)
        edits = dict(plan.edits)
        if change == "extra":
            edits["model.norm.weight"] = "embedding"  # [d_model], foldable, but no residual writer
        else:
            del edits[O_PROJ]
        return dataclasses.replace(plan, edits=edits)

    monkeypatch.setattr(streaming, "plan_edit", disagreeing)
    expected = "no writer lives there" if change == "extra" else "apply's patterns miss it"
    with pytest.raises(GateError, match=expected):
        stream_apply(checkpoint, _declared(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_device_path_streams_both_checkpoints_through_the_device(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = stream_apply(checkpoint, _declared(), tmp_path / "out", progress=False, certify=False)
    moved: list[tuple[int, ...]] = []
    real_move = refold.to_device

    def watched(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        moved.append(tuple(tensor.shape))
        return real_move(tensor, device)

    monkeypatch.setattr(refold, "to_device", watched)
    on_device = certify_checkpoint(checkpoint, tmp_path / "out", _declared(), progress=False, device="cpu")
    assert on_device.passed, on_device.failures
    assert on_device.n_exact == on_device.n_edited == report.tensors_edited
    assert len(moved) == 2 * report.tensors_edited  # the original and the stored tensor of each writer

    moved.clear()
    host = certify_checkpoint(checkpoint, tmp_path / "out", _declared(), progress=False)
    assert (host.n_exact, host.n_unchanged) == (on_device.n_exact, on_device.n_unchanged) and not moved

    tensors = load_file(tmp_path / "out" / "model.safetensors")
    tensors[O_PROJ] = tensors[O_PROJ].clone()
    tensors[O_PROJ][0, 0] += 0.25  # far outside one element's bound
    save_file(tensors, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
    tampered = certify_checkpoint(checkpoint, tmp_path / "out", _declared(), progress=False, device="cpu")
    assert not tampered.passed and any(O_PROJ in line for line in tampered.failures)


def test_the_certificate_folds_on_the_gpu_a_run_used_and_on_the_host_otherwise() -> None:
    assert certificate_device(None) is None
    assert certificate_device("cpu") is None
    assert certificate_device("mps") is None  # no float64 there for the bound
    assert certificate_device("cuda:1") == torch.device("cuda:1")
    assert certificate_device(torch.device("cuda", 0)) == torch.device("cuda:0")
    assert certificate_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else None)


def test_the_device_path_judges_a_tensor_off_by_one_ulp_within_the_bound(
    checkpoint: Path, tmp_path: Path
) -> None:
    """Another device's fold is not bitwise this one's: one element on the other side of the exact fold
    takes the bounded path there, and passes; the same element 8 ulp off fails."""
    stream_apply(checkpoint, _declared(), tmp_path / "out", progress=False, certify=False)
    original = load_file(checkpoint / "model.safetensors")[O_PROJ]
    r = _declared().direction.double()
    r = r / r.norm()
    exact = original.double() - torch.outer(r, r @ original.double())  # linear: W − r̂ r̂ᵀ W
    row = int(r.abs().argmin())  # its error along r̂ is the smallest
    column = int((exact[row] - exact[row].to(torch.bfloat16).double()).abs().argmax())
    honest = load_file(tmp_path / "out" / "model.safetensors")
    for steps, passes in ((1, True), (8, False)):
        tensors = dict(honest)
        bits = tensors[O_PROJ].clone().view(torch.int16)
        value = exact[row, column]
        rounded = bits[row, column].view(torch.bfloat16).double()
        # one bf16 step further from zero when the exact fold lies above the rounded value (positive), etc.
        away = (value > rounded) == (value > 0)
        bits[row, column] += steps if away else -steps
        tensors[O_PROJ] = bits.view(torch.bfloat16)
        save_file(tensors, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
        verdict = certify_checkpoint(checkpoint, tmp_path / "out", _declared(), progress=False, device="cpu")
        assert verdict.passed is passes, verdict.failures
        assert verdict.n_bounded == 1
