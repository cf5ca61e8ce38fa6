"""Rendering: a plan becomes a run directory an operator can read and replay by hand.

    .orchestrate/runs/<id>/
      plan.json                     the plan, as `orchestrate plan --json` prints it
      inventory/hosts.yml           the hosts and how to reach them
      inventory/host_vars/<h>.yml   every planned variable of that host
      limit.txt                     the plan's hosts: the run is limited to them
      rollout.yml                   the services stage's batches (extra variables)
      command.txt                   the same run as a plain ansible-playbook command
      artifacts/                    ansible-runner's events and stdout (filled by the run)

No secret is ever written here: keys are referenced by path, never copied. The directory is
the operator's alone (0700, files 0600): host_vars and the plan name hosts, users and keys.

Every string of the plan reaches Ansible as data, tagged `!unsafe`: a fleet value such as
"{{ lookup('pipe', ...) }}" is never templated. The only templates written are the planned
references (_REFERENCES): exact shapes the planner writes on purpose, which read a
variable or a fact and can run nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import re
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
    # The services stage's batches and their order (orchestrate_serial and
    # orchestrate_rollout_hosts, read by playbooks/services.yml), as extra variables.
    rollout_file: Path | None = None

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
        if self.rollout_file:
            args += ["--extra-vars", f"@{self.rollout_file}"]
        if self.secrets_file:
            args += ["--extra-vars", f"@{self.secrets_file}"]
        if self.vault_password_file:
            args += ["--vault-password-file", str(self.vault_password_file)]
        return args


# The planned references, each a whole string: a variable by name where the plan puts a
# secret of the fleet's Vault file (api_key, ray_cluster_auth_token: only the plan writes
# there, from names the fleet validates as identifiers); elsewhere a ray_cluster variable
# (with its role default; a path below it), a host's address fact, alone or as ADDRESS:PORT, or the
# controller's Python.
_SECRET_KEYS = frozenset({"api_key", "ray_cluster_auth_token", "model_weights_mirror_token",
                          "python_env_pip_find_links_password", "ollama_archive_token"})
_SECRET_REFERENCE = re.compile(r"\{\{ [A-Za-z_][A-Za-z0-9_]* \}\}")
_ROLE_VARIABLE = r"\{\{ ray_cluster_[a-z_]+(?: \| default\((?:[0-9]+|'[A-Za-z0-9_./-]*')\))? \}\}"
_ADDRESS_FACT = (r"\{\{ ansible_facts\[ray_cluster_network_interface \| replace\('-', '_'\)\]"
                 r"\['ipv4'\]\['address'\] \}\}")
_DEFAULT_ROUTE = r"\{\{ ansible_facts\['default_ipv4'\]\['interface'\] \| default\(''\) \}\}"
_NAME = re.compile(r"[A-Za-z0-9_.@:/+-]+")
# The controller's own Python, the usual interpreter of a local connection.
_CONTROLLER_PYTHON = r"\{\{ ansible_playbook_python \}\}"
_REFERENCES = re.compile(f"{_ROLE_VARIABLE}(?:/[A-Za-z0-9_.-]+)*|{_DEFAULT_ROUTE}"
                         f"|{_CONTROLLER_PYTHON}|{_ADDRESS_FACT}(?::{_ROLE_VARIABLE})?")


class _Unsafe(str):
    """A string Ansible must take as data: written with the !unsafe tag."""


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    pass


_Dumper.add_representer(_Unsafe, lambda dumper, value: dumper.represent_scalar(
    "!unsafe", str(value)))


def _planned_reference(key: str | None, value: str) -> bool:
    return bool(_REFERENCES.fullmatch(value)
                or (key in _SECRET_KEYS and _SECRET_REFERENCE.fullmatch(value)))


def as_data(value: object, key: str | None = None) -> object:
    """`value` with every string tagged !unsafe, but for the planned references; mapping
    keys too unless they are plain names (kept readable: a name templates to itself)."""
    if isinstance(value, str):
        return value if _planned_reference(key, value) else _Unsafe(value)
    if isinstance(value, dict):
        return {k if isinstance(k, str) and _NAME.fullmatch(k) else as_data(k):
                as_data(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_data(item, key) for item in value]
    return value


def ansible_yaml(data: object) -> str:
    """YAML for Ansible's inventory: every string data (as_data)."""
    return yaml.dump(as_data(data), Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False, width=100)


def comment(text: str) -> str:
    """`text` as the body of one YAML comment line: a line break in it would end the
    comment and start YAML of its own."""
    return " ".join(str(text).splitlines())


_jinja.filters["comment"] = comment


def write_private(path: Path, text: str) -> None:
    """A file of a run directory, readable by its owner only from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def new_run_id(now: dt.datetime, command: str) -> str:
    return f"{now.strftime('%Y%m%d-%H%M%S-%f')}-{command}"


def make_run_dir(plan: Plan, runs_root: Path, run_id: str) -> Path:
    """A fresh run directory holding `plan`: where every command that works on hosts (with
    a playbook or without: probe, bench) keeps what it did."""
    # Absolute: ansible-runner runs ansible-playbook from the project directory.
    path = (runs_root / run_id).resolve()
    runs_root.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700)
    write_private(path / "plan.json", plan.model_dump_json(indent=2) + "\n")
    return path


def rollout_vars(plan: Plan) -> dict[str, object]:
    """The plan's batches as playbooks/services.yml reads them: `serial` as a list of batch
    sizes over the hosts in batch order. Hosts left out of the plan since it was made (a
    failed first part of `up`) are left out of their batch; a batch left empty is dropped."""
    names = {h.name for h in plan.hosts}
    batches = [kept for batch in plan.rollout.batches if (kept := [h for h in batch
                                                                   if h in names])]
    order = [h for batch in batches for h in batch]
    # Hosts a plan made without batches still run, after them, all at once.
    rest = [h.name for h in plan.hosts if h.name not in order]
    if rest:
        batches.append(rest)
    return {"orchestrate_serial": [len(b) for b in batches],
            "orchestrate_rollout_hosts": ",".join([*order, *rest]),
            "orchestrate_max_fail_percentage": 0}


def render(plan: Plan, runs_root: Path, run_id: str, *, check: bool = False,
           operator_inventory: Path | None = None,
           vault_password_file: Path | None = None) -> RunDir:
    """Write the run directory for `plan`; stage selection becomes tags on site.yml."""
    path = make_run_dir(plan, runs_root, run_id)
    inventory = path / "inventory"
    inventory.mkdir(mode=0o700)
    (inventory / "host_vars").mkdir(mode=0o700)
    (path / "artifacts").mkdir(mode=0o700)
    hosts = {h.name: h.connection for h in plan.hosts}
    children: dict[str, object] = {plan.group: {"hosts": hosts}}
    if plan.ray_cluster is not None:
        # The groups playbooks/ray_cluster.yml and roles/ray_cluster read.
        ray = plan.ray_cluster
        children["ray_cluster_members"] = {"hosts": {name: {} for name in ray.members}}
        children["ray_head"] = {"hosts": {ray.head: {}}}
    write_private(inventory / "hosts.yml", _jinja.get_template("inventory.yml.j2").render(
        group=plan.group, run_id=run_id, ray_cluster=plan.ray_cluster,
        hosts_yaml=ansible_yaml({"all": {"children": children}})))
    for host in plan.hosts:
        write_private(inventory / "host_vars" / f"{host.name}.yml",
               _jinja.get_template("host_vars.yml.j2").render(
                   host=host, run_id=run_id, vars_yaml=ansible_yaml(host.vars)))

    limit_file = path / "limit.txt"
    write_private(limit_file, "".join(f"{h.name}\n" for h in plan.hosts))

    rollout_file = path / "rollout.yml"
    write_private(rollout_file, "# The services stage's batches (playbooks/services.yml).\n"
                  + ansible_yaml(rollout_vars(plan)))

    everything = tuple(plan.stages) == STAGES
    run = RunDir(path=path, run_id=run_id, inventory=inventory, playbook=PLAYBOOK,
                 tags=[] if everything else list(plan.stages), skip_tags=[], check=check,
                 operator_inventory=operator_inventory.resolve() if operator_inventory
                 else None,
                 secrets_file=Path(plan.secrets_file).expanduser().resolve()
                 if plan.secrets_file else None,
                 vault_password_file=vault_password_file.expanduser().resolve()
                 if vault_password_file else None,
                 limit_file=limit_file, rollout_file=rollout_file)
    replay = ["ansible-playbook", *[arg for source in run.inventories()
                                    for arg in ("-i", source)],
              str(ROOT / PLAYBOOK), *run.ansible_args()]
    write_private(path / "command.txt", f"# Same run by hand, from {ROOT}:\nANSIBLE_CONFIG="
           f"{shlex.quote(str(ROOT / 'ansible.cfg'))} {shlex.join(replay)}\n")
    return run
