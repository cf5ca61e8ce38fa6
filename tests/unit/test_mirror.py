"""`orchestrate mirror`: weights fetched once onto the control machine, then fanned out.

ModelScope cannot be reached here: every download goes with the real `modelscope` client
to orchestrator.modelhub, a local STAND-IN for the ModelScope hub on 127.0.0.1, which
counts the bytes it serves. The hosts are this machine (ansible_connection=local), two
inventory hosts with their own model directories, running the model_weights role's
`mirror` source against the mirror server of orchestrator.mirror, as the plan sets it up.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from doubles.modelhub import StandInHub

from orchestrator.config.fleet import load_fleet
from orchestrator.errors import ConfigError
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.mirror.weights import (
    MANIFEST,
    MirrorError,
    MirrorServer,
    Request,
    parse_listen,
    serving,
    stage_weights,
)
from orchestrator.plan.planner import make_plan, weights_origins
from orchestrator.sandbox import fleet as sandbox_fleet
from orchestrator.workflows.mirror import stage_for_up

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOK = REPO / "tests" / "data" / "model-weights-playbook.yml"
MODEL_ID = "Qwen/Qwen2.5-0.5B-Instruct"  # a catalog id, served by the stand-in
KEY = "modelscope/Qwen/Qwen2.5-0.5B-Instruct/master"
WEIGHTS = "model.safetensors"
TOKEN = "ms-mirror-token-51c2"  # a test value: it must reach the stand-in and no output
USER = pwd.getpwuid(os.getuid()).pw_name


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha256(p)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model repository; its own manifest.json must stay one of its files."""
    directory = tmp_path_factory.mktemp("origin") / "qwen"
    (directory / "original").mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "qwen2"}\n')
    (directory / WEIGHTS).write_bytes(os.urandom(700_000))
    (directory / "original" / "params.json").write_text('{"dim": 128}\n')
    (directory / MANIFEST).write_text('{"note": "the repository\'s own file"}\n')
    return directory


def repo_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def orchestrate(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "MODELSCOPE_API_TOKEN"}
    return subprocess.run([str(BIN / "orchestrate"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False, env={**clean, **env})


def fleet_yaml(path: Path, *, hub: str, mirror_url: str | None, local_dir: Path | None = None,
               ) -> Path:
    deployments: list[dict[str, Any]] = [
        {"name": "qwen05", "model": MODEL_ID, "engine": "vllm", "hosts": "gpu", "port": 8000,
         "options": {"open": True}}]
    if local_dir is not None:
        deployments.append({"name": "local", "model": "orchestrate/local", "engine": "vllm",
                            "hosts": "gpu", "port": 8001, "model_dir": str(local_dir),
                            "options": {"open": True}})
    fleet: dict[str, Any] = {
        "groups": {"gpu": {"profile": "cpu", "hosts": {
            "host-a": {"address": "127.0.0.1"}, "host-b": {"address": "127.0.0.1"}}}},
        "deployments": deployments}
    if mirror_url is not None:
        fleet["mirror"] = {"url": mirror_url, "dir": "mirror", "modelscope_endpoint": hub}
    path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    return path


@dataclass
class HostResult:
    stats: dict[str, int]
    failures: dict[str, list[str]]


def run_role(tmp: Path, hosts: dict[str, dict[str, Any]]) -> dict[str, HostResult]:
    """One ansible-playbook run of the model_weights role; every host is this machine."""
    common = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
              "model_weights_owner": USER, "model_weights_group": USER,
              "model_weights_download_retries": 0, "model_weights_download_retry_delay": 0,
              "model_weights_free_space_margin_mib": 1}
    inventory = {"all": {"vars": common, "hosts": {
        name: {"model_weights_root": str(tmp / name / "models"), **host_vars}
        for name, host_vars in hosts.items()}}}
    (tmp / "inventory.json").write_text(json.dumps(inventory))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_STDOUT_CALLBACK": "json", "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
           "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-remote-tmp")}
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp / "inventory.json"),
                           str(PLAYBOOK)], env=env, capture_output=True, text=True,
                          timeout=300, check=False, cwd=REPO)
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
    return results


@dataclass
class FanOut:
    tmp: Path
    first: dict[str, Any]
    second: dict[str, Any]
    origin_after_first: int
    origin_after_second: int
    calls_second: int
    planned: dict[str, list[dict[str, Any]]]
    roles: dict[str, HostResult]
    origin_after_hosts: int
    mirror_requests: list[Request]
    dests: dict[str, Path]


@pytest.fixture(scope="module")
def fan_out(tmp_path_factory: pytest.TempPathFactory, repo_dir: Path) -> Iterator[FanOut]:
    """`orchestrate mirror` twice, `orchestrate plan`, then two hosts fetching from the mirror."""
    tmp = tmp_path_factory.mktemp("fanout")
    local_dir = tmp / "local-model"
    local_dir.mkdir()
    (local_dir / "config.json").write_text('{"model_type": "qwen2", "local": true}\n')
    (local_dir / WEIGHTS).write_bytes(os.urandom(50_000))
    (tmp / "mirror").mkdir()
    requests: list[Request] = []
    with StandInHub() as hub, MirrorServer(tmp / "mirror", "127.0.0.1", 0,
                                           on_request=requests.append) as server:
        hub.add_repo(MODEL_ID, repo_dir)
        url = f"http://127.0.0.1:{server.address[1]}"
        fleet = fleet_yaml(tmp / "fleet.yml", hub=hub.endpoint, mirror_url=url,
                           local_dir=local_dir)
        first = orchestrate(tmp, "mirror", "--hosts", "gpu", "-f", str(fleet), "--json")
        assert first.returncode == 0, first.stderr
        origin_after_first, calls_after_first = hub.bytes_served(), len(hub.api_calls)
        second = orchestrate(tmp, "mirror", "--hosts", "gpu", "-f", str(fleet), "--json")
        assert second.returncode == 0, second.stderr
        origin_after_second = hub.bytes_served()
        calls_second = len(hub.api_calls) - calls_after_first
        plan = orchestrate(tmp, "plan", "--hosts", "gpu", "-f", str(fleet), "--json",
                           "--no-gather")
        assert plan.returncode == 0, plan.stderr
        planned = {h["name"]: h["vars"]["model_weights_models"]
                   for h in json.loads(plan.stdout)["hosts"]}
        dests = {}
        hosts: dict[str, dict[str, Any]] = {}
        for name, models in planned.items():
            entries = []
            for entry in models:
                dest = tmp / name / "models" / entry["name"]
                dests[f"{name}/{entry['name']}"] = dest
                entries.append({**entry, "dest": str(dest)})
            hosts[name] = {"model_weights_models": entries}
        # A host asking for a model the mirror does not have.
        hosts["host-c"] = {"model_weights_models": [{
            "name": "absent", "source": "mirror", "url": f"{url}/models/nosuch/files/",
            "manifest_url": f"{url}/models/nosuch/manifest.json",
            "dest": str(tmp / "host-c" / "models" / "absent")}]}
        # And one whose mirror server is not running.
        hosts["host-d"] = {"model_weights_models": [{
            **hosts["host-c"]["model_weights_models"][0], "url": "http://127.0.0.1:9/files/",
            "manifest_url": "http://127.0.0.1:9/manifest.json",
            "dest": str(tmp / "host-d" / "models" / "absent")}]}
        roles = run_role(tmp, hosts)
        yield FanOut(tmp, json.loads(first.stdout), json.loads(second.stdout),
                     origin_after_first, origin_after_second, calls_second, planned,
                     roles, hub.bytes_served(), list(requests), dests)


def test_mirror_takes_each_byte_from_the_stand_in_hub_once(fan_out: FanOut,
                                                            repo_dir: Path) -> None:
    size = repo_bytes(repo_dir)
    [hub_model] = [m for m in fan_out.first["models"] if m["source"] == "modelscope"]
    assert hub_model["key"] == KEY
    assert hub_model["files"] == 4 and hub_model["total_bytes"] == size
    # What the mirror reports taking from the origin is what the stand-in counted sending.
    assert hub_model["origin_bytes"] == size == fan_out.origin_after_first
    assert hub_model["deployments"] == ["qwen05"] and not hub_model["already_staged"]
    staged = Path(fan_out.first["dir"]) / "models" / KEY
    assert tree(staged / "files") == tree(repo_dir)
    manifest = json.loads((staged / MANIFEST).read_text())
    assert manifest["origin"] == {"source": "modelscope", "model_id": MODEL_ID,
                                  "revision": "master"}
    assert manifest["files"] == {
        path: {"size": (repo_dir / path).stat().st_size, "sha256": digest}
        for path, digest in tree(repo_dir).items()}


def test_mirror_copies_a_local_model_dir(fan_out: FanOut) -> None:
    [local] = [m for m in fan_out.first["models"] if m["source"] == "local"]
    assert local["key"].startswith("local/local-model-")
    assert local["origin_bytes"] == local["total_bytes"] == repo_bytes(fan_out.tmp / "local-model")
    assert fan_out.first["origin_bytes"] == sum(m["origin_bytes"] for m in fan_out.first["models"])


def test_second_mirror_run_takes_nothing(fan_out: FanOut) -> None:
    assert all(m["already_staged"] and m["origin_bytes"] == 0 for m in fan_out.second["models"])
    assert fan_out.second["origin_bytes"] == 0
    assert fan_out.origin_after_second == fan_out.origin_after_first
    # Not even the file list: the manifest is the completion marker.
    assert fan_out.calls_second == 0


def test_plan_points_every_host_at_the_mirror(fan_out: FanOut) -> None:
    for models in fan_out.planned.values():
        by_name = {m["name"]: m for m in models}
        assert by_name["qwen05"]["source"] == "mirror"
        assert by_name["qwen05"]["url"].endswith(f"/models/{KEY}/files/")
        assert by_name["qwen05"]["manifest_url"].endswith(f"/models/{KEY}/manifest.json")
        assert by_name["local"]["source"] == "mirror" and "local_dir" not in by_name["local"]


def test_two_hosts_fetch_from_the_mirror_and_the_origin_stays_1x(
        fan_out: FanOut, repo_dir: Path) -> None:
    for host in ("host-a", "host-b"):
        assert fan_out.roles[host].failures == {}, host
        dest = fan_out.dests[f"{host}/qwen05"]
        assert {k: v for k, v in tree(dest).items() if k != ".qwen-serve-complete"} \
            == tree(repo_dir)
        assert json.loads((dest / ".qwen-serve-complete").read_text())["identity"]["source"] \
            == "mirror"
    # Two hosts, one origin download.
    assert fan_out.origin_after_hosts == fan_out.origin_after_first == repo_bytes(repo_dir)
    weights = [r for r in fan_out.mirror_requests if r.path.endswith(f"{KEY}/files/{WEIGHTS}")]
    assert [(r.status, r.bytes) for r in weights] == [(200, 700_000)] * 2


def test_a_model_missing_from_the_mirror_fails_saying_what_to_do(fan_out: FanOut) -> None:
    [message] = fan_out.roles["host-c"].failures[
        "model_weights : Check the mirror serves the manifest of absent"]
    assert "/models/nosuch/manifest.json: HTTP 404" in message
    assert "orchestrate mirror" in message


def test_an_unreachable_mirror_fails_saying_so(fan_out: FanOut) -> None:
    [message] = fan_out.roles["host-d"].failures[
        "model_weights : Check the mirror serves the manifest of absent"]
    assert message.startswith("http://127.0.0.1:9/manifest.json: cannot reach the mirror:")


def test_the_mirror_server_hides_the_clients_state(fan_out: FanOut) -> None:
    assert (fan_out.tmp / "mirror" / ".state").is_dir()
    with MirrorServer(fan_out.tmp / "mirror", "127.0.0.1", 0) as server:
        base = f"http://127.0.0.1:{server.address[1]}"
        assert httpx.get(f"{base}/.state/").status_code == 404
        assert httpx.get(f"{base}/%2Estate/").status_code == 404
        assert httpx.get(f"{base}/models/{KEY}/manifest.json").status_code == 200


def _raw(port: int, method: str, path: str) -> tuple[int, bytes]:
    """A request sent as written: httpx would resolve `..` before sending it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def test_the_mirror_server_keeps_dot_dot_and_encoded_paths_out_of_the_state(
        fan_out: FanOut) -> None:
    state = fan_out.tmp / "mirror" / ".state"
    secret = next(p for p in state.rglob("*") if p.is_file())
    inside = secret.relative_to(state).as_posix()
    with MirrorServer(fan_out.tmp / "mirror", "127.0.0.1", 0) as server:
        port = server.address[1]
        for path in (f"/models/../.state/{inside}", f"/models/%2e%2e/.state/{inside}",
                     f"/models/%2E%2E/%2Estate/{inside}", f"/models%2f..%2f.state/{inside}",
                     f"/models/{KEY}/..%2f..%2f.state/{inside}",
                     f"/models/./../.state/{inside}"):
            assert _raw(port, "GET", path)[0] == 404, path


def test_the_mirror_server_lists_no_directory_but_wheels(fan_out: FanOut) -> None:
    (fan_out.tmp / "mirror" / "wheels").mkdir(exist_ok=True)
    with MirrorServer(fan_out.tmp / "mirror", "127.0.0.1", 0) as server:
        port = server.address[1]
        for path in ("/", "/models/", f"/models/{KEY}/", "/wheels/../"):
            assert _raw(port, "GET", path)[0] == 404, path
        assert _raw(port, "GET", "/wheels/")[0] == 200


def test_the_mirror_server_is_read_only(fan_out: FanOut) -> None:
    before = sorted(p.as_posix() for p in (fan_out.tmp / "mirror").rglob("*"))
    with MirrorServer(fan_out.tmp / "mirror", "127.0.0.1", 0) as server:
        port = server.address[1]
        for method in ("PUT", "POST", "DELETE", "PATCH"):
            assert _raw(port, method, "/models/new.bin")[0] == 501, method
        assert _raw(port, "HEAD", f"/models/{KEY}/manifest.json")[0] == 200
    assert sorted(p.as_posix() for p in (fan_out.tmp / "mirror").rglob("*")) == before


def test_the_mirror_server_listens_on_loopback_by_default(fan_out: FanOut) -> None:
    with MirrorServer(fan_out.tmp / "mirror", port=0) as server:
        assert server.address[0] == "127.0.0.1"


@pytest.fixture
def hub(repo_dir: Path) -> Iterator[StandInHub]:
    with StandInHub() as stand_in:
        stand_in.add_repo(MODEL_ID, repo_dir)
        yield stand_in


def origins(tmp: Path, hub: StandInHub) -> list[Any]:
    fleet = fleet_yaml(tmp / "fleet.yml", hub=hub.endpoint, mirror_url="http://ctl:8090")
    return weights_origins(load_fleet(fleet), "gpu")


def test_corrupted_file_from_the_hub_fails_naming_the_file(tmp_path: Path,
                                                          hub: StandInHub) -> None:
    hub.corrupt(MODEL_ID, WEIGHTS, "flip")
    fleet = fleet_yaml(tmp_path / "fleet.yml", hub=hub.endpoint, mirror_url="http://ctl:8090")
    # The client's own retries would only repeat the same bytes.
    proc = orchestrate(tmp_path, "mirror", "--hosts", "gpu", "-f", str(fleet),
                       MODELSCOPE_DOWNLOAD_MAX_RETRIES="0")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    message = " ".join(proc.stderr.split())
    staged = tmp_path / "mirror" / "models" / KEY
    assert f"{staged}/files/{WEIGHTS}: missing; the hub lists 700000 bytes" in message
    assert f"the client reported: - {WEIGHTS}:" in message and "Hash mismatch" in message
    assert not (staged / MANIFEST).exists()


def test_empty_file_from_the_hub_is_caught(tmp_path: Path, hub: StandInHub) -> None:
    # The "sha256 of an empty file" failure ModelScope users report.
    hub.corrupt(MODEL_ID, "config.json", "empty", times=None)
    with pytest.raises(MirrorError, match=r"files/config.json: missing; the hub lists 24 bytes"):
        stage_weights(origins(tmp_path, hub), tmp_path / "mirror", endpoint=hub.endpoint,
                      token=None, log=lambda _: None, retries=0)


def test_interrupted_transfer_resumes_and_counts_once(tmp_path: Path, repo_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The client gives up at once on the dropped connection; the mirror runs it again,
    # which resumes. A private repository: the token reaches the stand-in.
    monkeypatch.setenv("MODELSCOPE_DOWNLOAD_MAX_RETRIES", "0")
    logged: list[str] = []
    with StandInHub(token=TOKEN) as private:
        private.add_repo(MODEL_ID, repo_dir)
        private.cut_transfer(MODEL_ID, WEIGHTS, after_bytes=300_000)
        [staged] = stage_weights(origins(tmp_path, private), tmp_path / "mirror",
                                 endpoint=private.endpoint, token=TOKEN, log=logged.append,
                                 retry_delay=0)
        weights = [(s.range, s.status, s.bytes) for s in private.served if s.path == WEIGHTS]
        served = private.bytes_served()
    assert weights == [(None, 200, 300_000), ("bytes=300000-", 206, 400_000)]
    assert staged.origin_bytes == served == repo_bytes(repo_dir)
    assert any("running it again" in line for line in logged)
    assert not any(TOKEN in line for line in logged)
    assert not [p for p in (tmp_path / "mirror").rglob("*")
                if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_private_repository_without_token_fails_clearly(tmp_path: Path, repo_dir: Path) -> None:
    with StandInHub(token=TOKEN) as private:
        private.add_repo(MODEL_ID, repo_dir)
        with pytest.raises(MirrorError, match=r"HTTP 401 .*needs MODELSCOPE_API_TOKEN"):
            stage_weights(origins(tmp_path, private), tmp_path / "mirror",
                          endpoint=private.endpoint, token=None, log=lambda _: None)


def test_too_little_space_fails_before_downloading(tmp_path: Path, hub: StandInHub) -> None:
    with pytest.raises(MirrorError, match=r"not enough space for Qwen/Qwen2.5-0.5B-Instruct"
                                          r"@master in .*: 700\d+ bytes"):
        stage_weights(origins(tmp_path, hub), tmp_path / "mirror", endpoint=hub.endpoint,
                      token=None, log=lambda _: None, margin_bytes=2**62)
    assert not [s for s in hub.served if s.path]


def test_unreachable_hub_fails_in_one_line(tmp_path: Path) -> None:
    fleet = fleet_yaml(tmp_path / "fleet.yml", hub="http://127.0.0.1:9",
                       mirror_url="http://ctl:8090")
    proc = orchestrate(tmp_path, "mirror", "--hosts", "gpu", "-f", str(fleet))
    assert proc.returncode == 1
    assert "cannot reach http://127.0.0.1:9 for Qwen/Qwen2.5-0.5B-Instruct@master" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_damaged_local_model_dir_fails_naming_the_file(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text("{}\n")
    (local / MANIFEST).write_text(json.dumps({"files": {"config.json": {
        "size": 3, "sha256": hashlib.sha256(b"{}\n").hexdigest()}, "model.safetensors": {
        "size": 4, "sha256": "0" * 64}}}))
    fleet = fleet_yaml(tmp_path / "fleet.yml", hub="http://127.0.0.1:9",
                       mirror_url="http://ctl:8090", local_dir=local)
    [origin] = [o for o in weights_origins(load_fleet(fleet), "gpu") if o.source == "local"]
    with pytest.raises(MirrorError, match=rf"{local}/model.safetensors: missing"):
        stage_weights([origin], tmp_path / "mirror", endpoint="http://127.0.0.1:9",
                      token=None, log=lambda _: None)
    (local / "config.json").write_text("{ }\n")
    with pytest.raises(MirrorError, match=rf"{local}/config.json: 4 bytes, sha256 \w+; its "
                                          "manifest.json lists 3 bytes"):
        stage_weights([origin], tmp_path / "mirror", endpoint="http://127.0.0.1:9",
                      token=None, log=lambda _: None)


def test_weights_origins_stage_a_shared_model_once(tmp_path: Path, write: Any) -> None:
    fleet = write("fleet.yml", """
groups:
  a: {profile: cpu, hosts: {h1: {address: 10.0.0.1}}}
  b: {profile: cpu, hosts: {h2: {address: 10.0.0.2}}}
deployments:
  - {name: one, model: Qwen/Qwen2.5-0.5B-Instruct, engine: vllm, hosts: a, port: 8000}
  - {name: two, model: Qwen/Qwen2.5-0.5B-Instruct, engine: vllm, hosts: b, port: 8000}
  - {name: pinned, model: Qwen/Qwen2.5-0.5B-Instruct, revision: "v1.0/rc", engine: vllm,
     hosts: b, port: 8001}
  - {name: tagged, model: Qwen/Qwen2.5-0.5B-Instruct, engine: ollama, hosts: a, port: 11434}
""")
    loaded = load_fleet(fleet)
    assert [(o.key, o.deployments) for o in weights_origins(loaded, "all")] == [
        ("modelscope/Qwen/Qwen2.5-0.5B-Instruct/master", ("one", "two")),
        ("modelscope/Qwen/Qwen2.5-0.5B-Instruct/v1.0_rc", ("pinned",))]
    # Only what the chosen group's hosts serve.
    assert [o.deployments for o in weights_origins(loaded, "a")] == [("one",)]


@pytest.mark.parametrize(("text", "message"), [
    ("mirror: {url: http://ctl:8090, dri: /srv}", "mirror.dri: unknown key"),
    ("mirror: {url: ctl:8090}", "mirror.url: String should match pattern"),
    ("mirror: {dir: /srv/mirror}", "mirror.url: required key is missing"),
])
def test_mirror_settings_are_checked(write: Any, text: str, message: str) -> None:
    path = write("fleet.yml", text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_fleet(path)


def test_mirror_dir_is_relative_to_the_fleet_file(write: Any, tmp_path: Path) -> None:
    path = write("fleet.yml", "mirror: {url: 'http://ctl:8090', dir: mirror}\n")
    settings = load_fleet(path).fleet.mirror
    assert settings is not None and settings.dir == str(tmp_path / "mirror")


def test_listen_address(write: Any) -> None:
    settings = load_fleet(write("fleet.yml", "mirror: {url: 'http://ctl:9001/'}\n")).fleet.mirror
    # Loopback unless the operator names an address the hosts reach.
    assert parse_listen(None, settings) == ("127.0.0.1", 9001)
    assert parse_listen(None, None) == ("127.0.0.1", 8090)
    assert parse_listen(":8123", settings) == ("127.0.0.1", 8123)
    assert parse_listen("0.0.0.0:8123", settings) == ("0.0.0.0", 8123)
    assert parse_listen("127.0.0.1:8123", settings) == ("127.0.0.1", 8123)
    assert parse_listen("[::1]:8123", settings) == ("::1", 8123)
    with pytest.raises(ConfigError, match="--listen: 'ctl:http': expected"):
        parse_listen("ctl:http", settings)


def test_serve_command_serves_the_staged_mirror(tmp_path: Path, hub: StandInHub) -> None:
    fleet = fleet_yaml(tmp_path / "fleet.yml", hub=hub.endpoint, mirror_url="http://ctl:8090")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [str(BIN / "orchestrate"), "mirror", "--hosts", "gpu", "-f", str(fleet), "--serve",
         "--listen", f"127.0.0.1:{port}"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        # Ctrl-C as at a terminal: a suite started in the background by a shell (as CI
        # may be) ignores SIGINT, and its children would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url = f"http://127.0.0.1:{port}/models/{KEY}/files/{WEIGHTS}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                answer = httpx.get(url)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the mirror server did not answer"
                time.sleep(0.5)
        assert answer.status_code == 200 and len(answer.content) == 700_000
    finally:
        proc.send_signal(signal.SIGINT)
        errors = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0, errors
    # One line per request on stderr (wrapped at the console's width).
    assert f"127.0.0.1 200 700000 B /models/{KEY}/files/{WEIGHTS}" in " ".join(errors.split())
    assert "Traceback" not in errors


def test_pip_takes_wheels_from_the_mirror_servers_listing(tmp_path: Path) -> None:
    """docs/airgapped.md: hosts use <mirror.url>/wheels/ as pip find-links."""
    wheels = tmp_path / "mirror" / "wheels"
    wheels.mkdir(parents=True)
    info = "tinypkg-0.1.dist-info"
    with zipfile.ZipFile(wheels / "tinypkg-0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tinypkg/__init__.py", "")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                        "Root-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    with MirrorServer(tmp_path / "mirror", "127.0.0.1", 0) as server:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--isolated", "--no-index",
             "--find-links", f"http://127.0.0.1:{server.address[1]}/wheels/", "tinypkg==0.1",
             "--dest", str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "tinypkg-0.1-py3-none-any.whl").exists()


def flip_middle(path: Path) -> None:
    """Damage a file the way a bad disk or a hand edit does: same size, other bytes."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_staged_model_is_trusted_by_its_manifest_until_verify(
        tmp_path: Path, hub: StandInHub, repo_dir: Path) -> None:
    mirror = tmp_path / "mirror"
    [first] = stage_weights(origins(tmp_path, hub), mirror, endpoint=hub.endpoint, token=None,
                            log=lambda _: None)
    staged = mirror / "models" / KEY / "files" / WEIGHTS
    good = sha256(staged)
    flip_middle(staged)
    hub.reset_counters()
    # Without verify: nothing re-hashed, nothing fetched (up runs this on every run).
    [trusted] = stage_weights(origins(tmp_path, hub), mirror, endpoint=hub.endpoint,
                              token=None, log=lambda _: None)
    assert trusted.already_staged and trusted.origin_bytes == 0 and trusted.repaired == ()
    assert hub.bytes_served() == 0 and sha256(staged) != good
    # With verify: the damaged file named and fetched again, only that one, from the hub.
    logged: list[str] = []
    [verified] = stage_weights(origins(tmp_path, hub), mirror, endpoint=hub.endpoint,
                               token=None, log=logged.append, verify=True)
    assert verified.repaired == (WEIGHTS,) and not verified.already_staged
    assert verified.origin_bytes == hub.bytes_served() == 700_000
    assert sha256(staged) == good
    assert any(f"{staged}: differs from" in line for line in logged)
    assert json.loads((mirror / "models" / KEY / MANIFEST).read_text())["files"][WEIGHTS][
        "sha256"] == good
    assert first.origin_bytes == repo_bytes(repo_dir)


def test_verify_copies_a_damaged_local_model_again(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / WEIGHTS).write_bytes(os.urandom(10_000))
    fleet = fleet_yaml(tmp_path / "fleet.yml", hub="http://127.0.0.1:9",
                       mirror_url="http://ctl:8090", local_dir=local)
    [origin] = [o for o in weights_origins(load_fleet(fleet), "gpu") if o.source == "local"]
    mirror = tmp_path / "mirror"
    stage = lambda verify: stage_weights(  # noqa: E731
        [origin], mirror, endpoint="http://127.0.0.1:9", token=None, log=lambda _: None,
        verify=verify)
    stage(False)
    staged = mirror / "models" / origin.key / "files" / WEIGHTS
    flip_middle(staged)
    [clean] = stage(True)
    assert clean.repaired == (WEIGHTS,) and clean.origin_bytes == 10_000
    assert sha256(staged) == sha256(local / WEIGHTS)
    [again] = stage(True)  # an intact mirror: re-hashed, nothing fetched
    assert again.repaired == () and again.already_staged and again.origin_bytes == 0


def test_serving_counts_what_each_path_sent(tmp_path: Path) -> None:
    files = tmp_path / "mirror" / "models" / "m" / "files"
    files.mkdir(parents=True)
    (files / "a b.bin").write_bytes(b"x" * 1000)
    logged: list[str] = []
    with serving(tmp_path / "mirror", ("127.0.0.1", 0), logged.append) as traffic:
        base = f"http://127.0.0.1:{traffic.address[1]}/models/m"
        assert logged == [f"serving the mirror {tmp_path / 'mirror'} on "
                          f"127.0.0.1:{traffic.address[1]} for this run"]
        for _ in range(2):  # two hosts
            assert httpx.get(f"{base}/files/a%20b.bin").status_code == 200
        assert httpx.get(f"{base}/files/../files/absent").status_code == 404
    assert traffic.to_dict() == {"requests": 3, "bytes": 2000, "paths": {
        "/models/m/files/a b.bin": {"requests": 2, "ok": 2, "bytes": 2000},
        "/models/m/files/absent": {"requests": 1, "ok": 0, "bytes": 0}}}


def test_up_stages_first_and_a_bad_file_from_the_origin_stops_it_before_any_host(
        tmp_path: Path, hub: StandInHub) -> None:
    hub.corrupt(MODEL_ID, WEIGHTS, "flip", times=None)
    fleet = fleet_yaml(tmp_path / "fleet.yml", hub=hub.endpoint, mirror_url="http://ctl:8090")
    proc = orchestrate(tmp_path, "up", "--hosts", "gpu", "-f", str(fleet), "--no-gather",
                       MODELSCOPE_DOWNLOAD_MAX_RETRIES="0")
    assert proc.returncode == 1
    message = " ".join(proc.stderr.split())
    # `up` pinned master to the stand-in's commit first (orchestrator.mirror.pins).
    key = KEY.replace("/master", f"/{hub.commit(MODEL_ID)}")
    assert f"{tmp_path}/mirror/models/{key}/files/{WEIGHTS}: missing" in message
    assert "Hash mismatch" in message and "Traceback" not in message
    # Nothing rendered, no playbook ran, no host was touched: the run's record alone.
    assert not list((tmp_path / ".orchestrate").glob("runs/*/inventory"))


@pytest.mark.parametrize("listen", ["8090", "127.0.0.1:8090", "[::1]:8090", "ctl.lan:80"])
def test_mirror_listen_setting(write: Any, listen: str) -> None:
    text = f"mirror: {{url: 'http://ctl:8090', listen: '{listen}', stage: false}}\n"
    settings = load_fleet(write("fleet.yml", text)).fleet.mirror
    assert settings is not None and settings.listen == listen and settings.stage is False
    assert parse_listen(settings.listen, settings, key="mirror.listen")[1] in (8090, 80)


def test_mirror_listen_setting_is_checked(write: Any) -> None:
    with pytest.raises(ConfigError, match=r"mirror\.listen: String should match pattern"):
        load_fleet(write("fleet.yml", "mirror: {url: 'http://ctl:8090', listen: 'ctl:http'}\n"))
    with pytest.raises(ConfigError, match=r"mirror\.listen: '99999': expected"):
        parse_listen("99999", None, key="mirror.listen")


def test_the_sandbox_takes_its_model_through_the_mirror() -> None:
    loaded = sandbox_fleet.sandbox_fleet(Path("/k"), Path("/cache/tiny-qwen2"),
                                         mirror_dir=Path("/state/mirror"))
    settings = loaded.fleet.mirror
    assert settings is not None and settings.dir == "/state/mirror"
    # Served on the control machine's loopback, which the hosts see as 10.0.2.2.
    assert settings.listen == "127.0.0.1:18090" and settings.url == "http://10.0.2.2:18090"
    [origin] = weights_origins(loaded, "sandbox")
    assert origin.source == "local" and origin.local_dir == "/cache/tiny-qwen2"
    plan = make_plan(loaded, "sandbox", load_knowledge(), load_cuda_compat())
    entries = [e for h in plan.hosts for e in h.vars["model_weights_models"]]
    assert len(entries) == sandbox_fleet.HOST_COUNT
    assert {(e["source"], e["manifest_url"]) for e in entries} == {
        ("mirror", f"http://10.0.2.2:18090/models/{origin.key}/manifest.json")}


def test_up_stages_only_when_its_run_changes_hosts_weights(write: Any) -> None:
    # An unreachable hub: any staging attempt would fail, so [] proves none was made.
    def plan_of(extra: dict[str, Any], stages: tuple[str, ...]) -> tuple[Any, Any]:
        loaded = load_fleet(write("fleet.yml", yaml.safe_dump({
            "mirror": {"url": "http://ctl:8090", "dir": "mirror",
                       "modelscope_endpoint": "http://127.0.0.1:9", **extra},
            "groups": {"gpu": {"profile": "cpu", "hosts": {"h": {"address": "10.0.0.1"}}}},
            "deployments": [{"name": "q", "model": MODEL_ID, "engine": "vllm",
                             "hosts": "gpu", "port": 8000, "options": {"open": True}}]})))
        return loaded, make_plan(loaded, "gpu", load_knowledge(), load_cuda_compat(), stages)

    def stage(loaded: Any, plan: Any, check: bool) -> list[Any]:
        return stage_for_up(loaded, "gpu", plan, check=check, state_dir=Path(".orchestrate"),
                            log=lambda _: None)

    loaded, plan = plan_of({"stage": False}, ("models",))
    assert stage(loaded, plan, check=False) == []
    loaded, plan = plan_of({}, ("services", "verify"))
    assert stage(loaded, plan, check=False) == []
    loaded, plan = plan_of({}, ("models",))
    assert stage(loaded, plan, check=True) == []
    with pytest.raises(MirrorError, match=r"cannot reach http://127\.0\.0\.1:9"):
        stage(loaded, plan, check=False)
