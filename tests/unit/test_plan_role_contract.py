"""The contract between the plan and the roles.

* Every variable a plan gives a host is an option of the role its prefix names
  (roles/<role>/meta/argument_specs.yml, entry point main), with the type the role
  declares, entries of lists and dicts included. Two walks: every plan in tests/golden
  (plus two fleets reaching what no golden holds: Ray across hosts, API keys, a mirror,
  per-deployment environments, conda, a GGUF import), value by value; and every field of
  the typed models the plan builds them from (orchestrator/plan/rolevars.py), which covers
  whatever a plan can emit.
* The few variables that are no role's option are listed below with the reason, and each
  is checked to be real: read by the playbook named, or documented by Ansible itself.
* Values both sides need come from the role defaults (orchestrator/knowledge/roles.py):
  no module of the package keeps a copy of them.

Jinja expressions: the plan passes some values as "{{ ... }}" that Ansible resolves on the
host (a secret from the Vault file, the Ray head's address, the role's default-route
interface). Ansible templates a role's variables before checking them against its
argument_specs, so an expression is accepted where the option is declared str, path or
raw, whose rendered value is text; the plan never passes one where an int, bool, list or
dict is declared (checked here), so the type Ansible validates is the type the plan wrote.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible import constants as ansible_constants
from ansible.plugins.connection import ssh
from pydantic import BaseModel

from orchestrator.config.fleet import load_fleet
from orchestrator.errors import OrchestrateError
from orchestrator.knowledge import roles
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.plan.planner import make_plan
from orchestrator.plan.rolevars import EMITTED, OllamaModel, PlaybookVars, RoleVars

REPO = Path(__file__).resolve().parents[2]
GOLDEN = sorted((REPO / "tests" / "golden").glob("*.json"))

# Variables a plan emits that are no role's option: where each is read, and why.
NOT_ROLE_OPTIONS = {
    "orchestrate_profile": (
        "playbooks/drivers.yml",
        "the host's profile (gpu, cpu): the drivers stage runs its roles on gpu hosts only"),
    "python_env_paths": (
        "playbooks/python_env.yml",
        "one environment per deployment: the stage runs python_env and pytorch once per "
        "path, handing each its python_env_path / pytorch_env_path"),
    "nvidia_driver_manage": (
        "playbooks/drivers.yml",
        "whether the drivers stage runs the nvidia_driver role at all (which always "
        "installs once it runs)"),
}

FLEET_RAY = """\
secrets: secrets.vault.yml
mirror: {url: "http://mirror.example:8080/q"}
groups:
  big:
    gpu: {name: NVIDIA L40S, count: 2}
    driver: {manage: true, fabric_manager: false}
    hosts:
      gpu-a: {address: 10.0.0.21}
      gpu-b: {address: 10.0.0.22}
deployments:
  - name: qwen72b
    model: Qwen/Qwen2.5-72B-Instruct
    engine: vllm
    hosts: big
    port: 8000
    nodes: 2
    api_key_var: vault_qwen72b_api_key
    ray: {auth_token_var: vault_ray_token}
"""

FLEET_CPU = """\
groups:
  c:
    profile: cpu
    python: {manager: conda, per_deployment: true,
             conda_installer_url: "file:///srv/Miniforge3-Linux-x86_64.sh"}
    pip: {find_links: /srv/wheels, no_index: true}
    hosts: {c1: {address: 10.0.0.9}}
deployments:
  - {name: chat, model: Qwen/Qwen2.5-0.5B-Instruct, engine: vllm, hosts: c, port: 8000,
     options: {env: {VLLM_LOGGING_LEVEL: DEBUG}, open: true}}
  - {name: local, model: qwen-local, engine: ollama, hosts: c, port: 11434,
     model_dir: /srv/gguf, options: {gguf_file: qwen2.5-0.5b-instruct-q4_k_m.gguf}}
"""

_PY_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str, "path": str, "int": int, "bool": bool, "float": (int, float), "list": list,
    "dict": dict}


@functools.cache
def options(role: str) -> dict[str, Any]:
    specs = yaml.safe_load((REPO / "roles" / role / "meta" / "argument_specs.yml").read_text())
    return dict(specs["argument_specs"]["main"]["options"])


@functools.cache
def ansible_documented() -> frozenset[str]:
    """Variables Ansible documents: its ssh connection's settings and the magic variables
    (ansible_become and its kin)."""
    doc = yaml.safe_load(ssh.DOCUMENTATION)
    names = {v["name"] for option in doc["options"].values() for v in option.get("vars", [])}
    names.update(n for aliases in ansible_constants.MAGIC_VARIABLE_MAPPING.values()
                 for n in aliases)
    return frozenset(names)


def _is_jinja(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def _element(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec of a list's entries."""
    return {"type": spec["elements"], **({"options": spec["options"]} if "options" in spec
                                         else {})}


def value_mismatches(where: str, spec: dict[str, Any], value: Any) -> list[str]:
    declared = spec.get("type", "str")
    if value is None:
        return [f"{where}: null, but the role requires it"] if spec.get("required") else []
    if declared == "raw":
        return []
    if _is_jinja(value) and declared not in ("str", "path"):
        return [f"{where}: a Jinja expression {value!r} where the role declares {declared}"]
    if (isinstance(value, bool) and declared != "bool") or \
            not isinstance(value, _PY_TYPES[declared]):
        return [f"{where}: {type(value).__name__} {value!r}, the role declares {declared}"]
    if "choices" in spec and not _is_jinja(value) and value not in spec["choices"]:
        return [f"{where}: {value!r} is not one of the role's choices {spec['choices']}"]
    out: list[str] = []
    if declared == "list" and "elements" in spec:
        for i, item in enumerate(value):
            out += value_mismatches(f"{where}[{i}]", _element(spec), item)
    if declared == "dict" and "options" in spec:
        for key, item in value.items():
            sub = spec["options"].get(key)
            out += (value_mismatches(f"{where}.{key}", sub, item) if sub is not None
                    else [f"{where}.{key}: not among the role's sub-options"])
        out += [f"{where}.{key}: required by the role, missing"
                for key, sub in spec["options"].items() if sub.get("required")
                and key not in value]
    return out


def host_mismatches(host: dict[str, Any]) -> list[str]:
    out = [f"{host['name']}: {name}: not a variable Ansible documents"
           for name in host["connection"] if name not in ansible_documented()]
    for name, value in host["vars"].items():
        where = f"{host['name']}: {name}"
        if name in NOT_ROLE_OPTIONS:
            continue
        if name.startswith("ansible_"):
            out += [] if name in ansible_documented() else [
                f"{where}: not a variable Ansible documents"]
            continue
        role = roles.role_of(name)
        if role is None:
            out.append(f"{where}: no role has this prefix, and it is not in NOT_ROLE_OPTIONS")
        elif name not in options(role):
            out.append(f"{where}: not an option of roles/{role}/meta/argument_specs.yml")
        else:
            out += value_mismatches(where, options(role)[name], value)
    return out


def _extra_plan(tmp_path: Path, text: str, group: str) -> dict[str, Any]:
    path = tmp_path / "fleet.yml"
    path.write_text(text, encoding="utf-8")
    plan = make_plan(load_fleet(path), group, load_knowledge(), load_cuda_compat())
    return json.loads(plan.model_dump_json())


@pytest.mark.parametrize("source", [p.name for p in GOLDEN] + ["FLEET_RAY", "FLEET_CPU"])
def test_every_planned_variable_is_an_option_of_its_role_of_the_declared_type(
        source: str, tmp_path: Path) -> None:
    if source == "FLEET_RAY":
        plan = _extra_plan(tmp_path, FLEET_RAY, "big")
        assert plan["ray_cluster"] and "ray_cluster_auth_token" in plan["hosts"][0]["vars"]
    elif source == "FLEET_CPU":
        plan = _extra_plan(tmp_path, FLEET_CPU, "c")
        assert plan["hosts"][0]["vars"]["ollama_models"][0]["gguf"]
    else:
        plan = json.loads((REPO / "tests" / "golden" / source).read_text())
    assert plan["hosts"]
    assert [m for host in plan["hosts"] for m in host_mismatches(host)] == []


def test_the_check_finds_what_the_roles_would_refuse() -> None:
    """The walk above is not vacuous: a mistyped, misnamed or unprefixed variable fails."""
    host = json.loads(GOLDEN[0].read_text())["hosts"][0]
    broken = {**host, "vars": {**host["vars"], "vllm_max_restarts": "{{ n }}",
                               "python_env_pip_no_index": "no", "vllm_deploymnets": [],
                               "served_port": 1, "ansible_ssh_pass_word": "x",
                               "model_weights_models": [{"name": "m", "source": "ftp"}]}}
    assert sorted(host_mismatches(broken)) == sorted(f"{host['name']}: {m}" for m in [
        "python_env_pip_no_index: str 'no', the role declares bool",
        "model_weights_models[0].source: 'ftp' is not one of the role's choices "
        "['local', 'modelscope', 'mirror']",
        "model_weights_models[0].dest: required by the role, missing",
        "vllm_max_restarts: a Jinja expression '{{ n }}' where the role declares int",
        "vllm_deploymnets: not an option of roles/vllm/meta/argument_specs.yml",
        "served_port: no role has this prefix, and it is not in NOT_ROLE_OPTIONS",
        "ansible_ssh_pass_word: not a variable Ansible documents"])


def test_ansible_itself_accepts_every_golden_hosts_variables_for_every_role(
        tmp_path: Path) -> None:
    """The same check by Ansible: each role's argument_specs validated (as a role's start
    does) against every golden host's variables (and FLEET_CPU's; FLEET_RAY's refer to
    the hosts' facts), with the secrets they reference defined.
    A host given a variable of the wrong type proves that Ansible does refuse one."""
    hosts = {f"{path.stem}--{host['name']}": host["vars"]
             for path in GOLDEN for host in json.loads(path.read_text())["hosts"]}
    hosts.update({f"FLEET_CPU--{host['name']}": host["vars"]
                  for host in _extra_plan(tmp_path, FLEET_CPU, "c")["hosts"]})
    hosts["wrong-type"] = {**next(iter(hosts.values())), "python_env_pip_no_index": "maybe"}
    secrets = {name: "a-test-secret" for name in sorted(set(re.findall(
        r"\{\{ (\w+) \}\}", json.dumps(list(hosts.values())))))}
    inventory = {"all": {"hosts": {name: {"ansible_connection": "local",
                                          "ansible_python_interpreter": sys.executable,
                                          **variables}
                                   for name, variables in hosts.items()},
                         "vars": secrets}}
    play = [{"hosts": "all", "gather_facts": False, "tasks": [
        {"name": f"Validate {role}",
         "ansible.builtin.validate_argument_spec": {"argument_spec": options(role)}}
        for role in roles.role_names()]}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    (tmp_path / "inventory.json").write_text(json.dumps(inventory))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_STDOUT_CALLBACK": "json", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp")}
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"),
                           "-i", str(tmp_path / "inventory.json"), str(tmp_path / "play.yml")],
                          env=env, capture_output=True, text=True, timeout=300, check=False,
                          cwd=REPO)
    report = json.loads(proc.stdout)
    failed = {name: stats["failures"] for name, stats in report["stats"].items()
              if stats["failures"]}
    assert failed == {"wrong-type": 1}
    [refused] = [result["msg"] for play_report in report["plays"]
                 for task in play_report["tasks"]
                 for name, result in task["hosts"].items() if name == "wrong-type"
                 and result.get("failed")]
    assert "python_env_pip_no_index" in refused


def annotation_mismatches(where: str, annotation: Any, spec: dict[str, Any]) -> list[str]:
    """A typed field against the option's declared type (and choices, entries, sub-options)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        [annotation] = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    declared = spec.get("type", "str")
    if origin is typing.Literal:
        ok = declared in ("str", "path") and set(args) <= set(spec.get("choices", args))
    elif origin is list:
        if declared != "list":
            return [f"{where}: list, the role declares {declared}"]
        return annotation_mismatches(f"{where}[]", args[0], _element(spec)) \
            if "elements" in spec else []
    elif origin is dict:
        ok = declared == "dict"
    elif inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        if declared != "dict":
            return [f"{where}: {annotation.__name__} (a dict), the role declares {declared}"]
        return model_mismatches(where, annotation, spec["options"]) if "options" in spec else []
    else:
        ok = {str: ("str", "path"), int: ("int",), bool: ("bool",)}.get(annotation, ()) \
            .__contains__(declared)
    name = getattr(annotation, "__name__", str(annotation))
    return [] if ok else [f"{where}: {name}, the role declares {declared}"]


def model_mismatches(where: str, model: type[BaseModel],
                     spec_options: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, field in model.model_fields.items():
        if name not in spec_options:
            out.append(f"{where}.{name}: not among the role's options")
            continue
        out += annotation_mismatches(f"{where}.{name}", field.annotation, spec_options[name])
    for name, spec in spec_options.items():
        if spec.get("required") and name not in model.model_fields:
            out.append(f"{where}.{name}: required by the role, not in {model.__name__}")
        elif spec.get("required") and not model.model_fields[name].is_required():
            out.append(f"{where}.{name}: required by the role, optional in {model.__name__}")
    return out


def test_the_typed_role_variables_are_the_roles_options_with_their_types() -> None:
    mismatches: list[str] = []
    for model in EMITTED:
        if not issubclass(model, RoleVars):
            assert model is PlaybookVars
            assert set(model.model_fields) == set(NOT_ROLE_OPTIONS)
            continue
        assert model.role in roles.role_names()
        mismatches += [f"{model.__name__}.{name}: its prefix is not role {model.role}'s"
                       for name in model.model_fields if roles.role_of(name) != model.role]
        mismatches += model_mismatches(model.__name__, model, options(model.role))
    assert mismatches == []


def test_the_typed_check_finds_fields_the_role_would_refuse() -> None:
    class Wrong(RoleVars):
        role = "vllm"
        vllm_max_restarts: str
        vllm_rdma: int | None = None
        vllm_deployments: list[OllamaModel]
        vllm_requirements: str

    assert model_mismatches("Wrong", Wrong, options("vllm")) == [
        "Wrong.vllm_max_restarts: str, the role declares int",
        "Wrong.vllm_rdma: int, the role declares bool",
        "Wrong.vllm_deployments[].gguf: not among the role's options",
        "Wrong.vllm_deployments[].port: required by the role, not in OllamaModel",
        "Wrong.vllm_deployments[].args: required by the role, not in OllamaModel",
        "Wrong.vllm_requirements: not among the role's options"]


@pytest.mark.parametrize("name", sorted(NOT_ROLE_OPTIONS))
def test_each_variable_that_is_no_role_option_is_read_where_the_list_says(name: str) -> None:
    path, _ = NOT_ROLE_OPTIONS[name]
    assert name in (REPO / path).read_text(encoding="utf-8")
    role = roles.role_of(name)
    # Were it an option of the role its name starts with, it would belong there instead.
    assert role is None or name not in options(role)


# Host scripts run on the hosts' own python3, away from the checkout (standard library only).
_HOST_SCRIPTS = {"hostcollect.py", "deviceallow.py", "gpu_smoke.py"}


def test_no_module_keeps_a_copy_of_a_role_default() -> None:
    """Paths and file names both sides use appear in the roles' defaults only."""
    defaults = roles.load_role_defaults()
    shared = {defaults.python_env_path, defaults.model_weights_root,
              defaults.model_weights_marker, defaults.ray_cluster_config_dir,
              defaults.ray_cluster_temp_dir}
    copies = []
    for path in sorted((REPO / "orchestrator").rglob("*.py")):
        if path.name in _HOST_SCRIPTS:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                copies += [f"{path.relative_to(REPO)}:{node.lineno}: {value}"
                           for value in shared if value in node.value]
    assert copies == []


def test_the_restart_limits_and_paths_are_the_role_defaults() -> None:
    defaults = roles.load_role_defaults()
    for name, value in defaults.model_dump().items():
        role = roles.role_of(name)
        assert role is not None
        assert roles.role_defaults(role)[name] == value
    assert roles.role_of("ray_cluster_port") == "ray_cluster"
    assert roles.role_of("pytorch_requirement") == "pytorch"
    assert roles.role_of("orchestrate_profile") is None


@pytest.fixture
def roles_at(monkeypatch: pytest.MonkeyPatch):
    """Point orchestrator.knowledge.roles at another roles directory, caches cleared."""
    def clear() -> None:
        for cached in (roles.role_names, roles.role_defaults, roles.load_role_defaults):
            cached.cache_clear()

    def point(directory: Path) -> None:
        monkeypatch.setattr(roles, "ROLES", directory)
        clear()
    yield point
    monkeypatch.undo()
    clear()


def test_without_the_roles_one_line_says_to_reinstall(
        roles_at, tmp_path: Path) -> None:
    roles_at(tmp_path / "site-packages" / "roles")
    with pytest.raises(roles.NoCheckout) as caught:
        roles.load_role_defaults()
    assert caught.value.exit_code == 2
    assert str(caught.value) == (
        f"{tmp_path}/site-packages/roles does not exist: orchestrate reads the Ansible roles "
        "of the checkout it runs from, or the copy its wheel carries; reinstall with "
        "`pip install <checkout>` or `pip install -e <checkout>`")


def test_a_role_default_of_another_type_is_one_line(roles_at, tmp_path: Path) -> None:
    for defaults in (REPO / "roles").glob("*/defaults/main.yml"):
        copy = tmp_path / defaults.relative_to(REPO)
        copy.parent.mkdir(parents=True)
        shutil.copy(defaults, copy)
    vllm = tmp_path / "roles" / "vllm" / "defaults" / "main.yml"
    vllm.write_text(vllm.read_text().replace("vllm_max_restarts: 2", "vllm_max_restarts: two"))
    roles_at(tmp_path / "roles")
    with pytest.raises(OrchestrateError) as caught:
        roles.load_role_defaults()
    assert str(caught.value) == (f"{tmp_path}/roles/vllm/defaults/main.yml: vllm_max_restarts: "
                                 "Input should be a valid integer (found 'two')")
