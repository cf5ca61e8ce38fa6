"""`orchestrate history`: the runs kept in .orchestrate/runs, newest first, and one run in
full; and which hosts `up --retry-failed` runs on. Recorded runs are read from their
run.json; an older run directory without one from what its files tell (plan.json,
ansible-runner's status and rc, probes.json)."""

from __future__ import annotations

import datetime as dt
import socket
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table

from orchestrator.errors import ConfigError
from orchestrator.run.lock import pid_alive
from orchestrator.workflows.common import Result
from orchestrator.workflows.runs import (
    LastRun,
    Outcome,
    RunRecord,
    last_up,
    legacy_group,
    newest_first,
    read_legacy,
    read_record,
)


@dataclass(frozen=True)
class HistoryOptions:
    runs_root: Path
    group: str | None = None
    limit: int = 20


class HistoryEntry(Result):
    """One past run, in a line."""

    run_id: str = Field(description="its id: `orchestrate history show ID`")
    command: str
    group: str
    started: dt.datetime = Field(description="when it started (UTC)")
    outcome: str = Field(description="passed, failed, interrupted, error, running, died "
                                     "(running when its process ended: a crash), unknown")
    hosts_ok: int
    hosts_failed: int
    hosts_unreachable: int
    hosts_skipped: int
    changed: int | None = Field(description="changed tasks; null when not recorded")
    duration_s: float | None
    who: str = Field(description="user@control-host; ? for an older run without run.json")
    fleet_sha256: str | None = Field(description="the fleet file's sha256")
    recorded: bool = Field(description="false: an older run directory without run.json")


class HistoryResult(Result):
    """`orchestrate history --json`."""

    group: str | None = Field(description="--hosts, null for every group")
    runs: list[HistoryEntry] = Field(description="newest first, at most --limit")


def from_legacy(found: LastRun, group: str) -> RunRecord:
    """A run directory without run.json, as a record of what its files tell."""
    started = found.started.astimezone(dt.UTC)  # its id's time is local
    outcome: Outcome = ("unknown" if found.passed is None
                        else "passed" if found.passed else "failed")
    return RunRecord(
        run_id=found.run_id, recorded=False, command=found.command, argv=[], group=group,
        user=None, control_host=None, pid=None, started=started, finished=None,
        duration_s=None, outcome=outcome, error=None, check=False, stages=[], retry_of=None,
        hosts={}, changed=None, probes_total=found.probes_total,
        probes_failed=found.probes_failed, fleet_file=None, fleet_sha256=None,
        fleet_copy=None, releases=[], run_dirs=[found.run_dir])


def shown_outcome(record: RunRecord) -> str:
    """Its outcome, where `running` is checked: a run of this host whose process is gone
    died without finishing its record."""
    if (record.outcome == "running" and record.control_host == socket.gethostname()
            and record.pid is not None and not pid_alive(record.pid)):
        return "died"
    return record.outcome


def _entry(record: RunRecord) -> HistoryEntry:
    return HistoryEntry(
        run_id=record.run_id, command=record.command, group=record.group,
        started=record.started, outcome=shown_outcome(record), hosts_ok=record.count("ok"),
        hosts_failed=record.count("failed"), hosts_unreachable=record.count("unreachable"),
        hosts_skipped=record.count("skipped"), changed=record.changed,
        duration_s=record.duration_s, who=record.who, fleet_sha256=record.fleet_sha256,
        recorded=record.recorded)


def _all(runs_root: Path, group: str | None) -> list[RunRecord]:
    """Every run of `group` (None: all), newest first: recorded ones, and older directories
    that no record names as one of its playbook runs."""
    read = [(path, read_record(path)) for path in newest_first(runs_root)]
    claimed = {Path(d).name for _, r in read if r is not None for d in r.run_dirs}
    found: list[RunRecord] = []
    for path, record in read:
        if record is None and path.name not in claimed:
            legacy_of = legacy_group(path)
            legacy = read_legacy(path) if legacy_of is not None else None
            record = from_legacy(legacy, legacy_of) if legacy and legacy_of else None
        if record is not None and (group is None or record.group == group):
            found.append(record)
    return found


def history(options: HistoryOptions) -> HistoryResult:
    return HistoryResult(group=options.group,
                         runs=[_entry(r) for r in _all(options.runs_root, options.group)
                               [:max(options.limit, 0)]])


def show(runs_root: Path, run_id: str) -> RunRecord:
    """One run in full, by its id, or by the id of one of its playbook runs."""
    path = runs_root / run_id
    if "/" in run_id or run_id in ("", ".", ".."):
        raise ConfigError(f"'{run_id}' is not a run id (see `orchestrate history`)", key="ID")
    found = read_record(path)
    if found is not None:
        return found
    for record in _all(runs_root, None):
        if record.recorded and run_id in {Path(d).name for d in record.run_dirs}:
            return record
    group = legacy_group(path)
    legacy = read_legacy(path) if group is not None else None
    if legacy is None or group is None:
        raise ConfigError(f"no run '{run_id}' in {runs_root} (see `orchestrate history`)",
                          key="ID")
    return from_legacy(legacy, group)


# --- `up --retry-failed` -----------------------------------------------------------------------

@dataclass(frozen=True)
class RetrySelection:
    run_id: str
    hosts: frozenset[str]


class NothingToRetry(Result):
    """`orchestrate up --retry-failed --json` when the last run left no host to retry."""

    group: str
    retry_of: str = Field(description="the last `up` run of the group: every host passed")
    message: str


def retry_selection(runs_root: Path, group: str) -> RetrySelection:
    """The hosts that failed (a task or a probe) or were unreachable in the last `up` of
    `group`; ConfigError (exit 2) without a recorded one to retry."""
    last = last_up(runs_root, group)
    if last is None:
        raise ConfigError(f"no recorded `up` of '{group}' in {runs_root} to retry: run "
                          f"`orchestrate up --hosts {group}` (runs older than run records "
                          "cannot be retried)", key="--retry-failed")
    if last.outcome not in ("passed", "failed"):
        raise ConfigError(f"the last `up` of '{group}' ({last.run_id}) ended "
                          f"{shown_outcome(last)}, without an outcome per host: run "
                          f"`orchestrate up --hosts {group}` again", key="--retry-failed")
    return RetrySelection(last.run_id, frozenset(
        name for name, host in last.hosts.items() if host.needs_retry))


# --- tables ------------------------------------------------------------------------------------

_STYLE = {"passed": "green", "failed": "red", "died": "red", "error": "red",
          "interrupted": "yellow", "running": "cyan"}


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}s"


def _outcome(text: str) -> str:
    style = _STYLE.get(text)
    return f"[{style}]{escape(text)}[/{style}]" if style else escape(text)


def history_table(result: HistoryResult) -> Table:
    table = Table(title=f"runs of {escape(result.group or 'every group')}, newest first")
    # The run id is what `history show` takes: never shortened, whatever the terminal's width.
    table.add_column("run", no_wrap=True,
                     min_width=max((len(run.run_id) for run in result.runs), default=3))
    for column in ("command", "group", "outcome", "hosts ok/failed/unreachable",
                   "changed", "duration", "who", "fleet"):
        table.add_column(column)
    for run in result.runs:
        hosts = (f"{run.hosts_ok}/{run.hosts_failed}/{run.hosts_unreachable}"
                 if run.recorded else "")
        table.add_row(escape(run.run_id), escape(run.command), escape(run.group),
                      _outcome(run.outcome), hosts,
                      "" if run.changed is None else str(run.changed),
                      _seconds(run.duration_s), escape(run.who),
                      escape((run.fleet_sha256 or "")[:12]))
    return table


def record_view(record: RunRecord) -> RenderableType:
    """One run in full: what, who, when, then per host, failures, probes and the release."""
    lines = [f"run {escape(record.run_id)}: {escape(record.command)} on "
             f"{escape(record.group)}: {_outcome(shown_outcome(record))}"]
    if record.error:
        lines.append(f"  {escape(record.error)}")
    if not record.recorded:
        lines.append("  (an older run directory without run.json: read from its files)")
    facts = [("command line", " ".join(record.argv)), ("who", record.who),
             ("started", f"{record.started:%Y-%m-%d %H:%M:%S} UTC"),
             ("duration", _seconds(record.duration_s)),
             ("check mode", "yes" if record.check else ""),
             ("stages", ", ".join(record.stages)), ("retry of", record.retry_of or ""),
             ("changed", "" if record.changed is None else str(record.changed)),
             ("probes failed", "" if record.probes_total is None
              else f"{record.probes_failed}/{record.probes_total}"),
             ("fleet", f"{record.fleet_file or ''} {record.fleet_sha256 or ''}".strip()),
             ("fleet copy", str(record.fleet_copy or "")),
             ("run dirs", ", ".join(record.run_dirs))]
    lines += [f"  {name}: {escape(value)}" for name, value in facts if value]
    parts: list[RenderableType] = ["\n".join(lines)]
    if record.hosts:
        hosts = Table(title="hosts")
        for column in ("host", "outcome", "ok", "changed", "failed", "unreachable",
                       "probes failed"):
            hosts.add_column(column)
        for name, host in record.hosts.items():
            t = host.tasks
            hosts.add_row(escape(name), _outcome({"ok": "passed"}.get(host.outcome,
                                                                      host.outcome)),
                          *(("", "", "", "") if t is None else
                            (str(t.ok), str(t.changed), str(t.failed), str(t.unreachable))),
                          escape(", ".join(f"{p.deployment}/{p.probe}"
                                           for p in host.probes_failed)))
        parts.append(hosts)
    problems = [f"  {escape(name)}: {escape(f.play)} / {escape(f.task)}: "
                f"{escape(f.message)}" for name, host in record.hosts.items()
                for f in host.failures]
    problems += [f"  {escape(name)}: probe {escape(p.deployment)}/{escape(p.probe)}: "
                 f"{escape(p.evidence)}" + (f" (next: {escape(p.next_step)})"
                                            if p.next_step else "")
                 for name, host in record.hosts.items() for p in host.probes_failed]
    if problems:
        parts.append("\n".join(["failures:", *problems]))
    if record.releases:
        release = Table(title="release")
        for column in ("deployment", "engine", "version", "model", "revision", "hosts"):
            release.add_column(column)
        for r in record.releases:
            release.add_row(escape(r.deployment), escape(r.engine),
                            escape(r.engine_version or ""), escape(r.model_id or ""),
                            escape(r.revision or ""), escape(", ".join(r.hosts)))
        parts.append(release)
    return Group(*parts)
