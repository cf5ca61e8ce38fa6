"""Errors an operator sees as one line, never as a traceback."""

from __future__ import annotations


class OrchestrateError(Exception):
    """Base for every failure the CLI reports with a clear message and exit code."""

    exit_code = 1


def one_line(text: str) -> str:
    """`text` with newlines and other control characters escaped (\\n, \\x1b): a key or value
    quoted from a hostile file can neither break the line nor drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
        super().__init__(one_line(f"{prefix}{keypart}{message}"))


class PlanError(OrchestrateError):
    """The fleet is valid YAML but asks for something that cannot be planned."""

    exit_code = 2


class MissingExtra(OrchestrateError):
    """A command needs an optional part of the package that is not installed: the message
    names the extra to install."""

    exit_code = 2
