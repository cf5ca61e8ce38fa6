"""Rolling changes on the sandbox (issue 16): `up` with a changed fleet file is the upgrade,
rolled one host at a time behind the health gate, the first failed batch stopping it, and
`up --rollback` returning to the last successful run's fleet.

The module writes the sandbox's own fleet (orchestrator/sandbox/fleet.py, as `up --hosts
sandbox` builds it) to a file, then, in order:
  upgrade   a new max_model_len while a client loops chat requests over both endpoints,
            retrying on the other on failure: no request fails fleet-wide, and the hosts
            restarted one after the other; the run is recorded with its fleet file
  failing   an engine option vLLM refuses: the first batch (sandbox-1) fails, exit 1 naming
            it; sandbox-2 is untouched (same MainPID) and still serves the upgraded version
  rollback  `up --rollback`: sandbox-1 back to the upgrade's fleet; sandbox-2 not restarted;
            both serve (the upgraded version) for the modules after this one; the teardown
            module, which runs last, brings the original fleet back with its own `up`
Only the upgrade runs the verify stage's probes: the gate checks every batch of the others.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sandboxkit import HEALTH, HOSTS, STATE, UNIT, VLLM, Ran, Sandbox, orchestrate, ssh

from orchestrator.config.vault import load_secrets
from orchestrator.sandbox import fleet as sandbox_fleet

pytestmark = pytest.mark.e2e

BASE = {host: url.removesuffix("/health") for host, url in HEALTH.items()}
# Bounded client on loopback only: a light load (a request about every half second, so that
# the engine restarting beside it on this 2-core machine is not starved), a short timeout
# each, and at most this many requests.
MAX_REQUESTS = 5000
REQUEST_TIMEOUT_S = 10.0
PAUSE_S = 0.5


def fleet_data(sandbox: Sandbox) -> dict[str, Any]:
    """The sandbox's fleet as `up --hosts sandbox` builds it (same state, model, secrets,
    Ollama stand-in release and mirror), as fleet.yml data."""
    state = (sandbox.cwd / STATE).resolve()
    secrets, _ = sandbox_fleet.sandbox_secrets(state)
    loaded = sandbox_fleet.sandbox_fleet(state / "id_ed25519", sandbox_fleet.sandbox_model(),
                                         secrets, sandbox_fleet.sandbox_ollama_release(),
                                         mirror_dir=state / "mirror")
    data: dict[str, Any] = loaded.fleet.model_dump(exclude_none=True)
    return data


def with_options(data: dict[str, Any], **options: Any) -> dict[str, Any]:
    changed = json.loads(json.dumps(data, default=str))
    # JSON made the port_map keys strings; the fleet takes numbers.
    for host in changed["groups"][sandbox_fleet.GROUP]["hosts"].values():
        host["port_map"] = {int(k): v for k, v in host["port_map"].items()}
    vllm = next(d for d in changed["deployments"] if d["name"] == sandbox_fleet.DEPLOYMENT)
    vllm["options"].update(options)
    return changed


def unit(sandbox: Sandbox, host: str) -> dict[str, str]:
    out = ssh(sandbox.cwd, host, f"systemctl show --timestamp=unix -p MainPID,ActiveState,"
                                 f"ExecMainStartTimestamp {UNIT}").stdout
    return dict(line.split("=", 1) for line in out.split("\n") if "=" in line)


def started_at(state: dict[str, str]) -> float:
    return float(state["ExecMainStartTimestamp"].removeprefix("@"))


@dataclass
class ClientLoop:
    """Chat requests over both endpoints until stopped: each request goes to the next
    endpoint in turn and, when it fails there, to the other one at once."""

    key: str
    failed_on: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HOSTS, 0))
    answered_at: dict[str, list[float]] = field(default_factory=lambda: {h: [] for h in HOSTS})
    requests: int = 0
    fleet_failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def ask(self, client: httpx.Client, host: str) -> bool:
        try:
            answer = client.post(f"{BASE[host]}/v1/chat/completions", json={
                "model": VLLM, "messages": [{"role": "user", "content": "Say OK."}],
                "max_tokens": 4, "temperature": 0}, timeout=REQUEST_TIMEOUT_S)
            ok = answer.status_code == 200 and bool(answer.json().get("choices"))
        except (httpx.HTTPError, ValueError):
            ok = False
        self.requests += 1
        if ok:
            self.answered_at[host].append(time.time())
        else:
            self.failed_on[host] += 1
        return ok

    def run(self) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {self.key}"}) as client:
            turn = 0
            while not self.stop.is_set() and self.requests < MAX_REQUESTS:
                first, other = HOSTS[turn % 2], HOSTS[(turn + 1) % 2]
                if not self.ask(client, first) and not self.ask(client, other):
                    self.fleet_failures += 1
                turn += 1
                time.sleep(PAUSE_S)


@dataclass(frozen=True)
class Rollout:
    runs: Path
    upgraded: Path
    before_upgrade: dict[str, dict[str, str]]
    upgrade: Ran
    after_upgrade: dict[str, dict[str, str]]
    loop: ClientLoop
    failing: Ran
    after_failing: dict[str, dict[str, str]]
    old_still_served: int
    rollback: Ran
    after_rollback: dict[str, dict[str, str]]


def up(sandbox: Sandbox, fleet: Path, *args: str) -> Ran:
    return orchestrate(sandbox.cwd, sandbox.env, "up", "-f", str(fleet), "--hosts",
                       sandbox_fleet.GROUP, "--vault-password-file",
                       str(sandbox.cwd / STATE / "vault-password"), "--json", *args)


@pytest.fixture(scope="module")
def rollout(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rollout]:
    work = tmp_path_factory.mktemp("rollout")
    data = fleet_data(sandbox)
    original = work / "original.yml"
    original.write_text(yaml.safe_dump(data, sort_keys=False))
    failing_fleet = work / "failing.yml"
    failing_fleet.write_text(yaml.safe_dump(with_options(data, extra_args=["--no-such-option"]),
                                            sort_keys=False))
    upgraded = work / "upgraded.yml"
    upgraded.write_text(yaml.safe_dump(with_options(data, max_model_len=512), sort_keys=False))
    key = load_secrets(sandbox.cwd / STATE / "secrets.yml",
                       sandbox.cwd / STATE / "vault-password")[sandbox_fleet.API_KEY_VAR]
    try:
        before_upgrade = {h: unit(sandbox, h) for h in HOSTS}
        loop = ClientLoop(key)
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        try:
            upgrade = up(sandbox, upgraded)
        finally:
            loop.stop.set()
            thread.join(timeout=60)
        after_upgrade = {h: unit(sandbox, h) for h in HOSTS}

        failing = up(sandbox, failing_fleet, "--skip", "verify")
        after_failing = {h: unit(sandbox, h) for h in HOSTS}
        # The untouched host still answers a chat with the version it had.
        probe = ClientLoop(key)
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}) as client:
            old_still_served = sum(probe.ask(client, HOSTS[1]) for _ in range(3))

        rollback = up(sandbox, failing_fleet, "--rollback", "--skip", "verify")
        after_rollback = {h: unit(sandbox, h) for h in HOSTS}
    except BaseException:
        # Left serving for the modules after this one; after a rollback it already is (at
        # the upgraded version), and test_sandbox_teardown's `up` restores the original.
        up(sandbox, original, "--skip", "verify")
        raise
    yield Rollout(sandbox.cwd / ".orchestrate" / "runs", upgraded, before_upgrade, upgrade,
                  after_upgrade, loop, failing, after_failing, old_still_served, rollback,
                  after_rollback)


def test_upgrade_rolls_host_by_host_with_no_failed_request_fleet_wide(rollout: Rollout) -> None:
    ran, loop = rollout.upgrade, rollout.loop
    assert ran.rc == 0, ran.tail()
    plan = json.loads((Path(ran.json()["run_dir"]) / "plan.json").read_text())
    assert plan["rollout"]["batches"] == [[HOSTS[0]], [HOSTS[1]]]
    print(f"client loop: {loop.requests} requests, failed per host {loop.failed_on}, "
          f"fleet-wide {loop.fleet_failures}")
    assert loop.requests > 0 and loop.fleet_failures == 0, loop
    before, after = rollout.before_upgrade, rollout.after_upgrade
    assert all(after[h]["MainPID"] != before[h]["MainPID"] for h in HOSTS), (before, after)
    first, second = (started_at(after[h]) for h in HOSTS)
    # sandbox-2 started only after sandbox-1 answered again.
    answered_again = [t for t in loop.answered_at[HOSTS[0]] if t > first]
    assert first < second and answered_again and answered_again[0] < second, (
        first, second, answered_again[:1])


def test_a_failed_batch_stops_the_rollout_and_the_next_host_keeps_serving(
        rollout: Rollout) -> None:
    ran = rollout.failing
    assert ran.rc == 1, ran.tail()
    stopped = ran.json()["rollout_stopped"]
    assert stopped is not None and (stopped["batch"], stopped["batches"]) == (1, 2), stopped
    assert {f["host"] for f in stopped["failures"]} == {HOSTS[0]}
    assert stopped["untouched"] == [HOSTS[1]]
    message = stopped["failures"][0]["message"]
    # The engine's own words from the unit's journal.
    assert "unrecognized arguments: --no-such-option" in message, message
    assert any(step.endswith("--rollback") for step in stopped["next_steps"])
    assert f"rollout stopped at batch 1 of 2: {HOSTS[0]} failed" in " ".join(ran.stderr.split())
    # sandbox-2: not restarted, still serving.
    assert rollout.after_failing[HOSTS[1]]["MainPID"] == rollout.after_upgrade[HOSTS[1]]["MainPID"]
    assert httpx.get(HEALTH[HOSTS[1]], timeout=10).status_code == 200
    assert rollout.old_still_served == 3


def test_rollback_returns_to_the_last_successful_runs_fleet(rollout: Rollout) -> None:
    ran = rollout.rollback
    assert ran.rc == 0, ran.tail()
    back_to = ran.json()["rolled_back_to"]
    record = json.loads((rollout.runs / back_to / "run.json").read_text())
    assert (record["command"], record["outcome"], record["fleet_file"]) == (
        "up", "passed", str(rollout.upgraded)), record
    after = rollout.after_rollback
    assert after[HOSTS[0]]["ActiveState"] == "active"
    assert after[HOSTS[0]]["MainPID"] != rollout.after_failing[HOSTS[0]]["MainPID"]
    # sandbox-2 had that version all along: the rollback left it running.
    assert after[HOSTS[1]]["MainPID"] == rollout.after_upgrade[HOSTS[1]]["MainPID"]


def test_after_the_rollback_every_host_serves(rollout: Rollout) -> None:
    for host in HOSTS:
        assert httpx.get(HEALTH[host], timeout=10).status_code == 200
