"""Run directories: one is made for every command that works on hosts (render makes it,
with or without a playbook), what the command found is saved there, and `status` reads
the last one back.

    .orchestrate/runs/<YYYYmmdd-HHMMSS-ffffff>-<command>/
      plan.json     the plan                       (run.render.make_run_dir)
      probes.json   the probe report, if probed    (save_results)
      bench.json    the benchmark, if one ran      (save_results)
      report.html   the HTML report                (save_results)
      artifacts/ansible/{status,rc}   ansible-runner's outcome, if a playbook ran

A command that changes hosts (up) also has a directory of its own, made when it starts:

    .orchestrate/runs/<id>-up/
      run.json      the run's record (RunRecord): written "running" at the start, with
                    its outcome per host, the release and its playbook runs at the end
      fleet.yml     the fleet file as it was, for a later --rollback (fleet_sha256)
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from orchestrator.errors import one_line
from orchestrator.plan.planner import MIRROR_MODELS, Plan
from orchestrator.report import htmlreport
from orchestrator.run.render import make_run_dir, new_run_id, write_private
from orchestrator.run.runner import HostStats, Interrupted, TaskFailure
from orchestrator.verify.bench import BenchReport
from orchestrator.verify.httpprobe import ProbeReport
from orchestrator.workflows.common import DEFAULT_FLEET, Result, Target

PROBES = "probes.json"
BENCH = "bench.json"
_ID_TIME = "%Y%m%d-%H%M%S-%f"


def new_run(plan: Plan, runs_root: Path, command: str) -> Path:
    """A fresh run directory for a command that runs no playbook (probe, bench), with its
    provisional record (run.json, running); save_results ends it."""
    run_id = new_run_id(dt.datetime.now(), command)
    path = make_run_dir(plan, runs_root, run_id)
    _begin(path, run_id, command=command, group=plan.group, fleet_file=None)
    return path


def save_results(run_dir: Path, *, command: str, plan: Plan, probes: ProbeReport | None,
                 bench: BenchReport | None = None) -> Path:
    """Write what the command found into its run directory; the HTML report's path."""
    if probes is not None:
        (run_dir / PROBES).write_text(probes.model_dump_json(indent=2) + "\n",
                                      encoding="utf-8")
    if bench is not None:
        (run_dir / BENCH).write_text(bench.model_dump_json(indent=2) + "\n", encoding="utf-8")
    recorded = read_record(run_dir)
    if recorded is not None and recorded.outcome == "running":
        passed = (probes is None or probes.passed) and (bench is None or bench.passed)
        Recorder(run_dir, recorded).end(
            "passed" if passed else "failed", hosts=probed_hosts(plan, probes),
            probes_total=len(probes.results) if probes else None,
            probes_failed=sum(not r.passed for r in probes.results) if probes else None,
            releases=releases([plan]))
    return htmlreport.write_report(run_dir, command=command, plan=plan, probes=probes,
                                   bench=bench)


class LastRun(Result):
    """The newest run directory of a group, as far as its files tell."""

    run_id: str = Field(description="the run directory's name")
    run_dir: str
    command: str = Field(description="the orchestrate command that made it (up, probe, "
                                     "bench, smoke)")
    started: dt.datetime = Field(description="local time the run began (from its id)")
    ansible_status: str | None = Field(description="ansible-runner's status (successful, "
                                                   "failed, ...), null if no playbook ran "
                                                   "or it did not finish")
    ansible_rc: int | None = Field(description="ansible-playbook's exit code")
    probes_failed: int | None = Field(description="failed probes, null if it probed nothing")
    probes_total: int | None = Field(description="probes run, null if none")
    passed: bool | None = Field(description="its playbook and probes passed; null when "
                                            "neither left a result")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def read_legacy(path: Path) -> LastRun | None:
    """What a run directory's files tell without run.json: None unless it holds a plan."""
    try:
        started = dt.datetime.strptime(path.name[:22], _ID_TIME)
        planned = json.loads((path / "plan.json").read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    if not isinstance(planned, dict) or not isinstance(planned.get("group"), str):
        return None
    status = _read(path / "artifacts" / "ansible" / "status")
    rc_text = _read(path / "artifacts" / "ansible" / "rc")
    rc = int(rc_text) if rc_text and rc_text.lstrip("-").isdigit() else None
    probes = None
    text = _read(path / PROBES)
    if text is not None:
        try:
            probes = ProbeReport.model_validate_json(text)
        except ValidationError:
            probes = None
    failed = sum(not r.passed for r in probes.results) if probes else None
    verdicts = ([rc == 0] if rc is not None else []) + (
        [failed == 0] if probes is not None else [])
    return LastRun(run_id=path.name, run_dir=str(path.resolve()),
                   command=path.name[23:], started=started, ansible_status=status,
                   ansible_rc=rc, probes_failed=failed,
                   probes_total=len(probes.results) if probes else None,
                   passed=all(verdicts) if verdicts else None)


def legacy_group(path: Path) -> str | None:
    """The group of a run directory's plan.json."""
    try:
        planned = json.loads((path / "plan.json").read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    group = planned.get("group") if isinstance(planned, dict) else None
    return group if isinstance(group, str) else None


def last_run(runs_root: Path, group: str) -> LastRun | None:
    """The newest run directory whose plan is for `group`, or None."""
    for path in newest_first(runs_root):
        if legacy_group(path) == group:
            found = read_legacy(path)
            if found is not None:
                return found
    return None


# --- run records: run.json, one per run of a command that works on hosts ----------------------

RECORD = "run.json"
FLEET_COPY = "fleet.yml"

Outcome = Literal["running", "passed", "failed", "interrupted", "error", "unknown"]
HostOutcome = Literal["ok", "failed", "unreachable", "skipped"]


class RecordedTask(Result):
    """A failed task of one host."""

    play: str
    task: str
    message: str = Field(description="why it failed, in a few lines")
    unreachable: bool = Field(description="the host was not reached")


class RecordedProbe(Result):
    """A failed probe of one host."""

    deployment: str
    probe: str
    evidence: str
    next_step: str | None


class RecordedHost(Result):
    """What one run did on one host."""

    outcome: HostOutcome = Field(description="from ansible-runner's per-host stats: ok, "
                                             "failed (a task failed), unreachable, skipped "
                                             "(planned, but no playbook reached it); of a "
                                             "command without a playbook (probe, bench): "
                                             "failed when a probe of the host failed")
    tasks: HostStats | None = Field(description="ansible-runner's per-host task counts; null "
                                                "when no playbook reached the host")
    failures: list[RecordedTask] = Field(description="its failed tasks")
    probes_failed: list[RecordedProbe] = Field(description="its failed probes")

    @property
    def needs_retry(self) -> bool:
        return self.outcome in ("failed", "unreachable") or bool(self.probes_failed)


class DeploymentRelease(Result):
    """What a deployment ran in this run, on which hosts (one entry per distinct release)."""

    deployment: str
    engine: str = Field(description="vllm or ollama")
    engine_version: str | None = Field(description="the vLLM release pinned (vllm_requirement) "
                                                   "or the Ollama release")
    model_id: str | None = Field(description="the model (catalog or ModelScope id, or Ollama "
                                             "tag)")
    revision: str | None = Field(description="the model's revision as planned (a moving one "
                                             "pinned to the hub's commit); null for a model "
                                             "directory or an Ollama tag")
    hosts: list[str]


class RunRecord(Result):
    """One run of a command on a group: `orchestrate history show ID --json`."""

    run_id: str = Field(description="the record's run directory name")
    recorded: bool = Field(description="false for an older run directory without run.json, "
                                       "read from its files (fewer fields known)")
    command: str = Field(description="the orchestrate command (up, probe, bench, ...)")
    argv: list[str] = Field(description="the command line, secrets masked")
    group: str = Field(description="the host group (--hosts)")
    user: str | None = Field(description="who ran it")
    control_host: str | None = Field(description="the machine it ran on")
    pid: int | None = Field(description="its process id there")
    started: dt.datetime = Field(description="when it started (UTC)")
    finished: dt.datetime | None = Field(description="when it ended; null while running or "
                                                     "when it died without a word")
    duration_s: float | None = Field(description="seconds from start to end")
    outcome: Outcome = Field(description="running (or died while running), passed, failed "
                                         "(a playbook or a probe), interrupted (Ctrl-C), "
                                         "error (stopped by bad input or a failure before "
                                         "the hosts were reached), unknown (no result left)")
    error: str | None = Field(description="why it was interrupted or stopped")
    check: bool = Field(description="--check: nothing was changed")
    stages: list[str] = Field(description="the stages asked for")
    retry_of: str | None = Field(description="--retry-failed: the run whose failed hosts "
                                              "this one ran on")
    hosts: dict[str, RecordedHost] = Field(description="per planned host, what the run did")
    changed: int | None = Field(description="changed tasks, all hosts together")
    probes_total: int | None = Field(description="probes run; null if none")
    probes_failed: int | None = Field(description="failed probes; null if none ran")
    fleet_file: str | None = Field(description="the fleet file used (absolute); null for the "
                                               "built-in sandbox or an inventory alone")
    fleet_sha256: str | None = Field(description="its sha256 when the run started")
    fleet_copy: Path | None = Field(description="its copy, as it was, in the run directory")
    releases: list[DeploymentRelease] = Field(description="per deployment the engine, its "
                                                          "version, the model and revision")
    run_dirs: list[str] = Field(description="the run directories of its playbook runs")

    @property
    def who(self) -> str:
        return f"{self.user}@{self.control_host}" if self.user else "?"

    def count(self, outcome: HostOutcome) -> int:
        return sum(h.outcome == outcome for h in self.hosts.values())


# Secrets never belong in argv (the CLI takes none there); a value that looks like one is
# masked all the same: an option or KEY=VALUE named like a secret, or a known token shape.
_SECRET_NAME = re.compile(r"(?i)(token|secret|passw(or)?d|api[-_]?key|credential)")
_TOKEN = re.compile(r"(?:hf_|sk-|ms-|ghp_|github_pat_)[A-Za-z0-9_-]{8,}"
                    r"|(?=[A-Za-z_]*[0-9])(?=[0-9_]*[A-Za-z])[A-Za-z0-9_]{32,}")
_MASK = "***"


def _names_secret(option: str) -> bool:
    # A file or variable holding a secret is named, not the secret.
    return bool(_SECRET_NAME.search(option)) and not option.endswith(("-file", "-var", "_file"))


def scrub_argv(argv: list[str]) -> list[str]:
    """`argv` with anything that looks like a secret masked."""
    out: list[str] = []
    for index, arg in enumerate(argv):
        previous = argv[index - 1] if index else ""
        name, eq, _ = arg.partition("=")
        if previous.startswith("-") and "=" not in previous and _names_secret(previous):
            out.append(_MASK)
        elif eq and _names_secret(name):
            out.append(f"{name}={_MASK}")
        elif _TOKEN.search(arg) and not any(c in arg for c in "/."):
            out.append(_TOKEN.sub(_MASK, arg))
        else:
            out.append(arg)
    return out


def _version(requirement: object) -> str | None:
    text = str(requirement) if requirement else ""
    return text.partition("==")[2] or text or None


def _revision(entry: dict[str, Any]) -> str | None:
    """A weights entry's revision; from the mirror, the last part of the model's key in it
    (planner.weights_origin: modelscope/<model>/<revision>)."""
    if entry.get("revision"):
        return str(entry["revision"])
    url = str(entry.get("manifest_url") or "")
    return url.rsplit("/", 2)[-2] if f"/{MIRROR_MODELS}/modelscope/" in url else None


def releases(plans: list[Plan]) -> list[DeploymentRelease]:
    """Per deployment what its hosts run, from the plans (a later one wins for a host)."""
    hosts = {h.name: h for plan in plans for h in plan.hosts}
    found: dict[tuple[str | None, ...], list[str]] = {}
    for host in hosts.values():
        weights = {str(w.get("name")): w for w in host.vars.get("model_weights_models") or []
                   if isinstance(w, dict)}
        for probe in host.probes:
            entry = weights.get(probe.deployment, {})
            version = _version(host.vars.get("vllm_requirement" if probe.engine == "vllm"
                                             else "ollama_version"))
            # An Ollama deployment pulls a tag: its served name.
            model = entry.get("model_id") or probe.served_model_name
            key = (probe.deployment, probe.engine, version, model, _revision(entry))
            found.setdefault(key, []).append(host.name)
    return [DeploymentRelease(deployment=str(d), engine=str(e), engine_version=v, model_id=m,
                              revision=r, hosts=sorted(names))
            for (d, e, v, m, r), names in sorted(found.items(), key=lambda kv: str(kv[0]))]


def host_records(plans: list[Plan], stats: dict[str, HostStats], failures: list[TaskFailure],
                 probes: ProbeReport | None) -> dict[str, RecordedHost]:
    """Per planned host its outcome, from the playbooks' per-host stats and the probes."""
    names = [h.name for plan in plans for h in plan.hosts]
    out: dict[str, RecordedHost] = {}
    for name in dict.fromkeys([*names, *stats]):
        counts = stats.get(name)
        failed = [RecordedTask(play=f.play, task=f.task, message=f.message,
                               unreachable=f.unreachable) for f in failures if f.host == name]
        outcome: HostOutcome = (
            "skipped" if counts is None and not failed
            else "unreachable" if (counts and counts.unreachable) or any(
                f.unreachable for f in failed)
            else "failed" if (counts and counts.failed) or failed else "ok")
        out[name] = RecordedHost(
            outcome=outcome, tasks=counts, failures=failed,
            probes_failed=[RecordedProbe(deployment=r.deployment, probe=r.probe,
                                         evidence=r.evidence, next_step=r.next_step)
                           for r in (probes.results if probes else [])
                           if r.host == name and not r.passed])
    return out


def probed_hosts(plan: Plan, probes: ProbeReport | None) -> dict[str, RecordedHost]:
    """Per host of a command that runs no playbook: failed where a probe of it failed."""
    hosts = host_records([plan], {h.name: HostStats() for h in plan.hosts}, [], probes)
    return {name: host.model_copy(update={"outcome": "failed", "tasks": None})
            if host.probes_failed else host.model_copy(update={"tasks": None})
            for name, host in hosts.items()}


def _write_json(path: Path, text: str) -> None:
    # Whole or not at all: a crash while writing leaves the previous record.
    part = path.with_name(f".{path.name}.part")
    write_private(part, text)
    os.replace(part, path)


class Recorder:
    """Writes one run's run.json: provisional (running) at its start, final at its end."""

    def __init__(self, path: Path, record: RunRecord) -> None:
        self.path = path
        self.record = record

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def write(self, **update: Any) -> RunRecord:
        self.record = self.record.model_copy(update=update)
        _write_json(self.path / RECORD, self.record.model_dump_json(indent=2) + "\n")
        return self.record

    def end(self, outcome: Outcome, **update: Any) -> RunRecord:
        now = dt.datetime.now(dt.UTC)
        return self.write(outcome=outcome, finished=now,
                          duration_s=round((now - self.record.started).total_seconds(), 3),
                          **update)

    def finish(self, *, passed: bool, run_dirs: list[str], stats: dict[str, HostStats],
               failures: list[TaskFailure], probes: ProbeReport | None) -> RunRecord:
        """The run ended: its outcome per host and release (from the plans of its playbook
        runs, `run_dirs`), and what its playbooks and probes found."""
        plans = [Plan.model_validate_json((Path(d) / "plan.json").read_text(encoding="utf-8"))
                 for d in run_dirs]
        return self.end("passed" if passed else "failed",
                        hosts=host_records(plans, stats, failures, probes),
                        changed=sum(s.changed for s in stats.values()),
                        probes_total=len(probes.results) if probes else None,
                        probes_failed=sum(not r.passed for r in probes.results)
                        if probes else None,
                        releases=releases(plans), run_dirs=run_dirs)

    @contextmanager
    def recording(self) -> Iterator[Recorder]:
        """The run's block: an exception out of it is recorded (interrupted, or error with
        its message), then goes on."""
        try:
            yield self
        except BaseException as exc:
            if self.record.outcome == "running":
                stopped = isinstance(exc, KeyboardInterrupt | Interrupted)
                self.end("interrupted" if stopped else "error",
                         error=one_line(str(exc)) or type(exc).__name__)
            raise


def fleet_file_of(target: Target) -> Path | None:
    """The fleet file `target` reads (as common.load finds it); None for a built-in fleet or
    an inventory alone."""
    if target.builtin is not None:
        return None
    if target.fleet is not None:
        return target.fleet
    return DEFAULT_FLEET if DEFAULT_FLEET.is_file() else None


def start_record(runs_root: Path, run_id: str, *, command: str, group: str,
                 fleet_file: Path | None, check: bool = False,
                 stages: list[str] | None = None, retry_of: str | None = None,
                 argv: list[str] | None = None) -> Recorder:
    """The run directory `run_id` with a provisional record (outcome running) and a copy of
    the fleet file: a run that dies leaves it saying so."""
    path = (runs_root / run_id).resolve()
    runs_root.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700)
    return _begin(path, run_id, command=command, group=group, fleet_file=fleet_file,
                  check=check, stages=stages, retry_of=retry_of, argv=argv)


def _begin(path: Path, run_id: str, *, command: str, group: str, fleet_file: Path | None,
           check: bool = False, stages: list[str] | None = None, retry_of: str | None = None,
           argv: list[str] | None = None) -> Recorder:
    """The provisional record of a run in its directory `path`."""
    digest = copy = None
    if fleet_file is not None and fleet_file.is_file():
        data = fleet_file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        copy = path / FLEET_COPY
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    line = list(sys.argv if argv is None else argv)
    record = RunRecord(
        run_id=run_id, recorded=True, command=command,
        argv=scrub_argv([Path(line[0]).name, *line[1:]] if line else []),
        group=group, user=getpass.getuser(), control_host=socket.gethostname(),
        pid=os.getpid(), started=dt.datetime.now(dt.UTC), finished=None, duration_s=None,
        outcome="running", error=None, check=check, stages=list(stages or []),
        retry_of=retry_of, hosts={}, changed=None, probes_total=None, probes_failed=None,
        fleet_file=str(fleet_file.resolve()) if fleet_file is not None else None,
        fleet_sha256=digest, fleet_copy=copy, releases=[], run_dirs=[])
    recorder = Recorder(path, record)
    recorder.write()
    return recorder


def read_record(run_dir: Path) -> RunRecord | None:
    """The run.json of `run_dir`, or None (none, or unreadable)."""
    try:
        return RunRecord.model_validate_json((run_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValidationError):
        return None


def newest_first(runs_root: Path) -> list[Path]:
    if not runs_root.is_dir():
        return []
    # Run ids begin with their time, so that names sort as runs were started.
    return sorted((p for p in runs_root.iterdir() if p.is_dir()), key=lambda p: p.name,
                  reverse=True)


def records(runs_root: Path, group: str | None = None) -> list[RunRecord]:
    """The recorded runs (run.json) of `group` (None: all), newest first."""
    found = (read_record(p) for p in newest_first(runs_root))
    return [r for r in found if r is not None and (group is None or r.group == group)]


def last_up(runs_root: Path, group: str) -> RunRecord | None:
    """The newest recorded `up` of `group` that was not a --check."""
    return next((r for r in records(runs_root, group) if r.command == "up" and not r.check),
                None)


def last_successful_run(runs_root: Path, group: str) -> RunRecord | None:
    """The newest `up` of `group` that passed (not --check) and whose fleet file was copied
    (runs of the built-in sandbox or an inventory alone have none): its `fleet_copy` is the
    fleet it ran, `releases` what it served."""
    return next((r for r in records(runs_root, group)
                 if r.command == "up" and not r.check and r.outcome == "passed"
                 and r.fleet_copy is not None and r.fleet_copy.is_file()), None)
