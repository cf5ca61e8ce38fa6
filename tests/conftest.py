"""Shared fixtures; slow suites (molecule, sandbox e2e) run after the unit tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_ORDER = {"molecule": 1, "e2e": 2}
# The sandbox modules share one sandbox (tests/e2e/conftest.py) and run in this order: the
# ones that only read it, then the rollout (which leaves it at its upgraded version), then
# the teardown (down, and `up` bringing the sandbox's own fleet back). Other e2e tests run
# before them: they bring up and remove sandbox hosts of their own, and refuse to start while
# the shared sandbox (removed only at the session's end) is running.
_E2E_MODULES = ["test_bastion", "test_sandbox_e2e", "test_sandbox_history",
                "test_sandbox_status", "test_sandbox_monitoring", "test_sandbox_rollout",
                "test_sandbox_teardown"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> tuple[int, int]:
        marker = max((_ORDER.get(m.name, 0) for m in item.iter_markers()), default=0)
        module = item.path.stem
        order = _E2E_MODULES.index(module) if module in _E2E_MODULES else -1
        return marker, order if marker == _ORDER["e2e"] else 0

    items.sort(key=rank)


@pytest.fixture
def write(tmp_path: Path):
    """Write a text file under tmp_path and return its path."""
    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path
    return _write


@pytest.fixture(scope="session")
def artifacts_env() -> dict[str, str]:
    """Build (or reuse) the sandbox image, wheelhouse and model; an environment naming them,
    for the Molecule and sandbox suites."""
    from orchestrator.knowledge.catalog import load_knowledge
    from orchestrator.sandbox import fleet as sandbox_fleet
    from orchestrator.sandbox import hosts as sandbox

    wheelhouse = sandbox_fleet.sandbox_wheelhouse(load_knowledge(), print)
    sandbox.ensure_image(print)
    model = sandbox_fleet.sandbox_model()
    # molecule starts ansible-config through PATH: put this environment's tools first,
    # whether or not the virtual environment is activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**sandbox.podman_env(), "PATH": path,
            "ORCHESTRATE_WHEELHOUSE": str(wheelhouse),
            "ORCHESTRATE_TINY_MODEL": str(model)}
