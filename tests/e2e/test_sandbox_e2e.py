"""The sandbox end to end, through the real CLI: up -> probes pass -> up again changes
nothing -> a stopped service fails its host's probes only -> down."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import sandbox

ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")
KEY = Path(".orchestrate/sandbox/id_ed25519")


def orchestrate(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([ORCHESTRATE, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False)
    print(f"$ orchestrate {' '.join(args)}  (exit {proc.returncode})\n{proc.stdout}\n"
          f"{proc.stderr}")
    return proc


def ssh(cwd: Path, port: int, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(cwd / KEY), "-p", str(port), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "LogLevel=ERROR", "root@127.0.0.1", command],
        capture_output=True, text=True, check=False, timeout=60)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, artifacts_env: dict[str, str]):
    cwd = tmp_path_factory.mktemp("sandbox")
    yield cwd
    orchestrate(cwd, artifacts_env, "down", "--hosts", "sandbox")


@pytest.mark.e2e
def test_sandbox_up_probe_rerun_break_down(workdir: Path, artifacts_env: dict[str, str]) -> None:
    env = artifacts_env
    first = orchestrate(workdir, env, "up", "--hosts", "sandbox", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)
    assert result["ansible"]["failures"] == []
    probes = result["probes"]["results"]
    assert {(p["host"], p["probe"]) for p in probes if p["passed"]} == {
        (h, p) for h in ("sandbox-1", "sandbox-2")
        for p in ("health", "models", "api_key", "chat", "chat_stream", "tool_call")}
    chat = [p for p in probes if p["probe"] == "chat"]
    assert all("answer=" in p["evidence"] and "answer=''" not in p["evidence"] for p in chat)

    # A second run on a running sandbox converges with nothing to change.
    second = orchestrate(workdir, env, "up", "--hosts", "sandbox", "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout)["ansible"]["changed"] == 0

    # Break one host: its probes fail with a next step, the other host still passes.
    assert ssh(workdir, 2222, "systemctl stop vllm@tiny-qwen2").returncode == 0
    broken = orchestrate(workdir, env, "probe", "--hosts", "sandbox", "--json")
    assert broken.returncode == 1
    report = json.loads(broken.stdout)
    failed = [r for r in report["results"] if not r["passed"]]
    assert {r["host"] for r in failed} == {"sandbox-2"}
    assert "journalctl -u vllm@tiny-qwen2" in failed[0]["next_step"]
    assert all(r["passed"] for r in report["results"] if r["host"] == "sandbox-1")

    # The playbooks bring it back.
    healed = orchestrate(workdir, env, "up", "--hosts", "sandbox", "--only", "services",
                         "--only", "verify")
    assert healed.returncode == 0, healed.stderr[-3000:]

    down = orchestrate(workdir, env, "down", "--hosts", "sandbox")
    assert down.returncode == 0
    assert not [name for name, _ in sandbox.status()]
    assert not (workdir / ".orchestrate" / "sandbox").exists()

