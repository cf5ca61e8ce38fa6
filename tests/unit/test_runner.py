"""Runner event handling, against real ansible-runner events from a local playbook."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

from orchestrator.plan.planner import STAGES, HostPlan, Plan
from orchestrator.run.render import render
from orchestrator.run.runner import Progress, failure_message, run_playbook

DATA = Path(__file__).resolve().parents[1] / "data"


def local_plan() -> Plan:
    host = HostPlan(name="local-1", group="test", profile="cpu",
                    connection={"ansible_host": "127.0.0.1", "ansible_connection": "local",
                                # A path: inventory values are data, never templates.
                                "ansible_python_interpreter": sys.executable},
                    vars={}, probes=[], reasons=[])
    return Plan(group="test", stages=list(STAGES), hosts=[host])


def test_real_run_reports_counts_and_the_failing_task(tmp_path: Path) -> None:
    run = render(local_plan(), tmp_path, "test-run")
    run = run.__class__(**{**vars(run), "playbook": str(DATA / "runner-playbook.yml")})
    seen: list[Progress] = []

    result = run_playbook(run, seen.append)

    assert result.rc != 0 and not result.ok
    stats = result.stats["local-1"]
    assert (stats.changed, stats.failed) == (1, 1)
    [failure] = result.failures  # the ignored failure is not reported
    assert failure.host == "local-1"
    assert failure.task == "Fail with a reason on stderr"
    assert "disk full on /var" in failure.message and "exit 3" in failure.message
    kinds = [(p.kind, p.task) for p in seen if p.host == "local-1"]
    assert ("changed", "Change something") in kinds
    assert ("failed", "Fail with a reason on stderr") in kinds
    assert seen[0] == Progress("play", play="Runner events under test")
    assert (run.artifacts / "ansible" / "job_events").is_dir()
    assert not (run.path / "env").exists()  # nothing secret-bearing written by runner
    saved = (run.artifacts / "ansible" / "command").read_text()
    assert "ansible-playbook" in saved and "PATH" not in saved  # the environment is not kept


def test_failure_message_prefers_msg_and_stderr() -> None:
    res = {"msg": "non-zero return code", "rc": 2, "cmd": ["pip", "install", "x"],
           "stderr": "line1\nERROR: No matching distribution found for x\n", "stdout": "noise"}
    text = failure_message(res)
    assert text.splitlines()[0] == "non-zero return code"
    assert "No matching distribution found for x" in text
    assert "noise" not in text
    assert "(exit 2: pip install x)" in text


def test_failure_message_names_the_failing_loop_item() -> None:
    res = {"msg": "One or more items failed", "results": [
        {"item": "a", "failed": False},
        {"item": "b", "failed": True, "msg": "b is broken"}]}
    assert failure_message(res) == "item 'b': b is broken"


def test_failure_message_without_anything_points_at_artifacts() -> None:
    assert "artifacts" in failure_message({})


def test_run_ids_sort_by_time() -> None:
    from orchestrator.run.render import new_run_id
    early = new_run_id(dt.datetime(2026, 1, 2, 3, 4, 5), "up")
    late = new_run_id(dt.datetime(2026, 1, 2, 3, 4, 6), "up")
    assert early < late and early.endswith("-up")


def test_failure_message_uses_the_loop_label() -> None:
    res = {"results": [{"item": {"name": "qwen7b", "args": ["--model", "/m"]},
                        "_ansible_item_label": "qwen7b", "failed": True, "msg": "boom"}]}
    assert failure_message(res) == "item 'qwen7b': boom"


def test_operator_inventory_group_vars_apply_and_planned_vars_win(tmp_path: Path) -> None:
    own = tmp_path / "own"
    (own / "group_vars").mkdir(parents=True)
    (own / "hosts.yml").write_text("all:\n  children:\n    test:\n      hosts:\n"
                                   "        local-1: {ansible_connection: local}\n")
    (own / "group_vars" / "test.yml").write_text(
        "operator_only: from the operator inventory\nboth: from the operator inventory\n")
    plan = local_plan()
    plan = plan.model_copy(update={"hosts": [plan.hosts[0].model_copy(
        update={"vars": {"both": "planned"}})]})
    run = render(plan, tmp_path / "runs", "precedence", operator_inventory=own / "hosts.yml")
    run = run.__class__(**{**vars(run), "playbook": str(DATA / "precedence-playbook.yml")})

    result = run_playbook(run, lambda _: None)

    assert result.ok, result.failures
    assert run.inventories() == [str(own / "hosts.yml"), str(run.inventory)]
    assert f"-i {own / 'hosts.yml'} -i {run.inventory}" in (run.path / "command.txt").read_text()
