"""The tampering corpus, weights and declared edit: every case is rejected by ``abliterate verify`` with a
one-line reason, in float32 and bfloat16; the clean edit passes (the negative control).

The cases and how to add one: ``tests/corpus.py``.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from corpus import (
    D_MODEL,
    DTYPES,
    EMBEDDING,
    NORM,
    OTHER_DIRECTION_SEED,
    TamperCase,
    Triple,
    add_tensor,
    assert_rejected,
    build_clean,
    case_id,
    cases_in,
    change_tensor,
    copy_triple,
    read_tensor,
    register,
    remove_tensor,
    rewrite_direction,
    seeded_direction,
    set_strengths,
    verify,
    write_tensor,
    writer_names,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ATTENTION_OUT = "model.layers.1.self_attn.o_proj.weight"
MLP_DOWN = "model.layers.2.mlp.down_proj.weight"
# Two rows past the tokenizer's ~300 entries, which no verify prompt reaches: logit parity cannot see
# them, only the certificate can (and one NaN made it look away before every value had to be finite).
GARBAGE_TOKEN, NAN_TOKEN = 318, 319
NON_FINITE = "NaN/Inf"


def _garbage_row_behind_nan(original: Path, edited: Path, direction: Path) -> None:
    def change(embedding: torch.Tensor) -> None:
        garbage = torch.randn(embedding.shape[-1], generator=torch.Generator().manual_seed(5)) * 10
        embedding[GARBAGE_TOKEN] = garbage.to(embedding.dtype)
        embedding[NAN_TOKEN, 0] = math.nan

    change_tensor(edited, EMBEDDING, change)


def _set_element(name: str, value: float) -> object:
    def mutate(original: Path, edited: Path, direction: Path) -> None:
        change_tensor(edited, name, lambda tensor: tensor.view(-1).__setitem__(3, value))

    return mutate


def _unedited_writers_with_nan(original: Path, edited: Path, direction: Path) -> None:
    for name in writer_names():
        unedited = read_tensor(original, name).clone()
        unedited.view(-1)[7] = math.nan
        write_tensor(edited, name, unedited)


def _nan_in_original(original: Path, edited: Path, direction: Path) -> None:
    change_tensor(original, ATTENTION_OUT, lambda tensor: tensor.view(-1).__setitem__(3, math.nan))


def _ulp(sign: int) -> object:
    def mutate(original: Path, edited: Path, direction: Path) -> None:
        def change(norm: torch.Tensor) -> None:
            bits = norm.view(torch.int16 if norm.element_size() == 2 else torch.int32)
            bits[0] += sign  # one unit in the last place (the norm weights are positive)

        change_tensor(edited, NORM, change)

    return mutate


def _swap_writers(original: Path, edited: Path, direction: Path) -> None:
    first, second = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"
    one, two = read_tensor(edited, first), read_tensor(edited, second)
    write_tensor(edited, first, two)
    write_tensor(edited, second, one)


def _missing(original: Path, edited: Path, direction: Path) -> None:
    remove_tensor(edited, "model.layers.3.mlp.down_proj.weight")


def _extra(original: Path, edited: Path, direction: Path) -> None:
    add_tensor(edited, "model.layers.0.mlp.extra_proj.weight", read_tensor(edited, MLP_DOWN))


def _strengths(value: float) -> object:
    def mutate(original: Path, edited: Path, direction: Path) -> None:
        set_strengths(direction, value)

    return mutate


def _zero_edit_of_the_original(original: Path, edited: Path, direction: Path) -> None:
    """The unmodified source shipped as "verified abliterated": strength 0 declared everywhere."""
    set_strengths(direction, 0.0)
    shutil.rmtree(edited)
    shutil.copytree(original, edited)


def _other_d_model(original: Path, edited: Path, direction: Path) -> None:
    rewrite_direction(direction, seeded_direction(OTHER_DIRECTION_SEED, D_MODEL * 2))


def _other_direction(original: Path, edited: Path, direction: Path) -> None:
    other = seeded_direction(OTHER_DIRECTION_SEED)
    rewrite_direction(direction, other / other.norm())


def _writer_left_unedited(original: Path, edited: Path, direction: Path) -> None:
    write_tensor(edited, ATTENTION_OUT, read_tensor(original, ATTENTION_OUT))


WEIGHT_CASES = register(
    TamperCase("garbage embedding row behind one NaN", _garbage_row_behind_nan, NON_FINITE, forward=True),
    TamperCase("NaN in an edited writer", _set_element(ATTENTION_OUT, math.nan), NON_FINITE),
    TamperCase("Inf in an edited writer", _set_element(MLP_DOWN, math.inf), NON_FINITE),
    TamperCase("NaN in the edited embedding", _set_element(EMBEDDING, math.nan), NON_FINITE),
    TamperCase("unedited writers carrying one NaN each", _unedited_writers_with_nan, NON_FINITE),
    TamperCase("NaN in the original writer", _nan_in_original, "source's"),
    TamperCase("+1 ulp in a norm weight", _ulp(+1), "no residual writer lives there"),
    TamperCase("-1 ulp in a norm weight", _ulp(-1), "no residual writer lives there"),
    TamperCase("two writers of one shape swapped", _swap_writers, "× the bound"),
    TamperCase("a tensor missing", _missing, "missing from the edited checkpoint"),
    TamperCase("an extra tensor", _extra, "in the edited checkpoint but not in the original"),
    TamperCase("a writer left unedited", _writer_left_unedited, "× the bound"),
)
DECLARED_CASES = register(
    TamperCase("declared strengths NaN", _strengths(math.nan), "must be finite"),
    TamperCase("declared strengths Inf", _strengths(math.inf), "must be finite"),
    TamperCase("declared strengths 0 on the edited model", _strengths(0.0), "no-op"),
    TamperCase("declared strengths 0 on the original itself", _zero_edit_of_the_original, "no-op"),
    TamperCase("declared strength 7", _strengths(7.0), "outside [0, 1.5]"),
    TamperCase("declared strength -1", _strengths(-1.0), "outside [0, 1.5]"),
    TamperCase("a direction for another d_model", _other_d_model, "belongs to another model"),
    TamperCase("another direction of the same d_model", _other_direction, "× the bound"),
)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Triple]:
    """The clean triple per dtype, built once; each case changes a copy."""
    return {dtype: build_clean(tmp_path_factory.mktemp(f"clean-{dtype}"), dtype) for dtype in DTYPES}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("forward", [False, True], ids=["no-forward", "full"])
def test_the_clean_edit_passes(clean: dict[str, Triple], dtype: str, forward: bool) -> None:
    assert verify(clean[dtype], forward=forward) == (0, "")


@pytest.mark.parametrize(("case", "dtype"), cases_in(WEIGHT_CASES + DECLARED_CASES), ids=case_id)
def test_verify_rejects(case: TamperCase, dtype: str, clean: dict[str, Triple], tmp_path: Path) -> None:
    assert_rejected(case, clean[dtype], tmp_path)


def _apply(source: Path, direction: Path, output: Path, *extra: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from abliterate.cli import main

    args = ["apply", str(source), "--direction", str(direction), "--output", str(output), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (0.0, "declares a zero edit (strength 0 on every writer): a no-op, the output would equal"),
        (math.nan, "gives the embedding strength nan: strengths and weights must be finite"),
        (7.0, "gives the embedding strength 7, outside [0, 1.5]"),
        (-1.0, "gives the embedding strength -1, outside [0, 1.5]"),
    ],
)
@pytest.mark.parametrize("output_format", ["checkpoint", "lora"])
def test_apply_refuses_a_declared_edit_that_is_no_edit(
    clean: dict[str, Triple], tmp_path: Path, value: float, reason: str, output_format: str
) -> None:
    direction = tmp_path / "direction.safetensors"
    shutil.copyfile(clean["float32"].direction, direction)
    set_strengths(direction, value)
    output = tmp_path / "out"
    status, text = _apply(clean["float32"].original, direction, output, "--format", output_format)
    assert status == 1 and reason in text, text
    assert len([line for line in text.splitlines() if line.strip()]) == 1, text
    assert not output.exists()


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_refuses_a_source_writer_with_nan(clean: dict[str, Triple], tmp_path: Path, dtype: str) -> None:
    triple = copy_triple(clean[dtype], tmp_path / "copy")
    _nan_in_original(triple.original, triple.edited, triple.direction)
    output = tmp_path / "out"
    status, text = _apply(triple.original, triple.direction, output)
    assert status == 1, text
    assert f"the source's {ATTENTION_OUT} holds NaN/Inf values: a fold would spread them" in text
    assert not output.exists() and not list(tmp_path.glob(".out*"))


def test_fold_refuses_a_writer_with_inf_before_editing_anything() -> None:
    from tiny import make_model

    from abliterate.adapters.resolve import resolve_adapter
    from abliterate.edit.declared import DeclaredEdit
    from abliterate.edit.walker import fold_direction

    model = make_model("qwen2")
    model.model.layers[3].mlp.down_proj.weight.data[0, 0] = math.inf
    before = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.down_proj\.weight holds NaN/Inf values"):
        fold_direction(model, resolve_adapter(model), DeclaredEdit(seeded_direction(1)))
    assert torch.equal(model.model.embed_tokens.weight, before)  # nothing was folded


def test_a_zero_strength_writer_is_not_counted_as_edited(clean: dict[str, Triple], tmp_path: Path) -> None:
    """Embedding at strength 0, every block at 1: 8 tensors edited (not 9), the embedding left bitwise
    as it was, and verify passes with 8 certified edits."""
    import json

    triple = clean["float32"]
    direction = tmp_path / "direction.safetensors"
    shutil.copyfile(triple.direction, direction)
    layers = {group: [1.0] * 4 for group in ("attention", "mlp", "experts", "shared_experts")}
    rewrite_direction(direction, metadata={"strengths": json.dumps({"embedding": 0.0, "layers": layers})})
    output = tmp_path / "out"
    status, text = _apply(triple.original, direction, output)
    assert status == 0 and "edited 8 of" in text, text
    assert torch.equal(read_tensor(output, EMBEDDING), read_tensor(triple.original, EMBEDDING))
    assert verify(Triple(triple.original, output, direction)) == (0, "")


def test_a_non_writer_with_nan_passes_when_bitwise_unchanged(
    clean: dict[str, Triple], tmp_path: Path
) -> None:
    """A NaN outside the writers is no fold's business: kept bit for bit, the edit still verifies
    (and the same NaN changed to another value does not)."""
    triple = copy_triple(clean["bfloat16"], tmp_path / "copy")
    change_tensor(triple.original, NORM, lambda norm: norm.__setitem__(5, math.nan))
    shutil.rmtree(triple.edited)
    assert _apply(triple.original, triple.direction, triple.edited)[0] == 0
    assert verify(triple) == (0, "")
    change_tensor(triple.edited, NORM, lambda norm: norm.__setitem__(5, 1.0))
    assert verify(triple)[0] == 2
