"""`orchestrate status`: a quick, read-only look at a group: is each deployment up now,
which release each host runs (and where hosts differ), and how did the last run go."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from pydantic import Field

from orchestrator.verify.hostprobe import Collector
from orchestrator.verify.httpprobe import ProbeResult
from orchestrator.verify.liveness import DeploymentStatus, Skew, liveness
from orchestrator.workflows.common import CACHED, Result, Target, open_secrets, plan_for
from orchestrator.workflows.runs import LastRun, last_run


@dataclass(frozen=True)
class StatusOptions:
    target: Target
    ssh_timeout: float = 15.0
    http_timeout: float = 10.0
    # How the hosts and deployments are reached: None is one Ansible run over every host;
    # tests give a per-host stand-in.
    collect: Collector | None = None
    client_factory: Callable[[], httpx.Client] | None = None


class StatusResult(Result):
    """`orchestrate status --json`."""

    group: str = Field(description="the host group (--hosts)")
    checked_at: dt.datetime = Field(description="when this look was taken (UTC)")
    up: bool = Field(description="every deployment is up")
    deployments: list[DeploymentStatus] = Field(description="each deployment on each host")
    unreachable: list[ProbeResult] = Field(description="hosts SSH did not reach: their "
                                                       "units are unknown")
    skew: list[Skew] = Field(default_factory=list, description="what hosts of the group "
                             "run in different versions (exit 1 unless empty)")
    last_run: LastRun | None = Field(description="the newest run directory of the group "
                                                 "in .orchestrate/runs, if any")

    @property
    def ok(self) -> bool:
        """Exit 0: every deployment up, and one release across the group."""
        return self.up and not self.skew


def status(options: StatusOptions) -> StatusResult:
    target = options.target
    planned = plan_for(target, facts=CACHED)
    plan = planned.plan
    secrets = open_secrets(plan.secrets_file, target.vault_password_file)
    now = liveness(plan, secrets=secrets, ssh_timeout=options.ssh_timeout,
                   http_timeout=options.http_timeout, collect=options.collect,
                   operator_inventory=target.inventory,
                   cached_drivers={name: k.facts.nvidia.driver_version
                                   for name, k in planned.facts.items()
                                   if k.facts.nvidia is not None},
                   client_factory=options.client_factory)
    return StatusResult(group=plan.group, checked_at=dt.datetime.now(dt.UTC), up=now.up,
                        deployments=now.deployments, unreachable=now.unreachable,
                        skew=now.skew, last_run=last_run(target.runs_root, target.hosts))
