"""Day 2 on the sandbox: the runs are recorded (`history`), `up --retry-failed` after a
passed run does nothing, and a second `up` beside a running one is refused by the group's
lock. Leaves the sandbox serving as it found it (nothing here changes a host)."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path

import pytest
from sandboxkit import HOSTS, Sandbox, orchestrate

pytestmark = pytest.mark.e2e


def _up_records(sandbox: Sandbox) -> list[dict[str, object]]:
    listed = orchestrate(sandbox.cwd, sandbox.env, "history", "--hosts", "sandbox", "--json")
    assert listed.rc == 0, listed.tail()
    return [r for r in listed.json()["runs"] if r["command"] == "up"]


def test_history_lists_the_sandboxs_up_with_both_hosts_ok(sandbox: Sandbox) -> None:
    # The session's first up is the record whose playbook runs include its run directory.
    first = None
    for run in _up_records(sandbox):
        shown = orchestrate(sandbox.cwd, sandbox.env, "history", "show", str(run["run_id"]),
                            "--json")
        assert shown.rc == 0, shown.tail()
        if sandbox.result["run_dir"] in shown.json()["run_dirs"]:
            first = shown.json()
    assert first is not None, "the sandbox's up is not in `history`"
    assert first["outcome"] == "passed" and first["recorded"]
    assert {h: s["outcome"] for h, s in first["hosts"].items()} == dict.fromkeys(HOSTS, "ok")
    assert first["changed"] > 0 and first["duration_s"] > 0
    assert first["argv"][1:4] == ["up", "--hosts", "sandbox"]
    releases = {(r["deployment"], r["engine"]): r for r in first["releases"]}
    assert releases[("tiny-qwen2", "vllm")]["hosts"] == list(HOSTS)
    text = orchestrate(sandbox.cwd, sandbox.env, "history", "--hosts", "sandbox")
    assert text.rc == 0 and first["run_id"] in text.stdout


def test_retry_failed_after_a_passed_up_does_nothing(sandbox: Sandbox) -> None:
    before = _up_records(sandbox)
    # The modules before leave the sandbox serving: its last up passed.
    assert before[0]["outcome"] == "passed", before[0]
    retried = orchestrate(sandbox.cwd, sandbox.env, "up", "--hosts", "sandbox",
                          "--retry-failed", "--json")
    assert retried.rc == 0, retried.tail()
    assert retried.json()["retry_of"] == before[0]["run_id"]
    assert "nothing to retry" in retried.stderr
    assert _up_records(sandbox) == before


def test_a_second_up_beside_a_running_one_is_refused(sandbox: Sandbox) -> None:
    """The lock of a run in progress (this test's own process stands for it: alive, on this
    host) refuses `up` at once, naming that run."""
    lock = Path(sandbox.cwd) / ".orchestrate" / "locks" / "sandbox.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({
        "run_id": "20990101-000000-000000-up", "pid": os.getpid(),
        "host": socket.gethostname(), "user": "someone", "command": "up",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}))
    try:
        refused = orchestrate(sandbox.cwd, sandbox.env, "up", "--hosts", "sandbox",
                              "--check", "--only", "preflight")
    finally:
        lock.unlink()
    assert refused.rc == 2, refused.tail()
    assert "run 20990101-000000-000000-up" in refused.stderr
    assert f"pid {os.getpid()}" in refused.stderr and "someone@" in refused.stderr
