"""Facts first, the workflow side: the facts cache, `orchestrate facts`, the facts policy of
plan_for (gather / dir / cached / none), the plan's per-host facts origin, and `up`'s second
gathering after the drivers stage installed a driver.

No GPU host can be reached from here: the gathering (orchestrator.run.gather.gather_facts)
is replaced by a STAND-IN that returns HostFacts documents built from the saved nvidia-smi
outputs in tests/data (real outputs, see their SOURCES.md) and records what it was asked.
`up`'s playbook run is a STAND-IN too (run_playbook replaced): the sandbox cannot install an
NVIDIA driver, so the driver "installed" between the two gatherings is the stand-in's
answer. tests/unit/test_workflows.py runs the real gathering against an unreachable host.
"""

from __future__ import annotations

import datetime as dt
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator import cli
from orchestrator.config.fleet import load_fleet
from orchestrator.errors import ConfigError, PlanError
from orchestrator.facts import cache
from orchestrator.facts.hostfacts import (
    DiskFree,
    HostFacts,
    NvidiaFacts,
    OsFacts,
    from_nvidia_smi_text,
)
from orchestrator.run.gather import GatherHost
from orchestrator.run.render import RunDir
from orchestrator.run.runner import HostStats, Progress, RunResult, TaskFailure
from orchestrator.workflows import common
from orchestrator.workflows import up as up_flow
from orchestrator.workflows.common import (
    CACHED,
    NO_FACTS,
    Events,
    FactsPolicy,
    Target,
    parse_duration,
    plan_for,
)
from orchestrator.workflows.facts import gather
from orchestrator.workflows.plan import PlanOptions, plan
from orchestrator.workflows.up import UpOptions, merged, up

REPO = Path(__file__).resolve().parents[2]
SMI = REPO / "tests" / "data" / "nvidia-smi"
FACTS_DIR = REPO / "tests" / "data" / "facts"
NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)


def smi_facts(host: str, fixture: str, when: dt.datetime | None = None) -> HostFacts:
    """A reachable host's facts from a saved nvidia-smi output, with an OS and a disk."""
    found = from_nvidia_smi_text(host, (SMI / fixture).read_text(encoding="utf-8"),
                                 "gathered by playbooks/facts.yml",
                                 when or dt.datetime.now(dt.UTC))
    return found.model_copy(update={
        "os": OsFacts(distribution="Ubuntu", version="22.04", family="Debian",
                      kernel="5.15.0-91-generic", kernel_headers=True, secure_boot="disabled",
                      python_version="3.10.12"),
        "memory_mib": 257000,
        "disk": [DiskFree(path="/opt/qwen", mount="/", free_mib=400000)]})


def unreachable(host: str) -> HostFacts:
    return HostFacts(host=host, gathered_at=dt.datetime.now(dt.UTC), origin="gathered by "
                     "playbooks/facts.yml", reachable=False,
                     unreachable="ssh: connect to host 10.0.0.2 port 22: Connection refused")


class StandInGather:
    """STAND-IN for gather_facts: answers from `answers` (host -> facts) and records each
    call's hosts and run path. Once asked, it calls `then` (to change later answers)."""

    def __init__(self, answers: dict[str, HostFacts]) -> None:
        self.answers = answers
        self.calls: list[tuple[list[GatherHost], Path, Path | None]] = []

    def __call__(self, hosts: list[GatherHost], run_path: Path, *,
                 operator_inventory: Path | None = None,
                 on_progress: Callable[[Progress], None] = lambda _: None,
                 forks: int = 50) -> dict[str, HostFacts]:
        self.calls.append((list(hosts), run_path, operator_inventory))
        return {h.name: self.answers[h.name] for h in hosts}

    def asked(self) -> list[list[str]]:
        return [[h.name for h in hosts] for hosts, _, _ in self.calls]


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, HostFacts]],
                                                          StandInGather]:
    def install(answers: dict[str, HostFacts]) -> StandInGather:
        gatherer = StandInGather(answers)
        monkeypatch.setattr(common, "gather_facts", gatherer)
        return gatherer
    return install


def write_fleet(path: Path, hosts: dict[str, dict[str, Any]], *,
                group: dict[str, Any] | None = None) -> Path:
    path.write_text(yaml.safe_dump({
        "groups": {"g": {"profile": "gpu", **(group or {}), "hosts": hosts}},
        "deployments": [{"name": "chat", "model": "Qwen/Qwen2.5-0.5B-Instruct",
                         "engine": "vllm", "hosts": "g", "port": 8000,
                         "options": {"max_model_len": 4096, "open": True}}]}))
    return path


def two_hosts(tmp_path: Path) -> Target:
    fleet = write_fleet(tmp_path / "fleet.yml", {
        "a": {"address": "10.0.0.1", "vars": {"extra_var": 1}},
        "b": {"address": "10.0.0.2", "ssh_port": 2222}})
    return Target("g", fleet=fleet, state_dir=tmp_path / "state")


# --- the cache ---------------------------------------------------------------------------------

def test_cache_round_trip_modes_and_age(tmp_path: Path) -> None:
    facts = smi_facts("a", "table__A10__550.127.05.txt", NOW)
    path = cache.write(tmp_path, facts)
    assert path == tmp_path / "facts" / "a.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    hour = dt.timedelta(hours=1)
    assert cache.read(tmp_path, "a", hour, NOW + dt.timedelta(minutes=59)) == facts
    assert cache.read(tmp_path, "a", hour, NOW + hour) is None  # too old
    assert cache.read(tmp_path, "a", None, NOW + 100 * hour) == facts  # any age
    assert cache.read(tmp_path, "a", dt.timedelta(0), NOW) is None  # 0: never reused
    assert cache.read(tmp_path, "a", hour, NOW - hour) is None  # dated in the future
    assert cache.read(tmp_path, "b", None, NOW) is None  # absent
    # Written again: replaced whole, no partial file left beside it.
    cache.write(tmp_path, facts.model_copy(update={"memory_mib": 1}))
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


@pytest.mark.parametrize("content", [
    "{not json", json.dumps({"version": 99, "host": "a"}), json.dumps(["a"]),
    json.dumps({"version": 1, "host": "a"}),  # no gathered_at, no origin
])
def test_cache_ignores_what_it_cannot_trust(tmp_path: Path, content: str) -> None:
    (tmp_path / "facts").mkdir()
    (tmp_path / "facts" / "a.json").write_text(content)
    assert cache.read(tmp_path, "a", None, NOW) is None


def test_cache_ignores_another_hosts_document_and_an_unreachable_one(tmp_path: Path) -> None:
    cache.write(tmp_path, smi_facts("a", "table__A10__550.127.05.txt", NOW))
    (tmp_path / "facts" / "a.json").rename(tmp_path / "facts" / "b.json")
    assert cache.read(tmp_path, "b", None, NOW) is None
    (tmp_path / "facts" / "c.json").write_text(unreachable("c").model_dump_json())
    assert cache.read(tmp_path, "c", None, dt.datetime.now(dt.UTC)) is None


@pytest.mark.parametrize("host", ["../etc", "a/b", ".hidden", ""])
def test_cache_refuses_a_host_name_that_is_not_a_plain_file_name(tmp_path: Path,
                                                                 host: str) -> None:
    with pytest.raises(ConfigError, match="cannot name a facts file"):
        cache.read(tmp_path, host, None, NOW)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("30m", 1800), ("1h", 3600), ("0", 0), ("45", 45), ("1h30m", 5400),
    ("2d", 172800)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text, key="--facts-max-age").total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "1x", "h", "-1m", "1.5h"])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--facts-max-age: .* is not a duration"):
        parse_duration(text, key="--facts-max-age")


# --- orchestrate facts ---------------------------------------------------------------------------

def test_gather_runs_once_for_all_hosts_caches_the_reachable_and_reuses_them(
        tmp_path: Path, stand_in: Any) -> None:
    target = two_hosts(tmp_path)
    gatherer = stand_in({"a": smi_facts("a", "table__A10__550.127.05.txt"),
                         "b": unreachable("b")})
    first = gather(target, refresh=False, max_age=dt.timedelta(hours=1), events=Events())
    [(hosts, run_path, inventory)] = gatherer.calls
    assert [h.name for h in hosts] == ["a", "b"] and inventory is None
    a, b = hosts
    # The same connection variables as the stages' inventory (ResolvedHost.connection()).
    assert (a.connection["ansible_host"], b.connection["ansible_host"]) == ("10.0.0.1",
                                                                            "10.0.0.2")
    assert b.connection["ansible_port"] == 2222 and a.vars == {"extra_var": 1}
    assert a.paths and all(p.startswith("/") for p in a.paths)
    assert run_path.parent == (tmp_path / "state" / "runs").resolve()
    assert run_path.name.endswith("-facts")
    assert first.run_dir == str(run_path)
    assert [(h.host, h.source, h.facts.reachable) for h in first.hosts] == [
        ("a", "gathered", True), ("b", "gathered", False)]
    assert first.unreachable == ["b"]
    # Only the reachable host is cached.
    assert [p.name for p in (tmp_path / "state" / "facts").iterdir()] == ["a.json"]

    second = gather(target, refresh=False, max_age=dt.timedelta(hours=1), events=Events())
    assert gatherer.asked()[1] == ["b"]
    assert [(h.host, h.source) for h in second.hosts] == [("a", "cache"), ("b", "gathered")]
    third = gather(target, refresh=True, max_age=dt.timedelta(hours=1), events=Events())
    assert gatherer.asked()[2] == ["a", "b"] and third.hosts[0].source == "gathered"
    gather(target, refresh=False, max_age=dt.timedelta(0), events=Events())
    assert gatherer.asked()[3] == ["a", "b"]


def test_gather_from_the_cache_alone_runs_nothing(tmp_path: Path, stand_in: Any) -> None:
    target = two_hosts(tmp_path)
    for host in ("a", "b"):
        cache.write(target.state_dir, smi_facts(host, "table__A10__550.127.05.txt"))
    gatherer = stand_in({})
    report = gather(target, refresh=False, max_age=dt.timedelta(hours=1), events=Events())
    assert gatherer.calls == [] and report.run_dir is None and report.unreachable == []
    assert {h.source for h in report.hosts} == {"cache"}


def test_facts_command_prints_each_host_escaped_and_exits_1_for_an_unreachable_one(
        tmp_path: Path, stand_in: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    target = two_hosts(tmp_path)
    monkeypatch.chdir(tmp_path)
    # A host-provided string that would be rich markup: printed as it is.
    a = smi_facts("a", "table__A10__550.127.05.txt")
    marked = a.model_copy(update={"os": a.os.model_copy(update={"kernel": "6.1[red]x[/red]"})
                                  if a.os else None})
    stand_in({"a": marked, "b": unreachable("b")})
    result = CliRunner().invoke(cli.app, ["facts", "--hosts", "g", "-f", str(target.fleet)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "1x NVIDIA A10, 23028 MiB" in out and "550.127.05 / CUDA 12.4" in out
    assert "6.1[red]x[/red], headers installed" in out
    assert "Ubuntu 22.04 (Debian)" in out and "257000 MiB" in out
    assert "/opt/qwen: 400000 MiB" in out and "gathered, 0s old" in out
    assert "b: not reached: ssh: connect to host 10.0.0.2 port 22: Connection refused" in out
    as_json = CliRunner().invoke(cli.app, ["facts", "--hosts", "g", "-f", str(target.fleet),
                                           "--json"])
    document = json.loads(as_json.stdout)
    assert as_json.exit_code == 1 and document["unreachable"] == ["b"]
    assert [h["source"] for h in document["hosts"]] == ["cache", "gathered"]
    assert document["hosts"][0]["facts"]["nvidia"]["driver_version"] == "550.127.05"


def test_facts_command_keeps_parse_and_asks_for_hosts(tmp_path: Path) -> None:
    parsed = CliRunner().invoke(cli.app, ["facts", "parse",
                                          str(SMI / "table__A10__550.127.05.txt")])
    assert parsed.exit_code == 0 and "NVIDIA A10" in parsed.stdout
    bare = CliRunner().invoke(cli.app, ["facts"])
    assert bare.exit_code == 2 and "give --hosts GROUP" in bare.stderr


# --- the facts policy of plan_for ---------------------------------------------------------------

def test_plan_gathers_then_plans_each_host_from_its_facts(tmp_path: Path,
                                                          stand_in: Any) -> None:
    target = two_hosts(tmp_path)
    stand_in({"a": smi_facts("a", "xml__RTX-4090__535.86.05.txt"),
              "b": smi_facts("b", "table__RTX-4090__580.65.06.txt")})
    result = plan(PlanOptions(target), Events())
    index = {h.name: h.vars["pytorch_index_url"] for h in result.hosts}
    assert index == {"a": "https://download.pytorch.org/whl/cu121",
                     "b": "https://download.pytorch.org/whl/cu130"}
    assert {h: o.source for h, o in result.facts.items()} == {"a": "gathered", "b": "gathered"}
    assert any("found on the host" in r for r in result.hosts[0].reasons)


def test_plan_of_an_unreachable_host_is_from_fleet_yml_and_says_why(tmp_path: Path,
                                                                     stand_in: Any) -> None:
    fleet = write_fleet(tmp_path / "fleet.yml", {"b": {"address": "10.0.0.2"}},
                        group={"gpu": {"name": "NVIDIA A10", "driver": "550.127.05"}})
    stand_in({"b": unreachable("b")})
    result = plan(PlanOptions(Target("g", fleet=fleet, state_dir=tmp_path / "s")), Events())
    origin = result.facts["b"]
    assert (origin.source, origin.age_s) == ("fleet.yml", None)
    assert origin.unreachable is not None and "Connection refused" in origin.unreachable
    assert origin.line().startswith("not reached: ssh: connect")
    assert result.hosts[0].vars["pytorch_index_url"].endswith("/cu124")
    assert any("unreachable: ssh: connect" in r for r in result.hosts[0].reasons)


def test_plan_from_a_facts_directory_plans_each_driver_its_build(tmp_path: Path,
                                                                 stand_in: Any) -> None:
    gatherer = stand_in({})
    target = Target("drivers", fleet=FACTS_DIR / "fleet.yml", state_dir=tmp_path)
    planned = plan_for(target, facts=FactsPolicy("dir", directory=FACTS_DIR))
    builds = {h.name: h.vars["pytorch_index_url"].rsplit("/", 1)[1] for h in planned.plan.hosts}
    assert builds == {"h535": "cu121", "h550": "cu124", "h570": "cu128", "h580": "cu130"}
    assert {o.source for o in planned.origins().values()} == {"dir"}
    assert gatherer.calls == [] and not (tmp_path / "facts").exists()  # nothing cached


def test_cached_and_no_facts_reach_no_host(tmp_path: Path, stand_in: Any) -> None:
    target = two_hosts(tmp_path)
    cache.write(target.state_dir, smi_facts(
        "a", "table__RTX-4090__580.65.06.txt", dt.datetime.now(dt.UTC) - dt.timedelta(days=3)))
    gatherer = stand_in({})
    cached = plan_for(target, facts=CACHED)
    # Of any age: probe, status and bench check what `up` planned from.
    assert {h: o.source for h, o in cached.origins().items()} == {"a": "cache", "b": "fleet.yml"}
    assert cached.origins()["a"].age_s is not None and cached.origins()["a"].age_s >= 3 * 86400
    declared = plan_for(target, facts=NO_FACTS)
    assert {o.source for o in declared.origins().values()} == {"fleet.yml"}
    assert any("the plan was made without facts" in r for r in declared.plan.hosts[0].reasons)
    assert gatherer.calls == []


def test_a_declared_gpu_the_host_does_not_have_is_refused(tmp_path: Path,
                                                          stand_in: Any) -> None:
    fleet = write_fleet(tmp_path / "fleet.yml", {"a": {"address": "10.0.0.1"}},
                        group={"gpu": {"name": "NVIDIA A10", "count": 1}})
    stand_in({"a": smi_facts("a", "table__RTX-4090__580.65.06.txt")})
    with pytest.raises(PlanError, match=r"host 'a': .*fleet.yml:\d+ .* declares"):
        plan(PlanOptions(Target("g", fleet=fleet, state_dir=tmp_path / "s")), Events())


def test_plan_of_the_builtin_fleet_starts_nothing_and_reads_the_cache(tmp_path: Path,
                                                                      stand_in: Any) -> None:
    loaded = load_fleet(write_fleet(tmp_path / "fleet.yml", {"a": {"address": "10.0.0.1"}}))
    gatherer = stand_in({})
    logged: list[str] = []
    result = plan(PlanOptions(Target("g", builtin=loaded, state_dir=tmp_path / "s")),
                  Events(log=logged.append))
    assert gatherer.calls == [] and result.facts["a"].source == "fleet.yml"
    assert any("plan does not start the sandbox's hosts" in line for line in logged)


def test_plan_options_that_contradict_each_other(tmp_path: Path) -> None:
    fleet = write_fleet(tmp_path / "fleet.yml", {"a": {"address": "10.0.0.1"}})
    for extra in (["--no-gather", "--refresh-facts"], ["--no-gather", "--facts", "d"],
                  ["--facts-max-age", "soon"]):
        result = CliRunner().invoke(cli.app, ["plan", "--hosts", "g", "-f", str(fleet),
                                              *extra])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_plan_table_shows_where_each_hosts_facts_came_from(tmp_path: Path,
                                                           stand_in: Any,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    target = two_hosts(tmp_path)
    monkeypatch.chdir(tmp_path)
    stand_in({"a": smi_facts("a", "table__A10__550.127.05.txt"), "b": unreachable("b")})
    result = CliRunner().invoke(cli.app, ["plan", "--hosts", "g", "-f", str(target.fleet)],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "gathered, 0s old" in result.stdout
    assert "not reached: ssh: connect to host 10.0.0.2 port 22: Connection refused; from " \
           "fleet.yml" in " ".join(result.stdout.split())
    as_json = CliRunner().invoke(cli.app, ["plan", "--hosts", "g", "-f", str(target.fleet),
                                           "--json", "--no-gather"])
    assert json.loads(as_json.stdout)["facts"]["a"]["source"] == "fleet.yml"


# --- up: the facts first, and again after the drivers stage --------------------------------------

def not_installed(host: str) -> HostFacts:
    """Facts of a host with one NVIDIA GPU on its PCI bus and no driver."""
    return HostFacts(host=host, gathered_at=dt.datetime.now(dt.UTC),
                     origin="gathered by playbooks/facts.yml",
                     nvidia=NvidiaFacts.model_validate({
                         "source": "nvidia-smi", "pci_gpus": 1, "nvswitches": 0,
                         "error": {"kind": "not_installed", "message": "nvidia-smi: not found",
                                   "next_step": "install the NVIDIA driver"}}))


class StandInPlaybook:
    """STAND-IN for run_playbook: records each run's stages and hosts, and fails `failing`
    in the drivers stage."""

    def __init__(self, failing: set[str], gatherer: StandInGather,
                 installed: dict[str, HostFacts]) -> None:
        self.failing = failing
        self.gatherer = gatherer
        self.installed = installed
        self.runs: list[tuple[list[str], list[str]]] = []

    def __call__(self, run: RunDir, on_progress: Callable[[Progress], None]) -> RunResult:
        planned = json.loads((run.path / "plan.json").read_text())
        hosts = [h["name"] for h in planned["hosts"]]
        self.runs.append((planned["stages"], hosts))
        if "drivers" in planned["stages"]:
            # What the drivers stage leaves on the hosts it installed a driver on.
            self.gatherer.answers.update(self.installed)
        failures = [TaskFailure(host=h, play="drivers", task="install", message="reboot "
                                "needed: run `sudo reboot`, then up again")
                    for h in hosts if h in self.failing and "drivers" in planned["stages"]]
        return RunResult(status="failed" if failures else "successful",
                         rc=2 if failures else 0,
                         stats={h: HostStats(ok=3, changed=1, failed=int(h in self.failing))
                                for h in hosts}, failures=failures)


def test_up_gathers_again_after_installing_drivers_and_plans_the_rest_from_them(
        tmp_path: Path, stand_in: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = write_fleet(tmp_path / "fleet.yml", {
        "new": {"address": "10.0.0.1", "driver": {"manage": True}},
        "rebooting": {"address": "10.0.0.3", "driver": {"manage": True}},
        "owned": {"address": "10.0.0.2"}})
    gatherer = stand_in({"new": not_installed("new"), "rebooting": not_installed("rebooting"),
                         "owned": smi_facts("owned", "table__A10__550.127.05.txt")})
    # After the drivers stage "new" answers with R580 loaded and its GPU now known (without
    # a driver only the PCI bus counted it): the later stages are planned from them.
    # "rebooting" fails the stage (a reboot is needed) and is left out of the later ones.
    playbook = StandInPlaybook({"rebooting"}, gatherer, {
        "new": smi_facts("new", "table__RTX-4090__580.65.06.txt"),
        "rebooting": smi_facts("rebooting", "table__A10__550.127.05.txt")})
    monkeypatch.setattr(up_flow, "run_playbook", playbook)
    target = Target("g", fleet=fleet, state_dir=tmp_path / "state")
    result = up(UpOptions(target, only=("preflight", "drivers", "python_env")), Events())
    assert playbook.runs == [(["preflight", "drivers"], ["new", "owned", "rebooting"]),
                             (["python_env"], ["new", "owned"])]
    assert gatherer.asked() == [["new", "owned", "rebooting"], ["new"]]
    assert result.regathered == ["new"] and len(result.run_dirs) == 2
    assert result.run_dir == result.run_dirs[-1]
    assert result.stages == ["preflight", "drivers", "python_env"]
    assert not result.passed and result.ansible.rc == 2
    assert [f.host for f in result.ansible.failures] == ["rebooting"]
    assert result.ansible.hosts["new"].ok == 6 and result.ansible.hosts["rebooting"].ok == 3
    # The first part planned the managed hosts' driver; the second part planned "new" from
    # the GPU and driver found once the driver was loaded.
    first, second = ({h["name"]: h for h in json.loads((Path(d) / "plan.json").read_text())[
        "hosts"]} for d in result.run_dirs)
    assert first["new"]["vars"]["nvidia_driver_manage"] is True
    assert not first["owned"]["vars"].get("nvidia_driver_manage")
    assert "chat: fit not checked: the fleet does not name the host's GPUs (gpu: {name, " \
           "count})" in first["new"]["reasons"]
    assert any(r.startswith("chat: fits 1x NVIDIA GeForce RTX 4090") for r in
               second["new"]["reasons"])
    assert any("NVIDIA GeForce RTX 4090" in r and "found on the host" in r
               for r in second["new"]["reasons"])
    assert second["new"]["vars"]["pytorch_index_url"].endswith("/cu130")
    assert second["owned"]["vars"]["pytorch_index_url"].endswith("/cu124")
    assert result.facts["new"].source == "gathered"


def test_up_without_a_driver_to_install_runs_once(tmp_path: Path, stand_in: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target = two_hosts(tmp_path)
    gatherer = stand_in({"a": smi_facts("a", "table__A10__550.127.05.txt"),
                         "b": smi_facts("b", "table__A10__550.127.05.txt")})
    playbook = StandInPlaybook(set(), gatherer, {})
    monkeypatch.setattr(up_flow, "run_playbook", playbook)
    result = up(UpOptions(target, only=("preflight", "drivers", "python_env")), Events())
    assert playbook.runs == [(["preflight", "drivers", "python_env"], ["a", "b"])]
    assert result.passed and result.regathered == [] and result.run_dirs == [result.run_dir]


def test_up_starts_the_hosts_before_gathering_their_facts(tmp_path: Path, stand_in: Any,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    loaded = load_fleet(write_fleet(tmp_path / "fleet.yml", {"a": {"address": "10.0.0.1"},
                                                             "b": {"address": "10.0.0.2"}}))
    gatherer = stand_in({"a": unreachable("a"), "b": unreachable("b")})
    started: list[tuple[list[str], int]] = []
    monkeypatch.setattr(up_flow, "run_playbook", StandInPlaybook(set(), gatherer, {}))
    up(UpOptions(Target("g", builtin=loaded, state_dir=tmp_path / "s"), only=("preflight",),
                 before_facts=lambda names: started.append((names, len(gatherer.calls)))),
       Events())
    assert started == [(["a", "b"], 0)]


def test_merged_runs_sum_per_host_and_keep_every_failure() -> None:
    one = RunResult("failed", 2, {"a": HostStats(ok=2, failed=1)},
                    [TaskFailure("a", "drivers", "t", "m")])
    two = RunResult("successful", 0, {"a": HostStats(ok=1), "b": HostStats(ok=4, changed=2)})
    both = merged([one, two])
    assert (both.status, both.rc, both.ok) == ("failed", 2, False)
    assert both.stats == {"a": HostStats(ok=3, failed=1), "b": HostStats(ok=4, changed=2)}
    assert [f.host for f in both.failures] == ["a"]
    assert merged([two]).ok
