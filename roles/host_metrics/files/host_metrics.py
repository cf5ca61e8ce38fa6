#!/usr/bin/env python3
"""orchestrate host metrics: GPU and Ollama readings as node_exporter textfile metrics.

Run by orchestrate-host-metrics.timer (roles/host_metrics). Writes, each atomically
(a temporary file in the same directory, then rename, so node_exporter never reads half
a file):

  <textfile-dir>/orchestrate_gpu.prom     NVML (nvidia-ml-py) when importable, else
                                          `nvidia-smi -q -x`; Xid errors from the kernel log
  <textfile-dir>/orchestrate_ollama.prom  Ollama's /api/version, /api/ps and /api/tags

Standard library only: it runs on the host's python3 (or the planned env's, which has
pynvml). The metric names are documented in docs/metrics.md and the role's README.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

GPU_FILE = "orchestrate_gpu.prom"
OLLAMA_FILE = "orchestrate_ollama.prom"

# The clock event (throttle) reasons, in nvml.h's bit order (nvmlClocksEventReason*:
# GpuIdle 0x1 ... DisplayClockSetting 0x100); nvidia-smi's XML spells the last one
# display_clocks_setting.
CLOCK_REASONS = (
    "gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
    "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown",
    "display_clock_setting",
)
_XML_REASON = {"display_clocks_setting": "display_clock_setting"}

# Whole-output failures of nvidia-smi (the same as orchestrator/facts/nvidia_smi.py's):
# the reason label of orchestrate_gpu_collector_error, and whether the driver answered.
_FATAL: list[tuple[str, bool, re.Pattern[str]]] = [
    ("driver_not_loaded", False, re.compile(
        r"couldn't communicate with the NVIDIA driver|NVML: Driver Not Loaded", re.I)),
    ("version_mismatch", False, re.compile(r"Driver/library version mismatch", re.I)),
    ("no_devices", True, re.compile(r"No devices were found", re.I)),
]

# "NVRM: Xid (PCI:0000:3b:00): 79, pid=..., GPU has fallen off the bus." (NVIDIA's Xid
# documentation, "Xid messages"); older drivers print "NVRM: Xid (0000:3b:00): 79, ...".
XID = re.compile(r"NVRM: Xid \((?:PCI:)?[0-9A-Fa-f:.]+\): (\d+),")

NVIDIA_SMI_TIMEOUT_S = 20
HTTP_TIMEOUT_S = 5


# ---------------------------------------------------------------- exposition format

@dataclass
class Family:
    name: str
    help: str
    type: str = "gauge"
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float | None, **labels: str) -> None:
        # A reading the device does not report (N/A) is left out, never written as 0.
        if value is not None:
            self.samples.append((labels, float(value)))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def render(families: Iterable[Family]) -> str:
    """Prometheus text exposition format, HELP and TYPE before each family's samples; a
    family without samples is left out (node_exporter's textfile collector takes none)."""
    lines: list[str] = []
    for family in families:
        if not family.samples:
            continue
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for labels, value in family.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{family.name}{{{text}}} {_number(value)}" if text
                         else f"{family.name} {_number(value)}")
    return "\n".join(lines) + "\n"


def write_atomically(directory: str, name: str, text: str) -> None:
    # The temporary name does not end in .prom: node_exporter reads only *.prom files.
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------- GPU readings

@dataclass
class Gpu:
    index: int
    uuid: str
    name: str
    utilization_ratio: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    persistence_mode: float | None = None
    clocks_event: dict[str, bool] = field(default_factory=dict)
    # (scope, type) -> count: ("volatile"|"aggregate", "corrected"|"uncorrected")
    ecc_errors: dict[tuple[str, str], float] = field(default_factory=dict)
    retired_pages: dict[str, float] = field(default_factory=dict)
    retired_pages_pending: float | None = None
    remapped_rows: dict[str, float] = field(default_factory=dict)


@dataclass
class GpuReport:
    driver_loaded: bool
    driver_version: str = ""
    cuda_version: str = ""
    gpus: list[Gpu] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _text(node: ET.Element | None, path: str) -> str | None:
    value = node.findtext(path) if node is not None else None
    text = (value or "").strip()
    return None if text in ("", "N/A", "[N/A]", "[Not Supported]", "Unknown Error") else text


def _quantity(node: ET.Element | None, *paths: str) -> float | None:
    """The first of `paths` holding a number ("81559 MiB", "26.16 W", "38 C", "7 %")."""
    for path in paths:
        match = re.match(r"-?\d+(?:\.\d+)?", _text(node, path) or "")
        if match:
            return float(match.group(0))
    return None


def _yes(node: ET.Element | None, path: str) -> float | None:
    text = _text(node, path)
    if text is None:
        return None
    return 1.0 if text.lower() in ("yes", "enabled", "active") else 0.0


def _ecc_counts(scope: ET.Element | None) -> dict[str, float]:
    """corrected/uncorrected from one <volatile> or <aggregate>: drivers before 515 give
    single_bit/double_bit with a <total>; later ones sram_/dram_ counts, the
    uncorrectable ones named so (570+ split SRAM into parity and SEC-DED)."""
    if scope is None:
        return {}
    found: dict[str, float] = {}
    for kind, path in (("corrected", "single_bit/total"), ("uncorrected", "double_bit/total")):
        value = _quantity(scope, path)
        if value is not None:
            found[kind] = value
    if found:
        return found
    for child in scope:
        value = _quantity(child, ".")
        if value is None or "threshold" in child.tag:
            continue
        if "uncorrectable" in child.tag:
            found["uncorrected"] = found.get("uncorrected", 0.0) + value
        elif "correctable" in child.tag:
            found["corrected"] = found.get("corrected", 0.0) + value
    return found


def _version(root: ET.Element, *paths: str) -> str:
    for path in paths:
        text = _text(root, path)
        if text and re.fullmatch(r"\d+(?:\.\d+)*", text):
            return text
    return ""


def parse_xml(text: str) -> GpuReport:
    """A GpuReport from `nvidia-smi -q -x` output (or its error message)."""
    for reason, loaded, pattern in _FATAL:
        if pattern.search(text):
            return GpuReport(driver_loaded=loaded, errors=[reason])
    start = text.find("<nvidia_smi_log")
    if start < 0:
        return GpuReport(driver_loaded=False, errors=["unrecognized"])
    try:
        root = ET.fromstring(text[start:].strip())
    except ET.ParseError:
        return GpuReport(driver_loaded=True, errors=["unrecognized"])
    report = GpuReport(
        driver_loaded=True,
        # 610+ print kmd_version and mark driver_version "Deprecated".
        driver_version=_version(root, "driver_version", "kmd_version"),
        cuda_version=_version(root, "cuda_version", "cuda_umd_version"))
    for position, node in enumerate(root.findall("gpu")):
        # The XML has no index (minor_number is not it); GPUs come in index order.
        gpu = Gpu(index=position, uuid=_text(node, "uuid") or "",
                  name=_text(node, "product_name") or "")
        utilization = _quantity(node, "utilization/gpu_util")
        gpu.utilization_ratio = None if utilization is None else utilization / 100
        used = _quantity(node, "fb_memory_usage/used")
        total = _quantity(node, "fb_memory_usage/total")
        gpu.memory_used_bytes = None if used is None else used * 2**20
        gpu.memory_total_bytes = None if total is None else total * 2**20
        gpu.temperature_celsius = _quantity(node, "temperature/gpu_temp")
        # <power_readings> before driver 530, <gpu_power_readings> after (instant and
        # average draw from 550).
        gpu.power_watts = _quantity(
            node, "gpu_power_readings/instant_power_draw", "gpu_power_readings/power_draw",
            "power_readings/power_draw")
        gpu.power_limit_watts = _quantity(
            node, "gpu_power_readings/current_power_limit", "power_readings/enforced_power_limit",
            "power_readings/power_limit")
        gpu.persistence_mode = _yes(node, "persistence_mode")
        reasons = node.find("clocks_event_reasons")
        if reasons is None:
            reasons = node.find("clocks_throttle_reasons")
        for child in reasons if reasons is not None else []:
            name = child.tag.split("_reason_", 1)[-1]
            name = _XML_REASON.get(name, name)
            state = (child.text or "").strip()
            if name in CLOCK_REASONS and state in ("Active", "Not Active"):
                gpu.clocks_event[name] = state == "Active"
        for scope in ("volatile", "aggregate"):
            for kind, count in _ecc_counts(node.find(f"ecc_errors/{scope}")).items():
                gpu.ecc_errors[(scope, kind)] = count
        for cause, path in (("single_bit_ecc", "multiple_single_bit_retirement/retired_count"),
                            ("double_bit_ecc", "double_bit_retirement/retired_count")):
            pages = _quantity(node.find("retired_pages"), path)
            if pages is not None:
                gpu.retired_pages[cause] = pages
        pending = _yes(node, "retired_pages/pending_retirement")
        gpu.retired_pages_pending = (pending if pending is not None
                                     else _yes(node, "retired_pages/pending_blacklist"))
        rows = node.find("remapped_rows")
        for kind, path in (("correctable", "remapped_row_corr"),
                           ("uncorrectable", "remapped_row_unc")):
            rows_count = _quantity(rows, path)
            if rows_count is not None:
                gpu.remapped_rows[kind] = rows_count
        for kind, path in (("pending", "remapped_row_pending"),
                           ("failure", "remapped_row_failure")):
            flag = _yes(rows, path)
            if flag is not None:
                gpu.remapped_rows[kind] = flag
        report.gpus.append(gpu)
    if not report.gpus:
        report.errors.append("no_devices")
    return report


def read_nvidia_smi(command: str) -> GpuReport:
    path = shutil.which(command)
    if path is None:
        return GpuReport(driver_loaded=False, errors=["not_installed"])
    try:
        proc = subprocess.run([path, "-q", "-x"], capture_output=True, text=True,
                              timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        # A hung driver: nvidia-smi blocks in the kernel; nothing answered.
        return GpuReport(driver_loaded=False, errors=["timeout"])
    return parse_xml(proc.stdout + proc.stderr)


def read_nvml(nvml: Any) -> GpuReport:
    """A GpuReport through pynvml (nvidia-ml-py); raises nvml.NVMLError when NVML does not
    initialize, so that the caller falls back to nvidia-smi."""
    nvml.nvmlInit()
    try:
        def call(function: Callable[..., Any], *args: Any) -> Any:
            try:
                return function(*args)
            except nvml.NVMLError:  # not supported on this GPU, or not now
                return None

        def text(value: Any) -> str:
            return value.decode() if isinstance(value, bytes) else str(value or "")

        cuda = call(nvml.nvmlSystemGetCudaDriverVersion)
        report = GpuReport(
            driver_loaded=True, driver_version=text(call(nvml.nvmlSystemGetDriverVersion)),
            cuda_version=f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else "")
        # Renamed in nvidia-ml-py 12.535 (drivers 535 renamed throttle reasons to clock events).
        get_reasons = (getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                       or nvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpu = Gpu(index=index, uuid=text(call(nvml.nvmlDeviceGetUUID, handle)),
                      name=text(call(nvml.nvmlDeviceGetName, handle)))
            rates = call(nvml.nvmlDeviceGetUtilizationRates, handle)
            gpu.utilization_ratio = None if rates is None else rates.gpu / 100
            memory = call(nvml.nvmlDeviceGetMemoryInfo, handle)
            if memory is not None:
                gpu.memory_used_bytes, gpu.memory_total_bytes = memory.used, memory.total
            gpu.temperature_celsius = call(nvml.nvmlDeviceGetTemperature, handle,
                                           nvml.NVML_TEMPERATURE_GPU)
            milliwatts = call(nvml.nvmlDeviceGetPowerUsage, handle)
            gpu.power_watts = None if milliwatts is None else milliwatts / 1000
            limit = call(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
            gpu.power_limit_watts = None if limit is None else limit / 1000
            persistence = call(nvml.nvmlDeviceGetPersistenceMode, handle)
            gpu.persistence_mode = None if persistence is None else float(persistence == 1)
            mask = call(get_reasons, handle)
            if mask is not None:
                gpu.clocks_event = {reason: bool(mask & (1 << bit))
                                    for bit, reason in enumerate(CLOCK_REASONS)}
            for scope, counter in (("volatile", nvml.NVML_VOLATILE_ECC),
                                   ("aggregate", nvml.NVML_AGGREGATE_ECC)):
                for kind, error in (("corrected", nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
                                    ("uncorrected", nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)):
                    count = call(nvml.nvmlDeviceGetTotalEccErrors, handle, error, counter)
                    if count is not None:
                        gpu.ecc_errors[(scope, kind)] = count
            causes = (("single_bit_ecc",
                       nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
                      ("double_bit_ecc", nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR))
            for cause, code in causes:
                pages = call(nvml.nvmlDeviceGetRetiredPages, handle, code)
                if pages is not None:
                    gpu.retired_pages[cause] = len(pages)
            pending = call(nvml.nvmlDeviceGetRetiredPagesPendingStatus, handle)
            gpu.retired_pages_pending = None if pending is None else float(pending == 1)
            rows = call(nvml.nvmlDeviceGetRemappedRows, handle)
            if rows is not None:
                gpu.remapped_rows = dict(zip(("correctable", "uncorrectable", "pending", "failure"),
                                             (float(v) for v in rows), strict=False))
            report.gpus.append(gpu)
        if not report.gpus:
            report.errors.append("no_devices")
        return report
    finally:
        nvml.nvmlShutdown()


def read_gpus(nvidia_smi: str) -> GpuReport:
    """NVML when pynvml imports and initializes, else nvidia-smi."""
    try:
        # Optional on the host: nvidia-ml-py in the planned env (a vLLM dependency).
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return read_nvidia_smi(nvidia_smi)
    try:
        return read_nvml(pynvml)
    except pynvml.NVMLError:
        # Not loaded, or no library: nvidia-smi says which, in words this program knows.
        return read_nvidia_smi(nvidia_smi)


# ---------------------------------------------------------------- Xid errors

def count_xids(log: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for match in XID.finditer(log):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def read_kernel_log() -> str | None:
    """This boot's kernel messages: the journal's (journalctl -k, readable by the
    systemd-journal group), else the ring buffer (dmesg, CAP_SYSLOG where dmesg_restrict=1)."""
    # Not journalctl --grep: it exists only where journalctl was built with PCRE2.
    for argv in (["journalctl", "-k", "-b", "--no-pager", "-o", "cat"], ["dmesg"]):
        if shutil.which(argv[0]) is None:
            continue
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                                  errors="replace")
        except subprocess.TimeoutExpired:
            continue
        if proc.returncode == 0:
            return proc.stdout
    return None


# ---------------------------------------------------------------- the files

def gpu_families(report: GpuReport, xids: dict[str, int] | None, started: float,
                 now: float) -> list[Family]:
    def family(name: str, help_text: str, kind: str = "gauge") -> Family:
        return Family(f"orchestrate_gpu_{name}", help_text, kind)

    loaded = family("driver_loaded", "1 when the NVIDIA driver answered (NVML or nvidia-smi)")
    loaded.add(1 if report.driver_loaded else 0)
    errors = family("collector_error",
                    "1 per reason the last collection failed (not_installed, driver_not_loaded, "
                    "version_mismatch, no_devices, timeout, unrecognized, kernel_log_unreadable)")
    for reason in report.errors + ([] if xids is not None else ["kernel_log_unreadable"]):
        errors.add(1, reason=reason)
    info = family("info", "GPU identity; value 1")
    utilization = family("utilization_ratio",
                         "GPU utilization over the driver's last sample period (0..1)")
    used = family("memory_used_bytes", "Framebuffer memory used")
    total = family("memory_total_bytes", "Framebuffer memory total")
    temperature = family("temperature_celsius", "GPU core temperature")
    power = family("power_watts", "Power draw")
    power_limit = family("power_limit_watts", "Enforced power limit")
    clocks = family("clocks_event_active",
                    "1 while the clock event (throttle) reason holds the clocks down")
    ecc = family("ecc_errors", "ECC error counts as the driver reports them "
                               "(volatile: since the driver loaded; aggregate: lifetime)")
    retired = family("retired_pages", "Pages retired, by cause")
    retired_pending = family("retired_pages_pending",
                             "1 while a page retirement waits for a reboot")
    remapped = family("remapped_rows", "Remapped rows (correctable, uncorrectable) and the "
                                       "pending/failure flags (0/1)")
    persistence = family("persistence_mode", "1 when persistence mode is enabled")
    for gpu in report.gpus:
        ids = {"gpu": str(gpu.index), "uuid": gpu.uuid, "name": gpu.name}
        info.add(1, **ids, driver_version=report.driver_version, cuda_version=report.cuda_version)
        utilization.add(gpu.utilization_ratio, **ids)
        used.add(gpu.memory_used_bytes, **ids)
        total.add(gpu.memory_total_bytes, **ids)
        temperature.add(gpu.temperature_celsius, **ids)
        power.add(gpu.power_watts, **ids)
        power_limit.add(gpu.power_limit_watts, **ids)
        for reason in CLOCK_REASONS:
            if reason in gpu.clocks_event:
                clocks.add(1 if gpu.clocks_event[reason] else 0, **ids, reason=reason)
        for (scope, kind), count in sorted(gpu.ecc_errors.items()):
            ecc.add(count, **ids, scope=scope, type=kind)
        for cause, count in gpu.retired_pages.items():
            retired.add(count, **ids, cause=cause)
        retired_pending.add(gpu.retired_pages_pending, **ids)
        for kind, count in gpu.remapped_rows.items():
            remapped.add(count, **ids, kind=kind)
        persistence.add(gpu.persistence_mode, **ids)
    xid = family("xid_errors_total", "NVIDIA Xid errors in the kernel log since boot, by Xid code",
                 "counter")
    for code, count in sorted((xids or {}).items(), key=lambda item: int(item[0])):
        xid.add(count, xid=code)
    last_run = family("collector_last_run_timestamp_seconds",
                      "When this file was written (Unix time)")
    last_run.add(round(now, 3))
    duration = family("collector_duration_seconds", "How long the collection took")
    duration.add(round(now - started, 3))
    return [loaded, errors, info, utilization, used, total, temperature, power, power_limit,
            clocks, ecc, retired, retired_pending, remapped, persistence, xid, last_run, duration]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        return json.load(response)


def ollama_families(base_url: str, get: Callable[[str], Any] = _get_json) -> list[Family]:
    up = Family("orchestrate_ollama_up", "1 when Ollama's /api/version answered")
    info = Family("orchestrate_ollama_info", "Ollama's version; value 1")
    loaded = Family("orchestrate_ollama_model_loaded", "1 per model loaded in memory (/api/ps)")
    available = Family("orchestrate_ollama_model_available", "1 per model on disk (/api/tags)")
    base = base_url.rstrip("/")
    try:
        version = get(f"{base}/api/version")
        running = get(f"{base}/api/ps")
        tags = get(f"{base}/api/tags")
    except (OSError, ValueError, urllib.error.URLError):
        up.add(0)
        return [up, info, loaded, available]
    up.add(1)
    info.add(1, version=str(version.get("version", "")))
    for model in sorted({str(m.get("name", "")) for m in running.get("models") or []}):
        loaded.add(1, model=model)
    for model in sorted({str(m.get("name", "")) for m in tags.get("models") or []}):
        available.add(1, model=model)
    return [up, info, loaded, available]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--textfile-dir", required=True)
    parser.add_argument("--gpu", action="store_true", help=f"write {GPU_FILE}")
    parser.add_argument("--nvidia-smi", default="nvidia-smi")
    parser.add_argument("--no-nvml", action="store_true",
                        help="read nvidia-smi even where pynvml imports")
    parser.add_argument("--no-kernel-log", action="store_true", help="do not read Xid errors")
    parser.add_argument("--ollama-url", help=f"write {OLLAMA_FILE} from this Ollama server")
    args = parser.parse_args(argv)
    if args.gpu:
        started = time.time()
        report = read_nvidia_smi(args.nvidia_smi) if args.no_nvml else read_gpus(args.nvidia_smi)
        log = "" if args.no_kernel_log else read_kernel_log()
        xids = None if log is None else count_xids(log)
        write_atomically(args.textfile_dir, GPU_FILE,
                         render(gpu_families(report, xids, started, time.time())))
    if args.ollama_url:
        write_atomically(args.textfile_dir, OLLAMA_FILE, render(ollama_families(args.ollama_url)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
