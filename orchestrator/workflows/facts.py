"""`orchestrate facts`: what the group's hosts really have (GPUs, driver, OS, disk), gathered
over Ansible's connection or reused from the cache, as `plan` and `up` plan from it; and
`orchestrate facts parse`: the GPU facts in a host's saved nvidia-smi output."""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from orchestrator.errors import ConfigError
from orchestrator.facts.hostfacts import HostFacts
from orchestrator.facts.nvidia_smi import (
    GpuInfo,
    MigDevice,
    SmiError,
    parse_nvidia_smi,
    summarize,
)
from orchestrator.workflows.common import (
    Events,
    FactsPolicy,
    Result,
    Target,
    find_facts,
    load,
)


@dataclass(frozen=True)
class FactsOptions:
    # Saved nvidia-smi output (any format); "-": standard input.
    file: Path
    # For CSV without a header: its --query-gpu fields.
    columns: tuple[str, ...] | None = None


class FactsResult(Result):
    """`orchestrate facts parse --json`: the GPU facts (the Ansible fact's shape too)."""

    driver_version: str | None = Field(description="e.g. 550.127.05")
    cuda_version: str | None = Field(description="the newest CUDA the driver supports")
    gpus: list[GpuInfo] = Field(description="each GPU found")
    mig_devices: list[MigDevice] = Field(description="MIG devices, where the output lists "
                                                     "them")
    error: SmiError | None = Field(description="a broken driver or tool, with the next "
                                               "step (exit 1); null when healthy")
    summary: str = Field(description="one line, as the table shows it")


def facts_parse(options: FactsOptions) -> FactsResult:
    name = str(options.file)
    try:
        text = sys.stdin.read() if name == "-" else options.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=name) from None
    facts = parse_nvidia_smi(text, columns=list(options.columns) if options.columns else None)
    return FactsResult.model_validate({**facts.to_dict(), "summary": summarize(facts)})


class GatheredHost(Result):
    """One host's facts in `orchestrate facts --json`."""

    host: str
    source: Literal["gathered", "cache"] = Field(description="gathered: reached by this "
                                                             "command; cache: "
                                                             ".orchestrate/facts/<host>.json")
    age_s: int = Field(description="seconds from the gathering to this command")
    facts: HostFacts = Field(description="the host's facts (reachable false: `unreachable` "
                                         "says why, and nothing else is known)")


class FactsReport(Result):
    """`orchestrate facts --json`."""

    group: str = Field(description="the host group (--hosts)")
    run_dir: str | None = Field(description="the gathering's run directory (ansible-runner's "
                                            "artifacts); null when every host came from the "
                                            "cache")
    hosts: list[GatheredHost] = Field(description="each host of the group, in fleet order")
    unreachable: list[str] = Field(description="hosts that could not be reached or read "
                                               "(exit 1); the others are still reported")


def gather(target: Target, refresh: bool, max_age: dt.timedelta,
           events: Events) -> FactsReport:
    """The facts of the target's hosts: the cache where younger than `max_age` (unless
    `refresh`), the others reached now (all in one run) and cached."""
    hosts = load(target).hosts_of(target.hosts)
    found = find_facts(target, hosts, FactsPolicy("gather", max_age=max_age, refresh=refresh),
                       events)
    now = dt.datetime.now(dt.UTC)
    known = [found.hosts[h.name] for h in hosts if h.name in found.hosts]
    return FactsReport(
        group=target.hosts, run_dir=str(found.run_dir) if found.run_dir else None,
        hosts=[GatheredHost(host=k.facts.host, source="cache" if k.source == "cache"
                            else "gathered",
                            age_s=max(0, int(k.facts.age(now).total_seconds())), facts=k.facts)
               for k in known],
        unreachable=[k.facts.host for k in known if not k.facts.reachable])
