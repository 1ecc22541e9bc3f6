"""YAML read with PyYAML's safe loader (never one that builds arbitrary objects): recipes refuse a key given twice."""

from __future__ import annotations

from typing import Any

import yaml

from .errors import RecipeError

__all__ = ["DuplicateKeyError", "UniqueKeyLoader", "read_yaml", "read_value"]


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first: int, line: int):
        super().__init__(f"line {line}: key {key!r} given twice (first on line {first}); YAML would keep only the "
                         "last value: remove one")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error (PyYAML silently keeps
    the last value, e.g. the second `keep:`). Keys brought in by a `<<` merge may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, loader: type[yaml.SafeLoader] = UniqueKeyLoader) -> Any:
    """The one document in `text`, read with `loader` (a SafeLoader subclass)."""
    reader = loader(text)
    try:
        return reader.get_single_data()
    finally:
        reader.dispose()


def read_value(text: str, where: str) -> Any:
    """One setting's value given on a command line (`--set selection.ridge=1e-3`, `[0.5, 0.25]`, `null`), read
    as YAML; text YAML cannot read is a RecipeError that names `where`."""
    try:
        return read_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: {text!r} is not a YAML value ({str(exc).splitlines()[0]})") from exc
