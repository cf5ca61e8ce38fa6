"""`pip install qwen-fleet-orchestrator` without extras: every command runs, and the ones
that need an extra end in one line naming it (exit 2).

The missing extras are simulated in a child Python: their modules are blocked
(sys.modules[name] = None makes `import name` fail as if not installed), and the
`modelscope` client is not found (sys.executable is elsewhere, PATH has none).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
# The [sandbox] and [mirror] extras' modules (pyproject.toml).
EXTRAS = ("numpy", "safetensors", "tokenizers", "modelscope", "modelscope_hub")
COMMANDS = [[], ["init"], ["plan"], ["up"], ["probe"], ["bench"], ["facts"],
            ["facts", "parse"], ["compat"], ["fit"], ["mirror"], ["status"], ["down"],
            ["schema"]]

CHILD = """
import json, os, sys
for name in {extras!r}:
    sys.modules[name] = None
sys.executable = "/nonexistent/bin/python"
os.environ["PATH"] = "/usr/bin:/bin"
from typer.testing import CliRunner
from orchestrator import cli
out = []
for argv in json.loads(sys.argv[1]):
    result = CliRunner().invoke(cli.app, argv)
    out.append({{"argv": argv, "code": result.exit_code, "stdout": result.stdout,
                "stderr": result.stderr, "exception": repr(result.exception)
                if result.exception and not isinstance(result.exception, SystemExit) else None}})
out.append({{"loaded": sorted(n for n in sys.modules if n.startswith("orchestrator.sandbox"))}})
print(json.dumps(out))
"""


def without_extras(cwd: Path, *runs: list[str]) -> list[dict[str, object]]:
    proc = subprocess.run([sys.executable, "-c", CHILD.format(extras=EXTRAS), json.dumps(runs)],
                          cwd=cwd, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found: list[dict[str, object]] = json.loads(proc.stdout)
    return found


def test_every_commands_help_runs_without_the_extras(tmp_path: Path) -> None:
    *helps, loaded = without_extras(tmp_path, *[[*c, "--help"] for c in COMMANDS])
    for run in helps:
        assert run["code"] == 0 and run["exception"] is None, run
        assert "Usage: " in str(run["stdout"]) and "Traceback" not in str(run["stderr"])
    # --help imports no part of the sandbox.
    assert loaded == {"loaded": []}


def test_commands_that_need_no_extra_run_without_them(tmp_path: Path) -> None:
    fixture = str(REPO / "tests" / "data" / "nvidia-smi" / "table__A10__550.127.05.txt")
    runs = without_extras(
        tmp_path, ["compat", "--driver", "535.104.05", "--json"],
        ["fit", "--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu", "NVIDIA A10"],
        ["facts", "parse", fixture], ["init"], ["plan", "--hosts", "gpu-cluster", "--no-gather"],
        ["schema", "status"])[:-1]
    assert [r["code"] for r in runs] == [0] * len(runs), runs
    assert json.loads(str(runs[0]["stdout"]))["vllm"] == {"version": "0.7.3"}


def test_the_sandbox_and_the_mirrors_downloads_name_their_extra(tmp_path: Path) -> None:
    (tmp_path / "mirror-fleet.yml").write_text(yaml.safe_dump({
        "groups": {"g": {"profile": "cpu", "hosts": {"h": {"address": "10.0.0.1"}}}},
        "deployments": [{"name": "q", "model": "Qwen/Qwen2.5-0.5B-Instruct", "engine": "vllm",
                         "hosts": "g", "port": 8000, "options": {"open": True}}]}))
    sandbox, mirror, plan = without_extras(
        tmp_path, ["up", "--hosts", "sandbox"],
        ["mirror", "--hosts", "g", "-f", "mirror-fleet.yml", "--no-wheels", "--no-ollama"],
        ["plan", "--hosts", "sandbox", "--json"])[:-1]
    for run, extra in ((sandbox, "sandbox"), (mirror, "mirror"), (plan, "sandbox")):
        assert run["code"] == 2 and run["exception"] is None, run
        stderr = str(run["stderr"])
        assert stderr.startswith("error: ") and stderr.strip().count("\n") == 0, stderr
        assert f"pip install 'qwen-fleet-orchestrator[{extra}]'" in " ".join(stderr.split())
        assert run["stdout"] == ""
    assert "(numpy is missing)" in str(sandbox["stderr"])
    # Stopped before anything was written or downloaded (the mirror's empty folders only).
    assert not (tmp_path / ".orchestrate" / "sandbox").exists()
    assert not [p for p in (tmp_path / ".orchestrate").rglob("*") if p.is_file()]


def test_the_wheel_carries_the_ansible_side_and_plans_without_the_checkout(
        tmp_path: Path) -> None:
    """The real wheel (setup.py's build step), installed into a directory that shadows the
    checkout: `plan` and `init` run from the Ansible files the wheel carries."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(wheels), str(REPO)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = wheels.glob("qwen_fleet_orchestrator-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, timeout=300, capture_output=True)
    project = site / "orchestrator" / "_project"
    for needed in ("ansible.cfg", "playbooks/site.yml", "roles/vllm/defaults/main.yml",
                   "templates/fleet.yml", "templates/inventory.yml.j2",
                   "roles/gpu_check/module_utils/nvidia_smi.py"):
        assert (project / needed).is_file(), needed
    # The link into the package became a copy of the file it named.
    assert not (project / "roles/gpu_check/module_utils/nvidia_smi.py").is_symlink()

    work = tmp_path / "work"
    work.mkdir()
    # -P: not the current directory first; PYTHONPATH puts the wheel before the checkout.
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    program = ("import sys; from orchestrator import cli; from orchestrator.knowledge import "
               "roles; print(roles.ROOT, file=sys.stderr); cli.app()")
    init = subprocess.run([sys.executable, "-P", "-c", program, "init"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert init.returncode == 0, init.stderr
    assert str(project) in init.stderr
    plan = subprocess.run([sys.executable, "-P", "-c", program, "plan", "--hosts",
                           "gpu-cluster", "--json"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["hosts"]
