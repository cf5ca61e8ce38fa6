"""The fleet's `driver:` settings: whether the toolkit installs the NVIDIA driver, which
branch the plan gives the nvidia_driver role (the stack is then planned for that branch), and
which kernel modules (data/nvidia_driver.yml)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator import cli
from orchestrator.config.fleet import load_fleet
from orchestrator.errors import ConfigError, PlanError
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import (
    branch_driver,
    load_cuda_compat,
    load_driver_table,
    lowest_driver_branch,
)
from orchestrator.plan.planner import HostPlan, make_plan

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
ROLE_VARS = REPO / "roles" / "nvidia_driver" / "vars"

FLEET = """\
defaults:
  driver: {manage: true}
groups:
  g:
    gpu: {name: NVIDIA A10, count: 1}
    hosts:
      h1: {address: 10.0.0.1}
      h2:
        address: 10.0.0.2
        driver: {branch: "570", open_kernel_modules: true}
      h3:
        address: 10.0.0.3
        driver: {manage: false}
"""


def _plan(path: Path, group: str = "g") -> dict[str, HostPlan]:
    plan = make_plan(load_fleet(path), group, load_knowledge(), load_cuda_compat())
    return {h.name: h for h in plan.hosts}


def _driver_vars(host: HostPlan) -> dict[str, object]:
    return {k: v for k, v in host.vars.items() if k.startswith("nvidia_driver_")}


@pytest.mark.parametrize(("cuda", "branch"), [
    ("13.0", 580), ("12.9", 575), ("12.4", 550), ("12.2", 535), ("12.0", 525), ("11.8", 520),
    ("13.2", 595)])
def test_lowest_branch_is_the_oldest_that_nvidias_table_lists_for_the_cuda(cuda: str,
                                                                           branch: int) -> None:
    assert lowest_driver_branch(cuda, load_cuda_compat().cuda) == branch


def test_no_branch_for_a_cuda_newer_than_the_table() -> None:
    assert lowest_driver_branch("99.0", load_cuda_compat().cuda) is None


def test_managed_host_gets_the_lowest_branch_for_the_torch_build_and_a_reason(write) -> None:
    h1 = _plan(write("fleet.yml", FLEET))["h1"]
    # torch 2.13.0+cu130 (vLLM 0.32.0's only build) needs CUDA 13.0: R580. The A10 runs
    # either kernel module flavour: NVIDIA's default for R580, open.
    assert _driver_vars(h1) == {"nvidia_driver_manage": True, "nvidia_driver_branch": "580",
                                "nvidia_driver_open_kernel_modules": True}
    reason = next(r for r in h1.reasons if r.startswith("NVIDIA driver branch"))
    assert "580" in reason and "CUDA 13.0" in reason and "580.65.06" in reason
    assert ("NVIDIA open kernel modules: NVIDIA A10 (compute capability 8.6) runs either, "
            "NVIDIA's default for branch 580 (open from R560)") in h1.reasons


def test_host_setting_wins_and_the_stack_is_planned_for_its_branch(write) -> None:
    h2 = _plan(write("fleet.yml", FLEET))["h2"]
    assert _driver_vars(h2) == {"nvidia_driver_manage": True, "nvidia_driver_branch": "570",
                                "nvidia_driver_open_kernel_modules": True}
    assert any(re.search(r"branch 570 .*\(declared in .*fleet\.yml:10 "
                         r"\(groups\.g\.hosts\.h2\.driver\.branch\)\)", r)
               for r in h2.reasons), h2.reasons
    # R570 runs CUDA 12.8 at most: not the pin's cu130, vLLM 0.11.0's cu128.
    assert h2.vars["vllm_requirement"] == "vllm==0.11.0"
    assert h2.vars["pytorch_requirement"] == "torch==2.8.0+cu128"
    assert "vLLM 0.11.0 and torch cu128 chosen for branch 570 (`orchestrate compat --driver " \
           "570.124.06` shows the same):" in h2.reasons


def test_unmanaged_host_gets_no_driver_variables(write) -> None:
    hosts = _plan(write("fleet.yml", FLEET))
    assert _driver_vars(hosts["h3"]) == {}
    assert not any(r.startswith("NVIDIA driver branch") for r in hosts["h3"].reasons)


def test_default_is_unmanaged(write) -> None:
    fleet = write("fleet.yml", FLEET.replace("  driver: {manage: true}\n", "  ssh_port: 22\n"))
    hosts = _plan(fleet)
    assert _driver_vars(hosts["h1"]) == {}
    # h2 sets a branch but not manage: still the owners' driver.
    assert _driver_vars(hosts["h2"]) == {}


def test_an_old_branch_given_plans_the_vllm_it_runs(write) -> None:
    # Before: the plan refused branch 535 for the pinned torch build; the stack is now
    # chosen for the branch installed.
    fleet = write("fleet.yml", FLEET.replace("gpu: {name: NVIDIA A10, count: 1}\n",
                                             "gpu: {name: NVIDIA A10, count: 1}\n"
                                             "    driver: {branch: 535, source: distro}\n"))
    h1 = _plan(fleet)["h1"]
    assert h1.vars["nvidia_driver_branch"] == "535"
    assert h1.vars["vllm_requirement"] == "vllm==0.7.3"
    assert h1.vars["pytorch_requirement"] == "torch==2.5.1+cu121"
    # Before R560 NVIDIA's default flavour is the proprietary one.
    assert h1.vars["nvidia_driver_open_kernel_modules"] is False


@pytest.mark.parametrize(("fleet_driver", "gpu_driver", "expected"), [
    # 530 has no -server packages on Ubuntu and no stream in the role's table.
    ("{branch: 530}", None, r"fleet\.yml:6: groups\.g\.driver\.branch: driver branch 530 is "
                            r"not packaged for the systems host 'h1' may install it on \("
                            r"Ubuntu 22\.04 \(distro\): 535, 550, 570, 580;"),
    ("{branch: 550}", '"570.133.20"',
     r"fleet\.yml:6: groups\.g\.driver\.branch: driver branch 550 is older than the driver of "
     r"host 'h1', 570\.133\.20 \(declared in .*fleet\.yml:5 \(groups\.g\.gpu\.driver\)\): "
     r"the drivers stage does not downgrade; set branch 570 or newer"),
    (None, '"590.48.01"',
     r"fleet\.yml:2: defaults\.driver\.manage: host 'h1' runs driver 590\.48\.01 \(declared "
     r"in .*fleet\.yml:5 \(groups\.g\.gpu\.driver\)\), newer than every branch packaged"),
])
def test_branch_refusals_name_the_key_file_and_line(write, fleet_driver: str | None,
                                                    gpu_driver: str | None,
                                                    expected: str) -> None:
    gpu = ("gpu: {name: NVIDIA A10, count: 1"
           + (f", driver: {gpu_driver}" if gpu_driver else "") + "}\n")
    text = FLEET.replace("gpu: {name: NVIDIA A10, count: 1}\n", gpu)
    if fleet_driver:
        text = text.replace(gpu, gpu + f"    driver: {fleet_driver}\n")
    with pytest.raises(PlanError) as info:
        _plan(write("fleet.yml", text))
    assert re.search(expected, str(info.value)), str(info.value)


def test_managed_host_with_an_old_driver_is_planned_for_the_branch_installed(write) -> None:
    # Before: torch cu121 from the old driver, then branch 530 (no -server packages, older
    # than the loaded 535) for it.
    fleet = write("fleet.yml", FLEET.replace("gpu: {name: NVIDIA A10, count: 1}",
                                             'gpu: {name: NVIDIA A10, count: 1, '
                                             'driver: "535.104.05"}'))
    h1 = _plan(fleet)["h1"]
    assert h1.vars["nvidia_driver_branch"] == "580"
    assert h1.vars["pytorch_requirement"] == "torch==2.13.0+cu130"
    assert h1.vars["vllm_requirement"] == "vllm==0.32.0"
    assert any("replaces driver 535.104.05" in r for r in h1.reasons), h1.reasons


def test_branch_stands_for_the_newest_toolkit_driver_of_it() -> None:
    cuda = load_cuda_compat().cuda
    assert branch_driver(580, cuda) == "580.95.05"
    # No toolkit row of R565: R560's newest stands for it (CUDA 12.6).
    assert branch_driver(565, cuda) == "560.35.05"
    assert branch_driver(400, cuda) is None


def test_source_cuda_offers_the_cuda_repositorys_branches(write) -> None:
    fleet = write("fleet.yml", FLEET.replace("driver: {manage: true}",
                                             "driver: {manage: true, source: cuda}"))
    reason = next(r for r in _plan(fleet)["h1"].reasons
                  if r.startswith("NVIDIA driver branch 580"))
    assert reason.endswith("packaged for Ubuntu 22.04 (cuda), Ubuntu 24.04 (cuda), "
                           "RHEL/Rocky 9 (cuda)"), reason


def test_source_is_passed_to_the_role(write) -> None:
    fleet = write("fleet.yml", FLEET.replace("driver: {manage: true}",
                                             "driver: {manage: true, source: cuda}"))
    assert _plan(fleet)["h1"].vars["nvidia_driver_source"] == "cuda"


def test_cpu_host_ignores_manage_and_says_so(write) -> None:
    fleet = write("fleet.yml", FLEET.replace("  driver: {manage: true}\n",
                                             "  driver: {manage: true}\n  profile: cpu\n"))
    h1 = _plan(fleet)["h1"]
    assert _driver_vars(h1) == {}
    assert "driver.manage ignored: a cpu-profile host gets no NVIDIA driver" in h1.reasons


@pytest.mark.parametrize(("driver", "key", "expected"), [
    ("{branch: 58}", "defaults.driver.branch", "expected a driver branch"),
    ("{branch: 580.65}", "defaults.driver.branch", "expected a driver branch"),
    ("{manged: true}", "defaults.driver.manged", "did you mean 'manage'"),
    ("{source: nvidia}", "defaults.driver.source", "'distro' or 'cuda'"),
])
def test_bad_driver_settings_name_file_line_and_key(write, driver: str, key: str,
                                                    expected: str) -> None:
    fleet = write("fleet.yml", FLEET.replace("{manage: true}", driver))
    with pytest.raises(ConfigError) as info:
        load_fleet(fleet)
    assert f"fleet.yml:2: {key}: " in str(info.value)
    assert expected in str(info.value)


def test_the_example_fleets_commented_driver_block_plans_when_uncommented(tmp_path: Path) -> None:
    text = (REPO / "templates" / "fleet.yml").read_text(encoding="utf-8")
    block = re.compile(r"^  # (driver:|  (manage|branch|source|open_kernel_modules):)", re.M)
    uncommented = block.sub(r"  \1", text)
    assert uncommented.count("\n  driver:\n") == 1
    (tmp_path / "fleet.yml").write_text(uncommented, encoding="utf-8")
    for host in _plan(tmp_path / "fleet.yml", "gpu-cluster").values():
        assert _driver_vars(host) == {"nvidia_driver_manage": True, "nvidia_driver_branch": "580",
                                      "nvidia_driver_source": "distro",
                                      "nvidia_driver_open_kernel_modules": False}
        assert any(r.startswith("NVIDIA proprietary kernel modules (declared in ")
                   for r in host.reasons)


# --- kernel modules, Fabric Manager and the NVLink Subnet Manager ---------------------------

GPU_FLEET = """\
groups:
  g:
    gpu: {name: GPU_NAME, count: 8}
    driver: DRIVER
    hosts:
      h1: {address: 10.0.0.1}
"""


def _gpu_plan(write, gpu: str, driver: str) -> HostPlan:
    fleet = write("fleet.yml", GPU_FLEET.replace("GPU_NAME", gpu).replace("DRIVER", driver))
    return _plan(fleet)["h1"]


@pytest.mark.parametrize(("gpu", "driver", "expected"), [
    ("Tesla V100-SXM2-32GB", "{manage: true, open_kernel_modules: true}",
     r"fleet\.yml:4: groups\.g\.driver\.open_kernel_modules: Tesla V100-SXM2-32GB \(compute "
     r"capability 7\.0\) is older than Turing \(compute capability 7\.5\), and NVIDIA's open "
     r"kernel modules run only on Turing and newer: set driver\.open_kernel_modules: false"),
    ("NVIDIA B200", "{manage: true, open_kernel_modules: false}",
     r"fleet\.yml:4: groups\.g\.driver\.open_kernel_modules: NVIDIA B200 \(compute capability "
     r"10\.0\) is a Blackwell or newer GPU, where NVIDIA supports only the open kernel "
     r"modules: set driver\.open_kernel_modules: true"),
    ("NVIDIA GH200 480GB", "{manage: true, open_kernel_modules: false}",
     r"groups\.g\.driver\.open_kernel_modules: NVIDIA GH200 480GB is a Grace Hopper GPU "
     r"\(GH200\), where NVIDIA supports only the open kernel modules"),
])
def test_a_kernel_module_flavour_the_gpu_cannot_run_is_refused(write, gpu: str, driver: str,
                                                                expected: str) -> None:
    with pytest.raises(PlanError) as info:
        _gpu_plan(write, gpu, driver)
    assert re.search(expected, str(info.value)), str(info.value)


def test_the_refusal_exits_2_with_the_key_file_and_line(write) -> None:
    fleet = write("fleet.yml", GPU_FLEET.replace("GPU_NAME", "NVIDIA B200").replace(
        "DRIVER", "{manage: true, open_kernel_modules: false}"))
    result = CliRunner().invoke(cli.app, ["plan", "--fleet", str(fleet), "--hosts", "g",
                                          "--no-gather"])
    assert result.exit_code == 2, result.output
    assert "fleet.yml:4: groups.g.driver.open_kernel_modules:" in " ".join(result.output.split())


@pytest.mark.parametrize(("gpu", "expected_open", "reason"), [
    ("NVIDIA B200", True, "is a Blackwell or newer GPU, where NVIDIA supports only the open "
                          "modules"),
    ("NVIDIA GeForce RTX 5090", True, "is a Blackwell or newer GPU"),
    ("NVIDIA GH200 480GB", True, "is a Grace Hopper GPU (GH200)"),
    ("Tesla V100-SXM2-32GB", False, "is older than Turing (compute capability 7.5), which the "
                                    "open modules need"),
    ("Tesla T4", True, "runs either, NVIDIA's default for branch"),
])
def test_kernel_modules_follow_the_gpu(write, gpu: str, expected_open: bool,
                                       reason: str) -> None:
    host = _gpu_plan(write, gpu, "{manage: true}")
    assert host.vars["nvidia_driver_open_kernel_modules"] is expected_open
    assert any(r.startswith("NVIDIA ") and "kernel modules" in r and reason in r
               for r in host.reasons), host.reasons


def test_fabric_manager_on_blackwell_brings_the_subnet_manager(write) -> None:
    b200 = _gpu_plan(write, "NVIDIA B200", "{manage: true, fabric_manager: true}")
    assert b200.vars["nvidia_driver_fabricmanager"] is True
    assert b200.vars["nvidia_driver_nvlsm"] is True
    h100 = _gpu_plan(write, "NVIDIA H100 80GB HBM3", "{manage: true, fabric_manager: true}")
    assert h100.vars["nvidia_driver_fabricmanager"] is True
    assert "nvidia_driver_nvlsm" not in h100.vars
    forced = _gpu_plan(write, "NVIDIA H100 80GB HBM3",
                       "{manage: true, fabric_manager: true, nvlink_subnet_manager: true}")
    assert forced.vars["nvidia_driver_nvlsm"] is True


@pytest.mark.parametrize("name", ["blackwell", "volta", "managed"])
def test_driver_plans_match_golden(name: str) -> None:
    plan = make_plan(load_fleet(REPO / "tests" / "data" / f"fleet-driver-{name}.yml"), "all",
                     load_knowledge(), load_cuda_compat())
    # File locations in the reasons, relative to the checkout.
    text = plan.model_dump_json(indent=2).replace(f"{REPO}/", "") + "\n"
    # Compared as tests/unit/test_plan.py check_golden does (UPDATE_GOLDEN=1 rewrites).
    path = GOLDEN / f"plan-driver-{name}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"plan differs from {path}"


# --- the role carries the same branches as the plan -----------------------------------------

def test_role_branch_tables_equal_the_plans() -> None:
    role: dict[tuple[str, str, str], list[str]] = {}
    for distribution in ("Ubuntu", "Debian", "RedHat"):
        data = yaml.safe_load((ROLE_VARS / f"{distribution}.yml").read_text(encoding="utf-8"))
        for source, versions in data["_nvidia_driver_branches"].items():
            for version, branches in versions.items():
                role[(distribution, source, version)] = branches
    plan = {(row.distribution, row.source, row.version): [str(b) for b in row.branches]
            for row in load_driver_table().branches}
    assert role == plan
