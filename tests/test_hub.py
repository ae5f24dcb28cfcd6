"""Push that fails early and cleanly, against a recording fake of ``HfApi``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from click.testing import CliRunner
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from tiny import quick_run_args

from abliterate.cli import main
from abliterate.ship.hub import write_refusal

FAST = quick_run_args(4, 2, evaluate=False)
MANUAL = ["--layer", "1", "--position", "-1"]
SECRET = "hf_secret_token_value_456"


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/repos"))


class FakeHub:
    """Records every call; ``repo`` is the repository's state (``None``: absent); ``fail`` names a call
    that raises an HTTP 500."""

    def __init__(self, identity: dict, repo: dict | None = None, fail: str | None = None) -> None:
        self.identity, self.repo, self.fail = identity, repo, fail
        self.calls: list[tuple[str, dict]] = []

    def _record(self, name: str, **kwargs: object) -> None:
        self.calls.append((name, kwargs))
        if name == self.fail:
            raise HfHubHTTPError(
                "500 Server Error: Internal Server Error for url: https://hf.co", response=_response(500)
            )

    def whoami(self, token: str | None = None) -> dict:
        self._record("whoami")
        return self.identity

    def repo_info(self, repo_id: str, **kwargs: object) -> object:
        self._record("repo_info", repo_id=repo_id)
        if self.repo is None:
            raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=_response(404))
        return SimpleNamespace(**self.repo)

    def create_repo(self, repo_id: str, **kwargs: object) -> None:
        self._record("create_repo", repo_id=repo_id, **kwargs)

    def update_repo_settings(self, repo_id: str, **kwargs: object) -> None:
        self._record("update_repo_settings", repo_id=repo_id, **kwargs)

    def upload_folder(self, **kwargs: object) -> None:
        files = sorted(path.name for path in Path(str(kwargs["folder_path"])).iterdir())
        self._record("upload_folder", **kwargs, files=files)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    fake = FakeHub({"name": "me", "orgs": [{"name": "team", "roleInOrg": "write"}]})
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("abliterate.ship.hub._default_api", lambda: fake)
    return fake


def _token(role: str, scoped: list | None = None) -> dict:
    access = {"role": role, "fineGrained": {"scoped": scoped or []}}
    return {"auth": {"accessToken": access}}


@pytest.mark.parametrize(
    ("identity", "repo_id", "refused"),
    [
        ({"name": "me"}, "me/model", None),
        ({"name": "me", "orgs": [{"name": "team", "roleInOrg": "write"}]}, "team/model", None),
        ({"name": "me"}, "someone-else/model", "neither"),
        ({"name": "me", "orgs": [{"name": "team", "roleInOrg": "read"}]}, "team/model", "read-only role"),
        ({"name": "me", **_token("read")}, "me/model", "read-only"),
        ({"name": "me", **_token("write")}, "me/model", None),
        ({"name": "me", **_token("fineGrained")}, "me/model", "repo.write"),
        (
            {
                "name": "me",
                **_token("fineGrained", [{"entity": {"name": "me"}, "permissions": ["repo.content.read"]}]),
            },
            "me/model",
            "repo.write",
        ),
        (
            {
                "name": "me",
                **_token("fineGrained", [{"entity": {"name": "me"}, "permissions": ["repo.write"]}]),
            },
            "me/model",
            None,
        ),
    ],
)
def test_write_refusal_reads_whoami(identity: dict, repo_id: str, refused: str | None) -> None:
    reason = write_refusal(identity, repo_id)
    assert (reason is None) if refused is None else (refused in reason), reason


def test_a_token_that_cannot_write_fails_before_loading(
    hub: FakeHub, tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.identity = {"name": "me", **_token("read")}

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the push was checked")

    monkeypatch.setattr("abliterate.model.loading.load_model", must_not_load)
    result = CliRunner().invoke(main, ["run", str(tiny_qwen2), "--push-to-hub", "me/x", *MANUAL, *FAST])
    assert result.exit_code == 1 and result.output.startswith(
        "error: --push-to-hub me/x: the token is read-only"
    )
    assert SECRET not in result.output and hub.names() == ["whoami"]


def test_a_failed_upload_keeps_the_output_and_says_how_to_retry(
    hub: FakeHub, tiny_qwen2: Path, tmp_path: Path
) -> None:
    hub.fail = "upload_folder"
    output = tmp_path / "out"
    args = ["run", str(tiny_qwen2), "-o", str(output), "--push-to-hub", "me/x", *MANUAL, *FAST]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: push to me/x failed (500 Server Error")
    assert f"kept in {output}" in lines[-1] and f"hf upload me/x {output}" in lines[-1]
    assert (output / "model.safetensors").is_file() and (output / "abliterate.json").is_file()
    assert SECRET not in result.output


def test_a_push_alone_stages_in_the_cache_and_keeps_it_when_the_upload_fails(
    hub: FakeHub, tiny_qwen2: Path, tmp_path: Path
) -> None:
    hub.fail = "upload_folder"
    result = CliRunner().invoke(main, ["run", str(tiny_qwen2), "--push-to-hub", "team/x", *MANUAL, *FAST])
    assert result.exit_code == 1, result.output
    staged = tmp_path / "cache" / "push" / "team--x"
    assert f"kept in {staged}" in result.output
    assert (staged / "model.safetensors").is_file()
    # Retrying the run replaces the staged copy and removes it once pushed.
    hub.fail = None
    result = CliRunner().invoke(main, ["run", str(tiny_qwen2), "--push-to-hub", "team/x", *MANUAL, *FAST])
    assert result.exit_code == 0, result.output
    assert not staged.exists()


def test_a_push_alone_needs_room_where_it_stages(
    hub: FakeHub, tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("abliterate.ship.hub.shutil.disk_usage", lambda path: SimpleNamespace(free=1000))
    result = CliRunner().invoke(main, ["run", str(tiny_qwen2), "--push-to-hub", "me/x", *MANUAL, *FAST])
    assert result.exit_code == 1 and "give --output DIR on a disk with room" in result.output
    assert "upload_folder" not in hub.names()


def test_a_repush_removes_stale_weights(hub: FakeHub, tiny_qwen2: Path, tmp_path: Path) -> None:
    hub.repo = {"private": False}
    args = ["run", str(tiny_qwen2), "-o", str(tmp_path / "out"), "--push-to-hub", "me/x", *MANUAL, *FAST]
    assert CliRunner().invoke(main, args).exit_code == 0
    upload = dict(hub.calls)["upload_folder"]
    assert (
        "*.safetensors" in upload["delete_patterns"]
        and "*.safetensors.index.json" in upload["delete_patterns"]
    )


@pytest.mark.parametrize(
    ("was_private", "flags", "update", "note"),
    [
        (False, ["--private"], True, "was made private"),
        (True, [], False, "stays private"),
        (None, ["--private"], False, None),
        (False, [], False, None),
    ],
)
def test_private_is_honoured_or_its_effect_stated(
    hub: FakeHub,
    tiny_qwen2: Path,
    tmp_path: Path,
    was_private: bool | None,
    flags: list[str],
    update: bool,
    note: str | None,
) -> None:
    hub.repo = None if was_private is None else {"private": was_private}
    args = [
        "run",
        str(tiny_qwen2),
        "-o",
        str(tmp_path / "out"),
        "--push-to-hub",
        "me/x",
        *flags,
        *MANUAL,
        *FAST,
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert ("update_repo_settings" in hub.names()) is update
    if update:
        assert dict(hub.calls)["update_repo_settings"]["private"] is True
    assert dict(hub.calls)["create_repo"]["private"] is bool(flags)
    notes = [line for line in result.output.splitlines() if line.startswith("me/x ")]
    assert notes == ([] if note is None else [notes[0]]) and (note is None or note in notes[0]), result.output
