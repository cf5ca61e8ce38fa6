"""The sandbox end to end, through the real CLI: up -> every probe passes (SSH and HTTP) ->
the API key is nowhere in clear -> up again changes nothing -> bench -> kill -9 of vLLM
is healed by systemd -> a stopped service and a corrupted weights file fail their host's
probes only, with the next step -> the playbooks heal it -> down."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from orchestrator import sandbox
from orchestrator.vault import load_secrets

ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")
STATE = Path(".orchestrate/sandbox")
HOSTS = ("sandbox-1", "sandbox-2")
SSH_PORTS = {"sandbox-1": 2221, "sandbox-2": 2222}
HEALTH = {"sandbox-1": "http://127.0.0.1:18000/health", "sandbox-2": "http://127.0.0.1:18001/health"}
UNIT = "vllm@tiny-qwen2"
WEIGHTS = "/var/lib/qwen-serve/models/tiny-qwen2"


def orchestrate(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([ORCHESTRATE, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False)
    print(f"$ orchestrate {' '.join(args)}  (exit {proc.returncode})\n{proc.stdout}\n"
          f"{proc.stderr}")
    return proc


def ssh(cwd: Path, host: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(cwd / STATE / "id_ed25519"), "-p", str(SSH_PORTS[host]),
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "root@127.0.0.1",
         command],
        capture_output=True, text=True, check=False, timeout=60)


def unit_state(cwd: Path, host: str, unit: str) -> dict[str, str]:
    out = ssh(cwd, host, f"systemctl show -p MainPID,NRestarts,ActiveState {unit}").stdout
    return dict(line.split("=", 1) for line in out.split())


def wait_healthy(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(3)
    return False


def statuses(report: dict) -> dict[tuple[str, str], str]:
    return {(r["host"], r["probe"]): r["status"] for r in report["results"]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, artifacts_env: dict[str, str]):
    cwd = tmp_path_factory.mktemp("sandbox")
    yield cwd
    orchestrate(cwd, artifacts_env, "down", "--hosts", "sandbox")


@pytest.mark.e2e
def test_sandbox_up_probe_rerun_bench_break_heal_down(workdir: Path,
                                                      artifacts_env: dict[str, str]) -> None:
    env = artifacts_env
    first = orchestrate(workdir, env, "up", "--hosts", "sandbox", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)
    assert result["ansible"]["failures"] == []
    expected = {"stack": "pass", "weights": "pass", "service": "pass", "listening": "pass",
                "gpu": "skip", "gpu_health": "skip", "health": "pass", "models": "pass",
                "api_key": "pass", "chat": "pass", "chat_stream": "pass", "tool_call": "pass"}
    assert statuses(result["probes"]) == {(h, p): s for h in HOSTS for p, s in expected.items()}
    chat = [p for p in result["probes"]["results"] if p["probe"] == "chat"]
    assert all("answer=" in p["evidence"] and "answer=''" not in p["evidence"] for p in chat)
    assert (Path(result["run_dir"]) / "report.html").is_file()

    # The API key is enforced (api_key probe above) and appears in no process list,
    # journal or run artifact.
    key = load_secrets(workdir / STATE / "secrets.yml",
                       workdir / STATE / "vault-password")["vault_sandbox_api_key"]
    for host in HOSTS:
        seen = ssh(workdir, host, f"ps -eo args; journalctl -u {UNIT} --no-pager")
        assert seen.returncode == 0 and "--api-key" not in seen.stdout
        assert key not in seen.stdout
    artifacts = [p for p in (workdir / ".orchestrate" / "runs").rglob("*") if p.is_file()]
    assert artifacts and not [p for p in artifacts if key in p.read_text(errors="replace")]

    # A second run on a running sandbox converges with nothing to change.
    second = orchestrate(workdir, env, "up", "--hosts", "sandbox", "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout)["ansible"]["changed"] == 0

    bench = orchestrate(workdir, env, "bench", "--hosts", "sandbox", "--concurrency", "1,4",
                        "--requests", "8", "--input-tokens", "32", "--output-tokens", "16",
                        "--json")
    assert bench.returncode == 0, bench.stderr[-3000:]
    measured = json.loads(bench.stdout)
    levels = [lv for d in measured["bench"]["deployments"] for lv in d["levels"]]
    assert [lv["concurrency"] for lv in levels] == [1, 4, 1, 4]
    assert all(lv["errors"] == 0 and lv["output_tokens_per_s"] > 0
               and lv["tokens_from"] == "usage" for lv in levels)
    assert Path(measured["report"]).read_text().count("<svg") >= 2

    # kill -9 of vLLM's main process: systemd restarts it and it serves again.
    before = unit_state(workdir, "sandbox-1", UNIT)
    assert ssh(workdir, "sandbox-1", f"kill -9 {before['MainPID']}").returncode == 0
    assert wait_healthy(HEALTH["sandbox-1"], 240)
    after = unit_state(workdir, "sandbox-1", UNIT)
    assert after["ActiveState"] == "active" and after["MainPID"] != before["MainPID"]
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1

    # Break sandbox-2 twice over: its probes fail with next steps, sandbox-1 still passes.
    assert ssh(workdir, "sandbox-2", f"systemctl stop {UNIT}").returncode == 0
    assert ssh(workdir, "sandbox-2", f"truncate -s 100 {WEIGHTS}/config.json").returncode == 0
    broken = orchestrate(workdir, env, "probe", "--hosts", "sandbox", "--json")
    assert broken.returncode == 1
    report = json.loads(broken.stdout)
    failed = {r["probe"]: r for r in report["results"] if r["status"] == "fail"}
    assert {r["host"] for r in report["results"] if r["status"] == "fail"} == {"sandbox-2"}
    assert f"journalctl -u {UNIT}" in failed["service"]["next_step"]
    assert "config.json" in failed["weights"]["evidence"]
    assert failed["weights"]["next_step"]
    assert "Traceback" not in broken.stdout + broken.stderr

    # The playbooks bring it back.
    healed = orchestrate(workdir, env, "up", "--hosts", "sandbox", "--only", "models",
                         "--only", "services", "--only", "verify")
    assert healed.returncode == 0, healed.stderr[-3000:]

    down = orchestrate(workdir, env, "down", "--hosts", "sandbox")
    assert down.returncode == 0
    assert not [name for name, _ in sandbox.status()]
    assert not (workdir / ".orchestrate" / "sandbox").exists()
