"""A wheelhouse staged once on the control machine, so hosts install without reaching an index.

Downloads every wheel a set of requirements needs, for the hosts' Python and
platform (not the control machine's), into one directory that hosts use as pip
`find-links` with `no-index`.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from orchestrator.errors import OrchestrateError

MARKER = ".wheelhouse.json"
# pip matches --platform tags exactly: list every manylinux level a glibc-2.36
# host (Debian 12) accepts.
_GLIBC_MINORS = range(36, 4, -1)


class WheelhouseError(OrchestrateError):
    pass


def platform_tags(machine: str) -> list[str]:
    tags = [f"manylinux_2_{minor}_{machine}" for minor in _GLIBC_MINORS]
    return [*tags, f"manylinux2014_{machine}", f"manylinux2010_{machine}",
            f"manylinux1_{machine}", f"linux_{machine}"]


def download_command(dest: Path, requirements: list[str], *, python_version: str,
                     machine: str, index_url: str | None = None,
                     find_links: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--dest", str(dest),
           "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python_version]
    for tag in platform_tags(machine):
        cmd += ["--platform", tag]
    if index_url:
        # Only the named requirement, from its own index (PyTorch's builds).
        cmd += ["--no-deps", "--index-url", index_url]
    if find_links:
        cmd += ["--find-links", str(find_links)]
    return cmd + requirements


def _pip(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise WheelhouseError(f"pip download failed: {tail}")


def stage_wheelhouse(dest: Path, requirements: list[str], *, python_version: str,
                     own_indexes: dict[str, str], log: Callable[[str], None]) -> Path:
    """Make `dest` hold wheels for `requirements`; reuse it when it already does.

    `own_indexes` maps a requirement to the index that publishes its build (torch's
    CPU build is on PyTorch's index, not PyPI). Those are fetched first, alone, so
    that resolving everything else never asks that index for other packages.
    """
    wanted = {"requirements": sorted(requirements), "own_indexes": own_indexes,
              "python_version": python_version, "machine": platform.machine()}
    marker = dest / MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return dest
    staging = dest.with_name(dest.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    log(f"staging wheels for {', '.join(requirements)} (Python {python_version}) in {dest}")
    machine = platform.machine()
    for requirement, index_url in own_indexes.items():
        _pip(download_command(staging, [requirement], python_version=python_version,
                              machine=machine, index_url=index_url))
    _pip(download_command(staging, requirements, python_version=python_version,
                          machine=machine, find_links=staging))
    (staging / MARKER).write_text(json.dumps(wanted, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    return dest
