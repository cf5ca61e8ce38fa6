"""`orchestrate down` of real hosts, on the sandbox's two hosts described by a fleet of the
operator's own (another group name, the sandbox's SSH settings): not the sandbox's container
removal, the teardown playbook over SSH as on any fleet.

--check shows what would go and changes nothing -> without a terminal and without --yes it
refuses, nothing removed -> --yes removes the vLLM and Ollama units, users, env files and
state on both hosts, and keeps the Python environment and the weights -> a second down has
nothing left -> `up --hosts sandbox` restores serving (the next module finds it serving).

As in test_sandbox_e2e.py, each step is a module-scoped fixture that runs its commands and
hands over what came back, in one chain; the tests judge.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from sandboxkit import (
    HEALTH,
    HOSTS,
    OLLAMA_UNIT,
    ORCHESTRATE,
    SSH_PORTS,
    STATE,
    UNIT,
    VLLM,
    WEIGHTS,
    Ran,
    Sandbox,
    orchestrate,
    ssh,
    unit_state,
    wait_healthy,
)

from orchestrator.knowledge.roles import role_defaults

pytestmark = pytest.mark.e2e

GROUP = "served-pair"
FLEET = "teardown-fleet.yml"
# What `up` installed on each sandbox host and the teardown removes.
UNITS = {f"{UNIT}.service", f"{OLLAMA_UNIT}.service"}
USERS = {"vllm", "ollama"}


def write_fleet(cwd: Path) -> Path:
    """A fleet of the operator's own for the sandbox's hosts: the sandbox fleet's SSH
    settings (orchestrator/sandbox/fleet.py: root, the state dir's key, no host key
    checks for re-created containers), no deployments (down removes what it finds)."""
    path = cwd / FLEET
    path.write_text(yaml.safe_dump({"groups": {GROUP: {
        "ssh_user": "root", "ssh_key": str(cwd / STATE / "id_ed25519"), "profile": "cpu",
        "vars": {"ansible_ssh_common_args":
                 "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"},
        "hosts": {host: {"address": "127.0.0.1", "ssh_port": port}
                  for host, port in SSH_PORTS.items()}}}}))
    return path


@dataclass(frozen=True)
class HostState:
    """What `up` leaves on a host, read over SSH."""

    units: set[str]
    users: set[str]
    files: list[str]  # of the role-installed paths checked, those present
    ollama_state: list[str]  # /var/lib/ollama's entries
    env: bool
    weights: bool


def host_state(cwd: Path, host: str) -> HostState:
    env = role_defaults("python_env")["python_env_path"]
    listed = ssh(cwd, host, "systemctl list-units --all --plain --no-legend 'vllm@*' "
                            f"{OLLAMA_UNIT}.service").stdout
    return HostState(
        units={line.split()[0] for line in listed.splitlines()
               if line.strip() and "not-found" not in line},
        users={user for user in USERS if ssh(cwd, host, f"getent passwd {user}").returncode == 0},
        files=ssh(cwd, host, "ls -d /etc/vllm /etc/ollama /var/lib/vllm /var/cache/vllm "
                             "/opt/ollama /usr/local/bin/ollama /etc/systemd/system/vllm@.service "
                             "/etc/systemd/system/ollama.service 2>/dev/null").stdout.split(),
        ollama_state=sorted(ssh(cwd, host, "ls -A /var/lib/ollama").stdout.split()),
        env=ssh(cwd, host, f"test -x {env}/bin/python").returncode == 0,
        weights=ssh(cwd, host, f"test -f {WEIGHTS}/config.json").returncode == 0)


@dataclass(frozen=True)
class Checked:
    ran: Ran
    after: dict[str, HostState]
    healthy: dict[str, bool]


@pytest.fixture(scope="module")
def checked(sandbox: Sandbox) -> Checked:
    write_fleet(sandbox.cwd)
    ran = orchestrate(sandbox.cwd, sandbox.env, "down", "--hosts", GROUP, "-f", FLEET,
                      "--check", "--json")
    return Checked(ran, {h: host_state(sandbox.cwd, h) for h in HOSTS},
                   {h: wait_healthy(HEALTH[h], 30) for h in HOSTS})


@dataclass(frozen=True)
class Unasked:
    rc: int
    stderr: str
    healthy: dict[str, bool]


@pytest.fixture(scope="module")
def unasked(sandbox: Sandbox, checked: Checked) -> Unasked:
    proc = subprocess.run([ORCHESTRATE, "down", "--hosts", GROUP, "-f", FLEET],
                          cwd=sandbox.cwd, env=sandbox.env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False)
    return Unasked(proc.returncode, proc.stderr, {h: wait_healthy(HEALTH[h], 30) for h in HOSTS})


@dataclass(frozen=True)
class Removed:
    ran: Ran
    after: dict[str, HostState]
    again: Ran


@pytest.fixture(scope="module")
def removed(sandbox: Sandbox, unasked: Unasked) -> Removed:
    ran = orchestrate(sandbox.cwd, sandbox.env, "down", "--hosts", GROUP, "-f", FLEET,
                      "--yes", "--json")
    after = {h: host_state(sandbox.cwd, h) for h in HOSTS}
    again = orchestrate(sandbox.cwd, sandbox.env, "down", "--hosts", GROUP, "-f", FLEET,
                        "--yes", "--json")
    return Removed(ran, after, again)


@dataclass(frozen=True)
class Restored:
    ran: Ran
    healthy: dict[str, bool]
    units: dict[str, str]


@pytest.fixture(scope="module")
def restored(sandbox: Sandbox, removed: Removed) -> Restored:
    ran = orchestrate(sandbox.cwd, sandbox.env, "up", "--hosts", "sandbox", "--json")
    return Restored(ran, {h: wait_healthy(HEALTH[h], 120) for h in HOSTS},
                    {h: unit_state(sandbox.cwd, h, UNIT).get("ActiveState", "?")
                     for h in HOSTS})


def test_check_shows_what_would_go_and_changes_nothing(checked: Checked) -> None:
    assert checked.ran.rc == 0, checked.ran.tail()
    result = checked.ran.json()
    assert result["check"] and result["removed"] == [] and not result["sandbox"]
    for host in HOSTS:
        shown = result["hosts"][host]
        assert set(shown["units"]) >= UNITS, (host, shown)
        assert set(shown["users"]) >= USERS, (host, shown)
        assert {f"/etc/vllm/{VLLM}.env", "/etc/ollama/ollama.env"} <= set(shown["files"]), shown
        state = checked.after[host]
        assert state.units >= UNITS and state.users == USERS, (host, state)
    assert checked.healthy == {h: True for h in HOSTS}


def test_without_a_terminal_or_yes_it_refuses_and_removes_nothing(unasked: Unasked) -> None:
    assert unasked.rc == 2 and "pass --yes" in unasked.stderr, unasked.stderr
    assert unasked.healthy == {h: True for h in HOSTS}


def test_yes_removes_units_users_and_files_and_keeps_env_and_weights(
        removed: Removed) -> None:
    assert removed.ran.rc == 0, removed.ran.tail()
    result = removed.ran.json()
    assert result["passed"] and sorted(result["removed"]) == sorted(HOSTS)
    for host in HOSTS:
        assert set(result["hosts"][host]["units"]) >= UNITS, result["hosts"][host]
        state = removed.after[host]
        assert state.units == set() and state.users == set() and state.files == [], state
        # Ollama's models directory is weights, kept like them (--purge-weights removes it).
        assert state.ollama_state == ["models"], (host, state)
        assert state.env and state.weights, (host, state)


def test_a_second_down_has_nothing_left(removed: Removed) -> None:
    assert removed.again.rc == 0, removed.again.tail()
    result = removed.again.json()
    assert result["removed"] == [] and result["passed"]
    assert all(h["units"] == h["users"] == h["files"] == [] for h in result["hosts"].values())


def test_up_restores_serving(restored: Restored) -> None:
    assert restored.ran.rc == 0, restored.ran.tail()
    assert restored.healthy == {h: True for h in HOSTS}
    assert restored.units == {h: "active" for h in HOSTS}
