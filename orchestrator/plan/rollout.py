"""Rollouts: the services stage's batches and each host's health gate, planned (pure).

A change reaches the hosts of a group batch after batch (playbooks/services.yml's
`serial`), each batch behind the health gate (roles/health_gate); the first batch that
fails stops the rollout, and the hosts of the later batches keep their old version.
Settings come from fleet.yml's `rollout:` of `defaults`, the group and each deployment,
the most specific winning key by key. The hosts of a deployment across hosts (its Ray
cluster) are one instance: they always share a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.config.fleet import Deployment, LoadedFleet, RolloutSettings
from orchestrator.plan.rolevars import HealthGateVars


class RolloutPlan(BaseModel):
    """How the services stage rolls across the plan's hosts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batches: list[list[str]] = Field(description="the services stage's batches, in order: "
                                                 "host names; a batch starts once the one "
                                                 "before it passed its health gate")
    reasons: list[str] = Field(description="why the batches are this size")


@dataclass(frozen=True)
class Resolved:
    """A rollout's settings, every layer applied; `source` says which layer set the batch."""

    batch: int | str | None
    max_unavailable: int | str | None
    health_gate: bool
    health_gate_timeout: int | None
    source: str


def resolve(loaded: LoadedFleet, group: str, dep: Deployment | None = None) -> Resolved:
    """The rollout of `group` (of `dep` on it, when given): defaults < group < deployment."""
    layers: list[tuple[str, RolloutSettings | None]] = [
        ("defaults.rollout", loaded.fleet.defaults.rollout)]
    if group in loaded.fleet.groups:
        layers.append((f"groups.{group}.rollout", loaded.fleet.groups[group].rollout))
    if dep is not None:
        layers.append((f"deployment {dep.name}'s rollout", dep.rollout))
    merged: dict[str, object] = {}
    source = "the default"
    for where, layer in layers:
        if layer is None:
            continue
        given = layer.model_dump(exclude_none=True)
        if "batch" in given or "max_unavailable" in given:
            source = where
        merged.update(given)
    gate = merged.get("health_gate", True)
    timeout = merged.get("health_gate_timeout")
    batch = merged.get("batch")
    cap = merged.get("max_unavailable")
    return Resolved(batch=batch if isinstance(batch, int | str) else None,
                    max_unavailable=cap if isinstance(cap, int | str) else None,
                    health_gate=gate is not False,
                    health_gate_timeout=timeout if isinstance(timeout, int) else None,
                    source=source)


def count(value: int | str, hosts: int) -> int:
    """Hosts a `batch`/`max_unavailable` value means among `hosts`: a number as it is, a
    percentage rounded down (as Ansible's serial does), never less than one nor more than
    there are."""
    wanted = hosts * int(value.removesuffix("%")) // 100 if isinstance(value, str) else value
    return max(1, min(wanted, hosts))


def batch_size(settings: Resolved, hosts: int) -> int:
    """Hosts per batch among `hosts`: the batch (default one), no more than max_unavailable."""
    size = count(settings.batch, hosts) if settings.batch is not None else 1
    if settings.max_unavailable is not None:
        size = min(size, count(settings.max_unavailable, hosts))
    return size


def plan_rollout(loaded: LoadedFleet, group: str, hosts: Sequence[str],
                 served: Mapping[str, Sequence[Deployment]],
                 spanned: Sequence[str] = (), span_name: str | None = None) -> RolloutPlan:
    """Batches of `hosts` (in their order): the smallest batch that the group's rollout and
    any of its deployments' ask for (one `serial` list for the whole run); the hosts in
    `spanned` (a deployment across hosts) together in the batch of the first of them."""
    group_settings = resolve(loaded, group)
    size = batch_size(group_settings, len(hosts))
    reasons = [f"{size} host(s) per batch ({group_settings.source}"
               + (f": batch {group_settings.batch}" if group_settings.batch is not None else
                  ": one host at a time")
               + (f", max_unavailable {group_settings.max_unavailable}"
                  if group_settings.max_unavailable is not None else "") + ")"]
    deployments = {d.name: d for on_host in served.values() for d in on_host}
    for name, dep in deployments.items():
        if dep.rollout is None:
            continue
        own = batch_size(resolve(loaded, group, dep),
                         sum(1 for h in hosts if dep in served.get(h, ())))
        if own < size:
            size = own
            reasons.append(f"{own} host(s) per batch: deployment {name}'s rollout")
    batches: list[list[str]] = []
    current: list[str] = []
    for host in hosts:
        if host in spanned and host != spanned[0]:
            continue
        unit = list(spanned) if host in spanned else [host]
        if current and len(current) + len(unit) > size:
            batches.append(current)
            current = []
        current += unit
        if len(current) >= size:
            batches.append(current)
            current = []
    if current:
        batches.append(current)
    if spanned and len(spanned) > size:
        reasons.append(f"deployment {span_name} spans {', '.join(spanned)}: one batch (its "
                       "one instance restarts on all of them at once)")
    return RolloutPlan(batches=batches, reasons=reasons)


def gate_vars(loaded: LoadedFleet, group: str,
              deployments: Sequence[Deployment]) -> HealthGateVars | None:
    """The health gate of a host serving `deployments`: those whose rollout turns it off are
    skipped; the longest timeout asked for applies. None: the role's defaults apply."""
    settings = [(d, resolve(loaded, group, d)) for d in deployments]
    skip = [d.name for d, s in settings if not s.health_gate and d.engine == "vllm"]
    ollama = [s.health_gate for d, s in settings if d.engine == "ollama"]
    timeouts = [s.health_gate_timeout for _, s in settings if s.health_gate_timeout]
    gate = HealthGateVars(health_gate_skip=skip or None,
                          health_gate_ollama=False if ollama and not any(ollama) else None,
                          health_gate_timeout=max(timeouts) if timeouts else None)
    return gate if gate.emitted() else None
