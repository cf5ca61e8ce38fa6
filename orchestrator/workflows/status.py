"""`orchestrate status`: a quick, read-only look at a group: is each deployment up now,
and how did the last run go."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from pydantic import Field

from orchestrator.verify.hostprobe import Collector
from orchestrator.verify.httpprobe import ProbeResult
from orchestrator.verify.liveness import DeploymentStatus, collect_units, liveness
from orchestrator.workflows.common import CACHED, Result, Target, open_secrets, plan_for
from orchestrator.workflows.runs import LastRun, last_run


@dataclass(frozen=True)
class StatusOptions:
    target: Target
    ssh_timeout: float = 15.0
    http_timeout: float = 10.0
    # How the hosts and deployments are reached (tests give stand-ins).
    collect: Collector = collect_units
    client_factory: Callable[[], httpx.Client] | None = None


class StatusResult(Result):
    """`orchestrate status --json`."""

    group: str = Field(description="the host group (--hosts)")
    checked_at: dt.datetime = Field(description="when this look was taken (UTC)")
    up: bool = Field(description="every deployment is up (exit 0; 1 otherwise)")
    deployments: list[DeploymentStatus] = Field(description="each deployment on each host")
    unreachable: list[ProbeResult] = Field(description="hosts SSH did not reach: their "
                                                       "units are unknown")
    last_run: LastRun | None = Field(description="the newest run directory of the group "
                                                 "in .orchestrate/runs, if any")


def status(options: StatusOptions) -> StatusResult:
    target = options.target
    plan = plan_for(target, facts=CACHED).plan
    secrets = open_secrets(plan.secrets_file, target.vault_password_file)
    now = liveness(plan, secrets=secrets, ssh_timeout=options.ssh_timeout,
                   http_timeout=options.http_timeout, collect=options.collect,
                   client_factory=options.client_factory)
    return StatusResult(group=plan.group, checked_at=dt.datetime.now(dt.UTC), up=now.up,
                        deployments=now.deployments, unreachable=now.unreachable,
                        last_run=last_run(target.runs_root, target.hosts))
