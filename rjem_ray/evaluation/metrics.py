"""Classification, robustness, calibration and out-of-distribution metrics.

Every function takes a model that maps NCHW images in [-1, 1] to logits ``f(x)`` of shape ``[B, K]``
(or tensors already computed from one) and returns plain Python floats or CPU tensors. None of them
changes the model's mode: the caller puts the model in ``eval()`` first (BatchNorm in train mode would
both use batch statistics and update its running averages).

* accuracy            ``mean[argmax_k f(x)[k] == y]``
* robust accuracy     ``mean[correct on x and on PGD_r(x) for every restart r]`` (ε in [-1, 1] units)
* ECE                 ``sum_b |B_b|/N · |acc(B_b) − conf(B_b)|`` over equal-width confidence bins (lo, hi]
* E[BR]               ``Σ_b P(b) · O(C | b) / O(C)``: expected Bayes ratio of the correctness odds over the
                      same confidence bins (Finlay & Oberman 2019; ``expected_bayes_ratio``)
* OOD AUROC           ``P(s_in > s_out) + ½ P(s_in = s_out)`` (scikit-learn's ``roc_auc_score``)
* energy score        ``−E(x) = logsumexp_k f(x)[k]`` (higher = more in-distribution)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..method.attacks import pgd
from ..method.energy import marginal_energy


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
    return accuracy_of_logits(predict_logits(model, x, batch_size), y)


def accuracy_of_logits(logits: Tensor, y: Tensor) -> float:
    """Fraction in [0, 1] of rows of ``logits`` ``[N, K]`` whose arg-max equals the label."""
    pred = logits.argmax(dim=1)
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
    """Accuracy under an untargeted PGD attack with random start (``rjem_ray.method.attacks.pgd``).

    A sample counts as robust only if it is classified correctly on the clean input **and** on the
    adversarial input of every one of ``restarts`` random restarts; so the result never exceeds
    ``accuracy``. ``eps`` is the radius of the ``norm`` ball in the model's [-1, 1] input space
    (0.1 there is 12.75/255 on the [0, 1] scale); ``step_size`` defaults to ``2.5 · eps / steps``
    (Madry et al.). Samples already broken are not attacked again.
    """
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


def _confidence_bins(probs: Tensor, labels: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(confidence, correct, bin index)`` per sample: confidence = the largest probability, correct =
    1.0 where its arg-max is the label, bin ``b`` = the equal-width bin ``(b/n_bins, (b+1)/n_bins]`` it
    falls in (right-closed, so 1.0 is in the last bin). The one binning of ECE and E[BR]."""
    probs = probs.detach().to("cpu", torch.float64)
    labels = labels.detach().to("cpu")
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    # inner edges k/n computed by division so that k/n itself lands exactly on an edge (right-closed bins)
    inner_edges = torch.arange(1, n_bins, dtype=torch.float64) / n_bins
    return conf, correct, torch.bucketize(conf, inner_edges, right=False)


def _check_probs(probs: Tensor, labels: Tensor, n_bins: int, name: str) -> None:
    if probs.dim() != 2 or labels.dim() != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be [N, K] and labels [N], got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError(f"{name} needs at least one sample")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 20) -> float:
    """ECE = ``sum_b |B_b|/N · |acc(B_b) − conf(B_b)|`` with ``n_bins`` equal-width bins on (0, 1].

    ``probs`` is ``[N, K]`` (rows are class probabilities, e.g. a softmax), ``labels`` is ``[N]``.
    The confidence of a sample is its largest probability, its prediction the arg-max. Bin ``b``
    holds the confidences in ``(b/n_bins, (b+1)/n_bins]`` (right-closed, so 1.0 falls in the last bin);
    empty bins contribute nothing. Unitless, in [0, 1].
    """
    _check_probs(probs, labels, n_bins, "expected_calibration_error")
    conf, correct, bins = _confidence_bins(probs, labels, n_bins)
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    sum_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    # |B_b|/N · |acc_b − conf_b| = |sum_acc_b − sum_conf_b| / N
    return ((sum_acc - sum_conf).abs().sum() / conf.shape[0]).item()


def confidence_histogram(probs: Tensor, labels: Tensor, n_bins: int = 20) -> dict:
    """Counts of correct and wrong predictions per equal-width confidence bin (ECE's bins).

    ``{"edges": [0, 1/n, ..., 1], "correct": [c_b], "wrong": [w_b]}``; bin ``b`` is ``(edges[b], edges[b+1]]``.
    This stored histogram is all :func:`bayes_ratio_from_histogram` needs.
    """
    _check_probs(probs, labels, n_bins, "confidence_histogram")
    _, correct, bins = _confidence_bins(probs, labels, n_bins)
    c = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    w = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, 1 - correct)
    return {"edges": [k / n_bins for k in range(n_bins + 1)], "correct": [int(v) for v in c.tolist()],
            "wrong": [int(v) for v in w.tolist()]}


def bayes_ratio_from_histogram(correct: list[int], wrong: list[int], pseudo_count: float = 1.0) -> dict:
    """Expected Bayes ratio of the correctness odds, from a histogram of an uncertainty metric.

    After Finlay & Oberman 2019 ("Empirical confidence estimates for classification by deep neural
    networks"): the stored histogram of the softmax confidence gives, for a new prediction whose
    confidence falls in bin ``b``, the probability ``P(C | b)`` that it is correct. How much knowing
    ``b`` tells is the Bayes ratio of the event "the prediction is correct" (``C``): posterior odds over
    prior odds,

        ``BR_b = O(C | b) / O(C)``,  ``O(C | b) = P(C | b) / (1 − P(C | b))``,  ``O(C) = P(C) / (1 − P(C))``,

    which by Bayes' rule is also the likelihood ratio ``P(b | C) / P(b | W)`` (``W``: wrong). Its
    expectation over the bins a prediction falls in,

        ``E[BR] = Σ_b P(b) · BR_b``,  ``P(b) = n_b / N``,

    equals ``1 + P(C) · χ²(P(· | C) ‖ P(· | W))`` when ``pseudo_count`` is 0: it is 1 for a histogram that
    tells nothing (every bin has the overall accuracy) and grows as the bins separate right from wrong
    predictions. Unitless, ≥ 1 without smoothing.

    A bin with no wrong predictions has infinite odds, so the probabilities are estimated with
    ``pseudo_count`` added to each outcome's count (``pseudo_count = 1``: Laplace's rule of succession),
    in the bins and in the prior alike: ``O(C | b) = (c_b + a) / (w_b + a)``, ``O(C) = (C + a) / (W + a)``
    with ``C = Σ c_b``, ``W = Σ w_b``. Empty bins (``n_b = 0``) have ``P(b) = 0`` and add nothing.

    Returns ``{"ebr", "bayes_ratio": [BR_b] (None for empty bins), "posterior_correct": [P(C | b)],
    "prior_correct": P(C), "pseudo_count"}``. With ``pseudo_count = 0`` and a bin without wrong (or
    without correct) predictions the ratio is infinite (or 0): the result is ``inf`` then.
    """
    if len(correct) != len(wrong) or not correct:
        raise ValueError(f"correct and wrong must be equal-length, non-empty count lists, got {len(correct)} and {len(wrong)}")
    if pseudo_count < 0 or any(v < 0 for v in list(correct) + list(wrong)):
        raise ValueError("counts and pseudo_count must be >= 0")
    c = torch.tensor(correct, dtype=torch.float64)
    w = torch.tensor(wrong, dtype=torch.float64)
    n = c + w
    total = n.sum()
    if total == 0:
        raise ValueError("bayes_ratio_from_histogram needs at least one counted prediction")
    a = float(pseudo_count)
    prior_odds = (c.sum() + a) / (w.sum() + a)
    occupied = n > 0
    br = (c + a) / (w + a) / prior_odds  # inf where w_b + a = 0
    ebr = (n[occupied] / total * br[occupied]).sum().item()
    posterior = (c + a) / (n + 2 * a)
    return {
        "ebr": ebr,
        "bayes_ratio": [b if o else None for b, o in zip(br.tolist(), occupied.tolist())],
        "posterior_correct": [p if o else None for p, o in zip(posterior.tolist(), occupied.tolist())],
        "prior_correct": ((c.sum() + a) / (total + 2 * a)).item(),
        "pseudo_count": a,
    }


def expected_bayes_ratio(probs: Tensor, labels: Tensor, n_bins: int = 20, pseudo_count: float = 1.0) -> tuple[float, dict]:
    """E[BR] of the softmax-confidence histogram (:func:`bayes_ratio_from_histogram` over
    :func:`confidence_histogram`); returns ``(E[BR], histogram with its per-bin ratios)``."""
    hist = confidence_histogram(probs, labels, n_bins)
    res = bayes_ratio_from_histogram(hist["correct"], hist["wrong"], pseudo_count)
    return res.pop("ebr"), {**hist, **res}


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
