"""`orchestrate down`: tear down what `up` installed on a group's hosts (playbooks/teardown.yml),
or remove the built-in sandbox's containers.

On real hosts the removal is shown before it is done: playbooks/teardown.yml runs first in
check mode, and what it reports it would remove on each host (the units it stops, the users,
the files) is what the operator confirms; the list comes from the hosts and the roles'
own teardown steps, not from a copy of them here. `--check` stops after that run."""

from __future__ import annotations

import datetime as dt
import json
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field

from orchestrator.errors import OrchestrateError
from orchestrator.plan.planner import Plan
from orchestrator.run.lock import group_lock
from orchestrator.run.render import ROOT, RunDir, new_run_id, render, write_private
from orchestrator.run.runner import EventInterpreter, HostStats, RunResult, TaskFailure, run_ansible
from orchestrator.workflows.common import CACHED, NO_FACTS, Events, Result, Target, plan_for
from orchestrator.workflows.runs import fleet_file_of, host_records, start_record

TEARDOWN = "playbooks/teardown.yml"


class Declined(OrchestrateError):
    """The operator answered no: nothing was removed."""

    exit_code = 1


class HostTeardown(Result):
    """One host's teardown: what was removed (with --check, or before the answer: what
    would be)."""

    units: list[str] = Field(description="systemd units stopped and disabled")
    users: list[str] = Field(description="service users and groups removed")
    files: list[str] = Field(description="files and directories removed (units, drop-ins, "
                                         "environment files, state; the environment and "
                                         "weights only when purged)")
    stats: HostStats = Field(description="the run's task counts on this host: ok, changed, "
                                         "failed, unreachable, skipped")
    failed: bool = Field(description="a task failed, or the host was not reached")

    @property
    def empty(self) -> bool:
        return not (self.units or self.users or self.files)


class DownResult(Result):
    """`orchestrate down --json`."""

    group: str = Field(description="the host group (--hosts)")
    sandbox: bool = Field(description="the built-in sandbox: its containers were removed, no "
                                      "playbook ran")
    removed: list[str] = Field(description="the sandbox: the hosts removed (empty: none ran); "
                                           "real hosts: the hosts something was removed from")
    check: bool = Field(description="--check: nothing was changed; `hosts` says what would be "
                                    "removed")
    purge_env: bool = Field(description="--purge-env: the Python environment is removed too")
    purge_weights: bool = Field(description="--purge-weights: the weights and Ollama's models "
                                            "are removed too")
    run_dir: str | None = Field(description="the run directory of the last teardown run "
                                            "(check mode with --check or when nothing was "
                                            "left to remove); null for the sandbox")
    hosts: dict[str, HostTeardown] = Field(description="per host: what was removed (with "
                                                       "--check: what would be)")
    failures: list[TaskFailure] = Field(description="each failed task: host, play, task, "
                                                    "message, unreachable")
    passed: bool = Field(description="every host was torn down (or, with --check, shown) "
                                     "without a failure (exit 0)")


@dataclass(frozen=True)
class DownOptions:
    hosts: str
    # The built-in sandbox: what removes its hosts and state, returning the names removed
    # (the caller's: workflows never import the sandbox).
    remove_sandbox: Callable[[], list[str]] | None = None
    # Real hosts: the group torn down by playbooks/teardown.yml.
    target: Target | None = None
    check: bool = False
    purge_env: bool = False
    purge_weights: bool = False
    # --no-gather: planned from fleet.yml alone; else with the cached facts, as `status`.
    no_gather: bool = False
    # Shown what would be removed (per host, none empty), answers whether to go on.
    confirm: Callable[[dict[str, HostTeardown]], bool] = lambda _: False


# A changed task's module -> the kind of thing it removed. The handlers' daemon-reload and
# the stat/find reads change nothing and are not listed.
_KINDS: Mapping[str, Literal["units", "users", "files"]] = {
    "systemd_service": "units", "systemd": "units", "user": "users", "group": "users",
    "file": "files"}


class Removals:
    """Folds the teardown run's events: per host the units, users and files its changed
    tasks removed (a loop's items one by one)."""

    def __init__(self) -> None:
        self.found: dict[str, dict[str, list[str]]] = {}

    def __call__(self, event: Mapping[str, Any]) -> None:
        name = event.get("event", "")
        data = event.get("event_data") or {}
        res = data.get("res") or {}
        # A loop's task reports each item, then all of them again in `results`.
        if name not in ("runner_on_ok", "runner_item_on_ok") or "results" in res:
            return
        kind = _KINDS.get(str(data.get("task_action", "")).rsplit(".", 1)[-1])
        if kind is None or not res.get("changed"):
            return
        # Check mode answers some modules without their own result keys: the arguments
        # they were given name the thing.
        args = (res.get("invocation") or {}).get("module_args") or {}
        what = res.get("path") or res.get("name") or args.get("path") or args.get("name")
        if what is None:
            return
        host = self.found.setdefault(str(data.get("host", "?")),
                                     {"units": [], "users": [], "files": []})
        if str(what) not in host[kind]:
            host[kind].append(str(what))


@dataclass(frozen=True)
class Teardown:
    run_dir: RunDir
    ran: RunResult
    hosts: dict[str, HostTeardown]


def _teardown(plan: Plan, options: DownOptions, target: Target, events: Events, *,
              check: bool) -> Teardown:
    """One run of playbooks/teardown.yml on the plan's hosts, in a run directory of its own
    (the same inventory, host_vars and limit as `up`'s, the operator's -i first)."""
    rendered = render(plan, target.runs_root,
                      new_run_id(dt.datetime.now(), "down-check" if check else "down"),
                      check=check, operator_inventory=target.inventory,
                      vault_password_file=target.vault_password_file)
    # No API key is needed to remove an instance: the secrets stay closed.
    run = replace(rendered, playbook=TEARDOWN, tags=[], skip_tags=[], secrets_file=None)
    purge = {"teardown_purge_env": options.purge_env,
             "teardown_purge_weights": options.purge_weights}
    args = [*run.ansible_args(), "--extra-vars", json.dumps(purge)]
    replay = ["ansible-playbook", *[a for source in run.inventories() for a in ("-i", source)],
              str(ROOT / TEARDOWN), *args]
    write_private(run.path / "command.txt", f"# Same run by hand, from {ROOT}:\nANSIBLE_CONFIG="
                  f"{shlex.quote(str(ROOT / 'ansible.cfg'))} {shlex.join(replay)}\n")
    events.log(f"run {run.run_id}: {TEARDOWN}{' in check mode' if check else ''} on "
               f"{len(plan.hosts)} host(s) of '{plan.group}'")
    removals = Removals()
    with events.progress([h.name for h in plan.hosts]) as on_progress:
        interpreter = EventInterpreter(on_progress)

        def handle(event: Mapping[str, Any]) -> bool:
            removals(event)
            return interpreter(event)

        status, rc = run_ansible(run.path, TEARDOWN, run.inventories(), handle, args=args)
    ran = interpreter.result(status, rc)
    failed = ran.failed_hosts()
    hosts: dict[str, HostTeardown] = {}
    for h in plan.hosts:
        found = removals.found.get(h.name, {})
        stats = ran.stats.get(h.name, HostStats())
        hosts[h.name] = HostTeardown(
            units=found.get("units", []), users=found.get("users", []),
            files=found.get("files", []), stats=stats,
            failed=h.name in failed or stats.failed > 0 or stats.unreachable > 0)
    return Teardown(run, ran, hosts)


def _result(options: DownOptions, plan: Plan, done: Teardown) -> DownResult:
    return DownResult(group=plan.group, sandbox=False,
                      removed=[] if done.run_dir.check else [n for n, h in done.hosts.items()
                                                             if not h.empty],
                      check=options.check, purge_env=options.purge_env,
                      purge_weights=options.purge_weights, run_dir=str(done.run_dir.path),
                      hosts=done.hosts, failures=done.ran.failures,
                      passed=done.ran.ok and not any(h.failed for h in done.hosts.values()))


def down(options: DownOptions, events: Events | None = None) -> DownResult:
    """The sandbox: its containers removed. Real hosts: what the teardown would remove,
    found in check mode and confirmed (options.confirm), then removed; --check stops
    after showing it."""
    events = events or Events()
    if options.remove_sandbox is not None:
        return DownResult(group=options.hosts, sandbox=True, removed=options.remove_sandbox(),
                          check=False, purge_env=False, purge_weights=False, run_dir=None,
                          hosts={}, failures=[], passed=True)
    if options.target is None:
        raise ValueError("down: neither the sandbox nor a target")
    target = options.target
    run_id = new_run_id(dt.datetime.now(), "down")
    # Not beside an `up` of the same group (LockHeld, exit 2).
    with group_lock(target.state_dir, target.hosts, run_id, "down", log=events.log):
        plan = plan_for(target, facts=NO_FACTS if options.no_gather else CACHED,
                        events=events).plan
        # Recorded as `up` is (run.json, `orchestrate history`): once the input is checked.
        record = start_record(target.runs_root, run_id, command="down", group=target.hosts,
                              fleet_file=fleet_file_of(target), check=options.check)
        events.log(f"recording this run in {record.path}")
        with record.recording():
            runs = [_teardown(plan, options, target, events, check=True)]
            shown = runs[0]
            # Named at once: a run declined or stopped after it still claims it (history).
            record.write(run_dirs=[str(shown.run_dir.path)])
            remaining = {name: h for name, h in shown.hosts.items() if not h.empty}
            # A host that failed or was not reached in check mode: nothing is removed anywhere.
            if not options.check and shown.ran.ok and remaining:
                if not options.confirm(remaining):
                    raise Declined("not confirmed: nothing was removed")
                runs.append(_teardown(plan, options, target, events, check=False))
            result = _result(options, plan, runs[-1])
            ran = runs[-1].ran
            record.end("passed" if result.passed else "failed",
                       hosts=host_records([plan], dict(ran.stats), list(ran.failures), None),
                       changed=sum(s.changed for s in ran.stats.values()),
                       run_dirs=[str(r.run_dir.path) for r in runs])
            return result
