"""Errors an operator sees as one line, never as a traceback."""

from __future__ import annotations


class OrchestrateError(Exception):
    """Base for every failure the CLI reports with a clear message and exit code."""

    exit_code = 1


class ConfigError(OrchestrateError):
    """Bad input: names the file, the key and the line, and what was expected."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.detail = message
        where = file or ""
        if file and line:
            where = f"{file}:{line}"
        prefix = f"{where}: " if where else ""
        keypart = f"{key}: " if key else ""
        super().__init__(f"{prefix}{keypart}{message}")


class PlanError(OrchestrateError):
    """The fleet is valid YAML but asks for something that cannot be planned."""

    exit_code = 2


class MissingExtra(OrchestrateError):
    """A command needs an optional part of the package that is not installed: the message
    names the extra to install."""

    exit_code = 2
