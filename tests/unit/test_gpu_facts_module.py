"""The nvidia_gpu_facts Ansible module (roles/gpu_check), run by ansible on this machine.

There is no GPU here: nvidia-smi is a stand-in script that prints real outputs from
shared/fixtures (H100 with MIG, a driver that is not loaded), and NVML is a stand-in
pynvml module. Both stand-ins are named so; the module code under test is the real one.
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
                     listing: str | None = None, rc: int = 0) -> None:
    """A stand-in nvidia-smi that answers each invocation with a saved real output."""
    bindir.mkdir(exist_ok=True)
    script = bindir / "nvidia-smi"
    arms = [f'  --query-gpu=*) cat "{FIXTURES / query}" ;;' if query else "",
            f'  -L) cat "{FIXTURES / listing}" ;;' if listing else ""]
    script.write_text("#!/bin/sh\n# stand-in nvidia-smi for tests\ncase \"$1\" in\n"
                      + "\n".join(a for a in arms if a)
                      + f'\n  *) cat "{FIXTURES / table}"; exit {rc} ;;\nesac\n')
    script.chmod(0o755)


def _run_module(tmp_path: Path, args: str, *, path: str, pythonpath: str = "") -> dict:
    env = {**os.environ, "PATH": path, "PYTHONPATH": pythonpath,
           "ANSIBLE_LIBRARY": str(ROLE / "library"),
           "ANSIBLE_MODULE_UTILS": str(ROLE / "module_utils"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
           "ANSIBLE_STDOUT_CALLBACK": "json", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1"}
    ansible = Path(sys.executable).parent / "ansible"
    proc = subprocess.run(
        [str(ansible), "localhost", "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}",
         "-m", "nvidia_gpu_facts", "-a", args],
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
                                  "mig_mode": "Disabled"}]
    else:
        assert facts["error"]["kind"] == "driver_not_loaded"
