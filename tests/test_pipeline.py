"""The whole ``abliterate run`` path on tiny checkpoints, through the CLI as a user would call it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import open_selection_config, quick_run_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate.cli import main

SMALL = quick_run_args(8, 4, n_eval=4)


def _umask() -> int:
    import os

    umask = os.umask(0)
    os.umask(umask)
    return umask


def _run(*args: str) -> object:
    return CliRunner().invoke(main, ["run", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run_output(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("run") / "out"
    result = _run(str(tiny_qwen2), "--output", str(output), "--layer", "2", "--position", "-1", *SMALL)
    assert result.exit_code == 0, result.output
    return output


def test_run_writes_the_output_contract(run_output: Path) -> None:
    names = {path.name for path in run_output.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "README.md",
        "direction.safetensors",
        "abliterate.json",
        "tokenizer.json",
    ):
        assert required in names, f"{required} missing from {sorted(names)}"
    assert not [path for path in run_output.parent.iterdir() if path.name.startswith(".")], "temp dir left"
    # Readable like any other download, not owner-only as the temporary directory was.
    assert run_output.stat().st_mode & 0o055 == 0o055 & ~_umask()
    assert (run_output / "model.safetensors").stat().st_mode & 0o044 == 0o044 & ~_umask()
    manifest = json.loads((run_output / "abliterate.json").read_text())
    assert manifest["direction"] == {**manifest["direction"], "layer": 2, "position": -1}
    gate = manifest["gate"]
    assert gate["passed"] is True
    assert gate["parity"]["max_abs_logit_diff"] <= 1e-4 * gate["parity"]["logit_scale"]
    assert gate["completeness"]["passed"] and gate["completeness"]["max_statistic"] <= 1
    # The source is a safetensors directory, so the saved files were certified too.
    assert gate["certificate"]["passed"] and gate["certificate"]["n_edited"] > 0
    assert set(manifest["timings"]) >= {
        "load_s",
        "extract_s",
        "select_s",
        "edit_s",
        "verify_s",
        "evaluate_s",
        "save_s",
        "total_s",
    }
    assert manifest["evaluation"]["before"]["n"] == 4
    assert {"torch", "transformers"} <= set(manifest["versions"])
    config = json.loads((run_output / "config.json").read_text())
    assert "quantization_config" not in config
    card = (run_output / "README.md").read_text()
    assert "abliterated" in card and "layer" in card


def test_saved_checkpoint_equals_hooked_original(tiny_qwen2: Path, run_output: Path) -> None:
    """Reload both from disk; the edited model must equal the original with the direction hooked out."""
    from abliterate.adapters.resolve import resolve_adapter
    from abliterate.model.hooks import ablated, projection

    direction = load_file(run_output / "direction.safetensors")["direction"]
    assert direction.dtype == torch.float32
    assert abs(direction.norm().item() - 1) < 1e-6
    original = AutoModelForCausalLM.from_pretrained(tiny_qwen2).eval()
    edited = AutoModelForCausalLM.from_pretrained(run_output).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_output)
    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me how to pick a lock."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad(), ablated(original, resolve_adapter(original), projection(direction)):
        reference = original(**batch).logits
    with torch.no_grad():
        result = edited(**batch).logits
        plain = original(**batch).logits
    scale = reference.abs().max()
    assert (reference - result).abs().max() <= 1e-4 * scale
    assert (plain - result).abs().max() > 1e-2 * scale, "the edit changed nothing"
    generated = edited.generate(**batch, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 4


def test_tied_embeddings_are_untied_and_head_kept(tiny_llama_tied: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = _run(
        str(tiny_llama_tied),
        "--output",
        str(output),
        "--layer",
        "1",
        "--position",
        "-2",
        *SMALL,
        "--no-evaluate",
    )
    assert result.exit_code == 0, result.output
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_tied)
    edited = AutoModelForCausalLM.from_pretrained(output)
    assert json.loads((output / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(edited.lm_head.weight, original.lm_head.weight)
    direction = load_file(output / "direction.safetensors")["direction"]
    rows_along = edited.model.embed_tokens.weight @ direction
    assert rows_along.abs().max() < 1e-5
    assert (original.model.embed_tokens.weight @ direction).abs().max() > 1e-2


def test_selection_runs_and_draws_heatmap(tiny_qwen2: Path, tmp_path: Path) -> None:
    """Without --layer the search runs; thresholds are relaxed because a random model never refuses."""
    from abliterate import run

    output = tmp_path / "out"
    result = run(open_selection_config(tiny_qwen2, output))
    assert result.manifest["direction"]["selected_by"] == "screening"
    assert result.manifest["direction"]["layer"] < 0.8 * 4
    assert (output / "candidate_scores.png").stat().st_size > 1000
    scores = json.loads((output / "candidate_scores.json").read_text())
    assert len(scores["screen"][0]) == 4


def test_push_uses_the_api_and_never_prints_the_token(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recording fake stands in for huggingface_hub.HfApi (no network in tests)."""
    calls: list[tuple[str, dict]] = []

    class RecordingApi:
        def whoami(self, token: str | None = None) -> dict:
            calls.append(("whoami", {"token": token}))
            return {"name": "someone"}

        def repo_info(self, repo_id: str, **kwargs: object) -> None:
            import httpx2
            from huggingface_hub.errors import RepositoryNotFoundError

            calls.append(("repo_info", {"repo_id": repo_id}))
            response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co"))
            raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response)

        def create_repo(self, repo_id: str, **kwargs: object) -> None:
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs: object) -> None:
            files = sorted(path.name for path in Path(str(kwargs["folder_path"])).iterdir())
            calls.append(("upload_folder", {**kwargs, "files": files}))

    secret = "hf_secret_token_value_123"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path))  # where a push without --output stages
    monkeypatch.setattr("abliterate.ship.hub._default_api", lambda: RecordingApi())
    result = _run(
        str(tiny_qwen2),
        "--push-to-hub",
        "someone/tiny-abliterated",
        "--private",
        "--layer",
        "1",
        "--position",
        "-1",
        *SMALL,
    )
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    names = [name for name, _ in calls]
    assert names == ["whoami", "repo_info", "create_repo", "upload_folder"]
    assert calls[2][1]["private"] is True and calls[2][1]["repo_id"] == "someone/tiny-abliterated"
    assert {"README.md", "abliterate.json", "direction.safetensors", "model.safetensors"} <= set(
        calls[3][1]["files"]
    )
    assert not (tmp_path / "push" / "someone--tiny-abliterated").exists(), "staged copy left after the push"
    assert "https://huggingface.co/someone/tiny-abliterated" in result.output
