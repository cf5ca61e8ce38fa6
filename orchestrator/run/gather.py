"""Gathering each host's facts: one ansible-runner run of playbooks/facts.yml.

Over the same connection settings as every other run (the fleet's ansible_* variables,
the operator's inventory, ansible.cfg), all hosts in parallel; each host's answer is the
fact `orchestrate_host_facts`, a HostFacts document. A host that cannot be reached or
read still gets one, with reachable=False and why, and the others are gathered all the
same. The run directory keeps the inventory, the by-hand command and the artifacts:

    <run_path>/inventory/hosts.yml   the hosts, how to reach them, the paths to measure
    <run_path>/command.txt           the same run as a plain ansible-playbook command
    <run_path>/artifacts/            ansible-runner's events and stdout
"""

from __future__ import annotations

import datetime as dt
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.facts.hostfacts import HostFacts
from orchestrator.run.render import ROOT, ansible_yaml, write_private
from orchestrator.run.runner import EventInterpreter, Progress, failure_message, run_ansible

PLAYBOOK = "playbooks/facts.yml"
ORIGIN = "gathered by playbooks/facts.yml"
# The inventory group of the hosts asked for: the run is limited to it, so that the rest
# of an operator's inventory is left alone.
GROUP = "orchestrate_facts"
FACT = "orchestrate_host_facts"
# Seconds to wait for a host's SSH connection: an unreachable host is reported quickly
# instead of holding up the others' answer (ansible.cfg's 30 s is for the stages).
CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class GatherHost:
    name: str
    connection: dict[str, Any]  # ResolvedHost.connection(): the ansible_* variables
    vars: dict[str, Any]  # the fleet's `vars:` of the host (gpu_check_nvidia_smi, ...)
    paths: list[str]  # where the plan needs free disk (planner.fact_paths)


class _Collector:
    """Folds the run's events into one answer per host, progress passed on."""

    def __init__(self, on_progress: Callable[[Progress], None]) -> None:
        self.interpreter = EventInterpreter(on_progress)
        self.found: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}

    def __call__(self, event: Mapping[str, Any]) -> bool:
        self.interpreter(event)
        name = event.get("event", "")
        data = event.get("event_data") or {}
        host = data.get("host")
        res = data.get("res") or {}
        if host is None:
            return True
        if name == "runner_on_ok":
            fact = (res.get("ansible_facts") or {}).get(FACT)
            if isinstance(fact, dict):
                self.found[host] = fact
        elif name in ("runner_on_unreachable", "runner_on_failed") \
                and not data.get("ignore_errors"):
            what = "unreachable" if name == "runner_on_unreachable" else "failed"
            self.failed.setdefault(
                host, f"{what} at task '{data.get('task', '')}': {failure_message(res)}")
        return True


def _inventory(hosts: list[GatherHost]) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for host in hosts:
        entries[host.name] = {
            **host.connection, **host.vars,
            "gpu_check_facts_paths": list(host.paths),
            # Read-only, so no sudo: not even where the fleet or the operator's
            # inventory turns become on (a variable outranks the play's `become: false`).
            "ansible_become": False,
        }
    return {"all": {"children": {GROUP: {"hosts": entries}}}}


def _not_gathered(host: str, why: str, when: dt.datetime) -> HostFacts:
    return HostFacts(host=host, gathered_at=when, origin=ORIGIN, reachable=False,
                     unreachable=why)


def gather_facts(hosts: list[GatherHost], run_path: Path, *,
                 operator_inventory: Path | None = None,
                 on_progress: Callable[[Progress], None] = lambda _: None,
                 forks: int = 50) -> dict[str, HostFacts]:
    """Each host's facts, by host name, every host asked for included."""
    run_path = run_path.resolve()
    inventory = run_path / "inventory" / "hosts.yml"
    # The operator's alone: the inventory names hosts, users and keys.
    run_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    inventory.parent.mkdir(mode=0o700, exist_ok=True)
    (run_path / "artifacts").mkdir(mode=0o700, exist_ok=True)
    # The fleet's values as data (!unsafe), as render.py writes the stages' inventory.
    write_private(inventory, ansible_yaml(_inventory(hosts)))
    # The operator's inventory first, so that its group_vars apply and ours win.
    inventories = ([str(operator_inventory.resolve())] if operator_inventory else []) \
        + [str(inventory)]
    args = ["--limit", GROUP]
    replay = ["ansible-playbook", *[arg for source in inventories for arg in ("-i", source)],
              str(ROOT / PLAYBOOK), *args]
    write_private(run_path / "command.txt",
                  f"# Same run by hand, from {ROOT}:\nANSIBLE_CONFIG="
                  f"{shlex.quote(str(ROOT / 'ansible.cfg'))} "
                  f"ANSIBLE_TIMEOUT={CONNECT_TIMEOUT_S} {shlex.join(replay)}\n")

    collector = _Collector(on_progress)
    status, rc = run_ansible(run_path, PLAYBOOK, inventories, collector,
                             args=args, forks=forks,
                             env={"ANSIBLE_TIMEOUT": str(CONNECT_TIMEOUT_S)})
    now = dt.datetime.now(dt.UTC)
    result: dict[str, HostFacts] = {}
    for host in hosts:
        fact = collector.found.get(host.name)
        if fact is not None:
            try:
                result[host.name] = HostFacts.model_validate(fact)
            except ValidationError as exc:
                result[host.name] = _not_gathered(
                    host.name, f"its facts do not read as HostFacts ({PLAYBOOK} and "
                    f"orchestrator/facts/hostfacts.py disagree): {exc}", now)
        elif host.name in collector.failed:
            result[host.name] = _not_gathered(host.name, collector.failed[host.name], now)
        else:
            result[host.name] = _not_gathered(
                host.name, f"the facts run ended {status} (rc {rc}) with no answer from "
                f"this host: see {run_path / 'artifacts' / 'ansible' / 'stdout'}", now)
    return result
