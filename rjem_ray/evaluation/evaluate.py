"""``rjem eval``: accuracy, robust accuracy, calibration, OOD detection, FID and IS of a checkpoint.

Every figure comes with its protocol (split, number of samples, ε and its unit, attack steps, reference
set, feature extractor), because a figure without one cannot be compared. ε is given in the model's
[-1, 1] input space and, for convenience, on the [0, 1] pixel scale (half of it).

Each ``--metrics`` name is an object of ``rjem_ray/evaluation/registry.py`` (what it measures, its protocol and
units in its docstring): ``classification_metrics.py`` (accuracy, ece, ebr), ``robust_metrics.py`` (robust,
autoattack, masking, min-norm, certified; the first three in the one threat model of ``threat.py``),
``ood.py`` (ood), ``generation_metrics.py`` (fid, is). :func:`evaluate_model` runs the requested ones in the
registry's order on one :class:`~rjem_ray.evaluation.metric_base.EvalContext`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.data import load_split, to_model_space
from ..core.devices import resolve_device
from ..method.prior import gmm_for_checkpoint
from ..method.restore import load_model
from ..method.speed import FastNet
from .metric_base import EvalContext, Progress
from .registry import check_metric_names, selected
from .threat import ThreatModel

if TYPE_CHECKING:
    from ..config import Config


def evaluate_model(
    model,
    cfg: Config,
    metrics: list[str] | None = None,
    gmm=None,
    progress: Progress = lambda s: None,
    seed: int = 0,
    artifact_dir: str | Path | None = None,
) -> dict:
    """Compute the requested metrics on the test split; returns the figures and a ``protocol`` block.

    ``metrics`` (default ``eval.metrics``) are names of ``registry.METRICS``, computed in its order; an
    unknown name is a ConfigError. ``artifact_dir`` (or ``eval.artifact_dir`` when set) receives the files a
    metric draws (min-norm's plot and per-image CSV); with neither, no files are written."""
    names = check_metric_names(list(metrics or cfg.eval.metrics))
    device = next(model.parameters()).device
    model.eval()
    # Every metric's passes under train.precision's autocast (logits in fp32; speed.py).
    model = FastNet(model, precision=cfg.train.precision, device=device).eval()
    imgs, labels = load_split(cfg.data.name, "test", cfg.data.data_dir)
    x, y = to_model_space(imgs).to(device), labels.to(device)
    out: dict = {"protocol": {"dataset": cfg.data.name, "split": "test", "num_test": len(y),
                              "precision": model.precision}}
    ctx = EvalContext(model=model, cfg=cfg, x=x, y=y, threat=ThreatModel.from_config(cfg), requested=frozenset(names),
                      seed=seed, progress=progress, gmm=gmm, artifact_dir=cfg.eval.artifact_dir or artifact_dir)
    for metric in selected(names):
        figures, protocol = metric.run(ctx)
        out.update(figures)
        if protocol is not None:
            out["protocol"][metric.protocol_key] = protocol
    return out


def default_artifact_dir(checkpoint_dir: str | Path) -> Path:
    """Where ``rjem eval`` writes the files a metric draws when ``eval.artifact_dir`` is not set: a folder of
    their own per checkpoint, ``PARENT/eval-NAME`` beside the checkpoint directory ``PARENT/NAME``, so two
    checkpoints of one folder do not overwrite each other's (``rjem eval`` of a ``models:/``/``runs:/`` URI,
    whose download is temporary, passes ``./rjem-eval/<URI>`` instead; ``cli.eval_artifact_dir``)."""
    d = Path(checkpoint_dir).resolve()
    return d.parent / f"eval-{d.name}"


def evaluate_checkpoint(path: str | Path, metrics: list[str] | None = None, overrides: list[str] | None = None,
                        progress: Progress = lambda s: None, device: str | torch.device | None = None,
                        artifact_dir: str | Path | None = None) -> dict:
    """``rjem eval``: the checkpoint's model on ``device`` (None/"auto": the GPU this process was given,
    else CPU; ``devices.resolve_device``), every metric computed there. Drawn files go to ``eval.artifact_dir``,
    else ``artifact_dir``, else :func:`default_artifact_dir` of the checkpoint."""
    if metrics:
        check_metric_names(metrics)  # before the model is loaded
    model, cfg = load_model(path, map_location=resolve_device(device))
    if overrides:
        cfg = cfg.override(overrides)
    prior = any(m.needs_prior for m in selected(metrics or cfg.eval.metrics))
    gmm = gmm_for_checkpoint(cfg, path) if prior else None
    result = evaluate_model(model, cfg, metrics, gmm=gmm, progress=progress,
                            artifact_dir=artifact_dir or default_artifact_dir(path))
    if "protocol_fidelity" in result:
        result["protocol"]["fidelity"] = result.pop("protocol_fidelity")
    result["checkpoint"] = str(Path(path).resolve())
    result["protocol"]["device"] = str(next(model.parameters()).device)
    return result
