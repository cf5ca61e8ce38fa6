"""The ray_cluster scenario: two hosts on a podman bridge, inside a private network namespace.

A bridge network (with its firewall rules and ip_forward) must never be created in the
machine's own network namespace (shared/test-hosts.md), so this test makes a namespace
of its own, runs `molecule test -s ray_cluster` in it with nsenter (`ip netns exec`
would remount /sys and hide the cgroup mounts that podman needs), and always removes
the scenario's containers, its network and the namespace at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from orchestrator.mirror.wheelhouse import stage_wheelhouse
from orchestrator.sandbox import fleet as sandbox_fleet
from orchestrator.sandbox import hosts as sandbox

REPO = Path(__file__).resolve().parents[2]
SCENARIO = "ray_cluster"
SCENARIO_DIR = REPO / "molecule" / SCENARIO
ROLE_DEFAULTS = REPO / "roles" / "ray_cluster" / "defaults" / "main.yml"

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="creates a network namespace: needs root")


def _platforms() -> list[dict[str, str]]:
    platforms: list[dict[str, str]] = yaml.safe_load(
        (SCENARIO_DIR / "molecule.yml").read_text())["platforms"]
    return platforms


@pytest.fixture(scope="session")
def ray_wheelhouse() -> Path:
    """Wheels for the role's pinned Ray (the one place the pin is written), for the
    hosts' Python, staged once beside the CPU profile's wheelhouse."""
    requirement = yaml.safe_load(ROLE_DEFAULTS.read_text())["ray_cluster_requirement"]
    dest = sandbox.cache_dir() / "wheelhouse-ray"
    stage_wheelhouse(dest, [requirement], python_version=sandbox_fleet.PYTHON_VERSION,
                     own_indexes={}, log=print)
    return dest


@pytest.fixture
def private_netns() -> Iterator[str]:
    """A fresh network namespace with only loopback up, deleted at the end."""
    name = f"orchestrate-{SCENARIO.replace('_', '-')}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def _remove_leftovers(netns: str) -> None:
    """Remove the scenario's containers and network from inside the namespace, where
    podman tears their network down (molecule's destroy does the same when it runs)."""
    env = sandbox.podman_env()
    enter = ["nsenter", f"--net=/run/netns/{netns}", "podman"]
    platforms = _platforms()
    subprocess.run([*enter, "rm", "--force", "--ignore", *(p["name"] for p in platforms)],
                   env=env, capture_output=True, check=False)
    for network in sorted({p["network"] for p in platforms}):
        if subprocess.run([*enter, "network", "exists", network], env=env,
                          capture_output=True, check=False).returncode == 0:
            subprocess.run([*enter, "network", "rm", "--force", network], env=env,
                           capture_output=True, check=True)


@pytest.mark.molecule
def test_ray_cluster_in_a_private_network_namespace(
        artifacts_env: dict[str, str], ray_wheelhouse: Path, private_netns: str) -> None:
    molecule = Path(sys.executable).parent / "molecule"
    env = {**artifacts_env, "ORCHESTRATE_RAY_WHEELHOUSE": str(ray_wheelhouse)}
    try:
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{private_netns}",
                               str(molecule), "test", "-s", SCENARIO],
                              cwd=REPO, env=env, capture_output=True, text=True, check=False)
    finally:
        # Only here, never in the namespace fixture: other tests that make a namespace
        # must not touch this scenario's containers while it runs.
        _remove_leftovers(private_netns)
    log = REPO / ".orchestrate" / f"molecule-{SCENARIO}.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (f"molecule test -s {SCENARIO} failed (full log: {log}):\n"
                                  + "\n".join((proc.stdout + proc.stderr).splitlines()[-60:]))


def _run_guard(tmp_path: Path, netns: str | None) -> subprocess.CompletedProcess[str]:
    playbook = tmp_path / "guard.yml"
    guard = SCENARIO_DIR / "tasks" / "netns_guard.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Guard", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "tasks": [{"ansible.builtin.include_tasks": str(guard)}]}]))
    command = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,",
               "-e", f"ansible_python_interpreter={sys.executable}", str(playbook)]
    if netns:
        command = ["nsenter", f"--net=/run/netns/{netns}", *command]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_create_and_destroy_refuse_the_machines_own_network_namespace(
        tmp_path: Path, private_netns: str) -> None:
    # The guard that create.yml and destroy.yml run before any podman call, run alone.
    refused = _run_guard(tmp_path, None)
    assert refused.returncode != 0
    assert "`ip netns identify` names none" in refused.stdout
    allowed = _run_guard(tmp_path, private_netns)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
