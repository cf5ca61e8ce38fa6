"""The roles' defaults, where the Python side needs the same values as the roles.

roles/<role>/defaults/main.yml is the one definition of a value both sides use (where the
Python environment and the weights live, the weights' completion marker, Ollama's address,
Ray's port and paths, how many restarts make a unit "restarting in a loop"): the plan and
the probes read it here, so that changing a role default changes both. The roles still
work alone with plain ansible-playbook.

The roles are read from the checkout the package runs from (an editable install), else from
the copy of the project's Ansible side that a wheel carries (setup.py puts it under
orchestrator/_project/).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from orchestrator.errors import OrchestrateError


def _project_root() -> Path:
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "playbooks" / "site.yml").is_file():
        return checkout
    return Path(__file__).resolve().parents[1] / "_project"


# The project root: playbooks/, roles/, templates/, ansible.cfg (a checkout or the wheel's copy).
ROOT = _project_root()
ROLES = ROOT / "roles"


class NoCheckout(OrchestrateError):
    """Installed without the checkout's roles: an installation problem, which exits like a
    missing extra (orchestrator.errors.MissingExtra)."""

    exit_code = 2


def _no_checkout() -> NoCheckout:
    return NoCheckout(f"{ROLES} does not exist: orchestrate reads the Ansible roles of the "
                      "checkout it runs from, or the copy its wheel carries; reinstall with "
                      "`pip install <checkout>` or `pip install -e <checkout>`")


@functools.cache
def role_names() -> tuple[str, ...]:
    """The roles of the checkout, longest name first (so role_of finds the longest prefix)."""
    if not ROLES.is_dir():
        raise _no_checkout()
    return tuple(sorted((p.name for p in ROLES.iterdir() if (p / "defaults").is_dir()),
                        key=lambda name: (-len(name), name)))


def role_of(variable: str) -> str | None:
    """The role a variable belongs to by its prefix (`<role>_`), or None."""
    return next((role for role in role_names() if variable.startswith(role + "_")), None)


@functools.cache
def role_defaults(role: str) -> Mapping[str, Any]:
    """roles/<role>/defaults/main.yml, read once."""
    if not ROLES.is_dir():
        raise _no_checkout()
    path = ROLES / role / "defaults" / "main.yml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise OrchestrateError(f"{path}: cannot read the role's defaults: {exc}") from None
    if not isinstance(data, dict):
        raise OrchestrateError(f"{path}: not a mapping of variables")
    return MappingProxyType(data)


class RoleDefaults(BaseModel):
    """The role defaults the plan and the probes use, each named as its role names it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    python_env_path: str
    model_weights_root: str
    model_weights_marker: str
    gpu_check_nvidia_smi: str
    ollama_host: str
    ollama_port: int
    # A Jinja expression: the interface of the default route, resolved on the host.
    ray_cluster_network_interface: str
    ray_cluster_port: int
    ray_cluster_config_dir: str
    ray_cluster_group: str
    ray_cluster_temp_dir: str
    # NRestarts above which a unit is restarting in a loop (the verify tasks judge the same).
    vllm_max_restarts: int
    ollama_max_restarts: int


@functools.cache
def load_role_defaults() -> RoleDefaults:
    """The values of RoleDefaults from the roles' defaults files; one line when one is
    missing or of another type."""
    values: dict[str, Any] = {}
    for name in RoleDefaults.model_fields:
        role = role_of(name)
        defaults = role_defaults(role) if role else {}
        if name not in defaults:
            raise OrchestrateError(f"{ROLES}/{role or '?'}/defaults/main.yml: {name} is not "
                                   "defined, and the orchestrator needs its value")
        values[name] = defaults[name]
    try:
        return RoleDefaults.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0])
        raise OrchestrateError(f"{ROLES}/{role_of(name)}/defaults/main.yml: {name}: "
                               f"{error['msg']} (found {values[name]!r})") from None
