"""Is each deployment up, now: the quick, read-only look of `orchestrate status`.

Per host, the host probe's collector over one SSH connection, asked for the units and the
listening sockets only (no nvidia-smi, no torch, no weights), judged by the host probe's
own service and listening checks (so that "restarting in a loop" means the same as in
`orchestrate probe`); per deployment, the HTTP probe's quick pass (vLLM /health and
/v1/models, Ollama /api/version and /api/tags). Nothing is asked to generate a token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.plan.planner import HostPlan, Plan
from orchestrator.verify.hostprobe import (
    Collector,
    collector_config,
    probe_hosts,
    run_collector,
    service_results,
    services,
)
from orchestrator.verify.httpprobe import ProbeResult, probe_plan

SSH_TIMEOUT = 15.0
HTTP_TIMEOUT = 10.0


class DeploymentStatus(BaseModel):
    """One deployment on one host: its unit as systemd reports it, and its HTTP answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    deployment: str
    engine: str = Field(description="vllm or ollama")
    url: str = Field(description="the base URL its HTTP checks use")
    unit: str | None = Field(description="its systemd unit")
    active_state: str | None = Field(description="systemd ActiveState; null when SSH did "
                                                 "not answer")
    sub_state: str | None = Field(description="systemd SubState (running, auto-restart, ...)")
    restarts: int | None = Field(description="systemd NRestarts since the unit was started")
    since: str | None = Field(description="systemd ExecMainStartTimestamp")
    checks: list[ProbeResult] = Field(description="service and listening (SSH), health and "
                                                  "models or version and tags (HTTP)")
    up: bool = Field(description="every check passed, and there was at least one")


class Liveness(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str
    unreachable: list[ProbeResult] = Field(description="hosts SSH did not reach: their units "
                                                       "are unknown, their deployments "
                                                       "judged over HTTP alone")
    deployments: list[DeploymentStatus]

    @property
    def up(self) -> bool:
        return all(d.up for d in self.deployments)


def units_config(host: HostPlan, deadline: float) -> dict[str, Any]:
    """The collector's configuration for the units and sockets only."""
    return {**collector_config(host, deadline), "gpu": False, "envs": [], "models": []}


collect_units: Collector = functools.partial(run_collector, configure=units_config)


def _properties(record: Mapping[str, Any] | None) -> dict[str, str]:
    if record is None or record.get("rc") != 0:
        return {}
    return dict(line.split("=", 1) for line in str(record.get("stdout") or "").splitlines()
                if "=" in line)


def liveness(plan: Plan, *, secrets: Mapping[str, str] | None = None,
             ssh_timeout: float = SSH_TIMEOUT, http_timeout: float = HTTP_TIMEOUT,
             collect: Collector = collect_units,
             client_factory: Callable[[], httpx.Client] | None = None) -> Liveness:
    units: dict[str, dict[str, dict[str, str]]] = {}

    def judge(host: HostPlan, evidence: Mapping[str, Any]) -> list[ProbeResult]:
        records = {str(u["unit"]): u for u in evidence["units"]}
        units[host.name] = {name: _properties(r) for name, r in records.items()}
        return [result for service in services(host)
                for result in service_results(host, service, records.get(service.unit),
                                              evidence["listening"])]

    ssh = probe_hosts(plan, timeout=ssh_timeout, collect=collect, judge=judge)
    http = probe_plan(plan, timeout=http_timeout, secrets=secrets,
                      client_factory=client_factory, quick=True).results
    deployments = []
    for host in plan.hosts:
        unit_of = {s.deployment: s.unit for s in services(host)}
        for target in host.probes:
            checks = [r for r in [*ssh, *http]
                      if r.host == host.name and r.deployment == target.deployment]
            unit = unit_of.get(target.deployment)
            p = units.get(host.name, {}).get(unit or "", {})
            restarts = p.get("NRestarts", "")
            deployments.append(DeploymentStatus(
                host=host.name, deployment=target.deployment, engine=target.engine,
                url=target.base_url, unit=unit, active_state=p.get("ActiveState"),
                sub_state=p.get("SubState"),
                restarts=int(restarts) if restarts.isdigit() else None,
                since=p.get("ExecMainStartTimestamp") or None, checks=checks,
                up=bool(checks) and all(r.passed for r in checks)))
    return Liveness(group=plan.group, unreachable=[r for r in ssh if r.probe == "ssh"],
                    deployments=deployments)
