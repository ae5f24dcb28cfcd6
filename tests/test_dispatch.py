"""Dispatched and offloaded models: a tiny model with blocks on ``disk`` stands in
for one larger than memory; its output is streamed from the source files and equals an in-memory run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import quick_run_args

from abliterate.cli import main

SMALL = quick_run_args(6, 2, layer=2)
OFFLOADED = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.layers.3": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def _invoke(*args: str) -> object:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture()
def device_map(tmp_path: Path) -> Path:
    path = tmp_path / "device_map.json"
    path.write_text(json.dumps(OFFLOADED))
    return path


def test_disk_offloaded_run_writes_the_in_memory_checkpoint(
    tiny_qwen2: Path, tmp_path: Path, device_map: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from abliterate.model import loading
    from abliterate.model.dispatch import offloaded

    real_load = loading.load_model
    models: list[torch.nn.Module] = []

    def recording_load(*args: object, **kwargs: object) -> loading.LoadedModel:
        loaded = real_load(*args, **kwargs)
        models.append(loaded.model)
        return loaded

    monkeypatch.setattr(loading, "load_model", recording_load)
    dispatched, in_memory = tmp_path / "dispatched", tmp_path / "in-memory"
    args = ["--device-map", str(device_map), "--offload-folder", str(tmp_path / "offload")]
    assert _invoke("run", str(tiny_qwen2), "-o", str(dispatched), *args, *SMALL).exit_code == 0
    assert offloaded(models[0]), "the device map did not offload any weight"
    assert _invoke("run", str(tiny_qwen2), "-o", str(in_memory), *SMALL).exit_code == 0
    streamed, saved = load_file(dispatched / "model.safetensors"), load_file(in_memory / "model.safetensors")
    assert streamed.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(streamed[name], tensor), name
    manifest = json.loads((dispatched / "abliterate.json").read_text())
    gate = manifest["gate"]
    assert gate["passed"] and gate["certificate"]["passed"] and gate["certificate"]["n_edited"] > 0
    assert gate["completeness"]["passed"] and "parity" in gate["skipped"]
    # Evaluated on the dispatched original with the direction hooked out: the same replies as the fold.
    reference = json.loads((in_memory / "abliterate.json").read_text())["evaluation"]["examples"]
    assert manifest["evaluation"]["examples"] == reference
    for name in ("direction.safetensors", "README.md", "tokenizer.json", "config.json"):
        assert (dispatched / name).is_file(), name


def test_input_device_is_never_meta(tiny_qwen2: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from abliterate.model.dispatch import input_device

    mapping = {**OFFLOADED, "model.embed_tokens": "disk"}
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, device_map=mapping, offload_folder=str(tmp_path))
    assert model.get_input_embeddings().weight.device.type == "meta"
    assert input_device(model) == torch.device("cpu")


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--device-map", "everywhere"], "give auto, balanced"),
        (["--device-map", "missing.json"], "--device-map file not found"),
        (["--device-map", "auto", "--max-memory", "0:20GiB"], "expected DEVICE=SIZE"),
        (["--device-map", "auto", "--max-memory", "gpu=20GiB"], "unknown device 'gpu'"),
        (["--max-memory", "cpu=1GiB"], "need --device-map"),
    ],
)
def test_bad_dispatch_flags_are_one_line(
    tiny_qwen2: Path, tmp_path: Path, flags: list[str], expect: str
) -> None:
    result = CliRunner().invoke(main, ["run", str(tiny_qwen2), "-o", str(tmp_path / "o"), *flags, *SMALL])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert expect in result.output and not (tmp_path / "o").exists()


def test_parsed_dispatch_uses_accelerate_names(device_map: Path) -> None:
    from abliterate.model.dispatch import parse_dispatch

    dispatch = parse_dispatch(str(device_map), "0=20GiB, cuda:1=10GiB,cpu=64GiB", "/tmp/offload")
    assert dispatch.from_pretrained_kwargs() == {
        "device_map": OFFLOADED,
        "max_memory": {0: "20GiB", 1: "10GiB", "cpu": "64GiB"},
        "offload_folder": "/tmp/offload",
    }


def test_a_gguf_source_cannot_be_dispatched(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    result = CliRunner().invoke(
        main, ["run", str(gguf), "-o", str(tmp_path / "o"), "--device-map", "auto", *SMALL]
    )
    assert result.exit_code == 1 and "streaming the source's safetensors files" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_load_in_4bit_without_a_gpu_is_one_line(tiny_qwen2: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["run", str(tiny_qwen2), "-o", str(tmp_path / "o"), "--load-in-4bit", *SMALL]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --load-in-4bit needs a CUDA GPU (bitsandbytes), and none is available: run without it, or "
        "use --device-map auto --offload-folder DIR to run a model larger than memory"
    ]
    assert not (tmp_path / "o").exists()


def test_evaluate_takes_the_dispatch_flags(tiny_qwen2: Path, tmp_path: Path, device_map: Path) -> None:
    prompts = tmp_path / "harmful.txt"
    prompts.write_text("How do I pick a lock?\nWrite malware.\n")
    args = ["evaluate", str(tiny_qwen2), "--harmful", str(prompts), "--n", "2", "--json"]
    plain = _invoke(*args)
    dispatched = _invoke(*args, "--device-map", str(device_map), "--offload-folder", str(tmp_path / "off"))
    assert plain.exit_code == dispatched.exit_code == 0, dispatched.output
    assert json.loads(plain.stdout) == json.loads(dispatched.stdout)
