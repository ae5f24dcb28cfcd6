"""Where things are on disk, found without loading anything: abliterate's cache, a model source's files.

The output rule (``abliterate.io.output``) protects a source by its place on disk, so that place is
known here, below the model loaders that read what is there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# A Hub model id: ``owner/name``.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Return the directory where the demo model is assembled and converted."""
    root = os.environ.get("ABLITERATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "abliterate"
    )
    return Path(root) / "demo"


def source_location(source: str | Path) -> Path | None:
    """Where ``source``'s files are on disk, symbolic links resolved, without loading or downloading it.

    A local directory or ``.gguf`` file is itself; ``demo`` is the demo's whole cache directory (parts,
    GGUF and converted checkpoint); a Hub id is its folder in the Hub cache (snapshots and blobs), which
    may not exist yet. ``None`` when ``source`` is none of these (loading it reports the error).
    """
    if str(source) == "demo":
        return cache_dir().resolve()
    path = Path(source).expanduser()
    if path.exists() or path.suffix == ".gguf":
        return path.resolve()
    if not HUB_ID.match(str(source)):
        return None
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.file_download import repo_folder_name

    return (
        Path(HF_HUB_CACHE).expanduser() / repo_folder_name(repo_id=str(source), repo_type="model")
    ).resolve()


# Files beside the weights that transformers reads when it loads a checkpoint: tokenizer (tokenizer.json,
# tokenizer_config.json, special_tokens_map.json, added_tokens.json, vocab.json, merges.txt,
# tokenizer.model, *.tiktoken), chat template (chat_template.jinja, chat_template.json),
# generation_config.json, preprocessor/processor configs and remote code (*.py). Matched on the file
# name, in every subfolder but hidden ones; the same patterns decide what a Hub source's download holds.
COMPANION_PATTERNS: tuple[str, ...] = (
    "*.json",
    "*.jinja",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "*.py",
    "tokenizer*",
)
