"""Rollouts: fleet.yml's rollout: block, the planned batches, what render gives Ansible,
and playbooks/services.yml with roles/health_gate stopping at the first failed batch."""

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

import pytest
import yaml

from orchestrator.config.fleet import LoadedFleet, load_fleet
from orchestrator.errors import ConfigError
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.plan.planner import Plan, make_plan
from orchestrator.plan.rollout import RolloutPlan, plan_rollout
from orchestrator.run.render import render, rollout_vars
from orchestrator.run.runner import RunResult, TaskFailure
from orchestrator.workflows.common import Target
from orchestrator.workflows.runs import FLEET_COPY, start_record
from orchestrator.workflows.up import SERVICES_PLAY, UpOptions, rollback_options, rollout_stop

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def fleet(tmp_path: Path, text: str) -> LoadedFleet:
    path = tmp_path / "fleet.yml"
    path.write_text(text)
    return load_fleet(path)


def group_of(hosts: int, rollout: str = "", dep_rollout: str = "", nodes: int = 1) -> str:
    listed = "".join(f"      h{i}: {{address: 10.0.0.{i}}}\n" for i in range(1, hosts + 1))
    return (f"groups:\n  g:\n{rollout}    hosts:\n{listed}deployments:\n"
            f"  - {{name: d, model: m, engine: vllm, hosts: g, port: 8000, nodes: {nodes}"
            f"{dep_rollout}}}\n")


def batches(loaded: LoadedFleet, spanned: tuple[str, ...] = ()) -> list[list[str]]:
    hosts = [h.name for h in loaded.hosts_of("g")]
    dep = loaded.fleet.deployments
    return plan_rollout(loaded, "g", hosts, {h: dep for h in hosts}, spanned,
                        "d" if spanned else None).batches


# --- fleet.yml -------------------------------------------------------------------------------

def test_rollout_is_read_at_defaults_group_and_deployment(tmp_path: Path) -> None:
    loaded = fleet(tmp_path, "defaults:\n  rollout: {batch: 2, health_gate_timeout: 60}\n"
                   + group_of(4, "    rollout: {max_unavailable: 25%}\n",
                              ", rollout: {health_gate: false}"))
    assert loaded.fleet.defaults.rollout is not None
    assert loaded.fleet.defaults.rollout.batch == 2
    assert loaded.fleet.groups["g"].rollout is not None
    assert loaded.fleet.groups["g"].rollout.max_unavailable == "25%"
    assert loaded.fleet.deployments[0].rollout is not None
    assert loaded.fleet.deployments[0].rollout.health_gate is False


@pytest.mark.parametrize(("value", "line"), [("0", 3), ('"0%"', 3), ("101%", 3), ("true", 3),
                                             ("1.5", 3), ("two", 3)])
def test_a_bad_batch_names_the_file_line_and_key(tmp_path: Path, value: str, line: int) -> None:
    with pytest.raises(ConfigError) as err:
        fleet(tmp_path, "defaults:\n  rollout:\n    batch: " + value + "\n" + group_of(2))
    assert str(err.value).startswith(f"{tmp_path / 'fleet.yml'}:{line}: defaults.rollout.batch: "
                                     "expected a number of hosts"), str(err.value)


def test_a_host_has_no_rollout_of_its_own(tmp_path: Path) -> None:
    text = group_of(2).replace("h2: {address: 10.0.0.2}",
                               "h2: {address: 10.0.0.2, rollout: {batch: 1}}")
    with pytest.raises(ConfigError, match=r":5: groups\.g\.hosts\.h2\.rollout: unknown key"):
        fleet(tmp_path, text)


def test_an_unknown_rollout_key_suggests_the_right_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'max_unavailable'"):
        fleet(tmp_path, "defaults:\n  rollout: {max_unavailble: 1}\n" + group_of(2))


# --- batches ----------------------------------------------------------------------------------

def test_default_one_host_at_a_time(tmp_path: Path) -> None:
    assert batches(fleet(tmp_path, group_of(3))) == [["h1"], ["h2"], ["h3"]]
    assert batches(fleet(tmp_path, group_of(1))) == [["h1"]]


def test_a_percentage_is_of_the_group_rounded_down_and_never_zero(tmp_path: Path) -> None:
    assert batches(fleet(tmp_path, group_of(5, "    rollout: {batch: 50%}\n"))) == [
        ["h1", "h2"], ["h3", "h4"], ["h5"]]
    assert batches(fleet(tmp_path, group_of(3, "    rollout: {batch: 10%}\n"))) == [
        ["h1"], ["h2"], ["h3"]]
    assert batches(fleet(tmp_path, group_of(3, "    rollout: {batch: 100%}\n"))) == [
        ["h1", "h2", "h3"]]


def test_max_unavailable_caps_the_batch(tmp_path: Path) -> None:
    loaded = fleet(tmp_path, "defaults:\n  rollout: {batch: 4}\n"
                   + group_of(4, "    rollout: {max_unavailable: 50%}\n"))
    assert batches(loaded) == [["h1", "h2"], ["h3", "h4"]]


def test_the_group_overrides_defaults_and_a_deployment_the_group(tmp_path: Path) -> None:
    loaded = fleet(tmp_path, "defaults:\n  rollout: {batch: 1}\n"
                   + group_of(4, "    rollout: {batch: 4}\n", ", rollout: {batch: 3}"))
    assert batches(loaded) == [["h1", "h2", "h3"], ["h4"]]
    hosts = [h.name for h in loaded.hosts_of("g")]
    plan = plan_rollout(loaded, "g", hosts, {h: loaded.fleet.deployments for h in hosts})
    assert plan.reasons == ["4 host(s) per batch (groups.g.rollout: batch 4)",
                            "3 host(s) per batch: deployment d's rollout"]


def test_the_hosts_of_a_deployment_across_hosts_share_a_batch(tmp_path: Path) -> None:
    loaded = fleet(tmp_path, group_of(3))
    assert batches(loaded, ("h2", "h3")) == [["h1"], ["h2", "h3"]]
    hosts = ["h1", "h2", "h3"]
    plan = plan_rollout(loaded, "g", hosts, {h: loaded.fleet.deployments for h in hosts},
                        ("h1", "h2"), "d")
    assert plan.batches == [["h1", "h2"], ["h3"]]
    assert plan.reasons[-1] == ("deployment d spans h1, h2: one batch (its one instance "
                                "restarts on all of them at once)")


def test_the_example_fleet_plans_one_host_per_batch_and_the_gate_variables() -> None:
    loaded = load_fleet(REPO / "templates" / "fleet.yml")
    plan = make_plan(loaded, "gpu-cluster", load_knowledge(), load_cuda_compat())
    assert plan.rollout.batches == [["gpu-01"], ["gpu-02"]]
    # Defaults everywhere: the role's own defaults apply, no gate variable is written.
    assert not [k for h in plan.hosts for k in h.vars if k.startswith("health_gate")]


def test_a_deployment_without_the_gate_is_skipped_by_it(tmp_path: Path) -> None:
    text = (REPO / "templates" / "fleet.yml").read_text().replace(
        "    api_key_var: vault_qwen7b_api_key\n",
        "    api_key_var: vault_qwen7b_api_key\n"
        "    rollout: {health_gate: false, health_gate_timeout: 900}\n")
    (tmp_path / "secrets.vault.yml").touch()
    plan = make_plan(fleet(tmp_path, text), "gpu-cluster", load_knowledge(),
                     load_cuda_compat())
    assert {h.name: {k: v for k, v in h.vars.items() if k.startswith("health_gate")}
            for h in plan.hosts} == {
        h: {"health_gate_skip": ["qwen7b"], "health_gate_timeout": 900}
        for h in ("gpu-01", "gpu-02")}


# --- render -------------------------------------------------------------------------------------

def example_plan() -> Plan:
    return make_plan(load_fleet(REPO / "templates" / "fleet.yml"), "gpu-cluster",
                     load_knowledge(), load_cuda_compat())


def test_render_hands_the_batches_to_ansible(tmp_path: Path) -> None:
    run = render(example_plan(), tmp_path, "r1")
    assert run.rollout_file == run.path / "rollout.yml"
    assert yaml.safe_load(run.rollout_file.read_text().replace("!unsafe ", "")) == {
        "orchestrate_serial": [1, 1], "orchestrate_rollout_hosts": "gpu-01,gpu-02",
        "orchestrate_max_fail_percentage": 0}
    assert run.rollout_file.stat().st_mode & 0o777 == 0o600
    args = run.ansible_args()
    assert args[args.index(f"@{run.rollout_file}") - 1] == "--extra-vars"
    assert f"@{run.rollout_file}" in (run.path / "command.txt").read_text()


def test_a_host_left_out_of_the_plan_leaves_its_batch(tmp_path: Path) -> None:
    plan = example_plan()
    plan = plan.model_copy(update={
        "hosts": plan.hosts[1:],
        "rollout": RolloutPlan(batches=[["gpu-01"], ["gpu-02"]], reasons=[])})
    assert rollout_vars(plan) == {"orchestrate_serial": [1],
                                  "orchestrate_rollout_hosts": "gpu-02",
                                  "orchestrate_max_fail_percentage": 0}


# --- services.yml and the health gate, on this machine ----------------------------------------

KEY = "gate-test-key"


class _StandIn(BaseHTTPRequestHandler):
    """A STAND-IN for a vLLM server (no engine here): /health, /v1/models and a chat
    completion, the last two only with the key."""

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, {})
        elif self.headers.get("Authorization") != f"Bearer {KEY}":
            self._answer(401, {"error": "Unauthorized"})
        else:
            self._answer(200, {"data": [{"id": "served"}]})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        asked = json.loads(self.rfile.read(length))
        ok = self.headers.get("Authorization") == f"Bearer {KEY}" and asked["max_tokens"] == 4
        self._answer(200 if ok else 401, {"choices": [{"message": {"content": "OK"}}]}
                     if ok else {"error": "Unauthorized"})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def standin() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_services_play_rolls_in_batches_and_stops_at_the_first_failed_gate(
        tmp_path: Path, standin: int) -> None:
    config = tmp_path / "vllm"
    config.mkdir()
    (config / "d.env").write_text(f'VLLM_API_KEY="{KEY}"\n')
    free = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    closed = free.server_address[1]  # a port nothing listens on once closed
    free.server_close()

    def host(port: int) -> dict[str, Any]:
        return {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                "ansible_become": False, "health_gate_vllm_config_dir": str(config),
                "health_gate_timeout": 10, "health_gate_interval": 1,
                "health_gate_vllm_deployments": [{
                    "name": "d", "port": port, "api_key": KEY,
                    "args": ["--model", "/m", "--served-model-name", "served",
                             "--host", "127.0.0.1"]}]}

    (tmp_path / "inventory.json").write_text(json.dumps({"all": {"hosts": {
        "h1": host(standin), "h2": host(standin), "h3": host(closed), "h4": host(standin)}}}))
    (tmp_path / "rollout.yml").write_text(yaml.safe_dump({
        "orchestrate_serial": [2, 1], "orchestrate_rollout_hosts": "h2,h1,h3,h4",
        "orchestrate_max_fail_percentage": 0}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_STDOUT_CALLBACK": "json", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "local"),
           "ANSIBLE_REMOTE_TEMP": str(tmp_path / "remote")}
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp_path / "inventory.json"),
                           str(REPO / "playbooks" / "services.yml"), "--tags", "health_gate_run",
                           "--extra-vars", f"@{tmp_path / 'rollout.yml'}"],
                          env=env, capture_output=True, text=True, timeout=300, check=False,
                          cwd=REPO)
    report = json.loads(proc.stdout)
    assert proc.returncode == 2, proc.stderr
    plays = [p for p in report["plays"] if p["play"]["name"] == SERVICES_PLAY]
    asked = [sorted(next(t for t in p["tasks"]
                         if t["task"]["name"].endswith("Ask every deployment of the host to "
                                                       "answer"))["hosts"]) for p in plays]
    # Batch 1 (h2, h1) passed, batch 2 (h3) failed, batch 3 (h4) never started.
    assert asked == [["h1", "h2"], ["h3"]]
    assert "h4" not in report["stats"]
    failed = next(t for t in plays[1]["tasks"] if t["task"]["name"].endswith(
        "Stop the rollout where a deployment did not answer"))["hosts"]["h3"]
    message = failed["msg"]
    assert message.startswith("health gate failed on h3:\n"
                              "vllm@d.service health: GET /health: "), message
    assert "journalctl -u vllm@d.service -n 30:" in message
    passed = next(t for t in plays[0]["tasks"] if t["task"]["name"].endswith(
        "Report the checks that passed"))["hosts"]["h1"]["msg"]
    assert passed == "vllm@d.service answered (health, models, chat)"
    # The key went to the stand-in from the env file, never through Ansible's output.
    assert KEY not in json.dumps([t for p in plays for t in p["tasks"]
                                  if "Ask every" in t["task"]["name"]])


# --- up: where a rollout stopped, and --rollback ---------------------------------------------

def test_a_failed_batch_is_reported_with_the_later_batches_untouched() -> None:
    plan = example_plan().model_copy(update={"rollout": RolloutPlan(
        batches=[["gpu-01"], ["gpu-02"], ["gpu-03"]], reasons=[])})
    gate = TaskFailure(host="gpu-02", play=SERVICES_PLAY,
                       task="health_gate : Stop the rollout where a deployment did not answer",
                       message="health gate failed on gpu-02: ...")
    ran = RunResult(status="failed", rc=2, stats={}, failures=[gate])
    stop = rollout_stop(plan, ran, ["orchestrate", "up", "-f", "my fleet.yml"])
    assert stop is not None
    assert (stop.batch, stop.batches, stop.untouched) == (2, 3, ["gpu-03"])
    assert stop.failures == [gate]
    assert stop.next_steps == [
        "resume after a fix in fleet.yml: orchestrate up -f 'my fleet.yml' --hosts gpu-cluster",
        "retry the failed hosts only: orchestrate up -f 'my fleet.yml' --hosts gpu-cluster "
        "--retry-failed",
        "roll back to the last successful run's fleet: orchestrate up -f 'my fleet.yml' "
        "--hosts gpu-cluster --rollback"]
    # A failure before the services stage stops no rollout.
    early = TaskFailure(host="gpu-02", play="Python environment", task="t", message="m")
    assert rollout_stop(plan, RunResult(status="failed", rc=2, stats={}, failures=[early]),
                        ["orchestrate", "up"]) is None


def test_rollback_without_a_successful_run_is_refused(tmp_path: Path) -> None:
    options = UpOptions(Target("gpu-cluster", fleet=tmp_path / "fleet.yml",
                               state_dir=tmp_path / ".orchestrate"), rollback=True)
    with pytest.raises(ConfigError, match="no successful `up` of 'gpu-cluster'") as err:
        rollback_options(options, lambda _: None)
    assert err.value.exit_code == 2


def test_rollback_runs_the_last_successful_runs_fleet_copy(tmp_path: Path) -> None:
    """A STAND-IN run record (runs.start_record, finished passed without hosts): the copy it
    keeps is planned, its relative paths leading from the current fleet's directory."""
    state = tmp_path / ".orchestrate"
    (tmp_path / "secrets.vault.yml").touch()
    old = tmp_path / "fleet.yml"
    old.write_text((REPO / "templates" / "fleet.yml").read_text())
    record = start_record(state / "runs", "20260101-000000-000000-up", command="up",
                          group="gpu-cluster", fleet_file=old, argv=["orchestrate", "up"])
    record.end("passed")
    old.write_text(old.read_text().replace("max_model_len: 8192", "max_model_len: 4096"))
    logged: list[str] = []
    options, copy, run_id = rollback_options(
        UpOptions(Target("gpu-cluster", fleet=old, state_dir=state), rollback=True),
        logged.append)
    assert (copy, run_id) == (record.path / FLEET_COPY, "20260101-000000-000000-up")
    loaded = options.target.builtin
    assert loaded is not None
    assert loaded.fleet.deployments[0].options.max_model_len == 8192
    assert loaded.fleet.secrets == str(tmp_path / "secrets.vault.yml")
    assert logged[0].startswith("rolling back 'gpu-cluster' to the fleet of run "
                                "20260101-000000-000000-up")


def test_cli_up_rollback_without_a_successful_run_exits_2_with_the_hint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fleet.yml").write_text((REPO / "templates" / "fleet.yml").read_text())
    runner = CliRunner()
    both = runner.invoke(app, ["up", "--hosts", "gpu-cluster", "--rollback", "--retry-failed"])
    assert both.exit_code == 2, both.output
    assert "--rollback runs every host of the group" in both.output
    none = runner.invoke(app, ["up", "--hosts", "gpu-cluster", "--rollback", "--no-gather"])
    assert none.exit_code == 2, none.output
    assert "no successful `up` of 'gpu-cluster'" in " ".join(none.output.split())
