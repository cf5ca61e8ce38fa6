"""Rendering: a plan becomes a run directory an operator can read and replay by hand.

    .orchestrate/runs/<id>/
      plan.json                     the plan, as `orchestrate plan --json` prints it
      inventory/hosts.yml           the hosts and how to reach them
      inventory/host_vars/<h>.yml   every planned variable of that host
      limit.txt                     the plan's hosts: the run is limited to them
      command.txt                   the same run as a plain ansible-playbook command
      artifacts/                    ansible-runner's events and stdout (filled by the run)

No secret is ever written here: keys are referenced by path, never copied.
"""

from __future__ import annotations

import datetime as dt
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined

# The checkout's root, defined once there; re-exported for the modules that import it here.
from orchestrator.knowledge.roles import ROOT as ROOT
from orchestrator.plan.planner import STAGES, Plan

PLAYBOOK = "playbooks/site.yml"

_jinja = Environment(loader=FileSystemLoader(ROOT / "templates"), undefined=StrictUndefined,
                     keep_trailing_newline=True, autoescape=False)


@dataclass(frozen=True)
class RunDir:
    path: Path
    run_id: str
    inventory: Path
    playbook: str
    tags: list[str]
    skip_tags: list[str]
    check: bool
    # The operator's own inventory (-i), read first so that its group_vars and
    # host_vars apply; the planned host_vars in `inventory` take precedence.
    operator_inventory: Path | None = None
    # The fleet's Vault-encrypted secrets (extra variables) and how to open them. Paths
    # only: the secrets stay encrypted on disk and never enter the run directory.
    secrets_file: Path | None = None
    vault_password_file: Path | None = None
    # The file naming the plan's hosts, one per line: the run is limited to them, so that
    # the other hosts of an operator's inventory (-i) are never touched by `hosts: all`.
    limit_file: Path | None = None

    def inventories(self) -> list[str]:
        own = [str(self.operator_inventory)] if self.operator_inventory else []
        return [*own, str(self.inventory)]

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    def ansible_args(self) -> list[str]:
        """Options for ansible-playbook shared by the CLI replay and ansible-runner."""
        args: list[str] = []
        if self.limit_file:
            args += ["--limit", f"@{self.limit_file}"]
        if self.tags:
            args += ["--tags", ",".join(self.tags)]
        if self.skip_tags:
            args += ["--skip-tags", ",".join(self.skip_tags)]
        if self.check:
            args += ["--check", "--diff"]
        if self.secrets_file:
            args += ["--extra-vars", f"@{self.secrets_file}"]
        if self.vault_password_file:
            args += ["--vault-password-file", str(self.vault_password_file)]
        return args


def _yaml(data: object) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


def new_run_id(now: dt.datetime, command: str) -> str:
    return f"{now.strftime('%Y%m%d-%H%M%S-%f')}-{command}"


def make_run_dir(plan: Plan, runs_root: Path, run_id: str) -> Path:
    """A fresh run directory holding `plan`: where every command that works on hosts (with
    a playbook or without: probe, bench) keeps what it did."""
    # Absolute: ansible-runner runs ansible-playbook from the project directory.
    path = (runs_root / run_id).resolve()
    path.mkdir(parents=True)
    (path / "plan.json").write_text(plan.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def render(plan: Plan, runs_root: Path, run_id: str, *, check: bool = False,
           operator_inventory: Path | None = None,
           vault_password_file: Path | None = None) -> RunDir:
    """Write the run directory for `plan`; stage selection becomes tags on site.yml."""
    path = make_run_dir(plan, runs_root, run_id)
    inventory = path / "inventory"
    (inventory / "host_vars").mkdir(parents=True)
    (path / "artifacts").mkdir()
    hosts = {h.name: h.connection for h in plan.hosts}
    children: dict[str, object] = {plan.group: {"hosts": hosts}}
    if plan.ray_cluster is not None:
        # The groups playbooks/ray_cluster.yml and roles/ray_cluster read.
        ray = plan.ray_cluster
        children["ray_cluster_members"] = {"hosts": {name: {} for name in ray.members}}
        children["ray_head"] = {"hosts": {ray.head: {}}}
    (inventory / "hosts.yml").write_text(
        _jinja.get_template("inventory.yml.j2").render(
            group=plan.group, run_id=run_id, ray_cluster=plan.ray_cluster,
            hosts_yaml=_yaml({"all": {"children": children}})),
        encoding="utf-8")
    for host in plan.hosts:
        (inventory / "host_vars" / f"{host.name}.yml").write_text(
            _jinja.get_template("host_vars.yml.j2").render(
                host=host, run_id=run_id, vars_yaml=_yaml(host.vars)),
            encoding="utf-8")

    limit_file = path / "limit.txt"
    limit_file.write_text("".join(f"{h.name}\n" for h in plan.hosts), encoding="utf-8")

    everything = tuple(plan.stages) == STAGES
    run = RunDir(path=path, run_id=run_id, inventory=inventory, playbook=PLAYBOOK,
                 tags=[] if everything else list(plan.stages), skip_tags=[], check=check,
                 operator_inventory=operator_inventory.resolve() if operator_inventory
                 else None,
                 secrets_file=Path(plan.secrets_file).expanduser().resolve()
                 if plan.secrets_file else None,
                 vault_password_file=vault_password_file.expanduser().resolve()
                 if vault_password_file else None,
                 limit_file=limit_file)
    replay = ["ansible-playbook", *[arg for source in run.inventories()
                                    for arg in ("-i", source)],
              str(ROOT / PLAYBOOK), *run.ansible_args()]
    (path / "command.txt").write_text(
        f"# Same run by hand, from {ROOT}:\nANSIBLE_CONFIG={ROOT / 'ansible.cfg'} "
        f"{shlex.join(replay)}\n", encoding="utf-8")
    return run
