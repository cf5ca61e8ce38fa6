"""`orchestrate logs`: which units, journalctl's command line, its JSON entries, cursors across
reads (no line twice, none lost), hosts not reached, and lines printed as text.

The hosts' journals are STAND-INS: `journalctl -o json` lines built here as journald writes
them, handed back by a stand-in for the one Ansible run (Journals.read). The run over real
hosts is tests/e2e/test_sandbox_status.py.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from orchestrator import cli
from orchestrator.errors import ConfigError
from orchestrator.plan.planner import HostPlan, Plan, RayClusterPlan
from orchestrator.report.console import log_line
from orchestrator.workflows import logs as logs_flow
from orchestrator.workflows.common import NO_FACTS, Target, plan_for
from orchestrator.workflows.logs import (
    Journals,
    Unreached,
    follow,
    journal_argv,
    parse_journal,
    read_once,
    units_of,
)

VLLM = "vllm@chat.service"
OLLAMA = "ollama.service"
T0 = 1_765_000_000_000_000  # microseconds, as __REALTIME_TIMESTAMP


def write_fleet(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "groups": {"g": {"profile": "cpu", "hosts": {
            "h1": {"address": "10.0.0.1"}, "h2": {"address": "10.0.0.2"}}}},
        "deployments": [
            {"name": "chat", "model": "Qwen/Qwen2.5-0.5B-Instruct", "engine": "vllm",
             "hosts": "g", "port": 8000, "options": {"open": True}},
            {"name": "local", "model": "Qwen/Qwen2.5-0.5B-Instruct", "engine": "ollama",
             "hosts": "g", "port": 11434,
             "options": {"bind_address": "0.0.0.0", "open": True}}]}))
    return path


@pytest.fixture
def plan(tmp_path: Path) -> Plan:
    return plan_for(Target("g", fleet=write_fleet(tmp_path / "fleet.yml")),
                    facts=NO_FACTS).plan


def entry(n: int, message: Any, *, unit: str = VLLM, systemd: bool = False) -> str:
    """One line of `journalctl -o json --output-fields=...` as journald writes it."""
    fields: dict[str, Any] = {"__CURSOR": f"s=abc;i={n:x}", "__REALTIME_TIMESTAMP": str(T0 + n),
                              "__MONOTONIC_TIMESTAMP": "1", "_BOOT_ID": "b",
                              "MESSAGE": message, "PRIORITY": "6"}
    # systemd's own lines about a unit come from init.scope and name the unit in UNIT.
    fields.update({"UNIT": unit, "_SYSTEMD_UNIT": "init.scope"} if systemd
                  else {"_SYSTEMD_UNIT": unit})
    return json.dumps(fields)


class StandIn:
    """A STAND-IN for the one Ansible run: per host, what journalctl prints at each read, or
    why the host was not reached; it keeps every command line it was given."""

    def __init__(self, answers: dict[str, list[str | Unreached]]) -> None:
        self.answers = answers
        self.argvs: list[dict[str, list[str]]] = []

    def __call__(self, hosts: list[HostPlan], argvs: Mapping[str, list[str]],
                 inventory: Path | None) -> dict[str, str | Unreached]:
        self.argvs.append(dict(argvs))
        return {h.name: self.answers[h.name].pop(0) for h in hosts}


# --- units and command line -----------------------------------------------------------------

def test_units_of_the_planned_deployments(plan: Plan) -> None:
    assert units_of(plan) == {"h1": [VLLM, OLLAMA], "h2": [VLLM, OLLAMA]}
    assert units_of(plan, "local") == {"h1": [OLLAMA], "h2": [OLLAMA]}
    with pytest.raises(ConfigError, match=r"no deployment 'nope'.*deployments: chat, local"):
        units_of(plan, "nope")
    ray = plan.model_copy(update={"ray_cluster": RayClusterPlan(
        deployment="chat", head="h1", members=["h1", "h2"])})
    assert units_of(ray, "chat") == {"h1": [VLLM, "ray-head.service"],
                                     "h2": [VLLM, "ray-worker.service"]}


def test_journalctl_reads_a_window_then_after_the_cursor() -> None:
    first = journal_argv([VLLM, OLLAMA], since=dt.timedelta(hours=1), lines=50, cursor=None)
    assert first == ["journalctl", "--no-pager", "--quiet", "--output=json",
                     "--output-fields=MESSAGE,_SYSTEMD_UNIT,UNIT,PRIORITY",
                     f"--unit={VLLM}", f"--unit={OLLAMA}", "--since=-3600s", "--lines=50"]
    later = journal_argv([VLLM], since=dt.timedelta(hours=1), lines=50, cursor="s=x;i=5")
    # Every entry after the cursor, however many: a --lines here would drop some.
    assert later[-1] == "--after-cursor=s=x;i=5" and not any(
        a.startswith(("--lines", "--since")) for a in later)


# --- journal entries ------------------------------------------------------------------------

def test_entries_parse_with_unit_time_and_bytes() -> None:
    text = "\n".join([
        entry(1, "INFO: Started server process"),
        entry(2, "Started vllm@chat.service.", systemd=True),
        entry(3, list("caf\xe9 \xff".encode("latin-1"))),  # not UTF-8: journald gives bytes
        "{cut off",
        "-- No entries --",
        entry(4, None, unit=OLLAMA),
    ])
    found = parse_journal("h1", [VLLM, OLLAMA], text)
    assert [(r.unit, r.message, r.cursor) for r in found] == [
        (VLLM, "INFO: Started server process", "s=abc;i=1"),
        (VLLM, "Started vllm@chat.service.", "s=abc;i=2"),
        (VLLM, "caf\ufffd \ufffd", "s=abc;i=3"),
        (OLLAMA, "", "s=abc;i=4")]
    assert found[0].time == dt.datetime.fromtimestamp((T0 + 1) / 1e6, dt.UTC)
    assert found[0].priority == 6 and found[0].host == "h1"


def test_cursors_print_each_line_once_and_lose_none(plan: Plan) -> None:
    reader = StandIn({
        "h1": [entry(1, "a") + "\n" + entry(2, "b"), "", entry(3, "c")],
        "h2": ["", entry(7, "x"), entry(8, "y")],
    })
    found = Journals(plan, units_of(plan), dt.timedelta(hours=1), 200, read=reader)
    seen = []
    for _ in range(3):
        records, unreached = found.poll()
        assert unreached == []
        seen += [(r.host, r.message) for r in records]
    assert seen == [("h1", "a"), ("h1", "b"), ("h2", "x"), ("h1", "c"), ("h2", "y")]
    first, second, third = reader.argvs
    assert first["h1"][-2:] == ["--since=-3600s", "--lines=200"]
    assert second["h1"][-1] == "--after-cursor=s=abc;i=2"
    # h2 had nothing in the window: the next read takes all of it (no --lines), then its
    # cursor.
    assert second["h2"][-1] == "--since=-3600s"
    assert third["h2"][-1] == "--after-cursor=s=abc;i=7"
    assert third["h1"][-1] == "--after-cursor=s=abc;i=2"


def test_a_host_not_reached_is_one_line_the_others_print(plan: Plan) -> None:
    down = Unreached(host="h2", reason="not reached: ssh: connect to host 10.0.0.2: refused")
    reader = StandIn({"h1": [entry(1, "a"), entry(2, "b")], "h2": [down, down]})
    found = Journals(plan, units_of(plan), None, 200, read=reader)
    result = read_once(found)
    assert [(r.host, r.message) for r in result.records] == [("h1", "a")]
    assert result.unreachable == [down]
    # Not read yet: its next read is still the first one (the last lines, no cursor).
    assert found.argv("h2")[-1] == "--lines=200"


def test_follow_emits_new_lines_and_a_hosts_reason_once(plan: Plan) -> None:
    down = Unreached(host="h2", reason="not reached")
    reader = StandIn({"h1": [entry(1, "a"), "", entry(2, "b"), ""],
                      "h2": [down, down, entry(5, "x"), down]})
    found = Journals(plan, units_of(plan), None, 10, read=reader)
    emitted: list[tuple[list[str], list[str]]] = []
    sleeps = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        follow(found, lambda r, u: emitted.append(([x.message for x in r],
                                                   [x.host for x in u])),
               every=0.5, sleep=sleep)
    assert emitted == [(["a"], ["h2"]), (["b", "x"], []), ([], ["h2"])]
    assert sleeps == [0.5] * 4


# --- printed as text --------------------------------------------------------------------------

def test_hostile_lines_are_printed_as_text() -> None:
    out = io.StringIO()
    console = Console(file=out, width=400, color_system="truecolor", force_terminal=True)
    when = dt.datetime(2026, 12, 6, 3, 0, tzinfo=dt.UTC)
    console.print(log_line("h1", VLLM, when, "[/x] [red]fake[/red] \x1b[2J\x1b]0;t\x07 "
                                             "a\nh2 vllm@chat.service forged"),
                  highlight=False, soft_wrap=True)
    text = out.getvalue()
    assert "[/x] [red]fake[/red]" in text
    assert "\\x1b[2J\\x1b]0;t\\x07" in text and "a\\x0ah2 vllm@chat.service forged" in text
    # Only rich's own styling escapes are left, and the entry is one line.
    assert "\x1b[2J" not in text and "\x07" not in text and text.count("\n") == 1
    plain = io.StringIO()
    Console(file=plain, width=400, color_system=None).print(
        log_line("h1", VLLM, when, "ok"), highlight=False)
    assert plain.getvalue() == f"h1 {VLLM} 2026-12-06T03:00:00Z ok\n"


# --- the command ------------------------------------------------------------------------------

def test_command_prints_prefixed_lines_and_exits_1_for_a_host_not_read(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, plan: Plan) -> None:
    down = Unreached(host="h2", reason="not reached: [b]refused[/b]")
    reader = StandIn({"h1": [entry(1, "[/x] hello"), ""], "h2": [down, ""]})
    asked: list[logs_flow.LogsOptions] = []

    def journals(options: logs_flow.LogsOptions) -> Journals:
        asked.append(options)
        return Journals(plan, units_of(plan, options.deployment), options.since,
                        options.lines, read=reader)

    monkeypatch.setattr(logs_flow, "journals", journals)
    monkeypatch.setenv("COLUMNS", "300")
    fleet = write_fleet(tmp_path / "fleet.yml")
    result = CliRunner().invoke(cli.app, ["logs", "--hosts", "g", "-f", str(fleet),
                                          "--since", "1h", "--lines", "5"])
    assert result.exit_code == 1, result.output
    assert f"h1 {VLLM} " in result.output and "[/x] hello" in result.output
    assert "h2: its journal was not read: not reached: [b]refused[/b]" in result.output
    assert asked[0].since == dt.timedelta(hours=1) and asked[0].lines == 5
    as_json = CliRunner().invoke(cli.app, ["logs", "--hosts", "g", "-f", str(fleet), "--json"])
    document = json.loads(as_json.stdout)
    assert as_json.exit_code == 0 and document["records"] == []
    assert document["units"] == {"h1": [VLLM, OLLAMA], "h2": [VLLM, OLLAMA]}


def test_follow_ends_with_130_on_ctrl_c(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        plan: Plan) -> None:
    reader = StandIn({"h1": [entry(1, "a")], "h2": [entry(2, "b")]})
    monkeypatch.setattr(logs_flow, "journals", lambda options: Journals(
        plan, units_of(plan), None, 200, read=reader))

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(logs_flow.time, "sleep", interrupted)
    result = CliRunner().invoke(cli.app, ["logs", "--hosts", "g", "-f",
                                          str(write_fleet(tmp_path / "fleet.yml")),
                                          "--follow", "--json"])
    assert result.exit_code == 130, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["host"], r["message"]) for r in lines] == [("h1", "a"), ("h2", "b")]
