"""The vllm role's per-instance drop-in, rendered by Ansible itself: the command line, and
for an instance that drives the head's Ray node (a deployment across hosts) the ray group
and write access to Ray's temporary directory, which the hardened unit otherwise denies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
