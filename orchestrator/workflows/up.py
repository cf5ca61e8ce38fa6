"""`orchestrate up`: gather the hosts' facts, plan from them, stage the weights, run the
stage playbooks, then probe. Hosts whose driver the drivers stage installs are gathered
again after it, and the later stages are planned from the driver then loaded."""

from __future__ import annotations

import datetime as dt
import shlex
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import Field

from orchestrator.config.fleet import load_fleet
from orchestrator.errors import ConfigError, PlanError
from orchestrator.mirror import pins
from orchestrator.mirror import weights as weights_mirror
from orchestrator.mirror.weights import Staged, Traffic
from orchestrator.plan.planner import Plan, select_stages
from orchestrator.run.lock import group_lock
from orchestrator.run.render import RunDir, new_run_id, render
from orchestrator.run.runner import (
    HostStats,
    Interrupted,
    RunResult,
    TaskFailure,
    run_playbook,
)
from orchestrator.verify.hostprobe import probe_all
from orchestrator.workflows.common import (
    GATHER,
    Events,
    FactsOrigin,
    FactsPolicy,
    Probes,
    Result,
    Target,
    find_facts,
    load,
    log_unreached,
    make_planned,
    mirror_path,
    open_secrets,
)
from orchestrator.workflows.history import RetrySelection
from orchestrator.workflows.mirror import mirror_token, pin_for_up, stage_for_up
from orchestrator.workflows.monitoring import write_for_run as write_monitoring_for_run
from orchestrator.workflows.runs import (
    Recorder,
    fleet_file_of,
    last_successful_run,
    save_results,
    start_record,
)


@dataclass(frozen=True)
class UpOptions:
    target: Target
    check: bool = False
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    facts: FactsPolicy = GATHER
    # Called with the group's host names before their facts are gathered (the CLI starts
    # the sandbox's hosts here).
    before_facts: Callable[[list[str]], None] | None = None
    # --retry-failed: only the hosts that failed in an earlier run (history.retry_selection).
    retry: RetrySelection | None = None
    # --break-lock: take the group's lock over whoever holds it.
    break_lock: bool = False
    # Pin every moving model revision to the hub's commit again (orchestrator.mirror.pins).
    update_revisions: bool = False
    # --rollback: the fleet of the group's last successful up, through the same rollout.
    rollback: bool = False


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


class RolloutStop(Result):
    """Where the services stage's rollout stopped: the first batch that failed (its health
    gate, or its engines not starting). The later batches were not touched."""

    batch: int = Field(description="the failed batch, 1 first")
    batches: int = Field(description="batches planned")
    failures: list[TaskFailure] = Field(description="per failed host of the batch: the check "
                                                    "(task) and what it found, with the unit's "
                                                    "journal excerpt")
    untouched: list[str] = Field(description="hosts of the later batches: not changed, still "
                                             "serving their old version")
    next_steps: list[str] = Field(description="commands that resume or roll back")


# The services stage's play (playbooks/services.yml), the one that rolls in batches.
SERVICES_PLAY = "Serving engines"


def rollout_stop(plan: Plan, ran: RunResult, command: list[str]) -> RolloutStop | None:
    """The batch of `plan` at which `ran` stopped, if the services stage failed on a host;
    `command` is the `orchestrate up` line that ran it, for the next steps."""
    failures = [f for f in ran.failures if f.play == SERVICES_PLAY]
    batches = plan.rollout.batches
    failed = {f.host for f in failures}
    at = next((i for i, batch in enumerate(batches) if failed & set(batch)), None)
    if at is None:
        return None
    base = [*command, "--hosts", plan.group]
    return RolloutStop(
        batch=at + 1, batches=len(batches), failures=failures,
        untouched=[h for batch in batches[at + 1:] for h in batch],
        next_steps=[f"resume after a fix in fleet.yml: {shlex.join(base)}",
                    f"retry the failed hosts only: {shlex.join([*base, '--retry-failed'])}",
                    "roll back to the last successful run's fleet: "
                    f"{shlex.join([*base, '--rollback'])}"])


class UpResult(Result):
    """`orchestrate up --json`."""

    run_id: str = Field(description="the last run directory's name")
    run_dir: str = Field(description="the last run directory: plan, inventory, host_vars, "
                                     "the replay command, ansible-runner's artifacts, "
                                     "probes.json, report.html")
    run_dirs: list[str] = Field(description="every run directory of the stages, in order: "
                                            "two when hosts' drivers were installed first and "
                                            "the later stages planned from their facts "
                                            "gathered again")
    report: str = Field(description="the run's HTML report")
    stages: list[str] = Field(description="the stages run, in order")
    facts: dict[str, FactsOrigin] = Field(description="per host: where the facts of its "
                                                      "(last) plan came from")
    regathered: list[str] = Field(description="hosts whose facts were gathered again after "
                                              "the drivers stage installed their driver")
    ansible: AnsibleOutcome = Field(description="the stage playbooks, every run together")
    mirror: UpMirror | None = Field(description="null when the fleet has no mirror")
    probes: Probes | None = Field(description="null with --check or without the verify "
                                              "stage")
    rollout_stopped: RolloutStop | None = Field(
        default=None, description="null unless a batch of the services stage failed")
    rolled_back_to: str | None = Field(
        default=None, description="--rollback: the run whose fleet this one ran")
    passed: bool = Field(description="the playbooks and every probe passed (exit 0)")


def _truthy(value: Any) -> bool:
    # Inventory values arrive as YAML booleans or as the strings Ansible's bool filter reads.
    return value is True or str(value).strip().lower() in ("true", "yes", "on", "1")


def driver_installing_hosts(plan: Plan) -> list[str]:
    """Hosts whose driver the drivers stage installs (nvidia_driver_manage)."""
    return [h.name for h in plan.hosts if _truthy(h.vars.get("nvidia_driver_manage"))]


def merged(runs: list[RunResult]) -> RunResult:
    """Several runs of the stage playbooks as one outcome: per host the sums, every failure."""
    stats: dict[str, HostStats] = {}
    for run in runs:
        for host, s in run.stats.items():
            total = stats.setdefault(host, HostStats())
            total.ok += s.ok
            total.changed += s.changed
            total.failed += s.failed
            total.unreachable += s.unreachable
            total.skipped += s.skipped
    failed = [r for r in runs if not r.ok]
    last = failed[0] if failed else runs[-1]
    return RunResult(status=last.status, rc=last.rc, stats=stats,
                     failures=[f for r in runs for f in r.failures])


def _without(plan: Plan, failed: set[str], log: Callable[[str], None]) -> Plan:
    """`plan` less the hosts that failed the first part (and, where one was a member of the
    Ray cluster, the whole cluster: it is set up with all its members at once)."""
    drop = {h.name for h in plan.hosts} & failed
    ray = plan.ray_cluster
    if ray is not None and drop & set(ray.members):
        log(f"deployment {ray.deployment}: its Ray cluster lost "
            f"{', '.join(sorted(drop & set(ray.members)))}: all of "
            f"{', '.join(ray.members)} are left out of the later stages")
        drop |= set(ray.members)
        ray = None
    if drop:
        log(f"left out of the later stages (failed before them): {', '.join(sorted(drop))}")
    return plan.model_copy(update={"hosts": [h for h in plan.hosts if h.name not in drop],
                                   "ray_cluster": ray})


def _retried(plan: Plan, retry: RetrySelection | None, log: Callable[[str], None]) -> Plan:
    """`plan` on the hosts to retry only; a Ray cluster keeps all its members or none (it is
    set up with all of them at once)."""
    if retry is None:
        return plan
    keep = set(retry.hosts)
    ray = plan.ray_cluster
    if ray is not None and keep & set(ray.members):
        keep |= set(ray.members)
    elif ray is not None:
        ray = None
    hosts = [h for h in plan.hosts if h.name in keep]
    if not hosts:
        raise PlanError(f"the hosts that failed in run {retry.run_id} "
                        f"({', '.join(sorted(retry.hosts))}) are no longer in "
                        f"'{plan.group}': nothing to retry")
    log(f"retrying run {retry.run_id}'s failed hosts: {', '.join(h.name for h in hosts)}")
    return plan.model_copy(update={"hosts": hosts, "ray_cluster": ray})


def _run_stages(plan: Plan, options: UpOptions, events: Events) -> tuple[RunDir, RunResult]:
    target = options.target
    run_dir = render(plan, target.runs_root, new_run_id(dt.datetime.now(), "up"),
                     check=options.check, operator_inventory=target.inventory,
                     vault_password_file=target.vault_password_file)
    events.log(f"run {run_dir.run_id}: stages {', '.join(plan.stages)} on "
               f"{len(plan.hosts)} host(s) of '{target.hosts}'")
    with events.progress([h.name for h in plan.hosts]) as on_event:
        return run_dir, run_playbook(run_dir, on_event)


def up(options: UpOptions, events: Events) -> UpResult:
    """Gather the facts, plan, stage the weights (with a mirror), provision the hosts stage
    by stage, then probe. Ctrl-C stops it where it is (Ansible cancelled, no probe after
    it) and raises Interrupted: exit 130. Once the input is checked, one run at a time per
    group (group_lock: another one holding it is LockHeld, exit 2), recorded in a run
    directory of its own (run.json, history); bad input writes nothing."""
    target = options.target
    stages = select_stages(list(options.only), list(options.skip))
    run_id = new_run_id(dt.datetime.now(), "up")
    fleet_file = fleet_file_of(target)
    rolled_back_to = None
    if options.rollback:
        options, fleet_file, rolled_back_to = rollback_options(options, events.log)
    with ExitStack() as held:
        records: list[Recorder] = []

        def begin() -> None:
            held.enter_context(group_lock(target.state_dir, target.hosts, run_id, "up",
                                          break_lock=options.break_lock, log=events.log))
            record = start_record(target.runs_root, run_id, command="up",
                                  group=target.hosts, fleet_file=fleet_file,
                                  check=options.check, stages=stages,
                                  retry_of=options.retry.run_id if options.retry else None)
            events.log(f"recording this run in {record.path}")
            records.append(held.enter_context(record.recording()))

        try:
            result = _up(options, events, begin)
        except KeyboardInterrupt:
            raise Interrupted("interrupted (Ctrl-C)") from None
        result = result.model_copy(update={"rolled_back_to": rolled_back_to})
        records[0].finish(passed=result.passed, run_dirs=result.run_dirs,
                          stats=dict(result.ansible.hosts),
                          failures=list(result.ansible.failures), probes=result.probes)
        return result


def rollback_options(options: UpOptions, log: Callable[[str], None]
                     ) -> tuple[UpOptions, Path, str]:
    """`options` with the fleet of the group's last successful up (its copy in that run's
    directory; relative paths in it lead from the fleet file's directory as now), that copy
    and that run's id. No such run: ConfigError (exit 2)."""
    target = options.target
    record = last_successful_run(target.runs_root, target.hosts)
    if record is None or record.fleet_copy is None:
        raise ConfigError(f"no successful `up` of '{target.hosts}' recorded with its fleet "
                          f"file in {target.runs_root}: nothing to roll back to; run `up` "
                          "with the earlier fleet file instead (-f FILE)", key="--rollback")
    current = fleet_file_of(target)
    base = (current.resolve().parent if current is not None
            else Path(record.fleet_file).parent if record.fleet_file else None)
    loaded = load_fleet(record.fleet_copy, target.inventory, base=base)
    log(f"rolling back '{target.hosts}' to the fleet of run {record.run_id} "
        f"({record.started:%Y-%m-%d %H:%M} UTC), through the same rollout")
    return (replace(options, target=replace(target, builtin=loaded)), record.fleet_copy,
            record.run_id)


def _up(options: UpOptions, events: Events, begin: Callable[[], None]) -> UpResult:
    target = options.target
    loaded = load(target)
    stages = select_stages(list(options.only), list(options.skip))
    hosts = loaded.hosts_of(target.hosts)
    secrets = open_secrets(loaded.fleet.secrets, target.vault_password_file)
    # The input holds: lock the group, start the record.
    begin()
    # Only a run that downloads weights asks the hub; the others plan from the pins.
    pinned = pin_for_up(loaded, target, update=options.update_revisions,
                        resolve=not options.check and "models" in stages, log=events.log)
    loaded = pinned.loaded
    settings = loaded.fleet.mirror
    listen = (weights_mirror.parse_listen(settings.listen, settings, key="mirror.listen")
              if settings is not None and settings.listen else None)
    token = mirror_token(loaded, secrets) if listen is not None else None
    if options.before_facts is not None:
        options.before_facts([h.name for h in hosts])
    known = find_facts(target, hosts, options.facts, events).hosts
    log_unreached(known, events.log)
    planned = make_planned(loaded, target.hosts, stages, known)
    plan = _retried(pins.annotate(planned.plan, pinned), options.retry, events.log)
    # Before any host is changed: a bad file from the origin stops the run here.
    staged = stage_for_up(loaded, target.hosts, plan, check=options.check,
                          state_dir=target.state_dir, log=events.log)
    # In check mode no driver is installed: nothing new to gather.
    installing = [] if options.check else driver_installing_hosts(plan)
    split = ("drivers" in stages and stages[-1] != "drivers" and bool(installing))
    runs: list[tuple[RunDir, RunResult]] = []
    regathered: list[str] = []
    traffic = None
    with ExitStack() as serving:
        if listen is not None and settings is not None:
            traffic = serving.enter_context(weights_mirror.serving(
                mirror_path(settings, target.state_dir), listen, events.log, token=token))
        if not split:
            runs.append(_run_stages(plan, options, events))
        else:
            cut = stages.index("drivers") + 1
            events.log(f"the drivers stage installs the driver of {', '.join(installing)}: "
                       f"stages up to drivers first, then their facts again, then "
                       f"{', '.join(stages[cut:])} planned from them")
            runs.append(_run_stages(plan.model_copy(update={"stages": stages[:cut]}),
                                    options, events))
            failed = runs[0][1].failed_hosts()
            again = [h for h in hosts if h.name in installing and h.name not in failed]
            regathered = [h.name for h in again]
            fresh = find_facts(target, again, FactsPolicy("gather", refresh=True), events)
            log_unreached(fresh.hosts, events.log)
            planned = make_planned(loaded, target.hosts, stages[cut:],
                                   {**known, **fresh.hosts})
            plan = _retried(pins.annotate(planned.plan, pinned), options.retry, events.log)
            rest = _without(plan, failed, events.log)
            if rest.hosts:
                runs.append(_run_stages(rest, options, events))
    ran = merged([r for _, r in runs])
    run_dir = runs[-1][0]
    stopped = rollout_stop(plan, ran, _command_of(target))
    if stopped is not None:
        events.log(f"rollout stopped at batch {stopped.batch} of {stopped.batches}: "
                   f"{', '.join(sorted({f.host for f in stopped.failures}))} failed "
                   f"({'; '.join(f'{f.host}: {f.task}' for f in stopped.failures)}); "
                   + (f"not touched, still serving their old version: "
                      f"{', '.join(stopped.untouched)}; " if stopped.untouched else "")
                   + "next: " + "; ".join(stopped.next_steps))
    probes = None
    if not options.check and "verify" in stages:
        probes = probe_all(plan, secrets=secrets, operator_inventory=target.inventory)
    report = save_results(run_dir.path, command="up", plan=plan, probes=probes)
    write_monitoring_for_run(planned, run_dir.path)
    mirrored = None if settings is None else UpMirror(
        dir=str(mirror_path(settings, target.state_dir)), url=settings.url, models=staged,
        origin_bytes=sum(s.origin_bytes for s in staged),
        served=Served.of(traffic) if traffic is not None else None)
    return UpResult(run_id=run_dir.run_id, run_dir=str(run_dir.path),
                    run_dirs=[str(r.path) for r, _ in runs], report=str(report),
                    stages=stages, facts=planned.origins(), regathered=regathered,
                    ansible=AnsibleOutcome.of(ran), mirror=mirrored,
                    probes=Probes.of(probes) if probes else None,
                    rollout_stopped=stopped,
                    passed=ran.ok and (probes is None or probes.passed))


def _command_of(target: Target) -> list[str]:
    """`orchestrate up` with the options that name `target`'s fleet, for a next step."""
    command = ["orchestrate", "up"]
    if target.fleet is not None:
        command += ["-f", str(target.fleet)]
    if target.inventory is not None:
        command += ["-i", str(target.inventory)]
    if target.vault_password_file is not None:
        command += ["--vault-password-file", str(target.vault_password_file)]
    return command
