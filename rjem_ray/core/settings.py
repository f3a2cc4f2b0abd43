"""How a configuration section is declared, built from a mapping, and checked (``rjem_ray.config`` assembles
the sections, each declared beside the module it configures, into one ``Config``).

A section is a frozen dataclass whose fields carry their own constraints: ``setting(default, choices=...,
ge=..., ...)`` puts them in the field's metadata, beside the field. :func:`build` turns a (YAML) mapping into
the dataclass: unknown keys are refused, values coerced to the field's type (YAML booleans of an
``auto | true | false`` switch become ``"true"``/``"false"``, path fields become absolute), so nothing is
rewritten afterwards. :func:`check` then walks the built tree once: every field against its constraints
(each item of a list field), then every section's ``cross_check(root)``, the rules that involve two keys.
Every complaint is one :class:`ConfigError` line that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and what is allowed."""


# check(key, value) -> the whole one-line complaint, or None when the value is fine
Check = Callable[[str, Any], "str | None"]


def setting(default: Any, *, choices: tuple = (), ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, nonempty: bool | str = False,
            check: Check | None = None, bools: bool = False, path: bool = False) -> Any:
    """A dataclass field with its constraints in its metadata.

    ``choices``: the allowed values; ``ge``/``gt``/``le``/``lt``: bounds (``>=``, ``>``, ``<=``, ``<``); on a
    list field both apply to each item, and ``nonempty`` refuses an empty list (a string: what the message
    then asks for, else "list one or more of <choices>"). ``check``: a rule of the value alone, as a
    function of (key, value) that returns the complaint or None. ``None`` passes choices and bounds (an
    optional key left unset). Coercion at load: ``bools`` turns YAML true/false into "true"/"false";
    ``path`` makes a local path absolute against the loading process's working directory.
    """
    given = {"choices": tuple(choices), "ge": ge, "gt": gt, "le": le, "lt": lt, "nonempty": nonempty,
             "check": check, "bools": bools, "path": path}
    meta = {k: v for k, v in given.items() if v is not None and v is not False and v != ()}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------- building


def build(cls: type, data: Any, prefix: str = "", renamed: dict[str, str] | None = None) -> Any:
    """The dataclass ``cls`` from the mapping ``data`` (None: the defaults), its keys under ``prefix``;
    ``renamed`` maps old dotted keys to what the unknown-key error should name instead."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    for key in unknown:
        if renamed and f"{prefix}{key}" in renamed:
            raise ConfigError(f"{prefix}{key} was renamed {renamed[prefix + key]}")
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; allowed keys under {prefix.rstrip('.') or 'the top level'}: "
            + ", ".join(sorted(fields))
        )
    given = {**{n: f.default for n, f in fields.items() if f.metadata.get("path")}, **data}  # default paths too
    kwargs = {name: _coerce(hints[name], given[name], f"{prefix}{name}", f.metadata, renamed)
              for name, f in fields.items() if name in given}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, meta: typing.Mapping[str, Any], renamed: dict[str, str] | None) -> Any:
    if meta.get("bools") and isinstance(value, bool):
        return "true" if value else "false"
    value = _coerce_type(tp, value, key, renamed)
    if meta.get("path") and value is not None:
        return os.path.abspath(value)
    return value


def _coerce_type(tp: Any, value: Any, key: str, renamed: dict[str, str] | None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".", renamed)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce_type(inner[0], value, key, renamed)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce_type(args[0], v, key, renamed) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not allowed; it must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


# ----------------------------------------------------------------------------------------------- checking


def check(root: Any, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for the first field of ``root`` (field order, depth first) that breaks its
    constraints, then for the first section whose ``cross_check(root)`` complains; ``prefix`` starts every key
    the messages name (``"tune."`` for a sweep file's ``tune:`` section)."""
    sections: list[Any] = []
    _check_fields(root, prefix, sections)
    for section in sections:
        section.cross_check(root)


def _check_fields(section: Any, prefix: str, sections: list[Any]) -> None:
    for f in dataclasses.fields(section):
        key, value, meta = f"{prefix}{f.name}", getattr(section, f.name), f.metadata
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".", sections)
            continue
        if isinstance(value, list):
            if not value and meta.get("nonempty"):
                wanted = meta["nonempty"]
                raise ConfigError(f"{key}: empty; " + (wanted if isinstance(wanted, str)
                                                       else f"list one or more of {_join(meta['choices'])}"))
            for item in value:
                _check_value(key, item, meta)
        else:
            _check_value(key, value, meta)
        problem = meta["check"](key, value) if "check" in meta else None
        if problem:
            raise ConfigError(problem)
    if hasattr(section, "cross_check"):
        sections.append(section)


def check_choice(key: str, value: Any, choices: tuple) -> None:
    """A :class:`ConfigError` naming ``key`` and ``choices`` when ``value`` is not one of them (the message every
    ``choices`` constraint gives; for names a section checks in its ``cross_check``)."""
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {_join(choices)}")


def _check_value(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if value is None:
        return
    if meta.get("choices"):
        check_choice(key, value, meta["choices"])
    ge, gt, le, lt = (meta.get(b) for b in ("ge", "gt", "le", "lt"))
    if ((ge is not None and value < ge) or (gt is not None and value <= gt)
            or (le is not None and value > le) or (lt is not None and value >= lt)):
        raise ConfigError(f"{key}: {value!r} is out of range; it must be {_bounds(ge, gt, le, lt)}")


def _bounds(ge: Any, gt: Any, le: Any, lt: Any) -> str:
    """``>= 0``, ``> 0``, ``in [0.0, 1.0]``, ``in (0, 1]``, ... as the range error states them."""
    low, high = (ge if ge is not None else gt), (le if le is not None else lt)
    if high is None:
        return f"{'>=' if ge is not None else '>'} {low}"
    if low is None:
        return f"{'<=' if le is not None else '<'} {high}"
    return f"in {'[' if ge is not None else '('}{low}, {high}{']' if le is not None else ')'}"


def _join(choices: tuple) -> str:
    return ", ".join(str(c) for c in choices)
