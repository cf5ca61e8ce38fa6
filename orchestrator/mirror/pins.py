"""One version per fleet: a deployment's moving revision (a branch such as `master`, the
default) resolved to the hub's commit once, recorded, and given to every host.

Hosts that download a branch at different times could otherwise serve different weights.
`orchestrate up` resolves each moving revision of its group's hub models that has no pin
(orchestrator.mirror.weights.resolve_revision), records it in <state>/pins.json (0600),
and plans from the commit; later runs reuse the pin without asking the hub until fleet.yml
declares another revision, or `up --update-revisions` moves it. `plan` and `mirror` read the
pins and write none. Local models (model_dir) and Ollama library tags are not the hub's.

    <state>/pins.json   {"<model>@<declared>": {"model", "declared", "commit", "pinned_at",
                                               "endpoint"}}
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from orchestrator.config.fleet import Deployment, LoadedFleet
from orchestrator.errors import ConfigError, OrchestrateError
from orchestrator.mirror.weights import COMMIT_ID, HubUnreachable
from orchestrator.plan.planner import Plan, weights_origins

PINS = "pins.json"


class PinError(OrchestrateError):
    """A moving revision that could not be pinned: nothing recorded, nothing changed."""

    exit_code = 2


class Pin(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    declared: str
    commit: str
    pinned_at: dt.datetime
    endpoint: str

    @property
    def key(self) -> str:
        return pin_key(self.model, self.declared)

    def reason(self, deployment: str) -> str:
        return (f"{deployment}: {self.model} at commit {self.commit}, pinned on "
                f"{self.pinned_at:%Y-%m-%d} from {self.declared}")


def pin_key(model: str, declared: str) -> str:
    return f"{model}@{declared}"


@dataclass(frozen=True)
class Pinned:
    """The fleet with every pinned revision in place, and what the plan says about it."""

    loaded: LoadedFleet
    # Deployment -> the pin its revision was replaced by.
    pins: dict[str, Pin]
    # Deployment -> its moving revision that has no pin yet (plan, mirror before any up).
    unpinned: dict[str, str]


def _declared(dep: Deployment) -> str:
    # The planner's default (weights_origin): a deployment without one downloads master.
    return dep.revision or "master"


def moving(loaded: LoadedFleet, group: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The group's hub models whose revision moves: pin key -> (model id, deployments)."""
    return {pin_key(o.model_id, o.revision or "master"): (o.model_id, o.deployments)
            for o in weights_origins(loaded, group)
            if o.source == "modelscope" and not COMMIT_ID.fullmatch(o.revision or "master")}


def read_pins(state_dir: Path) -> dict[str, Pin]:
    path = state_dir / PINS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the pinned revisions: {exc}; remove the file to "
                          "pin again from the hub", file=str(path)) from None
    try:
        pins = [Pin.model_validate(entry) for entry in (data or {}).values()]
    except (ValidationError, AttributeError):
        raise ConfigError("not a file of pinned revisions; remove it to pin again from the "
                          "hub", file=str(path)) from None
    return {pin.key: pin for pin in pins}


def write_pins(state_dir: Path, pins: Mapping[str, Pin]) -> None:
    """Owner-only from the start, replaced whole (a crash leaves the old file)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path, partial = state_dir / PINS, state_dir / (PINS + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump({k: p.model_dump(mode="json") for k, p in sorted(pins.items())}, out,
                  indent=2)
        out.write("\n")
    partial.replace(path)


def apply(loaded: LoadedFleet, group: str, pins: Mapping[str, Pin]) -> Pinned:
    """`loaded` with each deployment's moving revision replaced by its pinned commit."""
    keys = {dep: key for key, (_, deps) in moving(loaded, group).items() for dep in deps}
    applied: dict[str, Pin] = {}
    unpinned: dict[str, str] = {}
    deployments = []
    for dep in loaded.fleet.deployments:
        key = keys.get(dep.name)
        pin = pins.get(key) if key else None
        if pin is not None:
            applied[dep.name] = pin
            dep = dep.model_copy(update={"revision": pin.commit})
        elif key:
            unpinned[dep.name] = _declared(dep)
        deployments.append(dep)
    fleet = loaded.fleet.model_copy(update={"deployments": deployments})
    return Pinned(dataclasses.replace(loaded, fleet=fleet), applied, unpinned)


def pin_revisions(loaded: LoadedFleet, group: str, state_dir: Path, *,
                  resolve: Callable[[str, str], str | None], endpoint: str, update: bool,
                  log: Callable[[str], None], now: dt.datetime | None = None) -> Pinned:
    """Pin every moving revision of the group's hub models that has none (all of them with
    `update`), record the pins, and return the fleet planned from them. `resolve(model,
    revision)` asks the hub (None: the revision is fixed already, as a tag is)."""
    known = read_pins(state_dir)
    when = now or dt.datetime.now(dt.UTC)
    pins = dict(known)
    for key, (model, _) in sorted(moving(loaded, group).items()):
        declared = key[len(model) + 1:]
        old = known.get(key)
        if old is not None and not update:
            continue
        try:
            commit = resolve(model, declared)
        except HubUnreachable as exc:
            if old is None:
                raise PinError(f"{model}@{declared}: cannot pin the revision to the hub's "
                               f"commit ({exc}); no earlier pin to keep. Reach the hub, or "
                               "give the deployment a commit id as revision") from None
            log(f"{model}@{declared}: the hub is unreachable ({exc}); keeping the pin "
                f"{old.commit} of {old.pinned_at:%Y-%m-%d}")
            continue
        if commit is None:
            pins.pop(key, None)
            continue
        if old is None or old.commit != commit:
            log(f"{model}@{declared}: pinned to commit {commit}"
                + (f" (was {old.commit})" if old else ""))
            pins[key] = Pin(model=model, declared=declared, commit=commit, pinned_at=when,
                            endpoint=endpoint)
    # Pins of revisions fleet.yml no longer declares go: declaring one again pins afresh.
    declared_now = {pin_key(d.model, _declared(d)) for d in loaded.fleet.deployments}
    pins = {k: p for k, p in pins.items() if k in declared_now}
    if pins != known:
        write_pins(state_dir, pins)
    return apply(loaded, group, pins)


def annotate(plan: Plan, pinned: Pinned) -> Plan:
    """`plan` with each host's reasons saying which commit its hub models are pinned to, and
    which moving revisions are not pinned yet."""
    def reasons(names: set[str]) -> list[str]:
        out = [pin.reason(dep) for dep, pin in sorted(pinned.pins.items()) if dep in names]
        return out + [f"{dep}: revision {declared} moves; not pinned yet: the next `up` pins "
                      "it to the hub's commit for every host"
                      for dep, declared in sorted(pinned.unpinned.items()) if dep in names]

    hosts = []
    for host in plan.hosts:
        entries = host.vars.get("model_weights_models") or []
        names = {str(e.get("name")) for e in entries if isinstance(e, dict)}
        extra = reasons(names)
        hosts.append(host.model_copy(update={"reasons": [*host.reasons, *extra]})
                     if extra else host)
    return plan.model_copy(update={"hosts": hosts})
