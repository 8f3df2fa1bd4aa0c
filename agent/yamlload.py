"""PyYAML's safe loader with bounds and line numbers, imported only when a config file must be
parsed (agent/config.py `load_yaml`; agent/yamlcache.py spares the parse of a file seen before).

Bounds: nesting depth, keys per mapping (merges included); a constructor that fails on a bad
value (`!!int 12abc`, `!!timestamp x`) is a config error at the value's line, not a Python
exception. Every mapping is a `_Map` (which remembers each key's line), every list a `_Seq`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from agent.config import MAX_DEPTH, MAX_MAPPING_KEYS, _Map, _Seq, _show, _tag
from agent.model import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader with bounds: nesting depth, keys per mapping (merges included), and a
    constructor that fails on a bad value (`!!int 12abc`, `!!timestamp x`) is a config error
    at the value's line, not a Python exception."""

    def __init__(self, stream: str, name: str):
        super().__init__(stream)
        self.name = name
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"{self.name}:{mark.line + 1}: the YAML is nested deeper "
                                  f"than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        total = len(node.value)
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge":
                continue
            subs = [value_node] if isinstance(value_node, yaml.MappingNode) else \
                value_node.value if isinstance(value_node, yaml.SequenceNode) else []
            for sub in subs:
                if isinstance(sub, yaml.MappingNode):
                    self.flatten_mapping(sub)
                    total += len(sub.value)
            if total > MAX_MAPPING_KEYS:
                break
        if total > MAX_MAPPING_KEYS:
            raise ConfigError(f"{self.name}:{node.start_mark.line + 1}: a mapping with more "
                              f"than {MAX_MAPPING_KEYS} keys (`<<` merges included)")
        super().flatten_mapping(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, ConfigError):
            raise
        except RecursionError:
            raise ConfigError(f"{self.name}:{node.start_mark.line + 1}: the YAML is nested "
                              "too deeply") from None
        except Exception as exc:  # noqa: BLE001 - any constructor failing on this value
            shown = _show(node.value) if isinstance(node, yaml.ScalarNode) else node.id
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{self.name}:{node.start_mark.line + 1}: invalid value "
                              f"{shown} for {_tag(node.tag)} ({detail[:100]})") from None


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    explicit = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)  # the pairs merged in by `<<` come first
    merged = len(node.value) - explicit
    out = _Map()
    out.where = (loader.name, node.start_mark.line + 1)
    out.src = {}
    from_merge: set[str] = set()
    for index, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise ConfigError(f"{loader.name}:{line}: a key must be text, got {_show(key)} "
                              "(quote it, or fix the indentation)")
        if index < merged:  # YAML merge: the first mapping that has the key wins ...
            if key in out:
                continue
            from_merge.add(key)
        elif key in from_merge:  # ... and a key written here wins over every merged one
            from_merge.discard(key)
        elif key in out:
            raise ConfigError(f"{loader.name}:{line}: duplicate key {_show(key)}")
        out[key] = loader.construct_object(value_node, deep=True)
        out.src[key] = (loader.name, line)
    return out


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def parse(text: str, path: Path) -> _Map:
    loader = _Loader(text, str(path))
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply") from None
    finally:
        loader.dispose()
    if data is None:
        data = _Map()
        data.where, data.src = (str(path), 1), {}
    if not isinstance(data, _Map):
        raise ConfigError(f"{path}:1: the top level must be a mapping of keys")
    return data
