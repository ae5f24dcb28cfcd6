"""The tampering corpus, LoRA adapters: ``abliterate verify ORIGINAL ADAPTER_DIR --direction FILE`` rejects
every tampered adapter with a one-line reason (exit 2), in float32 and bfloat16; the clean adapter passes
(the negative control).

The cases start from the ``"lora adapter"`` clean triple (``build_clean_adapter``): ``edited`` is the adapter
directory ``apply --format lora`` writes. The corpus framework: ``tests/corpus.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from corpus import (
    BUILDERS,
    DIRECTION_SEED,
    DTYPES,
    MODEL_TYPE,
    N_LAYERS,
    OTHER_DIRECTION_SEED,
    TamperCase,
    Triple,
    assert_rejected,
    case_id,
    cases_in,
    copy_triple,
    register,
    rewrite_direction,
    seeded_direction,
    verify,
)
from safetensors.torch import load_file, save_file

pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

KIND = "lora adapter"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model.model.layers"
O_PROJ_A = f"{PREFIX}.1.self_attn.o_proj.lora_A.weight"
DOWN = "model.layers.2.mlp.down_proj"
Q_PROJ = "model.layers.1.self_attn.q_proj"


def build_clean_adapter(root: Path, dtype: str) -> Triple:
    """A clean adapter triple under ``root``: a tiny qwen2 checkpoint in ``dtype``, a seeded direction, and
    the adapter ``abliterate apply --format lora`` writes from them (``edited``)."""
    return _adapter_triple(root, dtype, DIRECTION_SEED)


def _adapter_triple(root: Path, dtype: str, seed: int) -> Triple:
    from conftest import save_tiny

    from abliterate.ship.direction_file import declared_from_file, load_direction, save_direction
    from abliterate.ship.lora import apply_lora

    root.mkdir(parents=True, exist_ok=True)
    original = save_tiny(root / "original", MODEL_TYPE, dtype=getattr(torch, dtype))
    direction = save_direction(root / "direction.safetensors", seeded_direction(seed), 2, -1, "corpus")
    edited = root / "adapter"
    apply_lora(str(original), declared_from_file(*load_direction(direction)), edited)
    return Triple(original, edited, direction)


BUILDERS[KIND] = build_clean_adapter


# ----------------------------------------------------------------------------------- changing an adapter


def _change_weights(adapter: Path, change: object) -> None:
    tensors = load_file(str(adapter / WEIGHTS))
    change(tensors)  # type: ignore[operator]
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(adapter / WEIGHTS))


def _change_config(adapter: Path, change: object) -> None:
    config = json.loads((adapter / CONFIG).read_text("utf-8"))
    change(config)  # type: ignore[operator]
    (adapter / CONFIG).write_text(json.dumps(config, indent=2), "utf-8")


def _extra_target(original: Path, adapter: Path, direction: Path) -> None:
    """A LoRA pair on ``q_proj`` (which writes nothing to the residual stream), declared in the config."""

    def add(tensors: dict[str, torch.Tensor]) -> None:
        a = tensors[O_PROJ_A]
        tensors[f"base_model.model.{Q_PROJ}.lora_A.weight"] = torch.randn(1, a.shape[1]) * 0.1
        tensors[f"base_model.model.{Q_PROJ}.lora_B.weight"] = torch.randn(a.shape[1], 1) * 0.1

    _change_weights(adapter, add)
    _change_config(adapter, lambda config: config["target_modules"].append(Q_PROJ))


def _extra_tensor(original: Path, adapter: Path, direction: Path) -> None:
    """The same pair in the weights file only: whatever would load it, the edit does not produce it."""
    _change_weights(
        adapter,
        lambda tensors: tensors.__setitem__(f"base_model.model.{Q_PROJ}.lora_A.weight", torch.ones(1, 64)),
    )


def _target_of_an_unchanged_writer(original: Path, adapter: Path, direction: Path) -> None:
    """The direction file declares block 3's MLP at strength 0, so the adapter's pair there is extra."""
    profile = {group: [1.0] * N_LAYERS for group in ("attention", "mlp", "experts", "shared_experts")}
    profile["mlp"][3] = 0.0
    rewrite_direction(direction, metadata={"strengths": json.dumps({"embedding": 1.0, "layers": profile})})


def _missing_pair(original: Path, adapter: Path, direction: Path) -> None:
    """One writer's pair and its target dropped: the adapter leaves that writer unedited."""

    def drop(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.startswith(f"base_model.model.{DOWN}.")]:
            del tensors[name]

    _change_weights(adapter, drop)
    _change_config(adapter, lambda config: config["target_modules"].remove(DOWN))


def _missing_pair_only(original: Path, adapter: Path, direction: Path) -> None:
    """The pair dropped, the config left as it was (peft would initialise B to zero: no edit there)."""
    _change_weights(adapter, lambda tensors: tensors.pop(f"base_model.model.{DOWN}.lora_B.weight"))


def _scale_b(original: Path, adapter: Path, direction: Path) -> None:
    def scale(tensors: dict[str, torch.Tensor]) -> None:
        name = f"base_model.model.{DOWN}.lora_B.weight"
        tensors[name] = tensors[name] * 0.9

    _change_weights(adapter, scale)


def _config_field(key: str, value: object) -> object:
    def mutate(original: Path, adapter: Path, direction: Path) -> None:
        def change(config: dict) -> None:
            config[key] = value(config[key]) if callable(value) else value

        _change_config(adapter, change)

    return mutate


def _nan_in_a(original: Path, adapter: Path, direction: Path) -> None:
    _change_weights(adapter, lambda tensors: tensors[O_PROJ_A].view(-1).__setitem__(5, math.nan))


def _other_direction(original: Path, adapter: Path, direction: Path) -> None:
    """The adapter ``apply --format lora`` writes for another (seeded) direction, files swapped in."""
    dtype = "float32" if _dtype_of(original) == torch.float32 else "bfloat16"
    other = _adapter_triple(adapter.parent / "another", dtype, OTHER_DIRECTION_SEED)
    for name in (WEIGHTS, CONFIG):
        (adapter / name).write_bytes((other.edited / name).read_bytes())


def _dtype_of(checkpoint: Path) -> torch.dtype:
    return next(iter(load_file(str(checkpoint / "model.safetensors")).values())).dtype


ADAPTER_CASES = register(
    TamperCase("adapter: extra target (LoRA on q_proj)", _extra_target, Q_PROJ, kind=KIND),
    TamperCase(
        "adapter: extra tensor not in the config",
        _extra_tensor,
        f"base_model.model.{Q_PROJ}.lora_A.weight: not produced by the declared edit",
        kind=KIND,
    ),
    TamperCase(
        "adapter: LoRA on a writer the edit leaves unchanged",
        _target_of_an_unchanged_writer,
        "target_modules has model.layers.3.mlp.down_proj, which the declared edit's adapter does not target",
        kind=KIND,
    ),
    TamperCase("adapter: a writer's pair and target missing", _missing_pair, f"lacks {DOWN}", kind=KIND),
    TamperCase("adapter: a writer's B missing", _missing_pair_only, "lora_B.weight: missing", kind=KIND),
    TamperCase(
        "adapter: B scaled by 0.9", _scale_b, "differ from the declared edit's recomputation", kind=KIND
    ),
    TamperCase(
        "adapter: B scaled by 0.9 (full verify)",
        _scale_b,
        "differ from the declared edit's recomputation",
        forward=True,
        kind=KIND,
    ),
    TamperCase(
        "adapter: lora_alpha doubled",
        _config_field("lora_alpha", lambda v: 2 * v),
        "lora_alpha is 2",
        kind=KIND,
    ),
    TamperCase("adapter: r changed", _config_field("r", 2), "adapter_config.json: r is 2", kind=KIND),
    TamperCase(
        "adapter: alpha_pattern doubles one target's scaling",
        _config_field("alpha_pattern", {"model.layers.1.self_attn.o_proj": 2}),
        "alpha_pattern is",
        kind=KIND,
    ),
    TamperCase("adapter: use_dora switched on", _config_field("use_dora", True), "use_dora", kind=KIND),
    TamperCase(
        "adapter: unknown config field",
        _config_field("lora_magic_scale", 3.0),
        "'lora_magic_scale' is unknown to the installed peft",
        kind=KIND,
    ),
    TamperCase("adapter: NaN in one A", _nan_in_a, "o_proj.lora_A.weight: holds NaN/Inf", kind=KIND),
    TamperCase(
        "adapter: for another direction",
        _other_direction,
        "differ from the declared edit's recomputation",
        kind=KIND,
    ),
)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Triple]:
    """The clean adapter triple per dtype, built once; each case changes a copy."""
    return {
        dtype: build_clean_adapter(tmp_path_factory.mktemp(f"adapter-{dtype}"), dtype) for dtype in DTYPES
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("forward", [False, True], ids=["no-forward", "full"])
def test_the_clean_adapter_passes(clean: dict[str, Triple], dtype: str, forward: bool) -> None:
    assert verify(clean[dtype], forward=forward) == (0, "")


@pytest.mark.parametrize(("case", "dtype"), cases_in(ADAPTER_CASES), ids=case_id)
def test_verify_rejects(case: TamperCase, dtype: str, clean: dict[str, Triple], tmp_path: Path) -> None:
    assert_rejected(case, clean[dtype], tmp_path)


def _verify_output(triple: Triple, *extra: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from abliterate.cli import main

    args = ["verify", str(triple.original), str(triple.edited), "--direction", str(triple.direction)]
    result = CliRunner().invoke(main, [*args, "--no-progress", "--device", "cpu", *extra])
    return result.exit_code, result.output


def test_the_pass_line_says_what_was_compared(clean: dict[str, Triple]) -> None:
    status, output = _verify_output(clean["bfloat16"], "--no-forward")
    assert status == 0, output
    line = next(line for line in output.splitlines() if line.startswith("certificate"))
    assert "PASS  LoRA adapter vs. its recomputation from ORIGINAL and the declared edit" in line
    # 9 writers (embedding, 4 o_proj, 4 down_proj), an A and a B each, all bitwise on this machine.
    assert "(rank 1, 9 targets): 18 tensors of 18 required, 18 bitwise" in line
    assert "adapter_config.json" in line and f"base model '{clean['bfloat16'].original}'" in line
    assert "skipped       parity: not asked for (--no-forward)" in output


@pytest.mark.parametrize(("ulps", "passes"), [(1, True), (3, False)])
def test_the_stated_bound_is_one_float32_ulp(
    clean: dict[str, Triple], tmp_path: Path, ulps: int, passes: bool
) -> None:
    """One element moved by one float32 ulp is within the bound (another machine's rounding); three
    ulps are not."""
    triple = copy_triple(clean["float32"], tmp_path / "copy")

    def nudge(tensors: dict[str, torch.Tensor]) -> None:
        flat = tensors[O_PROJ_A].view(-1)
        for _ in range(ulps):
            flat[2] = torch.nextafter(flat[2], torch.tensor(math.inf))

    _change_weights(triple.edited, nudge)
    status, output = _verify_output(triple, "--no-forward")
    if passes:
        assert status == 0, output
        assert "17 bitwise and 1 within 1 float32 ulp" in output
    else:
        assert status == 2
        assert "1 of 64 elements differ from the declared edit's recomputation" in output


def test_a_rank2_adapter_verifies_and_a_rank1_file_does_not_match_it(tmp_path: Path) -> None:
    """``apply --format lora`` with a rank-2 searched edit verifies; the same adapter against the rank-1
    direction file (its first direction) is rejected at r."""
    from conftest import save_tiny
    from tiny import make_model

    from abliterate.find.point import EditPoint
    from abliterate.ship.direction_file import (
        declared_from_file,
        load_direction,
        point_metadata,
        save_direction,
    )
    from abliterate.ship.lora import apply_lora

    source = save_tiny(tmp_path / "model", MODEL_TYPE)
    basis, _ = torch.linalg.qr(
        torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    )
    basis = basis.T.contiguous().float()
    point = EditPoint(
        layer=1.0, position=-1, attention=1.2, mlp=0.7, peak=1.0, width=3.0, second=-2, second_weight=0.4
    )
    n_layers = make_model(MODEL_TYPE).config.num_hidden_layers
    rank2 = save_direction(
        tmp_path / "r2.safetensors", basis, 1, -1, "x", extra=point_metadata(point, n_layers)
    )
    rank1 = save_direction(tmp_path / "r1.safetensors", basis[0], 1, -1, "x")
    apply_lora(str(source), declared_from_file(*load_direction(rank2)), tmp_path / "adapter")
    status, output = _verify_output(Triple(source, tmp_path / "adapter", rank2))
    assert status == 0, output
    assert "rank 2" in output and "parity        PASS" in output
    status, output = _verify_output(Triple(source, tmp_path / "adapter", rank1), "--no-forward")
    assert status == 2 and "adapter_config.json: r is 2, the declared edit's adapter has 1" in output


def test_run_format_lora_output_verifies_with_its_own_direction_file(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    """The adapter and direction file ``run --format lora`` writes pass ``verify`` (its extra files, the
    manifest, cards and direction file, are not weights peft loads)."""
    from tiny import quick_lora_config

    from abliterate import run

    output = tmp_path / "lora"
    run(quick_lora_config(tiny_qwen2, output))
    status, text = _verify_output(Triple(tiny_qwen2, output, output / "direction.safetensors"))
    assert status == 0, text
    assert "certificate   PASS  LoRA adapter" in text and "parity        PASS" in text
    assert "18 tensors of 18 required, 18 bitwise" in text  # run folds the vector its direction file holds


def test_a_direction_file_for_another_width_is_refused_in_one_line(
    clean: dict[str, Triple], tmp_path: Path
) -> None:
    triple = copy_triple(clean["float32"], tmp_path / "copy")
    rewrite_direction(triple.direction, torch.ones(32))
    status, output = _verify_output(triple, "--no-forward")
    assert status == 1
    assert output.strip().splitlines()[-1] == "error: direction has 32 dimensions, the model has 64"


def test_peft_parity_alone_rejects_a_scaled_b_in_float32(clean: dict[str, Triple], tmp_path: Path) -> None:
    """The forward part stands on its own in float32: with ``--no-certificate``, parity through peft fails
    the adapter whose B is scaled by 0.9, and passes the clean one."""
    assert _verify_output(clean["float32"], "--no-certificate")[0] == 0
    triple = copy_triple(clean["float32"], tmp_path / "copy")
    _scale_b(triple.original, triple.edited, triple.direction)
    status, output = _verify_output(triple, "--no-certificate")
    assert status == 2, output
    assert "error: parity gate failed: parity:" in output
    assert "skipped       certificate: not asked for (--no-certificate)" in output


def test_in_bfloat16_only_the_certificate_sees_a_scaled_b(clean: dict[str, Triple], tmp_path: Path) -> None:
    """One writer's B scaled by 0.9 stays within bf16 parity's measured rounding floor (16 prompts), so
    parity alone passes it; the adapter certificate rejects it. Why ``verify`` certifies adapters."""
    triple = copy_triple(clean["bfloat16"], tmp_path / "copy")
    _scale_b(triple.original, triple.edited, triple.direction)
    status, output = _verify_output(triple, "--no-certificate")
    assert status == 0 and "parity        PASS" in output, output
    status, output = _verify_output(triple)
    assert status == 2 and "down_proj.lora_B.weight: 64 of 64 elements differ" in output, output
