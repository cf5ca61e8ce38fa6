"""`orchestrate plan`: what would be installed where, and why; changes nothing."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.plan.planner import Plan
from orchestrator.workflows.common import Target, plan_for


@dataclass(frozen=True)
class PlanOptions:
    target: Target
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()


def plan(options: PlanOptions) -> Plan:
    return plan_for(options.target, list(options.only), list(options.skip))[1]
