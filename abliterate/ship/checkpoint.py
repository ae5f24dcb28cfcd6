"""Save an edited model as a checkpoint: the weights from memory, the source's companion files beside them.

The output directory itself (the output rule, staging, the atomic move) is ``abliterate.io.output``'s job;
which companion files exist and which ``config.json`` keys an edit may change are ``abliterate.prove.files``'.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from abliterate.io.output import copy_source_file
from abliterate.model.gguf import drop_gguf_quantization
from abliterate.prove.files import copy_companions, edited_config


def save_model(model: nn.Module, tokenizer: object, directory: Path, source: Path | None = None) -> None:
    """``save_pretrained`` the model (safetensors) into ``directory``, with the source's files beside it.

    With a ``source`` checkpoint directory, ``config.json`` is the source's with only the keys the edit
    changes (``companion_files.edited_config``) and every tokenizer, chat-template and generation file is
    copied byte for byte (``save_pretrained`` would rewrite them: another serialization, the padding the
    run set, a generation config derived from the config). Without one (a GGUF file), the tokenizer and
    the generation config are saved from memory; a GGUF ``quantization_config`` never reaches ``config.json``.

    Args:
        model: the edited model.
        tokenizer: its tokenizer (saved only without a ``source``).
        directory: the (empty, staging) output directory.
        source: the source checkpoint directory, or ``None`` when the source has none.
    """
    drop_gguf_quantization(model)
    model.save_pretrained(directory, safe_serialization=True)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text("utf-8"))
    if source is not None:
        # What save_pretrained wrote beside the weights is replaced by the source's own files.
        (directory / "generation_config.json").unlink(missing_ok=True)
        source_config = json.loads((source / "config.json").read_text("utf-8"))
        config_path.write_text(json.dumps(edited_config(source_config, config), indent=2) + "\n", "utf-8")
        copy_companions(source, directory, copy_source_file)
        return
    tokenizer.save_pretrained(directory)
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    if not (directory / "generation_config.json").exists() and getattr(model, "generation_config", None):
        model.generation_config.save_pretrained(directory)
