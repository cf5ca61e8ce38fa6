"""What the sandbox end-to-end modules share: the sandbox's fixed names and ports, running
`orchestrate` and ssh against it, and judging probe reports. The session-scoped `sandbox`
fixture (tests/e2e/conftest.py) brings the sandbox up once for every module."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")
STATE = Path(".orchestrate/sandbox")
HOSTS = ("sandbox-1", "sandbox-2")
SSH_PORTS = {"sandbox-1": 2221, "sandbox-2": 2222}
HEALTH = {"sandbox-1": "http://127.0.0.1:18000/health", "sandbox-2": "http://127.0.0.1:18001/health"}
VLLM = "tiny-qwen2"
UNIT = f"vllm@{VLLM}"
# The second engine on every host: the Ollama STAND-IN (the real Ollama cannot be
# downloaded here), installed by the ollama role from a release archive built locally.
OLLAMA = "qwen-ollama"
OLLAMA_UNIT = "ollama"
OLLAMA_TAGS = "http://127.0.0.1:21434/api/tags"
WEIGHTS = "/var/lib/qwen-serve/models/tiny-qwen2"
DAMAGED = "model.safetensors"

# What `up` probes on every host, by group: probe -> expected status.
HOST_PROBES = {"stack": "pass", "weights": "pass", "service": "pass", "listening": "pass",
               "gpu": "skip", "gpu_health": "skip"}
HEALTH_PROBES = {"health": "pass", "models": "pass", "api_key": "pass"}
CHAT_PROBES = {"chat": "pass", "tool_call": "pass"}
STREAM_PROBES = {"chat_stream": "pass"}
OLLAMA_PROBES = {"version": "pass", "tags": "pass", "ollama_generate": "pass",
                 "ollama_chat": "pass"}


@dataclass(frozen=True)
class Ran:
    """One `orchestrate` command and what it printed."""

    args: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError:
            pytest.fail(f"`orchestrate {' '.join(self.args)}` (exit {self.rc}) printed no "
                        f"JSON; stdout: {self.stdout[-1500:]!r}; stderr: {self.stderr[-3000:]}")

    def tail(self) -> str:
        return f"`orchestrate {' '.join(self.args)}` exit {self.rc}: {self.stderr[-3000:]}"


@dataclass(frozen=True)
class Sandbox:
    cwd: Path
    env: dict[str, str]
    up: Ran
    result: dict[str, Any]  # up's JSON


def orchestrate(cwd: Path, env: dict[str, str], *args: str) -> Ran:
    proc = subprocess.run([ORCHESTRATE, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False)
    print(f"$ orchestrate {' '.join(args)}  (exit {proc.returncode})\n{proc.stdout}\n"
          f"{proc.stderr}")
    return Ran(args, proc.returncode, proc.stdout, proc.stderr)


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


def file_downloads(mirror: dict[str, Any], model: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(answered requests, bytes) the mirror server sent of each of the model's files."""
    prefix = f"/models/{model['key']}/files/"
    return {path.removeprefix(prefix): (seen["ok"], seen["bytes"])
            for path, seen in mirror["served"]["paths"].items() if path.startswith(prefix)}


def judge(report: dict[str, Any], expected: dict[str, str],
          deployment: str | None = None) -> None:
    """Every host ran every probe of `expected` (of `deployment`, when given), each with
    its expected status; a mismatch is shown with its evidence."""
    results = [r for r in report["results"] if r["probe"] in expected
               and (deployment is None or r["deployment"] == deployment)]
    ran = {(r["host"], r["probe"]) for r in results}
    assert ran >= {(h, p) for h in HOSTS for p in expected}, f"ran only {sorted(ran)}"
    wrong = [f"{r['host']}/{r['deployment']} {r['probe']}: {r['status']}, expected "
             f"{expected[r['probe']]}: {r['evidence']} (next: {r['next_step']})"
             for r in results if r["status"] != expected[r["probe"]]]
    assert not wrong, "\n".join(wrong)
