"""BatchNorm modes of the training step's passes: which statistics a pass normalises with, and which it moves.

A BatchNorm layer in train mode normalises by the batch's own statistics and moves its running statistics,
``running ← (1 − momentum)·running + momentum·batch``; in eval mode it normalises by the running statistics
and moves nothing. The running statistics describe data only (they are what evaluation and generation
normalise with), so every pass that is not the classification batch's — PGD, the Langevin sampler, gradreg's
input gradient, the loss's view of the negatives and (by default) of the clean positive batch — uses one of
the views here:

* :func:`running_stats_frozen` — batch statistics, running statistics untouched (``momentum = 0``);
* :func:`batchnorm_eval` — running statistics for the BatchNorm layers only (dropout etc. untouched);
* :func:`pass_mode` — a whole input-gradient pass (``attack.bn_mode``, ``train.sampler_bn_mode``):
  ``"train"`` is the first view, ``"eval"`` the network in eval mode.

Pure: torch only.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager

from torch import nn

__all__ = ["BN_MODES", "is_batchnorm", "running_stats_frozen", "batchnorm_eval", "pass_mode"]

BN_MODES = ("eval", "train")  # running statistics | the batch's own statistics (running ones frozen)


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@contextmanager
def running_stats_frozen(model: nn.Module):
    """BatchNorm in train mode normalises by batch statistics but leaves its running statistics alone.

    ``momentum = 0`` makes the update ``running ← (1 − 0)·running + 0·batch`` a no-op.
    """
    bns = [m for m in model.modules() if is_batchnorm(m)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


@contextmanager
def batchnorm_eval(model: nn.Module):
    """BatchNorm layers normalise by their running statistics (eval mode); everything else untouched.

    Used for the loss's view of the negative samples when the sampler ran in eval mode, so that the
    energy the loss raises, ``E(x_q)``, is the very energy the sampler lowered. Running statistics are
    neither used from the batch nor updated.
    """
    bns = [m for m in model.modules() if is_batchnorm(m)]
    saved = [(m.training, m.running_mean, m.running_var) for m in bns]
    for m in bns:
        m.eval()
        # The pass normalises with copies: a backward through it (the loss's view of x_q) may need the
        # statistics it used (a compiled graph saves them), while the next train-mode passes update the
        # originals in place before that backward runs.
        if m.running_mean is not None:
            m.running_mean, m.running_var = m.running_mean.clone(), m.running_var.clone()
    try:
        yield
    finally:
        for m, (mode, mean, var) in zip(bns, saved):
            m.train(mode)
            if mean is not None:
                m.running_mean, m.running_var = mean, var


@contextmanager
def pass_mode(net: nn.Module, model: nn.Module, bn_mode: str):
    """``net`` set up for an input-gradient pass under ``bn_mode`` (one of :data:`BN_MODES`), then back in
    the train/eval mode ``model`` was in.

    ``"train"``: the network in train mode, BatchNorm normalising by the batch's own statistics with the
    running statistics frozen (:func:`running_stats_frozen` on ``model``); ``"eval"``: the whole network in
    eval mode (running statistics; dropout off too). ``net`` is the module the pass calls (a ``FastNet``
    around ``model``); ``model`` holds the BatchNorm layers and the train/eval flag restored afterwards.
    """
    was_training = model.training
    batch_stats = bn_mode == "train"
    net.train(batch_stats)
    try:
        with running_stats_frozen(model) if batch_stats else contextlib.nullcontext():
            yield
    finally:
        net.train(was_training)
