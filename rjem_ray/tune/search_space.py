"""Search spaces written in YAML, checked against the typed config, turned into Ray Tune domains.

A sweep's ``search`` section maps dotted config keys to one distribution each::

    search:
      generate.mode:             {grid: [energy, combined]}    # every value, crossed with the other grids
      generate.contrast:         {uniform: [0.5, 0.9]}         # float in [low, high]
      generate.sampler.step_size: {loguniform: [0.05, 0.5]}    # float, log-uniform in [low, high], low > 0
      generate.sampler.steps:    {randint: [10, 50]}           # integer in [low, high], BOTH ends included
      generate.pgd_eps:          {choice: [0.3, 0.5]}          # one value drawn per trial

``grid`` values are all run (Tune's ``grid_search``; several grids form their cross product, and the
whole product is repeated ``tune.num_samples`` times); the other kinds are drawn once per trial.
Note ``randint`` includes ``high`` here, unlike ``ray.tune.randint``.

Every key must name a leaf of :class:`~rjem_ray.config.Config`; integer keys take ``randint``,
``choice`` or ``grid`` only. Each listed value — and both ends of a range — is validated as part of
the sweep's base config before anything starts, so a typo or an out-of-range value fails with the
key's name at the edge, not inside a trial an hour later.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from ..config import Config, ConfigError, apply_values, get_dotted

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
RANGE_KINDS = ("uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Param:
    """One searched key: ``kind`` and its ``values`` (the listed values, or ``(low, high)`` of a range)."""

    key: str
    kind: str
    values: tuple

    def domain(self) -> Any:
        """The Ray Tune search-space object for this parameter."""
        from ray import tune  # lazy: rjem_ray/cli.py's parser imports the tune package; Ray loads when a sweep runs

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(int(low), int(high) + 1)  # Ray's upper bound is exclusive; ours is inclusive

    def describe(self) -> str:
        return f"{self.kind}({', '.join(map(str, self.values))})"

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take: a listed value, or inside ``[low, high]``."""
        if self.kind in ("grid", "choice"):
            return value in self.values
        low, high = self.values
        return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


# ----------------------------------------------------------------------------------------------- config keys


def leaf_type(key: str) -> type:
    """The Python type of the config leaf ``key`` (``"generate.sampler.steps"`` → ``int``)."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"search.{key}: {'.'.join(parts[:i])} is a value, not a section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"search.{key}: unknown key {part!r}; allowed keys under {where}: "
                              + ", ".join(sorted(hints)))
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"search.{key}: is a section; search one of its keys, e.g. {key}.{dataclasses.fields(cls)[0].name}")
    if typing.get_origin(cls) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        cls = next(a for a in typing.get_args(cls) if a is not type(None))
    return cls


# ----------------------------------------------------------------------------------------------- parsing


def _parse_one(key: str, spec: Any) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"search.{key}: expected one of {{{': [...]}, {'.join(KINDS)}: [...]}}, got {spec!r} "
                          "(a fixed value belongs in the experiment keys, not in search)")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"search.{key}: {kind!r} is not a distribution; choose one of {', '.join(KINDS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"search.{key}: {kind} takes a non-empty list, got {values!r}")
    if kind in RANGE_KINDS:
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"search.{key}: {kind} takes [low, high] (two numbers), got {values!r}")
        low, high = values
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ConfigError(f"search.{key}: {kind} needs finite low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"search.{key}: loguniform needs low > 0, got {low}")
        if kind == "randint" and (int(low) != low or int(high) != high):
            raise ConfigError(f"search.{key}: randint takes integer ends, got [{low}, {high}]")
    return Param(key, kind, tuple(values))


def parse_search(
    search: Any, base: dict[str, Any], allowed_prefixes: tuple[str, ...] | None = None,
    forbidden: tuple[str, ...] = (),
) -> list[Param]:
    """Parse and validate a ``search`` mapping against the experiment config dict ``base``.

    ``allowed_prefixes`` restricts the keys (e.g. ``("generate.",)`` when the model is fixed);
    ``forbidden`` names keys (or ``prefix.``) that must not be searched.
    """
    if not isinstance(search, dict) or not search:
        raise ConfigError("search: expected a non-empty mapping of dotted config keys to distributions, "
                          "e.g. search: {generate.contrast: {uniform: [0.5, 0.9]}}")
    params = []
    for key, spec in search.items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"search: {key!r} is not a dotted config key")
        if allowed_prefixes and not key.startswith(allowed_prefixes):
            raise ConfigError(f"search.{key}: not searchable in this scope; allowed keys start with "
                              + " or ".join(allowed_prefixes))
        if any(key == f or (f.endswith(".") and key.startswith(f)) for f in forbidden):
            raise ConfigError(f"search.{key}: must not be searched (it changes the measurement, not the model); "
                              f"not searchable: {', '.join(forbidden)}")
        tp = leaf_type(key)
        param = _parse_one(key, spec)
        if tp is int and param.kind in ("uniform", "loguniform"):
            raise ConfigError(f"search.{key}: is an integer; use randint, choice or grid, not {param.kind}")
        if tp not in (int, float) and param.kind in RANGE_KINDS:
            raise ConfigError(f"search.{key}: is not numeric ({tp.__name__}); use choice or grid")
        for value in param.values:  # each candidate (both ends of a range) must make a valid config
            try:
                Config.from_dict(apply_values(base, {key: value}))
            except ConfigError as exc:
                raise ConfigError(f"search.{key}: value {value!r} is invalid: {exc}") from None
        params.append(param)
    return params


def param_space(params: list[Param]) -> dict[str, Any]:
    """Tune's ``param_space``: flat, keyed by the dotted config keys."""
    return {p.key: p.domain() for p in params}


def base_point(params: list[Param], base: dict[str, Any]) -> dict[str, Any]:
    """The base config's own value of each searched key, flat like :func:`param_space`: the baseline trial.

    Each value must lie in its parameter's domain (a model-based search fits its model to it); one that
    does not raises :class:`ConfigError` naming the key, the value and the domain.
    """
    point = {}
    for p in params:
        value = get_dotted(base, p.key)
        if not p.contains(value):
            raise ConfigError(f"search.{p.key}: the base config's value {value!r} is outside {p.describe()}; the "
                              "baseline trial runs the base config, so widen the search or set the key to a value inside it")
        point[p.key] = value
    return point


def num_trials(params: list[Param], num_samples: int) -> int:
    """How many trials Tune's default search creates: ``num_samples`` × the size of the grid product."""
    n = num_samples
    for p in params:
        if p.kind == "grid":
            n *= len(p.values)
    return n
