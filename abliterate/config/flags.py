"""click options generated from the config's field metadata, so each flag, default and help text is
written once, on its field."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import Field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

import click

from abliterate.config import parts_of


def click_options(config: type, *names: str, **overrides: Any) -> Callable[[Callable], Callable]:
    """click options generated from the fields of the dataclass ``config``: those ``names``, or every field
    with flags (a part's fields where the part is), each with its field's type, default and metadata;
    ``overrides`` replace a generated setting where a command differs (another help text, no choices)."""
    by_name = dict(flagged(config))
    chosen = [by_name[name] for name in names] if names else list(by_name.values())
    options = [click_option(each, hint, **overrides) for each, hint in chosen]

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def flagged(config: type) -> Iterator[tuple[str, tuple[Field, Any]]]:
    """``(name, (field, type))`` of every field of ``config`` with flags, the parts' fields in their place."""
    hints, parts = get_type_hints(config), parts_of(config)
    for each in fields(config):
        if each.name in parts:
            yield from flagged(parts[each.name])
        elif "flags" in each.metadata:
            yield each.name, (each, hints[each.name])


def click_option(each: Field, hint: Any, **overrides: Any) -> Callable:
    """The click option of one field: its flags, help, default (shown unless None or off) and type."""
    metadata, default = each.metadata, each.default
    settings: dict[str, Any] = {
        "help": metadata["help"],
        "show_default": metadata.get("show_default", default is not None and default is not False),
    }
    if default is not None:
        settings["default"] = default
    if hint is bool:
        settings["is_flag"] = True
    else:
        settings["metavar"] = metadata.get("metavar")
        literal = get_origin(hint) is Literal
        settings["type"] = click.Choice(get_args(hint)) if literal else _scalar(hint)
    return click.option(*metadata["flags"], each.name, **{**settings, **overrides})


def _scalar(hint: Any) -> type:
    """``int``, ``float`` or ``str`` for a field's type (``None`` left out); text for a mixed type."""
    kinds = [kind for kind in get_args(hint) or (hint,) if kind is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, str) else str
