"""The host_metrics role's collector (roles/host_metrics/files/host_metrics.py) against real
saved nvidia-smi outputs.

No GPU here: every GPU reading below REPLAYS a saved `nvidia-smi -q -x` capture, a STAND-IN
for a GPU host (tests/data/nvidia-smi/SOURCES.md says where each one was captured); the
end-to-end cases put a stand-in `nvidia-smi` that prints the capture on PATH and run the
program as the timer does. The kernel log with Xid lines is written from NVIDIA's Xid
documentation (tests/data/host_metrics/SOURCES.md). Ollama is a STAND-IN HTTP server
answering /api/version, /api/ps and /api/tags as Ollama does.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

REPO = Path(__file__).resolve().parents[2]
PROGRAM = REPO / "roles" / "host_metrics" / "files" / "host_metrics.py"
SMI = REPO / "tests" / "data" / "nvidia-smi"
DATA = REPO / "tests" / "data" / "host_metrics"
P100 = SMI / "xml__Tesla-P100-PCIE-16GB__510.47.03.txt"
V100S = SMI / "xml__8x-V100S-PCIE-32GB__460.73.01.txt"
A5000 = SMI / "xml__2x-RTX-A5000__590.44.01.txt"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("host_metrics", PROGRAM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["host_metrics"] = module
    spec.loader.exec_module(module)
    return module


hm = load()

# One sample line of the text exposition format: name, optional {labels}, a number.
SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_]\w*="(?:[^"\\\n]|\\.)*",?)*)\})? '
                    r"(-?[0-9.e+]+)")
LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by metric name; fails on any line the exposition format does not allow, and
    on a family without HELP and TYPE before its samples."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    announced: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            kind, name = line.split(" ")[1:3]
            assert kind in ("HELP", "TYPE"), line
            announced.setdefault(name, set()).add(kind)
            continue
        match = SAMPLE.fullmatch(line)
        assert match, f"not an exposition-format line: {line!r}"
        name = match.group(1)
        assert announced.get(name) == {"HELP", "TYPE"}, f"{name} has no HELP/TYPE before it"
        labels = dict(LABEL.findall(match.group(2) or ""))
        out.setdefault(name, []).append((labels, float(match.group(3))))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], metric: str,
          **labels: str) -> float:
    found = [v for got, v in samples[metric] if all(got.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (metric, labels, samples.get(metric))
    return found[0]


def gpu_text(capture: Path, xids: dict[str, int] | None = None) -> str:
    report = hm.parse_xml(capture.read_text())
    return str(hm.render(hm.gpu_families(report, xids if xids is not None else {}, 100.0, 100.25)))


def test_p100_capture_with_ecc_errors_replayed_as_a_stand_in() -> None:
    samples = parse(gpu_text(P100))
    ids = {"gpu": "0", "uuid": "GPU-d3da8716-eaab-75db-efc1-60e88e1cd55e",
           "name": "Tesla P100-PCIE-16GB"}
    assert value(samples, "orchestrate_gpu_driver_loaded") == 1
    assert "orchestrate_gpu_collector_error" not in samples
    assert value(samples, "orchestrate_gpu_info", **ids, driver_version="510.47.03",
                 cuda_version="11.6") == 1
    assert value(samples, "orchestrate_gpu_memory_total_bytes", **ids) == 16384 * 2**20
    assert value(samples, "orchestrate_gpu_memory_used_bytes", **ids) == 0
    assert value(samples, "orchestrate_gpu_temperature_celsius", **ids) == 38
    assert value(samples, "orchestrate_gpu_power_watts", **ids) == 26.16
    assert value(samples, "orchestrate_gpu_power_limit_watts", **ids) == 250
    assert value(samples, "orchestrate_gpu_utilization_ratio", **ids) == 0
    assert value(samples, "orchestrate_gpu_persistence_mode", **ids) == 0
    # The capture's aggregate single-bit (corrected) count is 3; everything else 0.
    assert value(samples, "orchestrate_gpu_ecc_errors", gpu="0", scope="aggregate",
                 type="corrected") == 3
    assert value(samples, "orchestrate_gpu_ecc_errors", gpu="0", scope="aggregate",
                 type="uncorrected") == 0
    assert value(samples, "orchestrate_gpu_ecc_errors", gpu="0", scope="volatile",
                 type="corrected") == 0
    assert value(samples, "orchestrate_gpu_retired_pages", gpu="0", cause="single_bit_ecc") == 0
    assert value(samples, "orchestrate_gpu_retired_pages_pending", gpu="0") == 0
    # Drivers before 535 call them clocks_throttle_reasons; the same reasons come out.
    assert {labels["reason"] for labels, _ in samples["orchestrate_gpu_clocks_event_active"]} \
        == set(hm.CLOCK_REASONS)
    assert value(samples, "orchestrate_gpu_clocks_event_active", gpu="0", reason="gpu_idle") == 1
    assert value(samples, "orchestrate_gpu_clocks_event_active", gpu="0",
                 reason="display_clock_setting") == 0
    # remapped_rows is N/A on Pascal: no sample rather than a made-up 0.
    assert "orchestrate_gpu_remapped_rows" not in samples


def test_v100s_capture_with_power_cap_throttling_replayed_as_a_stand_in() -> None:
    samples = parse(gpu_text(V100S))
    capping = {labels["gpu"] for labels, v in samples["orchestrate_gpu_clocks_event_active"]
               if labels["reason"] == "sw_power_cap" and v == 1}
    assert capping == {"3", "6"}
    assert len(samples["orchestrate_gpu_info"]) == 8
    assert [labels["gpu"] for labels, _ in samples["orchestrate_gpu_info"]] == \
        [str(i) for i in range(8)]
    assert {labels["driver_version"] for labels, _ in samples["orchestrate_gpu_info"]} == \
        {"460.73.01"}


def test_a5000_capture_new_layout_replayed_as_a_stand_in() -> None:
    samples = parse(gpu_text(A5000))
    assert value(samples, "orchestrate_gpu_power_watts", gpu="0") == 6.52  # instant_power_draw
    assert value(samples, "orchestrate_gpu_power_limit_watts", gpu="1") == 230
    assert value(samples, "orchestrate_gpu_memory_used_bytes", gpu="0") == 22437 * 2**20
    assert value(samples, "orchestrate_gpu_persistence_mode", gpu="1") == 1
    assert value(samples, "orchestrate_gpu_remapped_rows", gpu="0", kind="correctable") == 0
    assert value(samples, "orchestrate_gpu_remapped_rows", gpu="0", kind="pending") == 0
    # Every ECC count of this GeForce-class board is N/A: none exported.
    assert "orchestrate_gpu_ecc_errors" not in samples
    assert "orchestrate_gpu_retired_pages" not in samples


@pytest.mark.parametrize(("capture", "reason", "loaded"), [
    ("error_driver_comm__unknown__460.x.txt", "driver_not_loaded", 0),
    ("error_version_mismatch__GT-640__470.txt", "version_mismatch", 0),
    ("error_version_mismatch_nvml-line__unknown__570.124.txt", "version_mismatch", 0),
    ("error_no_devices__RTX-5090__unknown.txt", "no_devices", 1),
])
def test_a_driver_that_does_not_answer_is_a_metric(capture: str, reason: str,
                                                      loaded: int) -> None:
    samples = parse(gpu_text(SMI / capture))
    assert value(samples, "orchestrate_gpu_driver_loaded") == loaded
    assert samples["orchestrate_gpu_collector_error"] == [({"reason": reason}, 1)]
    assert "orchestrate_gpu_info" not in samples
    assert value(samples, "orchestrate_gpu_collector_duration_seconds") == 0.25


def test_xid_codes_counted_from_the_kernel_log() -> None:
    xids = hm.count_xids((DATA / "kernel-xid.log").read_text())
    assert xids == {"13": 2, "48": 1, "63": 1, "79": 1}
    samples = parse(gpu_text(P100, xids))
    assert samples["orchestrate_gpu_xid_errors_total"] == [
        ({"xid": "13"}, 2), ({"xid": "48"}, 1), ({"xid": "63"}, 1), ({"xid": "79"}, 1)]
    assert "# TYPE orchestrate_gpu_xid_errors_total counter" in gpu_text(P100, xids)


def test_an_unreadable_kernel_log_is_a_collector_error() -> None:
    report = hm.parse_xml(P100.read_text())
    samples = parse(hm.render(hm.gpu_families(report, None, 0.0, 1.0)))
    assert samples["orchestrate_gpu_collector_error"] == [({"reason": "kernel_log_unreadable"}, 1)]
    assert "orchestrate_gpu_xid_errors_total" not in samples


def test_label_values_are_escaped() -> None:
    family = hm.Family("m", "help")
    family.add(1, name='a "quoted"\\name\nline')
    assert hm.render([family]).splitlines()[-1] == 'm{name="a \\"quoted\\"\\\\name\\nline"} 1'


def run_program(tmp_path: Path, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PROGRAM), "--textfile-dir", str(tmp_path), *args],
                          env={"PATH": path}, capture_output=True, text=True, timeout=60,
                          check=False)


def test_the_program_replays_a_stand_in_nvidia_smi_and_writes_the_file(tmp_path: Path) -> None:
    # The STAND-IN nvidia-smi prints the saved capture for -q -x, as the real one would.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    standin = bin_dir / "nvidia-smi"
    standin.write_text(f'#!/bin/sh\n[ "$1 $2" = "-q -x" ] || exit 2\nexec cat {V100S}\n')
    standin.chmod(0o755)
    out = tmp_path / "textfile"
    out.mkdir()
    proc = run_program(out, f"{bin_dir}:/usr/bin:/bin", "--gpu", "--no-nvml", "--no-kernel-log")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["orchestrate_gpu.prom"]  # no temporary left
    written = out / "orchestrate_gpu.prom"
    assert written.stat().st_mode & 0o777 == 0o644  # node_exporter's user reads it
    samples = parse(written.read_text())
    assert len(samples["orchestrate_gpu_info"]) == 8
    assert value(samples, "orchestrate_gpu_collector_last_run_timestamp_seconds") > 1.7e9


def test_the_program_without_nvidia_smi_reports_no_driver(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = run_program(tmp_path, str(empty), "--gpu", "--no-nvml", "--no-kernel-log")
    assert proc.returncode == 0, proc.stderr
    samples = parse((tmp_path / "orchestrate_gpu.prom").read_text())
    assert value(samples, "orchestrate_gpu_driver_loaded") == 0
    assert samples["orchestrate_gpu_collector_error"] == [({"reason": "not_installed"}, 1)]


class OllamaStandIn(http.server.BaseHTTPRequestHandler):
    """A STAND-IN Ollama: the three endpoints the collector reads, with Ollama's shapes."""

    answers: ClassVar[dict[str, Any]] = {
        "/api/version": {"version": "0.32.7"},
        "/api/ps": {"models": [{"name": "qwen2.5:0.5b", "model": "qwen2.5:0.5b",
                                "size_vram": 0}]},
        "/api/tags": {"models": [{"name": "qwen2.5:0.5b"}, {"name": "qwen2.5:7b"}]},
    }

    def do_GET(self) -> None:
        body = json.dumps(self.answers[self.path]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def ollama() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OllamaStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_ollama_models_and_version_from_a_stand_in_server(tmp_path: Path, ollama: str) -> None:
    proc = run_program(tmp_path, "/usr/bin:/bin", "--ollama-url", ollama + "/")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "orchestrate_gpu.prom").exists()  # --gpu not given
    samples = parse((tmp_path / "orchestrate_ollama.prom").read_text())
    assert value(samples, "orchestrate_ollama_up") == 1
    assert samples["orchestrate_ollama_info"] == [({"version": "0.32.7"}, 1)]
    assert samples["orchestrate_ollama_model_loaded"] == [({"model": "qwen2.5:0.5b"}, 1)]
    assert samples["orchestrate_ollama_model_available"] == [
        ({"model": "qwen2.5:0.5b"}, 1), ({"model": "qwen2.5:7b"}, 1)]


def test_ollama_down_is_up_zero() -> None:
    # A port just released: connections are refused, as when ollama.service is stopped.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    samples = parse(hm.render(hm.ollama_families(f"http://127.0.0.1:{port}")))
    assert samples == {"orchestrate_ollama_up": [({}, 0)]}


class NvmlStandIn:
    """A STAND-IN for pynvml (nvidia-ml-py) on one GPU: the calls read_nvml makes, with
    NVML's units (mW, bytes) and bit masks; power limits and remapped rows "not supported"
    (NVMLError), as on a board without them."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0
    NVML_VOLATILE_ECC, NVML_AGGREGATE_ECC = 0, 1
    NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 0, 1
    NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = 0
    NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1

    def __init__(self) -> None:
        self.shut_down = False

    # pynvml's names.
    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: self.shut_down = True
    def nvmlSystemGetDriverVersion(self) -> str: return "550.127.05"
    def nvmlSystemGetCudaDriverVersion(self) -> int: return 12040
    def nvmlDeviceGetCount(self) -> int: return 1
    def nvmlDeviceGetHandleByIndex(self, index: int) -> int: return index
    def nvmlDeviceGetUUID(self, h: int) -> bytes: return b"GPU-1"
    def nvmlDeviceGetName(self, h: int) -> str: return "NVIDIA A10"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return type("Rates", (), {"gpu": 87, "memory": 40})()

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return type("Memory", (), {"used": 3 * 2**30, "total": 24 * 2**30})()

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int: return 71
    def nvmlDeviceGetPowerUsage(self, h: int) -> int: return 148250

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetPersistenceMode(self, h: int) -> int: return 1

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        return 0x4 | 0x40  # SwPowerCap | HwThermalSlowdown

    def nvmlDeviceGetTotalEccErrors(self, h: int, error: int, counter: int) -> int:
        return 5 if (error, counter) == (0, 1) else 0

    def nvmlDeviceGetRetiredPages(self, h: int, cause: int) -> list[int]:
        return [0x1000, 0x2000] if cause == 1 else []

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: int) -> int: return 0

    def nvmlDeviceGetRemappedRows(self, h: int) -> tuple[int, int, int, int]:
        raise self.NVMLError("Not Supported")


def test_nvml_readings_through_a_stand_in_pynvml() -> None:
    nvml = NvmlStandIn()
    samples = parse(hm.render(hm.gpu_families(hm.read_nvml(nvml), {}, 0.0, 0.5)))
    assert nvml.shut_down
    assert samples["orchestrate_gpu_info"] == [(
        {"gpu": "0", "uuid": "GPU-1", "name": "NVIDIA A10", "driver_version": "550.127.05",
         "cuda_version": "12.4"}, 1)]
    assert value(samples, "orchestrate_gpu_utilization_ratio", gpu="0") == 0.87
    assert value(samples, "orchestrate_gpu_memory_used_bytes", gpu="0") == 3 * 2**30
    assert value(samples, "orchestrate_gpu_power_watts", gpu="0") == 148.25
    assert "orchestrate_gpu_power_limit_watts" not in samples  # NVMLError: not supported
    assert "orchestrate_gpu_remapped_rows" not in samples
    active = {labels["reason"] for labels, v in samples["orchestrate_gpu_clocks_event_active"]
              if v == 1}
    assert active == {"sw_power_cap", "hw_thermal_slowdown"}
    assert value(samples, "orchestrate_gpu_ecc_errors", scope="aggregate", type="corrected") == 5
    assert value(samples, "orchestrate_gpu_retired_pages", cause="double_bit_ecc") == 2
    assert value(samples, "orchestrate_gpu_persistence_mode", gpu="0") == 1


def standin(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / name).chmod(0o755)


def test_xids_read_through_a_stand_in_journalctl(tmp_path: Path) -> None:
    # STAND-INs: nvidia-smi replays the P100 capture; journalctl prints the Xid excerpt for
    # `-k -b` (this boot's kernel messages), as the real one prints them with -o cat.
    bin_dir = tmp_path / "bin"
    standin(bin_dir, "nvidia-smi", f"exec cat {P100}")
    standin(bin_dir, "journalctl",
            f'[ "$1 $2" = "-k -b" ] || exit 2\nexec cat {DATA / "kernel-xid.log"}')
    proc = run_program(tmp_path, f"{bin_dir}:/usr/bin:/bin", "--gpu", "--no-nvml")
    assert proc.returncode == 0, proc.stderr
    samples = parse((tmp_path / "orchestrate_gpu.prom").read_text())
    assert value(samples, "orchestrate_gpu_xid_errors_total", xid="79") == 1
    assert value(samples, "orchestrate_gpu_xid_errors_total", xid="13") == 2
    assert "orchestrate_gpu_collector_error" not in samples


def test_a_kernel_log_nobody_can_read(tmp_path: Path) -> None:
    # STAND-INs refusing as journalctl and dmesg do without the rights to read the log.
    bin_dir = tmp_path / "bin"
    standin(bin_dir, "nvidia-smi", f"exec cat {P100}")
    standin(bin_dir, "journalctl", "echo 'No journal files were opened due to insufficient "
                                   "permissions.' >&2; exit 1")
    standin(bin_dir, "dmesg",
            "echo 'dmesg: read kernel buffer failed: Operation not permitted' >&2; exit 1")
    proc = run_program(tmp_path, str(bin_dir) + ":/bin", "--gpu", "--no-nvml")
    assert proc.returncode == 0, proc.stderr
    samples = parse((tmp_path / "orchestrate_gpu.prom").read_text())
    assert samples["orchestrate_gpu_collector_error"] == [({"reason": "kernel_log_unreadable"}, 1)]
    assert value(samples, "orchestrate_gpu_driver_loaded") == 1


APT_CANDIDATE = """datacenter-gpu-manager-exporter:
  Installed: (none)
  Candidate: 4.8.2-1
  Version table:
     4.8.2-1 600
        600 https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2404/x86_64  Packages
"""
APT_NONE = """datacenter-gpu-manager-exporter:
  Installed: (none)
  Candidate: (none)
  Version table:
"""


@pytest.mark.parametrize(("policy", "available"), [(APT_CANDIDATE, True), (APT_NONE, False),
                                                   ("", False)])
def test_dcgm_exporter_lookup_in_check_mode(tmp_path: Path, policy: str, available: bool) -> None:
    """The role's DCGM look-up (tasks/dcgm.yml) in check mode on this machine, with a
    STAND-IN apt-cache printing what `apt-cache policy` prints for a package NVIDIA's CUDA
    repository carries, one no source carries, and an unknown name (nothing). No driver is
    loaded here, so `auto` installs nothing either way; the look-up's verdict is checked."""
    bin_dir = tmp_path / "bin"
    (tmp_path / "policy.txt").write_text(policy)
    standin(bin_dir, "apt-cache",
            f'[ "$1" = policy ] || exit 2\nexec cat {tmp_path / "policy.txt"}')
    playbook = [{
        "name": "DCGM look-up", "hosts": "all", "gather_facts": False,
        "environment": {"PATH": f"{bin_dir}:/usr/bin:/bin"},
        "tasks": [
            {"name": "Take Debian's facts", "given_facts": {"facts": {"os_family": "Debian"}}},
            {"name": "Run the look-up", "ansible.builtin.include_role": {
                "name": "host_metrics", "tasks_from": "dcgm.yml"}}]}]
    (tmp_path / "play.yml").write_text(json.dumps(playbook))
    (tmp_path / "inventory.json").write_text(json.dumps({"all": {"hosts": {"here": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))
    bin_ansible = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bin_ansible / "ansible-playbook"), "--check", "-i", str(tmp_path / "inventory.json"),
         str(tmp_path / "play.yml")],
        env={"PATH": f"{bin_ansible}:/usr/bin:/bin", "HOME": str(tmp_path),
             "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_STDOUT_CALLBACK": "json",
             "ANSIBLE_LIBRARY": str(REPO / "tests" / "data" / "library"),
             "ANSIBLE_LOCAL_TEMP": str(tmp_path / "local")},
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    report = json.loads(proc.stdout)
    tasks = {t["task"]["name"].split(" : ", 1)[-1]: t["hosts"]["here"]
             for t in report["plays"][0]["tasks"]}
    assert report["stats"]["here"]["failures"] == 0, proc.stdout[-2000:]
    decided = tasks["Decide whether the DCGM exporter runs here"]["ansible_facts"]
    assert decided["__host_metrics_dcgm_available"] is available
    assert decided["__host_metrics_dcgm"] is False  # no /proc/driver/nvidia here
    assert tasks["Install the DCGM exporter package"].get("skipped") is True
