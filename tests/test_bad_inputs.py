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
    from dataclasses import replace

    import torch

    import abliterate.edit.walker
    from abliterate.edit.declared import DeclaredEdit

    real_fold = abliterate.edit.walker.fold_direction

    def wrong_fold(model: object, adapter: object, declared: DeclaredEdit, **options: object) -> int:
        return real_fold(
            model, adapter, replace(declared, direction=torch.roll(declared.direction, 1)), **options
        )

    monkeypatch.setattr(abliterate.edit.walker, "fold_direction", wrong_fold)
    out = tmp_path / "out"
    _fails_cleanly(["run", str(tiny_qwen2), "--output", str(out), *SMALL], out, "parity gate failed")


def test_push_without_token_fails_before_loading(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the token check")

    monkeypatch.setattr("abliterate.model.loading.load_model", must_not_load)
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

    monkeypatch.setattr("abliterate.ship.checkpoint.save_model", interrupted)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(tiny_qwen2), "--output", str(out), *SMALL])
    assert result.exit_code == 130
    assert "nothing was written" in result.output
    assert not out.exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".out")]


# --- user errors that used to end in a traceback -------------------------------------------------------


def _direction_file(model: Path, path: Path) -> Path:
    """A unit direction of the model's width, as ``run --direction-only`` would save it."""
    import json

    import torch

    from abliterate.ship.direction_file import save_direction

    width = json.loads((model / "config.json").read_text())["hidden_size"]
    return save_direction(path, torch.randn(width, generator=torch.Generator().manual_seed(0)), 1, -1, "x")


def _copy_with_config(model: Path, target: Path, **fields: object) -> Path:
    import json
    import shutil

    shutil.copytree(model, target)
    config = json.loads((target / "config.json").read_text())
    config.update(fields)
    (target / "config.json").write_text(json.dumps(config))
    return target


def _must_not_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("abliterate.model.loading.load_model", must_not_load)


@pytest.mark.parametrize("suffix", [".txt", ".json", ".jsonl", ".csv"])
def test_prompt_file_not_utf8_names_the_file(tiny_qwen2: Path, tmp_path: Path, suffix: str) -> None:
    source = tmp_path / f"latin1{suffix}"
    text = {".txt": "café\n", ".json": '["café"]', ".jsonl": '"café"\n', ".csv": "prompt\ncafé\n"}[suffix]
    source.write_bytes(text.encode("latin-1"))
    out = tmp_path / "out"
    _fails_cleanly(
        ["run", str(tiny_qwen2), "--output", str(out), "--harmless", str(source), *SMALL],
        out,
        f"{source}: not UTF-8",
    )
    _fails_cleanly(["evaluate", str(tiny_qwen2), "--harmful", str(source), "--n", "2"], None, str(source))


@pytest.mark.parametrize(
    "shard", ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", "./model.safetensors", ".."]
)
def test_index_shard_outside_the_folder(tiny_qwen2: Path, tmp_path: Path, shard: str) -> None:
    """An index naming a file outside the checkpoint is refused before anything is read or written; the
    first case is an attacker's: ``../model.safetensors`` exists and holds the very same tensors."""
    import json
    import shutil

    from safetensors import safe_open

    from abliterate.io.safetensors import find_shards

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2, model)
    shutil.copyfile(tiny_qwen2 / "model.safetensors", tmp_path / "model.safetensors")
    (model / "sub").mkdir()
    shutil.copyfile(tiny_qwen2 / "model.safetensors", model / "sub" / "model.safetensors")
    with safe_open(model / "model.safetensors", "pt") as handle:
        names = list(handle.keys())
    weight_map = {name: "model.safetensors" for name in names} | {names[0]: shard}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="a shard must be a file name in"):
        find_shards(model)  # the certificate's and local_checkpoint's reading of the shards
    direction = _direction_file(tiny_qwen2, tmp_path / "d.safetensors")
    out = tmp_path / "out"
    expect = f"names the shard {shard!r}"
    _fails_cleanly(["apply", str(model), "--direction", str(direction), "--output", str(out)], out, expect)
    # run, evaluate and verify load the model through transformers, which would follow the name
    _fails_cleanly(["run", str(model), "--output", str(out), *SMALL], out, expect)
    _fails_cleanly(["evaluate", str(model), "--n", "1"], None, expect)
    verify = ["verify", str(tiny_qwen2), str(model), "--direction", str(direction), "--no-certificate"]
    _fails_cleanly(verify, None, expect)


@pytest.mark.parametrize("shard", [5, None, ["model.safetensors"]])
def test_index_shard_that_is_not_a_name(tiny_qwen2: Path, tmp_path: Path, shard: object) -> None:
    import json
    import shutil

    from abliterate.io.safetensors import find_shards

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2, model)
    weight_map = {"model.embed_tokens.weight": shard, "lm_head.weight": "model.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="a shard must be a file name in"):
        find_shards(model)


def test_index_shard_plain_names_still_pass(tiny_qwen2: Path, tmp_path: Path) -> None:
    """Negative control: a well-formed index with plain shard names is accepted."""
    import json
    import shutil

    from safetensors import safe_open

    from abliterate.io.safetensors import find_shards

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2, model)
    with safe_open(model / "model.safetensors", "pt") as handle:
        weight_map = {name: "model.safetensors" for name in handle.keys()}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert find_shards(model)[0] == ["model.safetensors"]


@pytest.mark.parametrize("value", ["false", "true", 0, 1, [False]])
def test_tie_word_embeddings_not_a_bool(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: object
) -> None:
    """``"false"`` is true to Python: read as a bool it would decide, wrongly, whether the output head is
    the edited embedding. Every command that reads config.json refuses it in one line."""
    model = _copy_with_config(tiny_qwen2, tmp_path / "model", tie_word_embeddings=value)
    expect = f"config.json: tie_word_embeddings must be true or false, got {value!r}"
    direction = _direction_file(tiny_qwen2, tmp_path / "d.safetensors")
    out = tmp_path / "out"
    _fails_cleanly(["apply", str(model), "--direction", str(direction), "--output", str(out)], out, expect)
    lora = ["apply", str(model), "--direction", str(direction), "--output", str(out), "--format", "lora"]
    _fails_cleanly(lora, out, expect)
    for pair in ([model, tiny_qwen2], [tiny_qwen2, model]):
        verify = ["verify", *map(str, pair), "--direction", str(direction), "--no-progress"]
        _fails_cleanly(verify, None, expect)
        _fails_cleanly([*verify, "--no-forward"], None, expect)
    _fails_cleanly(["evaluate", str(model), "--n", "1"], None, expect)
    _must_not_load(monkeypatch)
    _fails_cleanly(["run", str(model), "--output", str(out), *SMALL], out, expect)


def test_tie_word_embeddings_in_text_config(tmp_path: Path) -> None:
    from abliterate.adapters.tying import ties_embeddings
    from abliterate.model.sources import check_config

    config = {"model_type": "llava", "text_config": {"model_type": "llama", "tie_word_embeddings": "no"}}
    with pytest.raises(ValueError, match=r"text_config\.tie_word_embeddings must be true or false, got 'no'"):
        ties_embeddings(config, "llava")
    with pytest.raises(ValueError, match=r"text_config\.tie_word_embeddings"):
        check_config(config)


@pytest.mark.parametrize(
    ("family", "value", "tied"),
    [("llama", True, True), ("gemma", False, False), ("gemma", None, True), ("llama", None, False)],
)
def test_tie_word_embeddings_bools_still_read(family: str, value: bool | None, tied: bool) -> None:
    """Negative control: true, false and null (the family's default: gemma ties, llama not) as before."""
    from abliterate.adapters.tying import ties_embeddings

    assert ties_embeddings({"model_type": family, "tie_word_embeddings": value}, family) is tied


@pytest.mark.parametrize("n", ["0", "-3"])
def test_evaluate_count_below_one(tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch, n: str) -> None:
    """``--n -3`` sliced from the end of the prompt list and evaluated 47 prompts without a word."""
    _must_not_load(monkeypatch)
    monkeypatch.setattr(
        "abliterate.ship.verify.load_model", lambda *a, **k: pytest.fail("loaded"), raising=False
    )
    _fails_cleanly(["evaluate", str(tiny_qwen2), f"--n={n}"], None, f"--n must be at least 1, got {n}")


@pytest.mark.parametrize(
    ("flag", "value", "expect"),
    [
        ("--n-train", "0", "--n-train must be at least 1, got 0"),
        ("--n-val", "-2", "--n-val must be at least 1, got -2"),
        ("--n-eval", "0", "--n-eval must be at least 1, got 0"),
        ("--n-eval", "-3", "--n-eval must be at least 1, got -3"),
        ("--trials", "0", "--trials must be at least 1, got 0"),
        ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
        ("--batch-size", "-4", "--batch-size '-4'"),
        ("--max-thinking-tokens", "-1", "--max-thinking-tokens must be at least 0"),
        ("--search-budget", "0", "--search-budget must be a positive number"),
        ("--search-budget", "nan", "--search-budget must be a positive number"),
    ],
)
def test_run_count_flags_below_minimum(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, value: str, expect: str
) -> None:
    _must_not_load(monkeypatch)
    out = tmp_path / "out"
    _fails_cleanly(["run", str(tiny_qwen2), "--output", str(out), *SMALL, f"{flag}={value}"], out, expect)


@pytest.mark.parametrize(
    ("device", "expect"),
    [
        ("tpu9", "--device 'tpu9': not a device"),
        ("cuda:-1", "--device 'cuda:-1': not a device"),
        ("meta", "--device 'meta'"),
        ("cuda:7", "--device cuda:7"),
    ],
)
def test_bad_device_names_the_flag(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str, expect: str
) -> None:
    """Refused by run, verify and evaluate before the model is loaded (and before verify's certificate)."""
    _must_not_load(monkeypatch)

    def must_not_certify(*args: object, **kwargs: object) -> None:
        raise AssertionError("the certificate ran before the bad --device was refused")

    monkeypatch.setattr("abliterate.prove.certificate.certify_checkpoint", must_not_certify)
    direction = _direction_file(tiny_qwen2, tmp_path / "d.safetensors")
    out = tmp_path / "out"
    _fails_cleanly(["run", str(tiny_qwen2), "--output", str(out), *SMALL, "--device", device], out, expect)
    verify = ["verify", str(tiny_qwen2), str(tiny_qwen2), "--direction", str(direction), "--device", device]
    _fails_cleanly(verify, None, expect)
    _fails_cleanly(["evaluate", str(tiny_qwen2), "--n", "1", "--device", device], None, expect)


def test_cuda_index_this_machine_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cuda:7`` on a machine with one GPU, and ``cuda`` on a machine with none."""
    import torch

    from abliterate.model.loading import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="--device cuda:7: this machine has 1 cuda device"):
        check_device("cuda:7")
    check_device("cuda:0")  # negative controls: the devices it has
    check_device("cuda")
    check_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        check_device("cuda")


# --- silent wrong results ---------------------------------------------------------------------------------


def _prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("\n".join(texts) + "\n")
    return path


def test_identical_prompt_classes_refused(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _must_not_load(monkeypatch)
    same = _prompts(tmp_path / "same.txt", [f"prompt number {i}" for i in range(40)])
    copy = _prompts(tmp_path / "copy.txt", [f"prompt number {i}" for i in reversed(range(40))])
    out = tmp_path / "out"
    args = ["run", str(tiny_qwen2), "--output", str(out), *SMALL, "--harmful", str(same)]
    _fails_cleanly([*args, "--harmless", str(copy)], out, "are the same 40 prompts")


def test_user_set_equal_to_the_bundled_other_class_refused(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--harmful`` given the bundled harmless prompts: compared with the whole bundled set, not a sample."""
    from abliterate.model.prompts import bundled

    _must_not_load(monkeypatch)
    harmless = [prompt for split in ("train", "val", "eval") for prompt in bundled("harmless", split)]
    source = _prompts(tmp_path / "harmless.txt", harmless)
    out = tmp_path / "out"
    args = ["run", str(tiny_qwen2), "--output", str(out), *SMALL, "--harmful", str(source)]
    _fails_cleanly(args, out, "the harmful and harmless prompts are the same")


def test_mostly_shared_prompt_classes_refused(tmp_path: Path) -> None:
    from abliterate.model.prompts import load_prompt_classes

    harmful = _prompts(tmp_path / "a.txt", [f"p{i}" for i in range(20)])
    harmless = _prompts(tmp_path / "b.txt", [f"p{i}" for i in range(9, 40)])  # 11 of the 20 shared
    with pytest.raises(ValueError, match=r"share 11 of 20 prompts \(e.g. 'p9'\)"):
        load_prompt_classes(str(harmful), str(harmless), n_train=4, n_val=2, n_eval=2, n_parity=2, seed=0)


def test_a_few_shared_prompts_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Half or fewer shared: the run goes on, one warning line names how many and one of them."""
    from abliterate.model.prompts import load_prompt_classes

    harmful = _prompts(tmp_path / "a.txt", [f"p{i}" for i in range(20)])
    harmless = _prompts(tmp_path / "b.txt", [f"p{i}" for i in range(10, 40)])  # 10 of the 20: half
    with caplog.at_level("WARNING", logger="abliterate.model.prompts"):
        first, second = load_prompt_classes(
            str(harmful), str(harmless), n_train=4, n_val=2, n_eval=2, n_parity=2, seed=0
        )
    shared = [record.getMessage() for record in caplog.records if "share" in record.getMessage()]
    assert shared == [
        "the harmful and harmless prompts share 10 prompt(s) (e.g. 'p10'): each counts in both classes"
    ]
    assert first.sizes() == second.sizes() == {"train": 4, "val": 2, "eval": 2, "parity": 2}


def test_disjoint_classes_not_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Negative control: disjoint user sets, and the bundled sets, give no warning."""
    from abliterate.model.prompts import load_prompt_classes

    harmful = _prompts(tmp_path / "a.txt", [f"a{i}" for i in range(20)])
    harmless = _prompts(tmp_path / "b.txt", [f"b{i}" for i in range(20)])
    sizes = dict(n_train=4, n_val=2, n_eval=2, n_parity=2, seed=0)
    with caplog.at_level("WARNING", logger="abliterate.model.prompts"):
        load_prompt_classes(str(harmful), str(harmless), **sizes)
        load_prompt_classes(str(harmful), None, **sizes)
        load_prompt_classes(None, None, **sizes)
    assert not caplog.records


def test_small_user_source_warns_once_with_the_sizes_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from abliterate.model.prompts import load_splits

    source = _prompts(tmp_path / "few.txt", [f"p{i}" for i in range(10)])
    with caplog.at_level("WARNING", logger="abliterate.model.prompts"):
        splits = load_splits("harmful", str(source), n_train=8, n_val=4, n_eval=2, n_parity=4, seed=0)
    used = splits.sizes()
    assert sum(used.values()) == 10 and all(used.values())
    assert [record.getMessage() for record in caplog.records] == [
        f"fewer harmful prompts than asked in {source}: train {used['train']} of 8, val {used['val']} of 4, "
        f"eval {used['eval']} of 2, parity {used['parity']} of 4"
    ]


def test_bundled_split_smaller_than_asked_warns(caplog: pytest.LogCaptureFixture) -> None:
    from abliterate.model.prompts import bundled, load_splits

    held, asked = len(bundled("harmless", "eval")), len(bundled("harmless", "eval")) + 30
    with caplog.at_level("WARNING", logger="abliterate.model.prompts"):
        splits = load_splits("harmless", None, n_train=8, n_val=4, n_eval=asked, n_parity=4, seed=0)
    assert splits.sizes() == {"train": 8, "val": 4, "eval": held, "parity": 4}
    assert [record.getMessage() for record in caplog.records] == [
        "fewer harmless prompts than asked in the bundled set: train 8 of 8, val 4 of 4, "
        f"eval {held} of {asked}, parity 4 of 4"
    ]


def test_too_few_prompts_refused(tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented minimum: 4 distinct prompts per class, one per split (repeats count once)."""
    _must_not_load(monkeypatch)
    source = _prompts(tmp_path / "three.txt", ["a", "b", "c", "a", "b"])
    out = tmp_path / "out"
    args = ["run", str(tiny_qwen2), "--output", str(out), *SMALL, "--harmful", str(source)]
    _fails_cleanly(args, out, "needs at least 4 distinct prompts, found 3")


def test_manifest_records_the_prompt_sizes_used(tiny_qwen2: Path, tmp_path: Path) -> None:
    """A run asked for more prompts than exist: ``abliterate.json`` says how many each split really held,
    and ``config`` keeps what was asked for."""
    import json

    from abliterate.model.prompts import bundled

    held = len(bundled("harmless", "eval"))  # the bundled harmless eval split, asked for 10 more
    source = _prompts(tmp_path / "few.txt", [f"Tell me about topic number {i}." for i in range(10)])
    out = tmp_path / "out"
    args = ["run", str(tiny_qwen2), "--output", str(out), *SMALL, "--no-evaluate", "--direction-only"]
    result = CliRunner().invoke(main, [*args, "--harmful", str(source), "--n-eval", str(held + 10)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "abliterate.json").read_text())
    harmful, harmless = manifest["prompts"]["harmful"], manifest["prompts"]["harmless"]
    assert sum(harmful.values()) == 10 and all(harmful.values())
    assert harmless == {"train": 8, "val": 4, "eval": held, "parity": 4}
    assert manifest["config"]["n_eval"] == held + 10
