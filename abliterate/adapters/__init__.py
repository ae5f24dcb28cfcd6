"""Architecture adapters: which modules write into the residual stream, as data, registered once."""

from abliterate.adapters import families as _families  # noqa: F401  (registers the adapters
from abliterate.adapters.registry import get_adapter, registered_adapters, registered_model_types
from abliterate.adapters.resolve import ResolvedWriter, residual_writers, resolve_adapter, resolve_writers
from abliterate.adapters.spec import Adapter, Layout, Writer

__all__ = [
    "Adapter",
    "Layout",
    "ResolvedWriter",
    "Writer",
    "get_adapter",
    "registered_adapters",
    "registered_model_types",
    "residual_writers",
    "resolve_adapter",
    "resolve_writers",
]
