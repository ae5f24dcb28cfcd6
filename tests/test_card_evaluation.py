"""The card's evaluation lines: over-refusal per set and both KLs from the manifest, and nothing invented
for an older manifest that lacks them."""

from __future__ import annotations

from abliterate.ship.report import _damage_lines, summary_table


def _summary(n: int, not_helped: float, degenerate: float) -> dict[str, float]:
    return {"n": n, "not_helped_rate": not_helped, "degenerate_rate": degenerate}


def test_the_card_reports_over_refusal_and_both_kls() -> None:
    evaluation = {
        "kl_harmless": 0.0911,
        "multi_token_kl": {"mean": 0.0233, "n_prompts": 16, "n_tokens": 1021, "top_tokens_kept": 256},
        "over_refusal": {
            "harmless": {"before": _summary(16, 0.0625, 0.125), "after": _summary(16, 0.0, 0.1875)},
            "lookalike": {"before": _summary(16, 0.3125, 0.0), "after": _summary(16, 0.0625, 0.0)},
        },
    }
    text = "\n".join(_damage_lines(evaluation))
    assert (
        "Over-refusal on 16 harmless prompts (not helped): 6.2% -> 0.0%; degenerate replies 12.5% -> 18.8%"
        in text
    )
    assert "Over-refusal on 16 lookalike prompts (not helped): 31.2% -> 6.2%" in text
    assert "First-token KL on harmless prompts: 0.0911." in text
    assert "KL over the original's own replies (1021 tokens of 16 harmless prompts): 0.0233." in text


def test_an_older_manifest_gets_only_what_it_has() -> None:
    lines = [line for line in _damage_lines({"kl_harmless": 0.05}) if line]
    assert lines == ["First-token KL on harmless prompts: 0.05."]


def test_the_run_summary_leads_with_not_helped_and_says_it_is_a_lower_bound() -> None:
    rates = {"refusal_rate": 0.5, "judged_refusal_rate": 0.75, "n": 32}
    manifest = {
        "direction": {"layer": 3, "position": -1},
        "evaluation": {
            "before": rates,
            "after": {"refusal_rate": 0.0, "judged_refusal_rate": 0.03125, "n": 32},
            "kl_harmless": 0.09,
            "multi_token_kl": {"mean": 0.02, "n_prompts": 16, "n_tokens": 900},
        },
        "timings": {"load_s": 1.0},
        "gate": {"passed": True},
    }
    lines = summary_table(manifest).splitlines()
    assert lines[1].startswith("not helped (judge)") and "75.0% -> 3.1% (n=32" in lines[1]
    assert "a lower bound" in lines[1]
    assert any(line.startswith("KL harmless (replies)") and line.endswith("0.02") for line in lines)
