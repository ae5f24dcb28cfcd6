"""The weight certificate of a run on a ``.gguf`` source: the written tensors against the dequantized GGUF.

The GGUF files are built in-process (``tiny_gguf.write_gguf``) from tiny random llama and qwen2 models,
with F32, F16 and Q8_0 tensors and llama's Q/K row permutation, and loaded by transformers with their
tokenizer and chat template, so the run below is the real ``abliterate run model.gguf``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny import make_model, quick_run_args
from tiny_gguf import MIXED, write_gguf

from abliterate.cli import main
from abliterate.prove.certificate import Certificate, certify_checkpoint
from abliterate.prove.gguf_source import GGUFSource, certificate_source
from abliterate.ship.direction_file import declared_from_file, load_direction

pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [*quick_run_args(4, 2, layer=1), "--no-evaluate"]


def _gguf(directory: Path, model_type: str, tied: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    return write_gguf(directory / "model.gguf", make_model(model_type, tie_word_embeddings=tied), MIXED)


def _run(gguf: Path, output: Path, *extra: str) -> dict:
    result = CliRunner().invoke(main, ["run", str(gguf), "-o", str(output), *FAST, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((output / "abliterate.json").read_text())


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A llama GGUF (Q/K permuted, mixed tensor types) and the bf16 output of ``run`` on it."""
    root = tmp_path_factory.mktemp("gguf-llama")
    gguf = _gguf(root / "source", "llama")
    _run(gguf, root / "out")
    return gguf, root / "out"


def _certify(gguf: Path, edited: Path, direction: torch.Tensor | None = None) -> Certificate:
    source, why_not = certificate_source(str(gguf))
    assert isinstance(source, GGUFSource), why_not
    saved, metadata = load_direction(edited / "direction.safetensors")
    declared = declared_from_file(saved if direction is None else direction, metadata)
    return certify_checkpoint(source, edited, declared, progress=False)


def _tampered(out: Path, tmp_path: Path, change: object) -> Path:
    """A copy of ``out`` whose weights ``change(weights)`` altered in place."""
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    weights = load_file(copy / "model.safetensors")
    change(weights)
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_the_reader_gives_what_transformers_loads(tmp_path: Path, model_type: str) -> None:
    """Every tensor, dequantized and processed (llama's Q/K permutation undone), bitwise as transformers
    loads it, under the same names: nothing missing, nothing extra."""
    from transformers import AutoModelForCausalLM

    gguf = _gguf(tmp_path, model_type)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32)
    expected = loaded.state_dict()
    source = GGUFSource(gguf)
    assert set(source.index()) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(source.tensor(name), tensor), name


@pytest.mark.parametrize(
    ("model_type", "tied", "dtype"), [("qwen2", False, "float32"), ("llama", True, "auto")]
)
def test_a_run_on_a_gguf_is_certified(tmp_path: Path, model_type: str, tied: bool, dtype: str) -> None:
    manifest = _run(_gguf(tmp_path / "source", model_type, tied), tmp_path / "out", "--dtype", dtype)
    gate = manifest["gate"]
    assert "certificate" not in gate["skipped"]
    certificate = gate["certificate"]
    assert certificate["passed"] and certificate["n_failures"] == 0
    # Bitwise: the fold of the dequantized float32 weights, cast once, as the run computed it.
    assert certificate["n_edited"] == certificate["n_exact"] == 9  # embedding + 4 o_proj + 4 down_proj
    n_saved = len(load_file(tmp_path / "out" / "model.safetensors"))
    assert certificate["n_tensors"] == n_saved == certificate["n_edited"] + certificate["n_unchanged"]
    assert "certificate   PASS" in (tmp_path / "out" / "README.md").read_text()


def test_verify_certifies_against_the_gguf(llama_run: tuple[Path, Path]) -> None:
    gguf, out = llama_run
    direction = str(out / "direction.safetensors")
    args = ["verify", str(gguf), str(out), "--direction", direction, "--no-forward"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "certificate   PASS  9 edited (9 bitwise" in result.output


def test_the_clean_output_passes(llama_run: tuple[Path, Path]) -> None:
    certificate = _certify(*llama_run)
    assert certificate.passed, certificate.failures
    assert certificate.n_edited == certificate.n_exact == 9


def _unedited_writer(weights: dict[str, torch.Tensor], gguf: Path) -> None:
    name = "model.layers.2.self_attn.o_proj.weight"
    weights[name] = GGUFSource(gguf).tensor(name).to(weights[name].dtype)


def _one_ulp(weights: dict[str, torch.Tensor]) -> None:
    # q_proj is stored Q/K-permuted in the GGUF: the reader must undo it for the clean output to pass.
    weights["model.layers.1.self_attn.q_proj.weight"].view(torch.int16)[3, 5] += 1


def _layer_missing(weights: dict[str, torch.Tensor]) -> None:
    for name in [name for name in weights if name.startswith("model.layers.3.")]:
        del weights[name]


def _head_not_embedding(weights: dict[str, torch.Tensor]) -> None:
    weights["lm_head.weight"].view(torch.int16)[7, 0] += 1


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unedited writer", "layers.2.self_attn.o_proj.weight (attention 2): an element is"),
        ("one ulp in a non-writer", "layers.1.self_attn.q_proj.weight: changed, but the structure says no"),
        ("layer missing", "layers.3.mlp.down_proj.weight: in the original but missing from the edited"),
    ],
)
def test_a_tampered_output_is_rejected(
    llama_run: tuple[Path, Path], tmp_path: Path, case: str, reason: str
) -> None:
    gguf, out = llama_run
    change = {
        "unedited writer": lambda weights: _unedited_writer(weights, gguf),
        "one ulp in a non-writer": _one_ulp,
        "layer missing": _layer_missing,
    }[case]
    certificate = _certify(gguf, _tampered(out, tmp_path, change))
    assert not certificate.passed
    assert any(reason in failure for failure in certificate.failures), certificate.failures


def test_a_direction_a_few_degrees_off_is_rejected(llama_run: tuple[Path, Path]) -> None:
    """The output folded along r̂ does not pass as the fold along r̂ rotated by 3°."""
    gguf, out = llama_run
    direction, _ = load_direction(out / "direction.safetensors")
    unit = direction / direction.norm()
    other = torch.randn(unit.shape, generator=torch.Generator().manual_seed(1), dtype=unit.dtype)
    other = other - (other @ unit) * unit
    angle = math.radians(3)
    rotated = math.cos(angle) * unit + math.sin(angle) * other / other.norm()
    certificate = _certify(gguf, out, rotated.to(direction.dtype))
    assert not certificate.passed
    assert certificate.n_failures == 9  # every writer, none of the unchanged tensors
    writers = ("(embedding", "(attention", "(mlp")
    assert all(any(group in line for group in writers) for line in certificate.failures)


def test_an_untied_head_must_equal_the_embedding(tmp_path: Path) -> None:
    """A tied GGUF (no ``output.weight``): the head the run adds when untying is the original embedding."""
    gguf = _gguf(tmp_path / "source", "llama", tied=True)
    _run(gguf, tmp_path / "out")
    assert _certify(gguf, tmp_path / "out").passed
    certificate = _certify(gguf, _tampered(tmp_path / "out", tmp_path, _head_not_embedding))
    assert not certificate.passed
    assert "lm_head.weight: changed" in certificate.failures[0]


def test_verify_exits_2_on_a_tampered_output(llama_run: tuple[Path, Path], tmp_path: Path) -> None:
    gguf, out = llama_run
    tampered = _tampered(out, tmp_path, _one_ulp)
    direction = str(tampered / "direction.safetensors")
    args = ["verify", str(gguf), str(tampered), "--direction", direction, "--no-forward"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "certificate   FAIL" in result.output and "q_proj.weight: changed" in result.output


def test_a_file_that_is_not_a_gguf_is_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"cannot read .*model\.gguf as a GGUF file"):
        certificate_source(str(fake))
