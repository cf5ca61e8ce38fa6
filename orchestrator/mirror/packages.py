"""`orchestrate mirror`, beyond the weights: the Python wheels and the Ollama release archive
the plan's hosts install, staged once into the mirror directory so that hosts take them from
the mirror server instead of PyPI, PyTorch's index and GitHub (docs/airgapped.md, step 4).

    <dir>/wheels/                              every stack's wheels, pip find-links for hosts
    <dir>/ollama/v<version>/<archive>          as the ollama role fetches it from its
                                               ollama_archive_base_url <mirror.url>/ollama

The hosts' machine architecture is taken to be this machine's (platform.machine()): wheels
and the archive are staged for it.
"""

from __future__ import annotations

import hashlib
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import yaml

from orchestrator.config.fleet import MirrorSettings
from orchestrator.knowledge.catalog import Knowledge
from orchestrator.knowledge.compat import CompatTable, torch_build_index
from orchestrator.mirror.weights import MirrorError, hash_file
from orchestrator.mirror.wheelhouse import stage_wheelhouse
from orchestrator.plan.planner import Plan
from orchestrator.run.render import ROOT

WHEELS = "wheels"
OLLAMA = "ollama"
OLLAMA_ROLE = ROOT / "roles" / "ollama"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelStack:
    """One set of wheels hosts install: their Python, torch (from its own index) and vLLM."""

    python_version: str
    requirements: tuple[str, ...]
    # torch's own index (PyTorch's CPU or CUDA builds); None: PyPI.
    index: str | None
    hosts: tuple[str, ...]
    # After staging: the wheels were all there already, nothing was downloaded.
    already_staged: bool = False


@dataclass(frozen=True)
class OllamaArchive:
    """The Ollama release archive of one version, for this machine's architecture."""

    version: str
    arch: str
    sha256: str
    # Downloaded from; staged at.
    url: str
    path: str
    hosts: tuple[str, ...]
    origin_bytes: int = 0
    already_staged: bool = False


def _under(url: str, base: str) -> bool:
    base = base.rstrip("/")
    return url.rstrip("/") == base or url.startswith(base + "/")


def wheel_stacks(plan: Plan, knowledge: Knowledge, gpu_table: CompatTable, *,
                 mirror_url: str | None, every_host: bool) -> list[WheelStack]:
    """The distinct stacks of the plan's hosts that take their wheels from the mirror (pip
    find_links under mirror_url), or of every host with `every_host`."""
    found: dict[tuple[str, tuple[str, ...], str | None], WheelStack] = {}
    for host in plan.hosts:
        variables = host.vars
        links = str(variables.get("python_env_pip_find_links") or "")
        if not (every_host or (mirror_url is not None and _under(links, mirror_url))):
            continue
        torch = str(variables["pytorch_requirement"])
        # The plan leaves pytorch_index_url out for hosts without an index (no_index): the
        # index the build comes from is then the profile's, or the CUDA build's.
        index = variables.get("pytorch_index_url") or _torch_index(torch, host.profile,
                                                                   knowledge, gpu_table)
        key = (str(variables["python_env_python_version"]),
               (torch, str(variables["vllm_requirement"])), index)
        seen = found.get(key)
        found[key] = WheelStack(python_version=key[0], requirements=key[1], index=index,
                                hosts=(*seen.hosts, host.name) if seen else (host.name,))
    return list(found.values())


def _torch_index(requirement: str, profile: str, knowledge: Knowledge,
                 gpu_table: CompatTable) -> str | None:
    stack = knowledge.compat.profiles.get(profile)
    if stack is not None and stack.torch_requirement == requirement:
        return stack.torch_index_url
    return torch_build_index(requirement, gpu_table.cuda)


def stage_wheels(stacks: list[WheelStack], directory: Path,
                 log: Callable[[str], None]) -> list[WheelStack]:
    """Each stack's wheels into <directory>/wheels, for the hosts' Python and this machine's
    architecture; torch alone from its own index first."""
    return [replace(stack, already_staged=stage_wheelhouse(
        directory / WHEELS, list(stack.requirements), python_version=stack.python_version,
        own_indexes={stack.requirements[0]: stack.index} if stack.index else {}, log=log))
        for stack in stacks]


def _role_values() -> tuple[dict[str, Any], dict[str, str]]:
    """The ollama role's defaults, and its names for machine architectures: the archive's
    URL layout and name are the role's, read from the role itself."""
    defaults = yaml.safe_load((OLLAMA_ROLE / "defaults" / "main.yml").read_text())
    arches = yaml.safe_load((OLLAMA_ROLE / "vars" / "main.yml").read_text())["_ollama_arches"]
    return defaults, arches


def ollama_origin(settings: MirrorSettings | None) -> str:
    if settings is not None and settings.ollama_origin:
        return settings.ollama_origin.rstrip("/")
    return str(_role_values()[0]["ollama_archive_base_url"]).rstrip("/")


def archive_name(version: str, arch: str) -> str:
    """As the role names it: .tar.zst since Ollama 0.14.0, .tgz before."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return f"ollama-linux-{arch}.{'tgz' if (major, minor) < (0, 14) else 'tar.zst'}"


def ollama_archives(plan: Plan, directory: Path, *, origin: str, mirror_url: str | None,
                    every_host: bool) -> list[OllamaArchive]:
    """The archives the plan's Ollama hosts fetch from the mirror (ollama_archive_base_url
    <mirror.url>/ollama), or those of every Ollama host with `every_host`; MirrorError when
    a host's checksum for the archive is missing or differs from another host's."""
    defaults, arches = _role_values()
    arch = arches.get(platform.machine(), platform.machine())
    staged_at = f"{mirror_url.rstrip('/')}/{OLLAMA}" if mirror_url is not None else None
    found: dict[str, OllamaArchive] = {}
    for host in plan.hosts:
        variables = host.vars
        if not variables.get("ollama_models"):
            continue
        base = str(variables.get("ollama_archive_base_url")
                   or defaults["ollama_archive_base_url"])
        from_mirror = mirror_url is not None and _under(base, mirror_url)
        if not (every_host or from_mirror):
            continue
        if from_mirror and base.rstrip("/") != staged_at:
            raise MirrorError(f"host '{host.name}': ollama_archive_base_url is {base}, under "
                              f"mirror.url but not {staged_at}, where orchestrate mirror "
                              "stages the Ollama archive")
        version = str(variables.get("ollama_version") or defaults["ollama_version"])
        name = archive_name(version, arch)
        sums = variables.get("ollama_archive_sha256")
        sha256 = str((sums or {}).get(arch) or "").lower() if isinstance(sums, dict) else ""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise MirrorError(
                f"host '{host.name}': ollama_archive_sha256.{arch} "
                + (f"is '{sha256}', not 64 hex digits" if sha256 else "is not set")
                + f": give the sha256 of {name} from {origin}/v{version}/sha256sum.txt in the "
                "fleet's vars; the mirror stages no Ollama archive it cannot verify")
        seen = found.get(version)
        if seen is not None and seen.sha256 != sha256:
            raise MirrorError(f"ollama_archive_sha256.{arch} differs between hosts "
                              f"{', '.join(seen.hosts)} ({seen.sha256}) and '{host.name}' "
                              f"({sha256}) for the same archive {name} of Ollama {version}")
        found[version] = OllamaArchive(
            version=version, arch=arch, sha256=sha256, url=f"{origin}/v{version}/{name}",
            path=str(directory / OLLAMA / f"v{version}" / name),
            hosts=(*seen.hosts, host.name) if seen else (host.name,))
    return list(found.values())


def stage_ollama(archives: list[OllamaArchive], log: Callable[[str], None]
                 ) -> list[OllamaArchive]:
    return [_stage_archive(archive, log) for archive in archives]


def _stage_archive(archive: OllamaArchive, log: Callable[[str], None]) -> OllamaArchive:
    path = Path(archive.path)
    if path.is_file():
        if hash_file(path)[1] == archive.sha256:
            log(f"{path}: already staged, sha256 matches; nothing downloaded")
            return replace(archive, already_staged=True)
        log(f"{path}: sha256 differs from ollama_archive_sha256.{archive.arch}; removing it "
            "and downloading it again")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named as the archive only once its sha256 is checked: hosts and reruns never see a
    # partial or wrong file under its name.
    partial = path.with_name(path.name + ".partial")
    log(f"downloading {archive.url} into {path}")
    try:
        size, sha256 = _download(archive.url, partial)
        if sha256 != archive.sha256:
            raise MirrorError(f"{archive.url}: sha256 {sha256}, but "
                              f"ollama_archive_sha256.{archive.arch} expects {archive.sha256} "
                              f"(hosts {', '.join(archive.hosts)}); not kept. Check the value "
                              f"against the release's sha256sum.txt")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return replace(archive, origin_bytes=size)


def _download(url: str, target: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    try:
        # GitHub answers release downloads with a redirect to its storage.
        with httpx.stream("GET", url, follow_redirects=True, timeout=60) as answer:
            if answer.status_code != 200:
                raise MirrorError(f"{url}: HTTP {answer.status_code}; expected the Ollama "
                                  "release archive there (check ollama_version, and "
                                  "mirror.ollama_origin when set)")
            with target.open("wb") as out:
                for block in answer.iter_bytes(_CHUNK):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
    except httpx.HTTPError as exc:
        raise MirrorError(f"cannot download {url}: {exc}") from None
    return size, digest.hexdigest()

