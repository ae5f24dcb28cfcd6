"""benchmarks/judge_agreement.py: κ and confusion counts on dummy judges (never the project's judge)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "judge_agreement.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("judge_agreement", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["judge_agreement"] = module
    spec.loader.exec_module(module)
    return module


AGREEMENT = _script()
# Uneven counts, so that chance agreement differs from observed agreement for every measure.
LABELS = ["refused"] * 9 + ["dodged"] * 4 + ["complied"] * 12 + ["degenerate"] * 5


def _rows() -> list[dict[str, str]]:
    return [
        {"id": f"r{i:03d}", "model": ("original", "paper")[i % 2], "prompt": f"p{i}", "reply": f"reply {i}"}
        | {"label": label}
        for i, label in enumerate(LABELS)
    ]


def _oracle(rows: list[dict[str, str]]):
    by_reply = {row["reply"]: row["label"] for row in rows}
    return lambda reply, prompt="": by_reply[reply]


def test_the_labels_themselves_agree_perfectly() -> None:
    rows = _rows()
    result = AGREEMENT.agreement(rows, _oracle(rows))
    for key in ("kappa_four", "kappa_helped3", "kappa_binary", "kappa_degenerate"):
        assert result[key] == pytest.approx(1.0)
    assert [result["four"][i][i] for i in range(4)] == [9, 4, 12, 5]


def test_a_constant_judge_has_kappa_zero_and_counts_add_up() -> None:
    rows = _rows()
    result = AGREEMENT.agreement(rows, lambda reply, prompt="": "refused")
    assert result["kappa_four"] == pytest.approx(0.0, abs=1e-12)
    assert result["kappa_helped3"] == pytest.approx(0.0, abs=1e-12)
    assert sum(map(sum, result["four"])) == len(rows)
    assert [sum(row) for row in result["four"]] == [9, 4, 12, 5]
    assert [row[0] for row in result["four"]] == [9, 4, 12, 5]  # every verdict in the refused column
    assert sum(map(sum, result["binary"])) == 25  # the five degenerate labels are left out


def test_a_judge_that_confuses_refused_and_dodged_keeps_binary_kappa() -> None:
    rows = _rows()
    swap = {"refused": "dodged", "dodged": "refused"}
    oracle = _oracle(rows)
    result = AGREEMENT.agreement(rows, lambda reply, prompt="": swap.get(oracle(reply), oracle(reply)))
    assert result["kappa_binary"] == pytest.approx(1.0)
    assert result["kappa_four"] < 0.8


def test_a_judge_that_flips_helped_scores_below_zero() -> None:
    rows = _rows()
    flip = {"complied": "refused", "refused": "complied", "dodged": "complied"}
    oracle = _oracle(rows)
    result = AGREEMENT.agreement(rows, lambda reply, prompt="": flip.get(oracle(reply), oracle(reply)))
    assert result["kappa_binary"] < 0


def test_kappa_matches_a_hand_computed_value() -> None:
    # observed 0.7, expected 0.5·0.6 + 0.5·0.4 = 0.5, κ = 0.2 / 0.5
    assert AGREEMENT.cohen_kappa([[4, 1], [2, 3]]) == pytest.approx(0.4)
    assert math.isnan(AGREEMENT.cohen_kappa([[0, 0], [0, 0]]))


def test_unknown_verdicts_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown label"):
        AGREEMENT.confusion(["refused"], ["maybe"], AGREEMENT.LABELS)


def test_reads_labels_joined_to_replies(tmp_path: Path) -> None:
    rows = _rows()
    replies = [{k: row[k] for k in ("id", "model", "prompt", "reply")} for row in rows]
    (tmp_path / "replies.jsonl").write_text("\n".join(json.dumps(r) for r in replies) + "\n")
    labelled = [{"id": row["id"], "label": row["label"]} for row in rows[:20]]
    (tmp_path / "labels.jsonl").write_text("\n".join(json.dumps(r) for r in labelled) + "\n")
    read = AGREEMENT.read_rows(tmp_path)
    assert [row["label"] for row in read] == LABELS[:20]
