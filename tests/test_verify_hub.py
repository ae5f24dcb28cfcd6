"""``abliterate verify user/name``: a published edit is fetched from the Hub and proved, against a local fake
Hub (``hf_hub_download`` and ``snapshot_download`` replaced by copies out of temporary directories)."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from click.testing import CliRunner
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import load_file, save_file
from tiny import quick_run_args

from abliterate.cli import main

SECRET = "hf_secret_token_value_789"
BASE_COMMIT = "b" * 40


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models"))


class FakeHubFiles:
    """Repositories as lists of ``(commit, folder)`` pushes (the last one is ``main``); downloads copy into a
    cache laid out as the Hugging Face cache (``snapshots/<commit>/``) and are recorded."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.repos: dict[str, list[tuple[str, Path]]] = {}
        self.calls: list[tuple[str, str, str | None]] = []

    def publish(self, repo_id: str, folder: Path, commit: str) -> None:
        self.repos.setdefault(repo_id, []).append((commit, folder))

    def _resolve(self, repo_id: str, revision: str | None) -> tuple[str, Path]:
        if repo_id not in self.repos:
            raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=_response(404))
        pushes = self.repos[repo_id]
        if revision in (None, "main"):
            return pushes[-1]
        for commit, folder in pushes:
            if commit == revision:
                return commit, folder
        raise RevisionNotFoundError("404 Client Error. Revision Not Found", response=_response(404))

    def _snapshot(self, repo_id: str, commit: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit

    def hf_hub_download(
        self, repo_id: str, filename: str, *, revision: str | None = None, **_: object
    ) -> str:
        self.calls.append(("file", repo_id, revision))
        commit, folder = self._resolve(repo_id, revision)
        if not (folder / filename).is_file():
            raise RemoteEntryNotFoundError("404 Client Error. Entry Not Found", response=_response(404))
        target = self._snapshot(repo_id, commit) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / filename, target)
        return str(target)

    def snapshot_download(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        allow_patterns: list[str] | None = None,
        **_: object,
    ) -> str:
        self.calls.append(("snapshot", repo_id, revision))
        commit, folder = self._resolve(repo_id, revision)
        target = self._snapshot(repo_id, commit)
        target.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if path.is_file() and any(fnmatch.fnmatch(path.name, each) for each in allow_patterns or ["*"]):
                shutil.copyfile(path, target / path.name)
        return str(target)


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHubFiles:
    fake = FakeHubFiles(tmp_path / "hub-cache")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


@pytest.fixture(scope="module")
def published(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run's output as it is pushed after a run of ``owner/base``: its manifest names the Hub base model
    at the commit the run downloaded."""
    output = tmp_path_factory.mktemp("run") / "edited"
    result = CliRunner().invoke(
        main, ["run", str(tiny_qwen2), "-o", str(output), *quick_run_args(6, 2, layer=2, evaluate=False)]
    )
    assert result.exit_code == 0, result.output
    manifest_path = output / "abliterate.json"
    manifest = json.loads(manifest_path.read_text("utf-8"))
    manifest["model"].update(source="owner/base", revision=BASE_COMMIT)
    manifest_path.write_text(json.dumps(manifest), "utf-8")
    return output


def _verify(*args: str) -> object:
    return CliRunner().invoke(main, ["verify", *args, "--no-progress"])


def _tampered(published: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(published, copy)
    tensors = load_file(copy / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][3, 5] += 0.5
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_a_published_edit_verifies_by_its_hub_id(
    hub: FakeHubFiles, tiny_qwen2: Path, published: Path
) -> None:
    hub.publish("owner/base", tiny_qwen2, BASE_COMMIT)
    hub.publish("user/edited", published, "e" * 40)
    result = _verify("user/edited")
    assert result.exit_code == 0, result.output
    assert f"fetched user/edited at {'e' * 40}" in result.output
    assert "original owner/base, revision " + BASE_COMMIT in result.output
    assert ("snapshot", "owner/base", BASE_COMMIT) in hub.calls  # the base at the manifest's commit
    # The manifest first, then the rest at the commit it resolved to.
    assert hub.calls[:2] == [("file", "user/edited", None), ("snapshot", "user/edited", "e" * 40)]
    assert SECRET not in result.output


def test_a_tampered_published_edit_fails(
    hub: FakeHubFiles, tiny_qwen2: Path, published: Path, tmp_path: Path
) -> None:
    hub.publish("owner/base", tiny_qwen2, BASE_COMMIT)
    hub.publish("user/edited", _tampered(published, tmp_path), "f" * 40)
    result = _verify("user/edited", "--no-forward")
    assert result.exit_code == 2, result.output
    assert "parity gate failed" in result.output
    assert SECRET not in result.output


def test_a_revision_pins_what_is_verified(
    hub: FakeHubFiles, tiny_qwen2: Path, published: Path, tmp_path: Path
) -> None:
    """A later push replaced the clean edit with a tampered one: main fails, the pinned clean one passes."""
    hub.publish("owner/base", tiny_qwen2, BASE_COMMIT)
    hub.publish("user/edited", published, "1" * 40)
    hub.publish("user/edited", _tampered(published, tmp_path), "2" * 40)
    assert _verify("user/edited", "--no-forward").exit_code == 2
    result = _verify("user/edited", "--revision", "1" * 40, "--no-forward")
    assert result.exit_code == 0, result.output
    assert ("snapshot", "user/edited", "1" * 40) in hub.calls


def test_a_repository_without_a_manifest_is_one_line(hub: FakeHubFiles, tiny_qwen2: Path) -> None:
    hub.publish("user/plain", tiny_qwen2, "c" * 40)
    result = _verify("user/plain")
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "user/plain has no abliterate.json" in result.output
    assert [call[0] for call in hub.calls] == ["file"]  # no weights downloaded for a refusal


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["user/absent"], "user/absent is not on the Hub or not readable with your token"),
        (["user/edited", "--revision", "nope"], "user/edited has no revision nope"),
    ],
)
def test_a_missing_repository_or_revision_is_one_line(
    hub: FakeHubFiles, published: Path, args: list[str], says: str
) -> None:
    hub.publish("user/edited", published, "e" * 40)
    result = _verify(*args)
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and says in result.output
    assert SECRET not in result.output


def test_revision_needs_a_hub_id(published: Path) -> None:
    result = _verify(str(published), "--revision", "main")
    assert result.exit_code == 1 and "--revision is for a Hub id" in result.output
    assert _verify("a", str(published), "--direction", "d", "--revision", "main").exit_code == 2
