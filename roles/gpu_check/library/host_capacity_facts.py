#!/usr/bin/python
"""Ansible module: what the planner needs to know of a host besides its GPUs."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: host_capacity_facts
short_description: Kernel, kernel headers, Secure Boot, RAM and free disk, as the planner reads them
description:
  - Reads the running kernel's release and whether its headers are installed
    (C(/lib/modules/<release>/build), which DKMS builds the NVIDIA module against), the
    Secure Boot state from its EFI variable (an enabled Secure Boot refuses an unsigned
    NVIDIA module), the RAM (C(MemTotal)) and, for each given path, the free space of the
    file system that holds it or would hold it (its nearest existing parent).
  - Reads files only: changes nothing, needs no root, runs in check mode too.
options:
  paths:
    description: Paths whose free space is wanted (a Python env, a weights directory).
    type: list
    elements: str
    default: []
  proc_root:
    description: Where procfs is mounted (tests point it at a prepared tree).
    type: path
    default: /proc
  sysfs_root:
    description: Where sysfs is mounted (tests point it at a prepared tree).
    type: path
    default: /sys
  modules_root:
    description: Where the kernel modules are installed (tests point it at a prepared tree).
    type: path
    default: /lib/modules
author: qwen-fleet-orchestrator
"""

EXAMPLES = r"""
- name: Read the host's capacity
  host_capacity_facts:
    paths: [/opt/qwen-serve/env, /srv/models]

- name: Show it
  ansible.builtin.debug:
    var: ansible_facts.host_capacity
"""

RETURN = r"""
ansible_facts:
  description: C(host_capacity); a value that could not be read is null.
  returned: always
  type: dict
  sample:
    host_capacity:
      kernel: 6.8.0-84-generic
      kernel_headers: true
      secure_boot: disabled
      memory_mib: 515715
      disk:
        - {path: /srv/models, mount: /srv, free_mib: 1843200}
"""

import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule

# EFI global variable GUID (UEFI specification, "Globally Defined Variables"); Linux
# exposes the variable under efivarfs as 4 bytes of attributes followed by its value,
# here one byte: 1 Secure Boot enabled, 0 disabled (what `mokutil --sb-state` reads).
_SECURE_BOOT_VAR = "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def secure_boot(sysfs_root: str) -> str | None:
    """enabled / disabled; not_efi on a BIOS boot; None when the variable cannot be read."""
    efi = os.path.join(sysfs_root, "firmware", "efi")
    if not os.path.isdir(efi):
        return "not_efi"
    try:
        with open(os.path.join(efi, "efivars", _SECURE_BOOT_VAR), "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    if len(data) < 5 or data[-1] not in (0, 1):
        return None
    return "enabled" if data[-1] == 1 else "disabled"


def memory_mib(proc_root: str) -> int | None:
    try:
        with open(os.path.join(proc_root, "meminfo"), encoding="ascii") as handle:
            for line in handle:
                key, _sep, value = line.partition(":")
                parts = value.split()
                if key == "MemTotal" and parts and parts[0].isdigit():
                    # The kernel prints kB (KiB, despite the unit's spelling).
                    return int(parts[0]) // 1024
    except OSError:
        return None
    return None


def _mount_point(path: str) -> str:
    while not os.path.ismount(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def disk_free(path: str) -> dict[str, Any] | None:
    """The free space where `path` is or would be created; None when nothing of it exists."""
    existing = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            return None
        existing = parent
    try:
        stat = os.statvfs(existing)
    except OSError:
        return None
    # f_bavail: the blocks an unprivileged user may use (root's reserve excluded).
    return {"path": path, "mount": _mount_point(existing),
            "free_mib": stat.f_bavail * stat.f_frsize // 2**20}


def main() -> None:
    module = AnsibleModule(
        argument_spec={"paths": {"type": "list", "elements": "str", "default": []},
                       "proc_root": {"type": "path", "default": "/proc"},
                       "sysfs_root": {"type": "path", "default": "/sys"},
                       "modules_root": {"type": "path", "default": "/lib/modules"}},
        supports_check_mode=True,
    )
    release = os.uname().release
    disks = [disk_free(path) for path in module.params["paths"]]
    module.exit_json(changed=False, ansible_facts={"host_capacity": {
        "kernel": release,
        # A dangling `build` link (headers removed) does not count: exists() follows it.
        "kernel_headers": os.path.exists(
            os.path.join(module.params["modules_root"], release, "build")),
        "secure_boot": secure_boot(module.params["sysfs_root"]),
        "memory_mib": memory_mib(module.params["proc_root"]),
        "disk": [disk for disk in disks if disk is not None],
    }})


if __name__ == "__main__":
    main()
