"""Whether a model shares its token embedding with its output head: ``tie_word_embeddings`` as a config
states it, else the family's default. The edit folds the embedding, so a tied head must be untied first."""

from __future__ import annotations

from typing import Any


def tie_word_embeddings(part: dict[str, Any], prefix: str = "", where: str = "config.json") -> bool | None:
    """The ``tie_word_embeddings`` of a config (or of its ``text_config``), ``None`` when it is not set.

    Args:
        part: the config, or its ``text_config``.
        prefix: how to name ``part`` in the error, e.g. ``"text_config."``.
        where: how to name the file in the error.

    Raises:
        ValueError: the value is neither true, false nor null.
    """
    value = part.get("tie_word_embeddings")
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"{where}: {prefix}tie_word_embeddings must be true or false, got {value!r}")


def ties_embeddings(config: dict[str, Any], model_type: str) -> bool:
    """Whether the model shares its embedding with the output head (config value, else the family default).

    Raises:
        ValueError: ``tie_word_embeddings`` is not true, false or null (e.g. the string ``"false"``).
    """
    tied = False
    for prefix, part in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(part, dict):
            continue
        value = tie_word_embeddings(part, prefix)
        if value is not None:
            tied = tied or value
            continue
        from transformers import CONFIG_MAPPING

        family = str(part.get("model_type", model_type))
        default = (
            getattr(CONFIG_MAPPING[family], "tie_word_embeddings", True) if family in CONFIG_MAPPING else True
        )
        tied = tied or bool(default)
    return tied
