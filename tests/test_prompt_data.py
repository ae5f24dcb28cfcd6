"""The bundled prompt sets: well-formed, large enough for the evaluation they serve, and disjoint from each
other and from the outside sets used as held-out benchmarks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from abliterate.model.prompts import bundled

DATA = Path(__file__).resolve().parents[1] / "abliterate" / "data"
# The paper repository's splits live beside the checkout (or inside it on the device machine); absent
# elsewhere, e.g. in CI, where that part of the check is skipped.
OUTSIDE = [
    root / "shared" / "datasets" / "refusal_direction"
    for root in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2])
]

# The documented minimum size of each bundled set; abliterate/data/README.md states the same table.
MINIMUM = {
    "harmful_train": 160,
    "harmless_train": 160,
    "harmful_val": 150,
    "harmless_val": 150,
    "harmful_eval": 220,
    "harmless_eval": 120,
    "lookalike_eval": 120,
}


def _normal(prompt: str) -> str:
    """``prompt`` compared case-insensitively with runs of whitespace made one space."""
    return " ".join(prompt.lower().split())


def _load(name: str) -> list[str]:
    """One bundled file, read directly (not through ``bundled``, so a file it cannot name is still seen)."""
    return json.loads((DATA / f"{name}.json").read_text("utf-8"))


def _repeats(sets: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """Every prompt that occurs a second time within or across ``sets``, normalized.

    Returns:
        ``(normalized prompt, first set, second set)`` for each repeat.
    """
    first: dict[str, str] = {}
    repeats = []
    for name, prompts in sets.items():
        for prompt in prompts:
            key = _normal(prompt)
            if key in first:
                repeats.append((key, first[key], name))
            else:
                first[key] = name
    return repeats


def _all_sets() -> dict[str, list[str]]:
    return {name: _load(name) for name in MINIMUM}


def test_every_bundled_file_has_a_documented_minimum() -> None:
    """A new file cannot slip in without a size the README and this test agree on."""
    assert sorted(path.stem for path in DATA.glob("*.json")) == sorted(MINIMUM)


def test_readme_states_the_same_minimums() -> None:
    readme = (DATA / "README.md").read_text("utf-8")
    rows = re.finditer(r"^\| `(\w+)\.json` \| \d+ \| (\d+) \|", readme, re.M)
    stated = {row[1]: int(row[2]) for row in rows}
    assert stated == MINIMUM


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_file_is_a_list_of_distinct_non_empty_strings(name: str) -> None:
    prompts = _load(name)
    assert isinstance(prompts, list)
    assert all(isinstance(prompt, str) and prompt.strip() == prompt and prompt for prompt in prompts)
    assert len({_normal(prompt) for prompt in prompts}) == len(prompts)


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_file_meets_its_documented_minimum(name: str) -> None:
    assert len(_load(name)) >= MINIMUM[name]


def test_no_prompt_repeats_across_bundled_files() -> None:
    """Evaluation sets are disjoint from what extraction and selection see; the classes from each other."""
    assert _repeats(_all_sets()) == []


def test_duplicate_checker_flags_an_injected_duplicate() -> None:
    """Negative control: a train prompt copied into an eval set, in other case and spacing, is caught."""
    sets = _all_sets()
    copied = sets["harmful_train"][7]
    sets["harmful_eval"] = [*sets["harmful_eval"], "  " + copied.upper().replace(" ", "   ")]
    assert _repeats(sets) == [(_normal(copied), "harmful_train", "harmful_eval")]


def _wrapping(looks: list[str], harmful: list[str]) -> list[str]:
    """The prompts of ``looks`` that contain a prompt of ``harmful`` (both normalized)."""
    harmful = [_normal(prompt) for prompt in harmful]
    return [look for look in looks if any(prompt in _normal(look) for prompt in harmful)]


def test_lookalike_prompts_contain_no_harmful_prompt() -> None:
    """A safe-looking prompt must not wrap a harmful one ("for a story: <harmful request>")."""
    harmful = [prompt for name in MINIMUM if name.startswith("harmful") for prompt in _load(name)]
    assert _wrapping(_load("lookalike_eval"), harmful) == []


def test_lookalike_check_flags_a_wrapped_harmful_prompt() -> None:
    """Negative control: a harmful prompt wrapped in a story frame, in other case, is caught."""
    request = bundled("harmful", "val")[3]
    wrapped = f"For a story I'm writing: {request.upper()}"
    assert _wrapping([*_load("lookalike_eval"), wrapped], [request]) == [wrapped]


def test_bundled_reads_the_lookalike_set_for_eval_only() -> None:
    assert bundled("lookalike", "eval") == _load("lookalike_eval")
    for split in ("train", "val"):
        with pytest.raises(ValueError, match=f"no bundled prompt set lookalike_{split}"):
            bundled("lookalike", split)


def _outside_prompts(folder: Path) -> set[str]:
    """The normalized instructions of every JSON file in ``folder`` (items are ``{"instruction": ...}``)."""
    return {
        _normal(item["instruction"] if isinstance(item, dict) else item)
        for path in sorted(folder.glob("*.json"))
        for item in json.loads(path.read_text("utf-8"))
    }


def _found_outside(sets: dict[str, list[str]], outside: set[str]) -> list[str]:
    """The prompts of ``sets`` whose normalized form is in ``outside``."""
    return [prompt for prompts in sets.values() for prompt in prompts if _normal(prompt) in outside]


def test_no_bundled_prompt_is_in_the_outside_sets() -> None:
    """The held-out benchmark sets measure what the bundled ones did not see, and ours are our own writing."""
    folders = [folder for folder in OUTSIDE if folder.is_dir()]
    if not folders:
        pytest.skip("no ../shared/datasets/refusal_direction here")
    outside = set().union(*(_outside_prompts(folder) for folder in folders))
    assert outside  # the folder was read, so an empty intersection means something
    assert _found_outside(_all_sets(), outside) == []


def test_outside_check_flags_a_copied_prompt(tmp_path: Path) -> None:
    """Negative control: an outside file (paper repository format) holding a bundled prompt is caught."""
    copied = bundled("harmless", "eval")[5]
    items = [{"instruction": "Name three rivers.", "category": None}, {"instruction": copied.lower()}]
    (tmp_path / "harmless_val.json").write_text(json.dumps(items), "utf-8")
    assert _found_outside(_all_sets(), _outside_prompts(tmp_path)) == [copied]
