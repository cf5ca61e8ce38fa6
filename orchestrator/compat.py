"""GPU compatibility: which torch CUDA build (and wheel index) a host with a given NVIDIA
driver and GPU can run under the project's pinned vLLM, or why none.

The knowledge is data (data/cuda_compat.yml, every block with its source); this module
only models it, loads it, and decides. decide() is pure: no files, no commands.

The rule (stated and cited at the top of the data file): a torch CUDA wheel bundles its
CUDA runtime, so the host driver must be at least NVIDIA's "Toolkit Driver Version" for
the wheel's CUDA major.minor; and the torch build must be one the pinned vLLM release is
compiled for, since vLLM's kernels link a single CUDA runtime major.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, field_validator

from orchestrator.errors import PlanError
from orchestrator.knowledge import DATA_DIR, Compat, StackProfile

CUDA_COMPAT_PATH = DATA_DIR / "cuda_compat.yml"
STACK_COMPAT_PATH = DATA_DIR / "compat.yml"
GPU_PROFILE = "gpu"

_DRIVER_RE = re.compile(r"\d{1,4}(\.\d{1,4}){1,2}")
_CUDA_RE = re.compile(r"\d{1,2}\.\d{1,2}")
_CC_RE = re.compile(r"\d{1,2}\.\d")


class CompatError(PlanError):
    """No supported driver / CUDA / torch / vLLM combination, or input that cannot be read."""


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the data file ---------------------------------------------------------------------


class Source(_Data):
    url: str
    section: str
    note: str | None = None


class ToolkitDriver(_Data):
    """One row of NVIDIA's "CUDA Toolkit and Corresponding Driver Versions" table."""

    toolkit: str
    cuda: str
    min_driver: str

    @field_validator("cuda")
    @classmethod
    def _cuda_form(cls, value: str) -> str:
        return _checked(_CUDA_RE, value, "CUDA version (major.minor)")

    @field_validator("min_driver")
    @classmethod
    def _driver_form(cls, value: str) -> str:
        return _checked(_DRIVER_RE, value, "driver version")


class MinorVersionRange(_Data):
    cuda_major: int
    min_driver_branch: int
    below_driver_branch: int | None


class MinorVersionCompatibility(_Data):
    source: Source
    ranges: list[MinorVersionRange]


class NvidiaTable(_Data):
    source: Source
    toolkits: list[ToolkitDriver]
    minor_version_compatibility: MinorVersionCompatibility


class TorchBuild(_Data):
    tag: str
    cuda: str
    channel: Literal["stable", "experimental"]
    index_url: str
    arches: list[str] | None = None
    ptx: str | None = None

    @field_validator("cuda")
    @classmethod
    def _cuda_form(cls, value: str) -> str:
        return _checked(_CUDA_RE, value, "CUDA version (major.minor)")


class TorchRelease(_Data):
    builds: list[TorchBuild]
    pypi_default_cuda: str | None = None
    pypi_default_source: Source | None = None
    arches_source: Source | None = None


class PyTorchTable(_Data):
    source: Source
    index_url_source: Source
    releases: dict[str, TorchRelease]


class CudaFloor(_Data):
    min_compute_capability: str
    min_cuda: str


class EngineFloors(_Data):
    cuda_by_compute_capability: list[CudaFloor]
    source: Source


class VllmRelease(_Data):
    torch: str
    cuda_builds: list[str]
    min_compute_capability: str
    source: Source
    floor_source: Source | None = None


class VllmTable(_Data):
    engine_floors: EngineFloors
    releases: dict[str, VllmRelease]


class CudaCompat(_Data):
    """data/cuda_compat.yml."""

    schema_version: int
    nvidia: NvidiaTable
    pytorch: PyTorchTable
    vllm: VllmTable


class GpuModel(_Data):
    match: str
    compute_capability: str
    memory_gib: int


class GpuTable(_Data):
    """data/gpus.yml."""

    schema_version: int
    gpus: list[GpuModel]

    def find(self, name: str) -> GpuModel:
        """The first row whose words are all words of `name` (rows go specific to general)."""
        words = set(name.upper().replace("-", " ").split())
        for gpu in self.gpus:
            if set(gpu.match.upper().split()) <= words:
                return gpu
        known = ", ".join(g.match for g in self.gpus)
        raise CompatError(f"GPU '{name}' is not in data/gpus.yml (known: {known}); give "
                          "--compute-capability instead")


def load_gpu_table(path: Path = DATA_DIR / "gpus.yml") -> GpuTable:
    return GpuTable.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


class CompatTable(_Data):
    """What decide() needs: the compatibility data and the project's pinned GPU stack
    (and, for fit planning, the GPU table)."""

    cuda: CudaCompat
    gpu_stack: StackProfile
    gpus: GpuTable | None = None


def load_cuda_compat(path: Path = CUDA_COMPAT_PATH,
                     stack_path: Path = STACK_COMPAT_PATH) -> CompatTable:
    """Load the compatibility data, and the pinned GPU stack from compat.yml's gpu profile."""
    cuda = CudaCompat.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    compat = Compat.model_validate(yaml.safe_load(stack_path.read_text(encoding="utf-8")))
    stack = compat.profiles.get(GPU_PROFILE)
    if stack is None:
        raise CompatError(f"{stack_path}: no '{GPU_PROFILE}' profile to take the pinned vLLM from")
    return CompatTable(cuda=cuda, gpu_stack=stack, gpus=load_gpu_table())


# --- the decision ----------------------------------------------------------------------


class TorchChoice(_Data):
    version: str
    cuda_build: str
    cuda: str
    index_url: str
    min_driver: str

    @property
    def requirement(self) -> str:
        return f"torch=={self.version}+{self.cuda_build}"


class VllmChoice(_Data):
    version: str


class Decision(_Data):
    driver: str
    max_cuda: str
    torch: TorchChoice
    vllm: VllmChoice
    reasons: list[str]


def parse_driver_version(text: str) -> tuple[int, int, int]:
    """'535.104.05' -> (535, 104, 5); two-part versions ('570.26') get a zero patch."""
    value = text.strip() if isinstance(text, str) else ""
    if not _DRIVER_RE.fullmatch(value):
        raise CompatError(f"NVIDIA driver version {text!r} is not readable: expected numbers "
                          "like 535.104.05 or 570.26 (nvidia-smi --query-gpu=driver_version "
                          "--format=csv,noheader)")
    parts = [int(p) for p in value.split(".")]
    return (parts[0], parts[1], parts[2] if len(parts) > 2 else 0)


def parse_compute_capability(text: str) -> tuple[int, int]:
    """'8.6' -> (8, 6)."""
    value = text.strip() if isinstance(text, str) else ""
    if not _CC_RE.fullmatch(value):
        raise CompatError(f"GPU compute capability {text!r} is not readable: expected "
                          "major.minor like 8.6 (nvidia-smi --query-gpu=compute_cap)")
    major, minor = value.split(".")
    return (int(major), int(minor))


def _cuda_key(cuda: str) -> tuple[int, int]:
    major, minor = cuda.split(".")
    return (int(major), int(minor))


def min_driver_for_cuda(cuda: str, cuda_compat: CudaCompat) -> str | None:
    """The lowest driver NVIDIA lists for a CUDA major.minor (its GA row), or None."""
    rows = [r for r in cuda_compat.nvidia.toolkits if r.cuda == cuda]
    if not rows:
        return None
    return min(rows, key=lambda r: parse_driver_version(r.min_driver)).min_driver


def lowest_driver_branch(cuda: str, cuda_compat: CudaCompat) -> int | None:
    """The lowest NVIDIA driver branch (535, 580, ...) NVIDIA lists for a toolkit of this
    CUDA major.minor or newer: the oldest branch a driver install can take to run it."""
    branches = [parse_driver_version(r.min_driver)[0] for r in cuda_compat.nvidia.toolkits
                if _cuda_key(r.cuda) >= _cuda_key(cuda)]
    return min(branches) if branches else None


def max_cuda_for_driver(driver_version: str, cuda_compat: CudaCompat) -> str | None:
    """The newest CUDA major.minor whose toolkit driver the given driver meets, or None."""
    driver = parse_driver_version(driver_version)
    met = [r.cuda for r in cuda_compat.nvidia.toolkits
           if parse_driver_version(r.min_driver) <= driver]
    return max(met, key=_cuda_key) if met else None


def build_runs_on(build: TorchBuild, capability: tuple[int, int]) -> bool | None:
    """Whether a torch build carries code for a GPU: a cubin for X.y runs on X.z with z >= y,
    PTX for X.y is JIT-compiled for any later GPU. None when the build's list is not recorded."""
    if build.arches is None:
        return None
    for arch in build.arches:
        major, minor = parse_compute_capability(arch)
        if capability[0] == major and capability[1] >= minor:
            return True
    return build.ptx is not None and capability >= parse_compute_capability(build.ptx)


def _torch_release(torch_version: str, cuda_compat: CudaCompat) -> TorchRelease | None:
    minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    return cuda_compat.pytorch.releases.get(minor)


def _branch(driver: str) -> str:
    return f"R{driver.split('.')[0]}"


def decide(driver_version: str, gpu_compute_capability: str | None,
           table: CompatTable) -> Decision:
    """Pick the torch CUDA build for the pinned vLLM on a host, or raise CompatError.

    Takes the project's pinned vLLM (the gpu profile) and the torch it pins, then the newest
    CUDA build of that torch release that the vLLM release is built for, the driver runs,
    and (when given) the GPU's compute capability is compiled for.
    """
    driver = parse_driver_version(driver_version)
    capability = (parse_compute_capability(gpu_compute_capability)
                  if gpu_compute_capability is not None else None)
    data = table.cuda
    vllm_version = table.gpu_stack.vllm_version
    vllm = data.vllm.releases.get(vllm_version)
    if vllm is None:
        raise CompatError(f"vLLM {vllm_version} (the gpu profile's pin) has no row in "
                          "cuda_compat.yml: add its torch pin and CUDA builds with a source")
    if vllm.torch != table.gpu_stack.torch_version:
        raise CompatError(f"the gpu profile pins torch {table.gpu_stack.torch_version} but "
                          f"vLLM {vllm_version} requires torch=={vllm.torch}")
    release = _torch_release(vllm.torch, data)
    if release is None:
        raise CompatError(f"torch {vllm.torch} (pinned by vLLM {vllm_version}) has no row in "
                          "cuda_compat.yml's PyTorch table")

    max_cuda = max_cuda_for_driver(driver_version, data)
    newest = max((r.cuda for r in data.nvidia.toolkits), key=_cuda_key)
    shown = driver_version.strip()
    if max_cuda is None:
        driver_reason = f"NVIDIA driver {shown} is older than every CUDA 11+ toolkit's driver"
    elif max_cuda == newest:
        driver_reason = (f"NVIDIA driver {shown} runs CUDA {max_cuda}, the newest toolkit in "
                         "NVIDIA's table (newer toolkits are not recorded)")
    else:
        driver_reason = f"NVIDIA driver {shown} runs CUDA up to {max_cuda}"
    reasons = [driver_reason,
               f"vLLM {vllm_version} (project pin) requires torch=={vllm.torch} and is built "
               f"for {', '.join(vllm.cuda_builds)}"]

    if capability is not None:
        floor = parse_compute_capability(vllm.min_compute_capability)
        if capability < floor:
            raise CompatError(f"GPU compute capability {gpu_compute_capability} is below vLLM "
                              f"{vllm_version}'s minimum {vllm.min_compute_capability}: "
                              "this GPU cannot serve with the pinned vLLM")
        reasons.append(f"compute capability {gpu_compute_capability} meets vLLM "
                       f"{vllm_version}'s minimum {vllm.min_compute_capability}")
    else:
        reasons.append("GPU compute capability unknown: architectures not checked")

    eligible: list[tuple[TorchBuild, str]] = []
    rejected: list[str] = []
    needed: list[str] = []
    for build in sorted(release.builds, key=lambda b: _cuda_key(b.cuda)):
        need = min_driver_for_cuda(build.cuda, data)
        label = f"{build.tag} ({build.channel})"
        if build.tag not in vllm.cuda_builds:
            rejected.append(f"{label}: vLLM {vllm_version} publishes no wheel for it")
            continue
        if need is None:
            rejected.append(f"{label}: CUDA {build.cuda} is not in NVIDIA's driver table")
            continue
        if capability is not None:
            runs = build_runs_on(build, capability)
            if runs is False:
                rejected.append(f"{label}: has no kernels for compute capability "
                                f"{gpu_compute_capability}")
                continue
            floors = [f for f in data.vllm.engine_floors.cuda_by_compute_capability
                      if capability >= parse_compute_capability(f.min_compute_capability)
                      and _cuda_key(build.cuda) < _cuda_key(f.min_cuda)]
            if floors:
                rejected.append(f"{label}: compute capability {gpu_compute_capability} needs "
                                f"CUDA >= {floors[0].min_cuda}")
                continue
        needed.append(need)
        if driver < parse_driver_version(need):
            rejected.append(f"{label}: needs driver >= {need} ({_branch(need)})")
            continue
        eligible.append((build, need))

    if not eligible:
        detail = "; ".join(rejected)
        if needed:
            lowest = min(needed, key=parse_driver_version)
            raise CompatError(
                f"no supported combination for NVIDIA driver {shown}"
                + (f" (CUDA <= {max_cuda})" if max_cuda else "")
                + f": vLLM {vllm_version} with torch {vllm.torch} needs driver >= {lowest}; "
                f"install the {_branch(lowest)} driver branch or newer ({detail})")
        raise CompatError(f"no torch {vllm.torch} CUDA build can serve vLLM {vllm_version} on "
                          f"this GPU ({detail})")

    build, need = max(eligible, key=lambda pair: _cuda_key(pair[0].cuda))
    assert max_cuda is not None  # the driver meets `need`, a row of NVIDIA's table
    reasons.extend(f"not {line}" for line in rejected)
    reasons.append(f"torch {vllm.torch}+{build.tag}: the newest build both vLLM and the driver "
                   f"support (CUDA {build.cuda} needs driver >= {need}), from {build.index_url}"
                   + (" [experimental PyTorch build]" if build.channel == "experimental" else ""))
    return Decision(
        driver=shown,
        max_cuda=max_cuda,
        torch=TorchChoice(version=vllm.torch, cuda_build=build.tag, cuda=build.cuda,
                          index_url=build.index_url, min_driver=need),
        vllm=VllmChoice(version=vllm_version),
        reasons=reasons)


def least_demanding_build(table: CompatTable) -> TorchChoice:
    """The torch build to plan for a host whose driver is not known yet: of the builds the
    pinned vLLM is made for, the one needing the oldest driver. The host's drivers stage
    then checks its driver against `min_driver` before anything is installed."""
    vllm = table.cuda.vllm.releases.get(table.gpu_stack.vllm_version)
    release = _torch_release(table.gpu_stack.torch_version, table.cuda)
    if vllm is None or release is None:
        raise CompatError(f"vLLM {table.gpu_stack.vllm_version} / torch "
                          f"{table.gpu_stack.torch_version} (the gpu profile's pins) have no "
                          "rows in cuda_compat.yml")
    candidates = [(b, min_driver_for_cuda(b.cuda, table.cuda)) for b in release.builds
                  if b.tag in vllm.cuda_builds]
    known = [(b, need) for b, need in candidates if need is not None]
    if not known:
        raise CompatError(f"no CUDA build of torch {table.gpu_stack.torch_version} fits vLLM "
                          f"{table.gpu_stack.vllm_version} in cuda_compat.yml")
    build, need = min(known, key=lambda pair: parse_driver_version(pair[1]))
    return TorchChoice(version=table.gpu_stack.torch_version, cuda_build=build.tag,
                       cuda=build.cuda, index_url=build.index_url, min_driver=need)


def _checked(pattern: re.Pattern[str], value: str, what: str) -> str:
    if not pattern.fullmatch(value):
        raise ValueError(f"{value!r} is not a {what}")
    return value
