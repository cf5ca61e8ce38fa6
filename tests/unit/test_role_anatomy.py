"""The roles' shape, held to the design's conventions (design.md, "Roles"):

- tags: every tag is `<role>_install|configure|run` (or one the README documents), and an
  include_tasks that carries tags hands them to its tasks with `apply` (without it,
  `--tags vllm_configure` selects the include and none of the tasks in it). Checked on the
  task files, and proved once for real: the vllm role run by ansible-playbook in check mode
  with `--tags vllm_configure` runs its configure tasks (and writes nothing).
- OS dispatch: a role with per-OS files checks the host's system first, and an unsupported
  one stops there with a one-line message naming it and the supported list. Run for real,
  with the facts of supported and unsupported systems, on each such role's first task file.
- READMEs: each role's README carries the variables table scripts/role-readme generates
  from meta/argument_specs.yml as it is now, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(p.parent.parent for p in (REPO / "roles").glob("*/tasks/main.yml"))
DATA = REPO / "tests" / "data"
BIN = Path(sys.executable).parent

INCLUDE_TASKS = {"include_tasks", "ansible.builtin.include_tasks", "ansible.legacy.include_tasks"}
ASSERT = {"assert", "ansible.builtin.assert", "ansible.legacy.assert"}
# Tags outside the install|configure|run scheme that the README documents.
EXTRA_TAGS = {"pytorch_check"}
OS_CHECK = "Check the operating system is supported"


def load_tasks(path: Path) -> list[dict[str, Any]]:
    tasks = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    assert isinstance(tasks, list), f"{path}: not a list of tasks"
    return tasks


def walk(tasks: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every task, blocks' own and their tasks."""
    for task in tasks:
        yield task
        for section in ("block", "rescue", "always"):
            yield from walk(task.get(section) or [])


def action(task: dict[str, Any]) -> str | None:
    keys = INCLUDE_TASKS | ASSERT
    return next((k for k in task if k in keys), None)


def include_file(task: dict[str, Any]) -> str:
    args = task[action(task) or ""]
    return str(args["file"] if isinstance(args, dict) else args)


def tags_of(task: dict[str, Any]) -> set[str]:
    tags = task.get("tags") or []
    return {tags} if isinstance(tags, str) else set(tags)


def per_os_roles() -> list[Path]:
    """Roles with files chosen by the host's system: vars/<os>.yml or tasks/*-<os>.yml."""
    return [role for role in ROLES
            if [p for p in (role / "vars").glob("*.yml") if p.name != "main.yml"]
            or list((role / "tasks").glob("*-*.yml"))]


def test_tagged_includes_apply_their_tags() -> None:
    missing = []
    for role in ROLES:
        for path in sorted((role / "tasks").glob("*.yml")):
            for task in walk(load_tasks(path)):
                if action(task) not in INCLUDE_TASKS or not tags_of(task):
                    continue
                args = task[action(task) or ""]
                applied = args.get("apply", {}).get("tags", []) if isinstance(args, dict) else []
                if set(applied) != tags_of(task):
                    missing.append(f"{path.relative_to(REPO)}: {task.get('name')!r} has tags "
                                   f"{sorted(tags_of(task))}, apply.tags {sorted(applied)}")
    assert not missing, "\n".join(missing)


def test_tags_follow_the_role_install_configure_run_scheme() -> None:
    wrong = []
    for role in ROLES:
        scheme = re.compile(rf"^{role.name}_(install|configure|run)$")
        for path in sorted((role / "tasks").glob("*.yml")):
            for task in walk(load_tasks(path)):
                wrong += [f"{path.relative_to(REPO)}: {tag}" for tag in tags_of(task)
                          if not scheme.match(tag) and tag not in EXTRA_TAGS]
    assert not wrong, "\n".join(wrong)


def run_playbook(tmp: Path, playbook: list[dict[str, Any]], inventory: dict[str, Any],
                 *args: str) -> dict[str, Any]:
    (tmp / "play.yml").write_text(yaml.safe_dump(playbook, sort_keys=False))
    (tmp / "inventory.json").write_text(json.dumps(inventory))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_LIBRARY": str(DATA / "library"), "ANSIBLE_STDOUT_CALLBACK": "json",
           "ANSIBLE_LOCAL_TEMP": str(tmp / "local"), "ANSIBLE_REMOTE_TEMP": str(tmp / "remote")}
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp / "inventory.json"),
                           str(tmp / "play.yml"), *args],
                          env=env, capture_output=True, text=True, timeout=300, check=False,
                          cwd=REPO)
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"ansible-playbook printed no JSON report:\n{proc.stdout}\n{proc.stderr}")
    return report


def local_host(**hostvars: Any) -> dict[str, Any]:
    return {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            **hostvars}


def system(distribution: str, version: str, os_family: str) -> dict[str, str]:
    """The facts the roles dispatch on, as setup reports them."""
    return {"distribution": distribution, "distribution_version": version,
            "distribution_major_version": version.split(".")[0], "os_family": os_family,
            "architecture": "x86_64"}


DEBIAN_12 = system("Debian", "12.5", "Debian")


def test_tags_select_the_sub_step_tasks_vllm_configure_in_check_mode(tmp_path: Path) -> None:
    """The real role, in check mode on this machine (Debian 12's facts, whatever it runs):
    --tags vllm_configure runs preflight's and configure's tasks and none of install's or
    service's. What the configure tasks would change is not judged here (Molecule does)."""
    config_dir = tmp_path / "etc-vllm"
    playbook = [{
        "name": "The vllm role, its configure step only", "hosts": "all", "gather_facts": True,
        "pre_tasks": [{"name": "Take Debian 12's facts", "given_facts": {"facts": DEBIAN_12},
                       "tags": ["always"]}],
        "roles": [{"role": "vllm", "vars": {
            "vllm_config_dir": str(config_dir),
            "vllm_deployments": [{"name": "tiny", "port": 8001, "args": ["--model", "/m"]}]}}]}]
    report = run_playbook(tmp_path, playbook, {"all": {"hosts": {"here": local_host()}}},
                          "--check", "--tags", "vllm_configure")
    ran = {t["task"]["name"].split(" : ", 1)[-1] for t in report["plays"][0]["tasks"]}
    assert report["stats"]["here"]["failures"] == 0, json.dumps(report)[-3000:]

    def names(step: str) -> set[str]:
        return {t["name"] for t in load_tasks(REPO / "roles" / "vllm" / "tasks" / step)}

    assert names("preflight.yml") <= ran
    assert names("configure.yml") <= ran, names("configure.yml") - ran
    assert not (names("install.yml") | names("install_env.yml") | names("service.yml")) & ran
    assert not config_dir.exists()  # check mode


SUPPORTED = {  # the systems design.md names; every role with per-OS files supports them
    "debian12": DEBIAN_12,
    "ubuntu2204": system("Ubuntu", "22.04", "Debian"),
    "ubuntu2404": system("Ubuntu", "24.04", "Debian"),
    "rhel9": system("RedHat", "9.4", "RedHat"),
    "rocky9": system("Rocky", "9.4", "RedHat"),
}
OTHERS = {  # per role, supported only where its list names them
    "debian13": system("Debian", "13.1", "Debian"),
    # Of a supported family: its vars/<os_family>.yml would load and be wrong.
    "ubuntu2004": system("Ubuntu", "20.04", "Debian"),
    "ubuntu2210": system("Ubuntu", "22.10", "Debian"),
    "centos7": system("CentOS", "7.9", "RedHat"),
    # Of no supported family: a missing vars file before.
    "sles15": system("SLES", "15.5", "Suse"),
}


# What the rest of each role's first task file needs to pass on a supported system.
SETTINGS = {"ollama": {"ollama_archive_sha256": {"amd64": "0" * 64}}}


def supported_list(role: Path) -> list[str]:
    found = yaml.safe_load((role / "vars" / "main.yml").read_text(encoding="utf-8"))
    return list(found[f"_{role.name}_supported_os"])


def first_task_file(role: Path) -> str:
    """The task file the role runs first, which must start with the OS check: main.yml's
    first task includes it, with every tag main.yml uses, so no --tags selection skips it."""
    main = load_tasks(role / "tasks" / "main.yml")
    first = main[0]
    assert action(first) in INCLUDE_TASKS, f"{role.name}: main.yml starts with {first.get('name')}"
    every_tag = set().union(*(tags_of(task) for task in main))
    assert tags_of(first) == every_tag, f"{role.name}: {first.get('name')!r} lacks tags"
    name = include_file(first)
    check = load_tasks(role / "tasks" / name)[0]
    assert check.get("name") == OS_CHECK and action(check) in ASSERT, (role.name, name, check)
    assert check[action(check) or ""].get("quiet") is True
    return name.removesuffix(".yml")


def test_the_roles_with_per_os_files() -> None:
    # A role that gains per-OS files is held to the OS check too; one that loses them is noticed.
    assert [r.name for r in per_os_roles()] == ["node_exporter", "nvidia_driver", "ollama",
                                                "python_env", "vllm"]
    for role in per_os_roles():
        assert set(supported_list(role)) >= {
            "Debian 12", "Ubuntu 22.04", "Ubuntu 24.04", "RedHat 9", "Rocky 9"}, role.name


def test_an_unsupported_os_stops_at_the_first_task_with_its_name(tmp_path: Path) -> None:
    systems = {**SUPPORTED, **OTHERS}
    roles = {role.name: (first_task_file(role), supported_list(role)) for role in per_os_roles()}
    inventory = {role: {"hosts": {f"{role}-{name}": local_host(system_facts=facts)
                                  for name, facts in systems.items()},
                        "vars": SETTINGS.get(role, {})}
                 for role in roles}
    playbook = [{
        "name": f"The {role} role's first task file", "hosts": role, "gather_facts": False,
        "tasks": [
            {"name": "Take the facts of the system under test",
             "given_facts": {"facts": "{{ system_facts }}"}},
            {"name": f"Run {role}'s {entry}.yml",
             "ansible.builtin.include_role": {"name": role, "tasks_from": entry}}]}
        for role, (entry, _) in roles.items()]
    report = run_playbook(tmp_path, playbook, {"all": {"children": inventory}})

    for play, (role, (_, supported)) in zip(report["plays"], roles.items(), strict=True):
        tasks = [t for t in play["tasks"] if " : " in t["task"]["name"]]  # the role's own
        first = tasks[0]["task"]["name"]
        assert first == f"{role} : {OS_CHECK}", [t["task"]["name"] for t in tasks]
        results = tasks[0]["hosts"]
        for name, facts in systems.items():
            result = results[f"{role}-{name}"]
            release = f"{facts['distribution']} {facts['distribution_version']}"
            major = f"{facts['distribution']} {facts['distribution_major_version']}"
            if release in supported or major in supported:
                assert not result.get("failed"), (role, name, result)
                continue
            assert result.get("failed"), (role, name, result)
            assert result["msg"] == (
                f"{release} (os_family {facts['os_family']}) is not supported by the {role} role; "
                f"supported: {', '.join(supported)}.")
            # Nothing after the check ran on it.
            assert not [t for t in tasks[1:] if f"{role}-{name}" in t["hosts"]], (role, name)
    # Supported systems went through the whole file.
    for role in roles:
        for name in SUPPORTED:
            assert report["stats"][f"{role}-{name}"]["failures"] == 0, (role, name)


def test_role_readmes_match_the_argument_specs() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "role-readme"), "--check"],
                          capture_output=True, text=True, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_role_has_a_readme() -> None:
    assert [r.name for r in ROLES if not (r / "README.md").is_file()] == []


def test_playbooks_include_tagged_roles_with_always() -> None:
    """An include_role is dynamic like include_tasks: without a selected tag of its own it
    runs none of the role, so `--tags nvidia_driver_configure` on playbooks/drivers.yml
    would do nothing. `always` lets the role's own tags choose."""
    tagged = {role.name for role in ROLES
              if any(tags_of(t) for t in walk(load_tasks(role / "tasks" / "main.yml")))}
    wrong = []
    for path in sorted((REPO / "playbooks").glob("*.yml")):
        for play in load_tasks(path):
            for task in walk(play.get("tasks") or []):
                args = task.get("ansible.builtin.include_role") or task.get("include_role")
                if (isinstance(args, dict) and args.get("name") in tagged
                        and "tasks_from" not in args and "always" not in tags_of(task)):
                    wrong.append(f"{path.relative_to(REPO)}: {task.get('name')!r}")
    assert not wrong, "\n".join(wrong)
