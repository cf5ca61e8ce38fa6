"""YAML loading that remembers where every key came from.

Operators fix a fleet file by its line numbers, so every value we load keeps the
line it was written on, and duplicate keys (which PyYAML silently overwrites)
are refused. So is hostile YAML: nesting deep enough to exhaust Python's stack,
and aliases that expand a few lines into millions of values (an alias bomb).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from orchestrator.errors import ConfigError

Loc = tuple[str, ...]

# A fleet nests a dozen levels; Python's recursion limit is met near 300.
MAX_DEPTH = 100
# Values an alias may add, beyond the document's own: ten times the document, at least
# this many (a 5,000-host fleet has about 25,000 values).
MIN_EXPANSION = 100_000
EXPANSION_RATIO = 10

if yaml.__with_libyaml__:
    # libyaml parses ten times faster than PyYAML's own parser; the composer stays
    # PyYAML's, in Python, so that its depth can be counted.
    from yaml._yaml import CParser as _Parser

    class _Parsing(_Parser):
        def __init__(self, stream: str | bytes) -> None:
            _Parser.__init__(self, stream)
else:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parsing(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str | bytes) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


class _Loader(Composer, _Parsing, SafeConstructor, Resolver):
    """yaml.SafeLoader's behaviour, refusing nesting deeper than MAX_DEPTH as it composes."""

    def __init__(self, stream: str | bytes, name: str) -> None:
        _Parsing.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._name = name
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = getattr(self.peek_event(), "start_mark", None)
            raise ConfigError(f"invalid YAML: nested deeper than {MAX_DEPTH} levels",
                              file=self._name, line=mark.line + 1 if mark else None)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


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


def _expanded(node: yaml.Node, limit: int, file: str,
              seen: dict[int, tuple[int, int]], busy: set[int]) -> tuple[int, int]:
    """(values, depth) of `node` with every alias expanded; ConfigError past the limits.

    Memoised per node, so that it costs the document's size however far aliases expand
    it (the walk of _index_lines and the validation after it expand it all)."""
    key = id(node)
    if key in seen:
        return seen[key]
    if key in busy:
        raise ConfigError("invalid YAML: an alias refers to the value that contains it",
                          file=file, line=node.start_mark.line + 1)
    busy.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    values, depth = 1, 1
    for child in children:
        child_values, child_depth = _expanded(child, limit, file, seen, busy)
        values += child_values
        depth = max(depth, child_depth + 1)
    busy.discard(key)
    if values > limit:
        raise ConfigError(f"invalid YAML: aliases expand this value to more than {limit} "
                          "values (an alias bomb?)", file=file,
                          line=node.start_mark.line + 1)
    if depth > MAX_DEPTH:
        raise ConfigError(f"invalid YAML: aliases nest this value deeper than {MAX_DEPTH} "
                          "levels", file=file, line=node.start_mark.line + 1)
    seen[key] = (values, depth)
    return values, depth


def parse_yaml(text: str | bytes, name: str) -> YamlDocument:
    """Parse `text` (read from `name`); every failure is a ConfigError naming file and line."""
    loader = _Loader(text, name)
    try:
        root = loader.get_single_node()
        lines: dict[Loc, int] = {}
        if root is not None:
            composed = _count(root, set())
            _expanded(root, max(MIN_EXPANSION, EXPANSION_RATIO * composed), name, {}, set())
            _index_lines(root, (), lines, name)
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", file=name,
                          line=mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()
    return YamlDocument(path=name, data=data, lines=lines)


def _count(node: yaml.Node, seen: set[int]) -> int:
    """Nodes the document itself holds, each alias's target once."""
    if id(node) in seen:
        return 0
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        return 1 + sum(_count(part, seen) for pair in node.value for part in pair)
    if isinstance(node, yaml.SequenceNode):
        return 1 + sum(_count(item, seen) for item in node.value)
    return 1


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
    return parse_yaml(text, name)
