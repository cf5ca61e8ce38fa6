"""The sandbox's second engine: an Ollama deployment on every sandbox host, installed from
the Ollama STAND-IN (orchestrator/sandbox/ollama_standin.py) packed as a release archive, because
the real Ollama cannot be downloaded here. Checked: the archive (layout, checksum,
reproducible), the plan the sandbox fleet gives (both deployments, the role's archive
inputs, the published port), and that the probes pass against the running stand-in while
saying it is one."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.plan.planner import HostPlan, Plan, make_plan
from orchestrator.report import console as report
from orchestrator.sandbox import fleet as sandbox_fleet
from orchestrator.sandbox import hosts as sandbox
from orchestrator.sandbox import ollama_standin
from orchestrator.sandbox.fleet import OllamaRelease
from orchestrator.sandbox.ollama_standin_release import make_release
from orchestrator.verify.httpprobe import is_standin, probe_plan

RELEASE = OllamaRelease(Path("/cache/ollama-standin/v0.32.7/ollama-linux-amd64.tar.zst"),
                        "ab" * 32, "amd64")


def sandbox_plan(release: OllamaRelease | None = RELEASE) -> Plan:
    return make_plan(sandbox_fleet.sandbox_fleet(Path("/k"), Path("/m"), None, release),
                     "sandbox",
                     load_knowledge(), load_cuda_compat())


def unpacked(archive: Path) -> dict[str, tarfile.TarInfo]:
    data = subprocess.run(["zstd", "-d", "-c", str(archive)], capture_output=True,
                          check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {member.name: member for member in tar.getmembers()}


def test_release_has_the_real_layout_and_its_checksum(tmp_path: Path) -> None:
    archive, sha256 = make_release(tmp_path, "0.32.7", "amd64")
    assert archive == tmp_path / "v0.32.7" / "ollama-linux-amd64.tar.zst"
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == sha256
    assert (tmp_path / "v0.32.7" / "sha256sum.txt").read_text() == \
        f"{sha256}  ollama-linux-amd64.tar.zst\n"
    members = unpacked(archive)
    assert members["./bin/ollama"].mode == 0o755 and members["./lib/ollama"].isdir()
    # Reproducible: the same content packs to the same checksum, so a second `up` finds
    # the installed version's marker matching and installs nothing.
    assert make_release(tmp_path / "again", "0.32.7", "amd64")[1] == sha256


def test_release_of_another_version_carries_it_and_old_ones_are_tgz(tmp_path: Path) -> None:
    archive, _ = make_release(tmp_path, "0.13.5", "arm64")
    assert archive.name == "ollama-linux-arm64.tgz"
    with tarfile.open(archive) as tar:
        source = tar.extractfile("./bin/ollama").read().decode()  # type: ignore[union-attr]
    assert '\nVERSION = "0.13.5"\n' in source and "STAND-IN" in source


def test_sandbox_release_is_built_in_the_cache(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    release = sandbox_fleet.sandbox_ollama_release()
    assert release.archive.is_relative_to(tmp_path / "orchestrate" / "ollama-standin")
    assert release.archive.name == f"ollama-linux-{release.arch}.tar.zst"
    assert hashlib.sha256(release.archive.read_bytes()).hexdigest() == release.sha256


def test_sandbox_plans_vllm_and_ollama_on_every_host() -> None:
    plan = sandbox_plan()
    assert [h.name for h in plan.hosts] == ["sandbox-1", "sandbox-2"]
    for index, host in enumerate(plan.hosts):
        assert [(p.deployment, p.engine) for p in host.probes] == [
            ("tiny-qwen2", "vllm"), ("qwen-ollama", "ollama")]
        ollama = host.probes[1]
        # Published on the control machine's loopback, 21434 + host index.
        assert ollama.base_url == f"http://127.0.0.1:{21434 + index}"
        assert ollama.served_model_name == "qwen2.5:0.5b" and not ollama.loopback_only
        assert host.vars["ollama_models"] == [{"name": "qwen2.5:0.5b"}]
        # Every interface of the container: the published port arrives on its network
        # interface, not on its loopback.
        assert (host.vars["ollama_host"], host.vars["ollama_port"]) == ("0.0.0.0", 11434)
        # The role's archive path: a control-machine file, installed only against its sha256.
        assert host.vars["ollama_archive_src"] == str(RELEASE.archive)
        assert host.vars["ollama_archive_sha256"] == {"amd64": "ab" * 32}
        assert host.vars["ollama_version"] == ollama_standin.VERSION
        assert host.vars["ollama_device_allow"] == [] and host.vars["ollama_gpu_devices"] == []
        assert [d["name"] for d in host.vars["vllm_deployments"]] == ["tiny-qwen2"]
        assert any(r.startswith("qwen-ollama: Ollama serves qwen2.5:0.5b") for r in host.reasons)


def test_sandbox_without_a_release_plans_vllm_only() -> None:
    host = sandbox_plan(None).hosts[0]
    assert [p.engine for p in host.probes] == ["vllm"]
    assert not any(key.startswith("ollama_") for key in host.vars)


def test_sandbox_publishes_both_service_ports_without_collisions() -> None:
    hosts = sandbox._plan_hosts(sandbox_fleet.HOST_COUNT, sandbox_fleet.SSH_BASE_PORT,
                                [sandbox_fleet.VLLM_PORT, sandbox_fleet.OLLAMA_PORT])
    for index, host in enumerate(hosts, start=1):
        assert host.port_map == {
            port: sandbox_fleet.published_port(index, port)
            for port in (sandbox_fleet.VLLM_PORT, sandbox_fleet.OLLAMA_PORT)}


def test_plan_table_lists_the_ollama_deployment() -> None:
    console = Console(record=True, width=300)
    report.plan_table(sandbox_plan(), console)
    text = console.export_text()
    assert text.count("qwen-ollama: ollama qwen2.5:0.5b on 0.0.0.0:11434") == 2
    assert text.count("tiny-qwen2: vllm --model") == 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[str]:
    """The stand-in server as the sandbox runs it (`ollama serve`), with the sandbox's model
    pulled; its base URL."""
    port = free_port()
    env = {**os.environ, "OLLAMA_HOST": f"0.0.0.0:{port}",
           "OLLAMA_MODELS": str(tmp_path / "models"), "HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, ollama_standin.__file__, "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/api/version", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        pulled = subprocess.run([sys.executable, ollama_standin.__file__, "pull",
                                 "qwen2.5:0.5b"], env=env, capture_output=True, text=True,
                                check=False)
        assert pulled.returncode == 0, pulled.stderr
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_ollama_probes_pass_on_the_standin_and_say_it_is_one(standin: str) -> None:
    target = sandbox_plan().hosts[0].probes[1].model_copy(update={"base_url": standin})
    plan = Plan(group="sandbox", stages=["verify"], hosts=[HostPlan(
        name="sandbox-1", group="sandbox", profile="cpu", connection={}, vars={},
        reasons=[], probes=[target])])
    results = probe_plan(plan).results
    assert [(r.probe, r.status) for r in results] == [
        ("version", "pass"), ("tags", "pass"), ("ollama_generate", "pass"),
        ("ollama_chat", "pass")]
    assert "the Ollama STAND-IN, not the real Ollama" in results[0].evidence
    assert "Stand-in answer" in results[3].evidence


def test_the_probe_knows_the_standin_only_by_its_server_header() -> None:
    """The verify layer does not import the stand-in: the stand-in's Server header carries
    the mark the probe looks for, and the real Ollama sends no Server header."""
    assert is_standin(f"{ollama_standin.SERVER_NAME}/{ollama_standin.VERSION}")
    assert not is_standin("")
    assert not is_standin("uvicorn")
