"""YAML for configuration files written by people: `yaml.SafeLoader` (never executes anything)
with the limits and the fixes a configuration file needs.

- Duplicate mapping keys are an error naming both lines (PyYAML silently keeps the last one).
- Mapping keys are strings (`1:`, `on:` or `null:` as a key is an error, not an int, bool or None).
- Nesting deeper than `MAX_DEPTH` levels is an error raised while composing, before PyYAML's
  recursive composer can exhaust the stack.
- Anchors and aliases are allowed, but the document with every alias expanded may hold at most
  `MAX_NODES` values and `MAX_DEPTH` levels, and an alias may not contain itself: a "billion
  laughs" document is refused in time linear in its text, before anything walks it.
- Two YAML 1.1 number rules give way to YAML 1.2's: `1e-3` is a float (PyYAML reads it as a
  string) and `2:4` is a string (PyYAML reads it as the base-60 integer 124).
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.error import Mark

MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_BYTES = 1 << 20

_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"

_FLOAT_RE = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_INT_RE = re.compile(
    r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""",
    re.X,
)


class RefusedYAML(yaml.MarkedYAMLError):
    """Valid YAML that a configuration file may not contain (its `problem` says why)."""


class SafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses deep nesting while composing; see the module docstring."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.first_alias: Mark | None = None

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) and self.first_alias is None:
            self.first_alias = event.start_mark
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise RefusedYAML(
                    problem=f"nested deeper than {MAX_DEPTH} levels",
                    problem_mark=event.start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _yaml12_numbers() -> None:
    """`SafeLoader` reads exponents without a dot as floats and has no base-60 numbers."""
    table = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    SafeLoader.yaml_implicit_resolvers = table
    SafeLoader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))
    SafeLoader.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))


_yaml12_numbers()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_keys(node: yaml.MappingNode) -> None:
    """Keys are strings and appear once (merge keys `<<` excepted)."""
    first: dict[str, Mark] = {}
    for key, _ in node.value:
        if key.tag == _MERGE:
            continue
        if not isinstance(key, yaml.ScalarNode):
            raise RefusedYAML(
                problem="a key must be a name, not a list or mapping", problem_mark=key.start_mark
            )
        if key.tag != _STR:
            raise RefusedYAML(
                problem=f"key {key.value!r} is not a name; quote it if it is one",
                problem_mark=key.start_mark,
            )
        if key.value in first:
            raise RefusedYAML(
                problem=f"duplicate key '{key.value}' (first on line "
                f"{first[key.value].line + 1}); keep only one",
                problem_mark=key.start_mark,
            )
        first[key.value] = key.start_mark


def _measure(node: yaml.Node, depth: int, seen: dict[int, tuple[int, int]], open_: set) -> int:
    """Height of `node` with aliases expanded; checks keys, depth and cycles; memoized on node
    identity (an alias is the same node object), so the walk is linear in the text."""
    if id(node) in open_:
        raise RefusedYAML(problem="an alias contains itself", problem_mark=node.start_mark)
    if id(node) not in seen:
        if isinstance(node, yaml.MappingNode):
            _check_keys(node)
        open_.add(id(node))
        size, height = 1, 0
        for child in _children(node):
            if depth + 1 > MAX_DEPTH:
                raise RefusedYAML(
                    problem=f"nested deeper than {MAX_DEPTH} levels (aliases expanded)",
                    problem_mark=child.start_mark,
                )
            height = max(height, _measure(child, depth + 1, seen, open_) + 1)
            size += seen[id(child)][0]
        open_.discard(id(node))
        seen[id(node)] = (size, height)
    if depth + seen[id(node)][1] > MAX_DEPTH:
        raise RefusedYAML(
            problem=f"nested deeper than {MAX_DEPTH} levels (aliases expanded)",
            problem_mark=node.start_mark,
        )
    return seen[id(node)][1]


def compose(text: str) -> yaml.Node | None:
    """Parse one YAML document into its node graph, refusing what the module docstring lists."""
    if len(text) > MAX_BYTES:
        raise RefusedYAML(problem=f"larger than {MAX_BYTES // 1024} KiB")
    loader = SafeLoader(text)
    try:
        node = loader.get_single_node()
    finally:
        loader.dispose()
    if node is None:
        return None
    seen: dict[int, tuple[int, int]] = {}
    _measure(node, 0, seen, set())
    if seen[id(node)][0] > MAX_NODES:
        raise RefusedYAML(
            problem=f"expands to more than {MAX_NODES} values through aliases (*name); "
            "write the values out",
            problem_mark=loader.first_alias or node.start_mark,
        )
    return node


def construct(node: yaml.Node | None) -> Any:
    """The Python value of a node graph from `compose` (dicts, lists, str, int, float, ...)."""
    if node is None:
        return None
    loader = SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load(text: str) -> Any:
    """`yaml.safe_load` with the checks of `compose`."""
    return construct(compose(text))
