"""The typed configuration of a run, in parts: how the model is loaded, which prompts, how the direction is
selected and searched, the evaluation, and where the result goes (the parts in ``config.parts``).

``RunConfig`` holds one part per concern and checks what spans parts; the CLI generates its options from
the parts' field metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

from abliterate.config.parts import (
    EVAL_MAX_NEW_TOKENS,
    EvaluationConfig,
    LoadConfig,
    PromptConfig,
    PublishingConfig,
    SearchConfig,
    SelectionConfig,
    _option,
)

__all__ = [
    "EVAL_MAX_NEW_TOKENS",
    "EvaluationConfig",
    "LoadConfig",
    "PromptConfig",
    "PublishingConfig",
    "RunConfig",
    "SearchConfig",
    "SelectionConfig",
    "parts_of",
]


@dataclass(frozen=True)
class RunConfig:
    """Everything ``abliterate run`` needs: the model, and one part per concern.

    ``from_options`` builds it from the flat options the CLI parses; ``to_options`` gives them back.
    """

    model: str = field(metadata={"help": "Hub id, local directory, a .gguf file, or 'demo'."})
    publishing: PublishingConfig = field(default_factory=PublishingConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    progress: bool = _option(True, "--progress/--no-progress", show_default=False, help="Show progress bars.")

    def __post_init__(self) -> None:
        if self.selection.norm_preserving and self.publishing.format == "lora":
            raise ValueError("a norm-preserving edit is full rank; use --format checkpoint")  # as lora.py
        if self.publishing.output is None and self.publishing.push_to_hub is None:
            raise ValueError("nothing to do: give --output DIR and/or --push-to-hub REPO_ID")

    @classmethod
    def from_options(cls, model: str, **options: Any) -> RunConfig:
        """The config of flat ``options``, each named as a field of a part (or of ``RunConfig`` itself).

        Raises:
            ValueError: an option out of range, or options that contradict each other.
            TypeError: a name that is no field.
        """
        parts = {}
        for name, part in parts_of(cls).items():
            names = {each.name for each in fields(part)} & options.keys()
            parts[name] = part(**{each: options.pop(each) for each in names})
        return cls(model=model, **parts, **options)

    def to_options(self) -> dict[str, Any]:
        """The flat options of this config (``from_options``'s input), e.g. for the run's manifest."""
        options: dict[str, Any] = {}
        for each in fields(self):
            value = getattr(self, each.name)
            if is_dataclass(value):
                options.update({inner.name: getattr(value, inner.name) for inner in fields(value)})
            else:
                options[each.name] = value
        return options

    @property
    def selection_max_kl(self) -> float:
        """The paper's candidate filter: ``--max-kl`` with ``--search none``, else its default 0.1."""
        max_kl = self.selection.max_kl
        if self.selection.search == "none" and max_kl is not None:
            return max_kl
        return 0.1 if max_kl is None else max(max_kl, 0.1)

    @property
    def search_max_kl(self) -> float | None:
        """The user's cap on the search's choice, or ``None`` (default): no cap."""
        return self.selection.max_kl


def parts_of(config: type) -> dict[str, type]:
    """The fields of the dataclass ``config`` that are configs themselves, by name, in field order."""
    hints = get_type_hints(config)
    return {each.name: hints[each.name] for each in fields(config) if is_dataclass(hints[each.name])}
