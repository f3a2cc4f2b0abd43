"""Tests of rjem_ray.method.prior: the experiment's Gaussian-mixture prior, cached once, and a checkpoint's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rjem_ray.method.gmm
from rjem_ray.core.files import atomic_torch_save
from rjem_ray.method.checkpoint import GMM_FILE
from rjem_ray.config import load_config
from rjem_ray.core.data import load_split, to_model_space
from rjem_ray.method.prior import gmm_cache_file, gmm_for_checkpoint, load_train_gmm

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *sets):
    return load_config(REPO / "tune_configs" / "smoke.yaml", [f"cache_dir={tmp_path / 'cache'}", *sets])


def _same(a, b) -> bool:
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in ("means", "factors", "resid_std"))


def test_train_prior_is_the_training_split_fitted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    assert gmm_cache_file(cfg) == tmp_path / "cache" / "gmm" / f"mnist5k-max{cfg.buffer.gmm_max_mb}mb.pt"
    gmm = load_train_gmm(cfg)  # loads the split itself
    assert gmm_cache_file(cfg).is_file()
    x, y = load_split("mnist5k", "train")
    class_3 = to_model_space(x[y == 3]).flatten(1).double().mean(0)
    assert torch.allclose(gmm.means[3].double(), class_3, atol=1e-5)  # μ_c of the training split in [-1, 1]

    def no_refit(*args, **kwargs):
        raise AssertionError("refitted although the cache holds the prior")

    monkeypatch.setattr(rjem_ray.method.gmm, "fit_class_gmm", no_refit)
    assert _same(load_train_gmm(cfg, x, y), gmm)
    other = _cfg(tmp_path, "buffer.gmm_max_mb=1")  # another budget is another prior (low rank): not this cache
    assert gmm_cache_file(other) != gmm_cache_file(cfg)
    with pytest.raises(AssertionError, match="refitted"):
        load_train_gmm(other, x, y)


def test_checkpoint_prior_is_the_one_stored_beside_it_else_the_datasets(tmp_path):
    cfg = _cfg(tmp_path)
    train = load_train_gmm(cfg)
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    assert _same(gmm_for_checkpoint(cfg, ckpt), train)  # written without a prior: the dataset's cached one
    stored = train.state_dict()
    stored["means"] = stored["means"] + 0.25
    atomic_torch_save(stored, ckpt / GMM_FILE)
    got = gmm_for_checkpoint(cfg, ckpt)
    assert torch.equal(got.means, train.means + 0.25) and not _same(got, train)


def test_the_prior_has_one_home():
    import rjem_ray.evaluation.evaluate
    import rjem_ray.method.prior
    import rjem_ray.distributed.train_driver
    import rjem_ray.distributed.train_worker

    # The training code and the evaluation call the same functions, not copies of them.
    assert rjem_ray.distributed.train_worker.load_train_gmm is rjem_ray.method.prior.load_train_gmm
    assert rjem_ray.distributed.train_driver.load_train_gmm is rjem_ray.method.prior.load_train_gmm
    assert rjem_ray.distributed.train_driver.gmm_for_checkpoint is rjem_ray.method.prior.gmm_for_checkpoint
    source = Path(rjem_ray.evaluation.evaluate.__file__).read_text()
    assert "train_worker" not in source and "train_driver" not in source  # no import circle through evaluate
