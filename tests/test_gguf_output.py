"""``--format gguf``: a GGUF source written as an edited GGUF, and the GGUF certificate with its controls.

The sources are tiny random qwen2/llama models written in-process by ``tiny_gguf.write_gguf`` (Q8_0, F16
and F32 tensors, a tied head, the tokenizer and chat template as metadata). Tampered outputs are written
by the same container writer the output uses (``ship.gguf_file``), changing one thing each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import make_model, quick_run_args
from tiny_gguf import MIXED, write_gguf

from abliterate.cli import main
from abliterate.prove.certificate import Certificate
from abliterate.prove.gguf_certificate import certify_gguf
from abliterate.prove.gguf_rules import field_bytes, logical_shape, tensor_bytes, writer_type
from abliterate.ship.direction_file import declared_from_file, load_direction, save_direction
from abliterate.ship.gguf_file import OutTensor, encode_field, write_gguf_file

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

D_MODEL = 64


def _source(directory: Path, model_type: str = "qwen2", tied: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    return write_gguf(directory / "model.gguf", make_model(model_type, tie_word_embeddings=tied), MIXED)


def _direction(path: Path, seed: int = 1) -> Path:
    vector = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed))
    return save_direction(path, vector, 1, -1, "tiny")


def _apply(source: Path, direction: Path, output: Path, *extra: str) -> CliRunner:
    args = ["apply", str(source), "--direction", str(direction), "--format", "gguf", "-o", str(output)]
    return CliRunner().invoke(main, [*args, *extra])


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(source GGUF, direction file, output directory) of a clean ``apply --format gguf``."""
    root = tmp_path_factory.mktemp("gguf-out")
    source, direction = _source(root / "source"), _direction(root / "direction.safetensors")
    result = _apply(source, direction, root / "out")
    assert result.exit_code == 0, result.output
    return source, direction, root / "out"


def _output_file(out: Path) -> Path:
    (file,) = out.glob("*.gguf")
    return file


def _certify(source: Path, edited: Path, direction: Path, vector: torch.Tensor | None = None) -> Certificate:
    saved, metadata = load_direction(direction)
    declared = declared_from_file(saved if vector is None else vector, metadata)
    return certify_gguf(source, edited, declared, progress=False)


Fields = list[tuple[str, bytes | np.ndarray]]


def _rewrite(
    edited: Path,
    target: Path,
    fields: Callable[[Fields], Fields] = lambda f: f,
    tensors: Callable[[list[OutTensor]], list[OutTensor]] = lambda t: t,
) -> Path:
    """A copy of the GGUF ``edited`` with its key/value pairs and tensors passed through the changes."""
    reader = gguf.GGUFReader(str(edited))
    pairs = [(key, field_bytes(reader, key)) for key in reader.fields if not key.startswith("GGUF.")]
    out = [
        OutTensor(
            t.name, logical_shape(t), int(t.tensor_type), int(t.n_bytes), lambda t=t: tensor_bytes(reader, t)
        )
        for t in reader.tensors
    ]
    version = int(reader.fields["GGUF.version"].contents())
    write_gguf_file(
        target, version, [value for _, value in fields(pairs)], tensors(out), int(reader.alignment)
    )
    return target


def _replace(name: str, data: Callable[[np.ndarray], np.ndarray], qtype: int | None = None) -> Callable:
    """A tensor change: ``name``'s bytes replaced by ``data(its bytes)`` (and its type by ``qtype``)."""

    def change(tensors: list[OutTensor]) -> list[OutTensor]:
        result = []
        for tensor in tensors:
            if tensor.name == name:
                new = np.ascontiguousarray(data(np.array(tensor.produce())))
                kind = tensor.qtype if qtype is None else qtype
                tensor = OutTensor(name, tensor.shape, kind, new.nbytes, lambda new=new: new)
            result.append(tensor)
        return result

    return change


def _flip_byte(index: int) -> Callable[[np.ndarray], np.ndarray]:
    def flip(data: np.ndarray) -> np.ndarray:
        data = data.copy().view(np.uint8)
        data.reshape(-1)[index] ^= 1
        return data

    return flip


def test_the_clean_output_passes_and_keeps_everything_else(applied: tuple[Path, Path, Path]) -> None:
    source, direction, out = applied
    edited = _output_file(out)
    certificate = _certify(source, edited, direction)
    assert certificate.passed, certificate.failures
    assert certificate.n_edited == certificate.n_exact == 9  # token_embd + 4 attn_output + 4 ffn_down
    before, after = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(edited))
    assert certificate.n_tensors == len(after.tensors) == len(before.tensors) + 1  # + output.weight
    # The untied head is the original embedding, in its own type; the embedding itself was edited.
    embedding = next(t for t in before.tensors if t.name == "token_embd.weight")
    head = next(t for t in after.tensors if t.name == "output.weight")
    assert head.tensor_type == embedding.tensor_type
    assert bytes(tensor_bytes(after, head)) == bytes(tensor_bytes(before, embedding))
    for key in before.fields:
        if not key.startswith("GGUF."):
            assert bytes(field_bytes(after, key)) == bytes(field_bytes(before, key)), key
    added = {key for key in after.fields if key not in before.fields}
    assert added == {
        f"abliterate.{k}"
        for k in ("format_version", "base_model", "direction_sha256", "edit", "writer_type", "output_tensor")
    }
    assert (out / "abliterate.json").is_file() and (out / "direction.safetensors").is_file()
    assert "certificate   PASS" in (out / "README.md").read_text()


def test_the_tamper_helper_rewrites_the_same_bytes(applied: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The controls below change one thing each: unchanged, the rewrite is the output byte for byte."""
    edited = _output_file(applied[2])
    assert _rewrite(edited, tmp_path / "copy.gguf").read_bytes() == edited.read_bytes()


def _unedited_writer(source: Path) -> Callable:
    """blk.2.ffn_down stored as Q8_0 (the declared type) but quantized from the unedited source."""
    reader = gguf.GGUFReader(str(source))
    tensor = next(t for t in reader.tensors if t.name == "blk.2.ffn_down.weight")
    plain = gguf.quants.quantize(
        gguf.quants.dequantize(tensor.data, tensor.tensor_type), gguf.GGMLQuantizationType.Q8_0
    )
    return _replace("blk.2.ffn_down.weight", lambda data: plain)


def _nan_scale(data: np.ndarray) -> np.ndarray:
    """A Q8_0 block whose f16 scale is NaN."""
    data = data.copy().view(np.uint8).reshape(-1)
    data[0:2] = np.frombuffer(np.float16(np.nan).tobytes(), dtype=np.uint8)
    return data


def _drop(prefix: str) -> Callable:
    return lambda tensors: [t for t in tensors if not t.name.startswith(prefix)]


def _extra(tensors: list[OutTensor]) -> list[OutTensor]:
    zeros = np.zeros(8, dtype=np.float32)
    return [*tensors, OutTensor("extra.weight", (8,), int(gguf.GGMLQuantizationType.F32), 32, lambda: zeros)]


def _set_field(key: str, value: str) -> Callable[[Fields], Fields]:
    return lambda pairs: [(k, encode_field(k, value) if k == key else v) for k, v in pairs]


def _drop_field(key: str) -> Callable[[Fields], Fields]:
    return lambda pairs: [(k, v) for k, v in pairs if k != key]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("writer left unedited", "blk.2.ffn_down.weight (mlp 2): "),
        ("non-writer one byte", "blk.1.attn_q.weight: changed, but the structure says no residual writer"),
        ("layer missing", "blk.3.attn_k.bias: in the original but missing from the edited GGUF"),
        ("chat template changed", "metadata tokenizer.chat_template: differs from the original's"),
        ("extra tensor", "extra.weight: in the edited GGUF but not in the original"),
        ("head not the embedding", "output.weight: the untied head is not the original token_embd"),
        ("NaN in a writer", "blk.1.attn_output.weight (attention 1): holds NaN/Inf values"),
        ("added head undeclared", "metadata abliterate.output_tensor: missing"),
        ("another writer type declared", "token_embd.weight (embedding -1): stored as Q8_0"),
    ],
)
def test_a_tampered_output_is_rejected(
    applied: tuple[Path, Path, Path], tmp_path: Path, case: str, reason: str
) -> None:
    source, direction, out = applied
    edited = _output_file(out)
    changes = {
        "writer left unedited": {"tensors": _unedited_writer(source)},
        "non-writer one byte": {"tensors": _replace("blk.1.attn_q.weight", _flip_byte(100))},
        "layer missing": {"tensors": _drop("blk.3.")},
        "chat template changed": {"fields": _set_field("tokenizer.chat_template", "{{ messages }}")},
        "extra tensor": {"tensors": _extra},
        "head not the embedding": {"tensors": _replace("output.weight", _flip_byte(7))},
        "NaN in a writer": {"tensors": _replace("blk.1.attn_output.weight", _nan_scale)},
        "added head undeclared": {"fields": _drop_field("abliterate.output_tensor")},
        "another writer type declared": {"fields": _set_field("abliterate.writer_type", "f16")},
    }[case]
    certificate = _certify(source, _rewrite(edited, tmp_path / "tampered.gguf", **changes), direction)
    assert not certificate.passed
    assert reason in certificate.reason, certificate.failures


def test_a_direction_a_few_degrees_off_is_rejected(applied: tuple[Path, Path, Path]) -> None:
    source, direction, out = applied
    unit, _ = load_direction(direction)
    other = torch.randn(unit.shape, generator=torch.Generator().manual_seed(2))
    other = other - (other @ unit) * unit
    angle = math.radians(3)
    rotated = math.cos(angle) * unit + math.sin(angle) * other / other.norm()
    certificate = _certify(source, _output_file(out), direction, rotated.to(unit.dtype))
    assert not certificate.passed
    writers = [line for line in certificate.failures if "bytes differ from quantize(fold" in line]
    assert len(writers) == 9  # every writer; nothing else but the direction's hash
    assert any("abliterate.direction_sha256" in line for line in certificate.failures)


def test_a_writer_type_gguf_py_cannot_write_is_refused() -> None:
    q4_k = gguf.GGMLQuantizationType.Q4_K
    with pytest.raises(ValueError, match="the source stores writers as Q4_K, which gguf-py cannot write"):
        writer_type("source", q4_k, (64, 256))
    assert writer_type("source", gguf.GGMLQuantizationType.Q8_0, (64, 64)) == gguf.GGMLQuantizationType.Q8_0


def test_apply_writes_nothing_when_the_certificate_fails(
    applied: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from abliterate.prove import gguf_certificate

    source, direction, out = applied
    failing = _certify(
        source, _rewrite(_output_file(out), tmp_path / "t.gguf", tensors=_drop("blk.3.")), direction
    )
    monkeypatch.setattr(gguf_certificate, "certify_gguf", lambda *args, **kwargs: failing)
    result = _apply(source, direction, tmp_path / "refused")
    assert result.exit_code == 2, result.output
    assert "GGUF certificate failed" in result.output and "nothing was written" in result.output
    assert not (tmp_path / "refused").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["t.gguf"]  # no staging directory left behind


def test_inputs_that_do_not_fit_are_one_line(applied: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A direction of another width, and a safetensors checkpoint: exit 1, one line, nothing written."""
    from conftest import save_tiny

    source, _, _ = applied
    narrow = save_direction(tmp_path / "narrow.safetensors", torch.ones(32), 1, -1, "other")
    result = _apply(source, narrow, tmp_path / "a")
    assert result.exit_code == 1 and "the direction belongs to another model" in result.output
    checkpoint = save_tiny(tmp_path / "checkpoint")
    result = _apply(checkpoint, applied[1], tmp_path / "b")
    assert result.exit_code == 1 and "convert_hf_to_gguf.py" in result.output
    for result_output in (tmp_path / "a", tmp_path / "b"):
        assert not result_output.exists()


def test_run_on_a_safetensors_source_names_the_commands(tmp_path: Path) -> None:
    from conftest import save_tiny

    checkpoint = save_tiny(tmp_path / "checkpoint")
    args = ["run", str(checkpoint), "--format", "gguf", "-o", str(tmp_path / "out"), *quick_run_args(4, 2)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "convert_hf_to_gguf.py" in result.output and "abliterate apply MODEL.gguf" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_run_writes_a_verified_gguf_and_verify_rejects_a_tampered_copy(tmp_path: Path) -> None:
    source = _source(tmp_path / "source", "llama", tied=False)  # untied: no head added; Q/K permuted
    out = tmp_path / "out"
    args = [
        "run",
        str(source),
        "--format",
        "gguf",
        "-o",
        str(out),
        *quick_run_args(4, 2, layer=1, evaluate=False),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "certificate   PASS  9 edited (9 bitwise" in result.output
    reader = gguf.GGUFReader(str(_output_file(out)))
    assert str(reader.fields["abliterate.output_tensor"].contents()) == ""
    verified = CliRunner().invoke(main, ["verify", str(out), "--no-progress"])
    assert verified.exit_code == 0, verified.output
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in ("abliterate.json", "direction.safetensors"):
        (tampered / name).write_bytes((out / name).read_bytes())
    edited = _output_file(out)
    _rewrite(edited, tampered / edited.name, tensors=_replace("blk.0.ffn_up.weight", _flip_byte(3)))
    rejected = CliRunner().invoke(main, ["verify", str(tampered), "--no-progress"])
    assert rejected.exit_code == 2, rejected.output
    assert "blk.0.ffn_up.weight: changed" in rejected.output


# Max |Δlogit| of the GGUF output loaded by transformers against the hooked original, per writer type:
# about 4x what was measured on this model (f16 0.0027, bf16 0.015, q8_0 0.060), while the unedited
# model is 1.95 away from the hooked original (the negative control below).
_LOGIT_TOLERANCE = {"f16": 0.01, "bf16": 0.06, "q8_0": 0.25}


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_transformers_loads_the_output_and_matches_the_hooked_original(
    applied: tuple[Path, Path, Path], tmp_path: Path, gguf_type: str
) -> None:
    from tiny import make_tokenizer
    from transformers import AutoModelForCausalLM

    from abliterate.adapters.resolve import resolve_adapter
    from abliterate.model.batching import all_position_logits, encode
    from abliterate.model.prompts import bundled
    from abliterate.prove.gate import gate_reference

    source, direction, _ = applied
    result = _apply(source, direction, tmp_path / "out", "--gguf-type", gguf_type, "--no-certify")
    assert result.exit_code == 0, result.output
    original = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    prompts = bundled("harmless", "eval")[:4] + bundled("harmful", "eval")[:4]
    encoded = encode(make_tokenizer(), prompts, batch_size=8, share_prefix=False)
    declared = declared_from_file(*load_direction(direction))
    reference = gate_reference(
        original, resolve_adapter(original, None), encoded, declared, "float32", completeness=False
    )
    mask = reference.hooked.mask.bool()
    edited_file = _output_file(tmp_path / "out")
    edited = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", gguf_file=edited_file.name, dtype=torch.float32
    )
    assert not edited.config.tie_word_embeddings  # the added output.weight unties the head
    distance = (all_position_logits(edited, encoded) - reference.hooked.logits).abs()[mask].max().item()
    unedited = (all_position_logits(original, encoded) - reference.hooked.logits).abs()[mask].max().item()
    assert distance < _LOGIT_TOLERANCE[gguf_type] < unedited / 5
