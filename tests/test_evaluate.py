"""The opt-in metrics of ``rjem eval`` (ebr, min-norm, certified) as ``evaluate_model`` reports them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import rjem_ray  # noqa: F401  (installs the torchvision shim before anything else)
from rjem_ray.config import Config, load_config
from rjem_ray.evaluate import evaluate_model


def _linear_mnist() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()


def test_defaults_do_not_include_the_opt_in_metrics():
    assert not {"ebr", "min-norm", "certified"} & set(Config().eval.metrics)


def test_ebr_is_reported_with_its_histogram():
    cfg = load_config(None, ["eval.ece_bins=10"])
    out = evaluate_model(_linear_mnist(), cfg, ["ebr"])
    hist = out["protocol"]["ebr"]["histogram"]
    n = out["protocol"]["num_test"]
    assert sum(hist["correct"]) + sum(hist["wrong"]) == n and len(hist["correct"]) == 10
    assert out["ebr"] > 0 and "ece" not in out
    json.dumps(out)  # metrics.json must be able to hold it
