"""Pushing to the Hugging Face Hub: checked before heavy work, one line when it fails, token never printed.

Before a run loads anything, ``check_push_auth`` asks the Hub who the token belongs to and whether it may
write to the target namespace, and how the repository stands (absent, public, private). After the run,
``push_folder`` creates or updates the repository, removes weight files a previous push left behind, and
turns any HTTP failure into one line that says where the local checkpoint is and how to retry.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# Weight files of an earlier push that this upload does not replace are deleted in the same commit
# (a re-push with fewer shards must not leave stale ones for loaders to pick up).
STALE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.gguf"]
# Organisation roles that cannot create or write repositories.
_READ_ONLY_ROLES = {"read"}


class HubApi(Protocol):
    """The slice of ``huggingface_hub.HfApi`` that abliterate uses (tests pass a recording fake)."""

    def whoami(self, token: str | None = None) -> dict: ...

    def repo_info(self, repo_id: str, *, repo_type: str, token: str | None) -> object: ...

    def create_repo(
        self, repo_id: str, *, token: str | None, private: bool, exist_ok: bool, repo_type: str
    ) -> object: ...

    def update_repo_settings(
        self, repo_id: str, *, private: bool, token: str | None, repo_type: str
    ) -> None: ...

    def upload_folder(
        self,
        *,
        repo_id: str,
        folder_path: str,
        token: str | None,
        commit_message: str,
        repo_type: str,
        delete_patterns: list[str],
    ) -> object: ...


class PushError(ConnectionError):
    """The upload failed after the run; the local checkpoint is kept and the message says how to retry."""


@dataclass(frozen=True)
class PushTarget:
    """A repository a run may push to, checked before the run.

    Attributes:
        repo_id: ``owner/name``.
        token: the checked token (pass it on; never print it).
        exists: the repository exists already.
        private: its visibility now, when it exists.
    """

    repo_id: str
    token: str
    exists: bool = False
    private: bool | None = None


@dataclass(frozen=True)
class PushResult:
    """Where the upload went, and what the user should know about it (visibility changes)."""

    url: str
    notes: list[str] = field(default_factory=list)


def find_token() -> str | None:
    """The Hub token from ``HF_TOKEN`` or the stored ``hf auth login``, if any."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def check_push_auth(repo_id: str, api: HubApi | None = None) -> PushTarget:
    """Make sure a push to ``repo_id`` can work before anything heavy runs.

    Args:
        repo_id: target ``owner/name``.
        api: Hub API object (default ``huggingface_hub.HfApi()``).

    Returns:
        The checked target, with the repository's current state.

    Raises:
        PermissionError: no token, the Hub rejects it, or it cannot write to the namespace.
        ValueError: the repo id is malformed.
        PushError: the Hub cannot be reached.
    """
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--push-to-hub {repo_id!r}: expected 'owner/name'")
    token = find_token()
    if not token:
        raise PermissionError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run 'hf auth login'")
    api = api or _default_api()
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        identity = api.whoami(token=token)
    except HfHubHTTPError as error:
        raise PermissionError(
            "the Hugging Face token was rejected (check HF_TOKEN / hf auth login)"
        ) from error
    except _network_errors() as error:
        raise PushError(
            f"cannot reach the Hugging Face Hub to check --push-to-hub: {_first_line(error)}"
        ) from error
    why_not = write_refusal(identity, repo_id)
    if why_not:
        raise PermissionError(f"--push-to-hub {repo_id}: {why_not}")
    try:
        info = api.repo_info(repo_id, repo_type="model", token=token)
    except RepositoryNotFoundError:
        return PushTarget(repo_id, token)
    except _network_errors() as error:
        raise PushError(
            f"cannot reach the Hugging Face Hub to check {repo_id}: {_first_line(error)}"
        ) from error
    return PushTarget(repo_id, token, exists=True, private=getattr(info, "private", None))


def write_refusal(identity: dict, repo_id: str) -> str | None:
    """Why the token described by ``whoami`` cannot write to ``repo_id``'s namespace, or ``None``.

    Reads the account name, its organisations and roles, and the token's role (``read``, ``write``, or a
    fine-grained token's scoped permissions). What ``whoami`` does not say is not held against the token.
    """
    namespace = repo_id.split("/")[0]
    user = identity.get("name")
    orgs = {
        org.get("name"): org.get("roleInOrg") for org in identity.get("orgs") or [] if isinstance(org, dict)
    }
    if user is not None and namespace != user and namespace not in orgs:
        return f"the token belongs to {user!r}, who is neither {namespace!r} nor a member of it"
    if orgs.get(namespace) in _READ_ONLY_ROLES:
        return f"{user!r} has the read-only role in the organisation {namespace!r}"
    access = ((identity.get("auth") or {}).get("accessToken")) or {}
    role = access.get("role")
    if role == "read":
        return "the token is read-only: create a token with write access"
    if role == "fineGrained":
        scoped = (access.get("fineGrained") or {}).get("scoped") or []
        for scope in scoped:
            entity = scope.get("entity") or {}
            if entity.get("name") in (namespace, repo_id) and "repo.write" in (
                scope.get("permissions") or []
            ):
                return None
        return f"the fine-grained token has no 'repo.write' permission on {namespace!r}"
    return None


def push_folder(
    folder: Path, target: PushTarget, *, private: bool = False, api: HubApi | None = None
) -> PushResult:
    """Create ``target`` if needed and upload ``folder``, replacing the weights of any earlier push.

    An existing repository keeps its visibility unless ``private`` asks for private: then it is made
    private, and the note says so. A private repository pushed without ``private`` stays private.

    Raises:
        PushError: the Hub refused or could not be reached; the message says how to retry.
    """
    api = api or _default_api()
    repo_id, token = target.repo_id, target.token
    notes = []
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        if target.exists and private and target.private is False:
            api.update_repo_settings(repo_id, private=True, token=token, repo_type="model")
            notes.append(f"{repo_id} existed as a public repository and was made private (--private)")
        elif target.exists and not private and target.private:
            notes.append(f"{repo_id} exists and is private; it stays private")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            token=token,
            commit_message="Upload abliterated model (abliterate)",
            repo_type="model",
            delete_patterns=STALE_PATTERNS,
        )
    except _network_errors() as error:
        raise PushError(
            f"push to {repo_id} failed ({_first_line(error)}); the checkpoint is kept in {folder}; "
            f"retry with: hf upload {repo_id} {folder} --repo-type model"
        ) from error
    return PushResult(f"https://huggingface.co/{repo_id}", notes)


def staging_directory(repo_id: str, needed_bytes: int | None) -> Path:
    """Where a push without ``--output`` stages its checkpoint: the user cache (``ABLITERATE_CACHE`` or
    ``~/.cache/abliterate``), never the system temp directory, which is often a small RAM disk.

    Raises:
        OSError: the cache's disk has less free space than ``needed_bytes`` (plus a tenth).
    """
    from abliterate.io.locations import cache_dir

    directory = cache_dir().parent / "push" / repo_id.replace("/", "--")
    if needed_bytes:
        existing = directory.parent
        while not existing.exists():
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        if free < needed_bytes * 1.1:
            raise OSError(
                f"--push-to-hub without --output stages the checkpoint in {directory.parent}, which has "
                f"{free / 2**30:.1f} GiB free for about {needed_bytes / 2**30:.1f} GiB: give --output DIR "
                "on a disk with room (the checkpoint is then kept there)"
            )
    return directory


def _network_errors() -> tuple[type[BaseException], ...]:
    """HTTP and connection errors of the Hub client: ``OSError`` (requests, and ``HfHubHTTPError``) plus
    the ``HTTPError`` base of the HTTP library ``huggingface_hub`` builds on (httpx's connection errors
    are not ``OSError``)."""
    from huggingface_hub.errors import HfHubHTTPError

    bases = tuple(cls for cls in HfHubHTTPError.__mro__[1:] if cls.__name__ == "HTTPError")
    return (OSError, *bases)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _default_api() -> HubApi:
    from huggingface_hub import HfApi

    return HfApi()
