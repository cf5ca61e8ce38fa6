"""The pytorch role moves an existing environment from one torch build to another.

The role's install and pin steps run through ansible-runner (orchestrator.runner, as
`orchestrate` runs them) on this machine, in a venv that python_env's own configure step
gives its pip.conf and constraints.txt. Real torch is too big to install twice here: the
wheels are STAND-INS, two tiny packages named `torch` (2.0.0 and 2.1.0) holding only a
version attribute, in a local find-links directory. The torch check needs real torch, so
the runs skip its tag (`--skip-tags pytorch_check`, as an operator can), and python_env's
install step, which would install OS packages on this machine: the test makes the venv.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from orchestrator.plan.planner import STAGES, HostPlan, Plan
from orchestrator.run.render import render
from orchestrator.run.runner import Progress, RunResult, run_playbook

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the roles chown to root: needs root")

HOST = "local-1"
PLAYBOOK = """\
- name: python_env's pip configuration and the pytorch role, on this machine
  hosts: all
  gather_facts: false
  roles:
    - role: python_env
    - role: pytorch
"""
SKIP_TAGS = ["python_env_install", "pytorch_check"]


def standin_torch_wheel(folder: Path, version: str) -> None:
    """A STAND-IN for torch: a wheel named torch whose module has only __version__."""
    info = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": f'__version__ = "{version}"  # stand-in, not PyTorch\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: test_pytorch_role\n"
                          "Root-Is-Purelib: true\nTag: py3-none-any\n"),
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    with zipfile.ZipFile(folder / f"torch-{version}-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        wheel.writestr(f"{info}/RECORD", "\n".join(record) + "\n")


@dataclasses.dataclass
class Site:
    tmp: Path
    env: Path
    wheels: Path
    playbook: Path
    runs: itertools.count[int] = dataclasses.field(default_factory=itertools.count)

    def converge(self, requirement: str, *, check: bool = False
                 ) -> tuple[RunResult, list[Progress]]:
        host = HostPlan(
            name=HOST, group="test", profile="cpu",
            connection={"ansible_connection": "local",
                        "ansible_python_interpreter": sys.executable},
            vars={"python_env_path": str(self.env),
                  "python_env_pip_find_links": str(self.wheels),
                  "python_env_pip_no_index": True,
                  "pytorch_requirement": requirement},
            probes=[], reasons=[])
        plan = Plan(group="test", stages=list(STAGES), hosts=[host])
        run = render(plan, self.tmp / "runs", f"run-{next(self.runs)}", check=check)
        run = dataclasses.replace(run, playbook=str(self.playbook), tags=[],
                                  skip_tags=SKIP_TAGS)
        seen: list[Progress] = []
        return run_playbook(run, seen.append), seen

    def torch_version(self) -> str:
        return subprocess.run([str(self.env / "bin" / "python"), "-c",
                               "import torch; print(torch.__version__)"],
                              capture_output=True, text=True, check=True).stdout.strip()

    def pin(self) -> str:
        return (self.env / "constraints.txt").read_text(encoding="utf-8")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    # This machine's pip settings come from PIP_* variables, which override every pip.conf;
    # a real host's environment has none, and the env's own pip.conf must decide here.
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for version in ("2.0.0", "2.1.0"):
        standin_torch_wheel(wheels, version)
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, capture_output=True)
    playbook = tmp_path / "playbook.yml"
    playbook.write_text(PLAYBOOK, encoding="utf-8")
    return Site(tmp=tmp_path, env=env, wheels=wheels, playbook=playbook)


def changed_tasks(seen: list[Progress]) -> set[str]:
    return {p.task for p in seen if p.kind == "changed" and p.host == HOST}


def test_a_planned_torch_upgrade_replaces_the_pinned_build(site: Site) -> None:
    first, _ = site.converge("torch==2.0.0")
    assert first.ok, first.failures
    assert (site.torch_version(), site.pin()) == ("2.0.0", "torch==2.0.0\n")
    # The pin is live: pip in the environment refuses another torch (the setup under test).
    refused = subprocess.run([str(site.env / "bin" / "pip"), "install", "--dry-run",
                              "torch==2.1.0"], capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "torch==2.0.0" in refused.stdout + refused.stderr

    upgrade, seen = site.converge("torch==2.1.0")

    assert upgrade.ok, upgrade.failures
    assert {"Pin torch for every pip run in the environment", "Install torch"} <= \
        changed_tasks(seen)
    assert (site.torch_version(), site.pin()) == ("2.1.0", "torch==2.1.0\n")
    again, _ = site.converge("torch==2.1.0")
    assert again.ok and again.stats[HOST].changed == 0, again.failures


def test_check_mode_reports_the_move_and_changes_nothing(site: Site) -> None:
    first, _ = site.converge("torch==2.1.0")
    assert first.ok, first.failures

    check, seen = site.converge("torch==2.0.0", check=True)

    assert check.ok, check.failures
    assert {"Pin torch for every pip run in the environment", "Install torch"} <= \
        changed_tasks(seen)
    assert (site.torch_version(), site.pin()) == ("2.1.0", "torch==2.1.0\n")
