"""YAML as qtulu's files read it (recipes, settings, studies): YAML-1.2-style floats (``1e-4`` is a
float, not PyYAML's YAML-1.1 string), duplicate keys refused naming both lines, a mapping at the
top level, and every problem raised as the caller's error class naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class Loader(yaml.SafeLoader):
    pass


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# copy the resolver table so SafeLoader itself is untouched
Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _construct_mapping(loader: Loader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml_value(text: str) -> Any:
    """Parse one scalar/flow value the way recipe files are parsed (``2e-4`` -> float)."""
    return yaml.load(text, Loader=Loader)


def read_mapping(path: Path, error: type[Exception], what: str = "recipe") -> dict[str, Any]:
    """The top-level mapping of YAML file ``path``; ``error(message naming path)`` otherwise."""
    from qtulu.files import check_input_path

    check_input_path(path, what)  # a FIFO or device would block the read forever
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not valid UTF-8 ({e})") from None
    try:
        data = yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        raise error(f"{path}: invalid YAML: {e}") from None
    if data is None:
        raise error(f"{path}: empty {what}")
    if not isinstance(data, dict):
        raise error(f"{path}: a {what} must be a mapping at the top level, got {type(data).__name__}")
    return data
