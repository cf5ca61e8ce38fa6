"""What every workflow shares: which hosts (the target), how it reports while it runs, the
fleet and plan it works from, and the base of every command's result."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, computed_field

from orchestrator.config.fleet import LoadedFleet, MirrorSettings, load_fleet
from orchestrator.config.vault import load_secrets
from orchestrator.errors import ConfigError
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.knowledge.roles import load_role_defaults
from orchestrator.mirror import weights as weights_mirror
from orchestrator.plan.planner import Plan, make_plan, select_stages
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


def plan_for(target: Target, only: list[str] | None = None, skip: list[str] | None = None
             ) -> tuple[LoadedFleet, Plan]:
    loaded = load(target)
    return loaded, make_plan(loaded, target.hosts, load_knowledge(), load_cuda_compat(),
                             select_stages(only, skip), roles=load_role_defaults())


def open_secrets(plan: Plan, password_file: Path | None) -> dict[str, str]:
    """The API keys of the plan's secrets file, opened before anything runs so that a wrong
    password fails first."""
    if plan.secrets_file is None:
        return {}
    return load_secrets(Path(plan.secrets_file), password_file)


def mirror_path(settings: MirrorSettings | None, state_dir: Path) -> Path:
    """The mirror directory: the fleet's mirror.dir, else <state>/mirror."""
    return weights_mirror.mirror_dir(settings, state_dir / "mirror").resolve()
