"""A host reachable only through a bastion: `facts`, `up` and `probe` reach it as Ansible
does, by the ProxyJump of the fleet's ssh args and an ssh_config file.

The network: a private network namespace this test creates, with two sandbox hosts in
it (podman, slirp4netns, as `--hosts sandbox` runs them). Each host's sshd is published on
the namespace's own loopback, which nothing outside the namespace reaches. The control
machine's one way in is a pipe to the bastion's sshd (sandbox-1): the ssh_config's
ProxyCommand, standing in for the network route an operator has to a bastion. The
hosts' way out (apt) is the namespace's own slirp4netns, outbound only. The
target (sandbox-2) is reached from the bastion at 10.0.2.2, slirp4netns's address of the
namespace's loopback seen from inside a host; from the control machine that address
does not lead into the namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.sandbox import fleet as sandbox_fleet

pytestmark = pytest.mark.e2e

ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")
GROUP = "bastioned"
TARGET = "sandbox-2"
BASTION_PORT = sandbox_fleet.SSH_BASE_PORT  # sandbox-1's sshd, on the namespace's loopback
TARGET_PORT = sandbox_fleet.SSH_BASE_PORT + 1  # sandbox-2's
TARGET_ADDRESS = "10.0.2.2"  # the namespace's loopback, as the bastion sees it
# The control machine's link into the namespace: to the bastion's sshd and nowhere else;
# each connection leaves a line in the file it is given.
PIPE = f"""
import socket, sys, threading
with open(sys.argv[1], "a") as log:
    log.write("connected\\n")
conn = socket.create_connection(("127.0.0.1", {BASTION_PORT}))
def upstream():
    while data := sys.stdin.buffer.read1(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := conn.recv(65536):
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
"""
# The two hosts, made in the namespace by the sandbox's own code under names of their own
# (never those of `--hosts sandbox`, which may be up beside them).
PREFIX = "orchestrate-bastion-"
CONTAINERS = [f"{PREFIX}sandbox-1", f"{PREFIX}sandbox-2"]
HOSTS = f"""
import sys
from pathlib import Path
from orchestrator.sandbox import hosts
hosts.CONTAINER_PREFIX = "{PREFIX}"
hosts.up(Path(sys.argv[1]), count=2, ssh_base_port={sandbox_fleet.SSH_BASE_PORT},
         service_ports=[], mounts={{Path(sys.argv[2]): "{sandbox_fleet.WHEELHOUSE_MOUNT}"}},
         log=print)
"""


@dataclass(frozen=True)
class Bastioned:
    cwd: Path
    env: dict[str, str]
    fleet: Path
    entries: Path  # the pipe's log: one line per connection through the bastion


def in_namespace(netns: str, *command: str, env: dict[str, str]) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/{netns}", *command], env=env, check=True,
                   timeout=900)


@pytest.fixture(scope="module")
def bastioned(tmp_path_factory: pytest.TempPathFactory,
              artifacts_env: dict[str, str]) -> Iterator[Bastioned]:
    cwd = tmp_path_factory.mktemp("bastion")
    netns = f"orchestrate-bastion-{os.getpid()}"
    state = cwd / "state"
    wheelhouse = artifacts_env["ORCHESTRATE_WHEELHOUSE"]
    subprocess.run(["ip", "netns", "add", netns], check=True)
    with contextlib.ExitStack() as stack:
        stack.callback(subprocess.run, ["ip", "netns", "delete", netns], check=True)
        stack.callback(subprocess.run, ["podman", "rm", "--force", "--ignore", "--time", "5",
                                        *CONTAINERS], env=artifacts_env, check=True,
                       timeout=300)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        # The hosts' way out (apt, DNS) as sandbox hosts have it: slirp4netns, outbound
        # only and without the control machine's loopback, so no way in.
        egress = subprocess.Popen(
            ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
             "--netns-type=path", f"/run/netns/{netns}", "tap0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(egress.wait, 10)
        stack.callback(egress.terminate)
        for _ in range(50):
            routes = subprocess.run(["ip", "-n", netns, "route"], capture_output=True,
                                    text=True, check=True).stdout
            if "default" in routes:
                break
            time.sleep(0.2)
        in_namespace(netns, sys.executable, "-c", HOSTS, str(state), wheelhouse,
                     env=artifacts_env)
        key = state / "id_ed25519"
        pipe = cwd / "pipe.py"
        pipe.write_text(PIPE, encoding="utf-8")
        config = cwd / "ssh_config"
        config.write_text(
            "Host orchestrate-bastion\n"
            "  HostName 127.0.0.1\n"
            f"  Port {BASTION_PORT}\n"
            "  User root\n"
            f"  IdentityFile {key}\n"
            "  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
            f"  ProxyCommand nsenter --net=/run/netns/{netns} {sys.executable} {pipe} "
            f"{cwd / 'entries'}\n",
            encoding="utf-8")
        fleet = cwd / "fleet.yml"
        fleet.write_text(yaml.safe_dump({"groups": {GROUP: {
            "ssh_user": "root", "ssh_key": str(key), "profile": "cpu",
            "pip": {"find_links": sandbox_fleet.WHEELHOUSE_MOUNT, "no_index": True},
            "vars": {"ansible_ssh_common_args":
                     f"-F {config} -o ProxyJump=orchestrate-bastion "
                     "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"},
            "hosts": {TARGET: {"address": TARGET_ADDRESS, "ssh_port": TARGET_PORT}}}}},
            sort_keys=False), encoding="utf-8")
        yield Bastioned(cwd, artifacts_env, fleet, cwd / "entries")


def orchestrate(where: Bastioned, *args: str) -> tuple[int, Any, str]:
    proc = subprocess.run([ORCHESTRATE, *args, "-f", str(where.fleet), "--hosts", GROUP,
                           "--json"], cwd=where.cwd, env=where.env, capture_output=True,
                          text=True, check=False, timeout=1800)
    print(f"$ orchestrate {' '.join(args)} (exit {proc.returncode})\n{proc.stdout}\n"
          f"{proc.stderr}")
    try:
        return proc.returncode, json.loads(proc.stdout), proc.stderr[-3000:]
    except ValueError:
        return proc.returncode, None, proc.stderr[-3000:]


def reached_by_collector(report: dict[str, Any]) -> dict[str, str]:
    """The target's SSH probes: only the collector's evidence gives a `gpu` probe (skipped
    on a CPU host); a host not reached gives one failed `ssh` probe instead."""
    return {r["probe"]: r["status"] for r in report["results"]
            if r["host"] == TARGET and r["probe"] in ("ssh", "gpu", "gpu_health")}


def test_facts_up_and_probe_reach_the_target_through_the_bastion(
        bastioned: Bastioned) -> None:
    rc, facts, err = orchestrate(bastioned, "facts")
    assert rc == 0, err
    assert json.dumps(facts).count('"reachable": true') >= 1, facts
    rc, _, err = orchestrate(bastioned, "up")
    assert rc == 0, err
    rc, probed, err = orchestrate(bastioned, "probe")
    assert rc == 0, err
    assert reached_by_collector(probed) == {"gpu": "skip", "gpu_health": "skip"}
    # In through the bastion: the namespace has no other way in (ssh's master connection,
    # ControlPersist, may carry several runs).
    assert bastioned.entries.read_text().count("connected") >= 1
