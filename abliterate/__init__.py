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
    "EvaluationConfig": "abliterate.config",
    "LoadConfig": "abliterate.config",
    "PromptConfig": "abliterate.config",
    "PublishingConfig": "abliterate.config",
    "RunConfig": "abliterate.config",
    "SearchConfig": "abliterate.config",
    "SelectionConfig": "abliterate.config",
    "load_direction": "abliterate.ship.direction_file",
    "save_direction": "abliterate.ship.direction_file",
    "fold_direction": "abliterate.edit.walker",
    "orthogonalize": "abliterate.edit.kernel",
    "extract_candidates": "abliterate.find.extract",
    "ablated": "abliterate.model.hooks",
    "projection": "abliterate.model.hooks",
    "ParityReport": "abliterate.prove.parity",
    "compare_logits": "abliterate.prove.parity",
    "Certificate": "abliterate.prove.certificate",
    "DeclaredEdit": "abliterate.edit.declared",
    "certify_checkpoint": "abliterate.prove.certificate",
    "CompanionReport": "abliterate.prove.files",
    "compare_companions": "abliterate.prove.files",
    "GateReport": "abliterate.prove.gate",
    "GateError": "abliterate.errors",
    "CompletenessReport": "abliterate.prove.residual",
    "check_completeness": "abliterate.prove.residual",
    "RunResult": "abliterate.pipeline.publishing",
    "run": "abliterate.pipeline.run",
    "RefusalDirection": "abliterate.find.select",
    "select_direction": "abliterate.find.select",
    "stream_apply": "abliterate.ship.streaming",
    "apply_gguf": "abliterate.ship.gguf_writer",
    "certify_gguf": "abliterate.prove.gguf_certificate",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'abliterate' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
