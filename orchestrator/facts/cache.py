"""The facts cache: each host's last gathered facts in .orchestrate/facts/<host>.json, the
HostFacts document itself, so that `plan` and `up` reuse a recent gathering instead of
reaching every host again, and `probe`, `status` and `bench` plan from what `up` found.

Only the control machine's operator reads it: the directory is 0700 and each file 0600
(facts name kernels, paths and disks)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path

from pydantic import ValidationError

from orchestrator.errors import ConfigError
from orchestrator.facts.hostfacts import FACTS_VERSION, HostFacts

# A host name as fleet.yml allows it: a plain file name, never a path.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def facts_dir(state_dir: Path) -> Path:
    return state_dir / "facts"


def path_of(state_dir: Path, host: str) -> Path:
    if not _PLAIN_NAME.fullmatch(host):
        raise ConfigError(f"host name '{host}' cannot name a facts file: letters, digits, "
                          "'.', '_' and '-' only, starting with a letter or digit",
                          key="hosts")
    return facts_dir(state_dir) / f"{host}.json"


def write(state_dir: Path, facts: HostFacts) -> Path:
    """Cache `facts` (replacing the host's previous file at once, never half-written)."""
    path = path_of(state_dir, facts.host)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(facts.model_dump_json(indent=2) + "\n")
    os.replace(partial, path)
    return path


def read(state_dir: Path, host: str, max_age: dt.timedelta | None,
         now: dt.datetime) -> HostFacts | None:
    """The host's cached facts when younger than `max_age` (None: of any age), else None;
    None too for a file that is missing, unreadable, of another facts version, of another
    host, without a time zone, or dated in the future (a clock that moved back)."""
    path = path_of(state_dir, host)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("version") != FACTS_VERSION:
            return None
        facts = HostFacts.model_validate(raw)
    except (OSError, UnicodeDecodeError, ValueError, ValidationError):
        return None
    if facts.host != host or not facts.reachable or facts.gathered_at.tzinfo is None:
        return None
    age = facts.age(now)
    if age < dt.timedelta(0):
        return None
    return facts if max_age is None or age < max_age else None
