"""The edge: a config from a YAML file (or a config in hand), MLflow's environment variables and ``--set``
overrides, in that order of precedence (lowest first), validated once; and back to YAML."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from ..core.settings import ConfigError
from .overrides import apply_overrides
from .root import Config

# MLflow's own variables. Precedence: --set tracking.KEY > the variable > the config file > the default.
TRACKING_ENV = {"tracking_uri": "MLFLOW_TRACKING_URI", "registry_uri": "MLFLOW_REGISTRY_URI",
                "experiment": "MLFLOW_EXPERIMENT_NAME"}


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist (configs live in tune_configs/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def with_tracking_env(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` whose tracking keys are replaced by MLflow's environment variables where set."""
    env = {key: os.environ[var] for key, var in TRACKING_ENV.items() if os.environ.get(var)}
    if not env:
        return data
    data = copy.deepcopy(data)
    tracking = data.get("tracking")
    if tracking is None:
        tracking = data["tracking"] = {}
    if not isinstance(tracking, dict):
        raise ConfigError(f"tracking: expected a mapping, got {type(tracking).__name__}")
    tracking.update(env)
    return data


def load_config(source: str | Path | Config | None = None, overrides: list[str] | None = None) -> Config:
    """The config of ``source`` (a YAML file, a config such as a checkpoint's, or None: the defaults) under
    MLflow's environment variables, then ``overrides`` (``--set`` items), validated, with ``cache_dir`` and
    ``data.data_dir`` absolute against this working directory."""
    if isinstance(source, Config):
        data = source.to_dict()
    else:
        data = read_yaml(source) if source is not None else {}
    return Config.from_dict(apply_overrides(with_tracking_env(data), overrides))


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
