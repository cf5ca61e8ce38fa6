"""`orchestrate down`: remove the built-in sandbox (never real hosts)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import Field

from orchestrator.errors import ConfigError
from orchestrator.workflows.common import Result


@dataclass(frozen=True)
class DownOptions:
    hosts: str
    # The built-in sandbox's group, and what removes its hosts and state, returning the
    # names removed: the caller's (workflows never import the sandbox).
    sandbox_group: str
    remove: Callable[[], list[str]]


class DownResult(Result):
    """`orchestrate down --json`."""

    group: str = Field(description="the built-in sandbox's group")
    removed: list[str] = Field(description="the sandbox hosts removed (empty: none ran)")


def down(options: DownOptions) -> DownResult:
    if options.hosts != options.sandbox_group:
        raise ConfigError(f"`down` removes the built-in sandbox only, not '{options.hosts}': "
                          "real hosts are never deleted by this tool", key="--hosts")
    return DownResult(group=options.hosts, removed=options.remove())
