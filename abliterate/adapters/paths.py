"""Find an adapter's dotted paths inside a loaded model (shared by resolution and discovery)."""

from __future__ import annotations

from torch import nn


def module_at(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule of ``root`` at dotted ``path``, or ``None`` when absent or not a module."""
    module: nn.Module | None = root
    for part in path.split("."):
        module = getattr(module, part, None) if module is not None else None
    return module if isinstance(module, nn.Module) else None


def locate(model: nn.Module, path: str) -> str | None:
    """Full dotted name of an adapter path inside ``model``, or ``None`` when absent.

    Plain causal LMs hold the path as written; multimodal wrappers keep the text model under an
    attribute called ``language_model``, where the path may also lack its leading ``model.``.
    """
    if module_at(model, path) is not None:
        return path
    for name, _ in model.named_modules():
        if name.split(".")[-1] != "language_model":
            continue
        for relative in (path, path.removeprefix("model.")):
            if module_at(model, f"{name}.{relative}") is not None:
                return f"{name}.{relative}"
    return None
