"""The sandbox shared by every end-to-end module: brought up once per session with
`orchestrate up --hosts sandbox`, removed with `down` at the end (asserted there).

Modules run in name order (test_sandbox_e2e.py first); a day-2 module
(test_sandbox_<topic>.py) finds the sandbox serving and leaves it serving."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sandboxkit import STATE, Sandbox, orchestrate

from orchestrator.sandbox import hosts as sandbox_hosts


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory,
            artifacts_env: dict[str, str]) -> Iterator[Sandbox]:
    """The sandbox, brought up once; `down` at teardown, asserted."""
    cwd = tmp_path_factory.mktemp("sandbox")
    try:
        first = orchestrate(cwd, artifacts_env, "up", "--hosts", "sandbox", "--json")
        result = first.json()
    except BaseException:
        orchestrate(cwd, artifacts_env, "down", "--hosts", "sandbox")
        raise
    yield Sandbox(cwd, artifacts_env, first, result)
    down = orchestrate(cwd, artifacts_env, "down", "--hosts", "sandbox")
    left = [name for name, _ in sandbox_hosts.status()]
    assert down.rc == 0 and not left and not (cwd / STATE).exists(), (
        f"down left containers {left}, state dir present: {(cwd / STATE).exists()}; "
        f"{down.tail()}")
