"""Probes run on the hosts over SSH: GPUs, the torch stack, weights, services, sockets.

One SSH connection and one remote command per host: orchestrator/verify/hostcollect.py runs
on the host's python3 and returns raw evidence as JSON; the pure functions here turn
that evidence into ProbeResults by comparing it with the plan. Hosts are probed in
parallel, each within its own time limit, so one dead host does not hold up the others.
The collector runs through Ansible's own connection (playbooks/probe.yml, by
ansible-runner), so probes reach hosts exactly as the stages and `facts` do: the host's
ansible_* variables, ansible.cfg, ~/.ssh/config, ProxyJump bastions and known_hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from orchestrator.facts.nvidia_smi import (
    HARDWARE_SLOWDOWNS,
    NEXT_STEPS,
    ErrorKind,
    GpuFacts,
    GpuHealth,
    GpuInfo,
    HealthReport,
    SmiError,
    parse_nvidia_smi,
    parse_xml_health,
    summarize,
)
from orchestrator.knowledge.compat import CompatError, parse_driver_version
from orchestrator.knowledge.roles import load_role_defaults
from orchestrator.plan.planner import HostPlan, Plan
from orchestrator.run.runner import run_on_each_host
from orchestrator.verify import hostcollect
from orchestrator.verify.httpprobe import ProbeReport, ProbeResult, probe_plan

SSH_TIMEOUT = 30.0
# Beyond a host's timeout before it is reported and left behind: Ansible's start, the
# connection's own timeout and the task's timeout may add up past it.
SSH_GRACE = 10.0
PLAYBOOK = "playbooks/probe.yml"
# The probed host's group in the run's inventory: the run is limited to it, so that the
# rest of an operator's inventory is left alone.
GROUP = "orchestrate_probe"
_WILDCARDS = frozenset({"0.0.0.0", "::"})
# nvml.h nvmlClocksEventReason* bits, by the names nvidia-smi's XML uses.
_NVML_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
                 0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
                 0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
                 0x100: "display_clocks_setting"}
_NVML_KINDS: dict[str, ErrorKind] = {
    "NVMLError_DriverNotLoaded": "driver_not_loaded",
    "NVMLError_LibRmVersionMismatch": "version_mismatch",
    "NVMLError_NoPermission": "device_handle",
    "NVMLError_GpuIsLost": "device_handle",
}
_WEIGHTS_NOTE = ("sizes checked here; sha256 was checked at install by the models stage "
                 "(hashing many GB is too slow for a probe)")

Collector = Callable[[HostPlan, float], dict[str, Any]]
# What the collector is asked of a host (collector_config, or less for a quick look).
Configure = Callable[[HostPlan, float], dict[str, Any]]
# The collector's evidence of a host -> its probe results (interpret, or a part of it).
Judge = Callable[[HostPlan, Mapping[str, Any]], list[ProbeResult]]

class CollectError(Exception):
    """SSH or the remote collector failed; carries the operator's next step."""

    def __init__(self, message: str, next_step: str) -> None:
        super().__init__(message)
        self.next_step = next_step


@dataclasses.dataclass(frozen=True)
class Service:
    deployment: str
    unit: str
    port: int
    bind: str


# ---------------------------------------------------------------- what to collect

def vllm_arg(args: list[Any], flag: str) -> str | None:
    """The value of `flag` as vLLM's argparse reads it: the last one given wins, and
    `--flag value` and `--flag=value` are the same."""
    found = None
    for i, value in enumerate(map(str, args)):
        if value == flag and i + 1 < len(args):
            found = str(args[i + 1])
        elif value.startswith(flag + "="):
            found = value[len(flag) + 1:]
    return found


def services(host: HostPlan) -> list[Service]:
    """Each deployment's systemd unit, and the port and address it should listen on."""
    v = host.vars
    out = [Service(d["name"], f"vllm@{d['name']}.service", int(d["port"]),
                   vllm_arg(list(d.get("args") or []), "--host") or "0.0.0.0")
           for d in v.get("vllm_deployments") or []]
    if v.get("ollama_models"):
        # One Ollama server serves every Ollama deployment of the host (roles/ollama).
        defaults = load_role_defaults()
        out += [Service(t.deployment, "ollama.service",
                        int(v.get("ollama_port", defaults.ollama_port)),
                        str(v.get("ollama_host", defaults.ollama_host)))
                for t in host.probes if t.engine == "ollama"]
    return out


def _marker(host: HostPlan) -> str:
    """The weights' completion marker: the host's model_weights_marker, else the role's."""
    return str(host.vars.get("model_weights_marker") or load_role_defaults().model_weights_marker)


def max_restarts(host: HostPlan, service: Service) -> int:
    """Restarts (systemd's NRestarts) above which a unit is restarting in a loop: the
    role's <role>_max_restarts (a host's vars may set it), which its verify step uses too."""
    defaults = load_role_defaults()
    name, default = (("ollama_max_restarts", defaults.ollama_max_restarts)
                     if service.unit == "ollama.service" else
                     ("vllm_max_restarts", defaults.vllm_max_restarts))
    return int(host.vars.get(name, default))


def environments(host: HostPlan) -> dict[str, str]:
    """Environment path -> the deployment it serves ("" for the host's shared one)."""
    v = host.vars
    paths = v.get("python_env_paths") or [v.get("python_env_path")
                                           or load_role_defaults().python_env_path]
    owner = {d.get("env_path"): d["name"] for d in v.get("vllm_deployments") or []}
    return {str(p): owner.get(p, "") for p in paths}


def collector_config(host: HostPlan, deadline: float) -> dict[str, Any]:
    v = host.vars
    return {
        "deadline_s": deadline,
        "command_timeout_s": min(20.0, deadline),
        "torch_timeout_s": deadline,
        "gpu": host.profile == "gpu",
        "nvidia_smi": v.get("gpu_check_nvidia_smi") or load_role_defaults().gpu_check_nvidia_smi,
        "envs": list(environments(host)),
        "models": [{"name": m["name"], "dest": m["dest"]}
                   for m in v.get("model_weights_models") or []],
        "marker": _marker(host),
        "units": list(dict.fromkeys(s.unit for s in services(host))),
    }


def collector_program(config: Mapping[str, Any]) -> str:
    """The Python program for the host's `python3 -`: the collector and its call."""
    source = Path(hostcollect.__file__).read_text(encoding="utf-8")
    return f"{source}\n\nmain({json.dumps(config)!r})\n"


# ---------------------------------------------------------------- SSH, through Ansible

def host_python(host: HostPlan) -> str:
    """The interpreter the collector runs with on `host`: the inventory's, else python3."""
    interpreter = host.vars.get("ansible_python_interpreter")
    if isinstance(interpreter, str) and interpreter.strip() and not (
            interpreter.startswith("auto") or "{{" in interpreter):
        return interpreter.strip()
    return "python3"


def collector_host_entry(host: HostPlan, program: Path, timeout: float) -> dict[str, Any]:
    """`host`'s inventory entry for playbooks/probe.yml running `program`."""
    # The host's ansible_* variables, as the facts run writes them (run/gather.py): the
    # same connection as every other run; read-only, so never sudo. The interpreter is
    # named, so that Ansible does not spend a round trip discovering it.
    return {**host.connection,
            **{k: v for k, v in host.vars.items() if k.startswith("ansible_")},
            "ansible_python_interpreter": host_python(host), "ansible_become": False,
            "orchestrate_collector_program": str(program),
            "orchestrate_collector_timeout": max(1, int(timeout))}


def _connection_failure(host: HostPlan, where: str, message: str, reach: str) -> CollectError:
    conn = host.connection
    address, port = str(conn.get("ansible_host", host.name)), int(conn.get("ansible_port", 22))
    key = conn.get("ansible_ssh_private_key_file")
    # What ssh said, without Ansible's preamble ("Data could not be sent ... over ssh: ").
    said = f"ssh {where}: {message.partition('over ssh: ')[2] or message}".strip()[-500:]
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in message or "Host key for" in message:
        return CollectError(said, f"{host.name}'s host key changed: if the host was "
                            f"reinstalled, verify the new key and `ssh-keygen -R "
                            f"'[{address}]:{port}'`; otherwise treat it as a possible attack")
    if "Host key verification failed" in message or "host key is known for" in message:
        return CollectError(said, f"{host.name}'s host key is not known here: check it and "
                            f"add it (`ssh -p {port} {address}` once, or `ssh-keyscan -p {port} "
                            f"{address} >> ~/.ssh/known_hosts`), or for throwaway hosts set "
                            "ansible_ssh_common_args: -o StrictHostKeyChecking=no")
    if "Permission denied" in message:
        return CollectError(said, f"the host refused the key: check ssh_key "
                            f"({key or 'none given: ssh agent and default keys'}) and "
                            f"{conn.get('ansible_user')}'s authorized_keys on {host.name}")
    return CollectError(said, reach)


def run_collector(host: HostPlan, timeout: float = SSH_TIMEOUT, *,
                  configure: Configure = collector_config,
                  operator_inventory: Path | None = None) -> dict[str, Any]:
    """Run the collector on `host` through Ansible's own connection (one ansible-runner run
    of playbooks/probe.yml, reading the operator's inventory first as the stages do),
    within `timeout` seconds."""
    # Ansible's start and the connection come first: the collector gets what is left,
    # so that its own report of what ran out of time still gets back.
    started = min(10.0, timeout / 2)
    with tempfile.TemporaryDirectory(prefix="orchestrate-probe-") as tmp:
        run_path = Path(tmp)
        program = run_path / "collector.py"
        program.write_text(collector_program(configure(host, max(1.0, timeout - started))),
                           encoding="utf-8")
        answered = run_on_each_host(
            run_path, PLAYBOOK, GROUP, {host.name: collector_host_entry(host, program, timeout)},
            operator_inventory, connect_timeout_s=int(started), forks=1)
    found = judge_collector_answer(host, *answered.get(host.name, ("", {})), timeout)
    if isinstance(found, CollectError):
        raise found
    return found


def judge_collector_answer(host: HostPlan, event: str, res: Mapping[str, Any],
                           timeout: float) -> dict[str, Any] | CollectError:
    """The collector's evidence from its task's last event on `host` (`event`, "" when
    none came, and its result `res`), or why there is none and what to do."""
    conn = host.connection
    address, port = str(conn.get("ansible_host", host.name)), int(conn.get("ansible_port", 22))
    user = conn.get("ansible_user")
    where = f"{user + '@' if user else ''}{address}:{port}"
    reach = (f"check that {host.name} is up and sshd answers there: `ssh -p {port} "
             f"{user + '@' if user else ''}{address} true` from this machine; fix the fleet's "
             "address, ssh_port, ssh_user or ssh_key")
    if not event or "Timed out after" in str(res.get("msg") or ""):
        return CollectError(f"ssh {where}: no complete answer within {timeout:.0f} s",
                            f"{reach}; a host under heavy load may need a longer timeout")
    if event == "runner_on_unreachable":
        return _connection_failure(host, where, str(res.get("msg") or ""), reach)
    failure = f"{res.get('module_stderr') or ''}{res.get('stderr') or ''}"
    if event == "runner_on_failed" and (res.get("rc") == 127 or "not found" in failure):
        return CollectError(f"ssh {where}: {host_python(host)} not found: "
                            f"{failure.strip()[-300:]}",
                            f"install python3 on {host.name} (Ansible needs it too) or set "
                            "ansible_python_interpreter")
    try:
        evidence = json.loads(str(res.get("stdout") or ""))
    except ValueError:
        evidence = None
    if event != "runner_on_ok" or not isinstance(evidence, dict):
        said = failure or str(res.get("stdout") or "") or str(res.get("msg") or "")
        return CollectError(f"ssh {where}: the collector exited {res.get('rc')}: "
                            f"{said.strip()[-500:]}",
                            f"run `{host_python(host)} --version` on {host.name}: the "
                            "collector needs Python 3.9 or newer")
    return evidence


# ---------------------------------------------------------------- interpretation

def _result(host: HostPlan, deployment: str, probe: str, ok: bool, evidence: str,
            next_step: str | None = None) -> ProbeResult:
    return ProbeResult(host=host.name, deployment=deployment, probe=probe, passed=ok,
                       evidence=evidence, next_step=None if ok else next_step)


def _skip(host: HostPlan, probe: str, why: str) -> ProbeResult:
    return ProbeResult(host=host.name, deployment="", probe=probe, passed=True, status="skip",
                       evidence=why)


def _output(record: Mapping[str, Any]) -> str:
    return f"{record.get('stdout') or ''}{record.get('stderr') or ''}"


def _command_failed(record: Mapping[str, Any]) -> str | None:
    """Why a command gave no usable output (could not run, timed out), or None."""
    if record.get("error"):
        return f"`{shlex.join(record.get('argv') or [])}`: {record['error']}"
    return None


def _smi_error(kind: ErrorKind, message: str) -> GpuFacts:
    return GpuFacts(error=SmiError(kind=kind, message=message, next_step=NEXT_STEPS[kind]))


def _from_nvml(nvml: Mapping[str, Any]) -> tuple[GpuFacts, HealthReport]:
    gpus = [GpuInfo(index=g["index"], name=g["name"], uuid=g.get("uuid"),
                    memory_total_mib=g.get("memory_total_mib"),
                    compute_capability=g.get("compute_capability"), mig_mode=g.get("mig_mode"))
            for g in nvml.get("gpus", [])]
    health = [GpuHealth(index=g["index"], name=g["name"], ecc_mode=g.get("ecc_mode"),
                        ecc_volatile_uncorrected=g.get("ecc_volatile_uncorrected"),
                        clock_event_reasons=[name for bit, name in _NVML_REASONS.items()
                                             if (g.get("clock_event_reasons_mask") or 0) & bit])
              for g in nvml.get("gpus", [])]
    error = None
    if nvml.get("error"):
        kind = _NVML_KINDS.get(str(nvml["error"]), "unrecognized")
        error = SmiError(kind=kind, message=f"NVML: {nvml.get('message')}",
                         next_step=NEXT_STEPS[kind])
    facts = GpuFacts(driver_version=nvml.get("driver_version"),
                     cuda_version=nvml.get("cuda_version"), gpus=gpus, error=error)
    return facts, HealthReport(gpus=health, error=error)


def gpu_evidence(gpu: Mapping[str, Any]) -> tuple[GpuFacts, HealthReport | None, str]:
    """GPU facts, health and a label of the source, from the collector's `gpu` part."""
    if gpu.get("source") == "nvml":
        return (*_from_nvml(gpu["nvml"]), "NVML")
    if not gpu.get("path"):
        return (_smi_error("not_installed", "nvidia-smi: command not found (PATH "
                           f"{gpu.get('searched', '?')})"), None, "nvidia-smi")
    label = f"nvidia-smi ({gpu['path']})"
    table = gpu["table"]
    failed = _command_failed(table)
    if failed:
        return _smi_error("unrecognized", failed), None, label
    facts = parse_nvidia_smi(_output(table))
    csv = gpu.get("csv") or {}
    if facts.gpus and csv.get("rc") == 0:
        extra = {g.index: g for g in parse_nvidia_smi(csv["stdout"]).gpus}
        facts = dataclasses.replace(facts, gpus=[dataclasses.replace(
            g, name=extra[g.index].name,  # the table truncates long names
            uuid=g.uuid or extra[g.index].uuid,
            memory_total_mib=g.memory_total_mib or extra[g.index].memory_total_mib,
            compute_capability=extra[g.index].compute_capability,
            mig_mode=g.mig_mode or extra[g.index].mig_mode)
            if g.index in extra else g for g in facts.gpus])
    listed = gpu.get("list") or {}
    if facts.gpus and listed.get("rc") == 0:
        facts = dataclasses.replace(facts,
                                    mig_devices=parse_nvidia_smi(listed["stdout"]).mig_devices)
    health = None
    if "xml" in gpu:
        failed = _command_failed(gpu["xml"])
        health = (HealthReport(error=SmiError("unrecognized", failed, NEXT_STEPS["unrecognized"]))
                  if failed else parse_xml_health(_output(gpu["xml"])))
    return facts, health, label


def _truthy(value: Any) -> bool:
    # Inventory values arrive as YAML booleans or as the strings Ansible's bool filter reads.
    return value is True or str(value).strip().lower() in ("true", "yes", "on", "1")


def _driver_too_old(driver: str | None, minimum: str) -> bool:
    try:
        return driver is None or parse_driver_version(driver) < parse_driver_version(minimum)
    except CompatError:
        return True


def gpu_results(host: HostPlan, facts: GpuFacts | None, health: HealthReport | None,
                source: str) -> list[ProbeResult]:
    if host.profile != "gpu" or facts is None:
        why = f"profile {host.profile}: no GPU is planned on this host (torch CPU build)"
        return [_skip(host, "gpu", why), _skip(host, "gpu_health", why)]
    v = host.vars
    if facts.error is not None and not facts.gpus:
        return [_result(host, "", "gpu", False,
                        f"{source}: {facts.error.kind}: {' '.join(facts.error.message.split())}",
                        facts.error.next_step),
                _skip(host, "gpu_health", "no GPU report to read health from (see the gpu "
                      "probe)")]
    minimum = str(v.get("gpu_check_min_driver") or "")
    count = int(v.get("gpu_check_expected_count") or 0)
    name = str(v.get("gpu_check_expected_name") or "")
    # The exact version or branch roles/nvidia_driver installs, where it manages the driver.
    managed = _truthy(v.get("nvidia_driver_manage"))
    exact = str(v.get("nvidia_driver_version") or "") if managed else ""
    branch = "" if exact or not managed else str(v.get("nvidia_driver_branch") or "")
    problems: list[str] = []
    steps: list[str] = []
    if minimum and _driver_too_old(facts.driver_version, minimum):
        problems.append(f"driver {facts.driver_version} is older than {minimum}, which the "
                        "planned torch CUDA build needs")
        steps.append(f"install driver branch {minimum.split('.')[0]} or newer (drivers stage) "
                     "and reboot")
    driver = facts.driver_version or ""
    if (exact and driver != exact) or (branch and driver.split(".")[0] != branch):
        problems.append(f"driver {facts.driver_version} is not the planned "
                        + (f"{exact} (nvidia_driver_version)" if exact
                           else f"branch {branch} (nvidia_driver_branch)"))
        steps.append("rerun the drivers stage (`orchestrate up --only drivers`), then reboot "
                     f"{host.name} so that the installed driver is the one loaded")
    mismatch = []
    if count and len(facts.gpus) != count:
        mismatch.append(f"{len(facts.gpus)} GPU(s), the plan says {count}")
    if name and any(name.lower() not in g.name.lower() for g in facts.gpus):
        mismatch.append(f"not every GPU is a {name}")
    if mismatch:
        problems += mismatch
        steps.append("fix the fleet's gpu: {name, count} for this host, or check "
                     "`lspci | grep -i nvidia` on it for a GPU that dropped off the bus")
    if facts.error is not None:
        problems.append(f"{facts.error.kind}: {' '.join(facts.error.message.split())}")
        steps.append(facts.error.next_step)
    planned = ", ".join([f"driver >= {minimum}"] * bool(minimum)
                        + [f"driver {exact}"] * bool(exact)
                        + [f"driver branch {branch}"] * bool(branch)
                        + [f"{count} GPU(s)"] * bool(count) + [name] * bool(name))
    out = [_result(host, "", "gpu", not problems,
                   f"{source}: {summarize(facts)}"
                   + (f"; plan: {planned}" if planned else "")
                   + (f"; {'; '.join(problems)}" if problems else ""),
                   "; ".join(steps))]
    out.append(_health_result(host, health, source))
    return out


def _health_result(host: HostPlan, health: HealthReport | None, source: str) -> ProbeResult:
    if health is None:
        return _result(host, "", "gpu_health", False, f"{source}: no ECC or clock report",
                       f"run `nvidia-smi -q -x` on {host.name} by hand")
    if health.error is not None and not health.gpus:
        return _result(host, "", "gpu_health", False,
                       f"{source} -q -x: {health.error.kind}: "
                       f"{' '.join(health.error.message.split())}", health.error.next_step)
    lines = []
    for g in health.gpus:
        ecc = ("ECC " + (g.ecc_mode or "n/a")
               + (f", {g.ecc_volatile_uncorrected} volatile uncorrectable"
                  if g.ecc_volatile_uncorrected is not None else ""))
        clocks = ", ".join(g.clock_event_reasons) or "none"
        lines.append(f"GPU {g.index} {g.name}: {ecc}; clock event reasons active: {clocks}")
    ecc_bad = [g.index for g in health.gpus if (g.ecc_volatile_uncorrected or 0) > 0]
    slow = [g.index for g in health.gpus
            if set(g.clock_event_reasons) & set(HARDWARE_SLOWDOWNS)]
    steps = []
    if ecc_bad:
        steps.append(f"GPU(s) {ecc_bad} had uncorrectable ECC errors since the driver loaded: "
                     f"drain {host.name}, read `nvidia-smi -q -d ECC,ROW_REMAPPER,"
                     "PAGE_RETIREMENT` and `dmesg | grep -i xid`, reset the GPU (`nvidia-smi "
                     "-r -i N` with nothing running on it) or reboot; if the errors come back, "
                     "have the card replaced")
    if slow:
        steps.append(f"GPU(s) {slow} are slowed by heat or power delivery: read `nvidia-smi "
                     "-q -d TEMPERATURE,POWER,PERFORMANCE` and check fans, airflow and the "
                     "power supply")
    return _result(host, "", "gpu_health", not steps, f"{source}: " + "; ".join(lines),
                   "; ".join(steps))


def _cuda_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def stack_result(host: HostPlan, deployment: str, env: Mapping[str, Any],
                 facts: GpuFacts | None) -> ProbeResult:
    """torch-check in one environment against the plan: version and build, CUDA seen,
    a matmul per GPU, and a CUDA build the driver supports."""
    v = host.vars
    check = env["torch_check"]
    rerun = f"rerun the python_env stage (`orchestrate up --only python_env`) for {host.name}"
    if not env.get("installed"):
        where = "" if env.get("exists") else f" ({env['path']} does not exist either)"
        return _result(host, deployment, "stack", False, f"{check} is missing{where}", rerun)
    run = env["run"]
    failed = _command_failed(run)
    if failed:
        return _result(host, deployment, "stack", False, failed,
                       f"run {check} on {host.name} by hand; a hang in CUDA set-up points at "
                       "the driver (see the gpu probe)")
    try:
        info = json.loads(run["stdout"])
    except ValueError:
        info = None
    if not isinstance(info, dict) or "error" in info or run["rc"] != 0:
        said = ((info.get("error") if isinstance(info, dict) else None)
                or _output(run).strip()[-300:])
        return _result(host, deployment, "stack", False,
                       f"{check} exited {run['rc']}: {said}", rerun)
    requirement = str(v.get("pytorch_requirement") or "")
    expected = requirement.split("==", 1)[1] if "==" in requirement else None
    label = expected.partition("+")[2] if expected else ""
    # The local version label names the build: +cu130 -> CUDA 13.0, +cpu -> none.
    build = None if label in ("", "cpu") else f"{label[2:-1]}.{label[-1]}"
    version, cuda_build = info.get("version"), info.get("cuda_build")
    devices = info.get("devices") or []
    problems: list[tuple[str, str]] = []
    if expected and version != expected:
        problems.append((f"the plan says {requirement}",
                         f"something replaced torch: read {env['path']}/constraints.txt; "
                         f"{rerun}"))
    if label and cuda_build != build:
        problems.append((f"CUDA build {cuda_build}, the plan's build is {build or 'CPU'}",
                         rerun))
    if not (info.get("cpu") or {}).get("ok"):
        problems.append((f"the CPU matmul failed: {info.get('cpu')}", rerun))
    if v.get("pytorch_require_cuda") and not info.get("cuda_available"):
        problems.append(("torch.cuda.is_available() is False",
                         "a CUDA build that sees no GPU: check the driver (the gpu probe, "
                         f"`nvidia-smi` on {host.name}) and CUDA_VISIBLE_DEVICES"))
    expected_gpus = int(v.get("pytorch_expected_gpus") or 0)
    if expected_gpus and info.get("device_count") != expected_gpus:
        problems.append((f"torch sees {info.get('device_count')} GPU(s), the plan says "
                         f"{expected_gpus}", "check CUDA_VISIBLE_DEVICES and the gpu probe"))
    bad = [d for d in devices if not d.get("ok")]
    if bad:
        problems.append(("matmul failed on " + ", ".join(
            f"{d.get('device')} ({d.get('error') or d.get('max_abs_error')})" for d in bad),
            f"read `dmesg | grep -i xid` on {host.name}; reset or replace that GPU"))
    driver_cuda = facts.cuda_version if facts is not None else None
    if cuda_build and driver_cuda and _cuda_tuple(cuda_build) > _cuda_tuple(driver_cuda):
        problems.append((f"the driver supports CUDA {driver_cuda} only",
                         "install a newer driver (drivers stage), or plan a torch build for "
                         f"this driver (`orchestrate compat --driver {facts.driver_version}`)"
                         if facts is not None else rerun))
    if cuda_build:
        what = (f"CUDA {cuda_build} build"
                + (f" (the driver supports CUDA {driver_cuda})" if driver_cuda else "")
                + f", CUDA available {info.get('cuda_available')}, "
                + f"{info.get('device_count')} GPU(s)")
    else:
        what = "CPU build" + (", as planned" if label == "cpu" and not problems else "")
    matmuls = ", ".join([f"cpu {'ok' if (info.get('cpu') or {}).get('ok') else 'FAILED'}"]
                        + [f"{d.get('device')} {d.get('name', '')} "
                           f"{'ok' if d.get('ok') else 'FAILED'}" for d in devices])
    evidence = (f"{check}: torch {version}, {what}; matmul: {matmuls}"
                + (f"; {'; '.join(p for p, _ in problems)}" if problems else ""))
    return _result(host, deployment, "stack", not problems, evidence,
                   "; ".join(dict.fromkeys(s for _, s in problems)))


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**26 else f"{size} bytes"


def weights_result(host: HostPlan, entry: Mapping[str, Any],
                   found: Mapping[str, Any] | None) -> ProbeResult:
    """The completion marker (or a local copy's manifest.json) and every listed file's size."""
    name, dest = str(entry["name"]), str(entry["dest"])
    source = entry.get("source", "")
    marker = _marker(host)
    rerun = (f"rerun the models stage (`orchestrate up --only models`) for {host.name}; it "
             "resumes downloads and verifies every file")
    if found is None or not found.get("exists"):
        return _result(host, name, "weights", False, f"{dest} does not exist", rerun)
    listing = found["marker"]
    what = f"marker {marker}"
    if not listing.get("present"):
        listing = found.get("manifest") or {}
        what = "manifest.json (local copy)"
        if source != "local":
            return _result(host, name, "weights", False,
                           f"{dest}: no completion marker {marker}: the download did not "
                           "finish or was not verified", rerun)
        if not listing.get("present"):
            config = "found" if found.get("config_json") else "missing"
            return _result(host, name, "weights", bool(found.get("config_json")),
                           f"{dest}: a local copy without manifest.json, so only its presence "
                           f"is checked: config.json {config}",
                           f"copy a complete model directory (with config.json) and {rerun}")
    if listing.get("error") or not isinstance((listing.get("content") or {}).get("files"), dict):
        return _result(host, name, "weights", False,
                       f"{listing.get('path')}: {listing.get('error') or 'no files listed'}",
                       f"remove {listing.get('path')} and {rerun}")
    identity = listing["content"].get("identity") or {}
    if source == "modelscope" and identity.get("source") == "modelscope":
        have = f"{identity.get('model_id')}@{identity.get('revision')}"
        want = f"{entry.get('model_id')}@{entry.get('revision') or 'master'}"
        if have != want:
            return _result(host, name, "weights", False,
                           f"{dest}: the marker is for {have}, the plan wants {want}", rerun)
    files: dict[str, Any] = listing["content"]["files"]
    sizes: Mapping[str, int | None] = found.get("sizes") or {}
    wrong = [f"{p} {'missing' if sizes.get(p) is None else f'{sizes[p]} bytes'} "
             f"(listed {spec.get('size')})"
             for p, spec in files.items()
             if p in sizes and sizes.get(p) != spec.get("size")]
    wrong += [f"{p} (outside the directory)" for p in found.get("outside") or []]
    total = sum(int(spec.get("size") or 0) for spec in files.values())
    if wrong:
        return _result(host, name, "weights", False,
                       f"{dest}: {len(wrong)} of {len(files)} files differ from the {what}: "
                       + "; ".join(wrong[:5]) + ("; ..." if len(wrong) > 5 else ""),
                       f"remove those files and {marker} from {dest}, then {rerun}")
    return _result(host, name, "weights", True,
                   f"{dest}: {what}, {len(files)} files, {_gib(total)}, all at their listed "
                   f"size; {_WEIGHTS_NOTE}")


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def service_results(host: HostPlan, service: Service, unit: Mapping[str, Any] | None,
                    listening: Mapping[str, Any]) -> list[ProbeResult]:
    logs = f"on {host.name}: journalctl -u {service.unit.removesuffix('.service')} -n 200"
    if unit is None or _command_failed(unit) or unit.get("rc") != 0:
        said = (_command_failed(unit) if unit is not None else None) or (
            _output(unit).strip() if unit is not None else "not queried")
        state = _result(host, service.deployment, "service", False,
                        f"systemctl show {service.unit}: {said}",
                        f"systemd does not answer on {host.name}: is it the init system?")
    else:
        p = _properties(unit["stdout"])
        restarts = int(p["NRestarts"]) if p.get("NRestarts", "").isdigit() else 0
        facts = (f"{service.unit}: LoadState={p.get('LoadState')} "
                 f"ActiveState={p.get('ActiveState')} SubState={p.get('SubState')} "
                 f"Result={p.get('Result')} NRestarts={p.get('NRestarts')} "
                 f"MainPID={p.get('ExecMainPID')} started {p.get('ExecMainStartTimestamp') or '-'}")
        if p.get("LoadState") != "loaded":
            state = _result(host, service.deployment, "service", False, facts,
                            f"the unit is not installed: rerun the services stage "
                            f"(`orchestrate up --only services`) for {host.name}")
        elif p.get("ActiveState") == "active" and restarts <= max_restarts(host, service):
            state = _result(host, service.deployment, "service", True, facts)
        elif p.get("ActiveState") == "active" or p.get("SubState") == "auto-restart":
            state = _result(host, service.deployment, "service", False,
                            f"{facts}: restarting in a loop",
                            f"it crashes and systemd starts it again: {logs}")
        elif p.get("Result") == "start-limit-hit":
            state = _result(host, service.deployment, "service", False,
                            f"{facts}: it crashed in a loop until systemd stopped restarting "
                            "it (StartLimitBurst)",
                            f"{logs}; fix the cause, then `systemctl reset-failed "
                            f"{service.unit}` and `systemctl start {service.unit}` (or rerun "
                            "the services stage)")
        else:
            state = _result(host, service.deployment, "service", False,
                            f"{facts}: not running",
                            f"{logs}; then `systemctl restart {service.unit}` or rerun the "
                            "services stage")
    return [state, listening_result(host, service, listening, logs)]


def _addresses(bind: str) -> set[str]:
    if bind in ("", *_WILDCARDS):
        return set(_WILDCARDS)
    return {"127.0.0.1", "::1"} if bind == "localhost" else {bind}


def listening_result(host: HostPlan, service: Service, listening: Mapping[str, Any],
                     logs: str) -> ProbeResult:
    sockets = listening.get("sockets") or []
    on_port = sorted({str(s["address"]) for s in sockets if s["port"] == service.port})
    ports = sorted({int(s["port"]) for s in sockets})
    planned = _addresses(service.bind)
    where = f"planned {service.bind}:{service.port}"
    if listening.get("errors") and not sockets:
        return _result(host, service.deployment, "listening", False,
                       f"{where}; cannot read the sockets: {'; '.join(listening['errors'])}",
                       f"run `ss -ltn` on {host.name}")
    if not on_port:
        return _result(host, service.deployment, "listening", False,
                       f"{where}: nothing listens on TCP port {service.port} (listening: "
                       f"{', '.join(map(str, ports)) or 'none'})",
                       f"{service.unit} does not serve: see the service probe; {logs}")
    if planned & set(on_port):
        return _result(host, service.deployment, "listening", True,
                       f"{where}: listening on {', '.join(on_port)}")
    wider = bool(_WILDCARDS & set(on_port))
    return _result(host, service.deployment, "listening", False,
                   f"{where}: listening on {', '.join(on_port)} instead"
                   + (", on every interface: reachable beyond what the plan allows"
                      if wider else ""),
                   f"the running {service.unit} differs from the plan (its bind address): "
                   "rerun the services stage, or look for another program on that port "
                   f"(`ss -ltnp` on {host.name})")


def interpret(host: HostPlan, evidence: Mapping[str, Any]) -> list[ProbeResult]:
    """Every SSH probe's result for `host` from the collector's JSON (pure)."""
    facts, health, source = (gpu_evidence(evidence["gpu"]) if evidence.get("gpu")
                             else (None, None, ""))
    out = gpu_results(host, facts, health, source)
    owners = environments(host)
    out += [stack_result(host, owners.get(env["path"], ""), env, facts)
            for env in evidence["envs"]]
    found = {m["name"]: m for m in evidence["models"]}
    out += [weights_result(host, entry, found.get(entry["name"]))
            for entry in host.vars.get("model_weights_models") or []]
    units = {u["unit"]: u for u in evidence["units"]}
    for service in services(host):
        out += service_results(host, service, units.get(service.unit), evidence["listening"])
    return out


# ---------------------------------------------------------------- running them

def _ssh_failure(host: HostPlan, message: str, next_step: str) -> list[ProbeResult]:
    return [_result(host, "", "ssh", False, message, next_step)]


def probe_host(host: HostPlan, timeout: float = SSH_TIMEOUT,
               collect: Collector = run_collector,
               judge: Judge = interpret) -> list[ProbeResult]:
    """All SSH probes of one host; a host that cannot be reached gives one failed `ssh`."""
    try:
        evidence = collect(host, timeout)
    except CollectError as exc:
        return _ssh_failure(host, str(exc), exc.next_step)
    try:
        return judge(host, evidence)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # The collector is sent from this very orchestrator, so this is no version skew:
        # something else answered on the host's python3 (see ansible_python_interpreter).
        return _ssh_failure(host, f"the probe collector's answer is not understood: "
                            f"{type(exc).__name__}: {exc}",
                            f"check that `{host_python(host)}` on {host.name} is a plain "
                            "CPython 3.9+ (ansible_python_interpreter); if it is, report this "
                            "with the evidence; `orchestrate probe --no-ssh` still runs the "
                            "HTTP probes")


def probe_hosts(plan: Plan, *, timeout: float = SSH_TIMEOUT, workers: int = 16,
                collect: Collector = run_collector,
                judge: Judge = interpret) -> list[ProbeResult]:
    """SSH probes of every host in parallel; a host still running after its timeout (and a
    few seconds of grace) is reported and left behind, never waited for."""
    if not plan.hosts:
        return []
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(plan.hosts))))
    try:
        futures = [pool.submit(probe_host, h, timeout, collect, judge) for h in plan.hosts]
        wait(futures, timeout=timeout + SSH_GRACE)
        out: list[ProbeResult] = []
        for host, future in zip(plan.hosts, futures, strict=True):
            if future.done():
                out += future.result()
            else:
                out += _ssh_failure(host, f"no answer within {timeout:.0f} s (the connection "
                                    "attempt is still hanging)",
                                    f"check that {host.name} is up and its address resolves")
        return out
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def probe_all(plan: Plan, *, ssh_timeout: float = SSH_TIMEOUT, http_timeout: float = 60.0,
              workers: int = 16, secrets: Mapping[str, str] | None = None,
              collect: Collector | None = None,
              operator_inventory: Path | None = None) -> ProbeReport:
    """SSH probes and HTTP probes of every host, at the same time; results per host, SSH
    probes first. The SSH probes read `operator_inventory` (the operator's `-i`) as the
    stages do, unless `collect` replaces them."""
    if collect is None:
        collect = functools.partial(run_collector, operator_inventory=operator_inventory)
    with ThreadPoolExecutor(max_workers=1) as side:
        http = side.submit(probe_plan, plan, timeout=http_timeout, workers=workers,
                           secrets=secrets)
        ssh = probe_hosts(plan, timeout=ssh_timeout, workers=workers, collect=collect)
        results = ssh + http.result().results
    order = {h.name: i for i, h in enumerate(plan.hosts)}
    return ProbeReport(group=plan.group,
                       results=sorted(results, key=lambda r: order.get(r.host, len(order))))
