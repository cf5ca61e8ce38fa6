"""The fleet's `driver:` settings: whether the toolkit installs the NVIDIA driver, and which
branch the plan gives the nvidia_driver role (the lowest that runs the planned torch build)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.compat import load_cuda_compat, lowest_driver_branch
from orchestrator.config import load_fleet
from orchestrator.errors import ConfigError, PlanError
from orchestrator.knowledge import load_knowledge
from orchestrator.plan import HostPlan, make_plan

REPO = Path(__file__).resolve().parents[2]

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
        driver: {branch: "590", open_kernel_modules: true}
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
    # torch 2.13.0+cu130 (vLLM 0.32.0's only build) needs CUDA 13.0: R580.
    assert _driver_vars(h1) == {"nvidia_driver_manage": True, "nvidia_driver_branch": "580"}
    reason = next(r for r in h1.reasons if r.startswith("NVIDIA driver branch"))
    assert "580" in reason and "CUDA 13.0" in reason and "580.65.06" in reason


def test_host_setting_wins_and_the_reason_names_its_key(write) -> None:
    h2 = _plan(write("fleet.yml", FLEET))["h2"]
    assert _driver_vars(h2) == {"nvidia_driver_manage": True, "nvidia_driver_branch": "590",
                                "nvidia_driver_open_kernel_modules": True}
    assert any(re.search(r"branch 590 .*fleet\.yml:10: groups\.g\.hosts\.h2\.driver\.branch", r)
               for r in h2.reasons), h2.reasons


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


def test_branch_below_the_torch_builds_driver_is_refused_naming_the_key(write) -> None:
    fleet = write("fleet.yml", FLEET.replace("gpu: {name: NVIDIA A10, count: 1}\n",
                                             "gpu: {name: NVIDIA A10, count: 1}\n"
                                             "    driver: {branch: 535, source: distro}\n"))
    with pytest.raises(PlanError) as info:
        _plan(fleet)
    message = str(info.value)
    assert re.search(r"fleet\.yml:6: groups\.g\.driver\.branch: driver branch 535 cannot run "
                     r"torch 2\.13\.0\+cu130", message), message
    assert "580.65.06" in message and "branch 580 or newer" in message


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
