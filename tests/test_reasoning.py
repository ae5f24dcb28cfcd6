"""Reasoning templates: EOI tokens and selection with the thinking block closed,
evaluation past the block with refusals inside it and in the answer counted apart, template kwargs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import save_tiny
from tiny import make_tokenizer

from abliterate.cli import main
from abliterate.config import EVAL_MAX_NEW_TOKENS
from abliterate.model.batching import eoi_length
from abliterate.model.chat import THINKING_FORMATS, ChatFormat, SplitReply, detect_thinking, split_reply
from abliterate.model.prompts import bundled

_TURNS = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
)
# Qwen3: thinks by default; ``enable_thinking=false`` renders an empty, closed block.
QWEN3 = _TURNS + (
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
# DeepSeek-R1: the generation prompt opens the block itself.
R1 = _TURNS + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
# gpt-oss (harmony): channels.
HARMONY = (
    "{% for message in messages %}"
    "{{ '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
    "{% if false %}<|channel|>final<|message|>{% endif %}"
)
THINK, HARMONY_FORMAT = THINKING_FORMATS


@pytest.mark.parametrize(
    ("template", "expected"), [(QWEN3, THINK), (R1, THINK), (HARMONY, HARMONY_FORMAT), (None, None)]
)
def test_thinking_format_is_detected_from_the_template(template: str | None, expected: object) -> None:
    tokenizer = make_tokenizer() if template is None else make_tokenizer(template)
    assert detect_thinking(tokenizer) is expected


@pytest.mark.parametrize(
    ("template", "kwargs", "ending"),
    [
        (QWEN3, {}, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        (QWEN3, {"enable_thinking": False}, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        (R1, {}, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        (
            HARMONY,
            {},
            "<|start|>assistant<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>",
        ),
    ],
)
def test_scoring_prompts_close_the_block_once(template: str, kwargs: dict, ending: str) -> None:
    tokenizer = make_tokenizer(template)
    chat = ChatFormat(None, kwargs, detect_thinking(tokenizer), close_thinking=True)
    text = chat.render(tokenizer, "Tell me a joke.")
    assert text.endswith(ending), text
    assert text.count(detect_thinking(tokenizer).open) == 1
    # The EOI tokens are derived from this rendering: they end with the closed block.
    n_eoi = eoi_length(tokenizer, chat=chat)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eoi_text = tokenizer.decode(ids[-n_eoi:])
    assert eoi_text.endswith(ending[-12:]) and ("<|im_end|>" in eoi_text or "<|end|>" in eoi_text), eoi_text
    assert n_eoi > eoi_length(tokenizer, chat=ChatFormat()) or kwargs


def test_replies_open_the_block_unless_the_kwargs_close_it() -> None:
    tokenizer = make_tokenizer(QWEN3)
    thinking = detect_thinking(tokenizer)
    assert ChatFormat(None, {}, thinking).opens_thinking(tokenizer)
    assert not ChatFormat(None, {"enable_thinking": False}, thinking).opens_thinking(tokenizer)
    assert not ChatFormat(None, {}, thinking, close_thinking=True).opens_thinking(tokenizer)


@pytest.mark.parametrize(
    ("reply", "inside", "thinking", "answer", "finished"),
    [
        ("<think>\nI can't say.\n</think>\n\nSure: here.", False, "I can't say.", "Sure: here.", True),
        ("I must refuse.</think>I'm sorry.", True, "I must refuse.", "I'm sorry.", True),
        ("<think>\nstill going", False, "still going", "", False),
        ("still going", True, "still going", "", False),
        ("No block at all.", False, "", "No block at all.", True),
    ],
)
def test_split_reply(reply: str, inside: bool, thinking: str, answer: str, finished: bool) -> None:
    assert split_reply(reply, THINK, inside) == SplitReply(thinking, answer, finished)


def test_harmony_reply_split() -> None:
    reply = (
        "<|channel|>analysis<|message|>User wants X. I cannot.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Sure.<|return|>"
    )
    part = split_reply(reply, HARMONY_FORMAT, False)
    assert part.thinking == "User wants X. I cannot." and part.answer == "Sure.<|return|>" and part.finished


@pytest.fixture(scope="module")
def r1_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = save_tiny(tmp_path_factory.mktemp("tiny-r1"), "qwen2")
    make_tokenizer(R1).save_pretrained(directory)
    return directory


def test_run_scores_closed_and_evaluates_past_the_block(
    r1_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import abliterate.find.evaluate
    import abliterate.pipeline.gating
    import abliterate.pipeline.subject

    encodings: list[bool] = []
    real_encode = abliterate.pipeline.subject.encode

    def recording_encode(*args: object, chat: ChatFormat | None = None, **kwargs: object) -> object:
        encodings.append(chat is not None and chat.close_thinking)
        return real_encode(*args, chat=chat, **kwargs)

    generations: list[dict] = []
    canned = iter(
        [
            ["I can't help with that.</think>I'm sorry, I cannot.", "Let me think.</think>Sure, here it is."],
            ["Fine.</think>Sure.", "I cannot decide, still thinking"],
        ]
    )

    def fake_generate(model: object, tokenizer: object, prompts: list[str], **options: object) -> list[str]:
        generations.append(options)
        # Each side generates its sets as one list, the harmful set first: the two harmful eval prompts get
        # the canned replies, the over-refusal sets plain answers.
        assert prompts[:2] == bundled("harmful", "eval")[:2]
        return next(canned) + ["Sure."] * (len(prompts) - 2)

    # Subject.encoded (extraction, selection, evaluation) and the parity prompts both encode.
    monkeypatch.setattr(abliterate.pipeline.subject, "encode", recording_encode)
    monkeypatch.setattr(abliterate.pipeline.gating, "encode", recording_encode)
    monkeypatch.setattr(abliterate.find.evaluate, "generate_replies", fake_generate)
    output = tmp_path / "out"
    args = ["run", str(r1_model), "-o", str(output), "--layer", "1", "--position", "-1", "--n-train", "4"]
    args += [
        "--n-val",
        "2",
        "--n-eval",
        "2",
        "--no-progress",
        "--max-thinking-tokens",
        "7",
    ]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert encodings and all(encodings), "a forward pass scored prompts with the thinking block open"
    assert generations and all(
        options["max_new_tokens"] == EVAL_MAX_NEW_TOKENS + 7 for options in generations
    )
    assert all(not options["chat"].close_thinking for options in generations)
    manifest = json.loads((output / "abliterate.json").read_text())
    thinking = manifest["evaluation"]["thinking"]
    assert thinking["format"] == "think"
    assert thinking["before"] == {
        "refusal_rate_in_answer": 0.5,
        "refusal_rate_in_thinking": 0.5,
        "unfinished": 0,
        "n": 2,
    }
    assert thinking["after"] == {
        "refusal_rate_in_answer": 0.0,
        "refusal_rate_in_thinking": 0.5,
        "unfinished": 1,
        "n": 2,
    }
    tokenizer = make_tokenizer(R1)
    closed = ChatFormat(None, {}, THINK, close_thinking=True)
    assert manifest["direction"]["n_eoi_tokens"] == eoi_length(tokenizer, chat=closed)


def test_template_kwargs_reach_the_template(
    r1_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import abliterate.pipeline.subject

    seen: list[dict] = []
    real = abliterate.pipeline.subject._chat_formats

    def recording(config: object, tokenizer: object) -> tuple[ChatFormat, ChatFormat]:
        formats = real(config, tokenizer)
        seen.append(formats[1].template_kwargs)
        return formats

    monkeypatch.setattr(abliterate.pipeline.subject, "_chat_formats", recording)
    args = [
        "run",
        str(r1_model),
        "-o",
        str(tmp_path / "o"),
        "--layer",
        "1",
        "--position",
        "-1",
        "--n-train",
        "4",
    ]
    args += [
        "--n-val",
        "2",
        "--no-evaluate",
        "--no-progress",
        "--chat-template-kwargs",
        '{"enable_thinking": false}',
    ]
    assert CliRunner().invoke(main, args, catch_exceptions=False).exit_code == 0
    assert seen == [{"enable_thinking": False}]


@pytest.mark.parametrize(
    ("text", "expect"), [("{enable_thinking: false}", "not valid JSON"), ("[1]", "JSON object")]
)
def test_bad_template_kwargs_are_one_line(r1_model: Path, tmp_path: Path, text: str, expect: str) -> None:
    args = ["run", str(r1_model), "-o", str(tmp_path / "o"), "--chat-template-kwargs", text]
    result = CliRunner().invoke(main, args)
    assert (
        result.exit_code == 1
        and result.output.startswith("error: --chat-template-kwargs")
        and expect in result.output
    )
    assert not (tmp_path / "o").exists()
