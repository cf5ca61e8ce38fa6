"""`orchestrate probe --deep`: the GPU smoke test on every GPU host of a plan.

playbooks/gpu_smoke.yml runs orchestrator/verify/gpu_smoke.py on each host through ansible-runner
(it changes the host, if briefly: a transient vLLM server, compiled helpers) and saves each
host's JSON answer into the run directory; every check becomes a probe result named
`smoke:<check>`. A host that gave no answer gets one failed `smoke` result with what Ansible
said.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from orchestrator.plan.planner import Plan
from orchestrator.run.render import PLAYBOOK as SITE
from orchestrator.run.render import ROOT, render
from orchestrator.run.runner import Progress, RunResult, run_playbook
from orchestrator.verify.httpprobe import ProbeReport, ProbeResult

PLAYBOOK = "playbooks/gpu_smoke.yml"
RESULTS = "gpu-smoke"
STATUSES = ("pass", "fail", "skip")


def smoke_plan(plan: Plan, results_dir: Path) -> Plan:
    """The plan's GPU hosts, each told where to save its result and where the smoke test's
    files are (beside this module, in a checkout and in an installed wheel alike)."""
    here = str(Path(__file__).resolve().parent)
    return plan.model_copy(update={"hosts": [
        h.model_copy(update={"vars": {**h.vars, "gpu_smoke_results_dir": str(results_dir),
                                      "gpu_smoke_source_dir": here}})
        for h in plan.hosts if h.profile == "gpu"]})


def results_from(plan: Plan, results_dir: Path, outcome: RunResult) -> list[ProbeResult]:
    """Each host's saved JSON as probe results; a missing or unreadable one as a failure."""
    out: list[ProbeResult] = []
    for host in plan.hosts:
        path = results_dir / f"{host.name}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            out += [ProbeResult(host=host.name, deployment="", probe=f"smoke:{c['check']}",
                                passed=c["status"] != "fail", status=c["status"],
                                evidence=str(c["evidence"]),
                                next_step=c.get("next_step") if c["status"] == "fail" else None)
                    for c in data["checks"] if c["status"] in STATUSES]
        except FileNotFoundError:
            said = [f"{f.task}: {f.message}" for f in outcome.failures if f.host == host.name]
            out.append(ProbeResult(
                host=host.name, deployment="", probe="smoke", passed=False,
                evidence=("; ".join(said) or f"no result (ansible-playbook {outcome.status}, "
                          f"exit {outcome.rc})"),
                next_step=f"run `sudo scripts/gpu-smoke` on {host.name} by hand; the run's "
                          f"output is under {results_dir.parent}/artifacts"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            out.append(ProbeResult(
                host=host.name, deployment="", probe="smoke", passed=False,
                evidence=f"{path}: not a smoke test result: {type(exc).__name__}: {exc}",
                next_step=f"check the env's python on {host.name} (gpu_smoke_env)"))
    return out


def run_smoke(plan: Plan, runs_root: Path, run_id: str, *,
              operator_inventory: Path | None = None, vault_password_file: Path | None = None,
              on_progress: Callable[[Progress], None] = lambda _: None) -> list[ProbeResult]:
    """Run the smoke test on the plan's GPU hosts; their results (none without GPU hosts)."""
    results_dir = (runs_root / run_id).resolve() / RESULTS
    gpu = smoke_plan(plan, results_dir)
    if not gpu.hosts:
        return []
    run = render(gpu, runs_root, run_id, operator_inventory=operator_inventory,
                 vault_password_file=vault_password_file)
    results_dir.mkdir()
    run = dataclasses.replace(run, playbook=PLAYBOOK, tags=[], skip_tags=[])
    replay = run.path / "command.txt"
    replay.write_text(replay.read_text(encoding="utf-8").replace(str(ROOT / SITE),
                                                                 str(ROOT / PLAYBOOK)),
                      encoding="utf-8")
    return results_from(gpu, results_dir, run_playbook(run, on_progress))


def merged(report: ProbeReport, smoke: list[ProbeResult], plan: Plan) -> ProbeReport:
    """The report with the smoke results, per host in the plan's order, smoke last."""
    order = {h.name: i for i, h in enumerate(plan.hosts)}
    results = sorted([*report.results, *smoke], key=lambda r: order.get(r.host, len(order)))
    return ProbeReport(group=report.group, results=results)
