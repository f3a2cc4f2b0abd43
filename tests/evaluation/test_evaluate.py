"""The opt-in metrics of ``rjem eval`` (ebr, min-norm, certified) as ``evaluate_model`` reports them; the registry of
metric objects and the one threat model the robustness metrics share."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import rjem_ray  # noqa: F401  (installs the torchvision shim before anything else)
from rjem_ray.config import Config, load_config
from rjem_ray.evaluation.evaluate import evaluate_model


def _linear_mnist() -> nn.Module:
    """A linear classifier of the 28×28 digits (~0.85 test accuracy): 100 full-batch Adam steps, seed 0."""
    from rjem_ray.core.data import load_split, to_model_space

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    imgs, labels = load_split("mnist5k", "train")
    x = to_model_space(imgs)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        loss = nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


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


def test_min_norm_reports_distances_curve_reference_and_files(tmp_path):
    cfg = load_config(None, ["eval.min_norm_max_samples=12", "eval.min_norm_runs=[logbarrier-l2,proxlogbarrier-l0]",
                             "eval.min_norm_outer_steps=3", "eval.min_norm_inner_steps=5",
                             "eval.min_norm_reference_iterations=10", "eval.min_norm_curve_points=5"])
    out = evaluate_model(_linear_mnist(), cfg, ["min-norm"], artifact_dir=tmp_path)
    runs, proto = out["min_norm"], out["protocol"]["min_norm"]
    assert set(runs) == {"logbarrier-l2", "proxlogbarrier-l0"}
    l2 = runs["logbarrier-l2"]
    assert len(l2["distances"]) == 12 == proto["num_samples"] == len(proto["test_indices"])
    assert l2["median_01"] == pytest.approx(l2["median"] / 2)
    assert l2["curve"]["eps_01"] == pytest.approx([e / 2 for e in l2["curve"]["eps"]])
    acc = l2["curve"]["robust_accuracy"]
    assert acc == sorted(acc, reverse=True) and acc[-1] == 0.0  # down to the largest finite distance
    assert "median_ratio" in l2 and l2["reference"]["norm"] == "l2"  # FAB answered for L2 ...
    assert "reference" not in runs["proxlogbarrier-l0"]  # ... and has no L0
    assert runs["proxlogbarrier-l0"]["curve"]["eps_01"] == runs["proxlogbarrier-l0"]["curve"]["eps"]
    files = proto["files"]
    assert (tmp_path / "min_norm.png").stat().st_size > 0
    rows = (tmp_path / "min_norm_distances.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith("test_index,label,logbarrier-l2")
    assert len(files) == 2
    assert out["min_norm_median_logbarrier_l2"] == l2["median"]
    json.dumps(out)


def test_certified_reports_both_certificates_with_their_protocol():
    cfg = load_config(None, ["eval.certify_max_samples=6", "eval.certify_n0=10", "eval.certify_n=50",
                             "eval.certify_radii=[0, 0.5]"])
    out = evaluate_model(_linear_mnist(), cfg, ["certified"])
    c, proto = out["certified"], out["protocol"]["certified"]
    assert set(c) == {"smoothing", "gaussian_average"}
    for block in c.values():
        assert len(block["radius"]) == 6 and block["radii_01"] == [0.0, 0.25]
        acc = block["certified_accuracy"]
        assert acc[0] >= acc[1]
    assert proto["sigma_01"] == proto["sigma"] / 2 and proto["smoothing"]["n"] == 50
    assert out["certified_accuracy_smoothing_r0.5"] == c["smoothing"]["certified_accuracy"][1]
    json.dumps(out)


# ----------------------------------------------------------------------------- the registry and the threat model


def test_the_registry_holds_one_documented_metric_per_name():
    from rjem_ray.config import METRIC_NAMES, get_dotted
    from rjem_ray.evaluation.registry import BY_NAME, METRICS

    assert sorted(BY_NAME) == sorted(METRIC_NAMES) and len(METRICS) == len(METRIC_NAMES)
    order = [m.name for m in METRICS]
    assert order.index("autoattack") < order.index("masking")  # masking compares against AutoAttack's result
    cfg, missing = Config().to_dict(), object()
    for m in METRICS:
        assert m.__doc__ and m.__doc__.startswith(f"``{m.name}``"), m
        assert [k for k in m.config_keys if get_dotted(cfg, k, missing) is missing] == [], m
    assert {m.name for m in METRICS if m.needs_prior} == {"fid", "is"}


def test_an_unknown_metric_is_refused_by_name_before_the_model_is_loaded(monkeypatch, tmp_path):
    from rjem_ray.config import ConfigError
    from rjem_ray.evaluation import evaluate

    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ConfigError) as exc:
        evaluate.evaluate_checkpoint(tmp_path, ["accuracy", "bogus"])
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("--metrics: 'bogus' is not a metric; choose from accuracy, robust")
    with pytest.raises(ConfigError, match="'aa' is not a metric"):
        evaluate_model(nn.Linear(2, 2), Config(), ["aa"])


def test_the_threat_model_comes_from_the_config():
    from rjem_ray.evaluation.threat import ThreatModel

    t = ThreatModel.from_config(load_config(None, ["eval.robust_eps=0.6", "eval.robust_steps=4"]))
    assert (t.norm, t.eps, t.pgd_steps, t.pgd_restarts) == ("linf", 0.6, 4, 1)
    assert t.pgd_step_size == 2.5 * 0.6 / 4 and t.eps_01 == 0.3
    assert t.describe() == {"norm": "linf", "eps": 0.6, "eps_unit": "model input space [-1, 1]", "eps_01_scale": 0.3}
    assert ThreatModel.from_config(load_config(None, ["eval.robust_step_size=0.05"])).pgd_step_size == 0.05
    # an eval.robust_norm key, where the config has one, chooses the norm
    cfg = load_config(None, [])
    with_norm = SimpleNamespace(eval=SimpleNamespace(**vars(cfg.eval), robust_norm="l2"))
    assert ThreatModel.from_config(with_norm).norm == "l2"


def test_every_robustness_metric_attacks_in_the_one_threat_model(monkeypatch):
    """A threat model of another norm reaches PGD, AutoAttack and the masking report alike."""
    from rjem_ray.evaluation import evaluate
    from rjem_ray.evaluation.threat import ThreatModel

    seen = []
    real = ThreatModel.from_config
    monkeypatch.setattr(evaluate.ThreatModel, "from_config",
                        classmethod(lambda cls, cfg: ThreatModel(**{**real(cfg).__dict__, "norm": "l2", "eps": 1.5})))

    def spy(name):
        def fake(model, x, y, **kw):
            seen.append((name, kw["norm"], kw["eps"]))
            if name == "masking":
                return {}
            return torch.ones(len(y), dtype=torch.bool), {"version": "custom", "attacks": []}
        return fake

    # where the metrics look them up (robust_metrics imports both by name)
    monkeypatch.setattr("rjem_ray.evaluation.robust_metrics.autoattack_robust", spy("autoattack"))
    monkeypatch.setattr("rjem_ray.evaluation.robust_metrics.masking_report", spy("masking"))
    cfg = load_config(None, ["eval.robust_max_samples=8", "eval.robust_steps=2", "eval.autoattack_max_samples=4"])
    out = evaluate_model(_linear_mnist(), cfg, ["masking", "robust", "autoattack"])
    assert seen == [("autoattack", "l2", 1.5), ("masking", "l2", 1.5)]
    proto = out["protocol"]["pgd_robust_accuracy"]
    assert (proto["norm"], proto["eps"], proto["eps_01_scale"]) == ("l2", 1.5, 0.75)
    assert out["masking"]["subset"] == "4 drawn at random (seed 0)"


def test_the_order_of_metrics_asked_for_changes_nothing():
    cfg = load_config(None, ["eval.ece_bins=10"])
    model = _linear_mnist()
    a = evaluate_model(model, cfg, ["ebr", "ece", "accuracy"])
    b = evaluate_model(model, cfg, ["accuracy", "ece", "ebr"])
    assert a == b and list(a) == list(b)
    from rjem_ray.core.data import load_split, to_model_space
    from rjem_ray.evaluation.metrics import accuracy

    imgs, labels = load_split("mnist5k", "test")
    assert a["accuracy"] == accuracy(model, to_model_space(imgs), labels)
