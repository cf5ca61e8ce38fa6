"""The units' DeviceAllow= (roles vllm, ollama, ray_cluster), rendered by Ansible from the
role defaults, admit the GPU device nodes on NVIDIA drivers before and after 550.40 (which
renamed major 195 in /proc/devices from nvidia-frontend to nvidia and nvidiactl), and the
InfiniBand nodes only where the plan asks for them; and the resolver itself follows
systemd's rules. The /proc/devices listings are real ones (tests/data/proc-devices)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.config.fleet import load_fleet
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.plan.planner import make_plan
from orchestrator.verify.deviceallow import (
    DeviceNode,
    node_of,
    parse_device_allow,
    parse_proc_devices,
    resolve,
)

REPO = Path(__file__).resolve().parents[2]
LISTINGS = REPO / "tests" / "data" / "proc-devices"
# Before 550.40, with InfiniBand (nvidia-uvm 510, nvidia-caps 235, infiniband_verbs 231 and 240).
OLD = (LISTINGS / "nvidia-frontend-infiniband.txt").read_text(encoding="utf-8")
# 550.40 and later: grep's excerpt of the character section, so its heading is put back.
NEW = "Character devices:\n" + (LISTINGS / "nvidia-r550-grep.txt").read_text(encoding="utf-8")

GPU_NODES = [DeviceNode("/dev/nvidia0", "c", 195, 0), DeviceNode("/dev/nvidia1", "c", 195, 1),
             DeviceNode("/dev/nvidiactl", "c", 195, 255)]
# The nodes of the majors the old listing registers (uvm-tools is minor 1 of nvidia-uvm).
UVM_NODES = [DeviceNode("/dev/nvidia-uvm", "c", 510, 0),
             DeviceNode("/dev/nvidia-uvm-tools", "c", 510, 1)]
CAPS_NODES = [DeviceNode("/dev/nvidia-caps/nvidia-cap1", "c", 235, 1),
              DeviceNode("/dev/nvidia-caps/nvidia-cap2", "c", 235, 2)]
IB_NODES = [DeviceNode("/dev/infiniband/uverbs0", "c", 231, 192),
            DeviceNode("/dev/infiniband/uverbs32", "c", 240, 0),
            DeviceNode("/dev/infiniband/rdma_cm", "c", 10, 58)]
# Registered on that host but nothing the engines need: stay denied.
OTHER_NODES = [DeviceNode("/dev/nvidia-nvswitchctl", "c", 511, 255),
               DeviceNode("/dev/gdrdrv", "c", 509, 0), DeviceNode("/dev/nvme0", "c", 242, 0)]


def _render(tmp_path: Path) -> dict[str, str]:
    """Every unit template, rendered by Ansible with its role's defaults; the vLLM drop-in
    and the Ray unit also with the plan's *_rdma switch on."""
    defaults: dict[str, object] = {}
    for role in ("vllm", "ollama", "ray_cluster"):
        defaults.update(yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml")
                                       .read_text(encoding="utf-8")))
    templates = REPO / "roles"
    driver = {"name": "qwen72b", "args": ["--distributed-executor-backend", "ray"],
              "ray_client": {"group": "ray", "temp_dir": "/var/lib/ray/tmp"}}
    jobs = [("vllm-unit", "vllm/templates/vllm@.service.j2", {}),
            ("vllm-unit-cpu", "vllm/templates/vllm@.service.j2", {"vllm_wait_for_devices": []}),
            ("ollama-cpu", "ollama/templates/ollama.service.j2",
             {"_ollama_bin": "/usr/local/bin/ollama", "ollama_wait_for_devices": []}),
            ("ray-cpu", "ray_cluster/templates/ray.service.j2",
             {"__ray_cluster_part": "head", "__ray_cluster_node_ip": "10.0.0.21",
              "ray_cluster_wait_for_devices": []}),
            ("vllm-dropin", "vllm/templates/deployment.conf.j2", {"item": driver}),
            ("vllm-dropin-rdma", "vllm/templates/deployment.conf.j2",
             {"item": driver, "vllm_rdma": True}),
            ("ollama", "ollama/templates/ollama.service.j2",
             {"_ollama_bin": "/usr/local/bin/ollama"}),
            ("ray", "ray_cluster/templates/ray.service.j2",
             {"__ray_cluster_part": "head", "__ray_cluster_node_ip": "10.0.0.21"}),
            ("ray-rdma", "ray_cluster/templates/ray.service.j2",
             {"__ray_cluster_part": "head", "__ray_cluster_node_ip": "10.0.0.21",
              "ray_cluster_rdma": True})]
    playbook = tmp_path / "render.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Render", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": defaults,
        "tasks": [{"ansible.builtin.template": {"src": str(templates / src),
                                                "dest": str(tmp_path / name), "mode": "0644"},
                   "vars": extra} for name, src, extra in jobs]}]))
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                           "localhost,", "-e", f"ansible_python_interpreter={sys.executable}",
                           str(playbook)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {name: (tmp_path / name).read_text(encoding="utf-8") for name, _, _ in jobs}


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """DeviceAllow of each unit as systemd assembles it (a drop-in's entries add to the
    unit's): the unit file lines of the unit and its drop-in."""
    text = _render(tmp_path_factory.mktemp("units"))
    return {
        "vllm": text["vllm-unit"].splitlines(),
        "vllm-ray-driver": (text["vllm-unit"] + text["vllm-dropin"]).splitlines(),
        "vllm-ray-driver-rdma": (text["vllm-unit"] + text["vllm-dropin-rdma"]).splitlines(),
        "ollama": text["ollama"].splitlines(),
        "ray": text["ray"].splitlines(),
        "ray-rdma": text["ray-rdma"].splitlines(),
        **{f"_{name}": text[name].splitlines()
           for name in ("vllm-unit", "ollama", "ray", "vllm-unit-cpu", "ollama-cpu", "ray-cpu")},
        "_memlock": [f"{name}:{line}" for name in ("vllm-dropin-rdma", "ray-rdma",
                                                   "vllm-unit", "ray", "vllm-dropin")
                     for line in text[name].splitlines() if line.startswith("LimitMEMLOCK=")],
    }


UNIT_NAMES = ["vllm", "vllm-ray-driver", "vllm-ray-driver-rdma", "ollama", "ray", "ray-rdma"]


def denied(verdicts: list) -> list[str]:
    return [v.node.path for v in verdicts if not v.allowed]


@pytest.mark.parametrize("unit", UNIT_NAMES)
@pytest.mark.parametrize("listing", [OLD, NEW], ids=["before-550.40", "550.40-and-later"])
def test_every_unit_admits_the_gpus_and_the_control_device(units, unit, listing) -> None:
    assert denied(resolve(units[unit], listing, GPU_NODES)) == []


@pytest.mark.parametrize("unit", UNIT_NAMES)
def test_every_unit_admits_uvm_and_reads_the_mig_capabilities(units, unit) -> None:
    assert denied(resolve(units[unit], OLD, UVM_NODES)) == []
    assert denied(resolve(units[unit], OLD, CAPS_NODES, access="r")) == []
    # The capabilities are read-only (CUDA opens them for reading).
    assert denied(resolve(units[unit], OLD, CAPS_NODES)) == [n.path for n in CAPS_NODES]


@pytest.mark.parametrize("unit", UNIT_NAMES)
def test_nothing_else_on_the_host_gets_through(units, unit) -> None:
    assert denied(resolve(units[unit], OLD, OTHER_NODES)) == [n.path for n in OTHER_NODES]


@pytest.mark.parametrize(("unit", "rdma"), [("vllm", False), ("vllm-ray-driver", False),
                                            ("ollama", False), ("ray", False),
                                            ("vllm-ray-driver-rdma", True), ("ray-rdma", True)])
def test_infiniband_only_with_the_multi_host_setting(units, unit, rdma) -> None:
    verdicts = resolve(units[unit], OLD, IB_NODES)
    assert denied(verdicts) == ([] if rdma else [n.path for n in IB_NODES])
    if rdma:
        assert [v.allowed_by for v in verdicts] == ["char-infiniband_verbs rw"] * 2 + [
            "/dev/infiniband/rdma_cm rw"]
        assert verdicts[1].groups == ("infiniband_verbs",)
        # systemd admits whole majors: umad (MAD, minors 0-63 of 231) shares uverbs' major.
        umad = DeviceNode("/dev/infiniband/umad0", "c", 231, 0)
        assert resolve(units[unit], OLD, [umad])[0].groups == ("infiniband_mad",
                                                                "infiniband_verbs")


def test_locked_memory_is_unlimited_only_with_the_multi_host_setting(units) -> None:
    assert units["_memlock"] == ["vllm-dropin-rdma:LimitMEMLOCK=infinity",
                                 "ray-rdma:LimitMEMLOCK=infinity"]


@pytest.mark.parametrize("unit", ["vllm-unit", "ollama", "ray"])
def test_gpu_units_load_the_modules_of_their_device_groups_before_starting(units, unit) -> None:
    # systemd reads the char- groups from /proc/devices once, at start: nvidia-uvm loaded
    # later (at the first CUDA call) would stay denied for the unit's lifetime.
    wanted = "modprobe@nvidia.service modprobe@nvidia-uvm.service"
    assert f"Wants={wanted}" in units[f"_{unit}"]
    assert f"After={wanted}" in units[f"_{unit}"]
    cpu = units[f"_{unit}-cpu"]
    assert not [line for line in cpu if "modprobe@" in line]


FLEET = """\
secrets: secrets.vault.yml
groups:
  big:
    gpu: {name: NVIDIA L40S, count: 2}
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
    options: {open: true}
    ray: {auth_token_var: vault_ray_token, network_interface: ens5}
"""


def _plan(write, text: str):
    return make_plan(load_fleet(write("fleet.yml", text)), "big", load_knowledge(),
                     load_cuda_compat())


def test_the_plan_turns_infiniband_on_for_a_deployment_across_gpu_hosts(write) -> None:
    for host in _plan(write, FLEET).hosts:
        assert host.vars["ray_cluster_rdma"] is True and host.vars["vllm_rdma"] is True
    # On one host NCCL stays inside it: no switch, the role's default (off) holds.
    single = FLEET.replace("    nodes: 2\n", "").replace("72B", "7B")
    single = single[:single.index("    ray:")]
    for host in _plan(write, single).hosts:
        assert "vllm_rdma" not in host.vars and "ray_cluster_rdma" not in host.vars
    # CPU members have no GPU devices at all.
    cpu = FLEET.replace("    gpu: {name: NVIDIA L40S, count: 2}\n", "    profile: cpu\n")
    for host in _plan(write, cpu.replace("72B", "0.5B")).hosts:
        assert "ray_cluster_rdma" not in host.vars and host.vars["ray_cluster_device_allow"] == []


# --- the resolver, against systemd's rules ---

def test_group_names_match_by_glob_within_their_kind() -> None:
    (old, new, uvm) = resolve(["char-nvidia* rw"], OLD + NEW, [
        DeviceNode("/dev/nvidia0", "c", 195, 0), DeviceNode("/dev/nvidiactl", "c", 195, 255),
        DeviceNode("/dev/nvidia-uvm", "c", 510, 0)])
    assert old.allowed and new.allowed and uvm.allowed
    assert resolve(["char-nvidia-? rw"], OLD, GPU_NODES)[0].allowed is False
    assert resolve(["char-cpu/* rw"], OLD, [DeviceNode("/dev/cpu/0/msr", "c", 202, 0)])[0].allowed
    # A block group never admits a character node of the same major.
    assert denied(resolve(["block-nvidia-frontend rw"], OLD, GPU_NODES)) == [
        n.path for n in GPU_NODES]
    assert resolve(["block-virtblk r"], OLD, [DeviceNode("/dev/vda", "b", 252, 0)],
                   access="r")[0].allowed


def test_star_admits_the_kind_and_a_number_is_a_major() -> None:
    assert denied(resolve(["char-* rw"], "", GPU_NODES + IB_NODES)) == []
    assert denied(resolve(["char-195 rw"], "", GPU_NODES)) == []
    assert denied(resolve(["char-196 rw"], "", GPU_NODES)) == [n.path for n in GPU_NODES]


def test_a_major_missing_from_proc_devices_is_denied() -> None:
    """The old unit's only name for major 195 on a driver that no longer registers it."""
    (verdict,) = resolve(["char-nvidia-frontend rw"], NEW, [GPU_NODES[0]])
    assert verdict.allowed_by is None and verdict.groups == ("nvidia", "nvidiactl")
    (unknown,) = resolve(["char-nvidia rw"], NEW, [DeviceNode("/dev/nvidia-uvm", "c", 510, 0)])
    assert not unknown.allowed and unknown.groups == ()


def test_access_letters_must_cover_what_is_asked() -> None:
    node = [GPU_NODES[0]]
    assert resolve(["char-nvidia r"], NEW, node)[0].allowed is False
    assert resolve(["char-nvidia r"], NEW, node, access="r")[0].allowed_by == "char-nvidia r"
    assert resolve(["char-nvidia rwm"], NEW, node, access="m")[0].allowed
    # No letters: systemd's default, rwm.
    assert resolve(["char-nvidia"], NEW, node, access="rwm")[0].allowed_by == "char-nvidia rwm"
    # The first entry that covers the access is the one reported.
    assert resolve(["char-nvidia r", "char-195 rw"], NEW, node)[0].allowed_by == "char-195 rw"


def test_path_entries_admit_their_node() -> None:
    ctl = [GPU_NODES[2]]
    assert resolve(["/dev/nvidiactl rw"], "", ctl)[0].allowed
    assert resolve(["/dev/char/195:255 rw"], "", ctl)[0].allowed
    assert not resolve(["/dev/char/195:0 rw", "/dev/block/195:255 rw"], "", ctl)[0].allowed
    assert not resolve(["/dev/nvidia0 rw"], "", ctl)[0].allowed  # absent here: admits nothing
    # Any other path is stat()ed, as systemd does: /dev/null is c 1:3 on every Linux.
    null = node_of("/dev/null")
    assert (null.kind, null.major, null.minor) == ("c", 1, 3)
    assert resolve(["/dev/null rw"], "", [DeviceNode("/dev/char/1:3", "c", 1, 3)])[0].allowed
    with pytest.raises(ValueError, match="not a device node"):
        node_of("/dev")


def test_proc_devices_sections_end_at_a_blank_line() -> None:
    groups = parse_proc_devices(OLD)
    assert groups["c"][195] == ["nvidia-frontend"]
    assert groups["c"][231] == ["infiniband_mad", "infiniband_verbs"]
    assert groups["c"][253] == ["tpm"] and groups["b"][253] == ["device-mapper"]
    assert parse_proc_devices(NEW)["c"][195] == ["nvidia", "nvidiactl"]
    # Lines outside a section (grep's excerpt as it is) count for nothing, as in systemd.
    assert parse_proc_devices((LISTINGS / "nvidia-r550-grep.txt").read_text()) == {"c": {},
                                                                                 "b": {}}


def test_device_allow_from_unit_files_systemctl_show_and_bare_entries() -> None:
    unit = ["[Service]", "# DeviceAllow=char-ignored rw", "DevicePolicy=closed",
            "DeviceAllow=char-old rw", "DeviceAllow=", "DeviceAllow=char-nvidia rw",
            "ExecStart=/bin/sh -c 'a=b' \\", "    --flag x \\", "    char-not-an-entry",
            "DeviceAllow=/dev/nvidiactl"]
    assert parse_device_allow(unit) == ["char-nvidia rw", "/dev/nvidiactl rwm"]
    # `systemctl show -p DeviceAllow t.service` (and with --value) as systemd 252 (Debian 12,
    # the sandbox image) printed it for a unit with the entries char-nvidia-frontend rw,
    # char-nvidia rw, /dev/infiniband/rdma_cm rw, char-nvidia-caps r and char-x: one line
    # per entry, newest first, a missing access stored as rwm.
    shown = ("DeviceAllow=char-x rwm\nDeviceAllow=char-nvidia-caps r\n"
             "DeviceAllow=/dev/infiniband/rdma_cm rw\nDeviceAllow=char-nvidia rw\n"
             "DeviceAllow=char-nvidia-frontend rw\n")
    entries = ["char-x rwm", "char-nvidia-caps r", "/dev/infiniband/rdma_cm rw",
               "char-nvidia rw", "char-nvidia-frontend rw"]
    assert parse_device_allow(shown.splitlines()) == entries
    value = shown.replace("DeviceAllow=", "")
    assert parse_device_allow(value.splitlines()) == entries
    assert parse_device_allow(["char-nvidia-uvm rw"]) == ["char-nvidia-uvm rw"]
    with pytest.raises(ValueError, match="must start with /dev/, char- or block-"):
        parse_device_allow(["DeviceAllow=nvidia rw"])
    with pytest.raises(ValueError, match="r, w and m"):
        parse_device_allow(["char-nvidia rx"])
