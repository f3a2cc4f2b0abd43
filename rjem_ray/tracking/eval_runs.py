"""``rjem eval`` runs: each evaluation is an MLflow run of its own, a child of the run that trained the checkpoint
when that run can be told (:func:`training_run_of`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .stores import client_for, resolve_artifact_location
from .tracker import RUN_FILE, Tracker, flatten

EVAL_RUN_NAME = "eval"


def training_run_of(checkpoint: str, checkpoint_dir: str | Path, tracking_uri: str,
                    registry_uri: str | None = None) -> tuple[str, str] | None:
    """``(tracking URI, run id)`` of the MLflow run that trained ``checkpoint``, or None when it cannot be told.

    ``runs:/RUN_ID/...`` names it; ``models:/NAME/VERSION`` (or ``models:/NAME@ALIAS``, or a logged model's id)
    through the model's source run in the given stores; a checkpoint directory through the
    :data:`RUN_FILE` that ``rjem train`` leaves in its OUT, beside ``OUT/checkpoint``.
    """
    if checkpoint.startswith("runs:/"):
        return tracking_uri, checkpoint.removeprefix("runs:/").split("/", 1)[0]
    if checkpoint.startswith("models:/"):
        # lazy: MLflow, for models:/ URIs only (`rjem eval` imports this module with tracking off too)
        from mlflow.store.artifact.utils.models import get_model_name_and_version

        client = client_for(tracking_uri, registry_uri)
        try:
            found = get_model_name_and_version(client, checkpoint)
            run_id = (client.get_logged_model(found[0]).source_run_id if len(found) == 1
                      else client.get_model_version(*found).run_id)
        except Exception:  # resolve_checkpoint has already found the model; a version without a run has none
            return None
        return (tracking_uri, run_id) if run_id else None
    path = Path(checkpoint_dir).resolve().parent / RUN_FILE
    try:
        record = json.loads(path.read_text())
        return str(record["tracking_uri"]), str(record["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def drawn_files(result: dict[str, Any]) -> list[str]:
    """The files an evaluation's metrics wrote (each protocol block's ``files``)."""
    return [f for block in (result.get("protocol") or {}).values() if isinstance(block, dict)
            for f in block.get("files") or []]


def result_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """What of an evaluation result goes to MLflow as metrics: its top-level fields and the masking block's as
    ``masking.*`` (``Tracker.log_metrics`` keeps the numbers: ``accuracy``, ``robust_accuracy``, ``fid``,
    ``min_norm_median_*``, ...); the protocol blocks are logged whole as ``eval.json``."""
    return {**result, **flatten(result.get("masking") or {}, "masking.")}


def log_evaluation(tracking_uri: str, registry_uri: str | None, experiment: str, artifact_location: str | None,
                   result: dict[str, Any], params: dict[str, Any], files: Iterable[str | Path] = (),
                   parent: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Log one ``rjem eval`` as its own MLflow run and return the run id.

    The run is a child of ``parent`` (the training run, :func:`training_run_of`) and lives in its
    experiment when that run is in this store; otherwise a run of ``experiment``. It holds ``params``,
    :func:`result_metrics` as metrics, the whole result with every protocol block as ``eval.json``,
    and ``files`` (those the metrics drew: the min-norm plot and per-image distances) under ``eval/``.
    A re-evaluation is a new run beside the earlier ones, so settings can be compared.
    """
    client = client_for(tracking_uri, registry_uri)
    if parent:
        try:
            experiment = client.get_experiment(client.get_run(parent).info.experiment_id).name
        except Exception:  # the training run is not in this store (deleted, or another store was asked for)
            parent = None
    tracker = Tracker.create(tracking_uri, experiment, resolve_artifact_location(artifact_location,
                                                                                 tracking_uri=tracking_uri),
                             run_name=EVAL_RUN_NAME, tags={"rjem.kind": "eval", **(tags or {})},
                             parent_run_id=parent, registry_uri=registry_uri)
    try:
        tracker.log_params(params)
        tracker.log_metrics(result_metrics(result))
        tracker.client.log_dict(tracker.run_id, result, "eval.json")
        for f in files:
            tracker.log_artifact(f, "eval")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return tracker.run_id
