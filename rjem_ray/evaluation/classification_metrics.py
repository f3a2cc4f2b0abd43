"""The classification metrics of ``rjem eval``: ``accuracy``, ``ece``, ``ebr``, all on the whole test split.

They share one pass over the test split (``EvalContext.test_logits``: logits under ``train.precision``'s
autocast, fp32); the formulas are in ``rjem_ray/evaluation/metrics.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .metric_base import Metric, MetricResult
from .metrics import accuracy_of_logits, expected_bayes_ratio, expected_calibration_error

if TYPE_CHECKING:
    from .metric_base import EvalContext


class Accuracy(Metric):
    """``accuracy``: the fraction in [0, 1] of test images whose arg-max logit is the label (clean accuracy).
    The protocol block of the evaluation (dataset, split, ``num_test``, precision) is its protocol."""

    name = "accuracy"

    def run(self, ctx: EvalContext) -> MetricResult:
        return MetricResult({"accuracy": accuracy_of_logits(ctx.test_logits(), ctx.y)})


class ExpectedCalibrationError(Metric):
    """``ece``: ``sum_b |B_b|/N · |acc(B_b) − conf(B_b)|`` over ``eval.ece_bins`` equal-width bins of the
    max softmax probability; a fraction in [0, 1] (0: calibrated). Protocol: bins, binning, sample count."""

    name = "ece"
    protocol_key = "ece"
    config_keys = ("eval.ece_bins",)

    def run(self, ctx: EvalContext) -> MetricResult:
        bins = ctx.cfg.eval.ece_bins
        ece = expected_calibration_error(ctx.test_logits().softmax(1).cpu(), ctx.y.cpu(), bins)
        return MetricResult({"ece": ece},
                            {"bins": bins, "binning": "equal-width confidence", "num_samples": len(ctx.y)})


class ExpectedBayesRatio(Metric):
    """``ebr``: E[BR] = ``Σ_b P(b) · O(C | b) / O(C)``, the odds of a correct prediction given its confidence
    bin over the prior odds (Finlay & Oberman 2019), unitless (1: confidence says nothing; larger: it
    separates right from wrong). Protocol: the definition, bins, pseudo-count and the per-bin histogram."""

    name = "ebr"
    protocol_key = "ebr"
    config_keys = ("eval.ece_bins", "eval.ebr_pseudo_count")

    def run(self, ctx: EvalContext) -> MetricResult:
        e = ctx.cfg.eval
        ebr, hist = expected_bayes_ratio(ctx.test_logits().softmax(1).cpu(), ctx.y.cpu(), e.ece_bins,
                                         e.ebr_pseudo_count)
        return MetricResult({"ebr": ebr}, {
            "definition": "E[BR] = sum_b P(b) O(C|b)/O(C), odds of a correct prediction given its confidence bin "
                          "over the prior odds (Finlay & Oberman 2019)",
            "uncertainty_metric": "max softmax probability", "bins": e.ece_bins,
            "binning": "equal-width confidence (b/bins, (b+1)/bins]", "pseudo_count": e.ebr_pseudo_count,
            "num_samples": len(ctx.y), "histogram": hist,
        })
