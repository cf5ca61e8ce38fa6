"""Filters of the model_weights role: a hub's file list as a manifest, and bytes left to fetch.

Both run on the control machine, on data the role already read from the host or the hub.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

# The hub's repo/files answer stops at this many entries (modelscope-hub 0.5.1,
# REPO_FILES_TRUNCATION_LIMIT); the client then walks the tree directory by directory.
_LISTING_LIMIT = 3000


def _patterns(value: Iterable[str] | str | None) -> list[str]:
    """Flatten patterns the way `modelscope download --include/--exclude` does: commas split."""
    if not value:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def _matches(path: str, patterns: list[str]) -> bool:
    """The client's own test (modelscope_hub._download._matches_patterns): a glob, or a
    legacy regex-like pattern whose `.*` is read as `*`."""
    return any(fnmatch.fnmatchcase(path, p)
               or (".*" in p and fnmatch.fnmatchcase(path, p.replace(".*", "*")))
               for p in patterns)


def hub_manifest(files: list[Mapping[str, Any]], include: Iterable[str] | str | None = None,
                 exclude: Iterable[str] | str | None = None) -> dict[str, Any]:
    """The files the client downloads for these patterns, as a manifest.

    ``files`` is ``Data.Files`` of the hub's ``repo/files`` answer. Returns
    ``{"files": {path: {"size": int, "sha256": str}}}``, the layout of the manifest.json
    that orchestrator/sandbox/modelgen.py writes; sha256 is "" when the hub lists none.
    """
    if not isinstance(files, list):
        raise AnsibleFilterError(f"hub file list: expected a list, got {type(files).__name__}")
    if len(files) >= _LISTING_LIMIT:
        raise AnsibleFilterError(
            f"the hub listed {len(files)} entries, its limit for one listing; this role reads "
            "one listing and cannot verify a larger repository")
    allow, deny = _patterns(include), _patterns(exclude)
    chosen: dict[str, dict[str, Any]] = {}
    for entry in files:
        path = str(entry.get("Path") or entry.get("Name") or "")
        if not path or (entry.get("Type") or "blob") == "tree":
            continue
        if (allow and not _matches(path, allow)) or (deny and _matches(path, deny)):
            continue
        try:
            size = int(entry.get("Size") or 0)
        except (TypeError, ValueError) as exc:
            raise AnsibleFilterError(f"hub file list: {path}: Size {entry.get('Size')!r} "
                                     "is not a number") from exc
        chosen[path] = {"size": size, "sha256": str(entry.get("Sha256") or "").lower()}
    return {"files": dict(sorted(chosen.items()))}


def bytes_to_fetch(manifest: Mapping[str, Any], found: list[Mapping[str, Any]],
                   dest: str) -> int:
    """Bytes still to download into ``dest``, as the modelscope client goes about it.

    A file already there at its listed size costs nothing (the client keeps it when its
    hash matches); one of another size is fetched again whole; a partial
    ``<file>.incomplete`` no longer than the file is resumed. ``found`` is the ``files``
    list of ansible.builtin.find over ``dest``.
    """
    have = {str(f["path"]): int(f["size"]) for f in found}
    total = 0
    for name, entry in manifest["files"].items():
        path, size = posixpath.join(dest, name), int(entry["size"])
        partial = have.get(f"{path}.incomplete", 0)
        if path in have:
            total += 0 if have[path] == size else size
        elif partial <= size:
            total += size - partial
        else:
            total += size
    return total


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "model_weights_hub_manifest": hub_manifest,
            "model_weights_bytes_to_fetch": bytes_to_fetch,
        }
