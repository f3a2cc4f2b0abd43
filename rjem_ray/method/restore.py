"""A trained model restored from its checkpoint: the classifier and the run's configuration.

``load_model(path)`` is what evaluation, generation, sweeps' trials, the MLflow model and the package's
``rjem_ray.load_model`` call; ``verify_checkpoint(path)`` reads every file of a checkpoint before work
starts. The checkpoint's files are ``checkpoint.py``'s; this module adds the one step
that needs the whole configuration: the ``config`` dict stored in ``state.pt`` validated as a
:class:`~rjem_ray.config.Config` (an invalid one is a :class:`~rjem_ray.method.checkpoint.CheckpointError`),
and the network built from its ``model`` and ``data`` sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError
from ..core.data import dataset_info
from ..core.errors import first_line
from .checkpoint import (
    GMM_FILE,
    STATE_FILE,
    CheckpointError,
    load_gmm_state,
    load_state,
    read_torch_file,
    state_file_of,
)
from .gmm import ClassConditionalGMM
from .models import build_model

__all__ = ["config_from_state", "load_model", "verify_checkpoint"]


def config_from_state(state: dict[str, Any]) -> Config:
    try:
        return Config.from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint config is invalid: {exc}") from None


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """``(model, config)`` from a checkpoint: the classifier in eval mode, logits for NCHW in [-1, 1]."""
    state = load_state(path, map_location)
    model, cfg = _model_for(state)
    model.to(map_location).eval()
    return model, cfg


def _model_for(state: dict[str, Any]):
    cfg = config_from_state(state)
    model = build_model(cfg.model, dataset_info(cfg.data.name))
    model.load_state_dict(state["model"])
    return model, cfg


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read every file of a checkpoint before any work starts; returns its state.

    ``state.pt`` must be an rjem checkpoint whose weights fit its config, ``gmm.pt`` (when present) a
    Gaussian-mixture state, every ``rank-K.pt`` a dict. The first damaged file is a :class:`CheckpointError`
    naming it, so a truncated or overwritten file fails in one line instead of deep inside the work.
    """
    state = load_state(path)
    directory = state_file_of(path).parent
    try:
        _model_for(state)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{str(directory / STATE_FILE)!r} holds weights that do not fit its config: "
                              f"{type(exc).__name__}: {first_line(exc)}") from None
    gmm = load_gmm_state(directory)
    if gmm is not None:
        try:
            ClassConditionalGMM.from_state_dict(gmm)
        except Exception as exc:
            raise CheckpointError(f"{str(directory / GMM_FILE)!r} is not a Gaussian-mixture state: "
                                  f"{type(exc).__name__}: {exc}") from None
    for f in sorted(directory.glob("rank-*.pt")) + sorted(directory.glob("buffer-*.pt")):
        if not isinstance(read_torch_file(f), dict):
            raise CheckpointError(f"{str(f)!r} is not an rjem rank or buffer file (expected a dict)")
    return state
