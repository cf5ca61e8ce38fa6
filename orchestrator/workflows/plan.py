"""`orchestrate plan`: what would be installed where, and why; changes nothing."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from orchestrator.mirror import pins
from orchestrator.plan.planner import Plan, select_stages
from orchestrator.workflows.common import (
    CACHED,
    GATHER,
    Events,
    FactsOrigin,
    FactsPolicy,
    Target,
    find_facts,
    load,
    log_unreached,
    make_planned,
)


@dataclass(frozen=True)
class PlanOptions:
    target: Target
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    facts: FactsPolicy = GATHER


class PlanResult(Plan):
    """`orchestrate plan --json`: the plan, and where each host's facts came from."""

    facts: dict[str, FactsOrigin] = Field(description="per host: where the facts it was "
                                                      "planned from came from")


def plan(options: PlanOptions, events: Events) -> PlanResult:
    policy = options.facts
    if options.target.builtin is not None and policy.mode == "gather":
        # The built-in sandbox's hosts run only while `up` keeps them: plan never starts
        # them, so it reads what the last `up` cached.
        events.log("plan does not start the sandbox's hosts: their facts are the ones the "
                   "last `up` cached; hosts without any are planned from the sandbox "
                   "fleet's declarations")
        policy = CACHED
    target = options.target
    # Refused before any host is reached.
    stages = select_stages(list(options.only), list(options.skip))
    # The commits `up` pinned the moving revisions to; plan reads them, asks no hub.
    pinned = pins.apply(load(target), target.hosts, pins.read_pins(target.state_dir))
    found = find_facts(target, pinned.loaded.hosts_of(target.hosts), policy, events)
    log_unreached(found.hosts, events.log)
    planned = make_planned(pinned.loaded, target.hosts, stages, found.hosts)
    plan = pins.annotate(planned.plan, pinned)
    return PlanResult.model_validate({**dict(plan), "facts": planned.origins()})
