"""The workflow layer (orchestrator/workflows) and the contract of `--json`.

* Every command's `--json` output, from the real `orchestrate` (a child process, as an
  operator's script runs it), is checked against the JSON Schema `orchestrate schema` prints
  for it, and read back into its result model; docs/json.md is the one the models make.
* Hosts and engines are network-free stand-ins on loopback, each named so: an HTTP server
  answering as vLLM's OpenAI server and Ollama's API do (no model behind it), a fleet host
  whose SSH port nothing listens on (so `facts`, `plan` and `up` gather from an unreachable
  host for real, and `up` and the SSH probes meet it too), and for `status` the collector's
  evidence as test_hostprobe.py records it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import TypeAdapter
from typer.testing import CliRunner

from orchestrator import cli
from orchestrator.config.fleet import load_fleet
from orchestrator.errors import ConfigError
from orchestrator.plan.planner import HostPlan, Plan
from orchestrator.verify import hostcollect
from orchestrator.verify.hostprobe import CollectError
from orchestrator.verify.liveness import units_config
from orchestrator.workflows import schemas
from orchestrator.workflows.common import (
    NO_FACTS,
    Events,
    Target,
    load,
    no_fleet_given,
    plan_for,
)
from orchestrator.workflows.runs import last_run
from orchestrator.workflows.status import StatusOptions, StatusResult, status
from orchestrator.workflows.up import UpOptions, up

REPO = Path(__file__).resolve().parents[2]
ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")
SMI = REPO / "tests" / "data" / "nvidia-smi"
SERVED = "chat-model"
OLLAMA_TAG = "qwen2.5:0.5b"  # the catalog's tag of Qwen/Qwen2.5-0.5B-Instruct
CLOSED_PORT = 9  # discard: nothing listens on it here


# --- a STAND-IN engine on loopback: vLLM's OpenAI routes and Ollama's, no model ---------------

class _Engine(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, data: object) -> None:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        answers: dict[str, object] = {
            "/health": b"", "/v1/models": {"data": [{"id": SERVED}]},
            "/api/version": {"version": "0.0.0"}, "/api/tags": {"models": [{"name": OLLAMA_TAG}]}}
        if self.path in answers:
            self._send(answers[self.path])
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/generate":
            self._send({"response": "hello", "done": True, "done_reason": "stop"})
        elif self.path == "/api/chat":
            self._send({"message": {"role": "assistant", "content": "hello"}, "done": True})
        elif not body.get("stream"):
            self._send({"choices": [{"message": {"content": "hello"},
                                     "finish_reason": "stop"}]})
        else:
            tokens = int(body.get("max_tokens") or 1)
            events = [{"choices": [{"delta": {"content": f" w{i}"},
                                    "finish_reason": "length" if i == tokens - 1 else None}]}
                      for i in range(tokens)]
            if (body.get("stream_options") or {}).get("include_usage"):
                events.append({"choices": [], "usage": {"prompt_tokens": 4,
                                                        "completion_tokens": tokens}})
            # Chunked, one event a chunk, as vLLM streams.
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for data in [*(f"data: {json.dumps(e)}\n\n".encode() for e in events),
                         b"data: [DONE]\n\n"]:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[int, int]]:
    """Two stand-ins' ports: one for the vLLM deployment, one for the Ollama one."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Engine) for _ in range(2)]
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(servers[0].server_address[1]), int(servers[1].server_address[1])
    for server in servers:
        server.shutdown()
        server.server_close()


def write_fleet(path: Path, port: int, ollama_port: int | None = None,
                model_dir: Path | None = None) -> Path:
    """Group g: one host whose SSH port is closed; vLLM `chat` on `port`, and Ollama on
    `ollama_port` where given (bound to every address, so probed over HTTP too)."""
    deployments: list[dict[str, Any]] = [{
        "name": "chat", "model": "Qwen/Qwen2.5-0.5B-Instruct", "engine": "vllm", "hosts": "g",
        "port": port, "served_model_name": SERVED, "options": {"open": True},
        **({"model_dir": str(model_dir)} if model_dir else {})}]
    if ollama_port is not None:
        deployments.append({"name": "chat-ollama", "model": "Qwen/Qwen2.5-0.5B-Instruct",
                            "engine": "ollama", "hosts": "g", "port": ollama_port,
                            "options": {"bind_address": "0.0.0.0", "open": True}})
    path.write_text(yaml.safe_dump({
        "groups": {"g": {"profile": "cpu", "hosts": {"h": {"address": "127.0.0.1",
                                                          "ssh_port": CLOSED_PORT}}}},
        "deployments": deployments}))
    return path


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ORCHESTRATE, *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=300, env={**os.environ, "COLUMNS": "200"})


# --- every command's --json against its schema --------------------------------------------

# (command, its arguments, the exit code it must end with); {fleet} and {mirror_fleet} are
# filled in. Each command's --json runs at least once, refusals included.
CASES: list[tuple[str, list[str], int]] = [
    ("init", ["--fleet", "new-fleet.yml"], 0),
    ("facts", ["--hosts", "g", "-f", "{fleet}"], 1),  # unreachable host, reported
    ("plan", ["--hosts", "g", "-f", "{fleet}"], 0),  # gathers first: planned from fleet.yml
    ("plan", ["--hosts", "g", "-f", "{fleet}", "--no-gather"], 0),
    ("up", ["--hosts", "g", "-f", "{fleet}", "--only", "preflight"], 1),  # unreachable host
    ("probe", ["--hosts", "g", "-f", "{fleet}", "--no-ssh"], 0),
    ("probe", ["--hosts", "g", "-f", "{fleet}"], 1),  # SSH: nothing listens
    ("bench", ["--hosts", "g", "-f", "{fleet}", "--deployment", "chat", "--concurrency", "1",
               "--requests", "2", "--input-tokens", "4", "--output-tokens", "3"], 0),
    ("mirror", ["--hosts", "g", "-f", "{mirror_fleet}", "--no-wheels", "--no-ollama"], 0),
    ("facts parse", [str(SMI / "table__A10__550.127.05.txt")], 0),
    ("facts parse", [str(SMI / "error_driver_comm__unknown__460.x.txt")], 1),
    ("compat", ["--driver", "590.48.01", "--gpu", "NVIDIA H100 80GB HBM3"], 0),
    ("compat", ["--driver", "470.82.01", "--gpu", "Tesla T4"], 2),
    ("fit", ["--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu", "NVIDIA A10"], 0),
    ("fit", ["--model", "Qwen/Qwen2.5-72B-Instruct", "--gpu", "NVIDIA A10"], 2),
    ("fit", ["--model", "Qwen/Qwen2.5-4B-Instruct", "--gpu", "NVIDIA A10"], 2),
    ("history", ["--hosts", "g"], 0),  # the runs above
    ("status", ["--hosts", "g", "-f", "{fleet}"], 0),  # SSH down, both engines answer
]


@pytest.fixture(scope="module")
def outputs(engines: tuple[int, int], tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, list[tuple[str, list[str], int, subprocess.CompletedProcess[str]]]]:
    """Each case run once, in order (status last: it reads the runs before it)."""
    cwd = tmp_path_factory.mktemp("json")
    model = cwd / "local-model"
    model.mkdir()
    (model / "config.json").write_text("{}\n")
    (model / "weights.bin").write_bytes(b"w" * 1000)
    paths = {"fleet": str(write_fleet(cwd / "fleet.yml", *engines)),
             "mirror_fleet": str(write_fleet(cwd / "mirror-fleet.yml", engines[0],
                                             model_dir=model))}
    done = []
    for name, args, code in CASES:
        filled = [a.format(**paths) for a in args]
        done.append((name, filled, code, run(cwd, *name.split(), *filled, "--json")))
    return cwd, done


def _label(case: tuple[str, list[str], int]) -> str:
    return f"{case[0]}-exit{case[2]}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_label(c) for c in CASES])
def test_json_output_matches_the_commands_schema(outputs: Any, index: int) -> None:
    _, done = outputs
    name, _, code, proc = done[index]
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    document = json.loads(proc.stdout)  # stdout is the JSON and nothing else
    command = schemas.command(name)
    schema = command.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(document)
    # ... and reads back into its result model.
    TypeAdapter(command.output).validate_json(proc.stdout)


def test_json_keys_scripts_read_are_kept(outputs: Any) -> None:
    """The keys of up, probe, bench and mirror --json that tests/e2e and operators' scripts
    read, before the workflow layer (new keys may be added, none removed)."""
    _, done = outputs
    first = {name: json.loads(proc.stdout) for name, _, _, proc in reversed(done)}
    assert {"run_id", "run_dir", "run_dirs", "facts", "ansible", "mirror",
            "probes"} <= set(first["up"])
    assert {"group", "run_dir", "hosts", "unreachable"} <= set(first["facts"])
    assert {"group", "stages", "hosts", "facts"} <= set(first["plan"])
    assert {"status", "rc", "changed", "hosts", "failures"} <= set(first["up"]["ansible"])
    assert {"group", "results", "passed"} <= set(first["probe"])
    assert {"run_id", "run_dir", "report", "passed", "probes", "bench"} <= set(first["bench"])
    assert "passed" in first["bench"]["probes"] and "passed" in first["bench"]["bench"]
    assert {"dir", "models", "origin_bytes", "wheels", "ollama"} <= set(first["mirror"])
    assert {"driver", "max_cuda", "torch", "vllm", "reasons"} <= set(first["compat"])


def test_runs_keep_their_results_in_their_own_directory(outputs: Any) -> None:
    cwd, done = outputs
    found = {(name, code): json.loads(proc.stdout) for name, _, code, proc in done}
    probe = found[("probe", 0)]
    assert probe["passed"] and Path(probe["run_dir"]).parent == cwd / ".orchestrate" / "runs"
    assert {p.name for p in Path(probe["run_dir"]).iterdir()} == {
        "plan.json", "probes.json", "report.html", "run.json"}
    assert json.loads((Path(probe["run_dir"]) / "probes.json").read_text())["results"] == \
        probe["results"]
    # The host's SSH port is closed: each command that gathers reports it, per host.
    gathered = found[("facts", 1)]
    assert gathered["unreachable"] == ["h"] and not gathered["hosts"][0]["facts"]["reachable"]
    assert Path(gathered["run_dir"]).name.endswith("-facts")
    assert not (cwd / ".orchestrate" / "facts").exists()  # an unreachable host is not cached
    planned, declared = (json.loads(proc.stdout)["facts"]["h"]
                         for name, _, _, proc in done if name == "plan")
    assert planned["source"] == "fleet.yml" and planned["age_s"] is None
    assert f"port {CLOSED_PORT}: Connection refused" in planned["unreachable"]
    assert declared == {"source": "fleet.yml", "gathered_at": None, "age_s": None,
                        "unreachable": None}
    ran = found[("up", 1)]
    assert ran["facts"]["h"]["source"] == "fleet.yml" and ran["facts"]["h"]["unreachable"]
    assert ran["ansible"]["failures"][0]["unreachable"] and ran["probes"] is None
    assert ran["run_dirs"] == [ran["run_dir"]] and ran["regathered"] == []
    assert (Path(ran["run_dir"]) / "report.html").is_file()
    # status: the SSH host is unreachable, the engines answer: up, with the last run.
    now = StatusResult.model_validate(found[("status", 0)])
    assert now.up and [r.probe for r in now.unreachable] == ["ssh"]
    assert [(d.deployment, [c.probe for c in d.checks]) for d in now.deployments] == [
        ("chat", ["health", "models"]), ("chat-ollama", ["version", "tags"])]
    assert now.last_run is not None and now.last_run.command == "bench"
    assert now.last_run.passed is True and now.last_run.probes_failed == 0


def test_down_json_and_its_refusal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from orchestrator.sandbox import hosts as sandbox

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sandbox, "down", lambda state, log: ["orchestrate-sandbox-1"])
    result = CliRunner().invoke(cli.app, ["down", "--hosts", "sandbox", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    jsonschema.validate(document, schemas.command("down").schema())
    assert document["group"] == "sandbox" and document["sandbox"] is True
    assert document["removed"] == ["orchestrate-sandbox-1"] and document["hosts"] == {}
    refused = CliRunner().invoke(cli.app, ["down", "--hosts", "g", "--json"])
    assert refused.exit_code == 2 and refused.stdout == ""


def test_every_command_has_a_schema_and_docs_json_md_is_current(tmp_path: Path) -> None:
    typer_commands = {c.name or (c.callback.__name__ if c.callback else "")
                      for c in cli.app.registered_commands}
    facts = {"facts", *(f"facts {c.name}" for c in cli.facts_app.registered_commands)}
    history = {"history", *(f"history {c.name}" for c in cli.history_app.registered_commands)}
    assert typer_commands | facts | history == {*schemas.COMMANDS, "schema"}
    doc = (REPO / "docs" / "json.md").read_text(encoding="utf-8")
    assert doc == schemas.markdown(), ("docs/json.md is stale: run "
                                       "`orchestrate schema --markdown > docs/json.md`")
    listed = run(tmp_path, "schema", "--list", "--json")
    assert json.loads(listed.stdout) == list(schemas.COMMANDS)
    printed = run(tmp_path, "schema", "facts", "parse")
    assert json.loads(printed.stdout) == schemas.command("facts parse").schema()
    unknown = run(tmp_path, "schema", "nosuch")
    assert unknown.returncode == 2 and "no command 'nosuch' (commands: init" in unknown.stderr


# --- status ----------------------------------------------------------------------------------

def record(stdout: str, rc: int = 0) -> dict[str, Any]:
    """One command as the collector records it (hostcollect.run)."""
    return {"argv": ["systemctl"], "rc": rc, "stdout": stdout, "stderr": ""}


def unit(name: str, **props: str) -> dict[str, Any]:
    """`systemctl show UNIT -p ...` as the collector records it."""
    base = {"LoadState": "loaded", "ActiveState": "active", "SubState": "running",
            "Result": "success", "NRestarts": "0", "ExecMainPID": "4242",
            "ExecMainStartTimestamp": "Sun 2026-11-22 10:00:00 UTC"}
    return {"unit": name, **record("".join(f"{k}={v}\n" for k, v in {**base, **props}.items()))}


def evidence(ports: list[int], **units: dict[str, str]) -> dict[str, Any]:
    """The units-only collector's answer: no GPU, environments or models were asked for."""
    return {"gpu": None, "envs": [], "models": [],
            "units": [unit(name, **props) for name, props in units.items()],
            "listening": {"sockets": [{"address": "0.0.0.0", "port": p} for p in ports],
                          "errors": []}}


def test_status_asks_the_collector_for_units_and_sockets_only(tmp_path: Path) -> None:
    plan = status_plan(tmp_path)
    config = units_config(plan.hosts[0], 5.0)
    assert (config["gpu"], config["envs"], config["models"]) == (False, [], [])
    assert config["units"] == ["vllm@chat.service", "ollama.service"]
    # The collector itself, run here: nothing of GPUs or torch is collected.
    found = hostcollect.collect(config)
    assert (found["gpu"], found["envs"], found["models"]) == (None, [], [])
    assert [u["unit"] for u in found["units"]] == config["units"]


def status_plan(tmp_path: Path) -> Plan:
    return plan_for(Target("g", fleet=write_fleet(tmp_path / "fleet.yml", 8000, 11434)),
                    facts=NO_FACTS).plan


def check_status(tmp_path: Path, ports: tuple[int, int], collect: Any) -> StatusResult:
    fleet = write_fleet(tmp_path / "fleet.yml", *ports)
    return status(StatusOptions(Target("g", fleet=fleet, state_dir=tmp_path / "state"),
                                ssh_timeout=5, http_timeout=5, collect=collect))


def test_status_of_healthy_units_and_answering_engines(tmp_path: Path,
                                                        engines: tuple[int, int]) -> None:
    def collect(host: HostPlan, timeout: float) -> dict[str, Any]:
        return evidence(list(engines), **{"vllm@chat.service": {"NRestarts": "1"},
                                     "ollama.service": {}})

    result = check_status(tmp_path, engines, collect)
    assert result.up and result.unreachable == [] and result.last_run is None
    chat, ollama = result.deployments
    assert (chat.unit, chat.active_state, chat.sub_state, chat.restarts) == (
        "vllm@chat.service", "active", "running", 1)
    assert [c.probe for c in chat.checks] == ["service", "listening", "health", "models"]
    assert (ollama.unit, ollama.restarts) == ("ollama.service", 0)
    assert [c.probe for c in ollama.checks] == ["service", "listening", "version", "tags"]


def test_status_a_unit_restarting_in_a_loop_is_down(tmp_path: Path,
                                                     engines: tuple[int, int]) -> None:
    """It answers over HTTP between crashes: the unit's restarts say it is down, by the host
    probe's own rule."""
    def collect(host: HostPlan, timeout: float) -> dict[str, Any]:
        return evidence(list(engines), **{"vllm@chat.service": {"NRestarts": "7"},
                                          "ollama.service": {}})

    result = check_status(tmp_path, engines, collect)
    chat, ollama = result.deployments
    assert not result.up and not chat.up and ollama.up
    assert chat.restarts == 7
    [service] = [c for c in chat.checks if c.probe == "service"]
    assert not service.passed and "restarting in a loop" in service.evidence


def test_status_unreachable_host_and_stopped_engine(tmp_path: Path) -> None:
    def collect(host: HostPlan, timeout: float) -> dict[str, Any]:
        raise CollectError("ssh h: connection refused", "start sshd")

    result = check_status(tmp_path, (CLOSED_PORT, CLOSED_PORT + 4), collect)
    assert not result.up
    assert [(r.host, r.evidence) for r in result.unreachable] == [
        ("h", "ssh h: connection refused")]
    for d in result.deployments:
        assert not d.up and d.active_state is None and d.restarts is None
        assert all("ConnectError" in c.evidence for c in d.checks)


def test_status_command_exits_1_when_a_deployment_is_down(tmp_path: Path) -> None:
    write_fleet(tmp_path / "fleet.yml", CLOSED_PORT)
    proc = run(tmp_path, "status", "--hosts", "g")
    assert proc.returncode == 1, proc.stderr
    assert "DOWN" in proc.stdout and "SSH did not answer" in proc.stdout
    assert "last run: none" in proc.stdout


def _run_dir(root: Path, run_id: str, group: str, *, rc: int | None = None,
             failed: int | None = None) -> Path:
    path = root / run_id
    path.mkdir(parents=True)
    (path / "plan.json").write_text(json.dumps({"group": group, "stages": [], "hosts": []}))
    if rc is not None:
        (path / "artifacts" / "ansible").mkdir(parents=True)
        (path / "artifacts" / "ansible" / "status").write_text(
            "successful" if rc == 0 else "failed")
        (path / "artifacts" / "ansible" / "rc").write_text(str(rc))
    if failed is not None:
        results = [{"host": "h", "deployment": "d", "probe": f"p{i}", "passed": i >= failed,
                    "evidence": "e"} for i in range(3)]
        (path / "probes.json").write_text(json.dumps({"group": group, "results": results}))
    return path


def test_last_run_is_the_newest_of_the_group(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    assert last_run(root, "g") is None
    _run_dir(root, "20261101-100000-000000-up", "g", rc=0, failed=0)
    newest = _run_dir(root, "20261102-090000-000001-up", "g", rc=0, failed=1)
    _run_dir(root, "20261103-080000-000000-probe", "other", failed=0)
    (root / "not-a-run").mkdir()
    found = last_run(root, "g")
    assert found is not None
    assert (found.run_id, found.command, found.run_dir) == (newest.name, "up", str(newest))
    assert found.started.isoformat() == "2026-11-02T09:00:00.000001"
    assert (found.ansible_status, found.ansible_rc) == ("successful", 0)
    assert (found.probes_failed, found.probes_total, found.passed) == (1, 3, False)
    _run_dir(root, "20261104-000000-000000-smoke", "g")
    unknown = last_run(root, "g")
    assert unknown is not None and unknown.command == "smoke" and unknown.passed is None


# --- fleet resolution, and what the caller passes in -----------------------------------------

def test_fleet_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert no_fleet_given(None, None)
    with pytest.raises(ConfigError, match="run `orchestrate init`"):
        load(Target("g"))
    write_fleet(tmp_path / "fleet.yml", 8000)
    assert not no_fleet_given(None, None) and not no_fleet_given(None, Path("inv.yml"))
    assert load(Target("g")).source.endswith("fleet.yml")
    # A fleet the caller made wins over any file (the CLI's sandbox).
    other = load_fleet(write_fleet(tmp_path / "other.yml", 8001))
    assert load(Target("g", fleet=Path("nosuch.yml"), builtin=other)) is other


def test_up_runs_the_callers_hook_with_the_hosts_before_gathering_their_facts(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    seen: list[tuple[list[str], bool]] = []

    def before_facts(hosts: list[str]) -> None:
        seen.append((hosts, any((state / "runs").glob("*-facts"))))

    loaded = load_fleet(write_fleet(tmp_path / "fleet.yml", CLOSED_PORT))
    result = up(UpOptions(Target("g", builtin=loaded, state_dir=state), only=("preflight",),
                          before_facts=before_facts), Events())
    assert seen == [(["h"], False)]
    # The run's record (run.json) first, then the facts gathered, then the playbook run.
    assert [p.name.rsplit("-", 1)[1] for p in sorted((state / "runs").iterdir())] == [
        "up", "facts", "up"]
    assert Path(result.run_dir).parent == (state / "runs").resolve()
    assert not result.passed and result.ansible.failures[0].unreachable
    assert result.stages == ["preflight"] and result.probes is None
