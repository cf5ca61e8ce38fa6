"""`orchestrate probe`: every host over SSH and every deployment over HTTP, read-only
(with --deep, the GPU smoke test too, which runs a playbook)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pydantic import Field

from orchestrator.run.render import new_run_id
from orchestrator.verify import deepprobe
from orchestrator.verify.hostprobe import probe_all
from orchestrator.verify.httpprobe import probe_plan
from orchestrator.workflows.common import (
    CACHED,
    Events,
    Probes,
    Target,
    open_secrets,
    plan_for,
)
from orchestrator.workflows.runs import new_run, save_results


@dataclass(frozen=True)
class ProbeOptions:
    target: Target
    # Also over SSH (GPUs, torch, weights, units, sockets), not only HTTP.
    ssh: bool = True
    # Also the GPU smoke test on every GPU host (playbooks/gpu_smoke.yml).
    deep: bool = False


class ProbeRun(Probes):
    """`orchestrate probe --json`: the probe report and where the run keeps it."""

    run_id: str = Field(description="the run directory's name")
    run_dir: str = Field(description="holds plan.json, probes.json, report.html")
    report: str = Field(description="the run's HTML report")


def probe(options: ProbeOptions, events: Events) -> ProbeRun:
    target = options.target
    plan = plan_for(target, facts=CACHED, events=events).plan
    secrets = open_secrets(plan.secrets_file, target.vault_password_file)
    report = (probe_all(plan, secrets=secrets, operator_inventory=target.inventory)
              if options.ssh else probe_plan(plan, secrets=secrets))
    if options.deep:
        events.log("GPU smoke test (playbooks/gpu_smoke.yml) on the GPU hosts")
        smoke = deepprobe.run_smoke(plan, target.runs_root,
                                    new_run_id(dt.datetime.now(), "smoke"),
                                    operator_inventory=target.inventory,
                                    vault_password_file=target.vault_password_file)
        report = deepprobe.merged(report, smoke, plan)
    run_dir = new_run(plan, target.runs_root, "probe")
    html = save_results(run_dir, command="probe", plan=plan, probes=report)
    return ProbeRun.model_validate({**dict(report), "run_id": run_dir.name,
                                    "run_dir": str(run_dir), "report": str(html)})
