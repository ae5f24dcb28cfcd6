"""Every bad input: one clear line on stderr, a non-zero exit, and nothing written or overwritten."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import save_tiny
from tiny import quick_run_args

from abliterate.cli import main

SMALL = quick_run_args(8, 4, layer=1)


def _fails_cleanly(args: list[str], output: Path | None, expect: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert expect.lower() in lines[0].lower(), lines[0]
    if output is not None:
        assert not output.exists(), "something was written"
        assert not [path for path in output.parent.iterdir() if path.name.startswith(f".{output.name}")]


def test_missing_model(tmp_path: Path) -> None:
    _fails_cleanly(
        ["run", str(tmp_path / "nope"), "--output", str(tmp_path / "out")], tmp_path / "out", "not found"
    )


def test_missing_gguf_file(tmp_path: Path) -> None:
    _fails_cleanly(
        ["run", str(tmp_path / "m.gguf"), "--output", str(tmp_path / "out")], tmp_path / "out", "not found"
    )


def test_no_chat_template(tmp_path: Path) -> None:
    model = save_tiny(tmp_path / "plain", chat_template=False)
    _fails_cleanly(
        ["run", str(model), "--output", str(tmp_path / "out"), *SMALL], tmp_path / "out", "chat template"
    )


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        ("empty.txt", "\n\n", "no prompts"),
        ("broken.json", '["a", ', "not valid json"),
        ("objects.json", '[{"question": "x"}]', "instruction"),
        ("table.csv", "question\nwhat\n", "column"),
        ("prompts.xml", "<a/>", "unsupported"),
    ],
)
def test_bad_prompt_files(tiny_qwen2: Path, tmp_path: Path, name: str, content: str, expect: str) -> None:
    source = tmp_path / name
    source.write_text(content)
    out = tmp_path / "out"
    _fails_cleanly(
        ["run", str(tiny_qwen2), "--output", str(out), "--harmful", str(source), *SMALL], out, expect
    )


def test_missing_prompt_file(tiny_qwen2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _fails_cleanly(
        ["run", str(tiny_qwen2), "--output", str(out), "--harmless", str(tmp_path / "x.txt"), *SMALL],
        out,
        "not found",
    )


def test_unknown_architecture(tmp_path: Path) -> None:
    """OPT is not registered and its module names match no registered structure."""
    from tiny import make_tokenizer
    from transformers import AutoModelForCausalLM, OPTConfig

    model = tmp_path / "opt"
    config = OPTConfig(
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    out = tmp_path / "out"
    _fails_cleanly(["run", str(model), "--output", str(out), *SMALL], out, "--architecture")


def test_unknown_architecture_override(tiny_qwen2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _fails_cleanly(
        ["run", str(tiny_qwen2), "--output", str(out), "--architecture", "nonsense", *SMALL], out, "nonsense"
    )


def test_output_dir_not_empty_is_left_alone(tiny_qwen2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["run", str(tiny_qwen2), "--output", str(out), *SMALL])
    assert result.exit_code != 0
    assert "not empty" in result.output and "--overwrite" in result.output
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_parity_failure_saves_nothing(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fold a different direction than the hooks ablate: the gate must catch it and write nothing."""
    import torch

    import abliterate.edit

    real_fold = abliterate.edit.fold_direction

    def wrong_fold(model: object, adapter: object, direction: torch.Tensor, **options: object) -> int:
        return real_fold(model, adapter, torch.roll(direction, 1), **options)

    monkeypatch.setattr(abliterate.edit, "fold_direction", wrong_fold)
    out = tmp_path / "out"
    _fails_cleanly(["run", str(tiny_qwen2), "--output", str(out), *SMALL], out, "parity gate failed")


def test_push_without_token_fails_before_loading(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the token check")

    monkeypatch.setattr("abliterate.loading.load_model", must_not_load)
    out = tmp_path / "out"
    _fails_cleanly(
        ["run", str(tiny_qwen2), "--output", str(out), "--push-to-hub", "me/x", *SMALL], out, "token"
    )


def test_layer_without_position(tiny_qwen2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _fails_cleanly(["run", str(tiny_qwen2), "--output", str(out), "--layer", "1"], out, "--position")


def test_layer_out_of_range(tiny_qwen2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [
        "run",
        str(tiny_qwen2),
        "--output",
        str(out),
        "--n-train",
        "4",
        "--no-progress",
        "--layer",
        "9",
        "--position",
        "-1",
    ]
    _fails_cleanly(args, out, "out of range")


def test_interrupt_while_saving_leaves_nothing(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the save: the output directory never appears and no temporary sibling is left."""

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("abliterate.checkpoint.save_model", interrupted)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(tiny_qwen2), "--output", str(out), *SMALL])
    assert result.exit_code == 130
    assert "nothing was written" in result.output
    assert not out.exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".out")]
