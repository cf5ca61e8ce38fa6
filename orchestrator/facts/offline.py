"""Facts read from a directory, for planning away from the hosts (`orchestrate plan --facts DIR`).

Teams collect facts in a change window and plan elsewhere: one file per host, either the
document `orchestrate facts --json` writes (<host>.json, a HostFacts) or a saved
`nvidia-smi -q -x` / plain `nvidia-smi` output (<host>.txt), which gives the GPU part only.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pydantic import ValidationError

from orchestrator.config.yamlsource import dotted
from orchestrator.errors import ConfigError
from orchestrator.facts.hostfacts import HostFacts, from_nvidia_smi_text


def _accepted(directory: Path, host: str) -> str:
    return (f"{directory / (host + '.json')} (`orchestrate facts --json`) or "
            f"{directory / (host + '.txt')} (a saved `nvidia-smi -q -x` or `nvidia-smi` output)")


def _from_json(path: Path, host: str) -> HostFacts:
    try:
        facts = HostFacts.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        key = dotted(tuple(first["loc"])) or None
        raise ConfigError(f"not a host facts document: {first['msg']}"
                          + (f" ({len(exc.errors())} problems)" if len(exc.errors()) > 1 else ""),
                          file=str(path), key=key) from None
    if facts.host != host:
        raise ConfigError(f"holds the facts of host '{facts.host}', not of '{host}'",
                          file=str(path), key="host")
    return facts


def _from_text(path: Path, host: str) -> HostFacts:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not a text file ({exc.reason} at byte {exc.start}): expected a "
                          "saved nvidia-smi output", file=str(path)) from None
    # When the output was saved: the file's own time is the best the file tells.
    when = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
    return from_nvidia_smi_text(host, text, f"file {path}", when)


def load_facts_dir(directory: Path, hosts: list[str]) -> dict[str, HostFacts]:
    """One HostFacts per host of `hosts`, from <host>.json or <host>.txt in `directory`;
    ConfigError naming the directory, host and accepted names when a host has no file."""
    if not directory.is_dir():
        raise ConfigError(f"facts directory {directory} does not exist (expected one file "
                          "per host: <host>.json or <host>.txt)", key="--facts")
    found: dict[str, HostFacts] = {}
    for host in hosts:
        json_path, text_path = directory / f"{host}.json", directory / f"{host}.txt"
        present = [path for path in (json_path, text_path) if path.is_file()]
        if len(present) == 2:
            raise ConfigError(f"host '{host}' has two facts files in {directory}, "
                              f"{json_path.name} and {text_path.name}: keep one",
                              key="--facts")
        if not present:
            raise ConfigError(f"no facts for host '{host}' in {directory}: expected "
                              f"{_accepted(directory, host)}", key="--facts")
        found[host] = (_from_json(json_path, host) if present[0] == json_path
                       else _from_text(text_path, host))
    return found
