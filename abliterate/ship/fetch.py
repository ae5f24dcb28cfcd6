"""Fetching a published edit from the Hub for ``abliterate verify user/name``.

The edited repository's ``abliterate.json`` is downloaded alone first: a repository that holds none is
refused in one line after one small request, not after gigabytes of weights. The rest of the repository
(its weights as safetensors or GGUF, the companion files verify compares byte for byte, the direction file
and the card) is then downloaded at the same commit, so the manifest and the weights cannot come from two
different pushes. Downloads go to the Hugging Face cache on disk, file by file; the proof then streams
them tensor by tensor as for a local directory.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from abliterate.io.locations import COMPANION_PATTERNS, HUB_ID
from abliterate.io.output import DIRECTION_NAME, MANIFEST_NAME

logger = logging.getLogger(__name__)

# What verify reads of a published edit: weights (safetensors or GGUF, never pickles), the files
# transformers reads beside them, the manifest, the direction file and the card.
EDITED_PATTERNS = ["*.safetensors", "*.gguf", *COMPANION_PATTERNS, MANIFEST_NAME, DIRECTION_NAME, "README.md"]
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class FetchedEdit:
    """A published edit downloaded into the local cache.

    Attributes:
        repo_id: the Hub id it was fetched from.
        commit: the commit its files were downloaded at (the resolved ``--revision``), when known.
        directory: the local snapshot directory, verified as a local output is.
    """

    repo_id: str
    commit: str | None
    directory: Path


def is_hub_edit(edited: str) -> bool:
    """``edited`` names a Hub repository (``owner/name``) and no local path of that name exists."""
    return bool(HUB_ID.match(edited)) and not Path(edited).expanduser().exists()


def fetch_edit(repo_id: str, revision: str | None = None) -> FetchedEdit:
    """Download a published edit's manifest, then its weights, companions, direction file and card.

    Args:
        repo_id: ``owner/name`` on the Hub.
        revision: a branch, tag or commit (default: the main branch).

    Returns:
        Where the files are, and the commit they were downloaded at.

    Raises:
        ValueError: the repository, the revision or its ``abliterate.json`` does not exist, or a download
            failed (one line; the Hub's message, never the token).
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision}" if revision else ""
    try:
        manifest = Path(hf_hub_download(repo_id, MANIFEST_NAME, revision=revision))
    except RepositoryNotFoundError as error:  # also a gated or private repository without access
        raise ValueError(
            f"{repo_id} is not on the Hub or not readable with your token ({_first_line(error)})"
        ) from error
    except RevisionNotFoundError as error:
        raise ValueError(f"{repo_id} has no revision {revision} on the Hub") from error
    except EntryNotFoundError as error:
        raise ValueError(
            f"{repo_id}{at} has no {MANIFEST_NAME}: it was not published by abliterate; give the base model "
            "and the direction (abliterate verify ORIGINAL EDITED --direction FILE)"
        ) from error
    except (HfHubHTTPError, OSError) as error:
        raise ValueError(f"could not download {repo_id}'s {MANIFEST_NAME}: {_first_line(error)}") from error
    # The manifest's snapshot directory is named by the commit it resolved to: pin the rest to it.
    commit = manifest.parent.name if _COMMIT.fullmatch(manifest.parent.name) else revision
    logger.info("downloading %s at %s (weights, companions, direction, card)", repo_id, commit or "main")
    try:
        directory = snapshot_download(repo_id, revision=commit, allow_patterns=EDITED_PATTERNS)
    except (HfHubHTTPError, OSError) as error:
        raise ValueError(f"could not download {repo_id}{at}: {_first_line(error)}") from error
    return FetchedEdit(repo_id, commit if commit and _COMMIT.fullmatch(commit) else None, Path(directory))


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (the Hub's messages run to several)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
