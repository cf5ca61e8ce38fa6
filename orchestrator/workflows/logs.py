"""`orchestrate logs`: the journals of a group's deployment units (vllm@<name>, ollama, the
Ray units), read through the connection the stages use: one ansible-runner run of
playbooks/logs.yml over every host, `journalctl -o json` there.

Each entry carries its journal cursor; `--follow` asks each host again every few seconds
for the entries after the last cursor it printed, so that no line is printed twice and
none is lost between two reads. A host not reached is one line with the reason; the
others still print.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from orchestrator.errors import ConfigError
from orchestrator.plan.planner import HostPlan, Plan
from orchestrator.run.runner import failure_message, run_on_each_host
from orchestrator.verify.hostprobe import services
from orchestrator.workflows.common import CACHED, Result, Target, plan_for

PLAYBOOK = "playbooks/logs.yml"
# The hosts asked in the run's inventory: the run is limited to them.
GROUP = "orchestrate_logs"
# What each entry needs (journalctl adds __CURSOR and __REALTIME_TIMESTAMP to every one).
FIELDS = "MESSAGE,_SYSTEMD_UNIT,UNIT,PRIORITY"
LINES = 200
POLL_S = 2.0
_CONNECT_TIMEOUT_S = 10
_FORKS = 50


class LogRecord(Result):
    """One journal entry of a deployment's unit."""

    host: str
    unit: str = Field(description="the systemd unit it belongs to")
    time: dt.datetime = Field(description="when the journal received it (UTC)")
    message: str = Field(description="the line as logged (not escaped: print it as text)")
    priority: int | None = Field(description="syslog priority, 0 emerg .. 7 debug")
    cursor: str = Field(description="its journal cursor on that host (journalctl "
                                    "--after-cursor continues after it)")


class Unreached(Result):
    host: str
    reason: str = Field(description="why its journal could not be read")


class LogsResult(Result):
    """`orchestrate logs --json` (with --follow: one LogRecord or Unreached per line)."""

    group: str = Field(description="the host group (--hosts)")
    units: dict[str, list[str]] = Field(description="per host, the units whose journal "
                                                    "was read")
    records: list[LogRecord] = Field(description="the entries, oldest first")
    unreachable: list[Unreached] = Field(description="hosts whose journal could not be "
                                                     "read (exit 1)")


@dataclass(frozen=True)
class LogsOptions:
    target: Target
    deployment: str | None = None
    since: dt.timedelta | None = None
    lines: int = LINES


# ---------------------------------------------------------------- pure parts

def units_of(plan: Plan, deployment: str | None = None) -> dict[str, list[str]]:
    """Per host, the units of its planned deployments (or of `deployment` only): vLLM's
    instances, Ollama, and the Ray unit of a deployment that spans hosts."""
    known = {t.deployment for h in plan.hosts for t in h.probes}
    ray = plan.ray_cluster
    if ray is not None:
        known.add(ray.deployment)
    if deployment is not None and deployment not in known:
        raise ConfigError(f"no deployment '{deployment}' on the hosts of '{plan.group}' "
                          f"(deployments: {', '.join(sorted(known)) or 'none'})",
                          key="--deployment")
    out: dict[str, list[str]] = {}
    for host in plan.hosts:
        units = [s.unit for s in services(host)
                 if deployment is None or s.deployment == deployment]
        if ray is not None and host.name in ray.members and deployment in (None,
                                                                           ray.deployment):
            units.append("ray-head.service" if host.name == ray.head else "ray-worker.service")
        if units:
            out[host.name] = list(dict.fromkeys(units))
    return out


def journal_argv(units: list[str], *, since: dt.timedelta | None, lines: int | None,
                 cursor: str | None) -> list[str]:
    """journalctl's command line: after `cursor` when one was seen (every entry since,
    however many), else the last `lines` entries within `since`."""
    argv = ["journalctl", "--no-pager", "--quiet", "--output=json", f"--output-fields={FIELDS}"]
    argv += [f"--unit={u}" for u in units]
    if cursor is not None:
        return [*argv, f"--after-cursor={cursor}"]
    if since is not None:
        # Relative to the host's own clock: a control machine's clock skew moves nothing.
        argv.append(f"--since=-{max(1, int(since.total_seconds()))}s")
    if lines is not None:
        argv.append(f"--lines={lines}")
    return argv


def _text(value: Any) -> str:
    # A message that is not valid UTF-8 comes as an array of bytes; several values of one
    # field as an array of those.
    if isinstance(value, list) and all(isinstance(b, int) for b in value):
        return bytes(b & 0xFF for b in value).decode("utf-8", errors="replace")
    if isinstance(value, list):
        return " ".join(_text(v) for v in value)
    return "" if value is None else str(value)


def parse_journal(host: str, units: list[str], text: str) -> list[LogRecord]:
    """`journalctl -o json` output (one entry per line) as records; a line that is not an
    entry (cut off, or a message of journalctl's own) is skipped."""
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            cursor = str(entry["__CURSOR"])
            when = dt.datetime.fromtimestamp(int(entry["__REALTIME_TIMESTAMP"]) / 1e6, dt.UTC)
        except (ValueError, KeyError, TypeError):
            continue
        # systemd's own lines about a unit (Started, Stopped) name it in UNIT.
        named = [_text(entry.get(k)) for k in ("UNIT", "_SYSTEMD_UNIT") if entry.get(k)]
        unit = next((u for u in named if u in units), named[0] if named else "?")
        priority = _text(entry.get("PRIORITY"))
        out.append(LogRecord(host=host, unit=unit, time=when,
                             message=_text(entry.get("MESSAGE")),
                             priority=int(priority) if priority.isdigit() else None,
                             cursor=cursor))
    return out


# ---------------------------------------------------------------- one run for every host

# The one run over the hosts: per host its journalctl output, or why there is none.
Reader = Callable[[list[HostPlan], Mapping[str, list[str]], Path | None],
                  dict[str, str | Unreached]]


def read_journals(hosts: list[HostPlan], argvs: Mapping[str, list[str]],
                  operator_inventory: Path | None) -> dict[str, str | Unreached]:
    """Run each host's journalctl `argvs[host]` in one run of playbooks/logs.yml."""
    with tempfile.TemporaryDirectory(prefix="orchestrate-logs-") as tmp:
        run_path = Path(tmp)
        entries = {h.name: {**h.connection,
                            **{k: v for k, v in h.vars.items() if k.startswith("ansible_")},
                            "orchestrate_logs_argv": argvs[h.name]}
                   for h in hosts if h.name in argvs}
        # The cursors, as the fleet's values, are data (!unsafe), never templated.
        found = run_on_each_host(run_path, PLAYBOOK, GROUP, entries, operator_inventory,
                                 connect_timeout_s=_CONNECT_TIMEOUT_S, forks=_FORKS)
    out: dict[str, str | Unreached] = {}
    for name in entries:
        event, res = found.get(name, ("", {}))
        if event == "runner_on_ok":
            out[name] = str(res.get("stdout") or "")
        elif event:
            what = "not reached" if event == "runner_on_unreachable" else "journalctl failed"
            out[name] = Unreached(host=name, reason=f"{what}: {failure_message(res)}")
        else:
            out[name] = Unreached(host=name, reason="no answer from the logs run")
    return out


@dataclass
class Journals:
    """The group's journals, read again and again: each host continues after the last
    entry it gave (its cursor), so that a line is printed once and none is skipped."""

    plan: Plan
    units: dict[str, list[str]]
    since: dt.timedelta | None
    lines: int | None
    operator_inventory: Path | None = None
    read: Reader = read_journals
    cursors: dict[str, str] = field(default_factory=dict)
    # Hosts whose first read answered: nothing of theirs can be repeated any more.
    answered: set[str] = field(default_factory=set)

    def argv(self, host: str) -> list[str]:
        # A host read once without entries had none in `since` (or none at all): all it
        # has on the next read is new, however many.
        return journal_argv(self.units[host], since=self.since,
                            lines=None if host in self.answered else self.lines,
                            cursor=self.cursors.get(host))

    def poll(self) -> tuple[list[LogRecord], list[Unreached]]:
        hosts = [h for h in self.plan.hosts if h.name in self.units]
        if not hosts:
            return [], []
        answers = self.read(hosts, {h.name: self.argv(h.name) for h in hosts},
                            self.operator_inventory)
        records: list[LogRecord] = []
        unreached: list[Unreached] = []
        for name, answer in answers.items():
            if isinstance(answer, Unreached):
                unreached.append(answer)
                continue
            self.answered.add(name)
            found = parse_journal(name, self.units[name], answer)
            if found:
                self.cursors[name] = found[-1].cursor
            records += found
        return sorted(records, key=lambda r: r.time), unreached


def journals(options: LogsOptions) -> Journals:
    target = options.target
    plan = plan_for(target, facts=CACHED).plan
    return Journals(plan, units_of(plan, options.deployment), options.since, options.lines,
                    operator_inventory=target.inventory)


def read_once(found: Journals) -> LogsResult:
    records, unreached = found.poll()
    return LogsResult(group=found.plan.group, units=found.units, records=records,
                      unreachable=unreached)


def follow(found: Journals, emit: Callable[[list[LogRecord], list[Unreached]], None], *,
           every: float = POLL_S, sleep: Callable[[float], None] | None = None) -> None:
    """Print new entries until interrupted (Ctrl-C ends it: runner's Interrupted or
    KeyboardInterrupt, for the caller). A host's reason for not being read is emitted
    when it first fails or the reason changes, not at every read."""
    told: dict[str, str] = {}
    while True:
        records, unreached = found.poll()
        fresh = [u for u in unreached if told.get(u.host) != u.reason]
        told = {u.host: u.reason for u in unreached}
        if records or fresh:
            emit(records, fresh)
        (sleep or time.sleep)(every)
