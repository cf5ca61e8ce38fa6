"""The real modelscope client (modelscope 1.40.2, modelscope-hub 0.5.1) against
orchestrator.modelhub, a local STAND-IN for the ModelScope hub.

modelscope.cn cannot be reached from here: every download below goes to the stand-in on
127.0.0.1, which serves the generated tiny Qwen2 model (orchestrator/sandbox/modelgen.py) as a
repository. The client is the real one, run as its users run it (`modelscope download`,
`snapshot_download`), pointed at the stand-in with MODELSCOPE_ENDPOINT.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from doubles.modelhub import StandInHub

from orchestrator.sandbox.modelgen import generate_tiny_qwen2

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODEL_ID = "orchestrate/tiny-qwen2"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model plus a file in a subdirectory, as real repos have (original/, onnx/)."""
    directory = generate_tiny_qwen2(tmp_path_factory.mktemp("hub") / "tiny-qwen2")
    repo = tmp_path_factory.mktemp("hub") / "repo"
    shutil.copytree(directory, repo)
    (repo / "original").mkdir()
    (repo / "original" / "params.json").write_text('{"dim": 128}\n')
    return repo


@pytest.fixture
def hub(model_dir: Path) -> Iterator[StandInHub]:
    with StandInHub() as stand_in:
        stand_in.add_repo(MODEL_ID, model_dir, revisions=("v1.0",))
        yield stand_in


def client_env(hub: StandInHub, home: Path, **extra: str) -> dict[str, str]:
    """The client's environment: the stand-in as endpoint, its state kept under ``home``."""
    return {**os.environ, "MODELSCOPE_ENDPOINT": hub.endpoint,
            "MODELSCOPE_HOME": str(home / "ms-home"), "MODELSCOPE_CACHE": str(home / "ms-cache"),
            **extra}


def modelscope_download(hub: StandInHub, dest: Path, *args: str,
                        **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "modelscope"), "download", "--model", MODEL_ID, "--local_dir", str(dest), *args],
        env=client_env(hub, dest.parent, **env), capture_output=True, text=True, timeout=120,
        check=False)


def digests(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def file_requests(hub: StandInHub, path: str) -> list[tuple[str | None, int, int]]:
    return [(s.range, s.status, s.bytes) for s in hub.served if s.path == path]


def test_stand_in_hub_cli_download_is_complete_and_verified(
        hub: StandInHub, model_dir: Path, tmp_path: Path) -> None:
    commit = hub.commit(MODEL_ID)

    proc = modelscope_download(hub, tmp_path / "dest", "--revision", commit)

    assert proc.returncode == 0, proc.stderr
    assert digests(tmp_path / "dest") == digests(model_dir)
    total = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    assert hub.bytes_served() == total  # each file once, whole
    listing = [c for c in hub.api_calls if "/repo/files" in c]
    assert listing == [f"GET /api/v1/models/{MODEL_ID}/repo/files?Revision={commit}&Recursive=True"]


def test_stand_in_hub_snapshot_download_api_with_patterns(
        hub: StandInHub, model_dir: Path, tmp_path: Path) -> None:
    code = ("import json, sys\n"
            "from modelscope.hub.snapshot_download import snapshot_download\n"
            "print(snapshot_download(sys.argv[1], revision='v1.0', local_dir=sys.argv[2],\n"
            "      allow_patterns=['*.json', 'original/*'], ignore_patterns=['tokenizer*']))\n")
    dest = tmp_path / "dest"

    proc = subprocess.run([sys.executable, "-c", code, MODEL_ID, str(dest)],
                          env=client_env(hub, tmp_path), capture_output=True, text=True,
                          timeout=120, check=False)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(dest)
    assert set(digests(dest)) == {".modelgen.json", "config.json", "generation_config.json",
                                  "manifest.json",
                                  "special_tokens_map.json", "original/params.json"}
    assert {k: v for k, v in digests(model_dir).items() if k in digests(dest)} == digests(dest)


def test_stand_in_hub_cut_transfer_is_resumed_by_the_client_within_a_run(
        hub: StandInHub, model_dir: Path, tmp_path: Path) -> None:
    size = (model_dir / WEIGHTS).stat().st_size
    hub.cut_transfer(MODEL_ID, WEIGHTS, after_bytes=500_000)

    proc = modelscope_download(hub, tmp_path / "dest")

    assert proc.returncode == 0, proc.stderr
    assert digests(tmp_path / "dest") == digests(model_dir)
    assert file_requests(hub, WEIGHTS) == [(None, 200, 500_000),
                                           ("bytes=500000-", 206, size - 500_000)]


def test_stand_in_hub_interrupted_download_resumes_in_the_next_run(
        hub: StandInHub, model_dir: Path, tmp_path: Path) -> None:
    size = (model_dir / WEIGHTS).stat().st_size
    dest = tmp_path / "dest"
    hub.cut_transfer(MODEL_ID, WEIGHTS, after_bytes=700_000)

    first = modelscope_download(hub, dest, MODELSCOPE_DOWNLOAD_MAX_RETRIES="0")

    assert first.returncode != 0
    assert f"  - {WEIGHTS}: " in first.stderr
    assert (dest / f"{WEIGHTS}.incomplete").stat().st_size == 700_000
    assert not (dest / WEIGHTS).exists()
    hub.reset_counters()

    second = modelscope_download(hub, dest)

    assert second.returncode == 0, second.stderr
    assert digests(dest) == digests(model_dir)
    # Only the weights were fetched again, and only what the first run lacked.
    assert file_requests(hub, WEIGHTS) == [("bytes=700000-", 206, size - 700_000)]
    assert hub.bytes_served() == size - 700_000 < size


@pytest.mark.parametrize(("how", "reason"), [
    ("flip", "Hash mismatch for config.json"),
    # The reported failure: an empty body where a file should be (actual sha256 e3b0c442...).
    ("empty", "Server announced 0 bytes for config.json"),
])
def test_stand_in_hub_corrupted_file_is_rejected_by_the_client_by_name(
        hub: StandInHub, tmp_path: Path, how: str, reason: str) -> None:
    hub.corrupt(MODEL_ID, "config.json", how)  # type: ignore[arg-type]

    proc = modelscope_download(hub, tmp_path / "dest")

    assert proc.returncode != 0
    assert "  - config.json: " in proc.stderr and reason in proc.stderr
    # A rejected file is not left in place; the others are kept for the next run.
    assert not (tmp_path / "dest" / "config.json").exists()
    assert (tmp_path / "dest" / WEIGHTS).exists()


def test_stand_in_hub_unknown_revision_and_model_fail_clearly(
        hub: StandInHub, tmp_path: Path) -> None:
    proc = modelscope_download(hub, tmp_path / "dest", "--revision", "no-such-branch")

    assert proc.returncode != 0
    assert "revision no-such-branch of orchestrate/tiny-qwen2 not found" in proc.stderr


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def file_url(hub: StandInHub, path: str, revision: str = "master") -> str:
    return f"{hub.endpoint}/api/v1/models/{MODEL_ID}/repo?Revision={revision}&FilePath={path}"


def test_stand_in_hub_lists_sizes_hashes_and_directories(hub: StandInHub, model_dir: Path) -> None:
    status, _, body = get(f"{hub.endpoint}/api/v1/models/{MODEL_ID}/repo/files"
                          "?Revision=master&Recursive=True")

    files = json.loads(body)["Data"]["Files"]
    assert status == 200
    blobs = {f["Path"]: (f["Size"], f["Sha256"]) for f in files if f["Type"] == "blob"}
    assert blobs == {name: ((model_dir / name).stat().st_size, digest)
                     for name, digest in digests(model_dir).items()}
    assert [f["Path"] for f in files if f["Type"] == "tree"] == ["original"]


def test_stand_in_hub_ranges(hub: StandInHub, model_dir: Path) -> None:
    data = (model_dir / "config.json").read_bytes()

    whole = get(file_url(hub, "config.json"))
    tail = get(file_url(hub, "config.json"), {"Range": "bytes=100-"})
    middle = get(file_url(hub, "config.json"), {"Range": "bytes=10-19"})
    beyond = get(file_url(hub, "config.json"), {"Range": f"bytes={len(data)}-"})

    assert (whole[0], whole[2]) == (200, data)
    assert (tail[0], tail[1]["Content-Range"], tail[2]) == (
        206, f"bytes 100-{len(data) - 1}/{len(data)}", data[100:])
    assert (middle[0], middle[2]) == (206, data[10:20])
    assert (beyond[0], beyond[1]["Content-Range"]) == (416, f"bytes */{len(data)}")
    assert hub.bytes_served(MODEL_ID, "config.json") == len(data) + (len(data) - 100) + 10


def test_stand_in_hub_answers_head_without_a_body(hub: StandInHub, model_dir: Path) -> None:
    # The client sends HEAD to learn a file's storage route (inter-cloud acceleration).
    request = urllib.request.Request(file_url(hub, WEIGHTS), method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == (model_dir / WEIGHTS).stat().st_size
        assert response.read() == b""
    assert hub.bytes_served() == 0


def test_stand_in_hub_faults_last_as_long_as_asked(hub: StandInHub, model_dir: Path) -> None:
    data = (model_dir / "config.json").read_bytes()
    hub.corrupt(MODEL_ID, "config.json", "flip", times=1)

    flipped = get(file_url(hub, "config.json"))[2]
    again = get(file_url(hub, "config.json"))[2]

    assert len(flipped) == len(data) and flipped[1:] == data[1:] and flipped[0] != data[0]
    assert again == data
    hub.corrupt(MODEL_ID, "config.json", "empty")
    assert get(file_url(hub, "config.json"))[2] == get(file_url(hub, "config.json"))[2] == b""
    hub.clear_faults()
    assert get(file_url(hub, "config.json"))[2] == data


def test_stand_in_hub_with_a_token_refuses_anonymous_requests(model_dir: Path) -> None:
    with StandInHub(token="s3cret") as private:
        private.add_repo(MODEL_ID, model_dir)
        listing = f"{private.endpoint}/api/v1/models/{MODEL_ID}/repo/files?Revision=master"

        assert get(listing)[0] == 401
        assert get(listing, {"Authorization": "Bearer s3cret"})[0] == 200
        assert get(listing, {"Cookie": "a=b; m_session_id=s3cret"})[0] == 200
        assert get(listing, {"Authorization": "Bearer wrong"})[0] == 401


def test_stand_in_hub_refuses_bad_setup(tmp_path: Path, model_dir: Path) -> None:
    StandInHub().stop()  # never started: stops without waiting for a server loop
    with StandInHub() as stand_in:
        with pytest.raises(ValueError, match="expected 'owner/name'"):
            stand_in.add_repo("no-owner", model_dir)
        with pytest.raises(NotADirectoryError):
            stand_in.add_repo("a/b", tmp_path / "missing")
        stand_in.add_repo("a/b", model_dir)
        with pytest.raises(KeyError, match="no file 'nope'"):
            stand_in.corrupt("a/b", "nope", "flip")
        with pytest.raises(ValueError, match="expected 'flip' or 'empty'"):
            stand_in.corrupt("a/b", "config.json", "zero")  # type: ignore[arg-type]


# --- the role's filters, checked against what the real client selects ---

def role_filters() -> ModuleType:
    path = REPO / "roles" / "model_weights" / "filter_plugins" / "model_weights.py"
    spec = importlib.util.spec_from_file_location("model_weights_filters", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hub_files(hub: StandInHub) -> list[dict[str, Any]]:
    body = get(f"{hub.endpoint}/api/v1/models/{MODEL_ID}/repo/files?Revision=master"
               "&Recursive=True")[2]
    files: list[dict[str, Any]] = json.loads(body)["Data"]["Files"]
    return files


@pytest.mark.parametrize(("include", "exclude"), [
    ([], []),
    (["*.json"], ["tokenizer*"]),
    (["*.safetensors,original/*"], []),
    ([], [".*\\.json"]),  # a legacy regex-like pattern, read by the client as a glob
])
def test_role_manifest_filter_selects_what_the_client_downloads(
        hub: StandInHub, tmp_path: Path, include: list[str], exclude: list[str]) -> None:
    args = ([*(["--include", *include] if include else []),
             *(["--exclude", *exclude] if exclude else [])])

    proc = modelscope_download(hub, tmp_path / "dest", *args)
    manifest = role_filters().hub_manifest(hub_files(hub), include, exclude)

    assert proc.returncode == 0, proc.stderr
    assert set(manifest["files"]) == set(digests(tmp_path / "dest"))
    for name, entry in manifest["files"].items():
        data = (tmp_path / "dest" / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_role_bytes_to_fetch_counts_partial_and_wrong_sized_files() -> None:
    manifest = {"files": {"a": {"size": 100, "sha256": ""}, "b": {"size": 50, "sha256": ""},
                          "c/d": {"size": 10, "sha256": ""}, "e": {"size": 7, "sha256": ""}}}
    found = [{"path": "/m/a", "size": 100},             # complete: nothing to fetch
             {"path": "/m/b.incomplete", "size": 20},   # partial: resumed
             {"path": "/m/c/d", "size": 3},             # wrong size: fetched again whole
             {"path": "/m/e.incomplete", "size": 9}]    # longer than the file: whole again

    assert role_filters().bytes_to_fetch(manifest, found, "/m") == 0 + 30 + 10 + 7


def test_role_manifest_filter_refuses_a_truncated_listing() -> None:
    from ansible.errors import AnsibleFilterError

    files = [{"Path": f"f{i}", "Type": "blob", "Size": 1, "Sha256": ""} for i in range(3000)]
    with pytest.raises(AnsibleFilterError, match="3000 entries"):
        role_filters().hub_manifest(files)
