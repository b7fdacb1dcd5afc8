"""YAML for the config file: PyYAML's safe loader, except that a mapping key given twice is a
problem (`keys.alice.limits.rpm: repeated key (line 12)`) instead of the last one silently winning.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    """Records each repeated mapping key, at any depth, in `repeated` (`path: message` lines)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.repeated: list[str] = []
        self._walked: set[int] = set()

    def construct_document(self, node: Node) -> Any:
        self._find_repeats(node, ())
        return super().construct_document(node)

    def _find_repeats(self, node: Node, path: tuple[str, ...]) -> None:
        if id(node) in self._walked:  # an alias: its anchor was walked already (and may recurse)
            return
        self._walked.add(id(node))
        if isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                self._find_repeats(item, (*path, str(index)))
        elif isinstance(node, MappingNode):
            seen: set[Any] = set()
            for key_node, value_node in node.value:
                if key_node.tag == MERGE_TAG:  # `<<: *defaults`: keys given next to it override it
                    continue
                key = self.construct_object(key_node)
                name = (*path, str(key))
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the constructor refuses it, with its line
                    continue
                if repeated:
                    self.repeated.append(f"{'.'.join(name)}: repeated key (line {key_node.start_mark.line + 1})")
                self._find_repeats(value_node, name)


def load_yaml(text: str) -> tuple[Any, list[str]]:
    """The document, and the problems of its repeated keys (the document keeps the last value)."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data(), loader.repeated
    finally:
        loader.dispose()
