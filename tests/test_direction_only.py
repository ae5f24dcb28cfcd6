"""``run --direction-only`` then ``apply``: the workflow for models loadable once or only quantized (8.2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny
from safetensors.torch import load_file
from tiny import open_selection_config, quick_run_args

from abliterate.cli import main

SMALL = quick_run_args(8, 4, layer=2)


def _invoke(*args: str) -> object:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def direction_run(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("direction-only") / "direction"
    result = _invoke("run", str(tiny_qwen2), "--direction-only", "-o", str(output), *SMALL)
    assert result.exit_code == 0, result.output
    assert "abliterate apply CHECKPOINT --direction" in result.output
    return output


def test_direction_only_writes_no_weights(direction_run: Path) -> None:
    names = {path.name for path in direction_run.iterdir()}
    assert names == {"direction.safetensors", "abliterate.json", "model_card.md"}
    manifest = json.loads((direction_run / "abliterate.json").read_text())
    assert manifest["weights"] is None
    gate = manifest["gate"]
    assert gate["passed"] and gate["completeness"]["passed"]
    assert gate["certificate"] is None and gate["parity"] is None
    assert set(gate["skipped"]) == {"certificate", "parity"}
    # Evaluated with the direction hooked out: the random model's replies change.
    examples = manifest["evaluation"]["examples"]
    assert any(example["before"] != example["after"] for example in examples)
    assert "layer" in (direction_run / "model_card.md").read_text()


def test_apply_of_the_direction_equals_a_full_run(
    tiny_qwen2: Path, direction_run: Path, tmp_path: Path
) -> None:
    applied, full = tmp_path / "applied", tmp_path / "full"
    direction = direction_run / "direction.safetensors"
    assert _invoke("apply", str(tiny_qwen2), "--direction", str(direction), "-o", str(applied)).exit_code == 0
    assert _invoke("run", str(tiny_qwen2), "-o", str(full), "--no-evaluate", *SMALL).exit_code == 0
    assert torch.equal(
        load_file(direction)["direction"], load_file(full / "direction.safetensors")["direction"]
    )
    streamed, saved = load_file(applied / "model.safetensors"), load_file(full / "model.safetensors")
    assert streamed.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(streamed[name], tensor), name


def test_direction_only_with_search_draws_the_heatmap(tmp_path: Path) -> None:
    from abliterate import run

    source = save_tiny(tmp_path / "model", "llama")
    output = tmp_path / "direction"
    config = open_selection_config(source, output, direction_only=True, screen_keep=2, evaluate=False)
    result = run(config)
    assert result.manifest["direction"]["selected_by"] == "screening"
    assert (output / "candidate_scores.png").stat().st_size > 1000
    assert not list(output.glob("model*.safetensors"))


def test_direction_only_cannot_push(tiny_qwen2: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(tiny_qwen2), "--direction-only", "--push-to-hub", "me/x"])
    assert result.exit_code == 1 and result.output.startswith("error: --direction-only writes no weights")


def test_direction_only_accepts_a_prequantized_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only activations are read, so a pre-quantized checkpoint passes the guard (and is loaded)."""
    source = save_tiny(tmp_path / "model", "qwen2")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "fp8"}})
    )
    loaded: list[str] = []

    def stop_at_load(name: str, **options: object) -> None:
        loaded.append(name)
        raise FileNotFoundError("stopped after the guards")

    monkeypatch.setattr("abliterate.model.loading.load_model", stop_at_load)
    result = CliRunner().invoke(
        main, ["run", str(source), "--direction-only", "-o", str(tmp_path / "o"), *SMALL]
    )
    assert "stopped after the guards" in result.output and loaded == [str(source)]
