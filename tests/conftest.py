"""Shared fixtures: tiny checkpoints on disk, built in-process (no network)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_model, make_tokenizer


def save_tiny(directory: Path, model_type: str = "qwen2", chat_template: bool = True, **overrides) -> Path:
    """Save a tiny random model and tokenizer as a safetensors checkpoint in ``directory``."""
    model = make_model(model_type, **overrides)
    tokenizer = make_tokenizer(None if not chat_template else make_tokenizer().chat_template)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's tests with one intra-op thread: tiny models gain nothing from more, which only add
    a barrier per operation (on a busy 2-core machine a module took 10x longer with 2 threads)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny qwen2 checkpoint with q/k/v biases and untied embeddings."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama checkpoint with tied embeddings."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama-tied"), "llama", tie_word_embeddings=True)


def assert_apply_equals_fold(source: Path, direction_file: Path, folded: Path, output: Path) -> None:
    """``abliterate apply`` of ``direction_file`` onto ``source`` writes exactly the tensors of the
    in-memory fold saved in ``folded``, and ``abliterate verify`` proves it."""
    import torch
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from abliterate.cli import main

    runner = CliRunner()
    result = runner.invoke(
        main, ["apply", str(source), "--direction", str(direction_file), "--output", str(output)]
    )
    assert result.exit_code == 0, result.output
    expected, applied = load_file(folded / "model.safetensors"), {}
    for shard in output.glob("*.safetensors"):
        applied.update(load_file(shard))
    for name, tensor in expected.items():
        assert torch.equal(applied[name], tensor), name
    verified = runner.invoke(
        main, ["verify", str(source), str(output), "--direction", str(direction_file), "--json"]
    )
    assert verified.exit_code == 0, verified.output
