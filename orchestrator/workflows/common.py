"""What every workflow shares: which hosts (the target), how it reports while it runs, the
fleet, the hosts' facts and the plan it works from, and the base of every command's result."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from orchestrator.config.fleet import LoadedFleet, MirrorSettings, ResolvedHost, load_fleet
from orchestrator.config.vault import load_secrets
from orchestrator.errors import ConfigError
from orchestrator.facts import cache as facts_cache
from orchestrator.facts.hostfacts import HostFacts
from orchestrator.facts.offline import load_facts_dir
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.knowledge.roles import load_role_defaults
from orchestrator.mirror import pins
from orchestrator.mirror import weights as weights_mirror
from orchestrator.plan.planner import Plan, fact_paths, make_plan, select_stages
from orchestrator.run.gather import GatherHost, gather_facts
from orchestrator.run.render import new_run_id
from orchestrator.run.runner import Progress
from orchestrator.verify.bench import BenchReport
from orchestrator.verify.httpprobe import ProbeReport

# Relative to the working directory, as the operator's fleet.yml is.
STATE_DIR = Path(".orchestrate")
DEFAULT_FLEET = Path("fleet.yml")


class Result(BaseModel):
    """Base of every command's result: what `--json` prints."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Probes(ProbeReport):
    """A probe report with its verdict, as `--json` shows it."""

    # `passed` is derived: a document read back may carry it.
    model_config = ConfigDict(extra="ignore", frozen=True)

    @computed_field(description="every probe passed or was skipped")  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return super().passed

    @classmethod
    def of(cls, report: ProbeReport) -> Probes:
        return cls.model_validate(dict(report))


class Bench(BenchReport):
    """A benchmark report with its verdict, as `--json` shows it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    @computed_field(description="every deployment was measured without a failed "  # type: ignore[prop-decorator]
                                "request")
    @property
    def passed(self) -> bool:
        return super().passed

    @classmethod
    def of(cls, report: BenchReport) -> Bench:
        return cls.model_validate(dict(report))


def _no_progress(hosts: list[str]) -> AbstractContextManager[Callable[[Progress], None]]:
    return nullcontext(lambda _: None)


@dataclass(frozen=True)
class Events:
    """How a workflow tells the operator what it is doing while it runs (the CLI: dim lines
    on stderr, and a live table of an Ansible run's hosts)."""

    log: Callable[[str], None] = lambda _: None
    # Given the hosts of an Ansible run: a context for the run, yielding what takes its events.
    progress: Callable[[list[str]],
                       AbstractContextManager[Callable[[Progress], None]]] = _no_progress


@dataclass(frozen=True)
class Target:
    """The hosts a command works on, and where their description comes from."""

    hosts: str
    fleet: Path | None = None
    inventory: Path | None = None
    vault_password_file: Path | None = None
    # A fleet the caller made instead of a file (the CLI's built-in sandbox fleet).
    builtin: LoadedFleet | None = None
    state_dir: Path = field(default=STATE_DIR)

    @property
    def runs_root(self) -> Path:
        return self.state_dir / "runs"


def no_fleet_given(fleet: Path | None, inventory: Path | None) -> bool:
    """Neither -f nor -i, and no ./fleet.yml: where `--hosts sandbox` means the built-in one."""
    return fleet is None and inventory is None and not DEFAULT_FLEET.exists()


def load(target: Target) -> LoadedFleet:
    """The fleet of `target`: the caller's, -f FILE and/or -i INVENTORY, else ./fleet.yml."""
    if target.builtin is not None:
        return target.builtin
    fleet, inventory = target.fleet, target.inventory
    path = fleet or (DEFAULT_FLEET if DEFAULT_FLEET.exists() or inventory is None else None)
    if path is not None and not path.exists() and fleet is None:
        raise ConfigError("no fleet file here: run `orchestrate init` to write one, pass "
                          "-f FILE or -i INVENTORY, or use --hosts sandbox", file=str(path))
    return load_fleet(path, inventory)


# --- the hosts' facts: gathered, cached, read from a directory, or none ----------------------

DEFAULT_FACTS_MAX_AGE = dt.timedelta(hours=1)
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?")


def parse_duration(text: str, *, key: str) -> dt.timedelta:
    """"90s", "30m", "1h", "2d", "1h30m", or plain seconds ("0": never reuse)."""
    found = _DURATION.fullmatch(text.strip())
    if not text.strip() or found is None:
        raise ConfigError(f"'{text}' is not a duration: e.g. 90s, 30m, 1h, 1h30m, 2d, or 0",
                          key=key)
    days, hours, minutes, seconds = (int(part or 0) for part in found.groups())
    return dt.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


FactsMode = Literal["gather", "dir", "cached", "none"]


@dataclass(frozen=True)
class FactsPolicy:
    """Where the plan takes the hosts' facts from.

    gather: the cache where younger than max_age (unless refresh), the other hosts reached
      now in one run of playbooks/facts.yml and cached (plan, up);
    dir: one file per host in `directory` (plan --facts DIR), no host reached;
    cached: the cache of any age only, no host reached (probe, status, bench: they check
      what `up` planned from);
    none: no facts, fleet.yml's declarations alone (--no-gather).
    A host without facts, or unreachable, is planned from fleet.yml's declarations."""

    mode: FactsMode
    max_age: dt.timedelta = DEFAULT_FACTS_MAX_AGE
    refresh: bool = False
    directory: Path | None = None


GATHER = FactsPolicy("gather")
CACHED = FactsPolicy("cached")
NO_FACTS = FactsPolicy("none")

FactsSource = Literal["gathered", "cache", "dir"]


@dataclass(frozen=True)
class Known:
    """One host's facts and where they came from."""

    facts: HostFacts
    source: FactsSource


@dataclass(frozen=True)
class FoundFacts:
    hosts: dict[str, Known]
    # The gathering's run directory (ansible-runner's artifacts); None when no host was
    # reached.
    run_dir: Path | None = None


def find_facts(target: Target, hosts: list[ResolvedHost], policy: FactsPolicy,
               events: Events) -> FoundFacts:
    """The facts of `hosts` by `policy`; reachable gathered ones are cached."""
    names = [h.name for h in hosts]
    if policy.mode == "none" or not hosts:
        return FoundFacts({})
    if policy.mode == "dir":
        if policy.directory is None:
            raise ConfigError("no directory given", key="--facts")
        read = load_facts_dir(policy.directory, names)
        return FoundFacts({n: Known(f, "dir") for n, f in read.items()})
    now = dt.datetime.now(dt.UTC)
    known: dict[str, Known] = {}
    if not policy.refresh:
        max_age = None if policy.mode == "cached" else policy.max_age
        for name in names:
            cached = facts_cache.read(target.state_dir, name, max_age, now)
            if cached is not None:
                known[name] = Known(cached, "cache")
    missing = [h for h in hosts if h.name not in known]
    if known:
        limit = ("" if policy.mode == "cached"
                 else f", younger than {age_text(int(policy.max_age.total_seconds()))}")
        events.log(f"facts of {', '.join(known)} from {facts_cache.facts_dir(target.state_dir)}"
                   f" (cached{limit})")
    if policy.mode == "cached" or not missing:
        return FoundFacts(known)
    roles = load_role_defaults()
    run_path = (target.runs_root / new_run_id(dt.datetime.now(), "facts")).resolve()
    events.log(f"gathering the facts of {', '.join(h.name for h in missing)} "
               f"(playbooks/facts.yml, run {run_path.name})")
    with events.progress([h.name for h in missing]) as on_progress:
        gathered = gather_facts(
            [GatherHost(h.name, h.connection(), dict(h.vars), fact_paths(h, roles))
             for h in missing],
            run_path, operator_inventory=target.inventory, on_progress=on_progress)
    for name, facts in gathered.items():
        if facts.reachable:
            facts_cache.write(target.state_dir, facts)
        known[name] = Known(facts, "gathered")
    return FoundFacts(known, run_path)


def log_unreached(known: dict[str, Known], log: Callable[[str], None]) -> None:
    """For a plan: each host not reached, planned from the fleet's declarations instead."""
    for name, k in known.items():
        if not k.facts.reachable:
            log(f"{name}: not reached ({k.facts.unreachable}): planned from fleet.yml's "
                "declarations")


class FactsOrigin(Result):
    """Where the plan of one host took its facts from."""

    source: Literal["gathered", "cache", "dir", "fleet.yml"] = Field(
        description="gathered: reached by this command; cache: .orchestrate/facts/<host>.json "
                    "of an earlier gathering; dir: plan --facts DIR; fleet.yml: no facts (not "
                    "reached, or not asked for), planned from the fleet's declarations")
    gathered_at: dt.datetime | None = Field(description="when the facts were taken (UTC); "
                                                        "null without facts")
    age_s: int | None = Field(description="seconds from then to this command; null without "
                                          "facts")
    unreachable: str | None = Field(description="why the host could not be reached or read; "
                                                "null when it was")

    @classmethod
    def of(cls, known: Known | None, now: dt.datetime) -> FactsOrigin:
        if known is None:
            return cls(source="fleet.yml", gathered_at=None, age_s=None, unreachable=None)
        facts = known.facts
        if not facts.reachable:
            return cls(source="fleet.yml", gathered_at=facts.gathered_at, age_s=None,
                       unreachable=facts.unreachable or "not reached")
        return cls(source=known.source, gathered_at=facts.gathered_at,
                   age_s=max(0, int(facts.age(now).total_seconds())), unreachable=None)

    def line(self) -> str:
        """One line, as the plan table shows it."""
        if self.unreachable is not None:
            return f"not reached: {self.unreachable}; from fleet.yml"
        if self.age_s is None:
            return "from fleet.yml (no facts)"
        return f"{self.source}, {age_text(self.age_s)} old"


def age_text(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Planned:
    loaded: LoadedFleet
    plan: Plan
    facts: dict[str, Known]

    def origins(self, now: dt.datetime | None = None) -> dict[str, FactsOrigin]:
        """Per planned host, where its facts came from."""
        when = now or dt.datetime.now(dt.UTC)
        return {h.name: FactsOrigin.of(self.facts.get(h.name), when) for h in self.plan.hosts}


def make_planned(loaded: LoadedFleet, group: str, stages: list[str],
                 known: dict[str, Known]) -> Planned:
    plan = make_plan(loaded, group, load_knowledge(), load_cuda_compat(), stages,
                     roles=load_role_defaults(),
                     # None: the reasons then say the plan was made without facts.
                     facts={name: k.facts for name, k in known.items()} or None)
    return Planned(loaded, plan, known)


def plan_for(target: Target, only: list[str] | None = None, skip: list[str] | None = None,
             *, facts: FactsPolicy, events: Events | None = None) -> Planned:
    """The plan of the target's group, from the hosts' facts as `facts` says, and from the
    model commits `up` pinned (read only: the hub is not asked)."""
    pinned = pins.apply(load(target), target.hosts, pins.read_pins(target.state_dir))
    stages = select_stages(only, skip)
    events = events or Events()
    found = find_facts(target, pinned.loaded.hosts_of(target.hosts), facts, events)
    log_unreached(found.hosts, events.log)
    planned = make_planned(pinned.loaded, target.hosts, stages, found.hosts)
    return dataclasses.replace(planned, plan=pins.annotate(planned.plan, pinned))


def open_secrets(secrets_file: str | None, password_file: Path | None) -> dict[str, str]:
    """The API keys of the fleet's secrets file, opened before anything runs so that a wrong
    password fails first."""
    if secrets_file is None:
        return {}
    return load_secrets(Path(secrets_file), password_file)


def mirror_path(settings: MirrorSettings | None, state_dir: Path) -> Path:
    """The mirror directory: the fleet's mirror.dir, else <state>/mirror."""
    return weights_mirror.mirror_dir(settings, state_dir / "mirror").resolve()
