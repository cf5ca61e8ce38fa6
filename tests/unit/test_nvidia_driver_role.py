"""The nvidia_driver role's variables for the systems it supports: its fact tasks
(roles/nvidia_driver/tasks/facts.yml) run by ansible-playbook on this machine with the facts
of Ubuntu 22.04 (GA and HWE kernels), Ubuntu 24.04, RHEL/Rocky 9 and Debian 12 set by a
test module (tests/data/library/given_facts.py), and what the role would install read
back. Nothing is installed: the package names are what is checked here; Molecule installs
Debian 12's real packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"

UBUNTU = {"distribution": "Ubuntu", "os_family": "Debian", "architecture": "x86_64"}
SYSTEMS: dict[str, dict[str, Any]] = {
    "jammy-hwe": {"facts": {**UBUNTU, "distribution_version": "22.04",
                            "distribution_major_version": "22",
                            "kernel": "6.8.0-40-generic"}},
    "jammy-ga": {"facts": {**UBUNTU, "distribution_version": "22.04",
                           "distribution_major_version": "22",
                           "kernel": "5.15.0-91-generic"}},
    "jammy-aws": {"facts": {**UBUNTU, "distribution_version": "22.04",
                            "distribution_major_version": "22",
                            "kernel": "6.8.0-1012-aws"}},
    "noble-dkms": {"facts": {**UBUNTU, "distribution_version": "24.04",
                             "distribution_major_version": "24",
                             "kernel": "6.8.0-31-generic"},
                   "vars": {"nvidia_driver_ubuntu_signed_modules": False}},
    "noble-cuda": {"facts": {**UBUNTU, "distribution_version": "24.04",
                             "distribution_major_version": "24",
                             "kernel": "6.11.0-26-generic"},
                   "vars": {"nvidia_driver_source": "cuda",
                            "nvidia_driver_open_kernel_modules": False,
                            "__nvidia_driver_fm_version": "580.95.05"}},
    "rhel9": {"facts": {"distribution": "RedHat", "os_family": "RedHat",
                        "distribution_version": "9.4", "distribution_major_version": "9",
                        "architecture": "x86_64", "kernel": "5.14.0-427.13.1.el9_4.x86_64"},
              "vars": {"__nvidia_driver_fm_version": "580.95.05"}},
    "rocky9": {"facts": {"distribution": "Rocky", "os_family": "RedHat",
                         "distribution_version": "9.4", "distribution_major_version": "9",
                         "architecture": "x86_64", "kernel": "5.14.0-427.13.1.el9_4.x86_64"},
               "vars": {"nvidia_driver_branch": "535"}},
    "bookworm": {"facts": {"distribution": "Debian", "os_family": "Debian",
                           "distribution_version": "12.5", "distribution_major_version": "12",
                           "architecture": "x86_64", "kernel": "6.1.0-18-amd64"}},
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("nvidia-driver")
    inventory = {"all": {"vars": {"ansible_connection": "local",
                                  "ansible_python_interpreter": sys.executable},
                         "hosts": {name: {"system_facts": system["facts"],
                                          **system.get("vars", {})}
                                   for name, system in SYSTEMS.items()}}}
    (tmp / "inventory.json").write_text(json.dumps(inventory))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_LIBRARY": str(DATA / "library"), "ANSIBLE_STDOUT_CALLBACK": "json",
           "ANSIBLE_LOCAL_TEMP": str(tmp / "local"), "ANSIBLE_REMOTE_TEMP": str(tmp / "remote")}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(tmp / "inventory.json"),
         str(DATA / "nvidia-driver-facts-playbook.yml")],
        env=env, capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"ansible-playbook printed no JSON report:\n{proc.stdout}\n{proc.stderr}")
    task = next(t for t in report["plays"][0]["tasks"]
                if t["task"]["name"] == "Report what the role would install")
    assert set(task["hosts"]) == set(SYSTEMS), proc.stdout[-3000:]
    failed = {name: r["msg"] for name, r in task["hosts"].items() if not isinstance(r["msg"], dict)}
    assert not failed, failed
    return {name: result["msg"] for name, result in task["hosts"].items()}


def test_ubuntu_2204_hwe_kernel_gets_hwe_signed_modules_and_headers(rendered) -> None:
    host = rendered["jammy-hwe"]
    assert host["branch"] == "580" and host["open"] is True  # NVIDIA's default from R560
    assert host["packages"] == ["nvidia-headless-no-dkms-580-server-open",
                                "nvidia-utils-580-server",
                                "linux-modules-nvidia-580-server-open-generic-hwe-22.04"]
    # Before: linux-headers-generic, which follows the GA 5.15 kernel, not this one.
    assert host["headers"] == ["linux-headers-6.8.0-40-generic",
                               "linux-headers-generic-hwe-22.04"]
    assert host["mok"] == "/var/lib/shim-signed/mok/MOK.der"
    assert "580" in host["carried"]


def test_ubuntu_ga_and_cloud_kernels_get_their_own_flavour(rendered) -> None:
    assert rendered["jammy-ga"]["packages"][-1] == "linux-modules-nvidia-580-server-open-generic"
    assert rendered["jammy-ga"]["headers"][-1] == "linux-headers-generic"
    assert rendered["jammy-aws"]["packages"][-1] == "linux-modules-nvidia-580-server-open-aws"
    assert rendered["jammy-aws"]["headers"][-1] == "linux-headers-aws"


def test_ubuntu_dkms_and_cuda_repository_packages(rendered) -> None:
    assert rendered["noble-dkms"]["packages"] == ["nvidia-headless-580-server-open",
                                                  "nvidia-utils-580-server"]
    assert rendered["noble-dkms"]["signed_modules"] is False
    cuda = rendered["noble-cuda"]
    assert cuda["packages"] == ["nvidia-headless-580", "nvidia-utils-580"]
    assert cuda["headers"][-1] == "linux-headers-generic-hwe-24.04"
    # Any revision of the driver's own version (Fabric Manager refuses another version).
    assert cuda["fabricmanager"] == ["nvidia-fabricmanager-580=580.95.05-*"]


def test_rhel_module_stream_fabric_manager_and_epel(rendered) -> None:
    rhel = rendered["rhel9"]
    assert rhel["packages"] == ["@nvidia-driver:580-open"]
    assert rhel["headers"] == ["kernel-devel-5.14.0-427.13.1.el9_4.x86_64"]
    assert rhel["fabricmanager"] == ["nvidia-fabric-manager-580.95.05"]
    assert rhel["epel"] == "https://dl.fedoraproject.org/pub/epel/epel-release-latest-9.noarch.rpm"
    assert rhel["mok"] == "/var/lib/dkms/mok.pub"
    rocky = rendered["rocky9"]
    assert rocky["epel"] == "epel-release"
    # R535 predates open as NVIDIA's default.
    assert rocky["packages"] == ["@nvidia-driver:535-dkms"] and rocky["open"] is False


def test_debian_12_keeps_its_one_branch_and_dkms_key(rendered) -> None:
    host = rendered["bookworm"]
    assert host["branch"] == "535" and host["carried"] == ["535"]
    assert host["packages"][-1] == "nvidia-kernel-dkms"
    assert host["headers"] == ["linux-headers-6.1.0-18-amd64", "linux-headers-amd64"]
    assert host["mok"] == "/var/lib/dkms/mok.pub"
