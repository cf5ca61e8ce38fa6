"""Host probes over SSH: orchestrator/verify/hostprobe.py and its collector,
orchestrator/verify/hostcollect.py.

* The judging functions, fed the collector's evidence for healthy and broken hosts:
  nvidia-smi evidence is real output (shared/fixtures/nvidia-smi, see its SOURCES.md),
  weights are real directories read by the collector's own function.
* The collector run for real by this machine's python3 (Debian 12's, like the hosts'),
  without site-packages, against a directory tree laid out like a provisioned host.
  Stand-ins, each named so where it is made: torch-check (no torch here), systemctl (no
  systemd as PID 1 here), nvidia-smi (no NVIDIA driver here; it prints a real capture)
  and the NVML module (no libnvidia-ml here).
* The SSH layer through Ansible's own connection (playbooks/probe.yml by ansible-runner,
  the system ssh) with the sandbox's own connection settings: against a stand-in sshd
  (paramiko's server side on loopback), a port nothing listens on, and a listener that
  never answers.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
import paramiko
import pytest
import yaml

from orchestrator.config.fleet import load_fleet
from orchestrator.facts.nvidia_smi import (
    NEXT_STEPS,
    GpuFacts,
    parse_nvidia_smi,
    parse_xml_health,
)
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.knowledge.roles import load_role_defaults
from orchestrator.plan.planner import HostPlan, Plan, make_plan
from orchestrator.sandbox.fleet import sandbox_fleet
from orchestrator.sandbox.hosts import ensure_ssh_key
from orchestrator.verify import hostcollect, hostprobe
from orchestrator.verify.hostprobe import (
    CollectError,
    Service,
    collector_config,
    collector_program,
    gpu_evidence,
    gpu_results,
    interpret,
    listening_result,
    probe_all,
    probe_hosts,
    run_collector,
    service_results,
    services,
    stack_result,
    weights_result,
)
from orchestrator.verify.httpprobe import ProbeResult

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "data" / "nvidia-smi"
MARKER = ".qwen-serve-complete"  # roles/model_weights/defaults/main.yml
SMI = "/usr/bin/nvidia-smi"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


@functools.cache
def sandbox_plan(key: Path = Path("/k")) -> Plan:
    return make_plan(sandbox_fleet(key, Path("/m")), "sandbox", load_knowledge(),
                     load_cuda_compat())


@functools.cache
def gpu_cluster_plan() -> Plan:
    return make_plan(load_fleet(REPO / "templates" / "fleet.yml"), "gpu-cluster",
                     load_knowledge(), load_cuda_compat())


def cpu_host(**variables: Any) -> HostPlan:
    """sandbox-1 as the sandbox plans it (profile cpu, vLLM on 0.0.0.0:8000)."""
    host = sandbox_plan().hosts[0]
    return host.model_copy(update={"vars": {**host.vars, **variables}})


def gpu_host(**variables: Any) -> HostPlan:
    """gpu-01 of the example fleet (templates/fleet.yml): 1x NVIDIA A10, torch +cu130 (driver
    580.65.06 or newer), vLLM qwen7b on 0.0.0.0:8000, Ollama on 127.0.0.1:11434."""
    host = gpu_cluster_plan().hosts[0]
    return host.model_copy(update={"vars": {**host.vars, **variables}})


def record(stdout: str = "", rc: int | None = 0, stderr: str = "",
           error: str | None = None) -> dict[str, Any]:
    """One command as the collector records it (hostcollect.run)."""
    return {"argv": ["cmd"], "rc": rc, "stdout": stdout, "stderr": stderr,
            **({"error": error} if error else {})}


def smi(table: str, rc: int = 0, **more: dict[str, Any]) -> dict[str, Any]:
    """The collector's `gpu` part for the nvidia-smi path; `table` is its plain output."""
    return {"source": "nvidia-smi", "path": SMI, "table": record(table, rc), **more}


def by_probe(results: list[ProbeResult]) -> dict[str, ProbeResult]:
    return {r.probe: r for r in results}


# ---------------------------------------------------------------- GPU: nvidia-smi

@pytest.mark.parametrize(("name", "kind", "said"), [
    ("error_driver_comm__unknown__460.x.txt", "driver_not_loaded",
     "couldn't communicate with the NVIDIA driver"),
    ("error_version_mismatch_nvml-line__unknown__570.124.txt", "version_mismatch",
     "Driver/library version mismatch"),
    ("error_no_devices__RTX-5090__unknown.txt", "no_devices", "No devices were found"),
])
def test_a_driver_that_does_not_answer_fails_gpu_with_its_next_step(name: str, kind: str,
                                                                    said: str) -> None:
    # Its exit code is not what the probe reads: the message is.
    facts, health, source = gpu_evidence(smi(fixture(name), rc=9))
    gpu, gpu_health = gpu_results(gpu_host(), facts, health, source)
    assert gpu.status == "fail" and not gpu.passed
    assert gpu.evidence.startswith(f"nvidia-smi ({SMI}): {kind}: ") and said in gpu.evidence
    assert gpu.next_step == NEXT_STEPS[kind]
    assert gpu_health.status == "skip" and "see the gpu probe" in gpu_health.evidence


def test_nvidia_smi_missing_or_hanging() -> None:
    missing = {"source": "nvidia-smi", "path": None, "searched": "/usr/sbin:/usr/bin"}
    gpu, _ = gpu_results(gpu_host(), *gpu_evidence(missing))
    assert not gpu.passed and "not_installed" in gpu.evidence
    assert "/usr/sbin:/usr/bin" in gpu.evidence
    assert gpu.next_step == NEXT_STEPS["not_installed"]
    hung = {"source": "nvidia-smi", "path": SMI,
            "table": record(rc=None, error="timed out after 20 s")}
    gpu, _ = gpu_results(gpu_host(), *gpu_evidence(hung))
    assert not gpu.passed and "timed out after 20 s" in gpu.evidence
    assert gpu.next_step == NEXT_STEPS["unrecognized"]


def test_gpus_as_planned_pass_with_ecc_and_clock_reasons_reported() -> None:
    # Facts and health from one real `nvidia-smi -q -x` capture (2x RTX A5000, 590.44.01).
    xml = fixture("xml__2x-RTX-A5000__590.44.01.txt")
    host = gpu_host(gpu_check_expected_name="RTX A5000", gpu_check_expected_count=2)
    gpu, health = gpu_results(host, parse_nvidia_smi(xml), parse_xml_health(xml), "nvidia-smi")
    assert gpu.status == "pass" and gpu.next_step is None
    assert "driver 590.44.01, CUDA 13.1, 2 GPU(s)" in gpu.evidence
    assert "plan: driver >= 580.65.06, 2 GPU(s), RTX A5000" in gpu.evidence
    assert health.status == "pass"
    assert ("GPU 1 NVIDIA RTX A5000: ECC Disabled; clock event reasons active: gpu_idle"
            in health.evidence)


def test_uncorrectable_ecc_errors_and_a_hardware_slowdown_fail_gpu_health() -> None:
    # The real 8x V100S capture with GPU 0 given 3 volatile uncorrectable (double bit)
    # errors and an active hardware slowdown.
    xml = fixture("xml__8x-V100S-PCIE-32GB__460.73.01.txt")
    xml = re.sub(r"(<volatile>.*?<double_bit>.*?<total>)0(</total>)", r"\g<1>3\2", xml,
                 count=1, flags=re.S)
    xml = xml.replace("<clocks_throttle_reason_hw_slowdown>Not Active<",
                      "<clocks_throttle_reason_hw_slowdown>Active<", 1)
    host = gpu_host(gpu_check_expected_name="V100S", gpu_check_expected_count=8,
                    gpu_check_min_driver="450.80.02")
    gpu, health = gpu_results(host, parse_nvidia_smi(xml), parse_xml_health(xml), "nvidia-smi")
    assert gpu.passed, gpu.evidence
    assert not health.passed
    assert ("GPU 0 Tesla V100S-PCIE-32GB: ECC Enabled, 3 volatile uncorrectable; clock event "
            "reasons active: hw_slowdown" in health.evidence)
    assert "GPU 1 Tesla V100S-PCIE-32GB: ECC Enabled, 0 volatile uncorrectable" in health.evidence
    step = health.next_step or ""
    assert "GPU(s) [0] had uncorrectable ECC errors" in step and "dmesg | grep -i xid" in step
    assert "GPU(s) [0] are slowed by heat or power delivery" in step


def test_driver_version_and_gpus_against_the_plan() -> None:
    facts, health, source = gpu_evidence(smi(fixture("table__A10__550.127.05.txt")))

    def gpu(**variables: Any) -> ProbeResult:
        return gpu_results(gpu_host(**variables), facts, health, source)[0]

    # The example fleet's plan: torch +cu130 needs driver 580.65.06.
    old = gpu()
    assert not old.passed and "driver 550.127.05 is older than 580.65.06" in old.evidence
    assert old.next_step == "install driver branch 580 or newer (drivers stage) and reboot"
    assert gpu(gpu_check_min_driver="535.104.05").passed

    pinned = dict(gpu_check_min_driver="535.104.05", nvidia_driver_manage=True)
    other = gpu(**pinned, nvidia_driver_version="550.163.01")
    assert not other.passed
    assert ("driver 550.127.05 is not the planned 550.163.01 (nvidia_driver_version)"
            in other.evidence)
    assert "rerun the drivers stage (`orchestrate up --only drivers`)" in (other.next_step or "")
    assert gpu(**pinned, nvidia_driver_version="550.127.05").passed
    assert gpu(**pinned, nvidia_driver_branch="550").passed
    branch = gpu(**pinned, nvidia_driver_branch="580")
    assert not branch.passed and "not the planned branch 580" in branch.evidence
    # A driver the toolkit does not manage is held to the minimum only.
    assert gpu(gpu_check_min_driver="535.104.05", nvidia_driver_manage="false",
               nvidia_driver_version="550.163.01").passed

    wrong = gpu(gpu_check_min_driver="535.104.05", gpu_check_expected_count=2,
                gpu_check_expected_name="H100")
    assert not wrong.passed
    assert "1 GPU(s), the plan says 2" in wrong.evidence
    assert "not every GPU is a H100" in wrong.evidence
    assert "fix the fleet's gpu: {name, count}" in (wrong.next_step or "")


def test_table_and_query_merged_and_a_hanging_xml_report() -> None:
    gpu_part = smi(fixture("table__H100-80GB-HBM3__590.48.01.txt"),
                   csv=record(fixture("query_csv_allfields__H100-80GB-HBM3__590.48.01.txt")),
                   xml=record(rc=None, error="timed out after 20 s"))
    facts, health, source = gpu_evidence(gpu_part)
    assert facts.gpus[0].compute_capability == "9.0"  # only the query has it
    gpu, gpu_health = gpu_results(gpu_host(gpu_check_expected_name="H100"), facts, health,
                                  source)
    assert gpu.passed, gpu.evidence
    assert "0: NVIDIA H100 80GB HBM3 81559 MiB MIG Disabled" in gpu.evidence
    assert not gpu_health.passed and "timed out after 20 s" in gpu_health.evidence
    assert gpu_health.next_step == NEXT_STEPS["unrecognized"]


def test_mig_mode_and_devices_are_reported() -> None:
    gpu_part = smi(fixture("table_mig__H100-80GB-HBM3__590.48.01.txt"),
                   list=record(fixture("list_mig__H100-80GB-HBM3__590.48.01.txt")))
    facts, health, source = gpu_evidence(gpu_part)
    gpu = gpu_results(gpu_host(gpu_check_expected_name="H100"), facts, health, source)[0]
    assert "NVIDIA H100 80GB HBM3 81559 MiB MIG Enabled" in gpu.evidence
    assert "4 MIG device(s)" in gpu.evidence


def test_cpu_host_skips_the_gpu_probes_and_says_why() -> None:
    gpu, health = gpu_results(cpu_host(), None, None, "")
    assert (gpu.status, health.status) == ("skip", "skip") and gpu.passed
    assert gpu.evidence == "profile cpu: no GPU is planned on this host (torch CPU build)"


# ---------------------------------------------------------------- GPU: NVML

class StandInNvmlError(Exception):
    pass


def stand_in_pynvml(*, init_error: str | None = None, mask: int = 0x1,
                    uncorrected: int = 0) -> SimpleNamespace:
    """Stand-in for nvidia-ml-py's pynvml module (no libnvidia-ml here): the calls the
    collector makes, with the exception classes named as nvidia-ml-py 13.615.71 makes
    them (NVMLError_<CamelCase of NVML_ERROR_*>), and its return shapes: versions as
    str (bytes before 11.5), CUDA as 1000*major + 10*minor, modes as [current, pending]."""
    errors = {n: type(n, (StandInNvmlError,), {}) for n in (
        "NVMLError_DriverNotLoaded", "NVMLError_LibraryNotFound", "NVMLError_NotSupported")}

    def init() -> None:
        if init_error:
            raise errors[init_error]("stand-in: " + init_error)

    def not_supported(*_: Any) -> None:
        raise errors["NVMLError_NotSupported"]("Not Supported")

    return SimpleNamespace(
        NVMLError=StandInNvmlError, **errors,
        nvmlInit=init, nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: "590.48.01",
        nvmlSystemGetCudaDriverVersion_v2=lambda: 13010,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetUUID=lambda h: f"GPU-{h}",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=81559 * 2**20),
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
        nvmlDeviceGetMigMode=lambda h: [0, 0],
        nvmlDeviceGetEccMode=lambda h: [1, 1],
        # GPU 1 reports no ECC counts, as a GPU without ECC does.
        nvmlDeviceGetTotalEccErrors=lambda h, kind, counter: (
            uncorrected if h == 0 and (kind, counter) == (1, 0) else not_supported()),
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: mask if h == 0 else 0x1,
    )


def test_nvml_evidence_passes_and_reports_health() -> None:
    nvml = hostcollect._nvml(stand_in_pynvml())
    assert nvml is not None
    facts, health, source = gpu_evidence({"source": "nvml", "nvml": nvml})
    host = gpu_host(gpu_check_expected_name="H100", gpu_check_expected_count=2)
    gpu, gpu_health = gpu_results(host, facts, health, source)
    assert gpu.passed, gpu.evidence
    assert gpu.evidence.startswith("NVML: driver 590.48.01, CUDA 13.1, 2 GPU(s)")
    assert "81559 MiB MIG Disabled" in gpu.evidence
    assert gpu_health.passed
    assert ("GPU 0 NVIDIA H100 80GB HBM3: ECC Enabled, 0 volatile uncorrectable; clock event "
            "reasons active: gpu_idle" in gpu_health.evidence)
    assert "GPU 1 NVIDIA H100 80GB HBM3: ECC Enabled; clock" in gpu_health.evidence


def test_nvml_ecc_errors_and_thermal_slowdown_fail_gpu_health() -> None:
    nvml = hostcollect._nvml(stand_in_pynvml(mask=0x48, uncorrected=2))
    assert nvml is not None
    _, gpu_health = gpu_results(gpu_host(), *gpu_evidence({"source": "nvml", "nvml": nvml}))
    assert not gpu_health.passed
    assert "2 volatile uncorrectable" in gpu_health.evidence
    assert "hw_slowdown, hw_thermal_slowdown" in gpu_health.evidence
    assert "GPU(s) [0] had uncorrectable ECC errors" in (gpu_health.next_step or "")
    assert "GPU(s) [0] are slowed by heat" in (gpu_health.next_step or "")


def test_nvml_driver_not_loaded_and_missing_library() -> None:
    nvml = hostcollect._nvml(stand_in_pynvml(init_error="NVMLError_DriverNotLoaded"))
    assert nvml == {"error": "NVMLError_DriverNotLoaded",
                    "message": "stand-in: NVMLError_DriverNotLoaded"}
    gpu, gpu_health = gpu_results(gpu_host(), *gpu_evidence({"source": "nvml", "nvml": nvml}))
    assert not gpu.passed and gpu.evidence.startswith("NVML: driver_not_loaded: NVML: ")
    assert gpu.next_step == NEXT_STEPS["driver_not_loaded"]
    assert gpu_health.status == "skip"
    # No NVML library at all: the collector goes on to nvidia-smi.
    assert hostcollect._nvml(stand_in_pynvml(init_error="NVMLError_LibraryNotFound")) is None


# ---------------------------------------------------------------- stack (torch-check)

def torch_info(version: str = "2.13.0+cu130", cuda_build: str | None = "13.0",
               available: bool = True, gpus: int = 1, ok: bool = True) -> dict[str, Any]:
    """What roles/pytorch's torch-check prints (templates/torch-check.py.j2)."""
    devices = [{"device": f"cuda:{i}", "ok": ok, "name": "NVIDIA A10",
                **({"max_abs_error": 0.0, "seconds": 0.01} if ok else
                   {"error": "RuntimeError: CUDA error: an illegal memory access"})}
               for i in range(gpus if available else 0)]
    return {"version": version, "cuda_build": cuda_build, "cuda_available": available,
            "device_count": len(devices), "devices": devices,
            "cpu": {"device": "cpu", "ok": True, "max_abs_error": 0.0, "seconds": 0.02}}


def env(run: dict[str, Any] | None, *, exists: bool = True) -> dict[str, Any]:
    path = "/opt/qwen-serve/env"
    return {"path": path, "exists": exists, "torch_check": f"{path}/bin/torch-check",
            "installed": run is not None, **({"run": run} if run else {})}


def stack(host: HostPlan, info: dict[str, Any], facts: GpuFacts | None = None) -> ProbeResult:
    return stack_result(host, "", env(record(json.dumps(info))), facts)


DRIVER_590 = GpuFacts(driver_version="590.48.01", cuda_version="13.1")


def test_stack_as_planned_on_a_gpu_host() -> None:
    result = stack(gpu_host(), torch_info(), DRIVER_590)
    assert result.passed, result.evidence
    assert result.evidence == (
        "/opt/qwen-serve/env/bin/torch-check: torch 2.13.0+cu130, CUDA 13.0 build (the "
        "driver supports CUDA 13.1), CUDA available True, 1 GPU(s); matmul: cpu ok, "
        "cuda:0 NVIDIA A10 ok")


def test_a_torch_cuda_build_other_than_planned() -> None:
    result = stack(gpu_host(), torch_info("2.13.0+cu126", "12.6"), DRIVER_590)
    assert not result.passed
    assert "the plan says torch==2.13.0+cu130" in result.evidence
    assert "CUDA build 12.6, the plan's build is 13.0" in result.evidence
    step = result.next_step or ""
    assert "/opt/qwen-serve/env/constraints.txt" in step
    assert "rerun the python_env stage (`orchestrate up --only python_env`) for gpu-01" in step


def test_a_cuda_build_newer_than_the_driver_supports() -> None:
    facts = parse_nvidia_smi(fixture("table__A10__550.127.05.txt"))  # CUDA 12.4
    result = stack(gpu_host(), torch_info(), facts)
    assert not result.passed and "the driver supports CUDA 12.4 only" in result.evidence
    assert "`orchestrate compat --driver 550.127.05`" in (result.next_step or "")


def test_cuda_not_available_and_a_failed_matmul() -> None:
    blind = stack(gpu_host(), torch_info(available=False))
    assert not blind.passed
    assert "torch.cuda.is_available() is False" in blind.evidence
    assert "torch sees 0 GPU(s), the plan says 1" in blind.evidence
    assert "check the driver (the gpu probe" in (blind.next_step or "")
    broken = stack(gpu_host(), torch_info(ok=False), DRIVER_590)
    assert not broken.passed
    assert "matmul failed on cuda:0 (RuntimeError: CUDA error" in broken.evidence
    assert "dmesg | grep -i xid" in (broken.next_step or "")


def test_torch_check_missing_broken_or_hanging() -> None:
    host = gpu_host()
    missing = stack_result(host, "", env(None, exists=False), None)
    assert not missing.passed
    assert missing.evidence == ("/opt/qwen-serve/env/bin/torch-check is missing "
                                "(/opt/qwen-serve/env does not exist either)")
    assert "rerun the python_env stage" in (missing.next_step or "")
    error = json.dumps({"error": "import torch: ModuleNotFoundError: No module named 'torch'"})
    broken = stack_result(host, "", env(record(error, rc=1)), None)
    assert not broken.passed
    assert "exited 1: import torch: ModuleNotFoundError" in broken.evidence
    crashed = stack_result(host, "", env(record(rc=-11, stderr="Segmentation fault")), None)
    assert not crashed.passed and "exited -11: Segmentation fault" in crashed.evidence
    hung = stack_result(host, "", env(record(rc=None, error="timed out after 20 s")), None)
    assert not hung.passed and "timed out after 20 s" in hung.evidence
    assert "a hang in CUDA set-up points at the driver" in (hung.next_step or "")


def test_cpu_host_stack_says_cpu_build() -> None:
    result = stack(cpu_host(), torch_info("2.13.0+cpu", None, available=False))
    assert result.passed
    assert result.evidence.endswith("torch 2.13.0+cpu, CPU build, as planned; matmul: cpu ok")
    cuda = stack(cpu_host(), torch_info("2.13.0+cu130", "13.0", available=False))
    assert not cuda.passed and "the plan's build is CPU" in cuda.evidence


# ---------------------------------------------------------------- weights

def local_model(dest: Path) -> dict[str, Any]:
    """A local copy with manifest.json, as orchestrator/sandbox/modelgen.py writes it."""
    dest.mkdir(parents=True)
    (dest / "config.json").write_text('{"hidden_size": 128}')
    (dest / "model.safetensors").write_bytes(b"x" * 1000)
    files = {p.name: {"size": p.stat().st_size, "sha256": ""} for p in dest.iterdir()}
    (dest / "manifest.json").write_text(json.dumps({"files": files}))
    return {"name": "tiny-qwen2", "dest": str(dest), "source": "local", "local_dir": "/m"}


def downloaded_model(dest: Path, revision: str = "master") -> dict[str, Any]:
    """A ModelScope download with the completion marker roles/model_weights writes
    (tasks/mark.yml: identity and the verified files)."""
    dest.mkdir(parents=True)
    (dest / "config.json").write_text('{"hidden_size": 3584}')
    (dest / "model-00001-of-00004.safetensors").write_bytes(b"w" * 4096)
    files = {p.name: {"size": p.stat().st_size, "sha256": "0" * 64} for p in dest.iterdir()}
    identity = {"source": "modelscope", "model_id": "Qwen/Qwen2.5-7B-Instruct",
                "revision": revision, "include": [], "exclude": []}
    (dest / MARKER).write_text(json.dumps({"identity": identity, "files": files}))
    return {**gpu_host().vars["model_weights_models"][0], "dest": str(dest)}


def weights(host: HostPlan, entry: dict[str, Any]) -> ProbeResult:
    return weights_result(host, entry, hostcollect.model(entry, MARKER))


def test_local_copy_checked_against_its_manifest(tmp_path: Path) -> None:
    entry = local_model(tmp_path / "tiny")
    good = weights(cpu_host(), entry)
    assert good.passed
    assert (f"{tmp_path}/tiny: manifest.json (local copy), 2 files, 1020 bytes, all at their "
            "listed size" in good.evidence)
    (tmp_path / "tiny" / "model.safetensors").write_bytes(b"x" * 10)
    bad = weights(cpu_host(), entry)
    assert not bad.passed
    assert ("1 of 2 files differ from the manifest.json (local copy): model.safetensors "
            "10 bytes (listed 1000)" in bad.evidence)
    assert bad.next_step == (f"remove those files and {MARKER} from {tmp_path}/tiny, then "
                             "rerun the models stage (`orchestrate up --only models`) for "
                             "sandbox-1; it resumes downloads and verifies every file")


def test_download_checked_against_its_marker(tmp_path: Path) -> None:
    entry = downloaded_model(tmp_path / "qwen7b")
    good = weights(gpu_host(), entry)
    assert good.passed and f"marker {MARKER}, 2 files" in good.evidence
    (tmp_path / "qwen7b" / "config.json").unlink()
    gone = weights(gpu_host(), entry)
    assert not gone.passed and "config.json missing (listed 21)" in gone.evidence
    (tmp_path / "qwen7b" / MARKER).unlink()
    unmarked = weights(gpu_host(), entry)
    assert not unmarked.passed
    assert (f"no completion marker {MARKER}: the download did not finish or was not verified"
            in unmarked.evidence)
    assert "rerun the models stage (`orchestrate up --only models`)" in (unmarked.next_step or "")


def test_a_marker_of_another_revision_or_format(tmp_path: Path) -> None:
    other = weights(gpu_host(), downloaded_model(tmp_path / "a", revision="v1.0"))
    assert not other.passed
    assert ("the marker is for Qwen/Qwen2.5-7B-Instruct@v1.0, the plan wants "
            "Qwen/Qwen2.5-7B-Instruct@master" in other.evidence)
    # The text marker the role wrote before it kept a manifest counts as none.
    entry = downloaded_model(tmp_path / "b")
    (tmp_path / "b" / MARKER).write_text("Qwen/Qwen2.5-7B-Instruct@master\n")
    old = weights(gpu_host(), entry)
    assert not old.passed and "not JSON" in old.evidence
    assert (old.next_step or "").startswith(f"remove {tmp_path}/b/{MARKER} and rerun")


def test_missing_directory_and_paths_outside_it(tmp_path: Path) -> None:
    entry = {"name": "qwen7b", "dest": str(tmp_path / "none"), "source": "modelscope"}
    missing = weights(gpu_host(), entry)
    assert not missing.passed and missing.evidence == f"{tmp_path}/none does not exist"
    entry = downloaded_model(tmp_path / "m")
    marker = json.loads((tmp_path / "m" / MARKER).read_text())
    marker["files"]["../../etc/passwd"] = {"size": 1, "sha256": ""}
    (tmp_path / "m" / MARKER).write_text(json.dumps(marker))
    outside = weights(gpu_host(), entry)
    assert not outside.passed and "../../etc/passwd (outside the directory)" in outside.evidence


# ---------------------------------------------------------------- services, sockets

def unit(**props: str) -> dict[str, Any]:
    """`systemctl show UNIT -p ...` as the collector records it."""
    base = {"LoadState": "loaded", "ActiveState": "active", "SubState": "running",
            "Result": "success", "NRestarts": "0", "ExecMainPID": "4242",
            "ExecMainStartTimestamp": "Sun 2026-11-22 10:00:00 UTC"}
    text = "".join(f"{k}={v}\n" for k, v in {**base, **props}.items())
    return {"unit": "vllm@qwen7b.service", **record(text)}


def sockets(*pairs: tuple[str, int]) -> dict[str, Any]:
    return {"sockets": [{"address": a, "port": p} for a, p in pairs], "errors": []}


VLLM, OLLAMA = services(gpu_host())
UP = sockets(("0.0.0.0", 22), ("0.0.0.0", 8000), ("127.0.0.1", 11434))


def test_units_and_ports_come_from_the_plan_and_the_roles_unit_names() -> None:
    assert Service("qwen7b", "vllm@qwen7b.service", 8000, "0.0.0.0") == VLLM
    assert Service("qwen3b-ollama", "ollama.service", 11434, "127.0.0.1") == OLLAMA
    config = collector_config(gpu_host(), 25.0)
    assert config["units"] == ["vllm@qwen7b.service", "ollama.service"]
    assert config["envs"] == ["/opt/qwen-serve/env"]
    assert config["models"] == [{"name": "qwen7b", "dest": "/var/lib/qwen-serve/models/qwen7b"}]
    assert (config["marker"], config["gpu"], config["nvidia_smi"]) == (MARKER, True, "nvidia-smi")
    assert collector_config(cpu_host(), 25.0)["gpu"] is False
    # vLLM's argparse: the last --host wins, in either spelling.
    deployment = {**gpu_host().vars["vllm_deployments"][0]}
    deployment["args"] = [*deployment["args"], "--host=127.0.0.1"]
    [moved] = services(cpu_host(vllm_deployments=[deployment]))
    assert moved.bind == "127.0.0.1"


def test_a_running_unit_listening_where_planned_passes() -> None:
    state, listening = service_results(gpu_host(), VLLM, unit(), UP)
    assert state.passed and listening.passed
    assert ("vllm@qwen7b.service: LoadState=loaded ActiveState=active SubState=running "
            "Result=success NRestarts=0 MainPID=4242" in state.evidence)
    assert listening.evidence == "planned 0.0.0.0:8000: listening on 0.0.0.0"
    # Two restarts are not yet a loop.
    assert service_results(gpu_host(), VLLM, unit(NRestarts="2"), UP)[0].passed


def test_a_stopped_unit_and_its_closed_port() -> None:
    stopped = unit(ActiveState="inactive", SubState="dead", ExecMainPID="0")
    state, listening = service_results(gpu_host(), VLLM, stopped, sockets(("0.0.0.0", 22)))
    assert not state.passed and state.evidence.endswith(": not running")
    assert state.next_step == ("on gpu-01: journalctl -u vllm@qwen7b -n 200; then `systemctl "
                               "restart vllm@qwen7b.service` or rerun the services stage")
    assert not listening.passed
    assert listening.evidence == ("planned 0.0.0.0:8000: nothing listens on TCP port 8000 "
                                  "(listening: 22)")
    assert "vllm@qwen7b.service does not serve" in (listening.next_step or "")


@pytest.mark.parametrize("props", [
    {"NRestarts": "7"},
    {"ActiveState": "activating", "SubState": "auto-restart", "Result": "exit-code",
     "NRestarts": "2"},
])
def test_a_unit_restarting_in_a_loop(props: dict[str, str]) -> None:
    state = service_results(gpu_host(), VLLM, unit(**props), UP)[0]
    assert not state.passed and state.evidence.endswith(": restarting in a loop")
    assert state.next_step == ("it crashes and systemd starts it again: on gpu-01: "
                               "journalctl -u vllm@qwen7b -n 200")


def _verify_restart_check(role: str) -> str:
    """The condition on NRestarts in roles/<role>/tasks/verify.yml's assert."""
    tasks = yaml.safe_load((REPO / "roles" / role / "tasks" / "verify.yml").read_text())
    [condition] = [c for task in tasks for c in task.get("ansible.builtin.assert", {})
                   .get("that", []) if "NRestarts" in c]
    return str(condition)


@pytest.mark.parametrize(("role", "service", "state_var"), [
    ("vllm", VLLM, "item"), ("ollama", OLLAMA, "__ollama_unit_state")])
def test_the_probe_and_the_roles_verify_step_call_the_same_restarts_a_loop(
        role: str, service: Service, state_var: str) -> None:
    """One definition of "restarting in a loop": NRestarts above the role default
    <role>_max_restarts, which a host's vars override for both sides alike."""
    name = f"{role}_max_restarts"
    default = load_role_defaults().model_dump()[name]
    check = jinja2.Environment().compile_expression(_verify_restart_check(role))
    assert name in _verify_restart_check(role)
    for limit, host in ((default, gpu_host()),
                        (default + 3, gpu_host().model_copy(update={"vars": {
                            **gpu_host().vars, name: default + 3}}))):
        on_host = [bool(check(**{state_var: {"status": {"NRestarts": str(n)}}, name: limit}))
                   for n in range(limit + 3)]
        probe = [service_results(host, service, unit(NRestarts=str(n)), UP)[0].passed
                 for n in range(limit + 3)]
        assert on_host == probe == [n <= limit for n in range(limit + 3)]


def test_a_unit_systemd_gave_up_on() -> None:
    state = service_results(gpu_host(), VLLM, unit(ActiveState="failed", SubState="failed",
                                                   Result="start-limit-hit", NRestarts="5"),
                            UP)[0]
    assert not state.passed and "until systemd stopped restarting it" in state.evidence
    assert "`systemctl reset-failed vllm@qwen7b.service`" in (state.next_step or "")


def test_a_unit_not_installed_or_no_systemd() -> None:
    absent = service_results(gpu_host(), VLLM, unit(LoadState="not-found"), UP)[0]
    assert not absent.passed and "LoadState=not-found" in absent.evidence
    assert "rerun the services stage (`orchestrate up --only services`)" in (absent.next_step or "")
    said = "System has not been booted with systemd as init system (PID 1). Can't operate."
    no_systemd = {"unit": VLLM.unit, **record(rc=1, stderr=said)}
    state = service_results(gpu_host(), VLLM, no_systemd, UP)[0]
    assert not state.passed and state.evidence == f"systemctl show vllm@qwen7b.service: {said}"
    assert "systemd does not answer on gpu-01" in (state.next_step or "")


def test_listening_on_another_address_than_planned() -> None:
    logs = "logs"
    wide = listening_result(gpu_host(), OLLAMA, sockets(("0.0.0.0", 11434)), logs)
    assert not wide.passed
    assert wide.evidence == ("planned 127.0.0.1:11434: listening on 0.0.0.0 instead, on every "
                             "interface: reachable beyond what the plan allows")
    assert "differs from the plan (its bind address)" in (wide.next_step or "")
    narrow = listening_result(gpu_host(), VLLM, sockets(("127.0.0.1", 8000)), logs)
    assert not narrow.passed and "listening on 127.0.0.1 instead" in narrow.evidence
    assert listening_result(gpu_host(), VLLM, sockets(("::", 8000)), logs).passed
    blind = listening_result(gpu_host(), VLLM, {"sockets": [], "errors": ["/proc/net/tcp: x"]},
                             logs)
    assert not blind.passed and "cannot read the sockets: /proc/net/tcp: x" in blind.evidence


def test_listening_sockets_read_from_this_machines_proc() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        seen = hostcollect.listening()
    assert {"address": "127.0.0.1", "port": port} in seen["sockets"]
    try:
        six = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with six:
        port6 = six.getsockname()[1]
        assert {"address": "::1", "port": port6} in hostcollect.listening()["sockets"]


# ---------------------------------------------------------------- the collector, for real

TORCH_CHECK_STAND_IN = """#!/bin/sh
# Stand-in for roles/pytorch's torch-check (no torch on this machine): prints what the
# real one prints.
cat <<'EOF'
{info}
EOF
"""
SYSTEMCTL_STAND_IN = """#!/bin/sh
# Stand-in for systemctl (this machine has no systemd as PID 1): `show UNIT ...` answered
# as systemd answers for a running unit, and not-found for any other.
case "$2" in
  {unit}) cat <<'EOF'
{running}EOF
  ;;
  *) cat <<'EOF'
{absent}EOF
  ;;
esac
"""
NVIDIA_SMI_STAND_IN = """#!/bin/sh
# Stand-in for nvidia-smi on a host whose kernel module is not loaded: prints the real
# captured message and exits 9 as nvidia-smi does when the driver is not loaded.
cat '{fixture}'
exit 9
"""


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


class FakeHost:
    """A directory tree laid out like a provisioned host: the environment with torch-check,
    the weights, and stand-in commands on a PATH of their own."""

    def __init__(self, root: Path, info: dict[str, Any] | None = None) -> None:
        self.root = root
        self.env = root / "opt/qwen-serve/env"
        executable(self.env / "bin/torch-check", TORCH_CHECK_STAND_IN.format(
            info=json.dumps(info or torch_info("2.13.0+cpu", None, available=False))))
        self.bin = root / "usr/bin"
        executable(self.bin / "nvidia-smi", NVIDIA_SMI_STAND_IN.format(
            fixture=FIXTURES / "error_driver_comm__unknown__460.x.txt"))
        self.entry = local_model(root / "var/lib/qwen-serve/models/tiny-qwen2")
        self.path = f"{self.bin}:/usr/bin:/bin"

    def plan_vars(self, host: HostPlan, port: int) -> dict[str, Any]:
        """`host`'s variables pointed at this tree, its deployment on 127.0.0.1:`port`."""
        name = host.vars["vllm_deployments"][0]["name"]
        absent = unit(LoadState="not-found", ActiveState="inactive", SubState="dead",
                      ExecMainPID="0", ExecMainStartTimestamp="")
        executable(self.bin / "systemctl", SYSTEMCTL_STAND_IN.format(
            unit=f"vllm@{name}.service", running=unit()["stdout"], absent=absent["stdout"]))
        return {**host.vars, "python_env_path": str(self.env),
                "model_weights_models": [{**self.entry, "name": name}],
                "vllm_deployments": [{"name": name, "port": port,
                                      "args": ["--host", "127.0.0.1", "--port", str(port)]}],
                "ollama_models": []}


def host_python() -> str:
    # Debian's own python3 where there is one (the hosts' interpreter), else any python3.
    found = shutil.which("python3", path="/usr/bin:/bin") or shutil.which("python3")
    assert found, "python3 is needed on PATH"
    return found


def collect_locally(host: HostPlan, fake: FakeHost, deadline: float = 20.0) -> dict[str, Any]:
    # -I -S: no site-packages and no PYTHON* variables, so only the standard library.
    done = subprocess.run([host_python(), "-I", "-S", "-"], check=False, timeout=60,
                          input=collector_program(collector_config(host, deadline)),
                          capture_output=True, text=True, env={"PATH": fake.path})
    assert done.returncode == 0, done.stderr
    evidence: dict[str, Any] = json.loads(done.stdout)
    return evidence


def test_the_collector_runs_on_a_cpu_host_tree(tmp_path: Path) -> None:
    fake = FakeHost(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        base = cpu_host()
        host = base.model_copy(update={"vars": fake.plan_vars(base, port)})
        evidence = collect_locally(host, fake)
    assert evidence["gpu"] is None
    assert evidence["units"][0]["argv"][:3] == ["systemctl", "show", "vllm@tiny-qwen2.service"]
    results = interpret(host, evidence)
    assert {r.probe: r.status for r in results} == {
        "gpu": "skip", "gpu_health": "skip", "stack": "pass", "weights": "pass",
        "service": "pass", "listening": "pass"}, [r for r in results if not r.passed]
    assert by_probe(results)["listening"].evidence == (
        f"planned 127.0.0.1:{port}: listening on 127.0.0.1")


def test_the_collector_on_a_gpu_host_whose_driver_is_not_loaded(tmp_path: Path) -> None:
    fake = FakeHost(tmp_path, torch_info(available=False))
    base = gpu_host(gpu_check_nvidia_smi=str(fake.bin / "nvidia-smi"))
    # The port is closed again before the collector looks: nothing listens there.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    host = base.model_copy(update={"vars": fake.plan_vars(base, port)})
    evidence = collect_locally(host, fake)
    assert evidence["gpu"]["table"]["rc"] == 9 and "xml" not in evidence["gpu"]
    results = by_probe(interpret(host, evidence))
    assert not results["gpu"].passed and "driver_not_loaded" in results["gpu"].evidence
    assert results["gpu"].next_step == NEXT_STEPS["driver_not_loaded"]
    assert results["gpu_health"].status == "skip"
    assert not results["stack"].passed
    assert "torch.cuda.is_available() is False" in results["stack"].evidence
    assert results["weights"].passed and results["service"].passed
    assert not results["listening"].passed
    assert f"nothing listens on TCP port {port}" in results["listening"].evidence


def test_the_collector_stops_a_hanging_torch_check_at_its_deadline(tmp_path: Path) -> None:
    fake = FakeHost(tmp_path)
    executable(fake.env / "bin/torch-check",
               "#!/bin/sh\n# Stand-in for a torch-check stuck in CUDA set-up.\nexec sleep 60\n")
    base = cpu_host()
    host = base.model_copy(update={"vars": fake.plan_vars(base, 9)})
    started = time.monotonic()
    evidence = collect_locally(host, fake, deadline=3.0)
    assert time.monotonic() - started < 15
    result = by_probe(interpret(host, evidence))["stack"]
    assert not result.passed and "timed out after" in result.evidence
    assert "a hang in CUDA set-up points at the driver" in (result.next_step or "")


def test_the_collector_is_standard_library_python_3_9() -> None:
    source = Path(hostcollect.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported


# ---------------------------------------------------------------- SSH

class StandInSshd:
    """Stand-in for a host's sshd: paramiko's server side on 127.0.0.1, taking one public key
    for root and running each exec request with `sh -c` on this machine, its stdin from the
    channel, under the given PATH."""

    class _Server(paramiko.ServerInterface):
        def __init__(self, authorized: paramiko.PKey) -> None:
            self.authorized = authorized
            self.commands: dict[int, str] = {}
            self.asked = threading.Condition()

        def get_allowed_auths(self, username: str) -> str:
            return "publickey"

        def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
            ok = username == "root" and key.get_base64() == self.authorized.get_base64()
            return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

        def check_channel_request(self, kind: str, chanid: int) -> int:
            return (paramiko.OPEN_SUCCEEDED if kind == "session"
                    else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED)

        def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
            with self.asked:
                self.commands[channel.get_id()] = command.decode()
                self.asked.notify_all()
            return True

    def __init__(self, authorized: paramiko.PKey, path: str) -> None:
        self.authorized, self.path = authorized, path
        self.host_key = paramiko.ECDSAKey.generate()
        self.commands: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def known_hosts_line(self, key: paramiko.PKey | None = None) -> str:
        key = key or self.host_key
        return f"[127.0.0.1]:{self.port} {key.get_name()} {key.get_base64()}\n"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        # Every session of the connection, one after the other: Ansible's ssh keeps a
        # master connection (ControlPersist) that later runs open new sessions on.
        transport = paramiko.Transport(conn)
        transport.add_server_key(self.host_key)
        server = self._Server(self.authorized)
        try:
            transport.start_server(server=server)
            while (channel := transport.accept(30)) is not None:
                with server.asked:
                    if not server.asked.wait_for(
                            lambda: channel.get_id() in server.commands, 10):
                        return
                    command = server.commands[channel.get_id()]
                self.commands.append(command)
                program = bytearray()
                while chunk := channel.recv(1 << 16):
                    program += chunk
                done = subprocess.run(["sh", "-c", command], input=bytes(program),
                                      capture_output=True, env={"PATH": self.path},
                                      timeout=60, check=False)
                channel.sendall(done.stdout)
                channel.sendall_stderr(done.stderr)
                channel.send_exit_status(done.returncode)
                channel.close()
        except (paramiko.SSHException, OSError, EOFError):
            return
        finally:
            transport.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def ssh_host(tmp_path: Path) -> Iterator[tuple[HostPlan, StandInSshd]]:
    """sandbox-1 with the sandbox's own connection settings (root, its ed25519 key from
    sandbox.ensure_ssh_key, StrictHostKeyChecking=no), reached at a stand-in sshd in
    front of a FakeHost tree, with a vLLM port that listens."""
    key = ensure_ssh_key(tmp_path / "state")
    fake = FakeHost(tmp_path / "host")
    sshd = StandInSshd(paramiko.Ed25519Key.from_private_key_file(str(key)), fake.path)
    base = sandbox_plan(key).hosts[0]
    with socket.create_server(("127.0.0.1", 0)) as vllm:
        host = base.model_copy(update={
            "connection": {**base.connection, "ansible_port": sshd.port},
            "vars": fake.plan_vars(base, vllm.getsockname()[1])})
        yield host, sshd
    sshd.close()


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return int(server.getsockname()[1])


def test_a_dead_host_fails_ssh_while_the_live_one_answers(
        ssh_host: tuple[HostPlan, StandInSshd]) -> None:
    live, sshd = ssh_host
    port = closed_port()
    dead = live.model_copy(update={"name": "sandbox-2",
                                   "connection": {**live.connection, "ansible_port": port}})
    plan = sandbox_plan().model_copy(update={"hosts": [live, dead]})
    started = time.monotonic()
    results = probe_hosts(plan, timeout=20)
    assert time.monotonic() - started < 20
    # One command through Ansible's pipelining: the module, and in it the collector's
    # program, go over stdin, never argv.
    assert sshd.commands == ["/bin/sh -c 'python3 && sleep 0'"]
    assert {r.probe: r.status for r in results if r.host == "sandbox-1"} == {
        "gpu": "skip", "gpu_health": "skip", "stack": "pass", "weights": "pass",
        "service": "pass", "listening": "pass"}
    [failed] = [r for r in results if r.host == "sandbox-2"]
    assert (failed.probe, failed.status) == ("ssh", "fail")
    assert failed.evidence == (f"ssh root@127.0.0.1:{port}: ssh: connect to host 127.0.0.1 "
                               f"port {port}: Connection refused")
    assert failed.next_step == (
        f"check that sandbox-2 is up and sshd answers there: `ssh -p {port} root@127.0.0.1 "
        "true` from this machine; fix the fleet's address, ssh_port, ssh_user or ssh_key")


SILENT_HOST = """
import socket, sys
from orchestrator.verify.hostprobe import CollectError, run_collector
from orchestrator.plan.planner import HostPlan
silent = socket.create_server(("127.0.0.1", 0))
host = HostPlan(name="sandbox-1", group="sandbox", profile="cpu", probes=[], reasons=[],
                connection={"ansible_host": "127.0.0.1", "ansible_user": "root",
                            "ansible_port": silent.getsockname()[1]},
                vars={"ansible_ssh_common_args": "-o StrictHostKeyChecking=no"})
try:
    run_collector(host, timeout=1.0)
except CollectError as exc:
    print(exc)
    print(exc.next_step)
"""


def test_a_host_that_never_answers_times_out_without_a_traceback() -> None:
    # Run as its own program, so that anything printed past the error is seen (pytest
    # would capture it here). The listener is accepted by the kernel and never served: no
    # SSH banner ever comes.
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SILENT_HOST], capture_output=True, text=True,
                          timeout=60, check=False, cwd=REPO)
    assert time.monotonic() - started < 15
    assert done.returncode == 0 and done.stderr == ""
    said, step = done.stdout.splitlines()
    assert said.startswith("ssh root@127.0.0.1:") and said.endswith(
        ": no complete answer within 1 s")
    assert step.startswith("check that sandbox-1 is up and sshd answers there")


def with_ssh_args(host: HostPlan, args: str) -> HostPlan:
    return host.model_copy(update={"vars": {**host.vars, "ansible_ssh_common_args": args}})


def test_host_keys_checked_against_known_hosts(ssh_host: tuple[HostPlan, StandInSshd],
                                               tmp_path: Path) -> None:
    live, sshd = ssh_host
    known = tmp_path / "known_hosts"
    known.write_text("")
    strict = with_ssh_args(live, f"-o UserKnownHostsFile={known}")
    with pytest.raises(CollectError) as unknown:
        run_collector(strict, timeout=20)
    assert str(unknown.value).endswith(": Host key verification failed.")
    assert "host key is not known here" in unknown.value.next_step
    # accept-new takes a host it does not know yet.
    assert "listening" in run_collector(
        with_ssh_args(live, f"-o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={known}"),
        timeout=20)
    known.write_text(sshd.known_hosts_line())
    assert "listening" in run_collector(strict, timeout=20)
    # A host whose key changed: a fresh sshd, as ssh's master connection to the first one
    # (ControlPersist) would be reused without a look at its key.
    for args in (f"-o UserKnownHostsFile={known}",
                 f"-o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={known}"):
        other = StandInSshd(sshd.authorized, sshd.path)
        known.write_text(other.known_hosts_line(paramiko.ECDSAKey.generate()))
        moved = live.model_copy(update={"connection": {**live.connection,
                                                       "ansible_port": other.port}})
        with pytest.raises(CollectError) as changed:
            run_collector(with_ssh_args(moved, args), timeout=20)
        other.close()
        assert "host key changed" in changed.value.next_step


# Stand-in for the route to a host behind a bastion: ssh's ProxyCommand, piping to the
# address it is given, and leaving a mark that it was the way in.
PROXY = """
import socket, sys, threading
from pathlib import Path
Path(sys.argv[3]).write_text(f"{sys.argv[1]}:{sys.argv[2]}")
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def upstream():
    while data := sys.stdin.buffer.read1(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := conn.recv(65536):
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
"""


def test_the_probe_reaches_a_host_as_ssh_config_says(ssh_host: tuple[HostPlan, StandInSshd],
                                                     tmp_path: Path) -> None:
    # The fleet names the host by an alias only the ssh_config file knows, and that file
    # routes the connection through a proxy command, as a bastion's ProxyJump does: the
    # probe connects as Ansible does, not by its own reading of the inventory.
    live, sshd = ssh_host
    proxy, mark = tmp_path / "proxy.py", tmp_path / "proxied"
    proxy.write_text(PROXY)
    config = tmp_path / "ssh_config"
    config.write_text("Host behind-the-bastion\n  HostName 127.0.0.1\n"
                      f"  ProxyCommand {sys.executable} {proxy} %h %p {mark}\n")
    behind = live.model_copy(update={
        "connection": {**live.connection, "ansible_host": "behind-the-bastion"},
        "vars": {**live.vars, "ansible_ssh_common_args":
                 f"-F {config} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"}})
    assert "listening" in run_collector(behind, timeout=20)
    assert mark.read_text() == f"127.0.0.1:{sshd.port}"


def test_a_refused_key_and_a_missing_python(ssh_host: tuple[HostPlan, StandInSshd],
                                            tmp_path: Path) -> None:
    live, _ = ssh_host
    other = ensure_ssh_key(tmp_path / "other")
    stranger = live.model_copy(update={"connection": {
        **live.connection, "ansible_ssh_private_key_file": str(other)}})
    with pytest.raises(CollectError) as refused:
        run_collector(stranger, timeout=20)
    assert refused.value.next_step.startswith(f"the host refused the key: check ssh_key ({other})")
    nowhere = live.model_copy(update={"vars": {**live.vars,
                                               "ansible_python_interpreter": "/nowhere/python3"}})
    with pytest.raises(CollectError) as missing:
        run_collector(nowhere, timeout=20)
    assert "/nowhere/python3 not found" in str(missing.value)
    assert "install python3 on sandbox-1" in missing.value.next_step


# ---------------------------------------------------------------- in parallel, merged

def empty_evidence() -> dict[str, Any]:
    """The collector's answer from a host where it found nothing of the plan."""
    return {"gpu": None, "envs": [], "models": [], "units": [],
            "listening": {"sockets": [], "errors": []}}


def test_a_hanging_host_is_reported_without_holding_up_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostprobe, "SSH_GRACE", 0.5)
    plan = sandbox_plan()
    live, dead = plan.hosts
    hanging = live.model_copy(update={"name": "sandbox-3"})
    plan = plan.model_copy(update={"hosts": [live, dead, hanging]})
    release = threading.Event()

    def collect(host: HostPlan, timeout: float) -> dict[str, Any]:
        if host.name == dead.name:
            raise CollectError("connection refused", "start sshd on it")
        if host.name == hanging.name:
            release.wait(60)
        return empty_evidence()

    started = time.monotonic()
    try:
        results = probe_hosts(plan, timeout=0.5, collect=collect)
    finally:
        release.set()
    assert time.monotonic() - started < 5
    ssh = {r.host: r for r in results if r.probe == "ssh"}
    assert set(ssh) == {dead.name, hanging.name}
    assert ssh[dead.name].evidence == "connection refused"
    assert ssh[dead.name].next_step == "start sshd on it"
    assert ssh[hanging.name].evidence.startswith("no answer within 0 s")
    assert "sandbox-3 is up and its address resolves" in (ssh[hanging.name].next_step or "")
    assert [r.probe for r in results if r.host == live.name] == [
        "gpu", "gpu_health", "weights", "service", "listening"]


def test_an_answer_that_is_not_the_collectors_is_reported() -> None:
    [only] = probe_hosts(sandbox_plan().model_copy(update={"hosts": sandbox_plan().hosts[:1]}),
                         collect=lambda host, timeout: {"unexpected": True})
    assert (only.probe, only.status) == ("ssh", "fail")
    assert "not understood: KeyError" in only.evidence
    assert "ansible_python_interpreter" in (only.next_step or "")


def test_probe_all_merges_ssh_and_http_probes_per_host() -> None:
    plan = sandbox_plan()
    port = closed_port()
    hosts = [h.model_copy(update={"probes": [t.model_copy(update={
        "base_url": f"http://127.0.0.1:{port}"}) for t in h.probes]}) for h in plan.hosts]
    plan = plan.model_copy(update={"hosts": hosts})
    report = probe_all(plan, http_timeout=5, collect=lambda host, timeout: empty_evidence())
    assert report.group == "sandbox"
    assert [(r.host, r.probe) for r in report.results] == [
        (h, p) for h in ("sandbox-1", "sandbox-2")
        for p in ("gpu", "gpu_health", "weights", "service", "listening", "health")]
    health = [r for r in report.results if r.probe == "health"]
    assert all(not r.passed and "ConnectError" in r.evidence for r in health)
    assert report.failed_hosts() == ["sandbox-1", "sandbox-2"]


def test_the_probe_reads_the_operators_inventory_first(ssh_host: tuple[HostPlan, StandInSshd],
                                                       tmp_path: Path) -> None:
    # The way in (an ssh_config routing through a bastion's stand-in proxy) is only in the
    # operator's group_vars, beside the `-i` inventory, as the stages read it; the
    # inventory's other host is left alone (it has no address at all).
    live, sshd = ssh_host
    proxy, mark = tmp_path / "proxy.py", tmp_path / "proxied"
    proxy.write_text(PROXY)
    config = tmp_path / "ssh_config"
    config.write_text("Host behind-the-bastion\n  HostName 127.0.0.1\n"
                      f"  ProxyCommand {sys.executable} {proxy} %h %p {mark}\n")
    operator = tmp_path / "operator"
    (operator / "group_vars").mkdir(parents=True)
    (operator / "hosts.yml").write_text(yaml.safe_dump({"all": {"hosts": {
        live.name: {"ansible_host": "behind-the-bastion"},
        "bystander": {"ansible_host": "no-such-host.invalid"}}}}))
    (operator / "group_vars" / "all.yml").write_text(yaml.safe_dump({
        "ansible_ssh_common_args": f"-F {config} -o StrictHostKeyChecking=no "
                                   "-o UserKnownHostsFile=/dev/null"}))
    behind = live.model_copy(update={
        "connection": {**live.connection, "ansible_host": "behind-the-bastion"},
        "vars": {k: v for k, v in live.vars.items() if k != "ansible_ssh_common_args"}})
    with pytest.raises(CollectError):
        run_collector(behind, timeout=20)
    assert "listening" in run_collector(behind, timeout=20,
                                        operator_inventory=operator / "hosts.yml")
    assert mark.read_text() == f"127.0.0.1:{sshd.port}"
