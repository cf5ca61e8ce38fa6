"""The sandbox end to end, through the real CLI, as named cases sharing one sandbox.

`up` (the model fetched once into the control machine's mirror and fanned out from it) ->
every probe passes (SSH and HTTP) -> the API key is nowhere in clear -> up again changes
nothing and takes nothing from the origin -> bench (the Ollama stand-in marked as one) ->
kill -9 of vLLM is healed by systemd -> a stopped service and a corrupted weights file fail
their host's probes only, with the next step -> a re-imaged host fetching a file the mirror
holds damaged fails naming it -> `mirror --verify` repairs it -> the playbooks heal ->
hosts with a replayed nvidia-smi (a stand-in) are each found and planned their own stack ->
down.

How the cases share the sandbox: the session-scoped fixture `sandbox` (conftest.py) brings
it up once and runs `down` at the session's end, asserting it there; the day-2 modules
(test_sandbox_<topic>.py) run after this one on the same sandbox. Each later step is a
module-scoped fixture that runs its commands, judges nothing and hands over what came
back; the test functions
judge. So a failed check names what broke, and the steps after it still run and report.
The steps form one chain (each requests the one before), so that the sandbox changes in
the same order whichever cases are selected. Only when `up` prints no JSON at all (a
crash) does the `sandbox` fixture fail, and every case errors with its message. The
replayed step (`replayed`) needs only the running hosts and leaves them as it found them,
so it requests `sandbox` alone: `-k replayed` runs `up` and that step, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sandboxkit import (
    CHAT_PROBES,
    DAMAGED,
    HEALTH,
    HEALTH_PROBES,
    HOST_PROBES,
    HOSTS,
    OLLAMA,
    OLLAMA_PROBES,
    OLLAMA_TAGS,
    OLLAMA_UNIT,
    STATE,
    STREAM_PROBES,
    UNIT,
    VLLM,
    WEIGHTS,
    Ran,
    Sandbox,
    file_downloads,
    judge,
    orchestrate,
    ssh,
    unit_state,
    wait_healthy,
)

from orchestrator.config.vault import load_secrets
from orchestrator.sandbox import hosts as sandbox_hosts
from orchestrator.sandbox.fleet import GROUP as SANDBOX_GROUP
from orchestrator.sandbox.fleet import sandbox_fleet

pytestmark = pytest.mark.e2e

# --- the steps ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rerun(sandbox: Sandbox) -> Ran:
    """`up` again on the running sandbox."""
    return orchestrate(sandbox.cwd, sandbox.env, "up", "--hosts", "sandbox", "--json")


@pytest.fixture(scope="module")
def benched(rerun: Ran, sandbox: Sandbox) -> Ran:
    """Both engines benchmarked: vLLM for real, the Ollama stand-in to be marked as one."""
    return orchestrate(sandbox.cwd, sandbox.env, "bench", "--hosts", "sandbox",
                       "--deployment", VLLM, "--deployment", OLLAMA, "--concurrency", "1,4",
                       "--requests", "8", "--input-tokens", "32", "--output-tokens", "16",
                       "--json")


@dataclass(frozen=True)
class Killed:
    before: dict[str, str]
    kill_rc: int
    healthy: bool
    after: dict[str, str]


@pytest.fixture(scope="module")
def killed(benched: Ran, sandbox: Sandbox) -> Killed:
    """kill -9 of vLLM's main process on sandbox-1, then up to 240 s for it to serve."""
    before = unit_state(sandbox.cwd, "sandbox-1", UNIT)
    kill = ssh(sandbox.cwd, "sandbox-1", f"kill -9 {before.get('MainPID', 'none')}")
    healthy = wait_healthy(HEALTH["sandbox-1"], 240)
    return Killed(before, kill.returncode, healthy, unit_state(sandbox.cwd, "sandbox-1", UNIT))


@dataclass(frozen=True)
class Restarted:
    vllm_before: dict[str, str]
    ollama_before: dict[str, str]
    ollama_restart_rc: int
    ollama_after: dict[str, str]
    vllm_after: dict[str, str]  # after Ollama's restart
    tags: str  # Ollama's /api/tags after its restart
    vllm_restart_rc: int
    ollama_after_vllm: dict[str, str]  # after vLLM's restart
    healthy: bool
    vllm_restarted: dict[str, str]


@pytest.fixture(scope="module")
def restarted(killed: Killed, sandbox: Sandbox) -> Restarted:
    """On sandbox-1: restart Ollama's unit, then vLLM's, with each unit's state around."""
    cwd = sandbox.cwd
    vllm_before = unit_state(cwd, "sandbox-1", UNIT)
    ollama_before = unit_state(cwd, "sandbox-1", OLLAMA_UNIT)
    ollama_rc = ssh(cwd, "sandbox-1", f"systemctl restart {OLLAMA_UNIT}").returncode
    ollama_after = unit_state(cwd, "sandbox-1", OLLAMA_UNIT)
    vllm_after = unit_state(cwd, "sandbox-1", UNIT)
    try:
        tags = httpx.get(OLLAMA_TAGS, timeout=10).text
    except httpx.HTTPError as exc:
        tags = f"{type(exc).__name__}: {exc}"
    vllm_rc = ssh(cwd, "sandbox-1", f"systemctl restart {UNIT}").returncode
    ollama_after_vllm = unit_state(cwd, "sandbox-1", OLLAMA_UNIT)
    healthy = wait_healthy(HEALTH["sandbox-1"], 240)
    return Restarted(vllm_before, ollama_before, ollama_rc, ollama_after, vllm_after, tags,
                     vllm_rc, ollama_after_vllm, healthy,
                     unit_state(cwd, "sandbox-1", UNIT))


@dataclass(frozen=True)
class Broken:
    stop_rc: int
    truncate_rc: int
    probe: Ran


@pytest.fixture(scope="module")
def broken(restarted: Restarted, sandbox: Sandbox) -> Broken:
    """sandbox-2 broken twice over (vLLM stopped, config.json truncated), then probed."""
    stop = ssh(sandbox.cwd, "sandbox-2", f"systemctl stop {UNIT}")
    truncate = ssh(sandbox.cwd, "sandbox-2", f"truncate -s 100 {WEIGHTS}/config.json")
    probe = orchestrate(sandbox.cwd, sandbox.env, "probe", "--hosts", "sandbox", "--json")
    return Broken(stop.returncode, truncate.returncode, probe)


@dataclass(frozen=True)
class Reimaged:
    rm_rc: int
    staged: Path  # the mirror's copy of DAMAGED, damaged here
    up: Ran


@pytest.fixture(scope="module")
def reimaged(broken: Broken, sandbox: Sandbox) -> Reimaged:
    """sandbox-2 re-imaged (its model gone) while the mirror's staged copy of one file is
    damaged, same size; then `up --only models`."""
    rm = ssh(sandbox.cwd, "sandbox-2", f"rm -rf {WEIGHTS}")
    [model] = sandbox.result["mirror"]["models"]
    staged = Path(model["path"]) / "files" / DAMAGED
    data = bytearray(staged.read_bytes())
    middle = slice(len(data) // 2, len(data) // 2 + 16)
    data[middle] = bytes(b ^ 0xFF for b in data[middle])
    staged.write_bytes(bytes(data))
    up = orchestrate(sandbox.cwd, sandbox.env, "up", "--hosts", "sandbox", "--only", "models",
                     "--json")
    return Reimaged(rm.returncode, staged, up)


@pytest.fixture(scope="module")
def verified(reimaged: Reimaged, sandbox: Sandbox) -> Ran:
    """The operator's fix: re-hash the staged files, fetch the damaged one from the origin."""
    return orchestrate(sandbox.cwd, sandbox.env, "mirror", "--hosts", "sandbox", "--verify",
                       "--json")


@pytest.fixture(scope="module")
def healed(verified: Ran, sandbox: Sandbox) -> Ran:
    """The playbooks again, for what sandbox-2 lacks."""
    return orchestrate(sandbox.cwd, sandbox.env, "up", "--hosts", "sandbox", "--only", "models",
                       "--only", "services", "--only", "verify", "--json")


# --- the first `up` ----------------------------------------------------------------------

def test_up_exits_0_with_no_failed_task(sandbox: Sandbox) -> None:
    assert sandbox.up.rc == 0, sandbox.up.tail()
    ansible = sandbox.result["ansible"]
    assert ansible["failures"] == []
    assert sorted(ansible["hosts"]) == list(HOSTS)
    assert all(s["failed"] == 0 and s["unreachable"] == 0 and s["ok"] > 0
               for s in ansible["hosts"].values()), ansible["hosts"]


def test_up_runs_every_probe_and_no_other(sandbox: Sandbox) -> None:
    expected = {**HOST_PROBES, **HEALTH_PROBES, **CHAT_PROBES, **STREAM_PROBES,
                **OLLAMA_PROBES}
    ran = {(r["host"], r["probe"]) for r in sandbox.result["probes"]["results"]}
    assert ran == {(h, p) for h in HOSTS for p in expected}


def test_host_probes_over_ssh(sandbox: Sandbox) -> None:
    judge(sandbox.result["probes"], HOST_PROBES)
    # The Ollama deployment too: its unit and port, over SSH.
    judge(sandbox.result["probes"], {"service": "pass", "listening": "pass"}, OLLAMA)


def test_vllm_health_models_and_api_key(sandbox: Sandbox) -> None:
    judge(sandbox.result["probes"], HEALTH_PROBES, VLLM)


def test_vllm_chat_and_tool_call(sandbox: Sandbox) -> None:
    judge(sandbox.result["probes"], CHAT_PROBES, VLLM)
    chat = [r for r in sandbox.result["probes"]["results"] if r["probe"] == "chat"]
    assert all("answer=" in r["evidence"] and "answer=''" not in r["evidence"] for r in chat)


def test_vllm_chat_stream(sandbox: Sandbox) -> None:
    judge(sandbox.result["probes"], STREAM_PROBES, VLLM)


def test_ollama_standin_probes_pass_and_say_it_is_one(sandbox: Sandbox) -> None:
    judge(sandbox.result["probes"], OLLAMA_PROBES, OLLAMA)
    results = [r for r in sandbox.result["probes"]["results"] if r["probe"] in OLLAMA_PROBES]
    assert all(r["standin"] for r in results)
    versions = [r for r in results if r["probe"] == "version"]
    assert len(versions) == 2 and all("Ollama STAND-IN" in r["evidence"] for r in versions)
    # vLLM is the real engine: none of its probes is marked.
    assert not [r for r in sandbox.result["probes"]["results"]
                if r["deployment"] == VLLM and r["standin"]]


def test_up_writes_its_report(sandbox: Sandbox) -> None:
    report = Path(sandbox.result["run_dir"]) / "report.html"
    assert report.is_file()
    assert "STAND-IN" in report.read_text()


def test_model_fetched_once_and_fanned_out(sandbox: Sandbox) -> None:
    """`up` staged the model from its origin (the locally generated model_dir) into the
    control machine's mirror once, its size in bytes, and each host fetched each file from
    the mirror server that `up` ran on loopback for the run."""
    mirror = sandbox.result["mirror"]
    [model] = mirror["models"]
    assert model["origin_bytes"] == model["total_bytes"] == mirror["origin_bytes"] > 0
    assert not model["already_staged"]
    files = json.loads((Path(model["path"]) / "manifest.json").read_text())["files"]
    assert file_downloads(mirror, model) == {
        name: (len(HOSTS), len(HOSTS) * entry["size"]) for name, entry in files.items()}


def test_api_key_is_nowhere_in_clear(sandbox: Sandbox) -> None:
    """Enforced (the api_key probe), and in no process list, journal or run artifact."""
    key = load_secrets(sandbox.cwd / STATE / "secrets.yml",
                       sandbox.cwd / STATE / "vault-password")["vault_sandbox_api_key"]
    for host in HOSTS:
        seen = ssh(sandbox.cwd, host, f"ps -eo args; journalctl -u {UNIT} --no-pager")
        assert seen.returncode == 0 and "--api-key" not in seen.stdout
        assert key not in seen.stdout
    artifacts = [p for p in (sandbox.cwd / ".orchestrate" / "runs").rglob("*") if p.is_file()]
    assert artifacts and not [p for p in artifacts if key in p.read_text(errors="replace")]


# --- `up` again ----------------------------------------------------------------------------

def test_second_up_changes_nothing(rerun: Ran) -> None:
    assert rerun.rc == 0, rerun.tail()
    assert rerun.json()["ansible"]["changed"] == 0


def test_second_up_takes_nothing_from_origin_or_mirror(sandbox: Sandbox, rerun: Ran) -> None:
    mirror = rerun.json()["mirror"]
    assert mirror["origin_bytes"] == 0 and mirror["models"][0]["already_staged"]
    [model] = sandbox.result["mirror"]["models"]
    assert not [n for n, (_, sent) in file_downloads(mirror, model).items() if sent]


# --- bench ---------------------------------------------------------------------------------

def test_bench_measures_vllm(benched: Ran) -> None:
    assert benched.rc == 0, benched.tail()
    deployments = benched.json()["bench"]["deployments"]
    levels = [lv for d in deployments if d["deployment"] == VLLM for lv in d["levels"]]
    assert [lv["concurrency"] for lv in levels] == [1, 4, 1, 4]
    assert all(lv["errors"] == 0 and lv["output_tokens_per_s"] > 0
               and lv["tokens_from"] == "usage" for lv in levels)


def test_bench_marks_the_ollama_standin(benched: Ran) -> None:
    out = benched.json()
    marks = {(d["host"], d["deployment"]): d["standin"] for d in out["bench"]["deployments"]}
    assert marks == {**{(h, VLLM): False for h in HOSTS}, **{(h, OLLAMA): True for h in HOSTS}}
    assert all(lv["servers"][0].startswith("ollama-standin/")
               for d in out["bench"]["deployments"] if d["deployment"] == OLLAMA
               for lv in d["levels"])
    assert "STAND-IN" in benched.stderr  # its progress lines (and table) on stderr
    html = Path(out["report"]).read_text()
    assert html.count(f"{OLLAMA} (ollama, ") == 2 and "A stand-in engine answered" in html
    assert "Left out of the comparison: sandbox-1/qwen-ollama (ollama), " in html
    assert "No engine comparison: vllm is the only real engine benchmarked" in html


def test_bench_report_plots_real_engines_only_in_the_comparison(benched: Ran) -> None:
    html = Path(benched.json()["report"]).read_text()
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    # Throughput, TTFT and ITL per deployment, and the comparison of the two vLLM ones.
    assert len(svgs) == 3 * 2 * len(HOSTS) + 1
    [comparison] = [s for s in svgs if "Output throughput by deployment" in s]
    assert all(f"{h}/{VLLM} (vllm)" in comparison for h in HOSTS)
    assert OLLAMA not in comparison


# --- breaking and healing --------------------------------------------------------------------

def test_kill_9_of_vllm_is_healed_by_systemd(killed: Killed) -> None:
    assert killed.kill_rc == 0, killed.before
    assert killed.healthy, f"{HEALTH['sandbox-1']} not healthy within 240 s: {killed.after}"
    assert killed.after["ActiveState"] == "active"
    assert killed.after["MainPID"] != killed.before["MainPID"]
    assert int(killed.after["NRestarts"]) == int(killed.before["NRestarts"]) + 1


def test_restarting_one_engine_leaves_the_other_alone(restarted: Restarted) -> None:
    r = restarted
    assert r.ollama_restart_rc == 0 and r.ollama_after["ActiveState"] == "active"
    assert r.ollama_after["MainPID"] != r.ollama_before["MainPID"]
    assert (r.vllm_after["MainPID"], r.vllm_after["NRestarts"]) == (
        r.vllm_before["MainPID"], r.vllm_before["NRestarts"])
    assert "qwen2.5:0.5b" in r.tags
    assert r.vllm_restart_rc == 0
    assert r.ollama_after_vllm["MainPID"] == r.ollama_after["MainPID"]
    assert r.healthy, f"{HEALTH['sandbox-1']} not healthy within 240 s: {r.vllm_restarted}"
    assert r.vllm_restarted["ActiveState"] == "active"
    assert r.vllm_restarted["MainPID"] != r.vllm_after["MainPID"]


def test_broken_host_fails_its_probes_only_with_next_steps(broken: Broken) -> None:
    assert (broken.stop_rc, broken.truncate_rc) == (0, 0)
    assert broken.probe.rc == 1, broken.probe.tail()
    report = broken.probe.json()
    failed = {r["probe"]: r for r in report["results"] if r["status"] == "fail"}
    assert {r["host"] for r in report["results"] if r["status"] == "fail"} == {"sandbox-2"}
    assert f"journalctl -u {UNIT}" in failed["service"]["next_step"]
    assert "config.json" in failed["weights"]["evidence"]
    assert failed["weights"]["next_step"]
    assert "Traceback" not in broken.probe.stdout + broken.probe.stderr


def test_reimaged_host_fetching_a_damaged_file_fails_naming_it(reimaged: Reimaged) -> None:
    """`up` trusts a staged model's manifest (no re-hash of the weights on every run), so
    sandbox-2 fails fetching that file, by name, with the sha256 mismatch and the next step;
    sandbox-1, complete, is untouched."""
    assert reimaged.rm_rc == 0
    assert reimaged.up.rc == 1, reimaged.up.tail()
    failures = reimaged.up.json()["ansible"]["failures"]
    assert {f["host"] for f in failures} == {"sandbox-2"}
    assert [f for f in failures if f"{WEIGHTS}/{DAMAGED} from http://" in f["message"]
            and "sha256 checksum did not match" in f["message"]
            and "orchestrate mirror --verify" in f["message"]], failures


def test_mirror_verify_repairs_the_damaged_file(sandbox: Sandbox, reimaged: Reimaged,
                                                verified: Ran) -> None:
    assert verified.rc == 0, verified.tail()
    assert verified.json()["models"][0]["repaired"] == [DAMAGED]
    [model] = sandbox.result["mirror"]["models"]
    files = json.loads((Path(model["path"]) / "manifest.json").read_text())["files"]
    assert hashlib.sha256(reimaged.staged.read_bytes()).hexdigest() == files[DAMAGED]["sha256"]


def test_playbooks_heal_the_reimaged_host(sandbox: Sandbox, healed: Ran) -> None:
    """sandbox-2 fetches from the mirror what it still lacks, once."""
    assert healed.rc == 0, healed.tail()
    [model] = sandbox.result["mirror"]["models"]
    files = json.loads((Path(model["path"]) / "manifest.json").read_text())["files"]
    assert file_downloads(healed.json()["mirror"], model)[DAMAGED] == (
        1, files[DAMAGED]["size"])


# --- replayed nvidia-smi: facts first, a plan per host ------------------------------------------
#
# The sandbox's containers have no GPU. Five fleet hosts ride on them (several names, one
# container address and port), each told by `gpu_check_nvidia_smi` where its nvidia-smi
# is: four get the nvidia-smi STAND-IN tests/doubles/nvidia_smi_replay, which prints one
# real saved output from tests/data/nvidia-smi whatever it is asked; the fifth gets none.
# Each host also gets a STAND-IN for sysfs's PCI bus (`gpu_check_sysfs_root`) showing one
# NVIDIA GPU, as a GPU host's bus would: the containers' real bus has none, and a host
# with no NVIDIA GPU at all would be planned differently from one with no driver.
# This step needs only the sandbox's hosts, not what the later steps do to them, and
# leaves them as it found them: it is not in the chain, so `-k replayed` runs `up` and it.

REPLAY_DATA = Path(__file__).resolve().parents[1] / "data"
REPLAY_STANDIN = Path(__file__).resolve().parents[1] / "doubles" / "nvidia_smi_replay"
REPLAY_DIR = "/opt/replay"
# host -> (saved output it replays, driver, GPU, torch requirement, vLLM requirement): the
# builds `orchestrate compat --driver` gives each driver (R535 cu121 ... R580 cu130).
REPLAYED = {
    "rtx4090-535": ("xml__RTX-4090__535.86.05.txt", "535.86.05", "NVIDIA GeForce RTX 4090",
                    "torch==2.5.1+cu121", "vllm==0.7.3"),
    "a10-550": ("table__A10__550.127.05.txt", "550.127.05", "NVIDIA A10",
                "torch==2.6.0+cu124", "vllm==0.8.5.post1"),
    "a100-570": ("table__A100-SXM4-40GB__570.124.06.txt", "570.124.06",
                 "NVIDIA A100-SXM4-40GB", "torch==2.8.0+cu128", "vllm==0.11.0"),
    "rtx4090-580": ("table__RTX-4090__580.65.06.txt", "580.65.06", "NVIDIA GeForce RTX 4090",
                    "torch==2.13.0+cu130", "vllm==0.32.0"),
}
NO_DRIVER = "no-driver"  # no nvidia-smi at its path; driver: {manage: true}
# The declared-GPU fleet: this host declares an A10, the replay shows an A100.
DECLARED_HOST, DECLARED_GPU = "a100-570", "NVIDIA A10"


@dataclass(frozen=True)
class Replayed:
    fleet: Path
    installed: list[str]  # podman's complaints while installing the replays; [] when none
    facts: Ran
    plan: Ran
    declared_fleet: Path
    declared_line: int  # the line of the declared gpu's name
    declared: Ran
    left: dict[str, str]  # container -> what it still held under REPLAY_DIR afterwards


def podman(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=env, capture_output=True, text=True,
                          check=False, timeout=120)


def replay_tree(root: Path, host: str, saved: str | None) -> None:
    """Under root/host: the nvidia-smi stand-in and its saved output (saved None: no
    nvidia-smi), and a sysfs stand-in whose PCI bus holds one NVIDIA 3D controller."""
    top = root / host
    device = top / "sys" / "bus" / "pci" / "devices" / "0000:17:00.0"
    device.mkdir(parents=True)
    (device / "vendor").write_text("0x10de\n")
    (device / "class").write_text("0x030200\n")
    if saved is not None:
        (top / "nvidia-smi").write_bytes(REPLAY_STANDIN.read_bytes())
        (top / "nvidia-smi").chmod(0o755)
        (top / "nvidia-smi.out").write_bytes((REPLAY_DATA / "nvidia-smi" / saved).read_bytes())


def replay_fleet(sandbox: Sandbox) -> tuple[dict[str, Any], dict[str, str]]:
    """tests/data/replay/fleet.yml with the sandbox's own connection settings (from the
    fleet orchestrator/sandbox/fleet.py builds), and host -> the container it rides on."""
    own = sandbox_fleet(sandbox.cwd / STATE / "id_ed25519",
                        Path(sandbox.env["ORCHESTRATE_TINY_MODEL"]))
    group = own.fleet.groups[SANDBOX_GROUP]
    riders = {h.name: h for h in own.hosts_of(SANDBOX_GROUP)}
    data = yaml.safe_load((REPLAY_DATA / "replay" / "fleet.yml").read_text())
    replayed = data["groups"]["replayed"]
    replayed.update(ssh_user=group.ssh_user, ssh_key=group.ssh_key,
                    vars={"ansible_ssh_common_args":
                          (group.vars or {})["ansible_ssh_common_args"]})
    containers = {}
    for name, host in replayed["hosts"].items():
        rider = riders[host["address"]]
        containers[name] = sandbox_hosts.CONTAINER_PREFIX + rider.name
        host.update(address=rider.address, ssh_port=rider.ssh_port)
    return data, containers


@pytest.fixture(scope="module")
def replayed(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Replayed:
    """The replays installed into the containers, `facts` and `plan` of the replayed fleet,
    `plan` of one declaring a GPU the host does not have; the replays removed again."""
    cwd = tmp_path_factory.mktemp("replayed")
    data, containers = replay_fleet(sandbox)
    fleet = cwd / "fleet.yml"
    fleet.write_text(yaml.safe_dump(data, sort_keys=False))
    data["groups"]["replayed"]["hosts"][DECLARED_HOST]["gpu"] = {"name": DECLARED_GPU,
                                                                 "count": 1}
    declared_fleet = cwd / "declared-gpu.yml"
    declared_text = yaml.safe_dump(data, sort_keys=False)
    declared_fleet.write_text(declared_text)
    [declared_line] = [n for n, line in enumerate(declared_text.splitlines(), start=1)
                       if line.strip() == f"name: {DECLARED_GPU}"]
    trees = {container: cwd / "opt" / container for container in set(containers.values())}
    for host, container in containers.items():
        replay_tree(trees[container], host, REPLAYED[host][0] if host in REPLAYED else None)
    installed: list[str] = []
    try:
        for container, tree in trees.items():
            # Into a fresh REPLAY_DIR: `podman cp` puts a tree inside one that exists.
            podman(sandbox.env, "exec", container, "rm", "-rf", REPLAY_DIR)
            done = podman(sandbox.env, "cp", str(tree), f"{container}:{REPLAY_DIR}")
            installed += [f"{container}: {done.stderr.strip()}"] if done.returncode else []
        facts = orchestrate(cwd, sandbox.env, "facts", "-f", str(fleet), "--hosts", "replayed",
                            "--json", "--refresh")
        plan = orchestrate(cwd, sandbox.env, "plan", "-f", str(fleet), "--hosts", "replayed",
                           "--json")
        declared = orchestrate(cwd, sandbox.env, "plan", "-f", str(declared_fleet),
                               "--hosts", "replayed", "--json")
    finally:
        for container in trees:
            podman(sandbox.env, "exec", container, "rm", "-rf", REPLAY_DIR)
    left = {container: podman(sandbox.env, "exec", container, "sh", "-c",
                              f"ls -A {REPLAY_DIR} 2>&1 || true").stdout.strip()
            for container in trees}
    return Replayed(fleet, installed, facts, plan, declared_fleet, declared_line, declared,
                    left)


def test_replayed_facts_report_each_hosts_driver_and_gpu(replayed: Replayed) -> None:
    """`orchestrate facts` over SSH: what each host's nvidia-smi STAND-IN replays (a real
    saved output), the OS of the container it rides on, and no driver where there is no
    nvidia-smi."""
    assert not replayed.installed, replayed.installed
    assert replayed.facts.rc == 0, replayed.facts.tail()
    report = replayed.facts.json()
    assert report["unreachable"] == [] and {h["source"] for h in report["hosts"]} == {
        "gathered"}, report
    found = {h["host"]: h["facts"] for h in report["hosts"]}
    assert sorted(found) == sorted([*REPLAYED, NO_DRIVER])
    for host, (_, driver, gpu, _, _) in REPLAYED.items():
        nvidia = found[host]["nvidia"]
        assert found[host]["reachable"], found[host]
        assert (nvidia["driver_version"], [g["name"] for g in nvidia["gpus"]]) == (
            driver, [gpu]), nvidia
        assert nvidia["error"] is None and nvidia["source"] == "nvidia-smi", nvidia
        assert found[host]["os"]["distribution"] == "Debian", found[host]["os"]
    missing = found[NO_DRIVER]["nvidia"]
    assert missing["gpus"] == [] and missing["error"]["kind"] == "not_installed", missing
    assert missing["pci_gpus"] == 1, missing


def test_replayed_plan_gives_each_host_its_own_torch_and_vllm(replayed: Replayed) -> None:
    """No `gpu:` in the fleet: each host's torch build and vLLM release come from the driver
    its nvidia-smi STAND-IN replays, and the reasons say it was found on the host."""
    assert not re.search(r"^\s*gpu:", replayed.fleet.read_text(), re.M)
    assert replayed.plan.rc == 0, replayed.plan.tail()
    planned = {h["name"]: h for h in replayed.plan.json()["hosts"]}
    got = {host: (planned[host]["vars"]["pytorch_requirement"],
                  planned[host]["vars"]["vllm_requirement"]) for host in REPLAYED}
    assert got == {host: (torch, vllm) for host, (*_, torch, vllm) in REPLAYED.items()}
    for host, (_, driver, _, _, _) in REPLAYED.items():
        reasons = "\n".join(planned[host]["reasons"])
        assert "found on the host" in reasons and driver in reasons, reasons


def test_replayed_host_without_nvidia_smi_is_planned_a_driver(replayed: Replayed) -> None:
    """The host whose nvidia-smi is missing is planned as having no driver: with
    driver.manage, the drivers stage installs a branch, and its stack is that branch's. The
    branch is the one packaged for the OS found: the sandbox runs Debian 12, whose own
    packages carry R535 only (data/nvidia_driver.yml)."""
    assert replayed.plan.rc == 0, replayed.plan.tail()
    [host] = [h for h in replayed.plan.json()["hosts"] if h["name"] == NO_DRIVER]
    reasons = "\n".join(host["reasons"])
    assert host["vars"]["nvidia_driver_manage"] is True
    assert host["vars"]["nvidia_driver_branch"] == "535", reasons
    assert host["vars"]["pytorch_requirement"] == "torch==2.5.1+cu121", reasons
    assert "packaged for Debian 12 (distro)" in reasons, reasons
    assert "no NVIDIA driver found on the host" in reasons, reasons


def test_replayed_declared_gpu_that_differs_is_refused(replayed: Replayed) -> None:
    """fleet.yml declares an A10 where the nvidia-smi STAND-IN replays an A100: exit 2,
    naming the host, what was declared (file:line) and what was found."""
    declared = replayed.declared
    assert declared.rc == 2, declared.tail()
    message = declared.stdout + declared.stderr
    assert re.findall(r"host '([^']+)'", message) == [DECLARED_HOST], message
    assert f"{replayed.declared_fleet}:{replayed.declared_line}" in message, message
    assert f"declares {DECLARED_GPU};" in message, message
    assert "1x NVIDIA A100-SXM4-40GB, driver 570.124.06" in message, message
    assert "Traceback" not in message


def test_replayed_stand_ins_are_removed_from_the_sandbox(replayed: Replayed) -> None:
    assert replayed.left and all(
        "No such file or directory" in seen for seen in replayed.left.values()), replayed.left
