"""Classification, robustness, calibration and out-of-distribution metrics.

Every function takes a model that maps NCHW images in [-1, 1] to logits ``f(x)`` of shape ``[B, K]``
(or tensors already computed from one) and returns plain Python floats or CPU tensors. None of them
changes the model's mode: the caller puts the model in ``eval()`` first (BatchNorm in train mode would
both use batch statistics and update its running averages).

* accuracy            ``mean[argmax_k f(x)[k] == y]``
* robust accuracy     ``mean[correct on x and on PGD_r(x) for every restart r]`` (ε in [-1, 1] units)
* ECE                 ``sum_b |B_b|/N · |acc(B_b) − conf(B_b)|`` over equal-width confidence bins (lo, hi]
* OOD AUROC           ``P(s_in > s_out) + ½ P(s_in = s_out)`` (scikit-learn's ``roc_auc_score``)
* energy score        ``−E(x) = logsumexp_k f(x)[k]`` (higher = more in-distribution)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .energy import marginal_energy


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return fallback


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Logits ``f(x)`` of shape ``[N, K]``, computed in batches without gradients.

    Batches are moved to the model's device; the result is returned on ``x``'s device. The model's
    mode (train/eval) is left as it is.
    """
    _check_batch_size(batch_size)
    device = _device_of(model, x.device)
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            out.append(model(x[start : start + batch_size].to(device)).to(x.device))
    if not out:
        raise ValueError("predict_logits needs at least one input")
    return torch.cat(out)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Fraction in [0, 1] of inputs whose arg-max logit equals the label."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}")
    pred = predict_logits(model, x, batch_size).argmax(dim=1)
    return (pred == y.to(pred.device)).double().mean().item()


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    norm: str = "linf",
    restarts: int = 1,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """Accuracy under an untargeted PGD attack with random start (``rjem_ray.attacks.pgd``).

    A sample counts as robust only if it is classified correctly on the clean input **and** on the
    adversarial input of every one of ``restarts`` random restarts; so the result never exceeds
    ``accuracy``. ``eps`` is the radius of the ``norm`` ball in the model's [-1, 1] input space
    (0.1 there is 12.75/255 on the [0, 1] scale); ``step_size`` defaults to ``2.5 · eps / steps``
    (Madry et al.). Samples already broken are not attacked again.
    """
    from .attacks import pgd  # lazy: attacks imports nothing from here, but keep metrics importable alone

    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
    _check_batch_size(batch_size)
    if x.shape[0] == 0:
        raise ValueError("robust_accuracy needs at least one input")
    if step_size is None:
        step_size = 2.5 * eps / steps
    device = _device_of(model, x.device)

    robust = 0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        with torch.no_grad():
            alive = model(xb).argmax(dim=1) == yb
        for _ in range(restarts):
            idx = alive.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x_adv = pgd(
                model,
                xb[idx],
                yb[idx],
                eps=eps,
                steps=steps,
                step_size=step_size,
                norm=norm,
                targeted=False,
                random_start=True,
                generator=generator,
            )
            with torch.no_grad():
                alive[idx] = model(x_adv).argmax(dim=1) == yb[idx]
        robust += int(alive.sum().item())
    return robust / x.shape[0]


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 20) -> float:
    """ECE = ``sum_b |B_b|/N · |acc(B_b) − conf(B_b)|`` with ``n_bins`` equal-width bins on (0, 1].

    ``probs`` is ``[N, K]`` (rows are class probabilities, e.g. a softmax), ``labels`` is ``[N]``.
    The confidence of a sample is its largest probability, its prediction the arg-max. Bin ``b``
    holds the confidences in ``(b/n_bins, (b+1)/n_bins]`` (right-closed, so 1.0 falls in the last bin);
    empty bins contribute nothing. Unitless, in [0, 1].
    """
    if probs.dim() != 2 or labels.dim() != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be [N, K] and labels [N], got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("expected_calibration_error needs at least one sample")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = probs.detach().to("cpu", torch.float64)
    labels = labels.detach().to("cpu")
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    # inner edges k/n computed by division so that k/n itself lands exactly on an edge (right-closed bins)
    inner_edges = torch.arange(1, n_bins, dtype=torch.float64) / n_bins
    bins = torch.bucketize(conf, inner_edges, right=False)
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    sum_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    # |B_b|/N · |acc_b − conf_b| = |sum_acc_b − sum_conf_b| / N
    return ((sum_acc - sum_conf).abs().sum() / conf.shape[0]).item()


def ood_auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """AUROC for "in-distribution scores are larger": ``P(s_in > s_out) + ½ P(s_in = s_out)``.

    scikit-learn's ``roc_auc_score`` with the in-distribution scores as the positive class (label 1):
    the area under the ROC curve equals the Mann–Whitney ``U / (n_in · n_out)``, and a tied pair adds ½
    (the curve's step across tied scores is a diagonal). 1.0 = perfect separation, 0.5 = chance,
    0.0 = reversed.
    """
    from sklearn.metrics import roc_auc_score  # lazy: importing scikit-learn takes 1-2 s; only OOD needs it

    s_in = torch.as_tensor(scores_in).detach().reshape(-1).to("cpu", torch.float64).numpy()
    s_out = torch.as_tensor(scores_out).detach().reshape(-1).to("cpu", torch.float64).numpy()
    n_in, n_out = s_in.size, s_out.size
    if n_in == 0 or n_out == 0:
        raise ValueError(f"ood_auroc needs scores on both sides, got {n_in} in and {n_out} out")
    both = np.concatenate([s_in, s_out])
    if np.isnan(both).any():
        raise ValueError("ood_auroc got NaN scores")
    is_in = np.concatenate([np.ones(n_in, dtype=np.int64), np.zeros(n_out, dtype=np.int64)])
    return float(roc_auc_score(is_in, both))


def energy_scores(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """OOD score ``−E(x) = logsumexp_k f(x)[k]`` per sample, shape ``[N]`` (higher = more in-distribution)."""
    return -marginal_energy(predict_logits(model, x, batch_size))
