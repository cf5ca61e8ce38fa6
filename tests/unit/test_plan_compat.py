"""A GPU host whose NVIDIA driver the fleet knows (gpu.driver): the plan takes the vLLM
release and torch build from compat.decide(), the same decision `orchestrate compat` prints,
and the vLLM flags it emits exist in every release it may choose."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.fleet import load_fleet
from orchestrator.errors import ConfigError, PlanError
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import decide, load_cuda_compat
from orchestrator.plan.planner import HostPlan, make_plan

FLEET = """\
groups:
  g:
    gpu: {{name: {gpu}, count: 1}}
    hosts:
      h1:
        address: 10.0.0.1
        gpu: {{driver: {driver}}}
deployments:
  - name: qwen7b
    model: Qwen/Qwen2.5-7B-Instruct
    engine: vllm
    hosts: g
    port: 8000
    options: {{max_model_len: 8192, open: true}}
"""


def _host(path: Path) -> HostPlan:
    return make_plan(load_fleet(path), "g", load_knowledge(), load_cuda_compat()).hosts[0]


def test_driver_535_gets_the_newest_vllm_it_runs_with_the_reason(write) -> None:
    path = write("fleet.yml", FLEET.format(gpu="NVIDIA A10", driver='"535.104.05"'))
    host = _host(path)
    assert host.vars["vllm_requirement"] == "vllm==0.7.3"
    assert host.vars["pytorch_requirement"] == "torch==2.5.1+cu121"
    assert host.vars["pytorch_index_url"] == "https://download.pytorch.org/whl/cu121"
    # The drivers stage checks the host against the chosen build, not the pin's.
    assert host.vars["gpu_check_min_driver"] == "530.30.02"
    assert host.reasons[0] == ("profile gpu: vllm==0.7.3 with torch==2.5.1+cu121 from "
                               "https://download.pytorch.org/whl/cu121")
    assert host.reasons[1] == (
        "vLLM 0.7.3 and torch cu121 chosen for NVIDIA driver 535.104.05 (declared in "
        f"{path}:7 (groups.g.hosts.h1.gpu.driver); `orchestrate compat` shows the same):")
    decision = decide("535.104.05", "8.6", load_cuda_compat())
    assert host.reasons[2:2 + len(decision.reasons)] == [f"  {r}" for r in decision.reasons]
    assert ("  not vLLM 0.32.0 (torch 2.13.0, built for cu130): needs driver >= 580.65.06 "
            "(R580)") in host.reasons
    assert any(r.startswith("qwen7b: fits 1x NVIDIA A10") for r in host.reasons)


@pytest.mark.parametrize(("driver", "vllm", "torch"), [
    ('"550.54.14"', "vllm==0.8.5.post1", "torch==2.6.0+cu124"),
    ('"570.124.06"', "vllm==0.11.0", "torch==2.8.0+cu128"),
    ('"580.95.05"', "vllm==0.32.0", "torch==2.13.0+cu130"),
])
def test_plan_follows_the_decision_per_driver_branch(write, driver: str, vllm: str,
                                                     torch: str) -> None:
    host = _host(write("fleet.yml", FLEET.format(gpu="NVIDIA A10", driver=driver)))
    assert (host.vars["vllm_requirement"], host.vars["pytorch_requirement"]) == (vllm, torch)


def test_volta_on_r580_gets_the_newest_release_that_still_supports_it(write) -> None:
    # vLLM 0.32.0 needs compute capability 7.5; 0.11.0 runs on 7.0, and fit planning uses
    # the chosen release's floor, so the V100 is planned rather than refused.
    host = _host(write("fleet.yml", FLEET.format(gpu="Tesla V100-SXM2-32GB",
                                                 driver='"580.95.05"')))
    assert host.vars["vllm_requirement"] == "vllm==0.11.0"
    assert ("  not vLLM 0.32.0 (torch 2.13.0, built for cu130): GPU compute capability 7.0 is "
            "below vLLM 0.32.0's minimum 7.5") in host.reasons
    assert any(r.startswith("qwen7b: fits 1x Tesla V100") for r in host.reasons)


def test_driver_too_old_for_every_release_is_refused_naming_the_key(write) -> None:
    path = write("fleet.yml", FLEET.format(gpu="NVIDIA A10", driver='"470.82.01"'))
    with pytest.raises(PlanError) as caught:
        _host(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:7: groups.g.hosts.h1.gpu.driver: host 'h1': no "
                              "supported combination for NVIDIA driver 470.82.01 (CUDA <= 11.4)")
    assert "install the R530 driver branch or newer" in message
    assert caught.value.exit_code == 2


def test_unknown_driver_keeps_the_pin_and_says_so(write) -> None:
    text = FLEET.format(gpu="NVIDIA A10", driver='"x"').replace(
        "        gpu: {driver: \"x\"}\n", "")
    host = _host(write("fleet.yml", text))
    assert host.vars["vllm_requirement"] == "vllm==0.32.0"
    assert host.vars["pytorch_requirement"] == "torch==2.13.0+cu130"
    assert host.reasons[1].startswith("NVIDIA driver not given (gpu.driver): planned the pinned "
                                      "vLLM 0.32.0")


@pytest.mark.parametrize("driver", ["570.26", "535", '"535.x.05"', '"latest"', "true"])
def test_unreadable_driver_names_file_line_and_key(write, driver: str) -> None:
    path = write("fleet.yml", FLEET.format(gpu="NVIDIA A10", driver=driver))
    with pytest.raises(ConfigError) as caught:
        load_fleet(path)
    assert (caught.value.file, caught.value.line, caught.value.key) == (
        str(path), 7, "groups.g.hosts.h1.gpu.driver")
    assert "expected an NVIDIA driver version as a quoted string" in str(caught.value)


OPTIONS = """\
    options:
      max_model_len: 8192
      gpu_memory_utilization: 0.85
      tensor_parallel_size: 1
      pipeline_parallel_size: 1
      dtype: bfloat16
      quantization: fp8
      enforce_eager: true
      tool_calling: true
      prefix_caching: {caching}
      open: true
"""


@pytest.mark.parametrize("caching", ["true", "false"])
def test_every_flag_the_plan_emits_exists_in_every_release_it_may_choose(write,
                                                                        caching: str) -> None:
    # Every option set, so that each flag _vllm_args can emit is on the command line.
    text = FLEET.format(gpu="NVIDIA H100 80GB HBM3", driver='"580.95.05"').replace(
        "    options: {max_model_len: 8192, open: true}\n", OPTIONS.format(caching=caching))
    args = _host(write("fleet.yml", text)).vars["vllm_deployments"][0]["args"]
    flags = {a for a in args if a.startswith("--")}
    assert {"--enable-auto-tool-choice", "--enforce-eager", "--quantization"} <= flags
    for version, row in load_cuda_compat().cuda.vllm.releases.items():
        assert row.cli_flags is not None, f"vLLM {version}: no cli_flags recorded"
        missing = flags - set(row.cli_flags)
        assert not missing, f"vLLM {version} has no {sorted(missing)} (cuda_compat.yml)"
