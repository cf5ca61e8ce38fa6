"""gather_facts: a real run of playbooks/facts.yml through ansible-runner.

Two hosts: this machine over `ansible_connection: local` (no NVIDIA driver here, so the
driver is reported absent: a fact, not an error) and an address whose SSH port is closed,
reported unreachable while the other is still gathered.
"""

from __future__ import annotations

import datetime as dt
import socket
import sys
from pathlib import Path

import yaml

from orchestrator.facts.hostfacts import HostFacts
from orchestrator.run.gather import GROUP, GatherHost, gather_facts
from orchestrator.run.runner import Progress


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_gathers_this_machine_and_reports_an_unreachable_host(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    local = GatherHost(
        name="control", connection={"ansible_connection": "local"},
        # This machine's interpreter discovery may find a broken shim: name the one here.
        vars={"ansible_python_interpreter": sys.executable,
              "gpu_check_nvidia_smi": "nvidia-smi"},
        paths=[str(tmp_path / "data" / "models"), "/"])
    closed = GatherHost(
        name="gone", connection={"ansible_host": "127.0.0.1", "ansible_port": _closed_port(),
                                 "ansible_user": "nobody", "ansible_become": True},
        vars={}, paths=["/"])
    seen: list[Progress] = []
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)

    facts = gather_facts([local, closed], tmp_path / "run", on_progress=seen.append)

    assert sorted(facts) == ["control", "gone"]
    mine = facts["control"]
    assert isinstance(mine, HostFacts)
    assert mine.reachable and mine.unreachable is None
    assert mine.origin == "gathered by playbooks/facts.yml"
    assert before <= mine.gathered_at <= dt.datetime.now(dt.UTC)
    assert mine.nvidia is not None
    assert mine.nvidia.driver_state in ("not_installed", "no_gpu")
    assert mine.nvidia.error is not None and mine.nvidia.error.kind == "not_installed"
    assert mine.os is not None
    assert mine.os.python_version == ".".join(map(str, sys.version_info[:3]))
    assert mine.os.kernel and mine.os.distribution and mine.os.family
    assert mine.os.kernel_headers in (True, False)
    assert mine.memory_mib is not None and mine.memory_mib > 0
    assert [d.path for d in mine.disk] == [str(tmp_path / "data" / "models"), "/"]
    assert all(d.free_mib > 0 for d in mine.disk)
    assert mine.disk[1].mount == "/"

    gone = facts["gone"]
    assert gone.reachable is False
    assert gone.nvidia is None and gone.os is None
    assert gone.unreachable is not None and "unreachable" in gone.unreachable
    assert "refused" in gone.unreachable.lower() or "connect" in gone.unreachable.lower()

    assert any(p.kind == "unreachable" and p.host == "gone" for p in seen)
    assert any(p.kind == "ok" and p.host == "control" for p in seen)
    # The fleet's values are data: tagged !unsafe, read here as the strings they are.
    loader = type("AnsibleLoader", (yaml.SafeLoader,), {})
    loader.add_constructor("!unsafe", lambda loader, node: loader.construct_scalar(node))
    inventory = yaml.load((tmp_path / "run" / "inventory" / "hosts.yml").read_text(),
                          Loader=loader)
    hosts = inventory["all"]["children"][GROUP]["hosts"]
    assert hosts["control"]["gpu_check_facts_paths"] == local.paths
    # Read-only: no sudo even where the connection asks for it.
    assert hosts["gone"]["ansible_become"] is False
    assert "playbooks/facts.yml" in (tmp_path / "run" / "command.txt").read_text()
    assert (tmp_path / "run" / "artifacts" / "ansible" / "stdout").is_file()
    # The operator's alone: the inventory names hosts, users and keys.
    for path in [tmp_path / "run", *(tmp_path / "run").rglob("*")]:
        assert path.stat().st_mode & 0o077 == 0, path


def test_per_host_nvidia_smi_and_the_operators_inventory(tmp_path: Path) -> None:
    """A host whose fleet `vars:` name a stand-in nvidia-smi (a script printing a saved
    real `nvidia-smi -q -x` of 8 V100S) is read from it; the operator's inventory is read
    first, and its other hosts are left alone (the run is limited to the hosts asked for)."""
    fixture = Path(__file__).resolve().parents[1] / "data" / "nvidia-smi" / \
        "xml__8x-V100S-PCIE-32GB__460.73.01.txt"
    standin = tmp_path / "nvidia-smi"
    standin.write_text("#!/bin/sh\n# stand-in nvidia-smi: replays a saved output\n"
                       f'cat "{fixture}"\n')
    standin.chmod(0o755)
    # The operator's inventory also names this machine's Python for every host: the
    # replayed host has no interpreter of its own, so its facts prove the file was read.
    operator = tmp_path / "operator.yml"
    operator.write_text(yaml.safe_dump({"all": {
        "hosts": {"bystander": {"ansible_connection": "local"}},
        "vars": {"ansible_python_interpreter": sys.executable}}}))
    replayed = GatherHost(name="replayed", connection={"ansible_connection": "local"},
                          vars={"gpu_check_nvidia_smi": str(standin)}, paths=[])
    seen: list[Progress] = []

    facts = gather_facts([replayed], tmp_path / "run", operator_inventory=operator,
                         on_progress=seen.append)

    assert list(facts) == ["replayed"]
    nvidia = facts["replayed"].nvidia
    assert nvidia is not None and nvidia.source == "nvidia-smi"
    assert (nvidia.driver_state, nvidia.driver_version, nvidia.cuda_version) == \
        ("loaded", "460.73.01", "11.2")
    assert [g.name for g in nvidia.gpus] == ["Tesla V100S-PCIE-32GB"] * 8
    assert (nvidia.gpus[0].persistence_mode, nvidia.gpus[0].ecc_mode) == ("Disabled", "Enabled")
    assert facts["replayed"].disk == []
    assert {p.host for p in seen if p.host} == {"replayed"}
