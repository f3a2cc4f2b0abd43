"""Dotted keys on a config mapping: reading one (``get_dotted``), ``--set key.sub=value`` items
(``parse_override``, ``apply_overrides``: values parsed as YAML scalars) and ``{"key.sub": value}`` changes
(``apply_values``: values as given). Plain dicts in, copies out; unknown keys are left for the config's
validation to name."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

import yaml

from ..core.settings import ConfigError

_REQUIRED = object()


def get_dotted(data: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """``data["a"]["b"]`` for ``key = "a.b"``; a missing key raises ``KeyError`` unless ``default`` is given."""
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _REQUIRED:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"attack.eps=0.3"`` → ``(["attack", "eps"], 0.3)``; the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.sub=value, e.g. attack.eps=0.3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: the key is empty or malformed")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: cannot parse value: {exc}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str] | None) -> dict[str, Any]:
    """A copy of ``data`` with the ``--set`` items ``overrides`` applied."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        _set(data, path, value, f"--set {item!r}")
    return data


def apply_values(data: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with each dotted key of ``values`` set to its value (a mapping replaces a section)."""
    data = copy.deepcopy(data)
    for key, value in values.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{key!r}: the key is empty or malformed")
        _set(data, key.split("."), copy.deepcopy(value), key)
    return data


def _set(data: dict[str, Any], path: list[str], value: Any, what: str) -> None:
    node = data
    for part in path[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{what}: {part} is a value, not a section")
        node = nxt
    node[path[-1]] = value
