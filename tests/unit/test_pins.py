"""One version per fleet: moving model revisions pinned to the hub's commit once per fleet.

ModelScope cannot be reached here. The hub in these tests is a STAND-IN: an
httpx.MockTransport answering in the shape of the real API's revisions and file-list
answers (GET /api/v1/models/{id}/revisions, GET /api/v1/models/{id}/repo/files, as
modelscope-hub 0.5.1 reads them), and for the `up` wiring tests/doubles/modelhub.py's
StandInHub on loopback, which has no revisions API (the file list's commit is taken then).
"""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from doubles.modelhub import StandInHub

from orchestrator.config.fleet import load_fleet
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.mirror import pins
from orchestrator.mirror.weights import HubUnreachable, MirrorError, resolve_revision
from orchestrator.plan.planner import make_plan
from orchestrator.workflows.common import Target
from orchestrator.workflows.mirror import pin_for_up

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
HUB = "https://hub.stand-in"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
WHEN = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")


class StandInApi:
    """A STAND-IN for ModelScope's revisions and file-list API, answering in its shape."""

    def __init__(self, branches: dict[str, str | None], tags: tuple[str, ...] = (),
                 listing_commit: str = COMMIT_B, revisions_api: bool = True) -> None:
        self.branches, self.tags = branches, tags
        self.listing_commit, self.revisions_api = listing_commit, revisions_api
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(f"{request.url.path}?{request.url.query.decode()}")
        if request.url.path == f"/api/v1/models/{MODEL}/revisions" and self.revisions_api:
            branches = [{"Revision": name, "CreatedAt": 1733000000,
                         **({"CommitId": commit} if commit else {})}
                        for name, commit in self.branches.items()]
            return httpx.Response(200, json={"Code": 200, "Success": True, "Data": {
                "RevisionMap": {"Branches": branches, "Tags": [
                    {"Revision": t, "CreatedAt": 1733000000} for t in self.tags]}}})
        if request.url.path == f"/api/v1/models/{MODEL}/repo/files":
            return httpx.Response(200, json={"Code": 200, "Success": True, "Data": {"Files": [
                {"Name": "config.json", "Path": "config.json", "Type": "blob", "Size": 2,
                 "Sha256": "0" * 64, "Revision": self.listing_commit}]}})
        return httpx.Response(404, json={"Code": 404, "Message": "not found"})

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self))


def unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused (stand-in)", request=request)


def test_a_branch_resolves_to_its_commit() -> None:
    api = StandInApi({"master": COMMIT_A})
    assert resolve_revision(HUB, MODEL, "master", token=None, client=api.client()) == COMMIT_A
    assert api.calls == [f"/api/v1/models/{MODEL}/revisions?"]


def test_a_branch_without_a_commit_id_takes_the_file_lists_commit() -> None:
    api = StandInApi({"master": None}, listing_commit=COMMIT_B)
    assert resolve_revision(HUB, MODEL, "master", token=None, client=api.client()) == COMMIT_B
    assert api.calls[-1].endswith("Revision=master&Recursive=True")
    no_api = StandInApi({}, revisions_api=False, listing_commit=COMMIT_B)
    assert resolve_revision(HUB, MODEL, "dev", token=None, client=no_api.client()) == COMMIT_B


def test_fixed_revisions_are_not_pinned() -> None:
    api = StandInApi({"master": COMMIT_A}, tags=("v1.0",))
    assert resolve_revision(HUB, MODEL, "v1.0", token=None, client=api.client()) is None
    calls = len(api.calls)
    assert resolve_revision(HUB, MODEL, COMMIT_B, token=None, client=api.client()) is None
    assert len(api.calls) == calls  # a commit id: the hub is not asked


def test_an_unknown_revision_names_the_hubs_branches_and_tags() -> None:
    api = StandInApi({"master": COMMIT_A}, tags=("v1.0",))
    with pytest.raises(MirrorError, match=r"has no revision 'mian' \(branches: master; "
                                          r"tags: v1\.0\)"):
        resolve_revision(HUB, MODEL, "mian", token=None, client=api.client())


def test_an_unreachable_hub_is_told_apart() -> None:
    client = httpx.Client(transport=httpx.MockTransport(unreachable))
    with pytest.raises(HubUnreachable, match=r"cannot reach https://hub\.stand-in"):
        resolve_revision(HUB, MODEL, "master", token=None, client=client)


def fleet(write: Callable[[str, str], Path], revision: str | None = None,
          local: bool = False) -> Any:
    dep: dict[str, Any] = {"name": "q", "model": MODEL, "engine": "vllm", "hosts": "gpu",
                           "port": 8000, "options": {"open": True}}
    if revision:
        dep["revision"] = revision
    other: dict[str, Any] = {"name": "tiny", "model": "tiny-model", "engine": "vllm",
                             "hosts": "gpu", "port": 8001, "model_dir": "/models/tiny",
                             "options": {"open": True}}
    return load_fleet(write("fleet.yml", yaml.safe_dump({
        "groups": {"gpu": {"profile": "cpu", "hosts": {"h1": {"address": "10.0.0.1"},
                                                       "h2": {"address": "10.0.0.2"}}}},
        "deployments": [dep, *([other] if local else [])]})))


class Hub:
    """The resolver `up` is given, backed by the stand-in API; counts what it asks."""

    def __init__(self, api: StandInApi | None) -> None:
        self.api, self.asked = api, 0

    def __call__(self, model: str, revision: str) -> str | None:
        self.asked += 1
        client = (self.api.client() if self.api else
                  httpx.Client(transport=httpx.MockTransport(unreachable)))
        return resolve_revision(HUB, model, revision, token=None, client=client)


def pin(loaded: Any, state: Path, hub: Hub, *, update: bool = False,
        log: list[str] | None = None) -> pins.Pinned:
    return pins.pin_revisions(loaded, "gpu", state, resolve=hub, endpoint=HUB, update=update,
                              log=(log if log is not None else []).append, now=WHEN)


def test_first_run_pins_and_records_then_later_runs_reuse_without_the_hub(
        tmp_path: Path, write: Any) -> None:
    state = tmp_path / ".orchestrate"
    loaded = fleet(write)
    first = pin(loaded, state, Hub(StandInApi({"master": COMMIT_A})))
    assert first.pins["q"].commit == COMMIT_A and first.unpinned == {}
    [dep] = first.loaded.fleet.deployments
    assert dep.revision == COMMIT_A
    recorded = state / pins.PINS
    assert stat.S_IMODE(recorded.stat().st_mode) == 0o600
    assert json.loads(recorded.read_text()) == {f"{MODEL}@master": {
        "model": MODEL, "declared": "master", "commit": COMMIT_A,
        "pinned_at": "2026-12-01T12:00:00Z", "endpoint": HUB}}
    # The hub has moved on, or is gone: the pin holds, and the hub is not asked.
    for api in (StandInApi({"master": COMMIT_B}), None):
        hub = Hub(api)
        again = pin(loaded, state, hub)
        assert again.pins["q"].commit == COMMIT_A and hub.asked == 0


def test_a_changed_declared_revision_pins_again(tmp_path: Path, write: Any) -> None:
    state = tmp_path / ".orchestrate"
    pin(fleet(write), state, Hub(StandInApi({"master": COMMIT_A})))
    moved = pin(fleet(write, revision="dev"), state,
                Hub(StandInApi({"master": COMMIT_A, "dev": COMMIT_B})))
    assert moved.pins["q"].commit == COMMIT_B and moved.pins["q"].declared == "dev"
    # The master pin is gone with the declaration: declaring master again pins afresh.
    assert set(json.loads((state / pins.PINS).read_text())) == {f"{MODEL}@dev"}


def test_update_moves_the_pin_and_an_unreachable_hub_keeps_it(tmp_path: Path,
                                                                write: Any) -> None:
    state = tmp_path / ".orchestrate"
    loaded = fleet(write)
    pin(loaded, state, Hub(StandInApi({"master": COMMIT_A})))
    log: list[str] = []
    kept = pin(loaded, state, Hub(None), update=True, log=log)
    assert kept.pins["q"].commit == COMMIT_A
    assert any("the hub is unreachable" in line and f"keeping the pin {COMMIT_A}" in line
               for line in log)
    moved = pin(loaded, state, Hub(StandInApi({"master": COMMIT_B})), update=True, log=log)
    assert moved.pins["q"].commit == COMMIT_B and f"(was {COMMIT_A})" in log[-1]


def test_an_unreachable_hub_without_a_pin_stops_naming_the_model(tmp_path: Path,
                                                                  write: Any) -> None:
    with pytest.raises(pins.PinError, match=rf"{MODEL}@master: cannot pin") as caught:
        pin(fleet(write), tmp_path / ".orchestrate", Hub(None))
    assert caught.value.exit_code == 2
    assert not (tmp_path / ".orchestrate" / pins.PINS).exists()


def test_tags_commits_and_local_models_are_left_as_declared(tmp_path: Path,
                                                            write: Any) -> None:
    state = tmp_path / ".orchestrate"
    hub = Hub(StandInApi({"master": COMMIT_A}, tags=("v1.0",)))
    tagged = pin(fleet(write, revision="v1.0", local=True), state, hub)
    assert tagged.pins == {} and hub.asked == 1  # the tag; never the local model
    assert [d.revision for d in tagged.loaded.fleet.deployments] == ["v1.0", None]
    hub = Hub(None)
    assert pin(fleet(write, revision=COMMIT_B), state, hub).pins == {} and hub.asked == 0
    assert not (state / pins.PINS).exists()


def test_the_plan_gives_every_host_the_pinned_commit_and_says_why(tmp_path: Path,
                                                                  write: Any) -> None:
    state = tmp_path / ".orchestrate"
    pinned = pin(fleet(write, local=True), state, Hub(StandInApi({"master": COMMIT_A})))
    plan = pins.annotate(make_plan(pinned.loaded, "gpu", load_knowledge(), load_cuda_compat()),
                         pinned)
    for host in plan.hosts:
        entries = {e["name"]: e for e in host.vars["model_weights_models"]}
        assert entries["q"]["revision"] == COMMIT_A
        assert entries["tiny"]["source"] == "local" and "revision" not in entries["tiny"]
        assert (f"q: {MODEL} at commit {COMMIT_A}, pinned on 2026-12-01 from master"
                in host.reasons)
    unpinned = pins.apply(fleet(write), "gpu", {})
    plan = pins.annotate(make_plan(unpinned.loaded, "gpu", load_knowledge(),
                                   load_cuda_compat()), unpinned)
    assert any("q: revision master moves; not pinned yet" in r for r in plan.hosts[0].reasons)


def test_plan_command_shows_the_pin_and_writes_none(tmp_path: Path, write: Any) -> None:
    fleet(write)
    state = tmp_path / ".orchestrate"
    pins.write_pins(state, {f"{MODEL}@master": pins.Pin(
        model=MODEL, declared="master", commit=COMMIT_A, pinned_at=WHEN, endpoint=HUB)})
    before = (state / pins.PINS).read_bytes()
    proc = subprocess.run([ORCHESTRATE, "plan", "--hosts", "gpu", "--no-gather", "--json"],
                          cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    for host in json.loads(proc.stdout)["hosts"]:
        assert [e["revision"] for e in host["vars"]["model_weights_models"]] == [COMMIT_A]
        assert f"q: {MODEL} at commit {COMMIT_A}, pinned on 2026-12-01 from master" in \
            host["reasons"]
    assert (state / pins.PINS).read_bytes() == before


def test_up_pins_through_the_hub_of_the_fleet(tmp_path: Path, write: Any,
                                               repo_dir_small: Path) -> None:
    with StandInHub() as hub:
        commit = hub.add_repo(MODEL, repo_dir_small)
        loaded = load_fleet(write("fleet.yml", yaml.safe_dump({
            "mirror": {"url": "http://ctl:8090", "modelscope_endpoint": hub.endpoint},
            "groups": {"gpu": {"profile": "cpu", "hosts": {"h": {"address": "10.0.0.1"}}}},
            "deployments": [{"name": "q", "model": MODEL, "engine": "vllm", "hosts": "gpu",
                             "port": 8000, "options": {"open": True}}]})))
        target = Target("gpu", state_dir=tmp_path / ".orchestrate")
        checked = pin_for_up(loaded, target, update=False, resolve=False, log=print)
        assert checked.pins == {} and checked.unpinned == {"q": "master"}
        pinned = pin_for_up(loaded, target, update=False, resolve=True, log=print)
    assert pinned.pins["q"].commit == commit
    assert pinned.loaded.fleet.deployments[0].revision == commit


@pytest.fixture
def repo_dir_small(tmp_path: Path) -> Path:
    directory = tmp_path / "repo"
    directory.mkdir()
    (directory / "config.json").write_text("{}", encoding="utf-8")
    return directory


def test_status_probe_and_bench_plan_from_the_pins_too(tmp_path: Path, write: Any) -> None:
    # plan_for (status, probe, bench, logs, down) reads the pins as `plan` does: a probe
    # expecting `master` would fail every host serving the pinned commit.
    from orchestrator.workflows.common import NO_FACTS, plan_for

    fleet(write)
    state = tmp_path / ".orchestrate"
    pins.write_pins(state, {f"{MODEL}@master": pins.Pin(
        model=MODEL, declared="master", commit=COMMIT_A, pinned_at=WHEN, endpoint=HUB)})
    target = Target(hosts="gpu", fleet=tmp_path / "fleet.yml", state_dir=state)
    plan = plan_for(target, facts=NO_FACTS).plan
    for host in plan.hosts:
        assert [e["revision"] for e in host.vars["model_weights_models"]] == [COMMIT_A]
        assert any("pinned on 2026-12-01 from master" in r for r in host.reasons)
