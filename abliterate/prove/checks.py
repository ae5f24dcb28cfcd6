"""The certificate's checks before any tensor is read: the declared edit is an edit of this model, both
checkpoints hold the same tensors (plus an untied head), and the edited config loads the same
architecture without tying its head to an edited embedding."""

from __future__ import annotations

from pathlib import Path

from abliterate.adapters.tying import ties_embeddings
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.kernel import changes
from abliterate.io.safetensors import read_json
from abliterate.prove.structure import Structure, canonical
from abliterate.prove.tally import Tally


def check_declared(
    declared: DeclaredEdit, structure: Structure, source: dict, names_by_canonical: dict, tally: Tally
) -> bool:
    """The declared edit is an edit of this model (``DeclaredEdit.validate``, the direction's width is
    the model's ``d_model``); on failure it is the one failure reported, and no tensor is read."""
    try:
        declared.validate((edit.group, edit.layer) for edit in structure.edits.values())
    except ValueError as error:
        tally.fail(str(error))
        return False
    embedding = names_by_canonical.get(structure.embedding)
    if embedding is not None:
        width, shape = declared.direction.shape[-1], list(source[embedding][1].shape)
        if width != shape[-1]:
            tally.fail(
                f"the direction has {width} entries but the model's embedding is {shape} "
                f"(d_model={shape[-1]}): the direction belongs to another model"
            )
            return False
    return True


def check_names(structure: Structure, source: dict, target: dict, tally: Tally) -> None:
    """Same tensors in both (plus an untied head); every structurally required tensor present."""
    source_keys = {canonical(name) for name in source}
    target_keys = {canonical(name) for name in target}
    allowed_extra = {structure.head} if structure.tied else set()
    for key in sorted(target_keys - source_keys - allowed_extra):
        tally.fail(f"{key}: in the edited checkpoint but not in the original")
    for key in sorted(source_keys - target_keys):
        tally.fail(f"{key}: in the original but missing from the edited checkpoint")
    for memory_name, saved_names in structure.alternatives:
        if memory_name in source_keys or (saved_names and all(n in source_keys for n in saved_names)):
            continue
        tally.fail(
            f"{memory_name}: the model's structure says it must be edited, but the checkpoint lacks it"
        )


def check_config(
    original: Path, edited: Path, structure: Structure, declared: DeclaredEdit, tally: Tally
) -> None:
    """The edited config must load the same architecture, with its head not tied to an edited embedding."""
    before = read_json(original / "config.json", "config.json")
    after = read_json(edited / "config.json", "config.json")
    if before.get("model_type") != after.get("model_type"):
        tally.fail(
            f"config.json: model_type {after.get('model_type')!r} differs from {before.get('model_type')!r}"
        )
    if changes(declared.scales("embedding", -1)) and ties_embeddings(after, str(after.get("model_type"))):
        tally.fail(
            "config.json ties the output head to the edited embedding (tie_word_embeddings must be false)"
        )
