"""Evidence for the verification probes, collected on one host in one run.

orchestrator/verify/hostprobe.py sends this file over SSH to the host's `python3 -` with a
`main(<config>)` line appended, so it uses the standard library only and runs on
Python 3.9 (RHEL 9's python3). It judges nothing: it prints one JSON object of raw
outputs (nvidia-smi or NVML, torch-check, the weights' marker and file sizes,
`systemctl show`, listening sockets; for `status` the weights' identity, the envs'
package versions and the driver's) and the control machine decides pass or fail.
It changes nothing on the host and needs no root: model directories are world-readable,
and `systemctl show` and /proc/net/tcp need no privileges.
"""

from __future__ import annotations

import glob
import importlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

# Characters of a command's output (or of a JSON file) kept: nvidia-smi -q -x of an
# 8-GPU host is about 200 KB.
OUTPUT_LIMIT = 1 << 21
# --query-gpu fields beside the plain table; compute_cap needs driver 510+, so the
# query is repeated without it on older drivers (as roles/gpu_check does).
QUERY_FIELDS = ["index", "name", "uuid", "memory.total", "compute_cap", "mig.mode.current"]
UNIT_PROPERTIES = ("LoadState,ActiveState,SubState,Result,NRestarts,ExecMainPID,"
                   "ExecMainStartTimestamp")
# nvml.h: NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC.
_NVML_UNCORRECTED, _NVML_VOLATILE = 1, 0


class Clock:
    """The time left of the probe's budget: a command never runs past it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _cap(text: str) -> str:
    return text if len(text) <= OUTPUT_LIMIT else text[:OUTPUT_LIMIT] + "\n[truncated]"


def run(argv: list[str], clock: Clock, limit: float) -> dict[str, Any]:
    """One command's exit code and output; a command that cannot start or overruns is
    recorded with the reason, never raised."""
    record: dict[str, Any] = {"argv": argv, "rc": None, "stdout": "", "stderr": ""}
    budget = min(limit, clock.left() - 1.0)
    if budget <= 0:
        record["error"] = "not run: the probe's time ran out"
        return record
    try:
        # C locale: systemd's timestamps and tools' messages in the words the parsers know.
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=budget, check=False, env=dict(os.environ, LC_ALL="C"),
                              text=True, errors="replace")
    except subprocess.TimeoutExpired:
        record["error"] = f"timed out after {budget:.0f} s"
        return record
    except OSError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        return record
    record.update(rc=done.returncode, stdout=_cap(done.stdout), stderr=_cap(done.stderr))
    return record


def _read_json(path: str) -> dict[str, Any]:
    record: dict[str, Any] = {"path": path, "present": os.path.isfile(path)}
    if not record["present"]:
        return record
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(OUTPUT_LIMIT + 1)
    except (OSError, UnicodeDecodeError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        return record
    if len(text) > OUTPUT_LIMIT:
        record["error"] = f"larger than {OUTPUT_LIMIT} characters"
        return record
    try:
        record["content"] = json.loads(text)
    except ValueError as exc:
        record["error"] = f"not JSON: {exc}"
    return record


# ---------------------------------------------------------------- GPUs

def _nvml_text(value: Any) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml(pynvml: Any) -> dict[str, Any] | None:
    """Driver, GPUs, ECC and clock event reasons through NVML; None when NVML's library
    is absent (then nvidia-smi answers)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        if isinstance(exc, getattr(pynvml, "NVMLError_LibraryNotFound", ())):
            return None
        return {"error": type(exc).__name__, "message": str(exc)}

    def maybe(function: str, *args: Any) -> Any:
        # A query the GPU does not support (NotSupported) leaves that value empty.
        call = getattr(pynvml, function, None)
        if call is None:
            return None
        try:
            return call(*args)
        except pynvml.NVMLError:
            return None

    out: dict[str, Any] = {"gpus": []}
    try:
        out["driver_version"] = _nvml_text(pynvml.nvmlSystemGetDriverVersion())
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        out["cuda_version"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError as exc:
                out.update(error=type(exc).__name__, message=f"GPU {index}: {exc}")
                break
            capability = maybe("nvmlDeviceGetCudaComputeCapability", handle)
            mig = maybe("nvmlDeviceGetMigMode", handle)
            ecc = maybe("nvmlDeviceGetEccMode", handle)
            reasons = maybe("nvmlDeviceGetCurrentClocksEventReasons", handle)
            if reasons is None:  # nvidia-ml-py before 12.535 names it "throttle"
                reasons = maybe("nvmlDeviceGetCurrentClocksThrottleReasons", handle)
            out["gpus"].append({
                "index": index,
                "name": _nvml_text(pynvml.nvmlDeviceGetName(handle)),
                "uuid": _nvml_text(pynvml.nvmlDeviceGetUUID(handle)),
                "memory_total_mib": pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20,
                "compute_capability": "{}.{}".format(*capability) if capability else None,
                "mig_mode": None if mig is None else ("Enabled" if mig[0] else "Disabled"),
                "ecc_mode": None if ecc is None else ("Enabled" if ecc[0] else "Disabled"),
                "ecc_volatile_uncorrected": maybe("nvmlDeviceGetTotalEccErrors", handle,
                                                  _NVML_UNCORRECTED, _NVML_VOLATILE),
                "clock_event_reasons_mask": reasons,
            })
    except pynvml.NVMLError as exc:
        out.update(error=type(exc).__name__, message=str(exc))
    finally:
        pynvml.nvmlShutdown()
    return out


def gpu(config: dict[str, Any], clock: Clock) -> dict[str, Any]:
    try:
        # nvidia-ml-py, where the host's python3 has it.
        pynvml: Any = importlib.import_module("pynvml")
    except ImportError:
        pynvml = None
    if pynvml is not None:
        nvml = _nvml(pynvml)
        if nvml is not None:
            return {"source": "nvml", "nvml": nvml}
    limit = float(config["command_timeout_s"])
    path = shutil.which(config["nvidia_smi"])
    out: dict[str, Any] = {"source": "nvidia-smi", "path": path}
    if path is None:
        out["searched"] = os.environ.get("PATH", "")
        return out
    # The plain report carries the driver and CUDA versions and every failure message.
    out["table"] = run([path], clock, limit)
    if out["table"]["rc"] != 0:
        return out
    for fields in (QUERY_FIELDS, [f for f in QUERY_FIELDS if f != "compute_cap"]):
        out["csv"] = run([path, "--query-gpu=" + ",".join(fields), "--format=csv"], clock,
                         limit)
        if out["csv"]["rc"] == 0:
            break
    out["xml"] = run([path, "-q", "-x"], clock, limit)
    out["list"] = run([path, "-L"], clock, limit)
    return out


# ---------------------------------------------------------------- environments, weights

def environment(path: str, clock: Clock, limit: float) -> dict[str, Any]:
    check = os.path.join(path, "bin", "torch-check")
    out: dict[str, Any] = {"path": path, "exists": os.path.isdir(path), "torch_check": check,
                           "installed": os.access(check, os.X_OK)}
    if out["installed"]:
        out["run"] = run([check], clock, limit)
    return out


def _size(dest: str, relative: str) -> int | None:
    try:
        info = os.stat(os.path.join(dest, relative))
    except OSError:
        return None
    return info.st_size if os.path.isfile(os.path.join(dest, relative)) else None


def model(entry: dict[str, Any], marker: str) -> dict[str, Any]:
    """The completion marker (else a manifest.json) and the size of every file it lists:
    sizes only, since hashing many GB is too slow for a probe (the models stage hashed
    them at install)."""
    dest = str(entry["dest"])
    out: dict[str, Any] = {"name": entry["name"], "dest": dest, "exists": os.path.isdir(dest)}
    if not out["exists"]:
        return out
    out["marker"] = _read_json(os.path.join(dest, marker))
    listing = out["marker"]
    if not listing["present"]:
        out["manifest"] = listing = _read_json(os.path.join(dest, "manifest.json"))
    out["config_json"] = os.path.isfile(os.path.join(dest, "config.json"))
    content = listing.get("content")
    files = content.get("files") if isinstance(content, dict) else None
    if isinstance(files, dict):
        # A listed path that leaves the directory is not looked at.
        outside = [p for p in files if os.path.isabs(p) or ".." in p.split("/")]
        out["outside"] = outside
        out["sizes"] = {p: _size(dest, p) for p in files if p not in outside}
    return out


def identity(entry: dict[str, Any], marker: str) -> dict[str, Any]:
    """The identity (source, model id, revision) the models stage wrote in the weights'
    completion marker; the file list is left out: `status` sizes nothing."""
    found = _read_json(os.path.join(str(entry["dest"]), marker))
    content = found.pop("content", None)
    if isinstance(content, dict) and isinstance(content.get("identity"), dict):
        found["identity"] = content["identity"]
    return {"name": entry["name"], **found}


def _metadata_version(path: str) -> str | None:
    """The Version header of a dist-info METADATA file (the headers end at a blank line)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.strip():
                    break
                if line.startswith("Version:"):
                    return line.partition(":")[2].strip()
    except OSError:
        return None
    return None


def distributions(env: str, names: list[str]) -> dict[str, Any]:
    """The versions of `names` installed in the environment, from their METADATA: no
    import of torch (seconds), only a few files read. Two versions mean a leftover
    dist-info, which is reported as found."""
    found: dict[str, list[str]] = {}
    for name in names:
        pattern = os.path.join(glob.escape(env), "lib", "python3*", "site-packages",
                               f"{name}-*.dist-info", "METADATA")
        found[name] = [v for v in map(_metadata_version, sorted(glob.glob(pattern))) if v]
    return {"path": env, "exists": os.path.isdir(env), "versions": found}


def driver(path: str) -> dict[str, Any]:
    """The loaded NVIDIA kernel module's version line (no nvidia-smi run, no GPU touched)."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return {"path": path, "present": True, "line": handle.readline().strip()}
    except OSError as exc:
        return {"path": path, "present": False, "error": f"{type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------- services, sockets

def unit(name: str, clock: Clock, limit: float) -> dict[str, Any]:
    return {"unit": name, **run(["systemctl", "show", name, "--no-pager", "-p",
                                 UNIT_PROPERTIES], clock, limit)}


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        # /proc prints each 32-bit word of the address in host byte order.
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def listening() -> dict[str, Any]:
    """TCP sockets in LISTEN state (st 0A) from /proc/net/tcp and tcp6."""
    sockets: set[tuple[str, int]] = set()
    errors: list[str] = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path, encoding="ascii") as handle:
                lines = handle.read().splitlines()[1:]
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":
                continue
            address, _, port = fields[1].partition(":")
            sockets.add((_address(address), int(port, 16)))
    return {"sockets": [{"address": a, "port": p} for a, p in sorted(sockets)],
            "errors": errors}


# ---------------------------------------------------------------- entry point

def collect(config: dict[str, Any]) -> dict[str, Any]:
    clock = Clock(float(config["deadline_s"]))
    limit = float(config["command_timeout_s"])
    # Quick reads first, torch-check (imports torch, touches every GPU) last: a host
    # that runs out of time loses the slowest evidence only.
    out: dict[str, Any] = {
        "listening": listening(),
        "models": [model(m, config["marker"]) for m in config["models"]],
        "units": [unit(u, clock, limit) for u in config["units"]],
    }
    # `status` only (liveness.units_config): the full probe reads these its own way.
    out["identities"] = [identity(m, config["marker"]) for m in config.get("identities", [])]
    out["distributions"] = [distributions(p, list(config.get("distribution_names", [])))
                            for p in config.get("distribution_envs", [])]
    out["driver"] = driver(config["driver_file"]) if config.get("driver_file") else None
    out["gpu"] = gpu(config, clock) if config["gpu"] else None
    out["envs"] = [environment(p, clock, float(config["torch_timeout_s"]))
                   for p in config["envs"]]
    return out


def main(config_text: str) -> None:
    sys.stdout.write(json.dumps(collect(json.loads(config_text))) + "\n")
