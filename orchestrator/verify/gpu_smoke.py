"""GPU smoke test of one host: what a real GPU host must do before it is trusted.

Run on the host itself, as root (scripts/gpu-smoke, or playbooks/gpu_smoke.yml for
`orchestrate probe --deep`):

    sudo scripts/gpu-smoke --env /opt/qwen-serve/env [--unit vllm@NAME] [--model DIR] [--json]

Checks, each pass/fail/skip with its evidence and, on failure, the next step:

  devices       /dev/nvidia* nodes vs /proc/devices vs the vLLM unit's DeviceAllow
  torch         a matmul on every GPU, checked against the CPU, inside systemd-run with
                the vLLM unit's own hardening (user, DevicePolicy, DeviceAllow, Protect*,
                and its sandbox: capabilities, system call filter, address families, ...)
  triton        Triton compiles its C helper and a kernel (vllm#27890 "Python.h")
  nccl          an NCCL all-reduce across the host's GPUs, one process per GPU
  torch_driver  the env's torch CUDA build against the CUDA the driver supports
  vllm          vLLM serves a model on the GPU for one chat completion

Standard library only, Python 3.9+ (RHEL 9's python3): torch, Triton and vLLM run in the
environment's own python, in subprocesses, each bounded by a timeout. The only import
from this project is deviceallow.py, which playbooks/gpu_smoke.yml copies beside this
file onto the host.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import re
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from orchestrator.verify import deviceallow
except ImportError:
    # Run as a script (scripts/gpu-smoke; a host's temporary directory): deviceallow.py
    # lies beside this file, which is on sys.path[0].
    import deviceallow  # type: ignore[no-redef, import-not-found]

CHECKS = ("devices", "torch", "triton", "nccl", "torch_driver", "vllm")
# Printed before the one JSON line each program in the env's python answers with, so that
# library noise on stdout (NCCL's INFO lines, warnings) cannot be mistaken for it.
MARK = "GPU-SMOKE-RESULT "
OUTPUT_TAIL = 1500
COMMAND_TIMEOUT = 30.0
REPO_DEFAULTS = Path(__file__).resolve().parents[2] / "roles" / "vllm" / "defaults" / "main.yml"
# The vLLM unit's hardening as `systemctl show` names it (roles/vllm/templates/vllm@.service.j2);
# systemd-run takes the same names as -p properties.
HARDENING = ("User", "Group", "DevicePolicy", "DeviceAllow", "ProtectSystem", "ProtectHome",
             "PrivateTmp", "NoNewPrivileges")
# The rest of the unit's sandbox (the vllm role's vllm_hardening and its overrides): every
# security and sandboxing directive of systemd.exec(5) and systemd.resource-control(5)'s
# IP filter, read from `systemctl cat` as written (drop-ins included, in the order systemd
# applies them), since `systemctl show` prints some resolved (a system call list) or not
# at all when empty (CapabilityBoundingSet=, no capabilities).
SANDBOXING = ("CapabilityBoundingSet", "AmbientCapabilities", "SecureBits",
              "SupplementaryGroups", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths",
              "ExecPaths", "NoExecPaths", "TemporaryFileSystem", "BindPaths",
              "BindReadOnlyPaths", "PrivateDevices", "PrivateNetwork", "PrivateIPC",
              "PrivateUsers", "PrivateMounts", "ProtectHostname", "ProtectClock",
              "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
              "ProtectControlGroups", "ProtectProc", "ProcSubset", "RestrictAddressFamilies",
              "RestrictFileSystems", "RestrictNamespaces", "LockPersonality",
              "MemoryDenyWriteExecute", "RestrictRealtime", "RestrictSUIDSGID", "RemoveIPC",
              "KeyringMode", "SystemCallFilter", "SystemCallErrorNumber",
              "SystemCallArchitectures", "SystemCallLog", "UMask", "IPAddressAllow",
              "IPAddressDeny")
# The vllm role's variables for the same settings, for a host with no vLLM unit yet.
ROLE_VARIABLES = ("vllm_user", "vllm_group", "vllm_device_policy", "vllm_device_allow",
                  "vllm_protect_system", "vllm_protect_home", "vllm_private_tmp",
                  "vllm_no_new_privileges", "vllm_hardening", "vllm_hardening_overrides")
# The nodes CUDA opens (NVIDIA's "Device Node Verification" in the CUDA installation
# guide: nvidia0.., nvidiactl, nvidia-uvm, nvidia-uvm-tools) and the MIG capability nodes
# under /dev/nvidia-caps; /dev/nvidia-modeset (display) and the NVSwitch/NVLink nodes
# (fabric manager) are not the engine's.
REQUIRED_NODE = re.compile(r"/dev/(nvidia\d+|nvidiactl|nvidia-uvm|nvidia-uvm-tools"
                           r"|nvidia-caps/nvidia-cap\d+)")
# NVIDIA's MIG user guide ("Device Nodes and Capabilities"): a capability is granted by
# read access to its node; the others are opened read-write.
CAPS_ACCESS = "r"
NODE_ACCESS = "rw"
# The environment every vllm@ unit gets (roles/vllm/defaults/main.yml vllm_environment).
VLLM_ENVIRONMENT = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                    "VLLM_HOST_IP": "127.0.0.1"}
VLLM_SERVED_NAME = "gpu-smoke"
CHAT_PROMPT = "Say hello in one short sentence."
NO_GPU_NEXT = ("install and load the NVIDIA driver (`orchestrate up --only drivers` with "
               "driver.manage, or the vendor's packages) and check `nvidia-smi`; on a host "
               "meant to have no GPU, pass --allow-no-gpu")
HEADERS_NEXT = ("install the Python headers of the env's interpreter and a C compiler "
                "(Debian/Ubuntu: python3-dev or python3.X-dev, gcc; RHEL/Rocky: "
                "python3.X-devel, gcc), then rerun; the python_env stage installs them on "
                "GPU hosts")


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class Check:
    check: str
    status: str  # pass | fail | skip
    evidence: str
    next_step: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status, "evidence": self.evidence,
                "next_step": self.next_step if self.status == "fail" else None}


def _pass(check: str, evidence: str) -> Check:
    return Check(check, "pass", evidence)


def _fail(check: str, evidence: str, next_step: str) -> Check:
    return Check(check, "fail", evidence, next_step)


def _skip(check: str, evidence: str) -> Check:
    return Check(check, "skip", evidence)


@dataclass(frozen=True)
class Outcome:
    """A command's exit code and output; `error` when it could not start or overran."""

    argv: list[str]
    rc: int | None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.rc == 0

    def said(self) -> str:
        """What went wrong, in the command's own words."""
        if self.error:
            return self.error
        text = _tail((self.stderr.strip() + "\n" + self.stdout.strip()).strip())
        return f"exit {self.rc}: {text}" if text else f"exit {self.rc}"


def _tail(text: str, limit: int = OUTPUT_TAIL) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _program_answer(outcome: Outcome) -> dict[str, Any] | None:
    """The JSON line a program in the env's python printed after MARK (the last one)."""
    for line in reversed(outcome.stdout.splitlines()):
        if line.startswith(MARK):
            try:
                answer = json.loads(line[len(MARK):])
            except ValueError:
                return None
            return answer if isinstance(answer, dict) else None
    return None


# ---------------------------------------------------------------- the host

class System:
    """Everything the smoke test asks of the host; the tests replace it with recorded
    answers."""

    def run(self, argv: Sequence[str], timeout: float,
            env: dict[str, str] | None = None) -> Outcome:
        try:
            # C locale: systemd's and the tools' messages in the words matched here.
            done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, check=False, text=True, errors="replace",
                                  env={**os.environ, "LC_ALL": "C", **(env or {})})
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            return Outcome(list(argv), None, out, err, f"timed out after {timeout:.0f} s")
        except OSError as exc:
            return Outcome(list(argv), None, error=f"{type(exc).__name__}: {exc}")
        return Outcome(list(argv), done.returncode, done.stdout, done.stderr)

    def read_text(self, path: str) -> str | None:
        try:
            return Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None

    def device_nodes(self) -> list[deviceallow.DeviceNode]:
        paths = sorted(glob.glob("/dev/nvidia*") + glob.glob("/dev/nvidia-caps/*"))
        nodes = []
        for path in paths:
            try:
                if stat.S_ISCHR(os.stat(path).st_mode):
                    nodes.append(deviceallow.node_of(path))
            except OSError:
                continue  # removed while listed (the driver unloading)
        return nodes

    def is_root(self) -> bool:
        return os.geteuid() == 0

    def user_exists(self, name: str) -> bool:
        try:
            pwd.getpwnam(name)
        except KeyError:
            return False
        return True

    def is_file(self, path: str) -> bool:
        return os.path.isfile(path)

    def dir_size(self, path: str) -> int | None:
        """Bytes of the files under `path`; None when it is not a directory."""
        if not os.path.isdir(path):
            return None
        total = 0
        for root, _, files in os.walk(path):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except OSError:
                    continue
        return total

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            return port

    def http(self, method: str, url: str, body: dict[str, Any] | None,
             timeout: float) -> tuple[int | None, str]:
        """Status and body; status None with the reason when nothing answered."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return int(response.status), response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as exc:
            return None, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def hostname(self) -> str:
        return socket.gethostname()


# ---------------------------------------------------------------- the driver and GPUs

@dataclass(frozen=True)
class Gpus:
    """What nvidia-smi says: the GPUs, the driver and the newest CUDA it supports."""

    names: list[str]
    driver: str | None
    cuda: str | None
    problem: str | None  # why there is no usable GPU, in nvidia-smi's words


_GPU_LINE = re.compile(r"^GPU (\d+): (.+?) \(UUID: ")
_DRIVER = re.compile(r"Driver Version:\s*([0-9.]+)")
_CUDA = re.compile(r"CUDA Version:\s*(\S+)")


def parse_gpus(listing: Outcome, table: Outcome) -> Gpus:
    """`nvidia-smi -L` and the plain `nvidia-smi` table (its header names the driver and
    the CUDA version it supports, "N/A" where libcuda is missing)."""
    driver = _DRIVER.search(table.stdout)
    cuda = _CUDA.search(table.stdout)
    names = [m.group(2) for m in map(_GPU_LINE.match, listing.stdout.splitlines()) if m]
    problem = None
    if not listing.ok:
        problem = f"`nvidia-smi -L`: {listing.said()}"
    elif not names:
        problem = f"`nvidia-smi -L` lists no GPU: {_tail(listing.stdout) or '(no output)'}"
    return Gpus(names, driver.group(1) if driver else None,
                cuda.group(1) if cuda else None, problem)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


# ---------------------------------------------------------------- the vLLM unit

@dataclass(frozen=True)
class Hardening:
    """The vLLM unit's sandbox as systemd-run properties, and where they come from."""

    source: str
    properties: list[str]
    notes: list[str] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        return [p.split("=", 1)[1] for p in self.properties if p.split("=", 1)[0] == name]

    def describe(self) -> str:
        shown = [p for p in self.properties if not p.startswith("DeviceAllow=")]
        allow = self.values("DeviceAllow")
        if allow:
            shown.append(f"DeviceAllow={', '.join(allow)}")
        return f"{'; '.join(shown) or 'no hardening'} (from {self.source})" + "".join(
            f"; {note}" for note in self.notes)

    def wrap(self, argv: Sequence[str], name: str, env: dict[str, str], max_seconds: float,
             *, wait: bool = True) -> list[str]:
        """`argv` as a transient service with these properties, a RuntimeDirectory as
        its writable HOME (the unit's own StateDirectory plays that part; this one is
        removed when the service stops), and stopped by systemd after `max_seconds` even
        if this program is killed first."""
        home = f"/run/{name}"
        command = ["systemd-run", "--quiet", "--collect", f"--unit={name}",
                   f"--property=RuntimeDirectory={name}",
                   f"--property=RuntimeMaxSec={max_seconds:.0f}", f"--setenv=HOME={home}"]
        if wait:
            command += ["--wait", "--pipe"]
        command += [f"--property={p}" for p in self.properties]
        command += [f"--setenv={k}={v}" for k, v in sorted(env.items())]
        return [*command, "--", *argv]


def parse_properties(text: str) -> dict[str, list[str]]:
    """`systemctl show` output; a property shown more than once (DeviceAllow) keeps all."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def unit_hardening(unit: str, properties: dict[str, list[str]],
                   unit_text: str = "") -> Hardening:
    """The unit's hardening: HARDENING as `systemctl show` resolves it, and the SANDBOXING
    directives as `systemctl cat` (`unit_text`) shows them written."""
    props = []
    for name in HARDENING:
        for value in properties.get(name, []):
            # systemctl shows unset settings empty (User=) or at their defaults.
            if value and not (name == "DevicePolicy" and value == "auto"):
                props.append(f"{name}={value}")
    return Hardening(unit, props + sandboxing_directives(unit_text))


def sandboxing_directives(unit_text: str) -> list[str]:
    """The SANDBOXING assignments of the [Service] sections of `systemctl cat` output, in
    order: an empty one resets a list, as in the unit, and systemd-run's properties parse
    the same way."""
    found: list[str] = []
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line
            continue
        name, equals, value = line.partition("=")
        if section == "[Service]" and equals and name.strip() in SANDBOXING:
            found.append(f"{name.strip()}={value.strip()}")
    return found


def read_role_defaults(text: str) -> dict[str, Any]:
    """The vllm role's hardening variables from a defaults file or the playbook's
    to_nice_yaml of them: top-level `key: scalar`, `key:` with `- item` lines, and one
    level of mapping (`  Name: value`, a value a scalar, a flow list or `- item` lines),
    the only forms those use (tests/unit/test_gpu_smoke.py holds this reading against
    PyYAML's). Standard library only: the host's python3 may have no YAML module."""
    out: dict[str, Any] = {}
    top: str | None = None  # the ROLE_VARIABLES key being read
    listed: list[Any] | None = None  # where `- item` lines go
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if not line or line.lstrip().startswith("#"):
            continue
        indented = line[0] == " "
        item = re.match(r"^\s*-\s+(.*)$", line)
        if item and listed is not None:
            listed.append(_scalar(item.group(1)))
            continue
        key = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*):(?:\s+(.*))?$", line)
        listed = None
        if key and indented and top is not None:
            nested = out[top] if isinstance(out[top], dict) else {}
            out[top] = nested
            if key.group(2):
                nested[key.group(1)] = _scalar(key.group(2))
            else:
                listed = nested[key.group(1)] = []
            continue
        top = None
        if key and not indented and key.group(1) in ROLE_VARIABLES:
            if key.group(2):
                out[key.group(1)] = _scalar(key.group(2))
            else:
                top = key.group(1)
                # A list or a mapping: the next line tells.
                listed = out[top] = []
    return out


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(part) for part in re.findall(r"'[^']*'|\"[^\"]*\"|[^,\s][^,]*",
                                                     text[1:-1])]
    if text == "{}":
        return {}
    if text in ("null", "~"):
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    lowered = text.lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    return text


def defaults_hardening(values: dict[str, Any], source: str, system: System) -> Hardening:
    """What roles/vllm/templates/vllm@.service.j2 makes of the role's variables."""
    props: list[str] = []
    notes: list[str] = []
    user = values.get("vllm_user")
    if user and system.user_exists(str(user)):
        props.append(f"User={user}")
        if values.get("vllm_group"):
            props.append(f"Group={values['vllm_group']}")
    elif user:
        notes.append(f"user {user} does not exist here yet: run as root")
    if values.get("vllm_no_new_privileges"):
        props.append("NoNewPrivileges=yes")
    if values.get("vllm_protect_system"):
        props.append(f"ProtectSystem={values['vllm_protect_system']}")
    if values.get("vllm_protect_home"):
        props.append("ProtectHome=yes")
    if values.get("vllm_private_tmp"):
        props.append("PrivateTmp=yes")
    if values.get("vllm_device_policy"):
        props.append(f"DevicePolicy={values['vllm_device_policy']}")
    props += [f"DeviceAllow={entry}" for entry in values.get("vllm_device_allow") or []]
    # The unit template's loop: the overrides merged over vllm_hardening, by name, a null
    # removing one; a list gives one assignment per item; booleans in lower case.
    sandbox = {**(values.get("vllm_hardening") or {}),
               **(values.get("vllm_hardening_overrides") or {})}
    for name, value in sorted(sandbox.items()):
        for one in value if isinstance(value, list) else [] if value is None else [value]:
            props.append(f"{name}={str(one).lower() if isinstance(one, bool) else one}")
    return Hardening(source, props, notes)


@dataclass(frozen=True)
class Options:
    env: str
    unit: str | None = None
    model: str | None = None
    vllm_defaults: str | None = None
    allow_no_gpu: bool = False
    timeout: float = 300.0
    vllm_timeout: float = 600.0


def _unit_name(unit: str) -> str:
    return unit if unit.endswith(".service") else f"{unit}.service"


def vllm_units(system: System) -> list[str]:
    """The vllm@ instances systemd knows on this host (loaded, running or failed)."""
    listed = system.run(["systemctl", "list-units", "--all", "--plain", "--no-legend",
                         "--full", "--type=service", "vllm@*"], COMMAND_TIMEOUT)
    names = []
    for line in listed.stdout.splitlines():
        words = [w for w in line.split() if w not in ("●", "*")]
        if words and words[0].startswith("vllm@"):
            names.append(words[0])
    return sorted(set(names))


def _show(system: System, unit: str, props: Iterable[str]) -> tuple[dict[str, list[str]], str]:
    shown = system.run(["systemctl", "show", *[f"--property={p}" for p in props], unit],
                       COMMAND_TIMEOUT)
    return parse_properties(shown.stdout), ("" if shown.ok else shown.said())


def find_hardening(options: Options, units: list[str], system: System) -> Hardening | str:
    """The chosen (or first) vLLM unit's hardening; the role's defaults where the host has
    no vLLM unit. A string says why neither could be read."""
    unit = _unit_name(options.unit) if options.unit else (units[0] if units else None)
    missing = ""
    if unit is not None:
        props, problem = _show(system, unit, ("LoadState", *HARDENING))
        if problem:
            return f"systemctl show {unit}: {problem}"
        if (props.get("LoadState") or [""])[0] == "loaded":
            written = system.run(["systemctl", "cat", unit], COMMAND_TIMEOUT)
            if not written.ok:
                return f"systemctl cat {unit}: {written.said()}"
            return unit_hardening(unit, props, written.stdout)
        missing = f"{unit}: LoadState={(props.get('LoadState') or ['?'])[0]}; "
    source = options.vllm_defaults or (str(REPO_DEFAULTS) if REPO_DEFAULTS.is_file() else None)
    text = system.read_text(source) if source else None
    if text is None:
        return (f"{missing}no vLLM unit on this host and no vllm role defaults to use "
                f"instead ({source or 'give --vllm-defaults FILE'} cannot be read)")
    hardening = defaults_hardening(read_role_defaults(text), source or "", system)
    return Hardening(f"{missing}no vLLM unit: the vllm role's defaults in {source}",
                     hardening.properties, hardening.notes)


def model_dirs(units: list[str], system: System) -> dict[str, str]:
    """Model directory -> the unit serving it, from each unit's ExecStart (--model)."""
    found: dict[str, str] = {}
    for unit in units:
        props, _ = _show(system, unit, ("ExecStart",))
        for value in props.get("ExecStart", []):
            # { path=... ; argv[]=/env/bin/python -m vllm... --model /dir ... ; ... }
            argv = re.search(r"argv\[\]=(.*?) ;", value)
            words = argv.group(1).split() if argv else []
            for i, word in enumerate(words):
                if word == "--model" and i + 1 < len(words):
                    found.setdefault(words[i + 1], unit)
                elif word.startswith("--model="):
                    found.setdefault(word[len("--model="):], unit)
    return found


# ---------------------------------------------------------------- the checks

def check_devices(gpus: Gpus, nodes: list[deviceallow.DeviceNode], proc_devices: str | None,
                  hardening: Hardening | str) -> Check:
    required = [n for n in nodes if REQUIRED_NODE.fullmatch(n.path)]
    if isinstance(hardening, str):
        return _fail("devices", hardening, "check the unit with `systemctl status vllm@NAME`, "
                     "or give --unit / --vllm-defaults")
    if proc_devices is None:
        return _fail("devices", "/proc/devices cannot be read", "run on the host itself, "
                     "not in a container without /proc")
    if not required:
        return _fail("devices", f"nvidia-smi lists {len(gpus.names)} GPU(s), yet /dev holds "
                     "none of nvidia0.., nvidiactl, nvidia-uvm",
                     "load the driver (`modprobe nvidia`, `nvidia-modprobe -u -c=0`) and check "
                     "`ls -l /dev/nvidia*`")
    try:
        allow = deviceallow.parse_device_allow(hardening.values("DeviceAllow"))
    except ValueError as exc:
        return _fail("devices", f"{hardening.source}: {exc}", "fix vllm_device_allow and "
                     "rerun the services stage")
    policy = (hardening.values("DevicePolicy") or ["auto"])[0]
    if policy == "auto" and not allow:
        return _pass("devices", f"DevicePolicy=auto and no DeviceAllow in {hardening.source}: "
                     f"every device is open to the engine ({', '.join(n.path for n in required)})")
    verdicts = [*deviceallow.resolve(allow, proc_devices,
                                     [n for n in required if "nvidia-caps" not in n.path],
                                     access=NODE_ACCESS),
                *deviceallow.resolve(allow, proc_devices,
                                     [n for n in required if "nvidia-caps" in n.path],
                                     access=CAPS_ACCESS)]
    lines = [f"{v.node.path} ({v.node.kind} {v.node.major}:{v.node.minor}, /proc/devices: "
             f"{'/'.join(v.groups) or 'no name'}) "
             + (f"allowed by '{v.allowed_by}'" if v.allowed else "DENIED")
             for v in verdicts]
    evidence = (f"DevicePolicy={policy}, DeviceAllow={', '.join(allow) or 'none'} from "
                f"{hardening.source}: " + "; ".join(lines))
    denied = [v for v in verdicts if not v.allowed]
    if not denied:
        return _pass("devices", evidence)
    wanted = sorted({f"char-{g} {CAPS_ACCESS if 'nvidia-caps' in v.node.path else NODE_ACCESS}"
                     for v in denied for g in v.groups[:1]})
    return _fail("devices", evidence,
                 f"the engine cannot open {', '.join(v.node.path for v in denied)}: add "
                 f"{', '.join(repr(w) for w in wanted) or 'their major numbers'} to "
                 "vllm_device_allow (roles/vllm/defaults/main.yml) and rerun the services stage")


TORCH_PROGRAM = r"""
import json, sys
MARK = sys.argv[1]
try:
    import torch
except Exception as exc:
    print(MARK + json.dumps({"error": "import torch: %s: %s" % (type(exc).__name__, exc)}))
    sys.exit(0)
out = {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": []}
try:
    out["available"] = torch.cuda.is_available()
    out["count"] = torch.cuda.device_count()
except Exception as exc:
    out["error"] = "%s: %s" % (type(exc).__name__, exc)
    print(MARK + json.dumps(out))
    sys.exit(0)
torch.backends.cuda.matmul.allow_tf32 = False
generator = torch.Generator().manual_seed(0)
a = torch.randn(512, 512, generator=generator)
b = torch.randn(512, 512, generator=generator)
want = a @ b
for i in range(out["count"]):
    device = {"index": i}
    try:
        device["name"] = torch.cuda.get_device_name(i)
        device["capability"] = "%d.%d" % torch.cuda.get_device_capability(i)
        got = (a.to("cuda:%d" % i) @ b.to("cuda:%d" % i)).cpu()
        device["max_abs_diff"] = float((got - want).abs().max())
        device["ok"] = bool(torch.allclose(got, want, rtol=1e-4, atol=1e-3))
    except Exception as exc:
        device["error"] = "%s: %s" % (type(exc).__name__, exc)
    out["devices"].append(device)
print(MARK + json.dumps(out))
"""

# Triton reads a kernel's source with inspect, so the kernel is written to a module in HOME
# (the transient unit's writable RuntimeDirectory) and imported from there. The Triton
# cache (~/.triton/cache) starts empty there, so the C helper is compiled now, as on the
# first GPU start of vLLM: triton/runtime/build.py compiles it with $CC, else gcc, else
# clang, against sysconfig's include directory of the running python
# (https://github.com/triton-lang/triton/blob/main/python/triton/runtime/build.py).
TRITON_PROGRAM = r"""
import json, os, shutil, sys, sysconfig
MARK = sys.argv[1]
KERNEL = '''
import triton
import triton.language as tl

@triton.jit
def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)
'''
scheme = sysconfig.get_default_scheme()
include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)
out = {"cc": os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang"),
       "include": include["include"],
       "python_h": os.path.isfile(os.path.join(include["include"], "Python.h"))}
try:
    import torch
    import triton
    out["triton"] = triton.__version__
    home = os.environ["HOME"]
    with open(os.path.join(home, "gpu_smoke_kernel.py"), "w") as handle:
        handle.write(KERNEL)
    sys.path.insert(0, home)
    import gpu_smoke_kernel
    x = torch.arange(1000, dtype=torch.float32, device="cuda")
    result = torch.empty_like(x)
    gpu_smoke_kernel.add[(4,)](x, x, result, 1000, BLOCK=256)
    torch.cuda.synchronize()
    out["ok"] = bool(torch.equal(result.cpu(), (x + x).cpu()))
except BaseException as exc:
    out["error"] = "%s: %s" % (type(exc).__name__, exc)
print(MARK + json.dumps(out))
"""

NCCL_WORKER = r"""
import json, sys
import torch
import torch.distributed as dist
mark, rank, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:%d" % port, rank=rank,
                        world_size=world)
tensor = torch.full((1 << 20,), float(rank + 1), device="cuda:%d" % rank)
dist.all_reduce(tensor)
torch.cuda.synchronize()
want = world * (world + 1) / 2
print(mark + json.dumps({"rank": rank, "value": float(tensor[0]), "want": want,
                         "ok": bool((tensor == want).all())}), flush=True)
dist.destroy_process_group()
"""

# One process per GPU, rendezvous on a loopback port (as torchrun does with
# --rdzv-endpoint 127.0.0.1), each rank's output read back by the launcher.
NCCL_LAUNCHER = r"""
import json, os, re, socket, subprocess, sys, time
MARK, TIMEOUT = sys.argv[1], float(sys.argv[2])
out = {}
try:
    import torch
    out["world"] = world = torch.cuda.device_count()
    out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as exc:
    out["error"] = "%s: %s" % (type(exc).__name__, exc)
    print(MARK + json.dumps(out))
    sys.exit(0)
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
env = dict(os.environ, NCCL_DEBUG=os.environ.get("NCCL_DEBUG", "INFO"))
started = time.monotonic()
ranks = [subprocess.Popen([sys.executable, "-c", WORKER, MARK, str(r), str(world), str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
         for r in range(world)]
out["ranks"], out["errors"], out["transport"] = [], [], []
for rank, proc in enumerate(ranks):
    try:
        text, _ = proc.communicate(timeout=max(1.0, TIMEOUT - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        for other in ranks:
            other.kill()
        text, _ = proc.communicate()
        out["errors"].append("rank %d: timed out after %.0f s" % (rank, TIMEOUT))
        continue
    lines = text.splitlines()
    answers = [json.loads(line[len(MARK):]) for line in lines if line.startswith(MARK)]
    out["ranks"] += answers
    out["transport"] += [line.strip() for line in lines
                         if re.search(r"Using network|via (P2P|SHM|NET)", line)][:2]
    if proc.returncode != 0 or not answers:
        out["errors"].append("rank %d: exit %s: %s" % (rank, proc.returncode, text[-800:]))
out["seconds"] = round(time.monotonic() - started, 1)
print(MARK + json.dumps(out))
"""

TORCH_BUILD_PROGRAM = r"""
import json, sys
try:
    import torch
    print(sys.argv[1] + json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda}))
except Exception as exc:
    print(sys.argv[1] + json.dumps({"error": "import torch: %s: %s" % (type(exc).__name__, exc)}))
"""


class Smoke:
    """One run of the checks on this host."""

    def __init__(self, options: Options, system: System) -> None:
        self.options = options
        self.system = system
        self.python = os.path.join(options.env, "bin", "python")
        self.prefix = f"gpu-smoke-{os.getpid()}"

    def _in_env(self, check: str, program: str, args: Sequence[str],
                hardening: Hardening) -> tuple[dict[str, Any] | None, Outcome]:
        """`program` in the env's python under the unit's hardening, and its answer."""
        name = f"{self.prefix}-{check}"
        argv = hardening.wrap([self.python, "-c", program, MARK, *args], name, {},
                              self.options.timeout)
        outcome = self.system.run(argv, self.options.timeout + COMMAND_TIMEOUT)
        if outcome.error:
            # Killed on our side: the service may still run until its RuntimeMaxSec.
            self.system.run(["systemctl", "stop", f"{name}.service"], COMMAND_TIMEOUT)
        return _program_answer(outcome), outcome

    def _ready(self, check: str, hardening: Hardening | str) -> Hardening | Check:
        """The hardening to run under, or the failed check saying why nothing can run."""
        if not self.system.is_file(self.python):
            return _fail(check, f"{self.python} does not exist", "give the env of the vLLM "
                         "deployment (--env), or rerun the python_env stage")
        if isinstance(hardening, str):
            return _fail(check, f"the vLLM unit's hardening is unknown: {hardening}",
                         "give --unit vllm@NAME or --vllm-defaults FILE")
        if not self.system.is_root():
            return _fail(check, "not run as root: systemd-run cannot start a service as the "
                         "vLLM unit's user", "run it with sudo")
        return hardening

    def _hardened_failure(self, check: str, outcome: Outcome, hardening: Hardening) -> Check:
        return _fail(check, f"{self.python} under systemd-run ({hardening.describe()}) gave no "
                     f"answer: {outcome.said()}",
                     "systemd must be the init system (run on the host itself, not in a "
                     "container); read the error above")

    def check_torch(self, gpus: Gpus, unit_hardening: Hardening | str) -> Check:
        hardening = self._ready("torch", unit_hardening)
        if isinstance(hardening, Check):
            return hardening
        answer, outcome = self._in_env("torch", TORCH_PROGRAM, [], hardening)
        if answer is None:
            return self._hardened_failure("torch", outcome, hardening)
        where = f"as {hardening.describe()}"
        if answer.get("error") or not answer.get("available"):
            return _fail("torch", f"torch {answer.get('torch', '?')} (CUDA {answer.get('cuda')}) "
                         f"{where}: torch.cuda.is_available()={answer.get('available')}"
                         + (f", {answer['error']}" if answer.get("error") else ""),
                         "a denied device node (see the devices check) or a CPU build of torch "
                         "(see torch_driver): fix that, then rerun")
        devices = answer.get("devices") or []
        lines = [f"cuda:{d['index']} {d.get('name', '?')} ({d.get('capability', '?')}): "
                 + (d["error"] if "error" in d else
                    f"512x512 matmul max |GPU-CPU| {d['max_abs_diff']:.2e}"
                    + ("" if d.get("ok") else " (beyond 1e-3 + 1e-4 relative)"))
                 for d in devices]
        evidence = (f"torch {answer.get('torch')} (CUDA {answer.get('cuda')}) {where}: "
                    f"{len(devices)} of {len(gpus.names)} GPUs seen; " + "; ".join(lines))
        if len(devices) != len(gpus.names):
            return _fail("torch", evidence, "torch sees fewer GPUs than nvidia-smi: check "
                         "CUDA_VISIBLE_DEVICES and the devices check")
        if not all(d.get("ok") for d in devices):
            return _fail("torch", evidence, "a GPU computes wrongly or fails: check `nvidia-smi "
                         "-q -d ECC,PAGE_RETIREMENT` and `dmesg | grep -i xid`")
        return _pass("torch", evidence)

    def check_triton(self, unit_hardening: Hardening | str) -> Check:
        hardening = self._ready("triton", unit_hardening)
        if isinstance(hardening, Check):
            return hardening
        answer, outcome = self._in_env("triton", TRITON_PROGRAM, [], hardening)
        if answer is None:
            return self._hardened_failure("triton", outcome, hardening)
        tools = (f"C compiler {answer.get('cc') or 'none (no $CC, gcc or clang)'}, "
                 f"{answer.get('include')}/Python.h "
                 f"{'present' if answer.get('python_h') else 'MISSING'}")
        if answer.get("ok") and not answer.get("error"):
            return _pass("triton", f"triton {answer.get('triton')} compiled its C helper and a "
                         f"kernel (add, checked) with an empty cache; {tools}")
        said = answer.get("error") or "the kernel's result differs from torch's"
        stderr = _tail(outcome.stderr, 600)
        evidence = (f"triton {answer.get('triton', '?')} as {hardening.describe()}: {said}; "
                    f"{tools}" + (f"; stderr: {stderr}" if stderr else ""))
        if not answer.get("python_h") or not answer.get("cc"):
            return _fail("triton", evidence, HEADERS_NEXT)
        return _fail("triton", evidence, "read the error above (`python -c 'import triton'` "
                     "in the env shows import problems)")

    def check_nccl(self, unit_hardening: Hardening | str) -> Check:
        hardening = self._ready("nccl", unit_hardening)
        if isinstance(hardening, Check):
            return hardening
        answer, outcome = self._in_env("nccl", f"WORKER = {NCCL_WORKER!r}\n{NCCL_LAUNCHER}",
                                       [str(self.options.timeout)], hardening)
        if answer is None:
            return self._hardened_failure("nccl", outcome, hardening)
        if answer.get("error"):
            return _fail("nccl", f"as {hardening.describe()}: {answer['error']}",
                         "see the torch check")
        world = int(answer.get("world") or 0)
        ranks = answer.get("ranks") or []
        values = ", ".join(f"rank {r['rank']}: {r['value']:g}" for r in ranks)
        evidence = (f"NCCL {answer.get('nccl')}, all-reduce (sum) of 1M floats over {world} "
                    f"GPU(s) in {answer.get('seconds')} s, want {world * (world + 1) / 2:g}: "
                    f"{values or 'no rank answered'}"
                    + (f"; {'; '.join(answer['transport'])}" if answer.get("transport") else "")
                    + (f"; {'; '.join(answer['errors'])}" if answer.get("errors") else ""))
        if world < 1:
            return _fail("nccl", evidence, "torch sees no GPU: see the torch check")
        if len(ranks) == world and all(r.get("ok") for r in ranks) and not answer.get("errors"):
            return _pass("nccl", evidence)
        return _fail("nccl", evidence, "rerun with NCCL_DEBUG=INFO for the transport chosen; "
                     "check `nvidia-smi topo -m`, and the fabric manager on NVSwitch systems "
                     "(`systemctl status nvidia-fabricmanager`)")

    def check_torch_driver(self, gpus: Gpus) -> Check:
        if not self.system.is_file(self.python):
            return _fail("torch_driver", f"{self.python} does not exist", "give the env "
                         "(--env), or rerun the python_env stage")
        outcome = self.system.run([self.python, "-c", TORCH_BUILD_PROGRAM, MARK],
                                  self.options.timeout)
        answer = _program_answer(outcome)
        if answer is None or answer.get("error"):
            return _fail("torch_driver", f"{self.python}: "
                         f"{(answer or {}).get('error') or outcome.said()}",
                         "rerun the python_env stage")
        rule = ("rule (orchestrator/data/cuda_compat.yml): the driver must support the torch "
                "wheel's CUDA major.minor, i.e. be at least NVIDIA's first Linux driver for "
                "that CUDA (CUDA release notes, Table 3); nvidia-smi's 'CUDA Version' is the "
                "newest CUDA the driver supports")
        built = answer.get("cuda")
        evidence = (f"torch {answer.get('torch')} built for CUDA {built}; driver "
                    f"{gpus.driver or '?'} supports CUDA {gpus.cuda or '?'}; {rule}")
        if not built:
            return _fail("torch_driver", evidence, "the env has a CPU build of torch: rerun "
                         "the python_env stage with the host's GPU facts (`orchestrate plan` "
                         "shows the build chosen)")
        if not gpus.cuda or not _version(gpus.cuda):
            return _fail("torch_driver", evidence, "nvidia-smi cannot tell the CUDA version "
                         "(libcuda.so is not installed with the driver): install the driver's "
                         "CUDA library package (libnvidia-compute / nvidia-driver-cuda)")
        if _version(built) <= _version(gpus.cuda):
            return _pass("torch_driver", evidence)
        return _fail("torch_driver", evidence, f"the driver is too old for this torch build: "
                     f"upgrade the driver to one supporting CUDA {built} (`orchestrate compat "
                     f"--driver {gpus.driver}` shows what fits it), or rerun the python_env "
                     "stage so the plan picks a build for this driver")

    def _model(self, units: list[str]) -> tuple[str | None, str]:
        if self.options.model:
            return self.options.model, "given with --model"
        served = model_dirs(units, self.system)
        sizes = {d: self.system.dir_size(d) for d in served}
        present = {d: s for d, s in sizes.items() if s is not None}
        if not present:
            return None, ""
        smallest = min(present, key=lambda d: (present[d], d))
        return smallest, (f"the smallest of the model directories the vLLM units serve "
                          f"({present[smallest] / 2**30:.2f} GiB, {served[smallest]})")

    def check_vllm(self, units: list[str], unit_hardening: Hardening | str) -> Check:
        model, why = self._model(units)
        if model is None:
            return _skip("vllm", "no model to serve: no --model DIR and no vllm@ unit here "
                         "serves a model directory (orchestrator/sandbox/modelgen.py makes a tiny "
                         "Qwen2 one)")
        hardening = self._ready("vllm", unit_hardening)
        if isinstance(hardening, Check):
            return hardening
        port = self.system.free_port()
        unit = f"{self.prefix}-vllm"
        argv = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                "--served-model-name", VLLM_SERVED_NAME, "--host", "127.0.0.1",
                "--port", str(port), "--enforce-eager", "--max-model-len", "512",
                "--gpu-memory-utilization", "0.2"]
        env = {**VLLM_ENVIRONMENT, "VLLM_CACHE_ROOT": f"/run/{unit}/cache"}
        # RuntimeMaxSec: stopped by systemd even if this program dies before stopping it.
        started = self.system.run(hardening.wrap(argv, unit, env, self.options.vllm_timeout
                                                 + 300.0, wait=False), COMMAND_TIMEOUT)
        what = f"{model} ({why}) on 127.0.0.1:{port} as {hardening.describe()}"
        if not started.ok:
            return _fail("vllm", f"systemd-run could not start vLLM for {what}: "
                         f"{started.said()}", "systemd must be the init system")
        try:
            return self._serve(unit, port, what)
        finally:
            self.system.run(["systemctl", "stop", f"{unit}.service"], 90.0)

    def _serve(self, unit: str, port: int, what: str) -> Check:
        base = f"http://127.0.0.1:{port}"
        begin = self.system.monotonic()
        health: tuple[int | None, str] = (None, "not asked")
        while self.system.monotonic() - begin < self.options.vllm_timeout:
            health = self.system.http("GET", f"{base}/health", None, 5.0)
            if health[0] == 200:
                break
            state = self.system.run(["systemctl", "is-active", f"{unit}.service"],
                                    COMMAND_TIMEOUT).stdout.strip()
            if state not in ("active", "activating"):
                return self._died(unit, f"vLLM exited before it was healthy ({state}) serving "
                                  f"{what}")
            self.system.sleep(2.0)
        else:
            return self._died(unit, f"GET {base}/health did not answer 200 within "
                              f"{self.options.vllm_timeout:.0f} s (last: {health[0]} "
                              f"{_tail(health[1], 200)}) serving {what}")
        up = self.system.monotonic() - begin
        body = {"model": VLLM_SERVED_NAME, "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": CHAT_PROMPT}]}
        status, text = self.system.http("POST", f"{base}/v1/chat/completions", body, 120.0)
        try:
            answer = json.loads(text)
            choice = answer["choices"][0]
            tokens = int(answer["usage"]["completion_tokens"])
        except (ValueError, KeyError, IndexError, TypeError):
            return self._died(unit, f"healthy after {up:.0f} s, then POST /v1/chat/completions "
                              f"-> {status}: {_tail(text, 400)} ({what})")
        evidence = (f"{what}: healthy after {up:.0f} s; POST /v1/chat/completions "
                    f"(temperature 0) -> {status}, {tokens} tokens, finish_reason="
                    f"{choice.get('finish_reason')}, answer="
                    f"{_tail(str((choice.get('message') or {}).get('content')), 200)!r}")
        if status == 200 and tokens > 0:
            return _pass("vllm", evidence)
        return self._died(unit, evidence)

    def _died(self, unit: str, evidence: str) -> Check:
        log = self.system.run(["journalctl", "--unit", f"{unit}.service", "--lines", "40",
                               "--no-pager", "--output", "cat"], COMMAND_TIMEOUT)
        return _fail("vllm", f"{evidence}; its log: {_tail(log.stdout, 2000) or log.said()}",
                     "read the log above: 'Free memory on device' means other processes hold "
                     "the GPU (nvidia-smi); a denied device or missing headers show in the "
                     "devices and triton checks")


def run_checks(options: Options, system: System) -> list[Check]:
    listing = system.run(["nvidia-smi", "-L"], COMMAND_TIMEOUT)
    table = system.run(["nvidia-smi"], COMMAND_TIMEOUT)
    gpus = parse_gpus(listing, table)
    nodes = system.device_nodes()
    if gpus.problem:
        module = system.read_text("/proc/driver/nvidia/version")
        evidence = (f"no usable NVIDIA GPU: {gpus.problem}; /proc/driver/nvidia/version: "
                    + (module.splitlines()[0].strip() if module else "absent (no nvidia "
                       "kernel module loaded)")
                    + f"; /dev/nvidia*: {', '.join(n.path for n in nodes) or 'none'}")
        if options.allow_no_gpu:
            return [_skip(c, f"{evidence} (--allow-no-gpu)") for c in CHECKS]
        return [_fail(c, evidence, NO_GPU_NEXT) for c in CHECKS]
    units = vllm_units(system)
    hardening = find_hardening(options, units, system)
    smoke = Smoke(options, system)
    return [check_devices(gpus, nodes, system.read_text("/proc/devices"), hardening),
            smoke.check_torch(gpus, hardening),
            smoke.check_triton(hardening),
            smoke.check_nccl(hardening),
            smoke.check_torch_driver(gpus),
            smoke.check_vllm(units, hardening)]


# ---------------------------------------------------------------- the command

def parse_args(argv: Sequence[str] | None) -> tuple[Options, bool]:
    parser = argparse.ArgumentParser(
        prog="gpu-smoke", description="GPU smoke test of this host (run as root): device "
        "nodes vs the vLLM unit's DeviceAllow, torch on every GPU under the unit's hardening, "
        "Triton's compile, an NCCL all-reduce, the torch build vs the driver, and vLLM "
        "serving one chat completion. Exit 1 when a check fails.")
    parser.add_argument("--env", default="/opt/qwen-serve/env",
                        help="the Python environment of vLLM (default: %(default)s)")
    parser.add_argument("--unit", help="the vLLM unit whose hardening applies, e.g. "
                        "vllm@qwen7b (default: the first vllm@ unit; the vllm role's "
                        "defaults where there is none)")
    parser.add_argument("--model", help="model directory to serve (default: the smallest a "
                        "vllm@ unit serves; the vllm check is skipped without one)")
    parser.add_argument("--vllm-defaults", help="the vllm role's defaults, for a host with "
                        f"no vLLM unit (default: {REPO_DEFAULTS} when present)")
    parser.add_argument("--allow-no-gpu", action="store_true", help="report skip instead of "
                        "fail when the host has no usable NVIDIA GPU")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds for each program in the env (default: %(default)s)")
    parser.add_argument("--vllm-timeout", type=float, default=600.0,
                        help="seconds for vLLM to become healthy (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    return Options(env=args.env, unit=args.unit, model=args.model,
                   vllm_defaults=args.vllm_defaults, allow_no_gpu=args.allow_no_gpu,
                   timeout=args.timeout, vllm_timeout=args.vllm_timeout), args.json


def report(host: str, options: Options, checks: list[Check]) -> dict[str, Any]:
    return {"host": host, "env": options.env, "unit": options.unit, "model": options.model,
            "passed": all(c.status != "fail" for c in checks),
            "checks": [c.to_dict() for c in checks]}


def render_text(result: dict[str, Any]) -> str:
    lines = [f"GPU smoke test of {result['host']} (env {result['env']})"]
    for c in result["checks"]:
        lines.append(f"{c['status'].upper():4}  {c['check']:12}  {c['evidence']}")
        if c["next_step"]:
            lines.append(f"{'':4}  {'':12}  next: {c['next_step']}")
    failed = [c["check"] for c in result["checks"] if c["status"] == "fail"]
    lines.append(f"failed: {', '.join(failed)}" if failed else "no check failed")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, system: System | None = None) -> int:
    options, as_json = parse_args(argv)
    system = system or System()
    result = report(system.hostname(), options, run_checks(options, system))
    print(json.dumps(result, indent=2) if as_json else render_text(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
