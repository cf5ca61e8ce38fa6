"""`orchestrate history` and `history show`: recorded runs and older run directories, newest
first, hostile strings printed as text; `up --retry-failed` when there is nothing to retry
or no run to retry."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from rich.console import Console
from typer.testing import CliRunner

from orchestrator import cli
from orchestrator.errors import ConfigError
from orchestrator.plan.planner import Plan
from orchestrator.run.render import new_run_id
from orchestrator.run.runner import HostStats, TaskFailure
from orchestrator.verify.httpprobe import ProbeReport, ProbeResult
from orchestrator.workflows import schemas
from orchestrator.workflows.history import (
    HistoryOptions,
    history,
    history_table,
    record_view,
    show,
)
from orchestrator.workflows.runs import RunRecord, start_record

RUNS = Path(".orchestrate") / "runs"


def stage_dir(root: Path, group: str, command: str = "up", *, status: str | None = None,
              rc: int | None = None, probes: list[bool] | None = None) -> Path:
    """A run directory as render and save_results leave it (no run.json)."""
    path = root / new_run_id(dt.datetime.now(), command)
    (path / "artifacts" / "ansible").mkdir(parents=True)
    (path / "plan.json").write_text(Plan(group=group, stages=[], hosts=[]).model_dump_json())
    if status is not None:
        (path / "artifacts" / "ansible" / "status").write_text(status)
        (path / "artifacts" / "ansible" / "rc").write_text(str(rc))
    if probes is not None:
        (path / "probes.json").write_text(ProbeReport(group=group, results=[
            ProbeResult(host="a", deployment="chat", probe=f"p{i}", passed=ok, evidence="e")
            for i, ok in enumerate(probes)]).model_dump_json())
    return path


def record(root: Path, group: str, stats: dict[str, HostStats], *,
           failures: list[TaskFailure] | None = None, run_dirs: list[Path] | None = None,
           probes: ProbeReport | None = None, fleet: Path | None = None) -> RunRecord:
    """A finished `up` record, as up writes it."""
    recorder = start_record(root, new_run_id(dt.datetime.now(), "up"), command="up",
                            group=group, fleet_file=fleet,
                            argv=["/x/orchestrate", "up", "--hosts", group])
    failed = failures or []
    return recorder.finish(passed=not failed, run_dirs=[str(d) for d in run_dirs or []],
                           stats=stats, failures=failed, probes=probes)


def test_history_lists_recorded_and_older_runs_newest_first(tmp_path: Path) -> None:
    old_probe = stage_dir(tmp_path, "g", "probe", probes=[True, False])
    old_up = stage_dir(tmp_path, "g", "up", status="successful", rc=0)
    stage_dir(tmp_path, "other", "up", status="failed", rc=2)
    claimed = stage_dir(tmp_path, "g", "up", status="failed", rc=2)
    fleet = tmp_path / "fleet.yml"
    fleet.write_text("groups: {}\n")
    failed = record(tmp_path, "g", {"a": HostStats(ok=3, changed=1), "b": HostStats(failed=1),
                                    "c": HostStats(unreachable=1)},
                    failures=[TaskFailure("b", "services", "start", "boom"),
                              TaskFailure("c", "services", "Gathering Facts", "timeout",
                                          unreachable=True)],
                    run_dirs=[claimed], fleet=fleet)
    passed = record(tmp_path, "g", {"a": HostStats(ok=3), "b": HostStats(ok=3, changed=2)})

    runs = history(HistoryOptions(tmp_path, group="g")).runs
    # The record's playbook run is not listed again on its own; the other group is left out.
    assert [r.run_id for r in runs] == [passed.run_id, failed.run_id, old_up.name,
                                        old_probe.name]
    newest, second, legacy_up, legacy_probe = runs
    assert (newest.outcome, newest.hosts_ok, newest.changed) == ("passed", 2, 2)
    assert (second.outcome, second.hosts_ok, second.hosts_failed,
            second.hosts_unreachable) == ("failed", 1, 1, 1)
    assert second.fleet_sha256 == failed.fleet_sha256 and second.fleet_sha256
    assert "@" in second.who and second.recorded
    assert (legacy_up.command, legacy_up.outcome, legacy_up.recorded, legacy_up.who) == (
        "up", "passed", False, "?")
    assert (legacy_probe.command, legacy_probe.outcome) == ("probe", "failed")
    assert len(history(HistoryOptions(tmp_path)).runs) == 5
    assert [r.run_id for r in history(HistoryOptions(tmp_path, limit=1)).runs] == [
        passed.run_id]
    assert history(HistoryOptions(tmp_path / "none")).runs == []


def test_show_finds_a_run_by_its_id_its_playbook_runs_id_or_an_older_directory(
        tmp_path: Path) -> None:
    claimed = stage_dir(tmp_path, "g", status="failed", rc=2)
    legacy = stage_dir(tmp_path, "g", "bench", probes=[True])
    made = record(tmp_path, "g", {"a": HostStats(ok=1)}, run_dirs=[claimed])
    assert show(tmp_path, made.run_id) == made
    assert show(tmp_path, claimed.name) == made
    older = show(tmp_path, legacy.name)
    assert not older.recorded and older.outcome == "passed" and older.probes_total == 1
    for wrong in ("nosuch", "../x", ""):
        with pytest.raises(ConfigError):
            show(tmp_path, wrong)


def test_a_running_record_whose_process_died_shows_died(tmp_path: Path) -> None:
    recorder = start_record(tmp_path, new_run_id(dt.datetime.now(), "up"), command="up",
                            group="g", fleet_file=None, argv=[])
    assert history(HistoryOptions(tmp_path)).runs[0].outcome == "running"
    recorder.write(pid=2 ** 22 + 12345)  # above the default pid_max: no such process
    assert history(HistoryOptions(tmp_path)).runs[0].outcome == "died"


HOSTILE = "[bold red]x[/bold red] [link=file:///etc/passwd]y[/link]"


def test_hostile_strings_are_printed_as_text(tmp_path: Path) -> None:
    report = ProbeReport(group=HOSTILE, results=[ProbeResult(
        host=HOSTILE, deployment=HOSTILE, probe="health", passed=False, evidence=HOSTILE,
        next_step=HOSTILE)])
    made = record(tmp_path, HOSTILE, {HOSTILE: HostStats(failed=1)},
                  failures=[TaskFailure(HOSTILE, HOSTILE, HOSTILE, HOSTILE)], probes=report)
    console = Console(record=True, width=400, color_system=None)
    console.print(history_table(history(HistoryOptions(tmp_path))))
    console.print(record_view(show(tmp_path, made.run_id)))
    text = console.export_text()
    # Each hostile string appears literally (as the text it is) in the group column, the
    # host table, the failed task and the failed probe.
    assert text.count(HOSTILE) >= 6, text


def test_the_run_id_is_whole_in_an_80_column_terminal(tmp_path: Path) -> None:
    # CI's terminal is 80 columns wide: the id `history show` takes must not be cut.
    made = record(tmp_path, "sandbox", {"sandbox-1": HostStats(ok=2)})
    console = Console(record=True, width=80, color_system=None)
    console.print(history_table(history(HistoryOptions(tmp_path))))
    assert made.run_id in console.export_text()


def test_cli_history_json_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    made = record(RUNS, "g", {"a": HostStats(ok=2), "b": HostStats(ok=2)})
    listed = CliRunner().invoke(cli.app, ["history", "--hosts", "g", "--json"])
    assert listed.exit_code == 0, listed.output
    document = json.loads(listed.stdout)
    jsonschema.validate(document, schemas.command("history").schema())
    assert [(r["run_id"], r["hosts_ok"], r["outcome"]) for r in document["runs"]] == [
        (made.run_id, 2, "passed")]
    shown = CliRunner().invoke(cli.app, ["history", "show", made.run_id, "--json"])
    assert shown.exit_code == 0, shown.output
    jsonschema.validate(json.loads(shown.stdout), schemas.command("history show").schema())
    assert RunRecord.model_validate_json(shown.stdout) == made
    text = CliRunner().invoke(cli.app, ["history", "show", made.run_id],
                              env={"COLUMNS": "200"})
    assert text.exit_code == 0 and "command line: orchestrate up --hosts g" in text.stdout
    missing = CliRunner().invoke(cli.app, ["history", "show", "nosuch"])
    assert missing.exit_code == 2 and "no run 'nosuch'" in missing.output


def _up(*args: str) -> Any:
    return CliRunner().invoke(cli.app, ["up", "--hosts", "g", "--retry-failed", *args])


def test_cli_retry_failed_without_a_run_or_with_nothing_to_retry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fleet.yml").write_text("groups: {g: {hosts: {a: {address: 10.0.0.1}}}}\n")
    none = _up()
    assert none.exit_code == 2 and "no recorded `up` of 'g'" in none.output
    made = record(RUNS, "g", {"a": HostStats(ok=2)})
    nothing = _up()
    assert nothing.exit_code == 0
    assert f"nothing to retry: every host passed in run {made.run_id}" in nothing.output
    as_json = _up("--json")
    assert as_json.exit_code == 0
    document = json.loads(as_json.stdout)
    jsonschema.validate(document, schemas.command("up").schema())
    assert document["retry_of"] == made.run_id and document["group"] == "g"
    # Nothing ran: no new record.
    assert len(list(RUNS.iterdir())) == 1
