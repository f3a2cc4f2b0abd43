"""The Gaussian-mixture prior of an experiment, in one place: where it is cached, how a config's
training split gets it, and which one a checkpoint uses.

The prior initialises the replay buffer and the generation modes (METHOD.md): a class-conditional
Gaussian mixture (:class:`~rjem_ray.method.gmm.ClassConditionalGMM`) fitted to the full training split in the
model's [-1, 1] pixel space. It is fitted once per dataset and memory budget and cached under
``cache_dir/gmm/``; a final checkpoint keeps the one it was trained with beside it (``gmm.pt``), so
sampling and evaluating a checkpoint uses exactly that prior, and falls back to the dataset's cached
one only for checkpoints written without it.

Training (driver and workers), evaluation, sweeps and the scripts all ask this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.data import dataset_info, load_split, to_model_space
from .checkpoint import load_gmm_state
from .gmm import ClassConditionalGMM, load_or_fit_gmm

if TYPE_CHECKING:
    from ..config import Config


def gmm_cache_file(cfg: Config) -> Path:
    """``cache_dir/gmm/DATASET-maxMBmb.pt``: one cache per dataset and ``buffer.gmm_max_mb`` budget."""
    return Path(cfg.cache_dir) / "gmm" / f"{cfg.data.name}-max{cfg.buffer.gmm_max_mb}mb.pt"


def load_train_gmm(cfg: Config, images_u8: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> ClassConditionalGMM:
    """The Gaussian mixture of the full training split, fitted once per dataset and cached.

    ``images_u8`` / ``labels`` are that split when the caller has already loaded it (uint8 NCHW, int64);
    otherwise it is loaded from ``cfg.data``.
    """
    if images_u8 is None:
        images_u8, labels = load_split(cfg.data.name, "train", cfg.data.data_dir, cfg.data.download)
    return load_or_fit_gmm(
        gmm_cache_file(cfg), to_model_space(images_u8), labels, dataset_info(cfg.data.name).num_classes,
        max_bytes=cfg.buffer.gmm_max_mb * 2**20,
    )


def gmm_for_checkpoint(cfg: Config, checkpoint_dir: str | Path) -> ClassConditionalGMM:
    """The Gaussian mixture stored beside a checkpoint, or the cached/fitted one of its dataset."""
    state = load_gmm_state(checkpoint_dir)
    if state is not None:
        return ClassConditionalGMM.from_state_dict(state)
    return load_train_gmm(cfg)
