"""What a host really has, as the planner reads it: one document per host.

Written by playbooks/facts.yml (the `orchestrate_host_facts` fact, built from the
gpu_check role's modules and a small `setup` subset), cached by the orchestrator under
.orchestrate/facts/<host>.json, and read back from a directory for offline planning
(`orchestrate plan --facts DIR`), where a saved nvidia-smi output (<host>.txt) stands for
the GPU part. One shape for all three, so that a document means the same wherever it was
made. Values come from hosts: they are data, never templates.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.facts.nvidia_smi import ErrorKind, GpuFacts, parse_nvidia_smi

FACTS_VERSION = 1

# The NVIDIA driver as found: answering, installed but not answering (with the error's
# kind), not installed on a host with NVIDIA GPUs on its PCI bus, or no NVIDIA GPU at all.
DriverState = Literal["loaded", "broken", "not_installed", "no_gpu"]


class _Facts(BaseModel):
    # Newer gatherers may add fields; older readers keep what they know.
    model_config = ConfigDict(extra="ignore", frozen=True)


class FoundGpu(_Facts):
    index: int
    name: str
    uuid: str | None = None
    memory_total_mib: int | None = Field(default=None, description="as the driver reports it")
    compute_capability: str | None = None
    mig_mode: str | None = Field(default=None, description="Enabled, Disabled, or null "
                                                           "where the GPU has no MIG")
    persistence_mode: str | None = Field(default=None, description="Enabled or Disabled")
    ecc_mode: str | None = Field(default=None, description="Enabled or Disabled (current); "
                                                           "null where not supported")


class FoundMigDevice(_Facts):
    gpu_index: int
    profile: str | None = None
    uuid: str


class FoundError(_Facts):
    kind: ErrorKind
    message: str
    next_step: str


class NvidiaFacts(_Facts):
    """The NVIDIA side: the nvidia_gpu_facts module's answer, plus the PCI bus."""

    source: str = Field(description="nvml, nvidia-smi, or the file it was read from")
    driver_version: str | None = None
    cuda_version: str | None = Field(default=None, description="the newest CUDA the driver "
                                                               "supports")
    gpus: list[FoundGpu] = []
    mig_devices: list[FoundMigDevice] = []
    error: FoundError | None = None
    pci_gpus: int | None = Field(default=None, description="NVIDIA display/3D controllers on "
                                                           "the PCI bus (sysfs); null: not read")
    nvswitches: int | None = Field(default=None, description="NVIDIA NVSwitch bridges on the "
                                                             "PCI bus: Fabric Manager needed "
                                                             "when > 0; null: not read")

    @property
    def driver_state(self) -> DriverState:
        if self.error is None and self.gpus:
            return "loaded"
        if self.error is not None and self.error.kind == "not_installed":
            return "no_gpu" if self.pci_gpus == 0 else "not_installed"
        if self.error is not None and self.error.kind == "no_devices" and self.pci_gpus == 0:
            return "no_gpu"
        return "broken"

    @property
    def fabric_manager_needed(self) -> bool | None:
        return None if self.nvswitches is None else self.nvswitches > 0


class OsFacts(_Facts):
    distribution: str | None = Field(default=None, description="ansible_distribution, "
                                                               "e.g. Ubuntu")
    version: str | None = Field(default=None, description="ansible_distribution_version")
    family: str | None = Field(default=None, description="ansible_os_family")
    kernel: str | None = Field(default=None, description="the running kernel's release")
    kernel_headers: bool | None = Field(default=None, description="/lib/modules/<kernel>/build "
                                                                  "exists (DKMS needs it)")
    secure_boot: Literal["enabled", "disabled", "not_efi"] | None = Field(
        default=None, description="from the SecureBoot EFI variable; not_efi: booted by BIOS")
    python_version: str | None = Field(default=None, description="the Python Ansible runs "
                                                                 "on the host")


class DiskFree(_Facts):
    path: str = Field(description="a path the plan uses (the Python env, the weights)")
    mount: str = Field(description="the mount point holding it (or its nearest existing "
                                   "parent)")
    free_mib: int


class HostFacts(_Facts):
    """One host's facts: `orchestrate facts --json` per host, and .orchestrate/facts/<host>.json."""

    version: int = FACTS_VERSION
    host: str
    gathered_at: dt.datetime = Field(description="when (UTC)")
    origin: str = Field(description="how: 'gathered by playbooks/facts.yml' or the file read")
    reachable: bool = True
    unreachable: str | None = Field(default=None, description="why the host could not be "
                                                              "reached or read; null when it was")
    nvidia: NvidiaFacts | None = None
    os: OsFacts | None = None
    memory_mib: int | None = Field(default=None, description="RAM, MemTotal")
    disk: list[DiskFree] = []

    def age(self, now: dt.datetime) -> dt.timedelta:
        return now - self.gathered_at

    def where(self, part: Literal["gpu", "host"] = "gpu") -> str:
        """How a reason cites these facts: the GPU part by the tool that read it (NVML,
        nvidia-smi, a saved file), the rest (OS, disk, PCI bus) by how they were gathered."""
        when = self.gathered_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        how = self.nvidia.source if part == "gpu" and self.nvidia is not None else self.origin
        return f"found on the host ({how}, {when})"

    def os_release(self) -> str | None:
        """ "Debian 12.15", or None where the OS was not read."""
        if self.os is None or not self.os.distribution:
            return None
        return f"{self.os.distribution} {self.os.version or ''}".strip()


def nvidia_from_smi(facts: GpuFacts, source: str) -> NvidiaFacts:
    return NvidiaFacts.model_validate({**facts.to_dict(), "source": source})


def from_nvidia_smi_text(host: str, text: str, origin: str, when: dt.datetime) -> HostFacts:
    """A host's facts from a saved nvidia-smi output (any format): the GPU part only."""
    return HostFacts(host=host, gathered_at=when, origin=origin,
                     nvidia=nvidia_from_smi(parse_nvidia_smi(text), origin))


_NAME_PREFIX = re.compile(r"^((NVIDIA|Tesla|GeForce|Quadro)\s+)+", re.IGNORECASE)


def same_gpu(declared: str, found: str) -> bool:
    """Whether a fleet's gpu.name names the GPU the driver reports: "A10" names "NVIDIA A10"
    and "A100" names "NVIDIA A100-SXM4-40GB", but "A10" does not name an A100 (whole words,
    vendor prefixes aside)."""
    def words(name: str) -> list[str]:
        return re.split(r"[\s_-]+", _NAME_PREFIX.sub("", name.strip()).lower())
    want, have = words(declared), words(found)
    return any(have[i:i + len(want)] == want for i in range(len(have) - len(want) + 1))
