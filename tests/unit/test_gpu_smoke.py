"""The GPU smoke test (orchestrator/verify/gpu_smoke.py, scripts/gpu-smoke) without a GPU.

Most tests run the checks against RecordedHost, a STAND-IN for a GPU host: nvidia-smi
answers with real outputs (tests/data/nvidia-smi, tests/data/gpu-smoke), /proc/devices with
real listings (tests/data/proc-devices); `systemctl show` answers in systemd's format
(one `Key=value` line per value, DeviceAllow once per entry) with a vllm@ unit's settings as
roles/vllm renders them; the programs run in the env's python (torch, Triton, NCCL, vLLM)
answer with the JSON line they print on a GPU, which this machine cannot produce. The last
tests run the real script and programs on this machine, which has no GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.plan.planner import STAGES, HostPlan, Plan
from orchestrator.run.runner import RunResult
from orchestrator.verify import deepprobe, deviceallow, gpu_smoke
from orchestrator.verify.gpu_smoke import MARK, Options, Outcome
from orchestrator.verify.httpprobe import ProbeReport, ProbeResult

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
SMI = DATA / "nvidia-smi"
PROC = DATA / "proc-devices"

H100_TABLE = (SMI / "table__H100-80GB-HBM3__590.48.01.txt").read_text()  # CUDA 13.1
RTX4090_TABLE = (SMI / "table__RTX-4090__580.65.06.txt").read_text()  # CUDA 13.0
CUDA_NA_TABLE = (SMI / "table_cuda-NA__A100-PCIE-40GB__470.82.01.txt").read_text()
# One GPU with MIG devices under it: only "GPU n:" lines are GPUs.
H200_MIG_LIST = (SMI / "list_mig__H200__590.48.01.txt").read_text()
T4_LIST = (SMI / "list__Tesla-T4__535.104.05.txt").read_text()
DRIVER_COMM = (SMI / "error_driver_comm__unknown__460.x.txt").read_text()
# A two-GPU listing in nvidia-smi -L's format (the real T4 line, twice): for the NCCL check.
TWO_T4_LIST = T4_LIST + T4_LIST.replace("GPU 0:", "GPU 1:").replace("0079ab15", "0079ab16")
OLD_PROC = (PROC / "nvidia-frontend-infiniband.txt").read_text()
# grep's excerpt of the character section; the heading is what /proc/devices has above it.
NEW_PROC = "Character devices:\n" + (PROC / "nvidia-r550-grep.txt").read_text()

UNIT = "vllm@qwen.service"
MODEL = "/var/lib/qwen-serve/models/qwen"
OLD_ALLOW = ["char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-nvidia-caps r"]


def node(path: str, major: int, minor: int) -> deviceallow.DeviceNode:
    return deviceallow.DeviceNode(path=path, kind="c", major=major, minor=minor)


# Majors as the listings above give them; minors as the driver makes the nodes (nvidiactl
# is 195:255, nvidia-uvm-tools is minor 1 of the nvidia-uvm major).
NODES_OLD = [node("/dev/nvidia0", 195, 0), node("/dev/nvidiactl", 195, 255),
             node("/dev/nvidia-uvm", 510, 0), node("/dev/nvidia-uvm-tools", 510, 1),
             node("/dev/nvidia-caps/nvidia-cap1", 235, 1), node("/dev/nvidia-modeset", 195, 254)]
NODES_NEW = [node("/dev/nvidia0", 195, 0), node("/dev/nvidia1", 195, 1),
             node("/dev/nvidiactl", 195, 255)]


def show_output(allow: Sequence[str], *, model: str = MODEL) -> str:
    """`systemctl show` of a vllm@ unit as roles/vllm renders it."""
    lines = ["User=vllm", "Group=vllm", "LoadState=loaded", "DevicePolicy=closed",
             *[f"DeviceAllow={entry}" for entry in allow],
             "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes",
             f"ExecStart={{ path=/opt/qwen-serve/env/bin/python ; argv[]=/opt/qwen-serve/env/bin/"
             f"python -m vllm.entrypoints.openai.api_server --model {model} --served-model-name"
             " qwen --port 8000 ; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; "
             "pid=0 ; code=(null) ; status=0/0 }"]
    return "\n".join(lines) + "\n"


def cat_output(role_defaults: dict[str, Any]) -> str:
    """`systemctl cat` of a vllm@ unit: roles/vllm's unit (its sandbox from the role's
    defaults, as the template writes it) and a drop-in relaxing one directive."""
    sandbox = [f"{name}={str(one).lower() if isinstance(one, bool) else one}"
               for name, value in sorted(role_defaults["vllm_hardening"].items())
               for one in (value if isinstance(value, list) else [value])]
    return "\n".join(["# /etc/systemd/system/vllm@.service", "[Unit]",
                      "Description=vLLM OpenAI-compatible server (%i)", "", "[Service]",
                      "User=vllm", "ProtectSystem=strict", *sandbox, "", "[Install]",
                      "WantedBy=multi-user.target", "",
                      "# /etc/systemd/system/vllm@qwen.service.d/override.conf", "[Service]",
                      "; a host that needs more address families", "RestrictAddressFamilies=",
                      "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET"]
                     ) + "\n"


ROLE_DEFAULTS = yaml.safe_load(gpu_smoke.REPO_DEFAULTS.read_text())


def answer(data: dict[str, Any], noise: str = "") -> Outcome:
    """What a program in the env's python prints: maybe library noise, then its line."""
    return Outcome([], 0, f"{noise}{MARK}{json.dumps(data)}\n", "")


GOOD_TORCH = {"torch": "2.13.0+cu130", "cuda": "13.0", "available": True, "count": 2,
              "devices": [{"index": i, "name": "Tesla T4", "capability": "7.5",
                           "max_abs_diff": 3.05e-05, "ok": True} for i in range(2)]}
GOOD_TRITON = {"cc": "/usr/bin/gcc", "include": "/usr/include/python3.12", "python_h": True,
               "triton": "3.6.0", "ok": True}
GOOD_NCCL = {"world": 2, "nccl": "2.27.7", "seconds": 4.2, "errors": [],
             "transport": ["NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM"],
             "ranks": [{"rank": r, "value": 3.0, "want": 3.0, "ok": True} for r in range(2)]}
GOOD_BUILD = {"torch": "2.13.0+cu130", "cuda": "13.0"}
CHAT = {"choices": [{"message": {"role": "assistant", "content": "Hello there!"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}}


class RecordedHost(gpu_smoke.System):
    """STAND-IN for a GPU host (see the module docstring): every command answered from a
    recording, every call kept for the assertions."""

    def __init__(self, *, listing: Outcome, table: Outcome, units: Sequence[str] = (UNIT,),
                 show: dict[str, str] | None = None, nodes: Sequence[deviceallow.DeviceNode]
                 = NODES_NEW, proc_devices: str | None = NEW_PROC,
                 programs: dict[str, Outcome] | None = None, root: bool = True,
                 users: Sequence[str] = ("vllm",), dirs: dict[str, int] | None = None,
                 health_after: int = 1, chat: tuple[int | None, str] = (200, json.dumps(CHAT)),
                 files: dict[str, str] | None = None,
                 vllm_state: str = "active") -> None:
        self.listing, self.table, self.units = listing, table, list(units)
        self.show = show if show is not None else {
            UNIT: show_output([*OLD_ALLOW, "char-nvidia rw", "char-nvidiactl rw"])}
        self.nodes, self.proc_devices = list(nodes), proc_devices
        self.programs = {"torch": answer(GOOD_TORCH), "triton": answer(GOOD_TRITON),
                         "nccl": answer(GOOD_NCCL, "NCCL INFO Bootstrap\n"),
                         "torch_driver": answer(GOOD_BUILD), **(programs or {})}
        self.root, self.users = root, set(users)
        self.dirs = dirs if dirs is not None else {MODEL: 5 << 20}
        self.health_after, self.chat, self.vllm_state = health_after, chat, vllm_state
        self.files = files or {}
        self.calls: list[list[str]] = []
        self.http_calls: list[tuple[str, str, Any]] = []
        self.clock = 0.0

    def run(self, argv: Sequence[str], timeout: float,
            env: dict[str, str] | None = None) -> Outcome:
        argv = list(argv)
        self.calls.append(argv)
        if argv[0] == "nvidia-smi":
            return self.listing if argv[1:] == ["-L"] else self.table
        if argv[:2] == ["systemctl", "list-units"]:
            return Outcome(argv, 0, "".join(f"{u} loaded active running vLLM OpenAI-compatible "
                                            f"server ({u[5:-8]})\n" for u in self.units))
        if argv[:2] == ["systemctl", "show"]:
            text = self.show.get(argv[-1])
            return Outcome(argv, 0, text if text is not None else "LoadState=not-found\n")
        if argv[:2] == ["systemctl", "cat"]:
            known = self.show.get(argv[-1]) is not None
            return (Outcome(argv, 0, cat_output(ROLE_DEFAULTS)) if known else
                    Outcome(argv, 1, "", f"No files found for {argv[-1]}."))
        if argv[:2] == ["systemctl", "is-active"]:
            return Outcome(argv, 0, self.vllm_state + "\n")
        if argv[0] in ("journalctl",) or argv[:2] == ["systemctl", "stop"]:
            return Outcome(argv, 0, "ValueError: Free memory on device (0.9/79.1 GiB) on "
                           "startup is less than desired GPU memory utilization\n")
        if argv[0] == "systemd-run":
            if "--wait" not in argv:  # the vLLM server, started in the background
                return Outcome(argv, 0)
            program = argv[argv.index("-c") + 1]
            for check, source in (("torch", gpu_smoke.TORCH_PROGRAM),
                                  ("triton", gpu_smoke.TRITON_PROGRAM),
                                  ("nccl", gpu_smoke.NCCL_LAUNCHER)):
                if source in program:
                    return self.programs[check]
        if argv[0].endswith("/bin/python") and gpu_smoke.TORCH_BUILD_PROGRAM in argv:
            return self.programs["torch_driver"]
        raise AssertionError(f"unexpected command {argv}")

    def read_text(self, path: str) -> str | None:
        if path == "/proc/devices":
            return self.proc_devices
        return self.files.get(path, (REPO / path).read_text() if path.startswith(str(REPO))
                              else None)

    def device_nodes(self) -> list[deviceallow.DeviceNode]:
        return self.nodes

    def is_root(self) -> bool:
        return self.root

    def user_exists(self, name: str) -> bool:
        return name in self.users

    def is_file(self, path: str) -> bool:
        return path.endswith("/bin/python")

    def dir_size(self, path: str) -> int | None:
        return self.dirs.get(path)

    def free_port(self) -> int:
        return 45678

    def http(self, method: str, url: str, body: dict[str, Any] | None,
             timeout: float) -> tuple[int | None, str]:
        self.http_calls.append((method, url, body))
        if url.endswith("/health"):
            healthy = sum(1 for c in self.http_calls if c[1].endswith("/health"))
            return (200, "") if healthy >= self.health_after else (None, "ConnectionRefused")
        return self.chat

    def monotonic(self) -> float:
        return self.clock

    def sleep(self, seconds: float) -> None:
        self.clock += seconds

    def hostname(self) -> str:
        return "gpu-1"


def smi(listing: str, table: str) -> dict[str, Outcome]:
    return {"listing": Outcome(["nvidia-smi", "-L"], 0, listing),
            "table": Outcome(["nvidia-smi"], 0, table)}


def by_name(checks: list[gpu_smoke.Check]) -> dict[str, gpu_smoke.Check]:
    return {c.check: c for c in checks}


def systemd_runs(host: RecordedHost) -> list[list[str]]:
    return [c for c in host.calls if c[0] == "systemd-run"]


# ---------------------------------------------------------------- no GPU

@pytest.mark.parametrize("listing", [
    Outcome(["nvidia-smi", "-L"], None, error="FileNotFoundError: [Errno 2] No such file or "
            "directory: 'nvidia-smi'"),
    Outcome(["nvidia-smi", "-L"], 9, DRIVER_COMM),
], ids=["no-nvidia-smi", "driver-not-loaded"])
def test_a_host_without_a_usable_gpu_fails_every_check_with_the_evidence(
        listing: Outcome) -> None:
    host = RecordedHost(listing=listing, table=listing, nodes=[])

    checks = gpu_smoke.run_checks(Options(env="/opt/qwen-serve/env"), host)

    assert [c.check for c in checks] == list(gpu_smoke.CHECKS)
    assert {c.status for c in checks} == {"fail"}
    said = "No such file" if listing.error else "couldn't communicate with the NVIDIA driver"
    assert all(said in c.evidence and "/dev/nvidia*: none" in c.evidence for c in checks)
    assert all("--allow-no-gpu" in (c.next_step or "") for c in checks)
    assert not systemd_runs(host)  # nothing tried on a host without a GPU

    skipped = gpu_smoke.run_checks(Options(env="/e", allow_no_gpu=True), host)
    assert {c.status for c in skipped} == {"skip"}
    assert all(said in c.evidence for c in skipped)


def test_main_exit_codes_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    broken = RecordedHost(listing=Outcome([], 9, DRIVER_COMM), table=Outcome([], 9, DRIVER_COMM))
    assert gpu_smoke.main(["--json"], broken) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["passed"] is False and printed["host"] == "gpu-1"
    assert [c["status"] for c in printed["checks"]] == ["fail"] * 6

    assert gpu_smoke.main(["--allow-no-gpu"], broken) == 0
    text = capsys.readouterr().out
    assert "SKIP  devices" in text and "no check failed" in text

    good = RecordedHost(**smi(TWO_T4_LIST, H100_TABLE))
    assert gpu_smoke.main(["--unit", "vllm@qwen"], good) == 0
    text = capsys.readouterr().out
    assert text.count("PASS ") == 6, text


# ---------------------------------------------------------------- nvidia-smi

def test_gpus_and_the_drivers_cuda_from_real_nvidia_smi_outputs() -> None:
    gpus = gpu_smoke.parse_gpus(Outcome([], 0, H200_MIG_LIST), Outcome([], 0, H100_TABLE))
    assert (gpus.names, gpus.driver, gpus.cuda, gpus.problem) == (
        ["NVIDIA H200"], "590.48.01", "13.1", None)
    na = gpu_smoke.parse_gpus(Outcome([], 0, T4_LIST), Outcome([], 0, CUDA_NA_TABLE))
    assert (na.driver, na.cuda) == ("470.82.01", "N/A")
    none = gpu_smoke.parse_gpus(Outcome([], 0, ""), Outcome([], 0, ""))
    assert none.problem is not None and "lists no GPU" in none.problem


# ---------------------------------------------------------------- devices

def test_new_driver_names_are_denied_by_the_old_device_allow() -> None:
    """Driver 550.40+ names major 195 `nvidia`/`nvidiactl`: `char-nvidia-frontend` admits
    nothing, so /dev/nvidia0.. and /dev/nvidiactl are denied and vLLM finds no GPU."""
    host = RecordedHost(**smi(TWO_T4_LIST, H100_TABLE), show={UNIT: show_output(OLD_ALLOW)},
                        nodes=NODES_NEW, proc_devices=NEW_PROC)

    devices = by_name(gpu_smoke.run_checks(Options(env="/e"), host))["devices"]

    assert devices.status == "fail"
    assert "/dev/nvidia0 (c 195:0, /proc/devices: nvidia/nvidiactl) DENIED" in devices.evidence
    assert "/dev/nvidiactl (c 195:255" in devices.evidence
    assert f"from {UNIT}" in devices.evidence
    assert devices.next_step is not None
    assert "'char-nvidia rw'" in devices.next_step and "vllm_device_allow" in devices.next_step


@pytest.mark.parametrize(("proc", "nodes"), [(OLD_PROC, NODES_OLD), (NEW_PROC, NODES_NEW)],
                         ids=["before-550.40", "550.40-and-later"])
def test_the_vllm_roles_defaults_admit_every_gpu_node_of_old_and_new_drivers(
        proc: str, nodes: list[deviceallow.DeviceNode]) -> None:
    """A host with no vLLM unit yet is checked against roles/vllm/defaults/main.yml."""
    host = RecordedHost(**smi(T4_LIST, H100_TABLE), units=[], show={}, nodes=nodes,
                        proc_devices=proc)

    devices = by_name(gpu_smoke.run_checks(Options(env="/e"), host))["devices"]

    assert devices.status == "pass", devices.evidence
    assert "no vLLM unit: the vllm role's defaults in" in devices.evidence
    assert "/dev/nvidia0 (c 195:0" in devices.evidence
    assert "nvidia-modeset" not in devices.evidence  # the display node is not the engine's
    if proc is OLD_PROC:
        assert "/dev/nvidia-caps/nvidia-cap1 (c 235:1, /proc/devices: nvidia-caps) allowed " \
               "by 'char-nvidia-caps r'" in devices.evidence
        assert "/dev/nvidia-uvm-tools (c 510:1" in devices.evidence


def test_device_policy_auto_without_entries_opens_every_device() -> None:
    show = show_output([]).replace("DevicePolicy=closed", "DevicePolicy=auto")
    host = RecordedHost(**smi(T4_LIST, H100_TABLE), show={UNIT: show})
    devices = by_name(gpu_smoke.run_checks(Options(env="/e"), host))["devices"]
    assert devices.status == "pass" and "DevicePolicy=auto" in devices.evidence


def test_the_role_defaults_reader_agrees_with_yaml() -> None:
    """The standard-library reader of roles/vllm/defaults/main.yml (the host's python3 may
    have no YAML module) reads the hardening variables as PyYAML does."""
    text = gpu_smoke.REPO_DEFAULTS.read_text()
    loaded = yaml.safe_load(text)
    wanted = {k: loaded[k] for k in gpu_smoke.ROLE_VARIABLES if k in loaded}
    assert set(wanted) == set(gpu_smoke.ROLE_VARIABLES)
    assert gpu_smoke.read_role_defaults(text) == wanted
    # The playbook writes the host's values with to_nice_yaml (PyYAML's block style).
    changed = {**wanted, "vllm_device_allow": ["char-nvidia rw", "/dev/nvidia-caps/x r"],
               "vllm_protect_home": False,
               "vllm_hardening_overrides": {"SystemCallFilter": None, "UMask": "0027",
                                            "RestrictAddressFamilies": ["AF_UNIX", "AF_INET"]}}
    assert gpu_smoke.read_role_defaults(yaml.safe_dump(changed, indent=4,
                                                       default_flow_style=False)) == changed


# ---------------------------------------------------------------- hardening

def test_programs_run_under_the_units_own_hardening() -> None:
    host = RecordedHost(**smi(TWO_T4_LIST, H100_TABLE))

    gpu_smoke.run_checks(Options(env="/opt/qwen-serve/env", unit="vllm@qwen"), host)

    runs = systemd_runs(host)
    assert len(runs) == 4  # torch, triton, nccl, and the vLLM server
    for argv in runs:
        properties = [a for a in argv[:argv.index("--")] if a.startswith("--property=")]
        for wanted in ("User=vllm", "Group=vllm", "DevicePolicy=closed",
                       "DeviceAllow=char-nvidia-frontend rw", "DeviceAllow=char-nvidia rw",
                       "DeviceAllow=char-nvidia-caps r", "ProtectSystem=strict",
                       "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes"):
            assert f"--property={wanted}" in properties, (wanted, argv)
        # The unit's sandbox as written, the drop-in's reset and value after it.
        sandbox = [p.removeprefix("--property=") for p in properties
                   if p.removeprefix("--property=").split("=")[0] in gpu_smoke.SANDBOXING]
        assert sandbox[:3] == ["AmbientCapabilities=", "CapabilityBoundingSet=",
                               "LockPersonality=true"]
        for wanted in ("SystemCallFilter=@system-service", "SystemCallFilter=~@privileged",
                       "SystemCallErrorNumber=EPERM", "ProtectKernelTunables=true",
                       "RestrictNamespaces=true", "UMask=0077"):
            assert wanted in sandbox, (wanted, sandbox)
        assert sandbox[-2:] == ["RestrictAddressFamilies=", "RestrictAddressFamilies=AF_UNIX "
                                "AF_INET AF_INET6 AF_NETLINK AF_PACKET"]
        assert any(p.startswith("--property=RuntimeMaxSec=") for p in properties)
        assert argv[argv.index("--") + 1] == "/opt/qwen-serve/env/bin/python"
    waited = [argv for argv in runs if "--wait" in argv]
    assert len(waited) == 3 and all("--pipe" in argv for argv in waited)


def test_a_host_without_a_unit_gets_the_role_defaults_sandbox_with_its_overrides() -> None:
    # The playbook's settings file: this host's overrides over the role's hardening.
    settings = {**ROLE_DEFAULTS, "vllm_hardening_overrides": {
        "SystemCallFilter": None, "UMask": "0027", "ProtectClock": False}}
    written = {k: settings[k] for k in gpu_smoke.ROLE_VARIABLES}
    host = RecordedHost(**smi(T4_LIST, H100_TABLE), units=[], show={},
                        files={"/tmp/vllm-defaults.yml": yaml.safe_dump(written, indent=4)})

    gpu_smoke.run_checks(Options(env="/e", vllm_defaults="/tmp/vllm-defaults.yml"), host)

    properties = [a.removeprefix("--property=") for a in systemd_runs(host)[0]
                  if a.startswith("--property=")]
    assert not any(p.startswith("SystemCallFilter=") for p in properties)
    for wanted in ("UMask=0027", "ProtectClock=false", "CapabilityBoundingSet=",
                   "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
                   "SystemCallErrorNumber=EPERM", "ProtectSystem=strict"):
        assert wanted in properties, (wanted, properties)


def test_a_missing_service_user_runs_as_root_and_says_so() -> None:
    host = RecordedHost(**smi(T4_LIST, H100_TABLE), units=[], show={}, users=())
    torch = by_name(gpu_smoke.run_checks(Options(env="/e"), host))["torch"]
    assert "user vllm does not exist here yet: run as root" in torch.evidence
    assert not any(a.startswith("--property=User=") for a in systemd_runs(host)[0])


def test_not_root_fails_the_hardened_checks_with_the_reason() -> None:
    host = RecordedHost(**smi(T4_LIST, H100_TABLE), root=False)
    checks = by_name(gpu_smoke.run_checks(Options(env="/e"), host))
    for name in ("torch", "triton", "nccl", "vllm"):
        assert checks[name].status == "fail" and "not run as root" in checks[name].evidence
    assert not systemd_runs(host)


# ---------------------------------------------------------------- the GPU programs' answers

def test_every_check_passes_on_a_good_host_with_its_evidence() -> None:
    host = RecordedHost(**smi(TWO_T4_LIST, H100_TABLE))

    checks = by_name(gpu_smoke.run_checks(Options(env="/opt/qwen-serve/env"), host))

    assert {c.status for c in checks.values()} == {"pass"}, checks
    assert "2 of 2 GPUs seen" in checks["torch"].evidence
    assert "cuda:1 Tesla T4 (7.5): 512x512 matmul max |GPU-CPU| 3.05e-05" in checks[
        "torch"].evidence
    assert "Python.h present" in checks["triton"].evidence
    assert "NCCL 2.27.7" in checks["nccl"].evidence and "via P2P" in checks["nccl"].evidence
    assert "driver 590.48.01 supports CUDA 13.1" in checks["torch_driver"].evidence
    assert "cuda_compat.yml" in checks["torch_driver"].evidence
    vllm = checks["vllm"].evidence
    assert MODEL in vllm and "4 tokens" in vllm and "'Hello there!'" in vllm
    [chat] = [c for c in host.http_calls if c[0] == "POST"]
    assert chat[2]["temperature"] == 0
    assert host.calls[-1] == ["systemctl", "stop", f"gpu-smoke-{os.getpid()}-vllm.service"]


def test_torch_sees_fewer_gpus_than_nvidia_smi() -> None:
    one = {**GOOD_TORCH, "count": 1, "devices": GOOD_TORCH["devices"][:1]}
    host = RecordedHost(**smi(TWO_T4_LIST, H100_TABLE), programs={"torch": answer(one)})
    torch = by_name(gpu_smoke.run_checks(Options(env="/e"), host))["torch"]
    assert torch.status == "fail" and "1 of 2 GPUs seen" in torch.evidence


def test_a_wrong_matmul_fails_torch() -> None:
    bad = {**GOOD_TORCH, "devices": [GOOD_TORCH["devices"][0],
                                     {**GOOD_TORCH["devices"][1], "max_abs_diff": 0.5,
                                      "ok": False}]}
    host = RecordedHost(**smi(TWO_T4_LIST, H100_TABLE), programs={"torch": answer(bad)})
    torch = by_name(gpu_smoke.run_checks(Options(env="/e"), host))["torch"]
    assert torch.status == "fail" and "5.00e-01 (beyond" in torch.evidence
    assert "xid" in (torch.next_step or "")


def test_systemd_run_failing_is_reported_with_its_words() -> None:
    said = ("System has not been booted with systemd as init system (PID 1). Can't operate.\n"
            "Failed to create bus connection: Host is down\n")
    host = RecordedHost(**smi(T4_LIST, H100_TABLE),
                        programs={"torch": Outcome([], 1, "", said)})
    torch = by_name(gpu_smoke.run_checks(Options(env="/e"), host))["torch"]
    assert torch.status == "fail" and "Host is down" in torch.evidence
    assert "init system" in (torch.next_step or "")


def test_triton_without_python_headers_names_the_packages() -> None:
    """vllm#27890: Triton's helper does not compile without the interpreter's headers."""
    failed = {**GOOD_TRITON, "python_h": False, "ok": None,
              "error": "CalledProcessError: Command '['/usr/bin/gcc', '/run/x/main.c', '-O3', "
                       "'-shared', ...]' returned non-zero exit status 1."}
    stderr = ("/run/x/main.c:5:10: fatal error: Python.h: No such file or directory\n"
              "compilation terminated.\n")
    host = RecordedHost(**smi(T4_LIST, H100_TABLE),
                        programs={"triton": Outcome([], 0, f"{MARK}{json.dumps(failed)}\n",
                                                    stderr)})
    triton = by_name(gpu_smoke.run_checks(Options(env="/e"), host))["triton"]
    assert triton.status == "fail"
    assert "Python.h MISSING" in triton.evidence
    assert "fatal error: Python.h" in triton.evidence
    assert triton.next_step == gpu_smoke.HEADERS_NEXT


def test_nccl_with_a_wrong_sum_or_a_hung_rank_fails() -> None:
    wrong = {**GOOD_NCCL, "ranks": [{"rank": 0, "value": 1.0, "want": 3.0, "ok": False}],
             "errors": ["rank 1: timed out after 300 s"]}
    host = RecordedHost(**smi(TWO_T4_LIST, H100_TABLE), programs={"nccl": answer(wrong)})
    nccl = by_name(gpu_smoke.run_checks(Options(env="/e"), host))["nccl"]
    assert nccl.status == "fail"
    assert "want 3: rank 0: 1" in nccl.evidence and "timed out" in nccl.evidence


@pytest.mark.parametrize(("table", "build", "fails_with"), [
    (RTX4090_TABLE, {"torch": "2.13.0+cu130", "cuda": "13.0"}, None),
    (H100_TABLE, {"torch": "2.13.0+cu132", "cuda": "13.2"}, "driver is too old"),
    (CUDA_NA_TABLE, {"torch": "2.8.0+cu128", "cuda": "12.8"}, "libcuda.so"),
    (H100_TABLE, {"torch": "2.13.0+cpu", "cuda": None}, "CPU build of torch"),
], ids=["cu130-on-580", "cu132-on-590", "cuda-NA", "cpu-build"])
def test_torch_build_against_the_driver(table: str, build: dict[str, Any],
                                         fails_with: str | None) -> None:
    host = RecordedHost(**smi(T4_LIST, table), programs={"torch_driver": answer(build)})
    check = by_name(gpu_smoke.run_checks(Options(env="/e"), host))["torch_driver"]
    assert f"built for CUDA {build['cuda']}" in check.evidence
    if fails_with is None:
        assert check.status == "pass", check.evidence
    else:
        assert check.status == "fail" and fails_with in (check.next_step or "")


# ---------------------------------------------------------------- vLLM

def test_vllm_serves_the_smallest_model_the_units_serve() -> None:
    big, small = "/var/lib/qwen-serve/models/qwen7b", "/var/lib/qwen-serve/models/tiny"
    other = "vllm@tiny.service"
    host = RecordedHost(**smi(T4_LIST, H100_TABLE), units=[UNIT, other],
                        show={UNIT: show_output(OLD_ALLOW, model=big),
                              other: show_output(OLD_ALLOW, model=small)},
                        dirs={big: 15 << 30, small: 2 << 20})

    vllm = by_name(gpu_smoke.run_checks(Options(env="/e"), host))["vllm"]

    assert vllm.status == "pass", vllm.evidence
    [server] = [c for c in systemd_runs(host) if "--wait" not in c]
    command = server[server.index("--") + 1:]
    assert command[command.index("--model") + 1] == small
    for flag, value in (("--port", "45678"), ("--host", "127.0.0.1"),
                        ("--max-model-len", "512"), ("--gpu-memory-utilization", "0.2")):
        assert command[command.index(flag) + 1] == value
    assert "--enforce-eager" in command
    assert "vllm@tiny.service" in vllm.evidence


def test_vllm_is_skipped_without_a_model() -> None:
    host = RecordedHost(**smi(T4_LIST, H100_TABLE), units=[], show={}, dirs={})
    vllm = by_name(gpu_smoke.run_checks(Options(env="/e"), host))["vllm"]
    assert vllm.status == "skip" and "--model" in vllm.evidence


def test_vllm_that_dies_is_reported_with_its_log_and_stopped() -> None:
    host = RecordedHost(**smi(T4_LIST, H100_TABLE), health_after=99, vllm_state="failed")
    vllm = by_name(gpu_smoke.run_checks(Options(env="/e", model=MODEL), host))["vllm"]
    assert vllm.status == "fail"
    assert "exited before it was healthy (failed)" in vllm.evidence
    assert "Free memory on device" in vllm.evidence  # the journal's tail
    assert host.calls[-1][:2] == ["systemctl", "stop"]


def test_vllm_that_never_gets_healthy_is_bounded() -> None:
    host = RecordedHost(**smi(T4_LIST, H100_TABLE), health_after=10_000)
    vllm = by_name(gpu_smoke.run_checks(Options(env="/e", model=MODEL, vllm_timeout=30),
                                        host))["vllm"]
    assert vllm.status == "fail" and "within 30 s" in vllm.evidence
    assert host.clock <= 32 and host.calls[-1][:2] == ["systemctl", "stop"]


def test_vllm_answering_an_error_fails() -> None:
    host = RecordedHost(**smi(T4_LIST, H100_TABLE),
                        chat=(400, '{"object": "error", "message": "max_tokens too large"}'))
    vllm = by_name(gpu_smoke.run_checks(Options(env="/e", model=MODEL), host))["vllm"]
    assert vllm.status == "fail" and "-> 400" in vllm.evidence


# ---------------------------------------------------------------- for real, on this machine

NO_GPU_HERE = pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                                 reason="this machine has nvidia-smi: a GPU host")


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "scripts" / "gpu-smoke"), *args], capture_output=True,
                          text=True, timeout=120, check=False)


@NO_GPU_HERE
def test_the_script_on_this_machine_without_a_gpu() -> None:
    """The real script with the host's python3: no GPU here, so every check fails with
    nvidia-smi's absence as evidence, or is skipped with --allow-no-gpu."""
    proc = _script("--json")
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    assert result["passed"] is False
    assert [c["check"] for c in result["checks"]] == list(gpu_smoke.CHECKS)
    assert all(c["status"] == "fail" and "nvidia-smi" in c["evidence"]
               and c["next_step"] for c in result["checks"])

    proc = _script("--allow-no-gpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("SKIP ") == 6 and "no check failed" in proc.stdout

    assert _script("--no-such-option").returncode == 2


def test_the_script_runs_from_a_directory_holding_only_it_and_deviceallow(
        tmp_path: Path) -> None:
    """As playbooks/gpu_smoke.yml runs it on a host: the two files side by side."""
    for name in ("gpu_smoke.py", "deviceallow.py"):
        shutil.copy(REPO / "orchestrator" / "verify" / name, tmp_path / name)
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "gpu_smoke.py"), "--help"],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr
    assert "--vllm-defaults" in proc.stdout


def test_the_programs_run_in_a_python_without_torch() -> None:
    """The real torch-build program in this project's own python (which has no torch)
    answers with the import error, and the check reports it."""
    env = str(Path(sys.executable).parent.parent)
    smoke = gpu_smoke.Smoke(Options(env=env, timeout=60), gpu_smoke.System())
    gpus = gpu_smoke.Gpus(["Tesla T4"], "535.104.05", "12.2", None)

    check = smoke.check_torch_driver(gpus)

    assert check.status == "fail"
    assert "import torch: ModuleNotFoundError" in check.evidence
    assert check.evidence.startswith(f"{env}/bin/python")


def test_a_command_that_overruns_is_cut_at_its_timeout() -> None:
    outcome = gpu_smoke.System().run([sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert outcome.rc is None and outcome.error == "timed out after 1 s"
    missing = gpu_smoke.System().run(["/nonexistent/tool"], 5)
    assert missing.error is not None and "FileNotFoundError" in missing.error



# ---------------------------------------------------------------- orchestrate probe --deep

def _local_host(name: str, profile: str, env: str, **variables: Any) -> HostPlan:
    return HostPlan(name=name, group="test", profile=profile,
                    connection={"ansible_host": "127.0.0.1", "ansible_connection": "local",
                                "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                                # root already; this machine has no sudo for become
                                "ansible_become": False},
                    vars={"python_env_path": env, **variables}, probes=[], reasons=[])


def test_probe_deep_runs_the_playbook_and_reads_each_hosts_json(tmp_path: Path) -> None:
    """A real ansible-runner run of playbooks/gpu_smoke.yml against this machine (local
    connection): the host with this project's env runs gpu_smoke.py and fails every check
    (no GPU here) with its JSON saved and read back; the host whose env does not exist
    gives no answer and one failed `smoke` result; the CPU host is not run at all."""
    env = str(Path(sys.executable).parent.parent)
    plan = Plan(group="test", stages=list(STAGES), hosts=[
        _local_host("gpu-a", "gpu", env),
        _local_host("gpu-b", "gpu", "/nonexistent/env"),
        _local_host("cpu-c", "cpu", env)])

    results = deepprobe.run_smoke(plan, tmp_path, "deep")

    by_host: dict[str, list[ProbeResult]] = {}
    for r in results:
        by_host.setdefault(r.host, []).append(r)
    assert set(by_host) == {"gpu-a", "gpu-b"}
    a = by_host["gpu-a"]
    assert [r.probe for r in a] == [f"smoke:{c}" for c in gpu_smoke.CHECKS]
    assert all(r.status == "fail" and "nvidia-smi" in r.evidence and r.next_step for r in a)
    assert json.loads((tmp_path / "deep" / "gpu-smoke" / "gpu-a.json").read_text())["host"]
    [b] = by_host["gpu-b"]
    assert (b.probe, b.status) == ("smoke", "fail")
    assert "/nonexistent/env/bin/python" in b.evidence
    replay = (tmp_path / "deep" / "command.txt").read_text()
    assert "playbooks/gpu_smoke.yml" in replay and "site.yml" not in replay

    report = deepprobe.merged(ProbeReport(group="test", results=[
        ProbeResult(host="gpu-b", deployment="", probe="gpu", passed=True, evidence="ok")]),
        results, plan)
    assert [r.host for r in report.results][:7] == ["gpu-a"] * 6 + ["gpu-b"]
    assert not report.passed


def test_a_host_allowed_no_gpu_skips_through_the_playbook(tmp_path: Path) -> None:
    env = str(Path(sys.executable).parent.parent)
    plan = Plan(group="test", stages=list(STAGES),
                hosts=[_local_host("gpu-a", "gpu", env, gpu_smoke_allow_no_gpu=True)])
    results = deepprobe.run_smoke(plan, tmp_path, "deep")
    assert [r.status for r in results] == ["skip"] * 6
    assert ProbeReport(group="test", results=results).passed


def test_results_that_are_not_a_smoke_answer_fail_the_host(tmp_path: Path) -> None:
    plan = Plan(group="test", stages=list(STAGES),
                hosts=[_local_host("gpu-a", "gpu", "/e")])
    (tmp_path / "gpu-a.json").write_text("Traceback (most recent call last):\n")
    [result] = deepprobe.results_from(plan, tmp_path, RunResult(status="failed", rc=2))
    assert (result.probe, result.status) == ("smoke", "fail")
    assert "not a smoke test result" in result.evidence


def test_orchestrate_probe_deep_on_a_group_without_gpu_hosts(tmp_path: Path) -> None:
    """The CLI takes --deep; a CPU-only group runs no smoke test (no smoke run directory,
    no smoke results) and still reports its HTTP probes."""
    (tmp_path / "fleet.yml").write_text(
        "groups:\n  g:\n    profile: cpu\n    hosts: {h: {address: 127.0.0.1}}\n"
        "deployments:\n  - name: chat\n    model: Qwen/Qwen2.5-0.5B-Instruct\n"
        "    engine: vllm\n    hosts: g\n    port: 9\n    options: {open: true}\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "orchestrate"), "probe",
                           "--hosts", "g", "--no-ssh", "--deep", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr  # nothing listens on port 9
    probes = json.loads(proc.stdout)["results"]
    assert probes and not any(p["probe"].startswith("smoke") for p in probes)
    assert "GPU smoke test" in proc.stderr
    assert not list((tmp_path / ".orchestrate" / "runs").glob("*-smoke"))
