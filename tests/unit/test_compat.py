"""GPU compatibility data (data/cuda_compat.yml) and the decision made from it.

Published values are checked literally, each against the source it was read from:
- NVIDIA: CUDA Toolkit 13.2 Update 2 release notes, 2.2 CUDA Driver, Table 3 "CUDA Toolkit
  and Corresponding Driver Versions", Linux x86_64 column
  (https://docs.nvidia.com/cuda/archive/13.2.2/cuda-toolkit-release-notes/index.html).
- PyTorch: RELEASE.md "Release Compatibility Matrix" (pytorch/pytorch; the 2.13 row as added
  by pytorch/pytorch PR #187075).
- vLLM 0.32.0: the PyPI wheel's METADATA ("Requires-Dist: torch==2.13.0"), its _C library
  (libcudart.so.13, nvcc 13.0) and vLLM's GPU install docs ("compute capability 7.5 or higher").
- vLLM 0.11.0, 0.8.5.post1, 0.7.3: each PyPI wheel's METADATA (torch 2.8.0, 2.6.0, 2.5.1), its
  kernels (nvcc 12.8; PTX ISA 8.4 and 8.1, i.e. CUDA 12.4 and 12.1; cubins from sm_70) and the
  install docs of its era ("compiled with CUDA 12.8 / 12.4 / 12.1", "compute capability 7.0").
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest

from orchestrator.errors import PlanError
from orchestrator.facts.nvidia_smi import parse_nvidia_smi
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import (
    CompatError,
    CompatTable,
    CudaCompat,
    Decision,
    VllmRelease,
    build_runs_on,
    decide,
    least_demanding_build,
    load_cuda_compat,
    load_gpu_table,
    max_cuda_for_driver,
    min_driver_for_cuda,
    parse_compute_capability,
    parse_driver_version,
)


@pytest.fixture(scope="module")
def table() -> CompatTable:
    return load_cuda_compat()


@pytest.fixture(scope="module")
def data(table: CompatTable) -> CudaCompat:
    return table.cuda


def _key(cuda: str) -> tuple[int, int]:
    major, minor = cuda.split(".")
    return (int(major), int(minor))


# --- NVIDIA: driver -> CUDA ------------------------------------------------------------

# (toolkit row, Linux x86_64 driver) as printed in NVIDIA's Table 3 (source: module docstring).
PUBLISHED_ROWS = [
    ("CUDA 11.4.0 GA", "470.42.01"),
    ("CUDA 11.8 GA", "520.61.05"),
    ("CUDA 12.0 GA", "525.60.13"),
    ("CUDA 12.2 GA", "535.54.03"),
    ("CUDA 12.2 Update 2", "535.104.05"),
    ("CUDA 12.4 GA", "550.54.14"),
    ("CUDA 12.6 GA", "560.28.03"),
    ("CUDA 12.8 GA", "570.26"),
    ("CUDA 12.9 GA", "575.51.03"),
    ("CUDA 13.0 GA", "580.65.06"),
    ("CUDA 13.1 GA", "590.44.01"),
    ("CUDA 13.2 GA", "595.45.04"),
]


@pytest.mark.parametrize(("toolkit", "driver"), PUBLISHED_ROWS)
def test_nvidia_rows_match_the_release_notes(data: CudaCompat, toolkit: str,
                                             driver: str) -> None:
    rows = {r.toolkit: r.min_driver for r in data.nvidia.toolkits}
    assert rows[toolkit] == driver


def test_nvidia_table_covers_every_cuda_11_12_13_minor_it_lists(data: CudaCompat) -> None:
    minors = {r.cuda for r in data.nvidia.toolkits}
    assert minors == {"11.0", "11.1", "11.2", "11.3", "11.4", "11.5", "11.6", "11.7", "11.8",
                      "12.0", "12.1", "12.2", "12.3", "12.4", "12.5", "12.6", "12.8", "12.9",
                      "13.0", "13.1", "13.2"}  # NVIDIA published no 12.7
    assert len(data.nvidia.toolkits) == 53


def test_nvidia_rows_are_toolkit_names_matching_their_cuda(data: CudaCompat) -> None:
    for row in data.nvidia.toolkits:
        assert row.toolkit.startswith(f"CUDA {row.cuda}"), row


def test_newer_cuda_never_needs_an_older_driver(data: CudaCompat) -> None:
    rows = sorted(data.nvidia.toolkits,
                  key=lambda r: (_key(r.cuda), parse_driver_version(r.min_driver)))
    for older, newer in pairwise(rows):
        assert parse_driver_version(older.min_driver) <= parse_driver_version(newer.min_driver), (
            older, newer)


def test_rows_are_in_source_order_newest_first(data: CudaCompat) -> None:
    drivers = [parse_driver_version(r.min_driver) for r in data.nvidia.toolkits]
    assert drivers == sorted(drivers, reverse=True)


def test_minor_version_compatibility_ranges_as_published(data: CudaCompat) -> None:
    ranges = {r.cuda_major: (r.min_driver_branch, r.below_driver_branch)
              for r in data.nvidia.minor_version_compatibility.ranges}
    assert ranges == {13: (580, None), 12: (525, 580), 11: (450, 525)}


@pytest.mark.parametrize(("cuda", "driver"), [
    ("12.6", "560.28.03"), ("13.0", "580.65.06"), ("13.2", "595.45.04"), ("11.4", "470.42.01"),
    ("12.1", "530.30.02"), ("12.7", None)])
def test_min_driver_is_the_ga_row(data: CudaCompat, cuda: str, driver: str | None) -> None:
    assert min_driver_for_cuda(cuda, data) == driver


@pytest.mark.parametrize(("driver", "cuda"), [
    ("440.33", None),
    ("470.82.01", "11.4"),
    ("515.65.01", "11.7"),
    ("525.147.05", "12.0"),
    ("535.54.02", "12.1"),
    ("535.54.03", "12.2"),
    ("535.104.05", "12.2"),
    ("545.23.08", "12.3"),
    ("550.54.15", "12.4"),
    ("555.42.06", "12.5"),
    ("560.35.03", "12.6"),
    ("565.57.01", "12.6"),
    ("570.26", "12.8"),
    ("575.57.08", "12.9"),
    ("580.65.06", "13.0"),
    ("590.48.01", "13.1"),
    ("610.43.02", "13.2"),
])
def test_max_cuda_for_driver(data: CudaCompat, driver: str, cuda: str | None) -> None:
    assert max_cuda_for_driver(driver, data) == cuda


def test_driver_versions_compare_numerically() -> None:
    assert parse_driver_version("535.104.05") > parse_driver_version("535.54.03")
    assert parse_driver_version("580.9") < parse_driver_version("580.65.06")
    assert parse_driver_version("570.26") == parse_driver_version("570.26.00")
    assert parse_driver_version(" 550.54.15\n") == (550, 54, 15)


@pytest.mark.parametrize("text", ["", "abc", "535", "535.", "535..05", "535.x.05", "v535.54.03",
                                  "535.104.05.1", "-535.54", "N/A", "[N/A]", "535,104"])
def test_unreadable_driver_versions_are_refused_clearly(text: str) -> None:
    with pytest.raises(CompatError, match=r"is not readable: expected numbers like 535\.104\.05"):
        parse_driver_version(text)


# --- PyTorch: release -> CUDA builds ----------------------------------------------------


def test_every_torch_build_has_an_index_url_of_the_right_form(data: CudaCompat) -> None:
    for version, release in data.pytorch.releases.items():
        assert release.builds, version
        for build in release.builds:
            assert build.tag == "cu" + build.cuda.replace(".", ""), (version, build)
            assert build.index_url == f"https://download.pytorch.org/whl/{build.tag}"
            assert min_driver_for_cuda(build.cuda, data) is not None, (version, build)


def test_torch_releases_2_1_through_2_14(data: CudaCompat) -> None:
    assert set(data.pytorch.releases) == {f"2.{n}" for n in range(1, 15)}


# Release Compatibility Matrix, RELEASE.md (source: module docstring).
PUBLISHED_BUILDS = {
    "2.1": {"cu118": "stable", "cu121": "experimental"},
    "2.4": {"cu118": "stable", "cu121": "stable", "cu124": "experimental"},
    "2.6": {"cu118": "stable", "cu124": "stable", "cu126": "experimental"},
    "2.7": {"cu118": "stable", "cu126": "stable", "cu128": "experimental"},
    "2.8": {"cu126": "stable", "cu128": "stable", "cu129": "experimental"},
    "2.9": {"cu126": "stable", "cu128": "stable", "cu130": "experimental"},
    "2.11": {"cu126": "stable", "cu128": "stable", "cu130": "stable"},
    "2.13": {"cu126": "stable", "cu130": "stable", "cu132": "experimental"},
    "2.14": {"cu126": "stable", "cu130": "stable", "cu132": "stable"},
}


@pytest.mark.parametrize("version", sorted(PUBLISHED_BUILDS))
def test_torch_builds_match_release_md(data: CudaCompat, version: str) -> None:
    builds = {b.tag: b.channel for b in data.pytorch.releases[version].builds}
    assert builds == PUBLISHED_BUILDS[version]


def test_torch_2_13_pypi_default_is_the_cuda_13_0_build(data: CudaCompat) -> None:
    assert data.pytorch.releases["2.13"].pypi_default_cuda == "13.0"


@pytest.mark.parametrize(("tag", "capability", "runs"), [
    ("cu126", "7.0", True), ("cu126", "8.9", True), ("cu126", "9.0", True),
    ("cu126", "10.0", False), ("cu126", "12.0", False),
    ("cu130", "7.0", False), ("cu130", "7.5", True), ("cu130", "8.9", True),
    ("cu130", "10.3", True), ("cu130", "12.1", True), ("cu130", "6.1", False),
])
def test_torch_2_13_architectures(data: CudaCompat, tag: str, capability: str,
                                  runs: bool) -> None:
    build = next(b for b in data.pytorch.releases["2.13"].builds if b.tag == tag)
    assert build_runs_on(build, parse_compute_capability(capability)) is runs


# --- vLLM: release -> torch pin, engine floors ------------------------------------------


def test_vllm_0_32_0_row(data: CudaCompat) -> None:
    row = data.vllm.releases["0.32.0"]
    assert row.torch == "2.13.0"
    assert row.cuda_builds == ["cu130"]
    assert row.min_compute_capability == "7.5"


# vLLM release -> (torch pin, CUDA build of its PyPI wheel, compute-capability floor), as read
# from each wheel's METADATA and kernels and the install docs of its era (cuda_compat.yml).
PUBLISHED_VLLM = {
    "0.32.0": ("2.13.0", ["cu130"], "7.5"),
    "0.11.0": ("2.8.0", ["cu128"], "7.0"),
    "0.8.5.post1": ("2.6.0", ["cu124"], "7.0"),
    "0.7.3": ("2.5.1", ["cu121"], "7.0"),
}


@pytest.mark.parametrize("version", sorted(PUBLISHED_VLLM))
def test_vllm_rows_as_published(data: CudaCompat, version: str) -> None:
    row = data.vllm.releases[version]
    assert (row.torch, row.cuda_builds, row.min_compute_capability) == PUBLISHED_VLLM[version]
    assert row.floor_source is not None
    release = data.pytorch.releases[".".join(row.torch.split(".")[:2])]
    assert set(row.cuda_builds) <= {b.tag for b in release.builds}


def test_vllm_rows_are_newest_first(data: CudaCompat) -> None:
    assert list(data.vllm.releases) == ["0.32.0", "0.11.0", "0.8.5.post1", "0.7.3"]


def test_every_block_names_its_source(data: CudaCompat) -> None:
    sources = [data.nvidia.source, data.nvidia.minor_version_compatibility.source,
               data.pytorch.source, data.pytorch.index_url_source, data.vllm.engine_floors.source,
               *(r.source for r in data.vllm.releases.values()),
               *(r.floor_source for r in data.vllm.releases.values() if r.floor_source)]
    sources += [s for r in data.pytorch.releases.values()
                for s in (r.arches_source, r.pypi_default_source) if s is not None]
    for source in sources:
        assert source.url.startswith("https://") and source.section.strip()


def test_the_pin_is_read_from_the_gpu_profile(table: CompatTable) -> None:
    gpu = load_knowledge().compat.profiles["gpu"]
    assert table.gpu_stack == gpu
    assert table.cuda.vllm.releases[gpu.vllm_version].torch == gpu.torch_version


# --- the decision across driver branches ------------------------------------------------

# driver -> (vLLM, torch build) on an H100 (9.0); None: refused (exit 2).
DRIVER_BRANCHES = [
    ("470.82.01", None), ("470.256.02", None),
    ("515.65.01", None), ("525.147.05", None),
    ("530.30.02", ("0.7.3", "cu121")),
    ("535.54.03", ("0.7.3", "cu121")), ("535.104.05", ("0.7.3", "cu121")),
    ("535.261.03", ("0.7.3", "cu121")), ("545.23.08", ("0.7.3", "cu121")),
    ("550.54.14", ("0.8.5.post1", "cu124")), ("550.163.01", ("0.8.5.post1", "cu124")),
    ("555.42.06", ("0.8.5.post1", "cu124")), ("560.35.03", ("0.8.5.post1", "cu124")),
    ("565.57.01", ("0.8.5.post1", "cu124")),
    ("570.26", ("0.11.0", "cu128")), ("570.124.06", ("0.11.0", "cu128")),
    ("570.195.03", ("0.11.0", "cu128")), ("575.57.08", ("0.11.0", "cu128")),
    ("580.9", ("0.11.0", "cu128")), ("580.65.05", ("0.11.0", "cu128")),
    ("580.65.06", ("0.32.0", "cu130")), ("580.82.07", ("0.32.0", "cu130")),
    ("580.95.05", ("0.32.0", "cu130")), ("590.48.01", ("0.32.0", "cu130")),
    ("595.71.05", ("0.32.0", "cu130")), ("610.43.02", ("0.32.0", "cu130")),
]
TORCH_OF = {"0.7.3": "2.5.1", "0.8.5.post1": "2.6.0", "0.11.0": "2.8.0", "0.32.0": "2.13.0"}


@pytest.mark.parametrize(("driver", "expected"), DRIVER_BRANCHES)
def test_decision_for_each_driver_branch(table: CompatTable, driver: str,
                                         expected: tuple[str, str] | None) -> None:
    if expected is None:
        with pytest.raises(CompatError, match=r"vLLM 0\.7\.3 with torch 2\.5\.1 needs driver >= "
                                              r"530\.30\.02; install the R530 driver branch or "
                                              r"newer"):
            decide(driver, "9.0", table)
        return
    vllm, build = expected
    decision = decide(driver, "9.0", table)
    assert (decision.vllm.version, decision.torch.cuda_build) == (vllm, build)
    assert decision.torch.version == TORCH_OF[vllm]
    assert decision.torch.index_url == f"https://download.pytorch.org/whl/{build}"
    assert decision.torch.requirement == f"torch=={TORCH_OF[vllm]}+{build}"
    assert decision.driver == driver
    # The driver runs the chosen build: never a build needing more than the driver has.
    assert parse_driver_version(decision.torch.min_driver) <= parse_driver_version(driver)


def test_issue_example_driver_535(table: CompatTable) -> None:
    decision = decide("535.104.05", None, table)
    assert decision.max_cuda == "12.2"
    assert (decision.vllm.version, decision.torch.cuda_build) == ("0.7.3", "cu121")
    assert decision.reasons[:5] == [
        "NVIDIA driver 535.104.05 runs CUDA up to 12.2",
        "not vLLM 0.32.0 (torch 2.13.0, built for cu130): needs driver >= 580.65.06 (R580)",
        "not vLLM 0.11.0 (torch 2.8.0, built for cu128): needs driver >= 570.26 (R570)",
        "not vLLM 0.8.5.post1 (torch 2.6.0, built for cu124): needs driver >= 550.54.14 (R550)",
        "vLLM 0.7.3 (the newest release in cuda_compat.yml this host runs; the project pin is "
        "0.32.0) requires torch==2.5.1 and is built for cu121"]
    assert "NVIDIA driver >= 580.65.06 (R580) would get the project pin, vLLM 0.32.0" in (
        decision.reasons)
    assert decision.reasons[-1].startswith("torch 2.5.1+cu121: the newest build")


def test_the_pin_on_r580_names_no_skipped_release(table: CompatTable) -> None:
    decision = decide("580.95.05", "9.0", table)
    assert decision.reasons[1] == ("vLLM 0.32.0 (project pin) requires torch==2.13.0 and is "
                                   "built for cu130")
    assert not any(r.startswith("not vLLM") for r in decision.reasons)


def test_refusal_names_the_driver_what_it_runs_and_why(table: CompatTable) -> None:
    with pytest.raises(CompatError) as caught:
        decide("470.82.01", None, table)
    message = str(caught.value)
    assert "NVIDIA driver 470.82.01 (CUDA <= 11.4)" in message
    assert "vLLM 0.32.0: needs driver >= 580.65.06 (R580)" in message
    assert "vLLM 0.8.5.post1: needs driver >= 550.54.14 (R550)" in message
    assert isinstance(caught.value, PlanError) and caught.value.exit_code == 2


def test_decision_reports_max_cuda_and_reasons(table: CompatTable) -> None:
    decision = decide("610.43.02", "12.0", table)
    assert decision.max_cuda == "13.2"
    assert decision.reasons[0].startswith("NVIDIA driver 610.43.02 runs CUDA 13.2, the newest")
    assert any("requires torch==2.13.0 and is built for cu130" in r for r in decision.reasons)
    assert decision.reasons[-1].startswith("torch 2.13.0+cu130: the newest build")
    assert decide("580.82.07", None, table).max_cuda == "13.0"


@pytest.mark.parametrize("capability", ["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "10.3",
                                        "12.0", "12.1"])
def test_supported_gpus(table: CompatTable, capability: str) -> None:
    assert decide("580.95.05", capability, table).torch.cuda_build == "cu130"


def test_volta_falls_back_to_the_newest_release_that_supports_it(table: CompatTable) -> None:
    decision = decide("580.95.05", "7.0", table)
    assert (decision.vllm.version, decision.torch.cuda_build) == ("0.11.0", "cu128")
    assert ("not vLLM 0.32.0 (torch 2.13.0, built for cu130): GPU compute capability 7.0 is "
            "below vLLM 0.32.0's minimum 7.5") in decision.reasons
    assert "compute capability 7.0 meets vLLM 0.11.0's minimum 7.0" in decision.reasons


def test_blackwell_on_r570_gets_the_cuda_12_8_release(table: CompatTable) -> None:
    decision = decide("570.124.06", "10.0", table)
    assert (decision.vllm.version, decision.torch.cuda_build) == ("0.11.0", "cu128")
    # Below R570 no listed release has a build new enough for Blackwell.
    with pytest.raises(CompatError, match=r"compute capability 10\.0 needs CUDA >= 12\.8"):
        decide("560.35.03", "10.0", table)


@pytest.mark.parametrize("capability", ["6.1", "5.2"])
def test_gpus_below_every_vllm_floor_are_refused(table: CompatTable, capability: str) -> None:
    with pytest.raises(CompatError, match=f"GPU compute capability {capability} is below the "
                                          "minimum of every vLLM release") as caught:
        decide("580.95.05", capability, table)
    assert f"vLLM 0.7.3: GPU compute capability {capability} is below vLLM 0.7.3's minimum " \
        "7.0" in str(caught.value)


@pytest.mark.parametrize("capability", ["", "8", "8.6.1", "sm_86", "eight"])
def test_unreadable_compute_capability(table: CompatTable, capability: str) -> None:
    with pytest.raises(CompatError, match=r"compute capability .* is not readable"):
        decide("580.95.05", capability, table)


def test_unreadable_driver_in_decide(table: CompatTable) -> None:
    with pytest.raises(CompatError, match="'unknown' is not readable"):
        decide("unknown", "9.0", table)


# --- the selection logic on a synthetic vLLM row that has every torch 2.13 build ---------


def _with_vllm(table: CompatTable, builds: list[str], floor: str = "7.0") -> CompatTable:
    row = VllmRelease(torch="2.13.0", cuda_builds=builds, min_compute_capability=floor,
                      source=table.cuda.vllm.releases["0.32.0"].source)
    vllm = table.cuda.vllm.model_copy(update={"releases": {"9.9.9": row}})
    cuda = table.cuda.model_copy(update={"vllm": vllm})
    stack = table.gpu_stack.model_copy(update={"vllm_version": "9.9.9"})
    return CompatTable(cuda=cuda, gpu_stack=stack)


@pytest.mark.parametrize(("driver", "build"), [
    ("560.28.03", "cu126"), ("575.57.08", "cu126"), ("580.65.06", "cu130"),
    ("590.48.01", "cu130"), ("595.45.04", "cu132"), ("610.43.02", "cu132"),
])
def test_newest_build_the_driver_supports(table: CompatTable, driver: str, build: str) -> None:
    decision = decide(driver, None, _with_vllm(table, ["cu126", "cu130", "cu132"]))
    assert decision.torch.cuda_build == build
    if build == "cu132":
        assert "[experimental PyTorch build]" in decision.reasons[-1]


def test_driver_older_than_every_build_names_the_lowest_branch(table: CompatTable) -> None:
    with pytest.raises(CompatError, match=r"needs driver >= 560\.28\.03; install the R560"):
        decide("555.42.06", None, _with_vllm(table, ["cu126", "cu130", "cu132"]))


def test_volta_only_has_the_cuda_12_build(table: CompatTable) -> None:
    synthetic = _with_vllm(table, ["cu126", "cu130"])
    assert decide("610.43.02", "7.0", synthetic).torch.cuda_build == "cu126"


def test_blackwell_needs_a_cuda_12_8_or_newer_build(table: CompatTable) -> None:
    synthetic = _with_vllm(table, ["cu126"])
    with pytest.raises(CompatError, match=r"no torch 2\.13\.0 CUDA build can serve"):
        decide("610.43.02", "12.0", synthetic)
    # The CUDA floor alone (a build that did list the architecture) is enforced too.
    cu126 = synthetic.cuda.pytorch.releases["2.13"].builds[0].model_copy(
        update={"arches": None})
    release = synthetic.cuda.pytorch.releases["2.13"].model_copy(update={"builds": [cu126]})
    pytorch = synthetic.cuda.pytorch.model_copy(update={"releases": {"2.13": release}})
    no_arches = synthetic.model_copy(
        update={"cuda": synthetic.cuda.model_copy(update={"pytorch": pytorch})})
    with pytest.raises(CompatError, match=r"compute capability 12\.0 needs CUDA >= 12\.8"):
        decide("610.43.02", "12.0", no_arches)
    assert decide("610.43.02", "9.0", no_arches).torch.cuda_build == "cu126"


def test_unknown_pin_and_mismatched_torch_are_refused(table: CompatTable) -> None:
    unknown = table.model_copy(
        update={"gpu_stack": table.gpu_stack.model_copy(update={"vllm_version": "0.0.1"})})
    with pytest.raises(CompatError, match=r"vLLM 0\.0\.1 .* has no row in cuda_compat\.yml"):
        decide("580.65.06", None, unknown)
    mismatch = table.model_copy(
        update={"gpu_stack": table.gpu_stack.model_copy(update={"torch_version": "2.12.0"})})
    with pytest.raises(CompatError, match=r"pins torch 2\.12\.0 but vLLM 0\.32\.0 requires"):
        decide("580.65.06", None, mismatch)


def test_loader_needs_a_gpu_profile(write: Callable[[str, str], Path]) -> None:
    stack = write("compat.yml", "schema_version: 1\nprofiles: {}\n")
    with pytest.raises(CompatError, match="no 'gpu' profile"):
        load_cuda_compat(stack_path=stack)


def test_decide_is_pure(table: CompatTable) -> None:
    first = decide("580.82.07", "9.0", table)
    assert isinstance(first, Decision)
    assert decide("580.82.07", "9.0", table) == first


def test_data_file_is_package_data() -> None:
    import orchestrator.knowledge

    assert (Path(orchestrator.knowledge.__file__).parent / "data" / "cuda_compat.yml").is_file()


@pytest.mark.parametrize(("name", "capability"), [
    ("Tesla T4", "7.5"), ("NVIDIA A10", "8.6"), ("NVIDIA A10G", "8.6"),
    ("NVIDIA A100-SXM4-80GB", "8.0"), ("NVIDIA A100-PCIE-40GB", "8.0"),
    ("NVIDIA L40S", "8.9"), ("NVIDIA L4", "8.9"), ("NVIDIA H100 80GB HBM3", "9.0"),
    ("NVIDIA H200", "9.0"), ("NVIDIA GeForce RTX 4090", "8.9")])
def test_gpu_names_as_nvidia_smi_prints_them(name: str, capability: str) -> None:
    # Values from NVIDIA's "CUDA GPU Compute Capability" page (data/gpus.yml).
    assert load_gpu_table().find(name).compute_capability == capability


def test_a100_memory_variant_by_name() -> None:
    # memory.total as nvidia-smi reports it (data/gpus.yml), in MiB.
    table = load_gpu_table()
    assert table.find("NVIDIA A100-SXM4-80GB").memory_mib == 81920
    assert table.find("NVIDIA A100-PCIE-40GB").memory_mib == 40536


SMI = Path(__file__).resolve().parents[2] / "tests" / "data" / "nvidia-smi"
# Every GPU name in the real nvidia-smi outputs of tests/data/nvidia-smi, as nvidia-smi
# prints it (truncated names included), and the row it must resolve to.
FIXTURE_NAMES = {
    "Tesla T4": "T4",
    "Tesla V100S-PCIE-32GB": "V100S",
    "NVIDIA A10": "A10",
    "A100-PCIE-40GB": "A100",
    "NVIDIA A100-PCI...": "A100",
    "NVIDIA A100-SXM4-40GB": "A100",
    "NVIDIA H100 80GB HBM3": "H100",
    "NVIDIA H200": "H200",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
}
# Names from the threads data/gpus.yml cites, and the V100 variants nvidia-smi prints.
CITED_NAMES = {
    "Tesla V100-SXM2-16GB": "V100 16GB",
    "Tesla V100-PCIE-16GB": "V100 16GB",
    "Tesla V100-SXM2-32GB": "V100 32GB",
    "Tesla V100-PCIE-32GB": "V100 32GB",
    "Tesla V100-SXM2...": "V100",  # truncated: the smaller variant
    "NVIDIA A10G": "A10G",
    "NVIDIA A30": "A30",
    "NVIDIA A100-SXM4-80GB": "A100 80GB",
    "NVIDIA A100 80GB PCIe": "A100 80GB",
    "NVIDIA L4": "L4",
    "NVIDIA L40": "L40",
    "NVIDIA L40S": "L40S",
    "NVIDIA GeForce RTX 3090": "RTX 3090",
    "NVIDIA GeForce RTX 5090": "RTX 5090",
    "NVIDIA B200": "B200",
}


@pytest.mark.parametrize(("name", "row"), [*FIXTURE_NAMES.items(), *CITED_NAMES.items()])
def test_gpu_table_picks_the_row_of_each_name(name: str, row: str) -> None:
    assert load_gpu_table().find(name).match == row


def test_fixture_names_are_the_ones_nvidia_smi_printed() -> None:
    """FIXTURE_NAMES are read from the outputs in tests/data/nvidia-smi (copies of every shared
    fixture whose GPU the table knows), not typed: each is a name nvidia-smi printed, and no
    name there that the table knows is left out."""
    table = load_gpu_table()
    names = set()
    for path in SMI.glob("*.txt"):
        names |= {gpu.name for gpu in parse_nvidia_smi(path.read_text(encoding="utf-8")).gpus}
    known = set()
    for name in names:
        try:
            table.find(name)
        except CompatError:
            continue
        known.add(name)
    assert known == set(FIXTURE_NAMES)


def test_planned_build_for_an_unknown_driver_asks_least_of_it(table: CompatTable) -> None:
    choice = least_demanding_build(table)
    assert (choice.requirement, choice.min_driver) == ("torch==2.13.0+cu130", "580.65.06")
