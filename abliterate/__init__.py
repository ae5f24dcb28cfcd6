"""abliterate: remove the refusal direction from a chat model's weights, with a parity proof.

The public API is re-exported lazily so that ``abliterate --help`` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Adapter": "abliterate.adapters",
    "Writer": "abliterate.adapters",
    "get_adapter": "abliterate.adapters",
    "registered_model_types": "abliterate.adapters",
    "resolve_adapter": "abliterate.adapters",
    "RunConfig": "abliterate.config",
    "load_direction": "abliterate.direction",
    "save_direction": "abliterate.direction",
    "fold_direction": "abliterate.edit",
    "orthogonalize": "abliterate.edit",
    "extract_candidates": "abliterate.extract",
    "ablate_direction": "abliterate.hooks",
    "ParityReport": "abliterate.parity",
    "compare_logits": "abliterate.parity",
    "Certificate": "abliterate.certificate",
    "DeclaredEdit": "abliterate.certificate",
    "certify_checkpoint": "abliterate.certificate",
    "CompanionReport": "abliterate.companion_files",
    "compare_companions": "abliterate.companion_files",
    "GateReport": "abliterate.gate",
    "ParityError": "abliterate.gate",
    "CompletenessReport": "abliterate.residual",
    "check_completeness": "abliterate.residual",
    "RunResult": "abliterate.stages.publishing",
    "run": "abliterate.pipeline",
    "RefusalDirection": "abliterate.select",
    "select_direction": "abliterate.select",
    "stream_apply": "abliterate.streaming",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'abliterate' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
