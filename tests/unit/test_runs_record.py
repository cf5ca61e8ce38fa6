"""Run records (run.json) written by `up`: on success, failure, interruption and an error;
the group lock around it; `--retry-failed`'s hosts; the last successful run for --rollback.

Ansible itself is a STAND-IN here (run_playbook replaced): what is tested is what the
record says of a run's per-host outcome, not Ansible."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.errors import ConfigError, PlanError
from orchestrator.plan.planner import HostPlan, Plan, ProbeTarget, RayClusterPlan
from orchestrator.run.lock import LockHeld, group_lock, lock_path
from orchestrator.run.render import RunDir
from orchestrator.run.runner import HostStats, Interrupted, Progress, RunResult, TaskFailure
from orchestrator.verify.httpprobe import ProbeReport, ProbeResult
from orchestrator.workflows import up as up_flow
from orchestrator.workflows.common import NO_FACTS, Events, Target
from orchestrator.workflows.history import RetrySelection, retry_selection
from orchestrator.workflows.runs import (
    RECORD,
    host_records,
    last_successful_run,
    read_record,
    records,
    releases,
    scrub_argv,
)
from orchestrator.workflows.up import UpOptions, _retried, up

COMMIT = "a" * 40


def write_fleet(path: Path, extra: str = "") -> Path:
    path.write_text(yaml.safe_dump({
        "groups": {"g": {"profile": "cpu", "hosts": {
            "a": {"address": "10.0.0.1"}, "b": {"address": "10.0.0.2"}}}},
        "deployments": [{"name": "chat", "model": "Qwen/Qwen2.5-0.5B-Instruct",
                         "revision": COMMIT, "engine": "vllm", "hosts": "g", "port": 8000,
                         "options": {"open": True}}]}) + extra)
    return path


class StandInPlaybook:
    """STAND-IN for run_playbook: `failing` hosts fail a task, `unreachable` ones are not
    reached, `raises` is raised instead of a result; every run's hosts are kept."""

    def __init__(self, failing: set[str] = frozenset(),  # type: ignore[assignment]
                 unreachable: set[str] = frozenset(),  # type: ignore[assignment]
                 raises: BaseException | None = None,
                 during: Callable[[RunDir], None] | None = None) -> None:
        self.failing, self.unreachable, self.raises = failing, unreachable, raises
        self.during = during
        self.hosts: list[list[str]] = []

    def __call__(self, run: RunDir, on_progress: Callable[[Progress], None]) -> RunResult:
        hosts = [h["name"] for h in json.loads((run.path / "plan.json").read_text())["hosts"]]
        self.hosts.append(hosts)
        if self.during is not None:
            self.during(run)
        if self.raises is not None:
            raise self.raises
        failures = [TaskFailure(host=h, play="preflight", task="check [bold]disk[/bold]",
                                message="no room", unreachable=False)
                    for h in hosts if h in self.failing]
        failures += [TaskFailure(host=h, play="preflight", task="Gathering Facts",
                                 message="ssh: connect to host: timed out", unreachable=True)
                     for h in hosts if h in self.unreachable]
        stats = {h: HostStats(ok=4, changed=2, failed=int(h in self.failing),
                              unreachable=int(h in self.unreachable)) for h in hosts}
        return RunResult(status="failed" if failures else "successful",
                         rc=2 if failures else 0, stats=stats, failures=failures)


@pytest.fixture
def target(tmp_path: Path) -> Target:
    return Target("g", fleet=write_fleet(tmp_path / "fleet.yml"),
                  state_dir=tmp_path / "state")


def run_up(target: Target, monkeypatch: pytest.MonkeyPatch, playbook: StandInPlaybook,
           **options: Any) -> up_flow.UpResult:
    monkeypatch.setattr(up_flow, "run_playbook", playbook)
    return up(UpOptions(target, only=("preflight",), facts=NO_FACTS, **options), Events())


def only_record(target: Target) -> Any:
    found = records(target.runs_root, "g")
    assert len(found) == 1
    return found[0]


def test_a_passed_up_records_who_what_outcome_per_host_fleet_and_release(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["/venv/bin/orchestrate", "up", "--hosts", "g",
                                     "--api-key=sk-abcdefghijklmnop1234"])
    result = run_up(target, monkeypatch, StandInPlaybook())
    assert result.passed
    record = only_record(target)
    assert record.recorded and record.command == "up" and record.group == "g"
    assert record.outcome == "passed" and record.error is None
    assert record.argv == ["orchestrate", "up", "--hosts", "g", "--api-key=***"]
    assert record.user and record.control_host and record.pid == os.getpid()
    assert record.finished is not None and record.duration_s is not None
    assert record.finished >= record.started and record.started.tzinfo is not None
    assert {n: h.outcome for n, h in record.hosts.items()} == {"a": "ok", "b": "ok"}
    assert record.hosts["a"].tasks == HostStats(ok=4, changed=2)
    assert record.changed == 4 and record.stages == ["preflight"] and not record.check
    fleet = target.fleet
    assert fleet is not None
    assert record.fleet_file == str(fleet.resolve())
    assert record.fleet_sha256 == hashlib.sha256(fleet.read_bytes()).hexdigest()
    assert record.fleet_copy is not None and record.fleet_copy.read_bytes() == fleet.read_bytes()
    assert oct(record.fleet_copy.stat().st_mode & 0o777) == "0o600"
    assert [r.model_dump() for r in record.releases] == [{
        "deployment": "chat", "engine": "vllm", "engine_version": "0.32.0",
        "model_id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": COMMIT, "hosts": ["a", "b"]}]
    # The record's own directory names the playbook run's; the lock is gone.
    assert record.run_dirs == result.run_dirs
    assert not lock_path(target.state_dir, "g").exists()
    # The fleet file changes afterwards: the copy keeps what ran.
    fleet.write_text(fleet.read_text() + "# edited\n")
    assert last_successful_run(target.runs_root, "g") == record


def test_a_failed_up_records_each_hosts_outcome_and_its_failed_tasks(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_up(target, monkeypatch, StandInPlaybook(failing={"a"}, unreachable={"b"}))
    assert not result.passed
    record = only_record(target)
    assert record.outcome == "failed"
    assert {n: h.outcome for n, h in record.hosts.items()} == {"a": "failed",
                                                              "b": "unreachable"}
    assert record.hosts["a"].failures[0].message == "no room"
    assert record.hosts["b"].failures[0].unreachable
    assert record.count("ok") == 0
    assert last_successful_run(target.runs_root, "g") is None
    assert retry_selection(target.runs_root, "g") == RetrySelection(
        record.run_id, frozenset({"a", "b"}))


def test_the_record_says_running_while_the_run_runs(target: Target,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    run_up(target, monkeypatch, StandInPlaybook(
        during=lambda _: seen.append(only_record(target))))
    assert seen[0].outcome == "running" and seen[0].finished is None
    assert only_record(target).outcome == "passed"


@pytest.mark.parametrize("raised", [Interrupted("interrupted (Ctrl-C): Ansible was stopped"),
                                    KeyboardInterrupt()])
def test_an_interrupted_up_is_recorded_interrupted_and_releases_the_lock(
        target: Target, monkeypatch: pytest.MonkeyPatch, raised: BaseException) -> None:
    with pytest.raises(Interrupted):
        run_up(target, monkeypatch, StandInPlaybook(raises=raised))
    record = only_record(target)
    assert record.outcome == "interrupted" and record.finished is not None
    assert record.error and "interrupted" in record.error
    assert record.hosts == {} and not lock_path(target.state_dir, "g").exists()
    with pytest.raises(ConfigError, match="ended interrupted, without an outcome per host"):
        retry_selection(target.runs_root, "g")


def test_an_up_stopped_by_an_error_records_it(target: Target,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OSError, match="disk full"):
        run_up(target, monkeypatch, StandInPlaybook(raises=OSError("disk full")))
    record = only_record(target)
    assert record.outcome == "error" and record.error == "disk full"
    assert not lock_path(target.state_dir, "g").exists()


def test_bad_input_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = Target("nosuch", fleet=write_fleet(tmp_path / "fleet.yml"),
                    state_dir=tmp_path / "state")
    with pytest.raises(ConfigError, match="unknown host group 'nosuch'"):
        run_up(target, monkeypatch, StandInPlaybook())
    assert not target.state_dir.exists()


def test_a_second_up_of_the_group_is_refused_and_leaves_no_record(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    with group_lock(target.state_dir, "g", "other-run", "up"):
        with pytest.raises(LockHeld, match="run other-run"):
            run_up(target, monkeypatch, StandInPlaybook())
        assert records(target.runs_root) == []
    # And with --break-lock it goes ahead (the holder here is this very process).
    with group_lock(target.state_dir, "g", "other-run", "up"):
        assert run_up(target, monkeypatch, StandInPlaybook(), break_lock=True).passed


def test_retry_failed_runs_on_the_failed_hosts_only(target: Target,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run_up(target, monkeypatch, StandInPlaybook(failing={"b"}))
    selection = retry_selection(target.runs_root, "g")
    assert selection.hosts == {"b"}
    playbook = StandInPlaybook()
    assert run_up(target, monkeypatch, playbook, retry=selection).passed
    assert playbook.hosts == [["b"]]
    newest = records(target.runs_root, "g")[0]
    assert newest.retry_of == selection.run_id and list(newest.hosts) == ["b"]
    # The retry passed: nothing left to retry.
    assert retry_selection(target.runs_root, "g").hosts == frozenset()


def test_retry_failed_needs_a_recorded_up(target: Target) -> None:
    with pytest.raises(ConfigError, match="no recorded `up` of 'g'") as refused:
        retry_selection(target.runs_root, "g")
    assert refused.value.exit_code == 2


def test_a_check_run_is_neither_retried_nor_rolled_back_to(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    run_up(target, monkeypatch, StandInPlaybook(failing={"a"}))
    run_up(target, monkeypatch, StandInPlaybook(), check=True)
    assert records(target.runs_root, "g")[0].check
    assert retry_selection(target.runs_root, "g").hosts == {"a"}
    assert last_successful_run(target.runs_root, "g") is None


def _host(name: str) -> HostPlan:
    return HostPlan(name=name, group="g", profile="cpu", connection={}, vars={},
                    probes=[], reasons=[])


def test_a_ray_clusters_members_are_retried_together() -> None:
    plan = Plan(group="g", stages=["services"], hosts=[_host(n) for n in "abcd"],
                ray_cluster=RayClusterPlan(deployment="big", head="a", members=["a", "b"]))
    logged: list[str] = []
    one_member = _retried(plan, RetrySelection("r1", frozenset({"b", "c"})), logged.append)
    assert [h.name for h in one_member.hosts] == ["a", "b", "c"]
    assert one_member.ray_cluster == plan.ray_cluster
    outside = _retried(plan, RetrySelection("r1", frozenset({"d"})), logged.append)
    assert [h.name for h in outside.hosts] == ["d"] and outside.ray_cluster is None
    assert "retrying run r1's failed hosts: a, b, c" in logged
    with pytest.raises(PlanError, match="no longer in 'g'"):
        _retried(plan, RetrySelection("r1", frozenset({"gone"})), logged.append)
    assert _retried(plan, None, logged.append) is plan


def test_probe_failures_count_against_their_host() -> None:
    plan = Plan(group="g", stages=["verify"], hosts=[_host("a"), _host("b")])
    probes = ProbeReport(group="g", results=[
        ProbeResult(host="a", deployment="chat", probe="health", passed=False,
                    evidence="connection refused", next_step="journalctl -u vllm@chat"),
        ProbeResult(host="b", deployment="chat", probe="health", passed=True, evidence="200")])
    hosts = host_records([plan], {"a": HostStats(ok=1), "b": HostStats(ok=1)}, [], probes)
    assert hosts["a"].outcome == "ok" and hosts["a"].needs_retry
    assert hosts["a"].probes_failed[0].evidence == "connection refused"
    assert not hosts["b"].needs_retry
    # A planned host no playbook reached is skipped, and not retried.
    skipped = host_records([plan], {"a": HostStats(ok=1)}, [], None)["b"]
    assert skipped.outcome == "skipped" and skipped.tasks is None and not skipped.needs_retry


def test_releases_group_hosts_serving_the_same_thing() -> None:
    def host(name: str, version: str, revision: str) -> HostPlan:
        return _host(name).model_copy(update={
            "vars": {"vllm_requirement": f"vllm=={version}", "ollama_version": "0.32.7",
                     "model_weights_models": [{"name": "chat", "model_id": "Qwen/X",
                                               "revision": revision}]},
            "probes": [ProbeTarget(deployment="chat", engine="vllm", base_url="http://x",
                                   served_model_name="chat"),
                       ProbeTarget(deployment="small", engine="ollama", base_url="http://y",
                                   served_model_name="qwen2.5:0.5b")]})
    from_mirror = host("b", "0.32.0", COMMIT)
    from_mirror.vars["model_weights_models"][0] = {
        "name": "chat", "model_id": "Qwen/X", "source": "mirror",
        "manifest_url": f"http://m:8080/models/modelscope/Qwen/X/{COMMIT}/manifest.json"}
    found = releases([Plan(group="g", stages=[], hosts=[
        host("a", "0.32.0", COMMIT), from_mirror, host("c", "0.31.1", COMMIT)])])
    assert [(r.deployment, r.engine_version, r.model_id, r.revision, r.hosts) for r in found] == [
        ("chat", "0.31.1", "Qwen/X", COMMIT, ["c"]),
        ("chat", "0.32.0", "Qwen/X", COMMIT, ["a", "b"]),
        ("small", "0.32.7", "qwen2.5:0.5b", None, ["a", "b", "c"])]


@pytest.mark.parametrize(("argv", "expected"), [
    (["up", "--token", "abc"], ["up", "--token", "***"]),
    (["up", "--vault-password-file", "/k/pw"], ["up", "--vault-password-file", "/k/pw"]),
    (["up", "HF_TOKEN=hf_abcdefghijkl"], ["up", "HF_TOKEN=***"]),
    (["up", "--hosts", "g", "hf_abcdefghijklmnop"], ["up", "--hosts", "g", "***"]),
    (["up", "Xk9" * 12], ["up", "***"]),
    (["up", "-f", "/very/long/path/" + "x" * 40 + ".yml"],
     ["up", "-f", "/very/long/path/" + "x" * 40 + ".yml"]),
    # A long group name is a name, not a token.
    (["up", "--hosts", "gpu-cluster-production-east-region-07"],
     ["up", "--hosts", "gpu-cluster-production-east-region-07"]),
    (["up", "--hosts", "gpu_cluster_production_east_region"],
     ["up", "--hosts", "gpu_cluster_production_east_region"]),
])
def test_argv_is_kept_with_secrets_masked(argv: list[str], expected: list[str]) -> None:
    assert scrub_argv(argv) == expected


def test_a_damaged_record_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RECORD).write_text("{not json")
    assert read_record(tmp_path / "run") is None


def test_last_successful_run_skips_runs_without_a_fleet_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The built-in sandbox's fleet (no file) is recorded without a copy.
    from orchestrator.config.fleet import load_fleet

    target = Target("g", builtin=load_fleet(write_fleet(tmp_path / "fleet.yml")),
                    state_dir=tmp_path / "state")
    run_up(target, monkeypatch, StandInPlaybook())
    assert only_record(target).fleet_copy is None
    assert only_record(target).outcome == "passed"
    assert last_successful_run(target.runs_root, "g") is None


def test_records_are_newest_first_and_per_group(target: Target,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run_up(target, monkeypatch, StandInPlaybook(failing={"a"}))
    run_up(target, monkeypatch, StandInPlaybook())
    found = records(target.runs_root, "g")
    assert [r.outcome for r in found] == ["passed", "failed"]
    assert found[0].started >= found[1].started
    assert records(target.runs_root, "other") == []
    assert dt.datetime.now(dt.UTC) - found[0].started < dt.timedelta(minutes=5)


def test_a_command_without_a_playbook_is_recorded_in_its_run_directory(tmp_path: Path) -> None:
    from orchestrator.workflows.runs import new_run, save_results

    plan = Plan(group="g", stages=[], hosts=[_host("a"), _host("b")])
    run_dir = new_run(plan, tmp_path, "probe")
    started = read_record(run_dir)
    assert started is not None and started.outcome == "running"
    assert (started.command, started.group, started.fleet_copy) == ("probe", "g", None)
    save_results(run_dir, command="probe", plan=plan, probes=ProbeReport(group="g", results=[
        ProbeResult(host="a", deployment="chat", probe="health", passed=False, evidence="503"),
        ProbeResult(host="b", deployment="chat", probe="health", passed=True, evidence="200")]))
    ended = read_record(run_dir)
    assert ended is not None and ended.outcome == "failed" and ended.finished is not None
    assert {n: h.outcome for n, h in ended.hosts.items()} == {"a": "failed", "b": "ok"}
    assert (ended.probes_total, ended.probes_failed) == (2, 1)
    assert records(tmp_path, "g") == [ended]
