"""`orchestrate monitoring`: the Prometheus scrape config (file_sd targets), alert rules and
Grafana dashboard of a host group, written to a folder; `up` writes the same into its run
directory. Reaches no host: the plan comes from the cached facts, as `plan` makes it."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from orchestrator.knowledge.roles import load_role_defaults
from orchestrator.mirror import pins
from orchestrator.plan.monitoring import MonitoringPlan, plan_monitoring
from orchestrator.run.monitoring import write_monitoring
from orchestrator.workflows.common import (
    CACHED,
    Events,
    Planned,
    Result,
    Target,
    find_facts,
    load,
    make_planned,
)


class MonitoringResult(Result):
    """`orchestrate monitoring --json`: what Prometheus scrapes, and the files written."""

    plan: MonitoringPlan = Field(description="the scrape targets")
    out: str = Field(description="the folder written (prometheus.yml inside)")
    files: list[str] = Field(description="every file written, under `out`")


def monitoring_of(planned: Planned) -> MonitoringPlan:
    return plan_monitoring(planned.plan, planned.loaded,
                           {name: k.facts for name, k in planned.facts.items()},
                           load_role_defaults().model_weights_root)


def write_for_run(planned: Planned, run_dir: Path) -> None:
    """`up`: the monitoring files of what it deploys, in <run dir>/monitoring."""
    write_monitoring(monitoring_of(planned), run_dir / "monitoring")


def monitoring(target: Target, out: Path, events: Events) -> MonitoringResult:
    loaded = pins.apply(load(target), target.hosts, pins.read_pins(target.state_dir)).loaded
    found = find_facts(target, loaded.hosts_of(target.hosts), CACHED, events)
    planned = make_planned(loaded, target.hosts, ["services"], found.hosts)
    plan = monitoring_of(planned)
    for t in plan.targets:
        if t.open:
            events.log(f"{t.labels['host']}: {t.job} on {t.address} answers without "
                       "authentication (open)")
    for u in plan.unscraped:
        events.log(f"{u.host}: {u.job}{' ' + u.deployment if u.deployment else ''} is not "
                   f"scraped: {u.reason}")
    written = write_monitoring(plan, out)
    return MonitoringResult(plan=plan, out=str(out),
                            files=[str(p.relative_to(out)) for p in written])
