"""Molecule scenarios for the roles: converge, idempotence and verify of real state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALL_SCENARIOS = sorted(p.parent.name for p in (REPO / "molecule").glob("*/molecule.yml"))
# Scenarios on a podman bridge network run only inside a private network namespace,
# from their own test (test_ray_cluster.py), never from the generic one below.
NETNS_SCENARIOS = {"ray_cluster"}
SCENARIOS = [s for s in ALL_SCENARIOS if s not in NETNS_SCENARIOS]


@pytest.mark.molecule
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(scenario: str, artifacts_env: dict[str, str]) -> None:
    molecule = Path(sys.executable).parent / "molecule"
    proc = subprocess.run([str(molecule), "test", "-s", scenario], cwd=REPO, env=artifacts_env,
                          capture_output=True, text=True, check=False)
    log = REPO / ".orchestrate" / f"molecule-{scenario}.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (f"molecule test -s {scenario} failed (full log: {log}):\n"
                                  + "\n".join((proc.stdout + proc.stderr).splitlines()[-60:]))


def test_the_required_scenarios_exist() -> None:
    assert {"python_env", "vllm", "ollama", "nvidia_driver"} <= set(SCENARIOS)
    assert NETNS_SCENARIOS.issubset(ALL_SCENARIOS)
    assert NETNS_SCENARIOS.isdisjoint(SCENARIOS)
