"""The vllm role's per-instance drop-in, rendered by Ansible itself: the command line, and
for an instance that drives the head's Ray node (a deployment across hosts) the ray group
and write access to Ray's temporary directory, which the hardened unit otherwise denies.
And the sandbox of the vllm@, ollama and ray units as rendered from the role defaults,
scored by `systemd-analyze security --offline` (below 4.0; 8.4 before) and checked by
`systemd-analyze verify`; Molecule scores the running units the same way."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "roles" / "vllm" / "templates" / "deployment.conf.j2"
DEFAULTS = REPO / "roles" / "vllm" / "defaults" / "main.yml"


def render(tmp_path: Path, item: dict[str, object]) -> str:
    out = tmp_path / f"{item['name']}.conf"
    playbook = tmp_path / "render.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Render", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": {**yaml.safe_load(DEFAULTS.read_text(encoding="utf-8")),
                 "vllm_env_path": "/opt/qwen-serve/env", "item": item},
        "tasks": [{"ansible.builtin.template": {"src": str(TEMPLATE), "dest": str(out),
                                                "mode": "0644"}}]}]))
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                           "localhost,", "-e", f"ansible_python_interpreter={sys.executable}",
                           str(playbook)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out.read_text()


def test_an_instance_on_one_host_gets_only_its_command_line(tmp_path: Path) -> None:
    text = render(tmp_path, {"name": "qwen7b", "args": ["--model", "/m", "--port", "8000"]})
    assert 'ExecStart=/opt/qwen-serve/env/bin/python -m vllm.entrypoints.openai.api_server ' \
           '"--model" "/m" "--port" "8000"' in text
    assert "SupplementaryGroups" not in text and "ReadWritePaths" not in text


def test_an_instance_driving_the_ray_node_joins_the_ray_group(tmp_path: Path) -> None:
    text = render(tmp_path, {"name": "qwen72b", "args": ["--distributed-executor-backend", "ray"],
                             "ray_client": {"group": "ray", "temp_dir": "/var/lib/ray/tmp"}})
    lines = text.splitlines()
    assert "SupplementaryGroups=ray" in lines
    assert "ReadWritePaths=/var/lib/ray/tmp" in lines


# --- the units' sandbox: `systemd-analyze security` on the units as Ansible renders them ---

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
UNITS = {"vllm": ("vllm/templates/vllm@.service.j2", "vllm@tiny.service"),
         "ollama": ("ollama/templates/ollama.service.j2", "ollama.service"),
         "ray_cluster": ("ray_cluster/templates/ray.service.j2", "ray-head.service")}


def render_unit(tmp_path: Path, role: str, extra: dict[str, object]) -> Path:
    """The role's unit rendered with its defaults (CPU profile: no device wait), ExecStart
    pointing at a real program so that `systemd-analyze verify` can check it; a vllm@
    instance gets its drop-in appended, as systemd merges it."""
    src, name = UNITS[role]
    defaults = yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml")
                              .read_text(encoding="utf-8"))
    out = tmp_path / name
    ray_env = tmp_path / "ray-env"
    (ray_env / "bin").mkdir(parents=True)
    (ray_env / "bin" / "ray").symlink_to(sys.executable)
    tasks = [{"ansible.builtin.template": {"src": str(REPO / "roles" / src), "dest": str(out),
                                           "mode": "0644"}}]
    if role == "vllm":
        tasks.append({"ansible.builtin.template": {"src": str(TEMPLATE),
                                                   "dest": str(tmp_path / "dropin.conf"),
                                                   "mode": "0644"}})
    playbook = tmp_path / "render-unit.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Render", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": {**defaults, f"{role}_wait_for_devices": [], "vllm_env_path": sys.prefix,
                 "_ollama_bin": sys.executable, "ray_cluster_env_path": str(ray_env),
                 "__ray_cluster_part": "head", "__ray_cluster_node_ip": "10.0.0.21",
                 "item": {"name": "tiny", "args": ["--model", "/m"]}, **extra},
        "tasks": tasks}]))
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                           "localhost,", "-e", f"ansible_python_interpreter={sys.executable}",
                           str(playbook)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if role == "vllm":
        out.write_text(out.read_text() + (tmp_path / "dropin.conf").read_text())
    return out


def exposure(unit: Path) -> float:
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager",
                           unit.name], cwd=unit.parent, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(rf"Overall exposure level for {re.escape(unit.name)}: ([0-9.]+)",
                      proc.stdout)
    assert match, proc.stdout
    return float(match.group(1))


def service_lines(unit: Path) -> list[str]:
    return [line for line in unit.read_text().splitlines() if line and line[0] not in "#["]


@pytest.mark.parametrize("role", sorted(UNITS))
def test_each_unit_declares_its_sandbox(tmp_path: Path, role: str) -> None:
    lines = service_lines(render_unit(tmp_path, role, {}))
    for line in ("CapabilityBoundingSet=", "AmbientCapabilities=", "ProtectKernelTunables=true",
                 "ProtectKernelModules=true", "ProtectKernelLogs=true",
                 "ProtectControlGroups=true", "RestrictNamespaces=true", "LockPersonality=true",
                 "SystemCallArchitectures=native", "NoNewPrivileges=true"):
        assert line in lines, role
    # Ray's node keeps its sockets and session files usable by the ray group's drivers.
    assert [line for line in lines if line.startswith("UMask=")] == [
        "UMask=0007" if role == "ray_cluster" else "UMask=0077"]
    # An allow list first, then what it lets through that a server never needs.
    filters = [line for line in lines if line.startswith("SystemCallFilter=")]
    assert filters == ["SystemCallFilter=@system-service", "SystemCallFilter=~@privileged"]
    families = next(line for line in lines if line.startswith("RestrictAddressFamilies="))
    assert set(families.split("=", 1)[1].split()) <= {"AF_UNIX", "AF_INET", "AF_INET6",
                                                       "AF_NETLINK"}
    # The GPUs stay reachable: no PrivateDevices=, the device ACL as before.
    assert not [line for line in lines if line.startswith("PrivateDevices=")]
    assert "DevicePolicy=closed" in lines and "DeviceAllow=char-nvidiactl rw" in lines
    # vLLM generates code at run time (oneDNN, Triton); the Ollama server does not.
    assert ("MemoryDenyWriteExecute=true" in lines) is (role == "ollama")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("role", sorted(UNITS))
def test_systemd_scores_each_unit_below_4(tmp_path: Path, role: str) -> None:
    unit = render_unit(tmp_path, role, {})
    assert exposure(unit) < 4.0
    proc = subprocess.run([str(SYSTEMD_ANALYZE), "verify", unit.name], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    # Only complaints about this machine (no such unit to order after) may remain.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line for line in proc.stderr.splitlines()
            if "Failed to" not in line and "ignoring" not in line] == [], proc.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_a_host_relaxes_one_setting_and_the_score_shows_it(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    strict = render_unit(tmp_path / "a", "ollama", {})
    relaxed = render_unit(tmp_path / "b", "ollama", {"ollama_hardening_overrides": {
        "SystemCallFilter": None, "ProtectHostname": False}})
    lines = service_lines(relaxed)
    assert not [line for line in lines if line.startswith("SystemCallFilter=")]
    assert "ProtectHostname=false" in lines and "ProtectHostname=true" not in lines
    assert "LockPersonality=true" in lines  # the rest stays
    assert exposure(relaxed) > exposure(strict)


def test_a_ray_driver_instance_keeps_its_files_group_usable(tmp_path: Path) -> None:
    text = render(tmp_path, {"name": "qwen72b", "args": ["--distributed-executor-backend", "ray"],
                             "ray_client": {"group": "ray", "temp_dir": "/var/lib/ray/tmp"}})
    # The unit's UMask=0077 would lock the Ray node (user ray) out of the driver's files.
    assert "UMask=0007" in text.splitlines()
    assert "UMask" not in render(tmp_path, {"name": "qwen7b", "args": []})
