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
                     extra_index_urls: list[str], machine: str) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--dest", str(dest),
           "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python_version]
    for tag in platform_tags(machine):
        cmd += ["--platform", tag]
    for url in extra_index_urls:
        cmd += ["--extra-index-url", url]
    return cmd + requirements


def stage_wheelhouse(dest: Path, requirements: list[str], *, python_version: str,
                     extra_index_urls: list[str], log: Callable[[str], None]) -> Path:
    """Make `dest` hold wheels for `requirements`; reuse it when it already does."""
    wanted = {"requirements": sorted(requirements), "python_version": python_version,
              "machine": platform.machine()}
    marker = dest / MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return dest
    staging = dest.with_name(dest.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    cmd = download_command(staging, requirements, python_version=python_version,
                           extra_index_urls=extra_index_urls, machine=platform.machine())
    log(f"staging wheels for {', '.join(requirements)} (Python {python_version}) in {dest}")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise WheelhouseError(f"pip download failed for {' '.join(requirements)}:\n{tail}")
    (staging / MARKER).write_text(json.dumps(wanted, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    return dest
