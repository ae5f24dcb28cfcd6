"""The one place where adapters are registered, keyed by ``config.model_type``."""

from __future__ import annotations

from abliterate.adapters.spec import Adapter

_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Register an adapter under each of its model types.

    Args:
        adapter: the architecture description.

    Returns:
        The same adapter, so module-level definitions can be registered inline.
    """
    for model_type in adapter.model_types:
        if model_type in _REGISTRY:
            raise ValueError(f"model type {model_type!r} is registered twice")
        _REGISTRY[model_type] = adapter
    return adapter


def get_adapter(model_type: str) -> Adapter | None:
    """Return the registered adapter for ``model_type``, or ``None``."""
    return _REGISTRY.get(model_type)


def registered_model_types() -> list[str]:
    """All registered model types, sorted."""
    return sorted(_REGISTRY)


def registered_adapters() -> list[Adapter]:
    """Each registered adapter once, in registration order."""
    seen: list[Adapter] = []
    for adapter in _REGISTRY.values():
        if all(adapter is not other for other in seen):
            seen.append(adapter)
    return seen
