"""Pushing to the Hugging Face Hub: the token is checked before any heavy work and never printed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol


class HubApi(Protocol):
    """The slice of ``huggingface_hub.HfApi`` that abliterate uses (tests pass a recording fake)."""

    def whoami(self, token: str | None = None) -> dict: ...

    def create_repo(
        self, repo_id: str, *, token: str | None, private: bool, exist_ok: bool, repo_type: str
    ) -> object: ...

    def upload_folder(
        self, *, repo_id: str, folder_path: str, token: str | None, commit_message: str, repo_type: str
    ) -> object: ...


def find_token() -> str | None:
    """The Hub token from ``HF_TOKEN`` or the stored ``hf auth login``, if any."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def check_push_auth(repo_id: str, api: HubApi | None = None) -> str:
    """Make sure a push to ``repo_id`` can work before anything heavy runs.

    Args:
        repo_id: target ``owner/name``.
        api: Hub API object (default ``huggingface_hub.HfApi()``).

    Returns:
        The token (to pass on; never print it).

    Raises:
        PermissionError: no token, or the Hub rejects it.
        ValueError: the repo id is malformed.
    """
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--push-to-hub {repo_id!r}: expected 'owner/name'")
    token = find_token()
    if not token:
        raise PermissionError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run 'hf auth login'")
    api = api or _default_api()
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.whoami(token=token)
    except HfHubHTTPError as error:
        raise PermissionError(
            "the Hugging Face token was rejected (check HF_TOKEN / hf auth login)"
        ) from error
    return token


def push_folder(
    folder: Path, repo_id: str, token: str, *, private: bool = False, api: HubApi | None = None
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (model card included).

    Returns:
        The repository URL.
    """
    api = api or _default_api()
    api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        token=token,
        commit_message="Upload abliterated model (abliterate)",
        repo_type="model",
    )
    return f"https://huggingface.co/{repo_id}"


def _default_api() -> HubApi:
    from huggingface_hub import HfApi

    return HfApi()
