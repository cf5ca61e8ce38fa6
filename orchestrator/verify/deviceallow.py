"""Which device nodes a systemd unit's DeviceAllow= admits, resolved as systemd does.

Standard library only, and no import from the orchestrator package: this file is copied to
GPU hosts beside the GPU smoke script, which checks the units' real DeviceAllow (from
`systemctl show -p DeviceAllow UNIT`) against the host's /proc/devices and device nodes.

The rules, from systemd.resource-control(5) (DeviceAllow=) and systemd's own resolver
(src/core/bpf-devices.c, bpf_devices_allow_list_major and bpf_devices_allow_list_device):
- an entry is a specifier and access letters out of "rwm"; no letters means "rwm";
- "char-NAME" / "block-NAME" admits every major of that kind whose /proc/devices name
  matches NAME by file name globbing (fnmatch, "*" and "?"); "char-*" admits the whole kind
  and a numeric NAME is taken as a major directly;
- a path under /dev/ admits that one node; /dev/char/MAJ:MIN and /dev/block/MAJ:MIN are
  parsed rather than looked up, any other path is stat()ed (a missing one admits nothing);
- groups are resolved once, when the unit starts: a name /proc/devices lacks then (its
  module not loaded yet) admits nothing until the unit is started again.
DevicePolicy=closed's pseudo devices (/dev/null, /dev/zero, ...) are not modelled here:
the question answered is whether the GPU (and InfiniBand) nodes get through.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

_SECTIONS = {"Character devices:": "c", "Block devices:": "b"}
_PREFIXES = {"char-": "c", "block-": "b"}
_NUMBERED = re.compile(r"^/dev/(char|block)/(\d+):(\d+)$")
# Linux majors are 12 bits wide (systemd's DEVICE_MAJOR_VALID).
_MAJOR_MAX = (1 << 12) - 1


@dataclass(frozen=True)
class DeviceNode:
    """A device node on the host."""

    path: str
    kind: str  # "c" (char) or "b" (block)
    major: int
    minor: int


@dataclass(frozen=True)
class NodeVerdict:
    node: DeviceNode
    groups: tuple[str, ...]  # /proc/devices names registered for node.major (of its kind)
    allowed_by: str | None  # the DeviceAllow entry that admits the node, None if denied

    @property
    def allowed(self) -> bool:
        return self.allowed_by is not None


def parse_proc_devices(text: str) -> dict[str, dict[int, list[str]]]:
    """/proc/devices as {"c": {195: ["nvidia", "nvidiactl"]}, "b": {...}}.

    Like systemd, lines count only inside a "Character devices:" or "Block devices:"
    section, an empty line ends the section, and majors below 1 are skipped."""
    groups: dict[str, dict[int, list[str]]] = {"c": {}, "b": {}}
    kind: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line in _SECTIONS:
            kind = _SECTIONS[line]
            continue
        if not line:
            kind = None
            continue
        number, _, name = line.partition(" ")
        if kind is None or not number.isdigit() or int(number) < 1 or not name.strip():
            continue
        groups[kind].setdefault(int(number), []).append(name.strip())
    return groups


def parse_device_allow(lines: Iterable[str]) -> list[str]:
    """DeviceAllow entries as "SPECIFIER ACCESS" ("char-nvidia rw").

    Accepts unit-file lines (other keys, sections and comments are skipped), the output of
    `systemctl show -p DeviceAllow [--value] UNIT` (one line per entry, newest first, a
    missing access shown as rwm: measured with systemd 252) and bare entries. An empty
    assignment ("DeviceAllow=") clears the entries before it, as in a unit file. Raises
    ValueError on an entry systemd would refuse."""
    entries: list[str] = []
    for raw in _logical_lines(lines):
        line = raw.strip()
        if not line or line[0] in "#;[":
            continue
        if "=" in line.split(" ", 1)[0]:
            key, _, line = line.partition("=")
            if key.strip() != "DeviceAllow":
                continue
            line = line.strip()
            if not line:
                entries.clear()
                continue
        spec, _, access = line.partition(" ")
        access = access.strip() or "rwm"
        if not (spec.startswith("/dev/") or spec.startswith(tuple(_PREFIXES))):
            raise ValueError(f"DeviceAllow entry {raw.strip()!r}: the specifier must start "
                             "with /dev/, char- or block-")
        if set(access) - set("rwm"):
            raise ValueError(f"DeviceAllow entry {raw.strip()!r}: access must be made of "
                             "r, w and m")
        entries.append(f"{spec} {access}")
    return entries


def _logical_lines(lines: Iterable[str]) -> list[str]:
    """Lines with unit-file continuations (a trailing backslash) joined, as systemd reads
    them, so that a continued ExecStart= is not taken for entries."""
    joined: list[str] = []
    pending = ""
    for line in lines:
        text = line.rstrip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        joined.append(pending + text)
        pending = ""
    if pending:
        joined.append(pending)
    return joined


def _admits(spec: str, node: DeviceNode, groups: dict[str, dict[int, list[str]]]) -> bool:
    for prefix, kind in _PREFIXES.items():
        if spec.startswith(prefix):
            if node.kind != kind:
                return False
            name = spec[len(prefix):]
            if name == "*":
                return True
            if name.isdigit() and 0 < int(name) <= _MAJOR_MAX:
                return node.major == int(name)
            return any(fnmatchcase(group, name) for group in groups[kind].get(node.major, []))
    numbered = _NUMBERED.match(spec)
    if numbered:
        kind = "c" if numbered[1] == "char" else "b"
        return (kind, int(numbered[2]), int(numbered[3])) == (node.kind, node.major, node.minor)
    if spec == node.path:
        return True
    # Another path to the same node (a symlink, a bind mount): systemd stat()s the path.
    try:
        other = node_of(spec)
    except (OSError, ValueError):
        return False
    return (other.kind, other.major, other.minor) == (node.kind, node.major, node.minor)


def resolve(device_allow: Iterable[str], proc_devices: str, nodes: Iterable[DeviceNode],
            access: str = "rw") -> list[NodeVerdict]:
    """For each node, the first DeviceAllow entry that admits it with every letter of
    `access`, given the host's /proc/devices text."""
    entries = parse_device_allow(device_allow)
    groups = parse_proc_devices(proc_devices)
    verdicts = []
    for node in nodes:
        allowed_by = next((entry for entry in entries
                           if set(access) <= set(entry.split(" ", 1)[1])
                           and _admits(entry.split(" ", 1)[0], node, groups)), None)
        verdicts.append(NodeVerdict(node=node,
                                    groups=tuple(groups[node.kind].get(node.major, [])),
                                    allowed_by=allowed_by))
    return verdicts


def node_of(path: str) -> DeviceNode:
    """The device node at `path` (following symlinks, as systemd's stat() does)."""
    info = os.stat(path)
    if stat.S_ISCHR(info.st_mode):
        kind = "c"
    elif stat.S_ISBLK(info.st_mode):
        kind = "b"
    else:
        raise ValueError(f"{path} is not a device node")
    return DeviceNode(path=path, kind=kind, major=os.major(info.st_rdev),
                      minor=os.minor(info.st_rdev))
