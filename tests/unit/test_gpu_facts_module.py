"""The nvidia_gpu_facts Ansible module (roles/gpu_check), run by ansible on this machine.

There is no GPU here: nvidia-smi is a stand-in script that prints real outputs from
tests/data/nvidia-smi (H100 with MIG, a driver that is not loaded, -q -x XML), NVML is a
stand-in pynvml module, and the PCI bus is a stand-in sysfs tree. All stand-ins are named
so; the module code under test is the real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "data" / "nvidia-smi"
ROLE = REPO / "roles" / "gpu_check"


def _fake_nvidia_smi(bindir: Path, *, table: str, query: str | None = None,
                     listing: str | None = None, xml: str | None = None,
                     rc: int = 0) -> Path:
    """A stand-in nvidia-smi that answers each invocation with a saved real output (and
    logs its arguments to calls.log); without an arm for them, `table` for any."""
    bindir.mkdir(exist_ok=True)
    script = bindir / "nvidia-smi"
    arms = [f'  --query-gpu=*) cat "{FIXTURES / query}" ;;' if query else "",
            f'  -L) cat "{FIXTURES / listing}" ;;' if listing else "",
            f'  -q) cat "{FIXTURES / xml}" ;;' if xml else ""]
    script.write_text("#!/bin/sh\n# stand-in nvidia-smi for tests\n"
                      f'echo "$*" >> "{bindir / "calls.log"}"\n'
                      'case "$1" in\n'
                      + "\n".join(a for a in arms if a)
                      + f'\n  *) cat "{FIXTURES / table}"; exit {rc} ;;\nesac\n')
    script.chmod(0o755)
    return bindir / "calls.log"


def _run_module(tmp_path: Path, args: str, *, path: str, pythonpath: str = "",
                module: str = "nvidia_gpu_facts") -> dict:
    env = {**os.environ, "PATH": path, "PYTHONPATH": pythonpath,
           "ANSIBLE_LIBRARY": str(ROLE / "library"),
           "ANSIBLE_MODULE_UTILS": str(ROLE / "module_utils"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
           "ANSIBLE_STDOUT_CALLBACK": "json", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1"}
    ansible = Path(sys.executable).parent / "ansible"
    proc = subprocess.run(
        [str(ansible), "localhost", "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}",
         "-m", module, "-a", args],
        env=env, capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    return result


def _system_path(bindir: Path | None = None) -> str:
    dirs = [str(bindir)] if bindir else []
    return os.pathsep.join([*dirs, str(Path(sys.executable).parent), "/usr/bin", "/bin"])


def test_h100_with_mig_through_nvidia_smi(tmp_path: Path) -> None:
    _fake_nvidia_smi(tmp_path / "bin", table="table_mig__H100-80GB-HBM3__590.48.01.txt",
                     query="query_csv_allfields__H100-80GB-HBM3__590.48.01.txt",
                     listing="list_mig__H100-80GB-HBM3__590.48.01.txt")
    result = _run_module(tmp_path, "use_nvml=false", path=_system_path(tmp_path / "bin"))
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert result["changed"] is False
    assert facts["source"] == "nvidia-smi"
    assert (facts["driver_version"], facts["cuda_version"], facts["error"]) == \
        ("590.48.01", "13.1", None)
    assert facts["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert facts["gpus"][0]["memory_total_mib"] == 81559
    assert facts["gpus"][0]["compute_capability"] == "9.0"
    assert facts["gpus"][0]["mig_mode"] == "Enabled"
    assert facts["gpus"][0]["uuid"].startswith("GPU-")
    assert [m["profile"] for m in facts["mig_devices"]] == ["3g.40gb", "2g.20gb", "1g.10gb",
                                                           "1g.10gb"]
    assert "1 GPU(s)" in result["summary"]


def test_driver_not_loaded_is_a_fact_not_a_failure(tmp_path: Path) -> None:
    _fake_nvidia_smi(tmp_path / "bin", table="error_driver_comm__unknown__460.x.txt", rc=9)
    result = _run_module(tmp_path, "use_nvml=false", path=_system_path(tmp_path / "bin"))
    error = result["ansible_facts"]["nvidia_gpu"]["error"]
    assert result.get("failed") is not True
    assert error["kind"] == "driver_not_loaded"
    assert "lsmod | grep nvidia" in error["next_step"]


def test_no_nvidia_smi_on_the_host(tmp_path: Path) -> None:
    result = _run_module(tmp_path, "use_nvml=false", path=_system_path())
    error = result["ansible_facts"]["nvidia_gpu"]["error"]
    assert error["kind"] == "not_installed"
    assert "nvidia-smi: command not found" in error["message"]


STANDIN_PYNVML = '''
"""Stand-in for nvidia-ml-py's pynvml (tests only): one H100, or a driver not loaded."""
import os
from types import SimpleNamespace

class NVMLError(Exception):
    pass

class NVMLError_DriverNotLoaded(NVMLError):
    pass

class NVMLError_LibraryNotFound(NVMLError):
    pass

class NVMLError_NotSupported(NVMLError):
    pass

def nvmlInit():
    if os.environ.get("STANDIN_NVML") == "not-loaded":
        raise NVMLError_DriverNotLoaded("Driver Not Loaded")

def nvmlShutdown():
    pass

def nvmlSystemGetDriverVersion():
    return b"580.65.06"

def nvmlSystemGetCudaDriverVersion_v2():
    return 13000

def nvmlDeviceGetCount():
    return 1

def nvmlDeviceGetHandleByIndex(index):
    return index

def nvmlDeviceGetName(handle):
    return "NVIDIA H100 80GB HBM3"

def nvmlDeviceGetUUID(handle):
    return "GPU-11111111-2222-3333-4444-555555555555"

def nvmlDeviceGetMemoryInfo(handle):
    return SimpleNamespace(total=81559 * 2**20, used=0, free=81559 * 2**20)

def nvmlDeviceGetCudaComputeCapability(handle):
    return (9, 0)

def nvmlDeviceGetMigMode(handle):
    return (0, 0)

def nvmlDeviceGetPersistenceMode(handle):
    return 1

def nvmlDeviceGetEccMode(handle):
    if os.environ.get("STANDIN_NVML_ECC") == "unsupported":
        raise NVMLError_NotSupported("Not Supported")
    return (1, 1)
'''


@pytest.mark.parametrize("mode", ["ok", "not-loaded"])
def test_nvml_is_preferred(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "nvml").mkdir()
    (tmp_path / "nvml" / "pynvml.py").write_text(STANDIN_PYNVML)
    monkeypatch.setenv("STANDIN_NVML", mode)
    result = _run_module(tmp_path, "", path=_system_path(), pythonpath=str(tmp_path / "nvml"))
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert facts["source"] == "nvml"
    if mode == "ok":
        assert facts["error"] is None
        assert (facts["driver_version"], facts["cuda_version"]) == ("580.65.06", "13.0")
        assert facts["gpus"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3",
                                  "uuid": "GPU-11111111-2222-3333-4444-555555555555",
                                  "memory_total_mib": 81559, "compute_capability": "9.0",
                                  "mig_mode": "Disabled", "persistence_mode": "Enabled",
                                  "ecc_mode": "Enabled"}]
    else:
        assert facts["error"]["kind"] == "driver_not_loaded"


def test_nvml_ecc_not_supported_is_none(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "nvml").mkdir()
    (tmp_path / "nvml" / "pynvml.py").write_text(STANDIN_PYNVML)
    monkeypatch.setenv("STANDIN_NVML", "ok")
    monkeypatch.setenv("STANDIN_NVML_ECC", "unsupported")
    result = _run_module(tmp_path, "", path=_system_path(), pythonpath=str(tmp_path / "nvml"))
    gpu = result["ansible_facts"]["nvidia_gpu"]["gpus"][0]
    assert (gpu["persistence_mode"], gpu["ecc_mode"]) == ("Enabled", None)


def test_xml_first_then_only_what_it_lacks(tmp_path: Path) -> None:
    """-q -x carries versions, UUIDs, memory, persistence and ECC; only the compute
    capability is asked of --query-gpu, and -L is not run (no MIG)."""
    calls = _fake_nvidia_smi(tmp_path / "bin", table="table__RTX-4090__580.65.06.txt",
                             xml="xml__8x-V100S-PCIE-32GB__460.73.01.txt")
    result = _run_module(tmp_path, "use_nvml=false", path=_system_path(tmp_path / "bin"))
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert (facts["driver_version"], facts["cuda_version"], facts["error"]) == \
        ("460.73.01", "11.2", None)
    assert len(facts["gpus"]) == 8
    first = facts["gpus"][0]
    assert (first["name"], first["memory_total_mib"]) == ("Tesla V100S-PCIE-32GB", 32510)
    assert (first["persistence_mode"], first["ecc_mode"]) == ("Disabled", "Enabled")
    # The stand-in answers --query-gpu with the 4090 table: nothing to add, nothing wrong.
    assert first["compute_capability"] is None
    lines = calls.read_text().splitlines()
    assert lines[0] == "-q -x"
    assert all(not line.startswith("-L") for line in lines)


@pytest.mark.parametrize("fixture", ["table_mig__H100-80GB-HBM3__590.48.01.txt",
                                     "xml_mig__A100-SXM4-40GB__510.47.03.txt"])
def test_a_replay_that_prints_one_output_for_every_argument(tmp_path: Path,
                                                            fixture: str) -> None:
    """A stand-in nvidia-smi replaying one saved output, whatever it is asked: the facts
    are that output's, with nothing invented from the repeated answers."""
    _fake_nvidia_smi(tmp_path / "bin", table=fixture)
    result = _run_module(tmp_path, "use_nvml=false", path=_system_path(tmp_path / "bin"))
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert facts["error"] is None
    assert [g["mig_mode"] for g in facts["gpus"]] == ["Enabled"]
    assert facts["mig_devices"] == []
    assert facts["driver_version"] in ("590.48.01", "510.47.03")


def _pci_device(root: Path, address: str, vendor: str, pci_class: str) -> None:
    device = root / "bus" / "pci" / "devices" / address
    device.mkdir(parents=True)
    (device / "vendor").write_text(vendor + "\n")
    (device / "class").write_text(pci_class + "\n")


def test_pci_bus_counts_gpus_and_nvswitches(tmp_path: Path) -> None:
    """A stand-in sysfs of an HGX-like host: two 3D controllers, one VGA GPU, two NVSwitch
    bridges, an NVIDIA audio function and a Mellanox NIC."""
    sysfs = tmp_path / "sys"
    _pci_device(sysfs, "0000:18:00.0", "0x10de", "0x030200")
    _pci_device(sysfs, "0000:2a:00.0", "0x10de", "0x030200")
    _pci_device(sysfs, "0000:01:00.0", "0x10de", "0x030000")
    _pci_device(sysfs, "0000:01:00.1", "0x10de", "0x040300")
    _pci_device(sysfs, "0000:c5:00.0", "0x10de", "0x068000")
    _pci_device(sysfs, "0000:c6:00.0", "0x10de", "0x068000")
    _pci_device(sysfs, "0000:3b:00.0", "0x15b3", "0x020000")
    _fake_nvidia_smi(tmp_path / "bin", table="error_driver_comm__unknown__460.x.txt", rc=9)
    result = _run_module(tmp_path, f"use_nvml=false sysfs_root={sysfs}",
                         path=_system_path(tmp_path / "bin"))
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert (facts["pci_gpus"], facts["nvswitches"]) == (3, 2)
    assert facts["error"]["kind"] == "driver_not_loaded"
    assert "PCI: 3 NVIDIA GPU(s), 2 NVSwitch(es)" in result["summary"]


def test_no_nvidia_device_and_no_nvidia_smi(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    _pci_device(sysfs, "0000:00:02.0", "0x8086", "0x030000")
    result = _run_module(tmp_path, f"use_nvml=false sysfs_root={sysfs}", path=_system_path())
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert (facts["pci_gpus"], facts["nvswitches"]) == (0, 0)
    assert facts["error"]["kind"] == "not_installed"


def test_unreadable_sysfs_counts_nothing(tmp_path: Path) -> None:
    result = _run_module(tmp_path, f"use_nvml=false sysfs_root={tmp_path / 'missing'}",
                         path=_system_path())
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert (facts["pci_gpus"], facts["nvswitches"]) == (None, None)


# ---------------------------------------------------------------- host_capacity_facts

SECURE_BOOT_VAR = "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def _capacity(tmp_path: Path, *, efi: bytes | str | None, headers: bool,
              paths: list[str]) -> dict:
    """host_capacity_facts on stand-in /proc, /sys and /lib/modules trees (`efi`: the
    SecureBoot variable's bytes, "no-var" for an EFI boot without it, None for BIOS)."""
    proc, sysfs, modules = tmp_path / "proc", tmp_path / "sys", tmp_path / "modules"
    proc.mkdir()
    (proc / "meminfo").write_text("MemTotal:       16318480 kB\nMemFree:  123 kB\n")
    sysfs.mkdir()
    if efi is not None:
        (sysfs / "firmware" / "efi" / "efivars").mkdir(parents=True)
        if isinstance(efi, bytes):
            (sysfs / "firmware" / "efi" / "efivars" / SECURE_BOOT_VAR).write_bytes(efi)
    release = modules / os.uname().release
    release.mkdir(parents=True)
    if headers:
        (tmp_path / "headers").mkdir()
        (release / "build").symlink_to(tmp_path / "headers")
    else:  # headers removed, the link left behind
        (release / "build").symlink_to(tmp_path / "gone")
    args = json.dumps({"paths": paths, "proc_root": str(proc), "sysfs_root": str(sysfs),
                       "modules_root": str(modules)})
    result = _run_module(tmp_path, args, path=_system_path(), module="host_capacity_facts")
    assert result["changed"] is False
    return result["ansible_facts"]["host_capacity"]


def test_capacity_secure_boot_enabled_with_headers(tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir()
    facts = _capacity(tmp_path, efi=b"\x06\x00\x00\x00\x01", headers=True,
                      paths=[str(tmp_path / "srv" / "models" / "qwen"), "/"])
    assert facts["kernel"] == os.uname().release
    assert facts["kernel_headers"] is True
    assert facts["secure_boot"] == "enabled"
    assert facts["memory_mib"] == 16318480 // 1024
    nested, root = facts["disk"]
    # A path not created yet: measured where it would be created.
    assert nested["path"] == str(tmp_path / "srv" / "models" / "qwen")
    assert os.path.ismount(nested["mount"])
    assert str(tmp_path).startswith(nested["mount"])
    stat = os.statvfs(tmp_path / "srv")
    assert abs(nested["free_mib"] - stat.f_bavail * stat.f_frsize // 2**20) < 64
    assert root["mount"] == "/"


@pytest.mark.parametrize(("efi", "state"), [
    (b"\x06\x00\x00\x00\x00", "disabled"),
    (None, "not_efi"),
    ("no-var", None),
    (b"\x06\x00", None),
])
def test_capacity_secure_boot_states(tmp_path: Path, efi: bytes | str | None,
                                     state: str | None) -> None:
    facts = _capacity(tmp_path, efi=efi, headers=False, paths=[])
    assert facts["secure_boot"] == state
    assert facts["kernel_headers"] is False
    assert facts["disk"] == []


def test_capacity_runs_in_check_mode(tmp_path: Path) -> None:
    env = {**os.environ, "ANSIBLE_LIBRARY": str(ROLE / "library"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
           "ANSIBLE_STDOUT_CALLBACK": "json", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible"), "localhost", "-i", "localhost,",
         "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}", "--check",
         "-m", "host_capacity_facts", "-a", json.dumps({"paths": ["/"]})],
        env=env, capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    assert result.get("skipped") is not True
    assert result["ansible_facts"]["host_capacity"]["disk"][0]["mount"] == "/"
