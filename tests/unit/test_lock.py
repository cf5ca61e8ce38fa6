"""The group lock (orchestrator/run/lock.py): one run at a time per group, a stale lock
detected and explained, released on every way out."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.run.lock import (
    LockHeld,
    acquire,
    group_lock,
    lock_path,
    read_lock,
    release,
)

REPO = Path(__file__).resolve().parents[2]


def _write_lock(state: Path, group: str, **fields: object) -> Path:
    path = lock_path(state, group)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"run_id": "20260101-000000-000000-up", "pid": 1, "host": socket.gethostname(),
            "user": "alice", "command": "up",
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **fields}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_lock_file_holds_who_and_since_and_is_removed_after(tmp_path: Path) -> None:
    with group_lock(tmp_path, "gpu", "run-1", "up") as info:
        held = read_lock(lock_path(tmp_path, "gpu"))
        assert held == info
        assert (held.run_id, held.pid, held.command) == ("run-1", os.getpid(), "up")
        assert held.host == socket.gethostname() and held.user
        assert oct(lock_path(tmp_path, "gpu").stat().st_mode & 0o777) == "0o600"
    assert not lock_path(tmp_path, "gpu").exists()


def test_second_run_on_the_same_group_is_refused_naming_the_first(tmp_path: Path) -> None:
    with group_lock(tmp_path, "gpu", "run-1", "up"):
        with pytest.raises(LockHeld) as refused, group_lock(tmp_path, "gpu", "run-2", "up"):
            pass
        message = str(refused.value)
        assert "run run-1" in message and f"pid {os.getpid()}" in message
        assert "since" in message and "--break-lock" in message
        assert refused.value.exit_code == 2
        # The refused run did not take or remove the first one's lock.
        assert read_lock(lock_path(tmp_path, "gpu")).run_id == "run-1"  # type: ignore[union-attr]
        # Another group is free.
        with group_lock(tmp_path, "other", "run-3", "up"):
            pass
    assert not lock_path(tmp_path, "gpu").exists()


def test_a_lock_held_by_another_live_process_is_refused_then_taken_once_it_died(
        tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from orchestrator.run.lock import acquire
            acquire(Path({str(tmp_path)!r}), "gpu", "holder-run", "up")
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"holder-run.*pid {holder.pid}.*still runs"):
            acquire(tmp_path, "gpu", "mine", "up")
    finally:
        holder.kill()
        holder.wait()
    warnings: list[str] = []
    with group_lock(tmp_path, "gpu", "mine", "up", log=warnings.append):
        assert read_lock(lock_path(tmp_path, "gpu")).run_id == "mine"  # type: ignore[union-attr]
    assert len(warnings) == 1
    assert f"pid {holder.pid} no longer runs here" in warnings[0]
    assert "holder-run" in warnings[0] and "taken over by run mine" in warnings[0]


def test_stale_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path: Path) -> None:
    _write_lock(tmp_path, "gpu", pid=_dead_pid())
    warnings: list[str] = []
    info = acquire(tmp_path, "gpu", "mine", "up", log=warnings.append)
    assert info.run_id == "mine" and "no longer runs here" in warnings[0]
    assert not list(lock_path(tmp_path, "gpu").parent.glob("*.stale-*"))


def test_another_control_hosts_lock_holds_until_old_or_broken(tmp_path: Path) -> None:
    _write_lock(tmp_path, "gpu", host="other-control", pid=os.getpid())
    with pytest.raises(LockHeld, match="taken on other-control, whose processes cannot"):
        acquire(tmp_path, "gpu", "mine", "up")
    warnings: list[str] = []
    acquire(tmp_path, "gpu", "mine", "up", break_lock=True, log=warnings.append)
    assert "broken by --break-lock" in warnings[0]

    old = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)).isoformat(timespec="seconds")
    _write_lock(tmp_path, "g2", host="other-control", started=old)
    with pytest.raises(LockHeld):
        acquire(tmp_path, "g2", "mine", "up", stale_after=dt.timedelta(hours=3))
    acquire(tmp_path, "g2", "mine", "up", stale_after=dt.timedelta(hours=1),
            log=warnings.append)
    assert "taken on another control host more than 1:00:00 ago" in warnings[1]


def test_a_lock_being_written_holds_a_damaged_old_one_does_not(tmp_path: Path) -> None:
    path = lock_path(tmp_path, "gpu")
    path.parent.mkdir(parents=True)
    path.write_text("", encoding="utf-8")
    with pytest.raises(LockHeld, match="being written"):
        acquire(tmp_path, "gpu", "mine", "up")
    hour_ago = dt.datetime.now().timestamp() - 3600
    os.utime(path, (hour_ago, hour_ago))
    warnings: list[str] = []
    acquire(tmp_path, "gpu", "mine", "up", log=warnings.append)
    assert "unreadable lock" in warnings[0]


@pytest.mark.parametrize("raised", [RuntimeError("boom"), KeyboardInterrupt()])
def test_released_when_the_run_raises(tmp_path: Path, raised: BaseException) -> None:
    with pytest.raises(type(raised)), group_lock(tmp_path, "gpu", "run-1", "up"):
        raise raised
    assert not lock_path(tmp_path, "gpu").exists()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path: Path) -> None:
    _write_lock(tmp_path, "gpu", run_id="someone-else", pid=os.getpid())
    release(tmp_path, "gpu", "run-1")
    assert lock_path(tmp_path, "gpu").exists()


def test_group_names_that_are_not_file_names_stay_inside_the_locks_dir(tmp_path: Path) -> None:
    path = lock_path(tmp_path, "../x/y")
    assert path.parent == tmp_path / "locks" and "/" not in path.name
    assert not path.name.startswith(".")
    assert lock_path(tmp_path, "a/b") != lock_path(tmp_path, "a_b")
