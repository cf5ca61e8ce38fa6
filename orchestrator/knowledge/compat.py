"""GPU compatibility: which vLLM release and torch CUDA build (and wheel index) a host with a
given NVIDIA driver and GPU can run: the project's pinned vLLM, else the newest older release
the driver runs, or why none.

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
from typing import Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.errors import PlanError
from orchestrator.knowledge.catalog import DATA_DIR, Compat, StackProfile

CUDA_COMPAT_PATH = DATA_DIR / "cuda_compat.yml"
DRIVER_PATH = DATA_DIR / "nvidia_driver.yml"
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
    # The command-line flags the plan emits that this release's argument parser accepts.
    cli_flags: list[str] | None = None


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
    # memory.total as nvidia-smi reports it, not the datasheet's size.
    memory_mib: int = Field(gt=0)
    # The reading: a file under tests/data/nvidia-smi or the thread that pastes it.
    source: str
    note: str | None = None


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


class OpenRequiredGpu(_Data):
    match: str
    platform: str


class OpenRequired(_Data):
    min_compute_capability: str
    gpus: list[OpenRequiredGpu]
    source: Source


class KernelModules(_Data):
    source: Source
    open_default_from_branch: int
    open_min_compute_capability: str
    open_required: OpenRequired


class SubnetManager(_Data):
    compute_capability_majors: list[int]
    source: Source


class OsBranches(_Data):
    """The driver branches one OS release carries from one package source."""

    os: str
    distribution: str
    version: str
    source: Literal["distro", "cuda"]
    branches: list[int]
    # `from`, a Python keyword, in the data file.
    origin: Source = Field(alias="from")


class DriverTable(_Data):
    """data/nvidia_driver.yml."""

    schema_version: int
    kernel_modules: KernelModules
    nvlink_subnet_manager: SubnetManager
    branches: list[OsBranches]
    default_source: dict[str, Literal["distro", "cuda"]]


def load_driver_table(path: Path = DRIVER_PATH) -> DriverTable:
    return DriverTable.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


class CompatTable(_Data):
    """What decide() needs: the compatibility data and the project's pinned GPU stack
    (and, for fit planning, the GPU table; for driver installs, the driver table)."""

    cuda: CudaCompat
    gpu_stack: StackProfile
    gpus: GpuTable | None = None
    driver: DriverTable | None = None


def load_cuda_compat(path: Path = CUDA_COMPAT_PATH,
                     stack_path: Path = STACK_COMPAT_PATH) -> CompatTable:
    """Load the compatibility data, and the pinned GPU stack from compat.yml's gpu profile."""
    cuda = CudaCompat.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    compat = Compat.model_validate(yaml.safe_load(stack_path.read_text(encoding="utf-8")))
    stack = compat.profiles.get(GPU_PROFILE)
    if stack is None:
        raise CompatError(f"{stack_path}: no '{GPU_PROFILE}' profile to take the pinned vLLM from")
    return CompatTable(cuda=cuda, gpu_stack=stack, gpus=load_gpu_table(),
                       driver=load_driver_table())


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


def torch_build_index(requirement: str, cuda_compat: CudaCompat) -> str | None:
    """The index publishing a CUDA build of torch (`torch==2.13.0+cu130`), from
    cuda_compat.yml; None for a requirement without a build tag listed there."""
    version, _, tag = requirement.removeprefix("torch==").partition("+")
    release = _torch_release(version, cuda_compat)
    builds = release.builds if release is not None else []
    return next((b.index_url for b in builds if tag and b.tag == tag), None)


def _branch(driver: str) -> str:
    return f"R{driver.split('.')[0]}"


def _release_key(version: str) -> tuple[int, ...]:
    """'0.8.5.post1' -> (0, 8, 5, 1): the numbers of a vLLM version, compared in order."""
    return tuple(int(n) for n in re.findall(r"\d+", version))


def _candidates(table: CompatTable) -> list[tuple[str, VllmRelease]]:
    """The vLLM releases a host may get, preferred first: the gpu profile's pin, then the
    older rows of cuda_compat.yml, newest first (rows newer than the pin are not offered)."""
    pin = table.gpu_stack.vllm_version
    row = table.cuda.vllm.releases.get(pin)
    if row is None:
        raise CompatError(f"vLLM {pin} (the gpu profile's pin) has no row in "
                          "cuda_compat.yml: add its torch pin and CUDA builds with a source")
    if row.torch != table.gpu_stack.torch_version:
        raise CompatError(f"the gpu profile pins torch {table.gpu_stack.torch_version} but "
                          f"vLLM {pin} requires torch=={row.torch}")
    older = sorted(((v, r) for v, r in table.cuda.vllm.releases.items()
                    if _release_key(v) < _release_key(pin)),
                   key=lambda pair: _release_key(pair[0]), reverse=True)
    return [(pin, row), *older]


class _ReleaseFit(NamedTuple):
    """How one vLLM release fits a host: its best torch build, or why none."""

    version: str
    row: VllmRelease
    choice: tuple[TorchBuild, str] | None
    rejected: list[str]
    needed: list[str]  # drivers its builds that suit the GPU need
    gpu_refusal: str | None


def _fit_release(version: str, row: VllmRelease, driver: tuple[int, int, int],
                 capability: tuple[int, int] | None, capability_text: str | None,
                 data: CudaCompat) -> _ReleaseFit:
    release = _torch_release(row.torch, data)
    if release is None:
        raise CompatError(f"torch {row.torch} (pinned by vLLM {version}) has no row in "
                          "cuda_compat.yml's PyTorch table")
    if capability is not None and capability < parse_compute_capability(
            row.min_compute_capability):
        return _ReleaseFit(version, row, None, [], [],
                           f"GPU compute capability {capability_text} is below vLLM {version}'s "
                           f"minimum {row.min_compute_capability}")
    eligible: list[tuple[TorchBuild, str]] = []
    rejected: list[str] = []
    needed: list[str] = []
    for build in sorted(release.builds, key=lambda b: _cuda_key(b.cuda)):
        need = min_driver_for_cuda(build.cuda, data)
        label = f"{build.tag} ({build.channel})"
        if build.tag not in row.cuda_builds:
            rejected.append(f"{label}: vLLM {version} publishes no wheel for it")
            continue
        if need is None:
            rejected.append(f"{label}: CUDA {build.cuda} is not in NVIDIA's driver table")
            continue
        if capability is not None:
            if build_runs_on(build, capability) is False:
                rejected.append(f"{label}: has no kernels for compute capability "
                                f"{capability_text}")
                continue
            floors = [f for f in data.vllm.engine_floors.cuda_by_compute_capability
                      if capability >= parse_compute_capability(f.min_compute_capability)
                      and _cuda_key(build.cuda) < _cuda_key(f.min_cuda)]
            if floors:
                rejected.append(f"{label}: compute capability {capability_text} needs "
                                f"CUDA >= {floors[0].min_cuda}")
                continue
        needed.append(need)
        if driver < parse_driver_version(need):
            rejected.append(f"{label}: needs driver >= {need} ({_branch(need)})")
            continue
        eligible.append((build, need))
    choice = max(eligible, key=lambda pair: _cuda_key(pair[0].cuda)) if eligible else None
    return _ReleaseFit(version, row, choice, rejected, needed, None)


def _why_not(fit: _ReleaseFit) -> str:
    if fit.gpu_refusal is not None:
        return fit.gpu_refusal
    if fit.needed:
        lowest = min(fit.needed, key=parse_driver_version)
        return f"needs driver >= {lowest} ({_branch(lowest)})"
    return (f"no torch {fit.row.torch} CUDA build can serve vLLM {fit.version} on this GPU ("
            + "; ".join(fit.rejected) + ")")


def _refusal(fits: list[_ReleaseFit], shown: str, max_cuda: str | None,
             capability_text: str | None) -> CompatError:
    detail = "; ".join(f"vLLM {f.version}: {_why_not(f)}" for f in fits)
    runnable = [(min(f.needed, key=parse_driver_version), f) for f in fits if f.needed]
    if runnable:
        lowest, fit = min(runnable, key=lambda pair: parse_driver_version(pair[0]))
        return CompatError(
            f"no supported combination for NVIDIA driver {shown}"
            + (f" (CUDA <= {max_cuda})" if max_cuda else "")
            + f": vLLM {fit.version} with torch {fit.row.torch} needs driver >= {lowest}; "
            f"install the {_branch(lowest)} driver branch or newer ({detail})")
    if all(f.gpu_refusal is not None for f in fits):
        return CompatError(f"GPU compute capability {capability_text} is below the minimum of "
                           f"every vLLM release in cuda_compat.yml ({detail}): this GPU cannot "
                           "serve with vLLM")
    return CompatError(f"no vLLM release in cuda_compat.yml can serve this GPU ({detail})")


def decide(driver_version: str, gpu_compute_capability: str | None,
           table: CompatTable) -> Decision:
    """Pick the vLLM release and torch CUDA build for a host, or raise CompatError.

    Tries the project's pinned vLLM (the gpu profile) first, then the older releases of
    cuda_compat.yml, newest first; takes the first one with a torch build that the release is
    built for, the driver runs and (when given) the GPU's compute capability is compiled for,
    and of its builds the newest such. The reasons name every newer release skipped and why.
    """
    driver = parse_driver_version(driver_version)
    capability = (parse_compute_capability(gpu_compute_capability)
                  if gpu_compute_capability is not None else None)
    data = table.cuda
    candidates = _candidates(table)
    pin = candidates[0][0]

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

    fits: list[_ReleaseFit] = []
    for version, row in candidates:
        fits.append(_fit_release(version, row, driver, capability, gpu_compute_capability,
                                 data))
        if fits[-1].choice is not None:
            break
    chosen = fits[-1]
    if chosen.choice is None:
        raise _refusal(fits, shown, max_cuda, gpu_compute_capability)

    vllm, version = chosen.row, chosen.version
    reasons = [driver_reason]
    reasons.extend(f"not vLLM {f.version} (torch {f.row.torch}, built for "
                   f"{', '.join(f.row.cuda_builds)}): {_why_not(f)}" for f in fits[:-1])
    role = ("project pin" if version == pin else
            f"the newest release in cuda_compat.yml this host runs; the project pin is {pin}")
    reasons.append(f"vLLM {version} ({role}) requires torch=={vllm.torch} and is built "
                   f"for {', '.join(vllm.cuda_builds)}")
    if version != pin and fits[0].needed:
        want = min(fits[0].needed, key=parse_driver_version)
        reasons.append(f"NVIDIA driver >= {want} ({_branch(want)}) would get the project pin, "
                       f"vLLM {pin}")
    if capability is not None:
        reasons.append(f"compute capability {gpu_compute_capability} meets vLLM "
                       f"{version}'s minimum {vllm.min_compute_capability}")
    else:
        reasons.append("GPU compute capability unknown: architectures not checked")
    reasons.extend(f"not {line}" for line in chosen.rejected)
    build, need = chosen.choice
    assert max_cuda is not None  # the driver meets `need`, a row of NVIDIA's table
    reasons.append(f"torch {vllm.torch}+{build.tag}: the newest build both vLLM and the driver "
                   f"support (CUDA {build.cuda} needs driver >= {need}), from {build.index_url}"
                   + (" [experimental PyTorch build]" if build.channel == "experimental" else ""))
    return Decision(
        driver=shown,
        max_cuda=max_cuda,
        torch=TorchChoice(version=vllm.torch, cuda_build=build.tag, cuda=build.cuda,
                          index_url=build.index_url, min_driver=need),
        vllm=VllmChoice(version=version),
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


# --- driver installs (data/nvidia_driver.yml) ------------------------------------------


def branch_driver(branch: int, cuda_compat: CudaCompat) -> str | None:
    """The driver version a host is planned with once `branch` is installed: the newest
    driver of NVIDIA's toolkit table in that branch or below it. A branch installed from
    packages today is at least that version (the table lists released drivers), so the
    toolkits it runs are the ones `orchestrate compat --driver <that version>` shows."""
    rows = [r.min_driver for r in cuda_compat.nvidia.toolkits
            if parse_driver_version(r.min_driver)[0] <= branch]
    return max(rows, key=parse_driver_version) if rows else None


def host_branches(table: DriverTable, source: str | None) -> list[OsBranches]:
    """The OS releases and package sources a host may install its driver from: those of the
    fleet's driver.source, else each distribution's default source (the role's default)."""
    return [row for row in table.branches
            if row.source == (source or table.default_source.get(row.distribution))]


def describe_branches(rows: list[OsBranches]) -> str:
    return "; ".join(f"{r.os} ({r.source}): {', '.join(map(str, r.branches))}" for r in rows)


def open_modules_required(capability: str | None, gpu_name: str | None,
                          modules: KernelModules) -> str | None:
    """Why a GPU can run only NVIDIA's open kernel modules (Blackwell, Grace Hopper), or None."""
    required = modules.open_required
    if capability is not None and parse_compute_capability(capability) >= \
            parse_compute_capability(required.min_compute_capability):
        return "a Blackwell or newer GPU"
    words = set((gpu_name or "").upper().replace("-", " ").split())
    for gpu in required.gpus:
        if set(gpu.match.upper().split()) <= words:
            return f"a {gpu.platform} GPU ({gpu.match})"
    return None


def open_modules_supported(capability: str, modules: KernelModules) -> bool:
    """Turing (7.5) and newer: the open modules need the GPU System Processor."""
    return parse_compute_capability(capability) >= parse_compute_capability(
        modules.open_min_compute_capability)


def _checked(pattern: re.Pattern[str], value: str, what: str) -> str:
    if not pattern.fullmatch(value):
        raise ValueError(f"{value!r} is not a {what}")
    return value
