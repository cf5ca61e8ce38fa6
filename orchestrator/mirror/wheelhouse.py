"""A wheelhouse staged once on the control machine, so hosts install without reaching an index.

Downloads every wheel a set of requirements needs, for the hosts' Python and
platform (not the control machine's), into one directory that hosts use as pip
`find-links` with `no-index`. Several sets (one per Python version and software
stack) share a directory: staging only adds wheels, each set has its own marker
listing its files, so one set's staging never removes another's.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from orchestrator.errors import OrchestrateError
from orchestrator.mirror.weights import read_json

# <dest>/.wheelhouse/<set>.json: a staged set's completion marker; <set>.partial/ its
# downloads until they are complete.
STATE = ".wheelhouse"
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
                     find_links: Sequence[Path] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--dest", str(dest),
           "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python_version]
    for tag in platform_tags(machine):
        cmd += ["--platform", tag]
    if index_url:
        # Only the named requirement, from its own index (PyTorch's builds).
        cmd += ["--no-deps", "--index-url", index_url]
    for directory in find_links:
        cmd += ["--find-links", str(directory)]
    return cmd + requirements


def _pip(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise WheelhouseError(f"pip download failed: {tail}")


def stage_wheelhouse(dest: Path, requirements: list[str], *, python_version: str,
                     own_indexes: dict[str, str], log: Callable[[str], None]) -> bool:
    """Add to `dest` the wheels `requirements` need; True when it already held them (this
    set's marker lists files all present), and then nothing is downloaded.

    `own_indexes` maps a requirement to the index that publishes its build (torch's
    CPU and CUDA builds are on PyTorch's index, not PyPI). Those are fetched first, alone,
    so that resolving everything else never asks that index for other packages. Wheels
    already in `dest` (another set's) are taken from there rather than downloaded again.
    """
    machine = platform.machine()
    wanted = {"requirements": sorted(requirements), "own_indexes": own_indexes,
              "python_version": python_version, "machine": machine}
    name = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
    marker = dest / STATE / f"{name}.json"
    done = read_json(marker)
    if (done is not None and done.get("wanted") == wanted
            and all((dest / file).is_file() for file in done.get("files", []))):
        log(f"wheels for {', '.join(requirements)} (Python {python_version}, {machine}) "
            f"already staged in {dest}: nothing downloaded")
        return True
    staging = dest / STATE / f"{name}.partial"
    # A failed run's downloads: pip would keep them without checking them again.
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log(f"staging wheels for {', '.join(requirements)} (Python {python_version}, {machine}) "
        f"in {dest}")
    try:
        for requirement, index_url in own_indexes.items():
            _pip(download_command(staging, [requirement], python_version=python_version,
                                  machine=machine, index_url=index_url, find_links=[dest]))
        _pip(download_command(staging, requirements, python_version=python_version,
                              machine=machine, find_links=[staging, dest]))
        files = sorted(p.name for p in staging.iterdir() if p.is_file())
        for file in files:
            # A wheel's name is its identity (an index never replaces a file): one already
            # there from another set stays as it is.
            if not (dest / file).exists():
                (staging / file).replace(dest / file)
        # Last: until the marker is written, this set is not staged.
        partial = marker.with_name(marker.name + ".partial")
        partial.write_text(json.dumps({"wanted": wanted, "files": files}, indent=2) + "\n")
        partial.replace(marker)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return False
