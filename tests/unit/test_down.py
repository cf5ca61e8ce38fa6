"""`orchestrate down` of real hosts: playbooks/teardown.yml first in check mode (what it
would remove on each host, shown and confirmed), then for real; --check stops after the
first run, a "no" or a failed check run removes nothing. Ansible itself is replaced here by
a stand-in that answers with the events a teardown run sends (the real playbook runs in
molecule/vllm and tests/e2e/test_sandbox_teardown.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator import cli
from orchestrator.run.lock import LockHeld, group_lock
from orchestrator.workflows import down as down_flow
from orchestrator.workflows.common import Target
from orchestrator.workflows.down import Declined, DownOptions, HostTeardown, Removals, down
from orchestrator.workflows.history import HistoryOptions, history, show

REPO = Path(__file__).resolve().parents[2]


def event(host: str, action: str, res: dict[str, Any], name: str = "runner_on_ok"
          ) -> dict[str, Any]:
    return {"event": name, "event_data": {"host": host, "task": "t", "task_action": action,
                                          "res": res}}


def teardown_events(host: str) -> list[dict[str, Any]]:
    """What a teardown run reports on a host with one vLLM instance and Ollama: loop items
    one by one (then all together), check mode's user result without a name, reads and the
    daemon-reload handler that remove nothing."""
    files = ["/etc/systemd/system/vllm@chat.service.d", "/etc/vllm/chat.env"]
    return [
        event(host, "ansible.builtin.find", {"changed": False, "files": []}),
        event(host, "ansible.builtin.systemd_service",
              {"changed": True, "name": "vllm@chat.service"}),
        *[event(host, "ansible.builtin.file", {"changed": True, "path": f, "item": f},
                "runner_item_on_ok") for f in files],
        event(host, "ansible.builtin.file",
              {"changed": True, "results": [{"changed": True, "path": f} for f in files]}),
        event(host, "ansible.builtin.systemd_service", {"changed": True, "name": None}),
        event(host, "ansible.builtin.user",
              {"changed": True, "invocation": {"module_args": {"name": "vllm",
                                                               "state": "absent"}}}),
        event(host, "ansible.builtin.group", {"changed": True, "name": "vllm"}),
        event(host, "ansible.builtin.stat", {"changed": False, "stat": {"exists": True}}),
        event(host, "ansible.builtin.systemd_service",
              {"changed": False, "name": "ollama.service"}),
    ]


def test_removals_are_the_changed_units_users_and_files_of_each_host() -> None:
    removals = Removals()
    for e in teardown_events("h1"):
        removals(e)
    assert removals.found == {"h1": {
        "units": ["vllm@chat.service"], "users": ["vllm"],
        "files": ["/etc/systemd/system/vllm@chat.service.d", "/etc/vllm/chat.env"]}}


def write_fleet(path: Path) -> Path:
    """Group g: two hosts (nothing listens: the stand-in answers for Ansible)."""
    path.write_text(yaml.safe_dump({
        "groups": {"g": {"profile": "cpu", "hosts": {
            "h1": {"address": "127.0.0.1", "ssh_port": 9},
            "h2": {"address": "127.0.0.1", "ssh_port": 9}}}},
        "deployments": [{"name": "chat", "model": "Qwen/Qwen2.5-0.5B-Instruct",
                         "engine": "vllm", "hosts": "g", "port": 8000,
                         "options": {"open": True}}]}))
    return path


class Ansible:
    """Stand-in for run_ansible: records each run, answers with teardown events for the
    hosts that still have something (a real run empties them), or fails a host."""

    def __init__(self, installed: set[str], fail: str | None = None) -> None:
        self.installed = set(installed)
        self.fail = fail
        self.calls: list[tuple[Path, str, list[str], list[str]]] = []

    def __call__(self, path: Path, playbook: str, inventories: list[str],
                 handler: Callable[[Mapping[str, Any]], bool], *, args: Sequence[str] = (),
                 **_: Any) -> tuple[str, int]:
        self.calls.append((path, playbook, list(inventories), list(args)))
        check = "--check" in args
        for host in sorted(self.installed):
            for e in teardown_events(host):
                handler(e)
        if self.fail:
            handler({"event": "runner_on_failed", "event_data": {
                "host": self.fail, "task": "vllm : Remove the service user",
                "res": {"msg": "userdel: user vllm is currently used by process 42"}}})
        handler({"event": "playbook_on_stats", "event_data": {
            "changed": {h: 8 for h in self.installed}, "ok": {"h1": 10, "h2": 10},
            "failures": {self.fail: 1} if self.fail else {}}})
        if not check and not self.fail:
            self.installed.clear()
        return ("failed", 2) if self.fail else ("successful", 0)


def purges(args: list[str]) -> Any:
    """The extra variables given inline (the others are files: @path)."""
    inline = [args[i + 1] for i, a in enumerate(args)
              if a == "--extra-vars" and not args[i + 1].startswith("@")]
    assert len(inline) == 1, args
    return json.loads(inline[0])


@pytest.fixture
def target(tmp_path: Path) -> Target:
    return Target("g", fleet=write_fleet(tmp_path / "fleet.yml"), state_dir=tmp_path / "state")


def test_down_shows_what_it_removes_asks_then_removes_it(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    ansible = Ansible({"h1", "h2"})
    monkeypatch.setattr(down_flow, "run_ansible", ansible)
    asked: list[dict[str, HostTeardown]] = []
    result = down(DownOptions("g", target=target, no_gather=True,
                              confirm=lambda found: asked.append(found) or True))
    # Asked once, with what each host would lose, after the check-mode run only.
    assert [sorted(a) for a in asked] == [["h1", "h2"]]
    assert asked[0]["h1"].units == ["vllm@chat.service"]
    assert asked[0]["h1"].users == ["vllm"]
    assert [("--check" in args, playbook) for _, playbook, _, args in ansible.calls] == [
        (True, "playbooks/teardown.yml"), (False, "playbooks/teardown.yml")]
    assert result.passed and not result.check and not result.sandbox
    assert result.removed == ["h1", "h2"]
    assert result.hosts["h2"].files == ["/etc/systemd/system/vllm@chat.service.d",
                                        "/etc/vllm/chat.env"]
    # Each run limited to the plan's hosts, the purges off.
    path, _, _, args = ansible.calls[1]
    assert (path / "limit.txt").read_text() == "h1\nh2\n"
    assert args[args.index("--limit") + 1] == f"@{path / 'limit.txt'}"
    assert purges(args) == {"teardown_purge_env": False, "teardown_purge_weights": False}
    # The replay by hand runs the same playbook with the same options.
    replay = (path / "command.txt").read_text()
    assert str(REPO / "playbooks" / "teardown.yml") in replay and "teardown_purge_env" in replay
    assert result.run_dir == str(path)


def test_check_runs_the_teardown_once_in_check_mode_and_asks_nothing(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    ansible = Ansible({"h1"})
    monkeypatch.setattr(down_flow, "run_ansible", ansible)

    def never(found: dict[str, HostTeardown]) -> bool:
        raise AssertionError("--check asks nothing")

    result = down(DownOptions("g", target=target, no_gather=True, check=True,
                              purge_weights=True, confirm=never))
    assert [("--check" in args) for *_, args in ansible.calls] == [True]
    assert purges(ansible.calls[0][3]) == {"teardown_purge_env": False,
                                           "teardown_purge_weights": True}
    assert result.check and result.passed and result.removed == []
    assert result.hosts["h1"].units == ["vllm@chat.service"] and result.hosts["h2"].empty
    assert ansible.installed == {"h1"}


def test_a_no_removes_nothing(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    ansible = Ansible({"h1", "h2"})
    monkeypatch.setattr(down_flow, "run_ansible", ansible)
    with pytest.raises(Declined, match="nothing was removed"):
        down(DownOptions("g", target=target, no_gather=True, confirm=lambda found: False))
    assert len(ansible.calls) == 1 and ansible.installed == {"h1", "h2"}


def test_nothing_left_to_remove_asks_nothing_and_runs_once(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    ansible = Ansible(set())
    monkeypatch.setattr(down_flow, "run_ansible", ansible)
    result = down(DownOptions("g", target=target, no_gather=True,
                              confirm=lambda found: pytest.fail("asked")))
    assert len(ansible.calls) == 1 and result.passed and result.removed == []


def test_a_host_failing_the_check_run_stops_before_anything_is_removed(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    ansible = Ansible({"h1", "h2"}, fail="h2")
    monkeypatch.setattr(down_flow, "run_ansible", ansible)
    result = down(DownOptions("g", target=target, no_gather=True,
                              confirm=lambda found: pytest.fail("asked")))
    assert len(ansible.calls) == 1 and not result.passed and result.removed == []
    assert result.hosts["h2"].failed and not result.hosts["h1"].failed
    assert [f.host for f in result.failures] == ["h2"]


def test_each_down_is_recorded_in_history_with_its_outcome_per_host(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(down_flow, "run_ansible", Ansible({"h1", "h2"}))
    removed = down(DownOptions("g", target=target, no_gather=True, confirm=lambda found: True))
    monkeypatch.setattr(down_flow, "run_ansible", Ansible({"h1"}, fail="h2"))
    failed = down(DownOptions("g", target=target, no_gather=True, check=True,
                              confirm=lambda found: True))
    monkeypatch.setattr(down_flow, "run_ansible", Ansible({"h1"}))
    with pytest.raises(Declined):
        down(DownOptions("g", target=target, no_gather=True, confirm=lambda found: False))
    runs = history(HistoryOptions(target.runs_root, "g")).runs
    # Newest first, one entry per down (its teardown runs are not listed apart).
    assert [(r.command, r.outcome, r.recorded) for r in runs] == [
        ("down", "error", True), ("down", "failed", True), ("down", "passed", True)]
    assert (runs[2].hosts_ok, runs[2].changed) == (2, 16)
    assert (runs[1].hosts_ok, runs[1].hosts_failed) == (1, 1)
    first = show(target.runs_root, runs[2].run_id)
    assert [Path(d) for d in first.run_dirs][-1] == Path(removed.run_dir or "")
    assert len(first.run_dirs) == 2 and not first.check
    assert show(target.runs_root, runs[1].run_id).check and not failed.passed
    assert show(target.runs_root, runs[0].run_id).error == "not confirmed: nothing was removed"
    assert first.fleet_sha256 is not None


def test_down_waits_for_no_up_of_the_same_group(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    ansible = Ansible({"h1"})
    monkeypatch.setattr(down_flow, "run_ansible", ansible)
    with group_lock(target.state_dir, "g", "20260101-000000-000000-up", "up"), \
            pytest.raises(LockHeld) as held:
        down(DownOptions("g", target=target, no_gather=True, confirm=lambda found: True))
    assert held.value.exit_code == 2 and ansible.calls == []
    # Released after a down: an up may take it.
    down(DownOptions("g", target=target, no_gather=True, confirm=lambda found: True))
    with group_lock(target.state_dir, "g", "20260101-000001-000000-up", "up"):
        pass


def test_cli_without_a_terminal_and_without_yes_refuses_before_any_run(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    ansible = Ansible({"h1"})
    monkeypatch.setattr(down_flow, "run_ansible", ansible)
    # CliRunner's stdin is no terminal.
    result = CliRunner().invoke(cli.app, ["down", "--hosts", "g", "-f", str(target.fleet),
                                          "--no-gather"])
    assert result.exit_code == 2, result.output
    assert "pass --yes" in result.stderr and "--check" in result.stderr
    assert ansible.calls == []


def test_cli_yes_removes_and_prints_per_host(
        tmp_path: Path, target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    ansible = Ansible({"h1"})
    monkeypatch.setattr(down_flow, "run_ansible", ansible)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, ["down", "--hosts", "g", "-f", str(target.fleet),
                                          "--no-gather", "--yes", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["removed"] == ["h1"] and document["hosts"]["h1"]["users"] == ["vllm"]
    assert "h1 would remove:" in result.stderr and "h1 removed:" in result.stderr
    assert "units: vllm@chat.service" in result.stderr
    assert ansible.installed == set()


def test_cli_check_exits_0_and_a_failed_host_exits_1(
        tmp_path: Path, target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(down_flow, "run_ansible", Ansible({"h1"}))
    shown = CliRunner().invoke(cli.app, ["down", "--hosts", "g", "-f", str(target.fleet),
                                         "--no-gather", "--check"])
    assert shown.exit_code == 0, shown.output
    assert "h1 would remove:" in shown.stdout and "h2" not in shown.stdout.split("run:")[0]
    monkeypatch.setattr(down_flow, "run_ansible", Ansible({"h1"}, fail="h1"))
    failed = CliRunner().invoke(cli.app, ["down", "--hosts", "g", "-f", str(target.fleet),
                                          "--no-gather", "--yes"])
    assert failed.exit_code == 1 and "currently used by process" in failed.stdout


def test_the_sandbox_is_removed_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    refused = CliRunner().invoke(cli.app, ["down", "--hosts", "sandbox", "--check"])
    assert refused.exit_code == 2 and "removed whole" in refused.stderr


def test_every_teardown_the_playbook_runs_is_a_documented_entry_point() -> None:
    plays = yaml.safe_load((REPO / "playbooks" / "teardown.yml").read_text())
    included = [t["ansible.builtin.include_role"] for play in plays for t in play["tasks"]]
    assert {i["name"] for i in included} == {"vllm", "ray_cluster", "ollama", "model_weights",
                                             "python_env"}
    for role in included:
        specs = yaml.safe_load((REPO / "roles" / role["name"] / "meta" /
                                "argument_specs.yml").read_text())["argument_specs"]
        assert role["tasks_from"] in specs, role
        assert (REPO / "roles" / role["name"] / "tasks" / f"{role['tasks_from']}.yml").is_file()
