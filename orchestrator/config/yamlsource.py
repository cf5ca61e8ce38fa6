"""YAML loading that remembers where every key came from.

Operators fix a fleet file by its line numbers, so every value we load keeps the
line it was written on, and duplicate keys (which PyYAML silently overwrites)
are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError

Loc = tuple[str, ...]


@dataclass
class YamlDocument:
    """A parsed YAML file: its data and the line of every key and list item."""

    path: str
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: tuple[Any, ...]) -> int | None:
        """Line of the deepest part of `loc` that exists in the file."""
        parts = tuple(str(p) for p in loc)
        while parts:
            if parts in self.lines:
                return self.lines[parts]
            parts = parts[:-1]
        return None

    def error(self, loc: tuple[Any, ...], message: str) -> ConfigError:
        return ConfigError(message, file=self.path, line=self.line_of(loc),
                           key=dotted(loc) or None)


def dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _index_lines(node: yaml.Node, path: Loc, lines: dict[Loc, int], file: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"duplicate key '{key}' (the first one would be silently "
                                  "overwritten)", file=file, line=line,
                                  key=dotted((*path, key)))
            seen.add(key)
            lines[(*path, key)] = line
            _index_lines(value_node, (*path, key), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, str(index))] = item.start_mark.line + 1
            _index_lines(item, (*path, str(index)), lines, file)


def load_yaml(path: Path, *, display: str | None = None) -> YamlDocument:
    """Read and parse `path`; every failure is a ConfigError naming file and line."""
    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=name) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a YAML file", file=name) from None
    except (PermissionError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=name) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", file=name,
                          line=mark.line + 1 if mark else None) from None
    lines: dict[Loc, int] = {}
    if root is not None:
        _index_lines(root, (), lines, name)
    return YamlDocument(path=name, data=data, lines=lines)
