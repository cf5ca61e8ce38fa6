"""Planning from facts: each GPU host gets the torch build and vLLM release of the driver found
on it, its fit from the GPUs found, and its disk check from the free space found; a declared
gpu: is an expectation the facts must meet. The hosts' outputs are real saved nvidia-smi
outputs (tests/data/facts, tests/data/nvidia-smi, each with its SOURCES.md); the facts built
here by hand stand for what the gatherer reports on states no saved output shows (no driver
installed, NVSwitches, the free disk)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from orchestrator.config.fleet import load_fleet
from orchestrator.errors import PlanError
from orchestrator.facts.hostfacts import HostFacts, OsFacts, from_nvidia_smi_text
from orchestrator.facts.offline import load_facts_dir
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import decide, load_cuda_compat
from orchestrator.plan.planner import Plan, make_plan

REPO = Path(__file__).resolve().parents[2]
FACTS = REPO / "tests" / "data" / "facts"
SMI = REPO / "tests" / "data" / "nvidia-smi"
WHEN = dt.datetime(2026, 12, 5, 23, 50, tzinfo=dt.UTC)
WHERE = "found on the host (nvml, 2026-12-05 23:50 UTC)"
# The host part (OS, disk, PCI bus) is cited by how it was gathered, not by the GPU tool.
WHERE_HOST = "found on the host (gathered by playbooks/facts.yml, 2026-12-05 23:50 UTC)"


def _saved(host: str, fixture: str) -> HostFacts:
    return from_nvidia_smi_text(host, (SMI / fixture).read_text(encoding="utf-8"),
                                f"file {fixture}", WHEN)


def _facts(host: str, *, gpus: list[tuple[str, int]] | None = None, driver: str | None = None,
           error: str | None = None, pci_gpus: int | None = None, nvswitches: int | None = None,
           disk: list[tuple[str, str, int]] | None = None, mig: bool = False) -> HostFacts:
    """A gatherer's document (the JSON `orchestrate facts --json` writes), built by hand."""
    nvidia = {"source": "nvml", "driver_version": driver,
              "gpus": [{"index": i, "name": name, "memory_total_mib": mib,
                        "mig_mode": "Enabled" if mig else None}
                       for i, (name, mib) in enumerate(gpus or [])],
              "mig_devices": ([{"gpu_index": 0, "profile": "3g.40gb", "uuid": "MIG-1"},
                               {"gpu_index": 0, "profile": "3g.40gb", "uuid": "MIG-2"}]
                              if mig else []),
              "error": ({"kind": error, "message": f"{error} message", "next_step": "do this"}
                        if error else None),
              "pci_gpus": pci_gpus, "nvswitches": nvswitches}
    return HostFacts.model_validate({
        "host": host, "gathered_at": WHEN, "origin": "gathered by playbooks/facts.yml",
        "nvidia": nvidia,
        "disk": [{"path": p, "mount": m, "free_mib": f} for p, m, f in disk or []]})


def _plan(path: Path, facts: dict[str, HostFacts] | None, group: str = "g") -> Plan:
    return make_plan(load_fleet(path), group, load_knowledge(), load_cuda_compat(), facts=facts)


FLEET = """\
groups:
  g:
    hosts:
      h1: {address: 10.0.0.1}
deployments:
  - name: qwen7b
    model: Qwen/Qwen2.5-7B-Instruct
    engine: vllm
    hosts: g
    port: 8000
    options: {max_model_len: 8192, open: true}
"""

L4 = ("NVIDIA L4", 23034)


# --- the done criterion ----------------------------------------------------------

@pytest.mark.parametrize(("host", "driver", "torch", "vllm"), [
    ("h535", "535.86.05", "torch==2.5.1+cu121", "vllm==0.7.3"),
    ("h550", "550.127.05", "torch==2.6.0+cu124", "vllm==0.8.5.post1"),
    ("h570", "570.124.06", "torch==2.8.0+cu128", "vllm==0.11.0"),
    ("h580", "580.65.06", "torch==2.13.0+cu130", "vllm==0.32.0"),
])
def test_saved_outputs_of_four_drivers_plan_four_stacks_with_no_gpu_declared(
        host: str, driver: str, torch: str, vllm: str) -> None:
    loaded = load_fleet(FACTS / "fleet.yml")
    assert all(h.gpu.name is None and h.gpu.driver is None for h in loaded.hosts_of("drivers"))
    facts = load_facts_dir(FACTS, [h.name for h in loaded.hosts_of("drivers")])
    plan = make_plan(loaded, "drivers", load_knowledge(), load_cuda_compat(), facts=facts)
    planned = next(h for h in plan.hosts if h.name == host)
    assert (planned.vars["pytorch_requirement"], planned.vars["vllm_requirement"]) == (torch,
                                                                                      vllm)
    # The same decision `orchestrate compat --driver` prints for that driver.
    decision = decide(driver, None, load_cuda_compat())
    assert planned.vars["pytorch_requirement"] == decision.torch.requirement
    source = f"found on the host (file {FACTS / (host + '.txt')}, "
    assert any(r.startswith(f"vLLM {vllm[6:]} and torch {torch[-5:]} chosen for NVIDIA driver "
                            f"{driver} ({source}") for r in planned.reasons)
    assert planned.vars["pytorch_expected_gpus"] == 1
    assert any(r.startswith("qwen05b: fits 1x NVIDIA ") for r in planned.reasons)


# --- declared gpu: is an expectation -----------------------------------------------------

def test_declared_gpus_that_differ_are_refused_naming_both_sides_for_every_host(write) -> None:
    path = write("fleet.yml", FLEET.replace(
        "    hosts:\n      h1: {address: 10.0.0.1}\n",
        "    gpu: {name: A10, count: 1}\n"
        "    hosts:\n      h1: {address: 10.0.0.1}\n"
        "      h2: {address: 10.0.0.2, gpu: {driver: \"550.54.14\"}}\n"))
    facts = {"h1": _facts("h1", gpus=[L4, L4], driver="550.54.14"),
             "h2": _facts("h2", gpus=[("NVIDIA A10", 23028)], driver="550.127.05")}
    with pytest.raises(PlanError) as caught:
        _plan(path, facts)
    lines = str(caught.value).splitlines()
    assert lines[1:] == [
        f"  host 'h1': {path}:3 (groups.g.gpu.name), {path}:3 (groups.g.gpu.count) declares "
        f"A10, 1 GPU; {WHERE} 2x NVIDIA L4, driver 550.54.14: correct or remove gpu: in {path}",
        f"  host 'h2': {path}:6 (groups.g.hosts.h2.gpu.driver) declares driver 550.54.14; "
        f"{WHERE} 1x NVIDIA A10, driver 550.127.05: correct or remove gpu: in {path}"]


def test_declared_gpus_the_host_has_are_planned_from_what_was_found(write) -> None:
    path = write("fleet.yml", FLEET.replace("{address: 10.0.0.1}",
                                            "{address: 10.0.0.1, gpu: {name: L4, count: 2}}"))
    host = _plan(path, {"h1": _facts("h1", gpus=[L4, L4], driver="570.124.06")}).hosts[0]
    assert host.vars["vllm_requirement"] == "vllm==0.11.0"
    assert host.vars["gpu_check_expected_name"] == "NVIDIA L4"
    assert host.vars["pytorch_expected_gpus"] == 2
    assert f"GPUs: 2x NVIDIA L4, driver 570.124.06, {WHERE}" in host.reasons


def test_without_facts_the_declarations_are_planned_and_the_reason_says_why(write) -> None:
    path = write("fleet.yml", FLEET.replace("{address: 10.0.0.1}",
                                            "{address: 10.0.0.1, gpu: {name: L4, driver: "
                                            "\"550.54.14\"}}"))
    unreachable = _facts("h1").model_copy(update={"reachable": False,
                                                  "unreachable": "ssh: timed out"})
    for facts, why in [(None, "the plan was made without facts"),
                       ({}, "none gathered or given for it"),
                       ({"h1": unreachable}, "unreachable: ssh: timed out")]:
        host = _plan(path, facts).hosts[0]
        assert host.vars["vllm_requirement"] == "vllm==0.8.5.post1"
        assert (f"GPUs and driver as the fleet declares them: no facts of the host ({why})"
                in host.reasons)
        assert any(f"(declared in {path}:4 (groups.g.hosts.h1.gpu.driver);" in r
                   for r in host.reasons)


# --- driver states ------------------------------------------------------------------------

def test_a_host_without_driver_and_driver_manage_gets_the_branch_to_install(write) -> None:
    path = write("fleet.yml", "defaults: {driver: {manage: true}}\n" + FLEET)
    facts = {"h1": _facts("h1", error="not_installed", pci_gpus=2)}
    host = _plan(path, facts).hosts[0]
    assert host.vars["nvidia_driver_manage"] is True
    assert host.vars["nvidia_driver_branch"] == "580"
    assert host.vars["vllm_requirement"] == "vllm==0.32.0"
    assert (f"no NVIDIA driver {WHERE}, 2 NVIDIA GPUs on its PCI bus: the drivers stage "
            "installs one") in host.reasons


def test_a_managed_driver_is_the_branch_packaged_for_the_os_found(write) -> None:
    path = write("fleet.yml", "defaults: {driver: {manage: true}}\n" + FLEET)
    debian = _facts("h1", error="not_installed", pci_gpus=1).model_copy(update={
        "os": OsFacts(distribution="Debian", version="12.15", family="Debian")})
    host = _plan(path, {"h1": debian}).hosts[0]
    # Debian 12's own packages carry R535 only (data/nvidia_driver.yml), so its stack is
    # R535's: torch cu121 and vLLM 0.7.3, not the pin the Ubuntu rows would allow.
    assert host.vars["nvidia_driver_branch"] == "535"
    assert host.vars["pytorch_requirement"] == "torch==2.5.1+cu121"
    assert any("packaged for Debian 12 (distro)" in r and "where the role stops" not in r
               for r in host.reasons), host.reasons
    fedora = debian.model_copy(update={
        "os": OsFacts(distribution="Fedora", version="41", family="RedHat")})
    with pytest.raises(PlanError, match=r"host 'h1': driver.manage, but the host runs Fedora 41 "
                                        r"\(found on the host \(gathered by playbooks/facts.yml"):
        _plan(path, {"h1": fedora})


def test_a_host_without_driver_is_refused_unless_the_toolkit_installs_one(write) -> None:
    path = write("fleet.yml", FLEET)
    with pytest.raises(PlanError, match=r"host 'h1': no NVIDIA driver found on the host .*: set "
                                        r"driver: \{manage: true\} .* or profile: cpu"):
        _plan(path, {"h1": _facts("h1", error="not_installed", pci_gpus=1)})


def test_a_gpu_host_without_gpu_is_refused_suggesting_profile_cpu(write) -> None:
    with pytest.raises(PlanError, match=r"host 'h1': profile gpu, but no NVIDIA GPU found on "
                                        r"the host .*: set profile: cpu"):
        _plan(write("fleet.yml", FLEET), {"h1": _facts("h1", error="not_installed",
                                                       pci_gpus=0)})


def test_a_driver_that_does_not_answer_is_refused_with_its_next_step(write) -> None:
    facts = _saved("h1", "error_version_mismatch__GT-640__470.txt")
    assert facts.nvidia is not None and facts.nvidia.error is not None
    with pytest.raises(PlanError) as caught:
        _plan(write("fleet.yml", FLEET), {"h1": facts})
    message = str(caught.value)
    assert "host 'h1': the NVIDIA driver does not answer (found on the host (file " in message
    assert "Driver/library version mismatch" in message
    assert message.endswith(facts.nvidia.error.next_step)


def test_a_cpu_host_ignores_the_gpus_found(write) -> None:
    path = write("fleet.yml", "defaults: {profile: cpu}\n" + FLEET)
    host = _plan(path, {"h1": _facts("h1", gpus=[L4], driver="470.82.01")}).hosts[0]
    assert host.vars["pytorch_requirement"].endswith("+cpu")
    assert f"1x NVIDIA L4, driver 470.82.01 {WHERE}: not used, profile cpu" in host.reasons


def test_nvswitches_found_turn_fabric_manager_on_and_refuse_it_turned_off(write) -> None:
    path = write("fleet.yml", "defaults: {driver: {manage: true}}\n" + FLEET)
    h100 = [("NVIDIA H100 80GB HBM3", 81559)] * 8
    facts = {"h1": _facts("h1", gpus=h100, driver="580.95.05", nvswitches=4)}
    host = _plan(path, facts).hosts[0]
    assert host.vars["nvidia_driver_fabricmanager"] is True
    assert (f"Fabric Manager installed with the driver: 4 NVSwitches on the PCI bus, "
            f"{WHERE_HOST}") in host.reasons
    off = write("fleet.yml", "defaults: {driver: {manage: true, fabric_manager: false}}\n"
                + FLEET)
    with pytest.raises(PlanError, match=r"fleet.yml:1 \(defaults.driver.fabric_manager\) turns "
                                        r"Fabric Manager off, but 4 NVSwitches on the PCI bus"):
        _plan(off, facts)


def test_mig_enabled_is_a_reason(write) -> None:
    facts = {"h1": _facts("h1", gpus=[("NVIDIA A100-SXM4-80GB", 81920)], driver="580.95.05",
                          mig=True)}
    host = _plan(write("fleet.yml", FLEET), facts).hosts[0]
    assert (f"MIG enabled on GPU 0 {WHERE}: vLLM sees its 2 MIG devices, not the whole GPUs"
            in host.reasons)


# --- fit and disk from what was found ------------------------------------------------------

def test_the_fit_uses_the_gpus_found(write) -> None:
    path = write("fleet.yml", FLEET.replace("Qwen2.5-7B-Instruct", "Qwen2.5-14B-Instruct"))
    with pytest.raises(PlanError, match=r"does not fit 1x NVIDIA L4 \(found on the host \(nvml, "):
        _plan(path, {"h1": _facts("h1", gpus=[L4], driver="580.95.05")})
    host = _plan(path, {"h1": _facts("h1", gpus=[L4] * 4, driver="580.95.05")}).hosts[0]
    assert "--tensor-parallel-size" in host.vars["vllm_deployments"][0]["args"]
    assert any(r.startswith("qwen7b: fits 4x NVIDIA L4: tensor parallel 2") for r in host.reasons)


def test_free_disk_found_too_small_is_refused_summing_what_shares_a_mount(write) -> None:
    path = write("fleet.yml", FLEET)
    disk = [("/opt/qwen-serve/env", "/", 20 * 1024),
            ("/var/lib/qwen-serve/models", "/", 20 * 1024)]
    with pytest.raises(PlanError) as caught:
        _plan(path, {"h1": _facts("h1", gpus=[L4], driver="580.95.05", disk=disk)})
    assert str(caught.value) == (
        f"host 'h1': the filesystem mounted at / has 20.0 GiB free, {WHERE_HOST}; the plan needs "
        "30.2 GiB there (the Python environment in /opt/qwen-serve/env, the weights in "
        "/var/lib/qwen-serve/models): free space there, or put the Python environment "
        "elsewhere (python.path)")
    apart = [disk[0], ("/var/lib/qwen-serve/models", "/var", 20 * 1024)]
    host = _plan(path, {"h1": _facts("h1", gpus=[L4], driver="580.95.05", disk=apart)}).hosts[0]
    assert (f"disk: 20.0 GiB free on / {WHERE_HOST}, 16.0 GiB needed (the Python environment in "
            "/opt/qwen-serve/env)") in host.reasons


# --- a deployment across hosts ------------------------------------------------------------

FLEET_RAY = """\
groups:
  big:
    vars: {ray_cluster_auth_mode: disabled}
    hosts:
      a: {address: 10.0.0.21}
      b: {address: 10.0.0.22}
deployments:
  - name: qwen72b
    model: Qwen/Qwen2.5-72B-Instruct
    engine: vllm
    hosts: big
    port: 8000
    nodes: 2
    options: {open: true}
"""


def test_members_of_a_deployment_across_hosts_must_match_as_found(write) -> None:
    path = write("fleet.yml", FLEET_RAY)
    l40s = [("NVIDIA L40S", 46068)] * 2
    same = {"a": _facts("a", gpus=l40s, driver="580.95.05"),
            "b": _facts("b", gpus=l40s, driver="580.95.05")}
    plan = _plan(path, same, group="big")
    assert plan.ray_cluster is not None and plan.ray_cluster.members == ["a", "b"]
    differ = {**same, "b": _facts("b", gpus=l40s, driver="570.124.06")}
    with pytest.raises(PlanError) as caught:
        _plan(path, differ, group="big")
    assert (f"a: gpu 2x NVIDIA L40S, driver 580.95.05 ({WHERE}); b: gpu 2x NVIDIA L40S, driver "
            f"570.124.06 ({WHERE})") in str(caught.value)
