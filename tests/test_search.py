"""The searched edit family: each point's fold equals its hooks, batched trials equal single ones, the
certificate proves per-layer strengths, and the choice honours the KL bound."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import make_model, make_tokenizer, open_selection_config

from abliterate.adapters.resolve import resolve_adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.walker import fold_direction
from abliterate.find.point import EditPoint, declared_edit, point_direction
from abliterate.find.search import (
    SearchData,
    TrialScore,
    batched_logits,
    padded_bases,
    pareto_front,
    run_trials,
)
from abliterate.find.space import SearchSpace
from abliterate.model.batching import all_position_logits, encode, last_logits
from abliterate.model.hooks import ablated, edit_projection
from abliterate.prove.certificate import certify_checkpoint
from abliterate.ship.direction_file import load_direction, save_direction

PROFILE = EditPoint(layer=1.4, position=-1, embedding=0.3, attention=1.2, mlp=0.6, peak=1.0, width=2.0)
RANK2 = EditPoint(layer=1.0, position=-1, mlp=0.8, second=-2, second_weight=0.6)
PROMPTS = ["Tell me a joke.", "How do I hack into my neighbour's wifi?", "Write a poem about the sea."]


def _direction(model: torch.nn.Module, seed: int = 3) -> torch.Tensor:
    d_model = model.get_input_embeddings().weight.shape[1]
    vector = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm()


def _encoded(batch_size: int = 8) -> object:
    return encode(make_tokenizer(), PROMPTS, batch_size=batch_size, share_prefix=False)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3_moe"])
def test_fold_with_a_profile_equals_its_hooks(model_type: str) -> None:
    model = make_model(model_type)
    adapter = resolve_adapter(model)
    direction = _direction(model)
    prompts = _encoded()
    declared = declared_edit(direction, PROFILE, model.config.num_hidden_layers)
    with ablated(model, adapter, edit_projection(declared)):
        hooked = all_position_logits(model, prompts)
    folded = copy.deepcopy(model)
    fold_direction(folded, adapter, declared)
    edited = all_position_logits(folded, prompts)
    scale = hooked.abs().max()
    assert (hooked - edited).abs().max() <= 1e-4 * scale
    # Negative control: the paper's flat strength-1 fold is a different edit.
    flat = copy.deepcopy(model)
    fold_direction(flat, adapter, DeclaredEdit(direction))
    assert (hooked - all_position_logits(flat, prompts)).abs().max() > 1e-2 * scale


def test_profile_strengths() -> None:
    assert PROFILE.strength("embedding", -1) == 0.3
    assert PROFILE.strength("attention", 1) == pytest.approx(1.2)
    assert PROFILE.strength("mlp", 2) == pytest.approx(0.3)
    assert PROFILE.strength("experts", 3) == 0.0
    assert EditPoint.paper(2, -1) == EditPoint(2.0, -1) != PROFILE
    assert EditPoint.paper(2, -1).strength("mlp", 3) == 1.0


def test_batched_trials_equal_single_trials() -> None:
    model = make_model("llama")
    adapter = resolve_adapter(model)
    candidates = torch.randn(2, 4, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    means = torch.randn_like(candidates)
    points = [
        PROFILE,
        EditPoint.paper(2, -2, orthogonal=True),
        EditPoint(0.5, -1, attention=0.0, mlp=1.5),
        RANK2,
    ]
    space = SearchSpace(candidates, means, 4, EditPoint.paper(2, -1))
    prompts = encode(make_tokenizer(), PROMPTS, batch_size=8)
    edits = [space.declared(point) for point in points]
    assert padded_bases(edits).shape == (4, 2, candidates.shape[-1])
    batched = batched_logits(model, adapter, prompts, edits)
    for index, point in enumerate(points):
        direction = point_direction(point, candidates, means)
        with ablated(model, adapter, edit_projection(declared_edit(direction, point, 4))):
            single = last_logits(model, adapter, prompts)[0]
        torch.testing.assert_close(batched[index], single, atol=1e-4, rtol=1e-4)
    assert (batched[0] - batched[1]).abs().max() > 1e-3  # the rows really carry different edits
    rank1 = replace(RANK2, second=None, second_weight=0.0)
    with ablated(
        model, adapter, edit_projection(declared_edit(point_direction(rank1, candidates, means), rank1, 4))
    ):
        without_second = last_logits(model, adapter, prompts)[0]
    assert (batched[3] - without_second).abs().max() > 1e-3  # the second direction changes the logits


def test_point_direction_options() -> None:
    candidates = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    means = torch.randn_like(candidates)
    plain = point_direction(EditPoint.paper(1, -1), candidates, means)
    torch.testing.assert_close(plain, (candidates[1, 1] / candidates[1, 1].norm()).float())
    blended = point_direction(EditPoint(1.5, -1), candidates, means)
    assert 0.2 < float(blended @ plain) < 0.999
    orthogonal = point_direction(EditPoint(2.0, -2, orthogonal=True), candidates, means)
    assert abs(float(orthogonal.double() @ means[0, 2])) < 1e-5 * means[0, 2].norm()
    assert abs(float(point_direction(EditPoint(2.0, -2), candidates, means).double() @ means[0, 2])) > 1e-3


def test_certificate_proves_a_layer_profile(tmp_path: Path) -> None:
    model = make_model("llama")
    adapter = resolve_adapter(model)
    direction = _direction(model)
    model.save_pretrained(tmp_path / "original")
    declared = declared_edit(direction, PROFILE, model.config.num_hidden_layers)
    fold_direction(model, adapter, declared)
    model.save_pretrained(tmp_path / "edited")
    certificate = certify_checkpoint(tmp_path / "original", tmp_path / "edited", declared, progress=False)
    assert certificate.passed, certificate.failures
    for wrong in (
        DeclaredEdit(direction),
        DeclaredEdit(direction, layer_strengths={"attention": (1.0,) * 4}),
    ):
        assert not certify_checkpoint(
            tmp_path / "original", tmp_path / "edited", wrong, progress=False
        ).passed


def test_direction_file_keeps_the_point(tmp_path: Path) -> None:
    from abliterate.ship.direction_file import declared_from_file, point_metadata

    direction = torch.randn(16)
    path = save_direction(tmp_path / "d.safetensors", direction, 1, -1, "x", extra=point_metadata(PROFILE, 4))
    declared = declared_from_file(*load_direction(path))
    for group, layer in [("embedding", -1), ("attention", 0), ("attention", 1), ("mlp", 2), ("experts", 3)]:
        assert declared.scales(group, layer) == pytest.approx(PROFILE.strength(group, layer))
    old = save_direction(tmp_path / "old.safetensors", direction, 1, -1, "x")
    assert declared_from_file(*load_direction(old)).scales("mlp", 2) == 1.0


def _trial(
    refusal: float, kl: float, refusals: int | None = None, confirm_kl: float | None = None
) -> TrialScore:
    return TrialScore(EditPoint.paper(1, -1), refusal, kl, refusals, 8, confirm_kl)


def test_pareto_front() -> None:
    trials = [_trial(0.0, 0.05), _trial(-1.0, 0.2), _trial(0.5, 0.01), _trial(0.2, 0.1), _trial(-0.5, 0.02)]
    assert [trial.kl for trial in pareto_front(trials)] == [0.01, 0.02, 0.2]


def test_finalists_climb_a_ladder_of_kl_bounds() -> None:
    from abliterate.find.search import finalists

    paper = _trial(-3.0, 0.08)
    crowded = [_trial(-2.9 + 0.01 * i, 0.049) for i in range(4)]  # all just under the bound 0.05
    lower = [_trial(-2.0, 0.039), _trial(-1.5, 0.029), _trial(-1.0, 0.01)]
    picked = finalists([paper, *crowded, *lower], 0.05, 4)
    assert picked[0] is paper
    assert [trial.kl for trial in picked[1:]] == [0.049, 0.039, 0.029, 0.01]  # one per rung
    # Without trials at the lower rungs, the remaining slots go to the next best under the top rung.
    assert [trial.refusal_score for trial in finalists([paper, *crowded], 0.05, 3)[1:]] == [
        -2.9,
        -2.89,
        -2.88,
    ]
    assert finalists([paper, _trial(-5.0, 0.051)], 0.05, 3) == [paper]  # nothing over the bound
    # No cap: the paper point's own trial KL is the top rung (only a point below it can dominate it).
    assert [t.kl for t in finalists([paper, _trial(-5.0, 0.09), *lower], None, 2)[1:]] == [0.039, 0.029]


def test_search_evaluates_the_paper_point_first() -> None:
    model = make_model("llama")
    adapter = resolve_adapter(model)
    tokenizer = make_tokenizer()
    candidates = torch.randn(2, 4, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    space = SearchSpace(candidates, torch.randn_like(candidates), 4, EditPoint.paper(2, -1))
    harmless = encode(tokenizer, PROMPTS[::2], batch_size=8)
    ids = [tokenizer("I", add_special_tokens=False)["input_ids"][0]]
    data = SearchData(
        encode(tokenizer, PROMPTS[1:2], batch_size=8), harmless, last_logits(model, adapter, harmless)[0], ids
    )
    trials = run_trials(model, adapter, space, data, trials=6, budget_s=60, per_forward=4)
    assert len(trials) == 6 and trials[0].point == space.anchor
    assert trials[0].kl == pytest.approx(
        torch.nn.functional.kl_div(
            torch.log_softmax(_paper_logits(model, adapter, space, harmless), -1),
            torch.log_softmax(data.harmless_reference, -1),
            log_target=True,
            reduction="none",
        )
        .sum(-1)
        .mean()
        .item(),
        rel=1e-3,
        abs=1e-6,
    )
    assert len({trial.point for trial in trials}) == 6


def _paper_logits(
    model: torch.nn.Module, adapter: object, space: SearchSpace, encoded: object
) -> torch.Tensor:
    direction = point_direction(space.anchor, space.candidates, space.harmless_means)
    return last_logits(model, adapter, encoded, ablate=direction[None])[0]


@pytest.mark.parametrize("model_type", ["qwen2", "gpt2"])
def test_apply_and_verify_reproduce_a_searched_point(model_type: str, tmp_path: Path) -> None:
    """``apply`` streams a searched point bitwise like the in-memory fold; ``verify`` proves it; a file
    without the strengths (the paper's edit) gives other weights and fails verification."""
    from click.testing import CliRunner
    from conftest import assert_apply_equals_fold, save_tiny
    from transformers import AutoModelForCausalLM

    from abliterate.cli import main
    from abliterate.ship.direction_file import point_metadata

    source = save_tiny(tmp_path / "original", model_type)
    model = AutoModelForCausalLM.from_pretrained(source)
    adapter = resolve_adapter(model)
    direction = _direction(model)
    n_layers = model.config.num_hidden_layers if model_type != "gpt2" else model.config.n_layer
    fold_direction(model, adapter, declared_edit(direction, PROFILE, n_layers))
    model.save_pretrained(tmp_path / "folded")
    searched = save_direction(
        tmp_path / "searched.safetensors", direction, 1, -1, "x", extra=point_metadata(PROFILE, n_layers)
    )
    plain = save_direction(tmp_path / "plain.safetensors", direction, 1, -1, "x")
    assert_apply_equals_fold(source, searched, tmp_path / "folded", tmp_path / "applied")
    wrong = CliRunner().invoke(
        main, ["verify", str(source), str(tmp_path / "applied"), "--direction", str(plain), "--no-forward"]
    )
    assert wrong.exit_code == 2, wrong.output


def _search_config(source: Path, output: Path) -> object:
    return open_selection_config(
        source, output, trials=8, trial_prompts=2, finalists=2, confirm_prompts=3, damage_prompts=2
    )


def test_run_searches_saves_the_front_and_proves_the_point(
    tiny_qwen2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging

    from abliterate import run
    from abliterate.ship.direction_file import declared_from_file

    with caplog.at_level(logging.INFO, logger="abliterate.find.search"):
        result = run(_search_config(tiny_qwen2, tmp_path / "out"))  # 3 of the 4 val prompts confirm
    front = json.loads((tmp_path / "out" / "pareto_front.json").read_text())
    assert len(front["trials"]) == 8 and front["paper"]["point"]["width"] == 0.0
    assert front["confirmed"][0]["point"] == front["paper"]["point"]  # the paper's point is a finalist
    assert (tmp_path / "out" / "pareto_front.png").stat().st_size > 1000
    manifest = result.manifest
    assert manifest["search"]["trials"] == 8 and manifest["gate"]["passed"]
    assert manifest["gate"]["certificate"]["passed"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Edit search" in card
    outcome = manifest["search"]["outcome"]
    assert outcome.startswith(("paper point kept", "searched point dominates")) and outcome in card
    assert outcome == front["outcome"]
    said = [record.getMessage() for record in caplog.records if record.name == "abliterate.find.search"]
    assert said == [f"search: {outcome}"]  # one log line
    assert not any("fewer than --confirm-prompts" in record.getMessage() for record in caplog.records)
    paper = manifest["search"]["confirmed"][0]
    assert paper["confirm_kl"] > 0 and paper["multi_kl"] > 0  # both damage measures taken
    chosen = EditPoint(**front["chosen"]["point"])
    declared = declared_from_file(*load_direction(tmp_path / "out" / "direction.safetensors"))
    assert declared.layer_strengths["mlp"][2] == pytest.approx(chosen.strength("mlp", 2))


def test_run_stops_when_no_point_meets_the_kl_bound(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from abliterate import RunConfig, run

    monkeypatch.setattr(RunConfig, "search_max_kl", property(lambda self: 0.0))
    with pytest.raises(ValueError, match=r"no searched edit reaches first-token KL ≤ 0 \(lowest: .*--max-kl"):
        run(_search_config(tiny_qwen2, tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# The confirmation against the paper's point, with a fake confirmer: each finalist's damage and its
# not-helped verdicts per confirmation prompt are given, and every call is recorded.
N_CONFIRM = 128


def _finalist(name: str, kl: float = 0.05) -> TrialScore:
    return TrialScore(EditPoint.paper(1, -1, orthogonal=name != "paper", norm_preserving=False), -3.0, kl)


def _points(*names: str) -> list[TrialScore]:
    # Distinct points: the layer encodes the name's index.
    return [replace(_finalist(name), point=EditPoint(float(index), -1)) for index, name in enumerate(names)]


def _fake_confirmer(
    damage: dict[float, tuple[float, float]], not_helped: dict[float, list[int]], calls: list
) -> object:
    from abliterate.find.confirm import Confirmer

    def verdicts(point: EditPoint, start: int, stop: int) -> list[bool]:
        calls.append((point.layer, start, stop))
        return [bool(index in not_helped[point.layer]) for index in range(start, stop)]

    return Confirmer(lambda point: damage[point.layer], verdicts, N_CONFIRM)


def _decide(damage: dict, not_helped: dict, calls: list | None = None, **settings: object) -> object:
    from abliterate.find.confirm import ConfirmSettings, confirm_finalists

    calls = [] if calls is None else calls
    finalists = _points(*(str(layer) for layer in sorted(damage)))
    confirmer = _fake_confirmer(damage, not_helped, calls)
    return confirm_finalists(finalists, lambda point: point, confirmer, ConfirmSettings(**settings))


PAPER_NOT_HELPED = [5, 40, 90]  # 3 of 128


def test_paper_point_kept_when_every_searched_point_refuses_more() -> None:
    calls: list = []
    decision = _decide(
        {0: (0.08, 0.30), 1: (0.04, 0.20), 2: (0.03, 0.10)},
        {0: PAPER_NOT_HELPED, 1: [*PAPER_NOT_HELPED, 3, 7], 2: [1, 2, 3, 4, *PAPER_NOT_HELPED]},
        calls,
    )
    assert decision.chosen == 0 and decision.confirmed[0].point.layer == 0
    assert decision.outcome.startswith("paper point kept: no searched point dominated it")
    assert all(trial.dropped for trial in decision.confirmed[1:])
    # Sequential elimination: both were behind on the first 32 prompts, so nothing went on to all 128.
    assert {stop for _, _, stop in calls} == {32}
    assert decision.warning is None


def test_searched_point_no_worse_and_lower_on_both_kls_is_chosen() -> None:
    decision = _decide(
        {0: (0.08, 0.30), 1: (0.04, 0.20), 2: (0.03, 0.10)},
        # 1: the same prompts not helped as the paper's point; 2: one prompt more (worse, dropped).
        {0: PAPER_NOT_HELPED, 1: PAPER_NOT_HELPED, 2: [*PAPER_NOT_HELPED, 100]},
    )
    assert decision.chosen == 1
    chosen = decision.confirmed[1]
    assert chosen.n_confirm == N_CONFIRM and chosen.refusals == 3
    assert decision.outcome.startswith("searched point dominates the paper's point: not-helped Δ = +0.0 pts")
    assert "first-token KL 0.0400 vs 0.0800" in decision.outcome and "multi-token KL 0.2000 vs 0.3000" in (
        decision.outcome
    )
    assert decision.difference.high <= 0.02


def test_a_point_lower_on_one_kl_only_cannot_replace_the_paper_point() -> None:
    calls: list = []
    decision = _decide({0: (0.08, 0.30), 1: (0.04, 0.35)}, {0: PAPER_NOT_HELPED, 1: []}, calls)
    assert decision.chosen == 0 and "KL not below the paper point's" in decision.confirmed[1].dropped
    assert calls == []  # dropped on damage alone: no reply generated at all


def test_paired_rule_rejects_a_point_whose_upper_end_is_three_points() -> None:
    """Negative control: more not-helped replies late in the confirmation (after the first stage, so
    elimination does not catch them) give an upper end near +3 points, and the paper's point stays."""
    from abliterate.find.stats import paired_bootstrap

    worse = [*PAPER_NOT_HELPED, 60, 110]
    paper = [float(i in PAPER_NOT_HELPED) for i in range(N_CONFIRM)]
    searched = [float(i in worse) for i in range(N_CONFIRM)]
    upper = paired_bootstrap(searched, paper).high
    assert 0.025 < upper < 0.045
    decision = _decide({0: (0.08, 0.30), 1: (0.04, 0.20)}, {0: PAPER_NOT_HELPED, 1: worse})
    assert decision.chosen == 0 and decision.confirmed[1].n_confirm == N_CONFIRM
    assert decision.outcome.startswith("paper point kept: no searched point dominated it (best: not-helped Δ")
    # Positive control: the same point with the paper's verdicts passes.
    assert _decide({0: (0.08, 0.30), 1: (0.04, 0.20)}, {0: PAPER_NOT_HELPED, 1: PAPER_NOT_HELPED}).chosen == 1


def test_no_cap_keeps_the_paper_point_eligible() -> None:
    """The paper's point far over the old default cap (0.05) stays the choice without --max-kl; a user's
    cap of 0.05 excludes it and picks the searched point, saying it is not helped more often."""
    from abliterate import RunConfig

    assert RunConfig.from_options("demo", output="/tmp/x").search_max_kl is None
    damage = {0: (0.08, 0.30), 1: (0.04, 0.20)}
    verdicts = {0: PAPER_NOT_HELPED, 1: [*PAPER_NOT_HELPED, 1, 2]}
    assert _decide(damage, verdicts).chosen == 0
    capped = _decide(damage, verdicts, max_kl=0.05)
    assert capped.chosen == 1 and capped.confirmed[1].n_confirm == N_CONFIRM
    assert capped.outcome.startswith("--max-kl 0.05 excludes the paper's point (first-token KL 0.0800)")
    assert capped.warning == (
        "--max-kl 0.05 forces a point not helped on 5/128 confirmation prompts against the paper point's "
        f"3/128 (difference +1.6 pts [+0.0, +{100 * capped.difference.high:.1f}] on 128 prompts)"
    )
    # Negative control: a capped choice that is no worse than the paper's point gives no warning.
    assert _decide(damage, {0: PAPER_NOT_HELPED, 1: PAPER_NOT_HELPED}, max_kl=0.05).warning is None
    with pytest.raises(ValueError, match=r"reaches first-token KL ≤ 0\.01 \(lowest: 0\.0400"):
        _decide(damage, verdicts, max_kl=0.01)


def test_the_card_and_summary_carry_the_outcome_and_the_warning() -> None:
    from abliterate.ship.report import search_lines

    capped = _decide({0: (0.08, 0.30), 1: (0.04, 0.20)}, {0: [], 1: [1]}, max_kl=0.05)
    search = {
        "trials": 2,
        "front_size": 2,
        "outcome": capped.outcome,
        "warning": capped.warning,
        "chosen": capped.confirmed[1].to_dict(),
        "confirmed": [trial.to_dict() for trial in capped.confirmed],
    }
    card = "\n".join(search_lines(search))
    assert f"**Warning:** {capped.warning}" in card and f"**Outcome:** {capped.outcome}" in card
    assert "| 0/128 | 0.08 | 0.3 |" in card and "| 1/128 | 0.04 | 0.2 |" in card
