"""YAML as declarations and policy are read: safe types only, and a key given twice in one mapping is
an error (PyYAML's own loader silently keeps the last value, so a second ``track:`` further down a
file would quietly win over the one a reviewer saw).

The error is a ``yaml.YAMLError`` with ``problem`` and ``problem_mark`` like any syntax error, so the
callers' one-line "not valid YAML ... file:line" messages cover it.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class StrictLoader(_Base):  # type: ignore[misc, valid-type]
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base constructor reports it
                break
            if first is not None:
                raise ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key '{key}' (first given at line {first.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load(text: str) -> Any:
    """``yaml.safe_load`` that refuses a duplicate key (``yaml.YAMLError`` naming it and its lines)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def load_with_node(text: str) -> tuple[Any, Any]:
    """``(load(text), yaml.compose(text))`` from ONE parse: the data and its node tree (for line numbers)."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


def load_all_with_nodes(text: str) -> list[tuple[Any, Any]]:
    """``(data, node)`` of every document of ``text`` (``---`` separated), from one parse; an empty document
    (nothing, or only comments, e.g. after a trailing ``---``) is left out."""
    loader = StrictLoader(text)
    out = []
    try:
        while loader.check_node():
            node = loader.get_node()
            data = loader.construct_document(node) if node is not None else None
            if data is not None:
                out.append((data, node))
        return out
    finally:
        loader.dispose()


def key_nodes(node: yaml.MappingNode) -> dict[Any, Any]:
    """Each key of a constructed mapping ``node`` and the key node that gave its value: the last one with that key,
    since constructing a mapping with a merge key (``<<:``) puts the merged pairs first, its own after."""
    construct = yaml.constructor.SafeConstructor().construct_object
    return {construct(k, deep=True): k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}


def line_of(node: Any, path: list[str]) -> int:
    """The 1-based line of the deepest node ``path`` (mapping keys and sequence indexes, as pydantic's error
    locations name them) reaches from ``node``: a wrong value's own line, a missing key's mapping."""
    line = node.start_mark.line + 1
    for part in path:
        if isinstance(node, yaml.MappingNode):
            # the last pair with that key: a merge key's pairs come first (see ``key_nodes``)
            found = next(((k, v) for k, v in reversed(node.value) if getattr(k, "value", None) == part), None)
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and str(part).isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line
