"""roles/ray_cluster/files/wait_nodes.py: the count of active nodes in `ray status`, and the
poll that the role runs on the head until the expected members are in.

The output under tests/data/ray_status was printed by Ray 2.60.0's `ray status` (a head
started on this machine).
The poll runs against a stand-in `ray` executable that prints those outputs in turn.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "roles" / "ray_cluster" / "files" / "wait_nodes.py"
DATA = REPO / "tests" / "data" / "ray_status"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wait_nodes", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wait_nodes = _load()


def test_active_nodes_of_real_output() -> None:
    assert wait_nodes.active_nodes((DATA / "one-node-2.60.0.txt").read_text()) == 1


def test_pending_and_failed_nodes_are_not_counted() -> None:
    real = (DATA / "one-node-2.60.0.txt").read_text()
    status = real.replace(" (no pending nodes)", " 3 node_0123abcd").replace(
        " (no failures)", " node_89ef: NodeTerminated (ip: 10.0.0.9)")
    assert wait_nodes.active_nodes(status) == 1
    assert wait_nodes.active_nodes("") == 0


def _standin_ray(tmp_path: Path, outputs: list[str], rc: int = 0) -> Path:
    """A stand-in `ray`: each call prints the next of `outputs` (the last one repeats)."""
    for index, text in enumerate(outputs):
        (tmp_path / f"out{index}").write_text(text)
    ray = tmp_path / "ray"
    ray.write_text(f"""#!{sys.executable}
import pathlib, sys
assert sys.argv[1:3] == ["status", "--address"], sys.argv
calls = pathlib.Path({str(tmp_path / "calls")!r})
n = int(calls.read_text()) if calls.exists() else 0
calls.write_text(str(n + 1))
print(pathlib.Path({str(tmp_path)!r}, "out" + str(min(n, {len(outputs) - 1}))).read_text())
sys.exit({rc})
""")
    ray.chmod(0o755)
    return ray


def _run(ray: Path, expected: int, timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), str(ray), "10.0.0.1:6379",
                           str(expected), str(timeout), "0"],
                          capture_output=True, text=True, check=False, timeout=60)


def test_polls_until_the_expected_nodes_are_active(tmp_path: Path) -> None:
    one = (DATA / "one-node-2.60.0.txt").read_text()
    ray = _standin_ray(tmp_path, ["", "", one])
    proc = _run(ray, 1, 30)
    assert proc.returncode == 0, proc.stdout
    assert (tmp_path / "calls").read_text() == "3"
    assert proc.stdout.count(" node_") == 1


def test_reports_the_count_and_the_status_when_time_is_up(tmp_path: Path) -> None:
    ray = _standin_ray(tmp_path, [(DATA / "one-node-2.60.0.txt").read_text()])
    proc = _run(ray, 2, 0)
    assert proc.returncode == 1
    assert proc.stdout.startswith("the Ray head at 10.0.0.1:6379 reports 1 active node(s) "
                                  "after 0 s, 2 expected")
    # The node section of the last answer, not the resources after it.
    assert " 1 node_2c3aca138a1156c3ee84b4129c18a55d87747e21bf2b913101865e63" in proc.stdout
    assert "Recent failures:\n (no failures)" in proc.stdout
    assert "object_store_memory" not in proc.stdout


def test_a_failing_ray_status_counts_no_nodes(tmp_path: Path) -> None:
    ray = _standin_ray(tmp_path, [(DATA / "one-node-2.60.0.txt").read_text()], rc=1)
    proc = _run(ray, 1, 0)
    assert proc.returncode == 1
    assert "reports 0 active node(s)" in proc.stdout
