"""The sandbox end to end, through the real CLI: up (the model fetched once into the control
machine's mirror and fanned out from it) -> every probe passes (SSH and HTTP) -> the API key
is nowhere in clear -> up again changes nothing and takes nothing from the origin -> bench ->
kill -9 of vLLM is healed by systemd -> a stopped service and a corrupted weights file fail
their host's probes only, with the next step -> a re-imaged host fetching a file the mirror
holds damaged fails naming it -> `mirror --verify` repairs it -> the playbooks heal -> down."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from orchestrator.config.vault import load_secrets
from orchestrator.sandbox import hosts as sandbox

ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")
STATE = Path(".orchestrate/sandbox")
HOSTS = ("sandbox-1", "sandbox-2")
SSH_PORTS = {"sandbox-1": 2221, "sandbox-2": 2222}
HEALTH = {"sandbox-1": "http://127.0.0.1:18000/health", "sandbox-2": "http://127.0.0.1:18001/health"}
UNIT = "vllm@tiny-qwen2"
# The second engine on every host: the Ollama STAND-IN (the real Ollama cannot be
# downloaded here), installed by the ollama role from a release archive built locally.
OLLAMA_UNIT = "ollama"
OLLAMA_TAGS = "http://127.0.0.1:21434/api/tags"
WEIGHTS = "/var/lib/qwen-serve/models/tiny-qwen2"
DAMAGED = "model.safetensors"


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


def file_downloads(mirror: dict, model: dict) -> dict[str, tuple[int, int]]:
    """(answered requests, bytes) the mirror server sent of each of the model's files."""
    prefix = f"/models/{model['key']}/files/"
    return {path.removeprefix(prefix): (seen["ok"], seen["bytes"])
            for path, seen in mirror["served"]["paths"].items() if path.startswith(prefix)}


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
                "api_key": "pass", "chat": "pass", "chat_stream": "pass", "tool_call": "pass",
                "version": "pass", "tags": "pass", "ollama_generate": "pass",
                "ollama_chat": "pass"}
    assert statuses(result["probes"]) == {(h, p): s for h in HOSTS for p, s in expected.items()}
    # The Ollama deployment on both hosts, over SSH (unit, port) and HTTP; the report says
    # the Ollama is the stand-in.
    ollama = {(r["host"], r["probe"]): r["status"] for r in result["probes"]["results"]
              if r["deployment"] == "qwen-ollama"}
    assert ollama == {(h, p): "pass" for h in HOSTS for p in (
        "service", "listening", "version", "tags", "ollama_generate", "ollama_chat")}
    versions = [r for r in result["probes"]["results"] if r["probe"] == "version"]
    assert len(versions) == 2 and all("Ollama STAND-IN" in r["evidence"] for r in versions)
    chat = [p for p in result["probes"]["results"] if p["probe"] == "chat"]
    assert all("answer=" in p["evidence"] and "answer=''" not in p["evidence"] for p in chat)
    assert (Path(result["run_dir"]) / "report.html").is_file()

    # Fetch once, fan out: `up` staged the model from its origin (the locally generated
    # model_dir) into the control machine's mirror once, its size in bytes, and each host
    # fetched each file from the mirror server that `up` ran on loopback for the run.
    mirror = result["mirror"]
    [model] = mirror["models"]
    assert model["origin_bytes"] == model["total_bytes"] == mirror["origin_bytes"] > 0
    assert not model["already_staged"]
    files = json.loads((Path(model["path"]) / "manifest.json").read_text())["files"]
    assert file_downloads(mirror, model) == {
        name: (len(HOSTS), len(HOSTS) * entry["size"]) for name, entry in files.items()}

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
    rerun = json.loads(second.stdout)
    assert rerun["ansible"]["changed"] == 0
    # ... and takes nothing from the origin, nor any model file from the mirror.
    assert rerun["mirror"]["origin_bytes"] == 0 and rerun["mirror"]["models"][0]["already_staged"]
    assert not [n for n, (_, sent) in file_downloads(rerun["mirror"], model).items() if sent]

    # vLLM only: the sandbox's Ollama is a stand-in that runs no model, nothing to measure.
    bench = orchestrate(workdir, env, "bench", "--hosts", "sandbox", "--deployment", "tiny-qwen2",
                        "--concurrency", "1,4",
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

    # Restarting one engine's unit leaves the other's process alone.
    vllm_before = unit_state(workdir, "sandbox-1", UNIT)
    ollama_before = unit_state(workdir, "sandbox-1", OLLAMA_UNIT)
    assert ssh(workdir, "sandbox-1", f"systemctl restart {OLLAMA_UNIT}").returncode == 0
    ollama_after = unit_state(workdir, "sandbox-1", OLLAMA_UNIT)
    assert ollama_after["ActiveState"] == "active"
    assert ollama_after["MainPID"] != ollama_before["MainPID"]
    vllm_after = unit_state(workdir, "sandbox-1", UNIT)
    assert (vllm_after["MainPID"], vllm_after["NRestarts"]) == (vllm_before["MainPID"],
                                                                vllm_before["NRestarts"])
    assert "qwen2.5:0.5b" in httpx.get(OLLAMA_TAGS, timeout=10).text
    assert ssh(workdir, "sandbox-1", f"systemctl restart {UNIT}").returncode == 0
    assert unit_state(workdir, "sandbox-1", OLLAMA_UNIT)["MainPID"] == ollama_after["MainPID"]
    assert wait_healthy(HEALTH["sandbox-1"], 240)
    restarted = unit_state(workdir, "sandbox-1", UNIT)
    assert restarted["ActiveState"] == "active" and restarted["MainPID"] != vllm_after["MainPID"]

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

    # sandbox-2 is re-imaged (its model gone) while the mirror's staged copy of one file is
    # damaged, same size: `up` trusts a staged model's manifest (no re-hash of the weights on
    # every run), so sandbox-2 fails fetching that file, by name, with the sha256 mismatch
    # and the next step; sandbox-1, complete, is untouched.
    assert ssh(workdir, "sandbox-2", f"rm -rf {WEIGHTS}").returncode == 0
    staged = Path(model["path"]) / "files" / DAMAGED
    data = bytearray(staged.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = bytes(b ^ 0xFF for b in
                                                     data[len(data) // 2:len(data) // 2 + 16])
    staged.write_bytes(bytes(data))
    reimaged = orchestrate(workdir, env, "up", "--hosts", "sandbox", "--only", "models",
                           "--json")
    assert reimaged.returncode == 1
    failures = json.loads(reimaged.stdout)["ansible"]["failures"]
    assert {f["host"] for f in failures} == {"sandbox-2"}
    assert [f for f in failures if f"{WEIGHTS}/{DAMAGED} from http://" in f["message"]
            and "sha256 checksum did not match" in f["message"]
            and "orchestrate mirror --verify" in f["message"]], failures

    # The operator's fix: re-hash the staged files, fetch the damaged one from the origin.
    verified = orchestrate(workdir, env, "mirror", "--hosts", "sandbox", "--verify", "--json")
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert json.loads(verified.stdout)["models"][0]["repaired"] == [DAMAGED]
    assert hashlib.sha256(staged.read_bytes()).hexdigest() == files[DAMAGED]["sha256"]

    # The playbooks bring it back: sandbox-2 fetches from the mirror what it still lacks.
    healed = orchestrate(workdir, env, "up", "--hosts", "sandbox", "--only", "models",
                         "--only", "services", "--only", "verify", "--json")
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert file_downloads(json.loads(healed.stdout)["mirror"], model)[DAMAGED] == (
        1, files[DAMAGED]["size"])

    down = orchestrate(workdir, env, "down", "--hosts", "sandbox")
    assert down.returncode == 0
    assert not [name for name, _ in sandbox.status()]
    assert not (workdir / ".orchestrate" / "sandbox").exists()
