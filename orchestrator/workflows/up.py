"""`orchestrate up`: stage the weights, run the stage playbooks, then probe."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

from pydantic import Field

from orchestrator.mirror import weights as weights_mirror
from orchestrator.mirror.weights import Staged, Traffic
from orchestrator.plan.planner import Plan
from orchestrator.run.render import new_run_id, render
from orchestrator.run.runner import HostStats, RunResult, TaskFailure, run_playbook
from orchestrator.verify.hostprobe import probe_all
from orchestrator.workflows.common import (
    Events,
    Probes,
    Result,
    Target,
    mirror_path,
    open_secrets,
    plan_for,
)
from orchestrator.workflows.mirror import stage_for_up
from orchestrator.workflows.runs import save_results


@dataclass(frozen=True)
class UpOptions:
    target: Target
    check: bool = False
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    # Called with the plan once the weights are staged, before the run directory is
    # written (the CLI starts the sandbox's hosts here).
    before_run: Callable[[Plan], None] | None = None


class AnsibleOutcome(Result):
    """The stage playbooks' run, per host."""

    status: str = Field(description="ansible-runner's status: successful, failed, ...")
    rc: int = Field(description="ansible-playbook's exit code")
    changed: int = Field(description="changed tasks, all hosts together")
    hosts: dict[str, HostStats] = Field(description="per host: ok, changed, failed, "
                                                    "unreachable, skipped")
    failures: list[TaskFailure] = Field(description="each failed task: host, play, task, "
                                                    "message, unreachable")

    @classmethod
    def of(cls, run: RunResult) -> AnsibleOutcome:
        return cls(status=run.status, rc=run.rc, changed=run.changed_total,
                   hosts=dict(sorted(run.stats.items())), failures=run.failures)

    def run_result(self) -> RunResult:
        return RunResult(status=self.status, rc=self.rc, stats=dict(self.hosts),
                         failures=list(self.failures))


class PathServed(Result):
    requests: int = Field(description="requests for this path")
    ok: int = Field(description="requests answered 200")
    bytes: int = Field(description="bytes of the answered requests")


class Served(Result):
    """What the mirror served to the hosts during the run."""

    requests: int = Field(description="requests, all paths together")
    bytes: int = Field(description="bytes sent, all paths together")
    paths: dict[str, PathServed] = Field(description="per URL path")

    @classmethod
    def of(cls, traffic: Traffic) -> Served:
        return cls.model_validate(traffic.to_dict())

    def traffic(self) -> Traffic:
        return Traffic(paths={p: s.model_dump() for p, s in self.paths.items()})


class UpMirror(Result):
    """The fleet's mirror during `up`."""

    dir: str = Field(description="the mirror directory on this machine")
    url: str = Field(description="mirror.url: where the hosts fetch from")
    models: list[Staged] = Field(description="what this run staged (none without a models "
                                             "stage, with --check or mirror.stage false)")
    origin_bytes: int = Field(description="bytes this run took from the origins")
    served: Served | None = Field(description="null unless mirror.listen serves it for "
                                              "the run")


class UpResult(Result):
    """`orchestrate up --json`."""

    run_id: str = Field(description="the run directory's name")
    run_dir: str = Field(description="plan, inventory, host_vars, the replay command, "
                                     "ansible-runner's artifacts, probes.json, report.html")
    report: str = Field(description="the run's HTML report")
    stages: list[str] = Field(description="the stages run, in order")
    ansible: AnsibleOutcome
    mirror: UpMirror | None = Field(description="null when the fleet has no mirror")
    probes: Probes | None = Field(description="null with --check or without the verify "
                                              "stage")
    passed: bool = Field(description="the playbooks and every probe passed (exit 0)")


def up(options: UpOptions, events: Events) -> UpResult:
    """Stage the weights (with a mirror), provision the hosts stage by stage, then probe."""
    target = options.target
    loaded, plan = plan_for(target, list(options.only), list(options.skip))
    secrets = open_secrets(plan, target.vault_password_file)
    settings = loaded.fleet.mirror
    listen = (weights_mirror.parse_listen(settings.listen, settings, key="mirror.listen")
              if settings is not None and settings.listen else None)
    # Before any host is changed: a bad file from the origin stops the run here.
    staged = stage_for_up(loaded, target.hosts, plan, check=options.check,
                          state_dir=target.state_dir, log=events.log)
    if options.before_run is not None:
        options.before_run(plan)
    run_dir = render(plan, target.runs_root, new_run_id(dt.datetime.now(), "up"),
                     check=options.check, operator_inventory=target.inventory,
                     vault_password_file=target.vault_password_file)
    events.log(f"run {run_dir.run_id}: stages {', '.join(plan.stages)} on "
               f"{len(plan.hosts)} host(s) of '{target.hosts}'")
    traffic = None
    with ExitStack() as serving:
        if listen is not None and settings is not None:
            traffic = serving.enter_context(weights_mirror.serving(
                mirror_path(settings, target.state_dir), listen, events.log))
        with events.progress([h.name for h in plan.hosts]) as on_event:
            ran = run_playbook(run_dir, on_event)
    probes = None
    if not options.check and "verify" in plan.stages:
        probes = probe_all(plan, secrets=secrets)
    report = save_results(run_dir.path, command="up", plan=plan, probes=probes)
    mirrored = None if settings is None else UpMirror(
        dir=str(mirror_path(settings, target.state_dir)), url=settings.url, models=staged,
        origin_bytes=sum(s.origin_bytes for s in staged),
        served=Served.of(traffic) if traffic is not None else None)
    return UpResult(run_id=run_dir.run_id, run_dir=str(run_dir.path), report=str(report),
                    stages=list(plan.stages), ansible=AnsibleOutcome.of(ran),
                    mirror=mirrored, probes=Probes.of(probes) if probes else None,
                    passed=ran.ok and (probes is None or probes.passed))
