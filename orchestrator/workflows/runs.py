"""Run directories: one is made for every command that works on hosts (render makes it,
with or without a playbook), what the command found is saved there, and `status` reads
the last one back.

    .orchestrate/runs/<YYYYmmdd-HHMMSS-ffffff>-<command>/
      plan.json     the plan                       (run.render.make_run_dir)
      probes.json   the probe report, if probed    (save_results)
      bench.json    the benchmark, if one ran      (save_results)
      report.html   the HTML report                (save_results)
      artifacts/ansible/{status,rc}   ansible-runner's outcome, if a playbook ran
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from pydantic import Field, ValidationError

from orchestrator.plan.planner import Plan
from orchestrator.report import htmlreport
from orchestrator.run.render import make_run_dir, new_run_id
from orchestrator.verify.bench import BenchReport
from orchestrator.verify.httpprobe import ProbeReport
from orchestrator.workflows.common import Result

PROBES = "probes.json"
BENCH = "bench.json"
_ID_TIME = "%Y%m%d-%H%M%S-%f"


def new_run(plan: Plan, runs_root: Path, command: str) -> Path:
    """A fresh run directory for a command that runs no playbook (probe, bench)."""
    return make_run_dir(plan, runs_root, new_run_id(dt.datetime.now(), command))


def save_results(run_dir: Path, *, command: str, plan: Plan, probes: ProbeReport | None,
                 bench: BenchReport | None = None) -> Path:
    """Write what the command found into its run directory; the HTML report's path."""
    if probes is not None:
        (run_dir / PROBES).write_text(probes.model_dump_json(indent=2) + "\n",
                                      encoding="utf-8")
    if bench is not None:
        (run_dir / BENCH).write_text(bench.model_dump_json(indent=2) + "\n", encoding="utf-8")
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


def last_run(runs_root: Path, group: str) -> LastRun | None:
    """The newest run directory whose plan is for `group`, or None."""
    if not runs_root.is_dir():
        return None
    # Run ids begin with their time, so that names sort as runs were started.
    for path in sorted(runs_root.iterdir(), key=lambda p: p.name, reverse=True):
        try:
            started = dt.datetime.strptime(path.name[:22], _ID_TIME)
            planned = json.loads((path / "plan.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        if not isinstance(planned, dict) or planned.get("group") != group:
            continue
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
    return None
