#!/usr/bin/python
"""Ansible module: the host's NVIDIA GPU facts, from NVML where present, else nvidia-smi."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nvidia_gpu_facts
short_description: NVIDIA driver and GPU facts, as the planner reads them
description:
  - Reads the NVIDIA driver version, the CUDA version the driver supports and, per GPU,
    name, UUID, memory (MiB), compute capability and MIG mode, plus MIG devices.
  - Uses NVML (the C{pynvml} module of nvidia-ml-py) when the host's Python can import it,
    otherwise C(nvidia-smi), parsed by meaning with the same parser as
    C(orchestrate facts parse) (module_utils nvidia_smi).
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
              compute_capability: "9.0", mig_mode: Disabled}]
      mig_devices: []
      error: null
      source: nvml
summary:
  description: One line for logs.
  returned: always
  type: str
"""

import dataclasses
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

# Fields nvidia-smi's table lacks. compute_cap is answered by drivers 510 and newer only.
_QUERY = ["index", "uuid", "memory.total", "compute_cap", "mig.mode.current"]


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
                mig_mode: str | None = "Enabled" if current else "Disabled"
            except pynvml.NVMLError:  # NotSupported: a GPU without MIG
                mig_mode = None
            gpus.append(GpuInfo(
                index=index, name=_text(pynvml.nvmlDeviceGetName(handle)),
                uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                memory_total_mib=pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20,
                compute_capability=f"{major}.{minor}", mig_mode=mig_mode))
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


def from_nvidia_smi(module: AnsibleModule, command: str) -> GpuFacts:
    path = module.get_bin_path(command)
    if path is None:
        return _error("not_installed", f"{command}: command not found")
    # The default report carries the driver and CUDA versions and every failure message.
    _rc, out, err = module.run_command([path])
    facts = parse_nvidia_smi(out + err)
    if not facts.gpus:
        return facts
    extra: dict[int, GpuInfo] = {}
    for fields in (_QUERY, [f for f in _QUERY if f != "compute_cap"]):
        rc, out, err = module.run_command([path, "--query-gpu=" + ",".join(fields),
                                           "--format=csv"])
        if rc == 0:
            extra = {g.index: g for g in parse_nvidia_smi(out).gpus}
            break
    gpus = [dataclasses.replace(
        gpu,
        name=extra[gpu.index].name,  # the table truncates long names
        uuid=gpu.uuid or extra[gpu.index].uuid,
        memory_total_mib=gpu.memory_total_mib or extra[gpu.index].memory_total_mib,
        compute_capability=extra[gpu.index].compute_capability,
        mig_mode=gpu.mig_mode or extra[gpu.index].mig_mode,
    ) if gpu.index in extra else gpu for gpu in facts.gpus]
    rc, out, _err = module.run_command([path, "-L"])
    migs = parse_nvidia_smi(out).mig_devices if rc == 0 else []
    return dataclasses.replace(facts, gpus=gpus, mig_devices=migs)


def main() -> None:
    module = AnsibleModule(
        argument_spec={"nvidia_smi": {"type": "str", "default": "nvidia-smi"},
                       "use_nvml": {"type": "bool", "default": True}},
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
    module.exit_json(changed=False, summary=summarize(facts),
                     ansible_facts={"nvidia_gpu": {**facts.to_dict(), "source": source}})


if __name__ == "__main__":
    main()
