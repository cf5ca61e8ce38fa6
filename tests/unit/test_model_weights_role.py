"""The model_weights role's download paths, run by ansible-playbook on this machine (as root)
against tmp directories.

ModelScope itself cannot be reached here: the `modelscope` source downloads with the real
client from tests/doubles/modelhub.py, a local STAND-IN for the ModelScope hub on 127.0.0.1.
The `mirror` source fetches from a plain local HTTP server of a model directory.

Each scenario is one inventory host (all of them this machine, each with its own models
root), so that one playbook run covers them all and a failing scenario does not stop the
others: the first run downloads, the second runs the same again.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from doubles.modelhub import StandInHub

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = REPO / "tests" / "data" / "model-weights-playbook.yml"
WEIGHTS = "model.safetensors"
MARKER = ".qwen-serve-complete"
NOBODY = 65534  # nobody:nogroup on Debian, the stand-in service user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sets file owners: needs root")


TOKEN = "ms-test-token-7f3a"  # a test value: it must reach the stand-in and no log
# A proxy's password in model_weights_modelscope_environment, a secret as much as the token.
# The proxy is never used (no_proxy names the stand-ins' address).
PROXY_PASSWORD = "proxy-pass-51d0"


@dataclass
class HostResult:
    stats: dict[str, int]
    # task name -> failure messages (one per failed loop item, or the task's own)
    failures: dict[str, list[str]]


def run_role(tmp: Path, hosts: dict[str, dict[str, Any]]) -> tuple[dict[str, HostResult], str]:
    """One ansible-playbook run of the role; each host is this machine with its own vars.
    Returns each host's result and the run's whole JSON report."""
    common = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "model_weights_owner": "nobody",
        "model_weights_group": "nogroup",
        # This environment already has the pinned client; the pip task finds it there.
        "model_weights_env_path": sys.prefix,
        "model_weights_download_retries": 0,
        "model_weights_download_retry_delay": 0,
        "model_weights_free_space_margin_mib": 1,
    }
    inventory = {"all": {"vars": common, "hosts": {
        name: {"model_weights_root": str(tmp / name / "models"),
               "model_weights_modelscope_home": str(tmp / name / "ms-home"), **host_vars}
        for name, host_vars in hosts.items()}}}
    (tmp / "inventory.json").write_text(json.dumps(inventory))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_STDOUT_CALLBACK": "json", "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
           "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-remote-tmp")}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(tmp / "inventory.json"),
         str(PLAYBOOK)],
        env=env, capture_output=True, text=True, timeout=500, check=False, cwd=REPO)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"ansible-playbook printed no JSON report:\n{proc.stdout}\n{proc.stderr}")
    results = {name: HostResult(report["stats"][name], {}) for name in hosts}
    for play in report["plays"]:
        for task in play["tasks"]:
            for name, result in task["hosts"].items():
                if result.get("failed"):
                    items = [r for r in result.get("results", []) if r.get("failed")]
                    results[name].failures[task["task"]["name"]] = (
                        [str(r.get("msg")) for r in items] or [str(result.get("msg"))])
    return results, proc.stdout


class ProcessWatch(threading.Thread):
    """Reads every process's command line on this machine (the host of the run) every few
    milliseconds while the role runs: which held the token, and that the modelscope
    client of the private repository was seen at all."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.with_token: set[str] = set()
        self.clients: set[str] = set()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue  # exited meanwhile
                if TOKEN in args or PROXY_PASSWORD in args:
                    self.with_token.add(args)
                if "download --model orchestrate/private" in args:
                    self.clients.add(args)

    def __enter__(self) -> ProcessWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model directory with a manifest.json as the sandbox's modelgen.py writes it."""
    directory = tmp_path_factory.mktemp("source") / "model"
    (directory / "original").mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "qwen2"}\n')
    (directory / WEIGHTS).write_bytes(os.urandom(600_000))
    (directory / "original" / "params.json").write_text('{"dim": 128}\n')
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / "manifest.json").write_text(json.dumps({"files": files}, indent=2) + "\n")
    # The same directory behind a manifest that lists a wrong sha256 for config.json.
    bad = directory.parent / "bad"
    shutil.copytree(directory, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["config.json"]["sha256"] = "0" * 64
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return directory


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Tests read the role's report, not the access log."""


@pytest.fixture(scope="module")
def mirror(model_dir: Path) -> Iterator[str]:
    """A plain HTTP server of the source directories: the `mirror` source."""
    handler = functools.partial(_QuietFiles, directory=str(model_dir.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


PUBLIC = ("corrupt", "roomless", "upgrade")


@pytest.fixture(scope="module")
def hub(model_dir: Path) -> Iterator[StandInHub]:
    """The stand-in for modelscope.cn: one repo per scenario, so their counters stay apart."""
    with StandInHub() as stand_in:
        for name in PUBLIC:
            stand_in.add_repo(f"orchestrate/{name}", model_dir)
        yield stand_in


@pytest.fixture(scope="module")
def private_hub(model_dir: Path) -> Iterator[StandInHub]:
    """A stand-in for a private ModelScope deployment: every request needs the token."""
    with StandInHub(token=TOKEN) as stand_in:
        stand_in.add_repo("orchestrate/private", model_dir)
        yield stand_in


def modelscope_model(root: Path, host: str, name: str, hub: StandInHub,
                     **extra: Any) -> dict[str, Any]:
    return {"name": name, "source": "modelscope", "model_id": f"orchestrate/{name}",
            "revision": hub.commit(f"orchestrate/{name}"),
            "dest": str(root / host / "models" / name), **extra}


def served(hub: StandInHub, name: str) -> list[tuple[str, str | None, int, int]]:
    return [(s.path, s.range, s.status, s.bytes) for s in hub.served
            if s.model_id == f"orchestrate/{name}"]


@dataclass
class Runs:
    hosts: dict[str, dict[str, Any]]
    first: dict[str, HostResult]
    second: dict[str, HostResult]
    reports: str
    # Per repo: (file, Range, status, bytes) of each file request.
    served_first: dict[str, list[tuple[str, str | None, int, int]]]
    served_second: dict[str, list[tuple[str, str | None, int, int]]]
    calls_second: list[str]
    # Command lines seen during the first run: those holding the token, the private client's.
    watched: ProcessWatch

    def dest(self, host: str, index: int = 0) -> Path:
        return Path(self.hosts[host]["model_weights_models"][index]["dest"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, hub: StandInHub, private_hub: StandInHub,
         mirror: str, model_dir: Path) -> Runs:
    root = tmp_path_factory.mktemp("role")
    public = {"model_weights_modelscope_endpoint": hub.endpoint}
    private = {"model_weights_modelscope_endpoint": private_hub.endpoint,
               "model_weights_modelscope_token": TOKEN}
    hosts: dict[str, dict[str, Any]] = {
        # A private repository with a pattern, whose weights' first transfer drops after
        # 300000 bytes: the client gives up at once (no retry of its own) and the role
        # runs it again, which resumes. And the same model from a plain HTTP mirror.
        "good": {**private, "model_weights_models": [
            modelscope_model(root, "good", "private", private_hub, exclude=["original/*"]),
            {"name": "mirrored", "source": "mirror", "url": f"{mirror}/model/",
             "dest": str(root / "good/models/mirrored")}],
            "model_weights_download_retries": 1,
            "model_weights_modelscope_environment": {
                "MODELSCOPE_DOWNLOAD_MAX_RETRIES": "0",
                "http_proxy": f"http://proxy:{PROXY_PASSWORD}@127.0.0.1:9",
                "no_proxy": "127.0.0.1"}},
        "corrupt": {**public,
                    "model_weights_models": [modelscope_model(root, "corrupt", "corrupt", hub)]},
        "roomless": {**public, "model_weights_free_space_margin_mib": 2**40,
                     "model_weights_models": [modelscope_model(root, "roomless", "roomless", hub)]},
        # A repository the hub does not have, and a hub that is not there.
        "unknown": {**public, "model_weights_models": [
            {"name": "missing", "source": "modelscope", "model_id": "orchestrate/missing",
             "revision": "master", "dest": str(root / "unknown/models/missing")}]},
        "nohub": {"model_weights_modelscope_endpoint": "http://127.0.0.1:9",
                  "model_weights_models": [modelscope_model(root, "nohub", "corrupt", hub)]},
        "badmirror": {"model_weights_models": [
            {"name": "bad", "source": "mirror", "url": f"{mirror}/bad",
             "dest": str(root / "badmirror/models/bad")}]},
        "badentry": {"model_weights_models": [
            {"name": "x", "source": "ftp", "dest": str(root / "badentry/models/x")}]},
        # The local source (a copy from this machine), checked against its manifest.json.
        "local": {"model_weights_models": [
            {"name": "copied", "source": "local", "local_dir": str(model_dir),
             "dest": str(root / "local/models/copied")}]},
    }
    private_hub.cut_transfer("orchestrate/private", WEIGHTS, after_bytes=300_000)
    hub.corrupt("orchestrate/corrupt", WEIGHTS, "flip")
    with ProcessWatch() as watched:
        first, first_report = run_role(root, hosts)
    served_first = {name: served(hub, name) for name in PUBLIC}
    served_first["private"] = served(private_hub, "private")
    hub.clear_faults()
    hub.reset_counters()
    private_hub.reset_counters()

    # Second run: the good host again, plus copies of its downloaded directory: with the
    # weights emptied on disk (checked with and without reverify), and with the marker an
    # older role version wrote ("<model_id>@<revision>").
    downloaded = hosts["good"]["model_weights_models"][0]
    second_hosts = {"good": hosts["good"]}
    for name, reverify in (("trusting", False), ("reverify", True)):
        dest = root / name / "models" / "private"
        shutil.copytree(downloaded["dest"], dest)
        (dest / WEIGHTS).chmod(0o644)
        (dest / WEIGHTS).write_bytes(b"")  # the "empty file" failure, on disk
        (dest / WEIGHTS).chmod(0o444)
        for path in [dest, *dest.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
        second_hosts[name] = {**private, "model_weights_reverify": reverify,
                              "model_weights_models": [dict(downloaded, dest=str(dest))]}
    upgrade = modelscope_model(root, "upgrade", "upgrade", hub, exclude=["original/*"])
    shutil.copytree(downloaded["dest"], upgrade["dest"])
    (Path(upgrade["dest"]) / MARKER).write_text(f"orchestrate/upgrade@{upgrade['revision']}\n")
    second_hosts["upgrade"] = {**public, "model_weights_models": [upgrade]}
    second, second_report = run_role(root, second_hosts)
    served_second = {name: served(hub, name) for name in PUBLIC}
    served_second["private"] = served(private_hub, "private")
    return Runs({**hosts, **second_hosts}, first, second, first_report + second_report,
                served_first, served_second, hub.api_calls + private_hub.api_calls, watched)


def test_download_from_the_stand_in_hub_is_complete_and_verified(
        runs: Runs, model_dir: Path) -> None:
    assert runs.first["good"].failures == {}
    dest = runs.dest("good", 0)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [MARKER, "config.json", "manifest.json", WEIGHTS])  # original/* excluded
    for name in ("config.json", "manifest.json", WEIGHTS):
        assert sha256(dest / name) == sha256(model_dir / name)
    assert not list(dest.rglob("*.incomplete"))
    marker = json.loads((dest / MARKER).read_text())
    assert marker["identity"] == {"source": "modelscope", "model_id": "orchestrate/private",
                                  "revision": runs.hosts["good"]["model_weights_models"][0][
                                      "revision"],
                                  "include": [], "exclude": ["original/*"]}
    # The marker keeps the hub's list of what was downloaded, for later checks.
    assert marker["files"] == {
        name: {"size": (model_dir / name).stat().st_size, "sha256": sha256(model_dir / name)}
        for name in ("config.json", "manifest.json", WEIGHTS)}
    assert all(path != "original/params.json" for path, *_ in runs.served_first["private"])


def test_interrupted_transfer_is_resumed_not_restarted(runs: Runs, model_dir: Path) -> None:
    assert runs.first["good"].failures == {}
    weights = [(r, status, sent) for path, r, status, sent in runs.served_first["private"]
               if path == WEIGHTS]
    # The role's second client run asked only for the missing bytes and got only those.
    assert weights == [(None, 200, 300_000), ("bytes=300000-", 206, 300_000)]
    assert weights[1][2] < (model_dir / WEIGHTS).stat().st_size


def test_private_repository_gets_the_token_and_no_log_shows_it(runs: Runs) -> None:
    assert runs.first["good"].failures == {}
    assert runs.served_first["private"]  # the stand-in answers 401 without the token
    # The playbook's report holds every task's result and arguments, like ansible-runner's
    # artifacts: the token is not in it.
    assert TOKEN not in runs.reports
    assert PROXY_PASSWORD not in runs.reports


def test_the_token_and_the_environment_are_in_no_process_list(runs: Runs) -> None:
    """Ansible writes a task's `environment:` into the command that starts its module
    (/bin/sh -c 'NAME=value python ...'): the token and the client's environment (a
    proxy's password) must reach the hub listing and the client another way."""
    assert runs.first["good"].failures == {}
    assert runs.watched.clients  # the client of the private repository ran, and was seen
    assert runs.watched.with_token == set()
    # The environment file lived only while the hub was asked.
    assert not list(Path(tempfile.gettempdir()).glob("modelscope-environment.*"))


def test_mirror_source_fetches_the_manifest_files(runs: Runs, model_dir: Path) -> None:
    assert runs.first["good"].failures == {}
    mirrored = runs.dest("good", 1)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert sha256(mirrored / name) == entry["sha256"]
    assert json.loads((mirrored / MARKER).read_text())["files"] == manifest["files"]


def test_downloaded_files_belong_to_the_service_user_read_only(runs: Runs) -> None:
    for index in range(2):
        dest = runs.dest("good", index)
        for path in [dest, *dest.rglob("*")]:
            st = path.stat()
            assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), path
            assert st.st_mode & 0o777 == (0o555 if path.is_dir() else 0o444), path


def test_second_run_changes_nothing_and_downloads_nothing(runs: Runs) -> None:
    assert runs.first["good"].stats["changed"] > 0
    assert runs.second["good"].failures == {}
    assert runs.second["good"].stats["changed"] == 0
    # With its completion marker, a model does not even ask for its file list again.
    assert not [c for c in runs.calls_second if "/orchestrate/private/" in c]


def test_corrupted_file_from_the_stand_in_hub_fails_verification_by_name(runs: Runs) -> None:
    dest = runs.dest("corrupt")
    [message] = runs.first["corrupt"].failures[
        "model_weights : Compare with the source's manifest corrupt"]
    assert message.startswith(f"{dest}/{WEIGHTS}: missing; the source lists 600000 bytes")
    # The client's own reason for refusing it, quoted.
    assert f"The downloader reported: - {WEIGHTS}: " in message and "Hash mismatch" in message
    assert not (dest / MARKER).exists()
    assert len([s for s in runs.served_first["corrupt"] if s[0] == WEIGHTS]) == 3  # its retries


def test_too_little_space_fails_before_downloading(runs: Runs, hub: StandInHub) -> None:
    [message] = runs.first["roomless"].failures["model_weights : Check there is room for roomless"]
    needed = sum(f.size for f in hub.files("orchestrate/roomless").values())
    assert message.startswith(f"Not enough space for roomless at {runs.dest('roomless')}: "
                              f"{needed} bytes")
    assert "model_weights_free_space_margin_mib" in message
    assert runs.served_first["roomless"] == []


def test_a_repository_the_hub_lacks_is_named_with_the_hubs_answer(runs: Runs) -> None:
    failures = runs.first["unknown"].failures
    [message] = failures["model_weights : Check the hub lists orchestrate/missing@master"]
    endpoint = runs.hosts["unknown"]["model_weights_modelscope_endpoint"]
    assert message == (f"{endpoint} answered HTTP 404 for orchestrate/missing@master:"
                       " model orchestrate/missing not found."
                       " Check model_id and revision.")


def test_an_unreachable_hub_is_named(runs: Runs) -> None:
    [[name, [message]]] = runs.first["nohub"].failures.items()
    assert name.startswith("model_weights : Check the hub lists orchestrate/corrupt@")
    assert message.startswith("cannot reach http://127.0.0.1:9 for orchestrate/corrupt@")
    assert "Connection refused" in message


def test_reverify_names_a_file_damaged_after_download(runs: Runs) -> None:
    # Without reverify the marker is trusted: nothing read, nothing changed.
    assert runs.second["trusting"].failures == {}
    assert runs.second["trusting"].stats["changed"] == 0
    [message] = runs.second["reverify"].failures[
        "model_weights : Compare with the source's manifest private"]
    assert message.startswith(f"{runs.dest('reverify')}/{WEIGHTS}: 0 bytes, sha256 e3b0c442")


def test_marker_of_an_older_role_is_replaced_without_downloading_again(runs: Runs) -> None:
    dest = runs.dest("upgrade")
    assert runs.second["upgrade"].failures == {}
    assert json.loads((dest / MARKER).read_text())["identity"]["model_id"] == "orchestrate/upgrade"
    # The hub was asked for the file list; the client kept every file, its hash matching.
    assert any("/orchestrate/upgrade/repo/files" in c for c in runs.calls_second)
    assert runs.served_second["upgrade"] == []


def test_mirror_file_with_the_wrong_checksum_fails_by_name(runs: Runs) -> None:
    [message] = runs.first["badmirror"].failures[
        "model_weights : Name the files the mirror served wrong for bad"]
    assert message.startswith(f"{runs.dest('badmirror')}/config.json from ")
    assert f"the sha256 checksum did not match {'0' * 64}" in message
    assert "orchestrate mirror --verify" in message


def test_bad_model_entry_is_refused_naming_the_key(runs: Runs) -> None:
    [[message]] = runs.first["badentry"].failures.values()
    assert "source" in message and "ftp" in message and "modelscope" in message


def test_local_source_is_copied_and_checked_against_its_manifest(
        runs: Runs, model_dir: Path) -> None:
    assert runs.first["local"].failures == {}
    copied = runs.dest("local")
    assert {p.relative_to(copied).as_posix(): sha256(p) for p in copied.rglob("*") if p.is_file()} \
        == {p.relative_to(model_dir).as_posix(): sha256(p) for p in model_dir.rglob("*")
            if p.is_file()}
