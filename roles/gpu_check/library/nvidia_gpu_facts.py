#!/usr/bin/python
"""Ansible module: the host's NVIDIA GPU facts, from NVML where present, else nvidia-smi."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nvidia_gpu_facts
short_description: NVIDIA driver and GPU facts, as the planner reads them
description:
  - Reads the NVIDIA driver version, the CUDA version the driver supports and, per GPU,
    name, UUID, memory (MiB), compute capability, MIG, persistence and ECC mode, plus MIG
    devices.
  - Uses NVML (the C{pynvml} module of nvidia-ml-py) when the host's Python can import it,
    otherwise C(nvidia-smi -q -x), parsed by meaning with the same parser as
    C(orchestrate facts parse) (module_utils nvidia_smi), which reads any nvidia-smi format.
  - Counts the NVIDIA GPUs and NVSwitches on the PCI bus (sysfs), whatever the driver's
    state, so that "no driver" and "no NVIDIA GPU" can be told apart and an NVSwitch
    system (which needs Fabric Manager) is recognized.
  - Never fails on a broken driver; the fact carries a typed error (driver_not_loaded,
    version_mismatch, no_devices, device_handle, not_installed, unrecognized) with the
    operator's next step. The caller decides whether that is fatal.
options:
  nvidia_smi:
    description: nvidia-smi command or path.
    type: str
    default: nvidia-smi
  use_nvml:
    description: Try NVML before nvidia-smi.
    type: bool
    default: true
  sysfs_root:
    description: Where sysfs is mounted (tests point it at a prepared tree).
    type: path
    default: /sys
author: qwen-fleet-orchestrator
"""

EXAMPLES = r"""
- name: Read the GPU facts
  nvidia_gpu_facts:

- name: Show them
  ansible.builtin.debug:
    var: ansible_facts.nvidia_gpu
"""

RETURN = r"""
ansible_facts:
  description: C(nvidia_gpu), the JSON of C(orchestrate facts parse --json) plus C(source).
  returned: always
  type: dict
  sample:
    nvidia_gpu:
      driver_version: "580.65.06"
      cuda_version: "13.0"
      gpus: [{index: 0, name: NVIDIA H100 80GB HBM3, uuid: GPU-..., memory_total_mib: 81559,
              compute_capability: "9.0", mig_mode: Disabled, persistence_mode: Enabled,
              ecc_mode: Enabled}]
      mig_devices: []
      error: null
      source: nvml
      pci_gpus: 1
      nvswitches: 0
summary:
  description: One line for logs.
  returned: always
  type: str
"""

import dataclasses
import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.nvidia_smi import (
    NEXT_STEPS,
    GpuFacts,
    GpuInfo,
    MigDevice,
    SmiError,
    parse_nvidia_smi,
    summarize,
)

# What `-q -x` lacks (compute capability; before 510 not even --query-gpu has it) or a
# replayed table lacks (UUIDs, full names): asked for only when missing.
_QUERY = ["index", "name", "uuid", "memory.total", "compute_cap", "mig.mode.current",
          "persistence_mode", "ecc.mode.current"]

# PCI class codes (sysfs `class`: 0xCCSSPP, base class, subclass, programming interface),
# per the PCI-SIG Code and ID Assignment Specification: 03h/00h VGA-compatible and 03h/02h
# 3D controller (NVIDIA's GeForce/RTX and data-centre GPUs), 06h/80h "other bridge", which
# is how NVSwitch presents itself; NCCL reads sysfs the same way (NVIDIA/nccl
# src/transport/nvlink.h and src/graph/topo.cc: "0x068000" NVSwitch, "0x030200" 3D
# controller, "0x030000" VGA). NVIDIA's PCI vendor id is 0x10de.
_NVIDIA_VENDOR = "0x10de"
_GPU_CLASSES = ("0x0300", "0x0302")
_NVSWITCH_CLASS = "0x0680"


def _error(kind: str, message: str) -> GpuFacts:
    return GpuFacts(error=SmiError(kind=kind, message=message, next_step=NEXT_STEPS[kind]))


def _text(value: Any) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_error_kind(pynvml: Any, exc: Exception) -> str:
    kinds = {
        "NVMLError_DriverNotLoaded": "driver_not_loaded",
        "NVMLError_LibRmVersionMismatch": "version_mismatch",
        "NVMLError_NoPermission": "device_handle",
        "NVMLError_GpuIsLost": "device_handle",
    }
    for name, kind in kinds.items():
        cls = getattr(pynvml, name, None)
        if cls is not None and isinstance(exc, cls):
            return kind
    return "unrecognized"


def _enabled(state: int) -> str:
    # NVML_FEATURE_ENABLED is 1, NVML_FEATURE_DISABLED 0; nvidia-smi prints these words.
    return "Enabled" if state else "Disabled"


def from_nvml(pynvml: Any) -> GpuFacts | None:
    """Facts through NVML; None when NVML's library is absent (then nvidia-smi decides)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        if isinstance(exc, getattr(pynvml, "NVMLError_LibraryNotFound", ())):
            return None
        return _error(_nvml_error_kind(pynvml, exc), f"NVML: {exc}")
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda_int = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        cuda = f"{cuda_int // 1000}.{cuda_int % 1000 // 10}"
        gpus: list[GpuInfo] = []
        migs: list[MigDevice] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError as exc:
                facts = _error("device_handle", f"NVML: GPU {index}: {exc}")
                return dataclasses.replace(facts, driver_version=driver, cuda_version=cuda,
                                           gpus=gpus)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            try:
                current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
                mig_mode: str | None = _enabled(current)
            except pynvml.NVMLError:  # NotSupported: a GPU without MIG
                mig_mode = None
            try:
                persistence: str | None = _enabled(pynvml.nvmlDeviceGetPersistenceMode(handle))
            except pynvml.NVMLError:  # NotSupported: Windows
                persistence = None
            try:
                ecc_current, _ecc_pending = pynvml.nvmlDeviceGetEccMode(handle)
                ecc: str | None = _enabled(ecc_current)
            except pynvml.NVMLError:  # NotSupported: a GPU without ECC memory
                ecc = None
            gpus.append(GpuInfo(
                index=index, name=_text(pynvml.nvmlDeviceGetName(handle)),
                uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                memory_total_mib=pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20,
                compute_capability=f"{major}.{minor}", mig_mode=mig_mode,
                persistence_mode=persistence, ecc_mode=ecc))
            if mig_mode == "Enabled":
                for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                    try:
                        mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                    except pynvml.NVMLError:  # NotFound: an empty slot
                        continue
                    # The MIG device's name ends in its profile: "... MIG 3g.40gb".
                    profile = _text(pynvml.nvmlDeviceGetName(mig)).rpartition("MIG ")[2] or None
                    migs.append(MigDevice(gpu_index=index, profile=profile,
                                          uuid=_text(pynvml.nvmlDeviceGetUUID(mig))))
        return GpuFacts(driver_version=driver, cuda_version=cuda, gpus=gpus, mig_devices=migs)
    except pynvml.NVMLError as exc:
        return _error(_nvml_error_kind(pynvml, exc), f"NVML: {exc}")
    finally:
        pynvml.nvmlShutdown()


def _incomplete(gpu: GpuInfo) -> bool:
    return (gpu.compute_capability is None or gpu.uuid is None or gpu.memory_total_mib is None
            or gpu.name.endswith("..."))  # the table truncates long names


def _fill(gpu: GpuInfo, extra: GpuInfo | None) -> GpuInfo:
    """`gpu` with what it lacks taken from `extra` (the same GPU, read another way)."""
    if extra is None:
        return gpu
    return dataclasses.replace(
        gpu,
        name=extra.name if gpu.name.endswith("...") else gpu.name,
        uuid=gpu.uuid or extra.uuid,
        memory_total_mib=gpu.memory_total_mib or extra.memory_total_mib,
        compute_capability=gpu.compute_capability or extra.compute_capability,
        mig_mode=gpu.mig_mode or extra.mig_mode,
        persistence_mode=gpu.persistence_mode or extra.persistence_mode,
        ecc_mode=gpu.ecc_mode or extra.ecc_mode)


def from_nvidia_smi(module: AnsibleModule, command: str) -> GpuFacts:
    path = module.get_bin_path(command)
    if path is None:
        return _error("not_installed", f"{command}: command not found")
    # -q -x: versions, every GPU with its modes, and every failure message. Whatever it
    # prints is parsed by its format, not assumed XML: a saved output replayed by a
    # stand-in prints the same text, a table maybe, for every argument.
    _rc, out, err = module.run_command([path, "-q", "-x"])
    facts = parse_nvidia_smi(out + err)
    if facts.error is not None and facts.error.kind == "unrecognized":
        # An nvidia-smi without XML output: its default report says as much.
        _rc, out, err = module.run_command([path])
        facts = parse_nvidia_smi(out + err)
    if not facts.gpus:
        return facts
    gpus = facts.gpus
    if any(_incomplete(gpu) for gpu in gpus):
        for fields in (_QUERY, [f for f in _QUERY if f != "compute_cap"]):
            rc, out, _err = module.run_command([path, "--query-gpu=" + ",".join(fields),
                                                "--format=csv"])
            if rc == 0:
                extra = {g.index: g for g in parse_nvidia_smi(out).gpus}
                gpus = [_fill(gpu, extra.get(gpu.index)) for gpu in gpus]
                break
    migs = facts.mig_devices
    # Neither -q -x nor the table name MIG devices with their UUIDs and profiles; -L does.
    if not migs and any(gpu.mig_mode == "Enabled" for gpu in gpus):
        rc, out, _err = module.run_command([path, "-L"])
        migs = parse_nvidia_smi(out).mig_devices if rc == 0 else []
    return dataclasses.replace(facts, gpus=gpus, mig_devices=migs)


def pci_counts(sysfs_root: str) -> tuple[int | None, int | None]:
    """NVIDIA GPUs and NVSwitches on the PCI bus; (None, None) when sysfs cannot be read."""
    devices = os.path.join(sysfs_root, "bus", "pci", "devices")
    try:
        entries = sorted(os.listdir(devices))
    except OSError:
        return None, None
    gpus = switches = 0
    for entry in entries:
        try:
            with open(os.path.join(devices, entry, "vendor"), encoding="ascii") as handle:
                vendor = handle.read().strip().lower()
            with open(os.path.join(devices, entry, "class"), encoding="ascii") as handle:
                pci_class = handle.read().strip().lower()
        except OSError:  # a device removed while listing
            continue
        if vendor != _NVIDIA_VENDOR:
            continue
        if pci_class.startswith(_GPU_CLASSES):
            gpus += 1
        elif pci_class.startswith(_NVSWITCH_CLASS):
            switches += 1
    return gpus, switches


def main() -> None:
    module = AnsibleModule(
        argument_spec={"nvidia_smi": {"type": "str", "default": "nvidia-smi"},
                       "use_nvml": {"type": "bool", "default": True},
                       "sysfs_root": {"type": "path", "default": "/sys"}},
        supports_check_mode=True,
    )
    facts: GpuFacts | None = None
    source = "nvidia-smi"
    if module.params["use_nvml"]:
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            pynvml = None
        if pynvml is not None:
            facts = from_nvml(pynvml)
            source = "nvml"
    if facts is None:
        facts, source = from_nvidia_smi(module, module.params["nvidia_smi"]), "nvidia-smi"
    pci_gpus, nvswitches = pci_counts(module.params["sysfs_root"])
    summary = summarize(facts)
    if pci_gpus is not None:
        summary += f"; PCI: {pci_gpus} NVIDIA GPU(s), {nvswitches} NVSwitch(es)"
    module.exit_json(changed=False, summary=summary,
                     ansible_facts={"nvidia_gpu": {**facts.to_dict(), "source": source,
                                                   "pci_gpus": pci_gpus,
                                                   "nvswitches": nvswitches}})


if __name__ == "__main__":
    main()
