"""One MLflow run per training run: the :class:`Tracker`.

The driver (``rjem train``) creates the run and logs parameters, tags and artifacts; Ray Train's rank-0 worker logs
the step metrics into the same run by id, so many workers still make exactly one run. Datasets are logged with a
retry of the insert race between runs that log the same dataset at the same moment (a sweep's trials).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .models import log_model
from .stores import check_store, client_for, resolve_artifact_location, store_uris

# MLflow is imported inside the functions that call it (marked `# lazy: MLflow, see top`): `rjem --help` (the
# CLI's parser imports the tune package), every Ray Train worker and a sweep's trials import this module without
# opening a store, and `import mlflow` takes ~1.7 s; it also comes after stores.py's environment defaults.

# The MLflow run of an output directory (OUT/mlflow_run.json: run id and store), written by ``rjem train``: a rerun
# closes it as KILLED if its driver died, and ``rjem eval OUT/checkpoint`` nests its evaluation run under it.
RUN_FILE = "mlflow_run.json"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except Exception:
        return "unknown"


# What an MLflow server says while it restarts: its connection dropped mid-answer or refused. MLflow's client
# retries refused connections itself but not a POST whose answer broke off (urllib3 does not resend POSTs).
TRANSIENT = ("Connection broken", "IncompleteRead", "Connection aborted", "RemoteDisconnected", "Connection refused",
             "Max retries exceeded")


def through_restarts(call, wait_s: float = 120.0, pause_s: float = 1.0):
    """``call()``, again while it fails the way a restarting tracking server fails (``TRANSIENT``), for at most
    ``wait_s`` seconds. Only for idempotent calls: ``log_batch`` of the same metric objects (same timestamps)
    stores each once. Any other error is raised at once."""
    from mlflow.exceptions import MlflowException  # lazy: MLflow, see top

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return call()
        except MlflowException as exc:
            if not any(t in str(exc) for t in TRANSIENT) or time.monotonic() + pause_s > deadline:
                raise
            time.sleep(pause_s)


class Tracker:
    """A thin wrapper over ``MlflowClient`` bound to one run id."""

    def __init__(self, tracking_uri: str, run_id: str, registry_uri: str | None = None):
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.run_id = run_id
        self.client = client_for(tracking_uri, self.registry_uri)

    @classmethod
    def create(
        cls,
        tracking_uri: str,
        experiment: str,
        artifact_location: str | None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        registry_uri: str | None = None,
    ) -> "Tracker":
        """Create (or reuse) the experiment and start a new run in it."""
        client = client_for(tracking_uri, registry_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception:  # another process created it between our two calls
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        all_tags = {k: str(v) for k, v in (tags or {}).items()}  # a server's REST API takes strings only
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
        return cls(tracking_uri, run.info.run_id, registry_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # lazy: MLflow, see top

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # the REST API takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric  # lazy: MLflow, see top

        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if items:
            through_restarts(lambda: self.client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag  # lazy: MLflow, see top

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dataset(self, name: str, images, labels, split: str = "train", source: str | Path | None = None) -> None:
        """Log a dataset as the run's input: its name, digest, schema and shape profile (not the data).

        ``source`` is the data directory (default: the code that logged it, MLflow's own default).
        """
        import mlflow.data  # lazy: MLflow, see top
        from mlflow.entities import DatasetInput, InputTag  # lazy: MLflow, see top

        ds = mlflow.data.from_numpy(np.asarray(images), targets=np.asarray(labels), name=name,
                                    source=str(Path(source).resolve()) if source else None)
        tag = InputTag(key="mlflow.data.context", value=split)
        inputs = [DatasetInput(ds._to_mlflow_entity(), tags=[tag])]
        # A dataset is stored once per experiment, looked up by (name, digest) and inserted when absent: runs
        # that log the same dataset at the same moment (the trials of a sweep) race between the lookup and the
        # insert, and the loser gets a unique-constraint error. The retry finds the winner's row and links to it.
        for attempt in range(DATASET_ATTEMPTS):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except Exception as e:  # noqa: BLE001 - re-raised unless it is the insert race
                if attempt + 1 == DATASET_ATTEMPTS or not _is_unique_violation(e):
                    raise
                time.sleep(0.05 * (attempt + 1))

    def log_model(self, ckpt_dir: str | Path, registered_model_name: str | None = None, example=None,
                  step: int = 0):
        """:func:`log_model` into this run."""
        return log_model(self.client, self.run_id, ckpt_dir, registered_model_name, example, step)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


DATASET_ATTEMPTS = 4
_UNIQUE_VIOLATION = ("unique constraint", "integrityerror", "duplicate entry", "duplicate key")


def _is_unique_violation(error: BaseException) -> bool:
    """Whether ``error`` (from MLflow, local store or server) is a database unique-constraint violation."""
    text = str(error).lower()
    return any(marker in text for marker in _UNIQUE_VIOLATION)


def tracker_for(cfg, tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> Tracker | None:
    """Create a run for ``cfg`` (a :class:`rjem_ray.config.Config`) when tracking is enabled."""
    t = cfg.tracking
    if not t.enabled:
        return None
    uri, registry = store_uris(t)
    check_store(uri)  # one line now, not a traceback (or a run in another store) later
    return Tracker.create(
        uri,
        t.experiment,
        resolve_artifact_location(t.artifact_location, tracking_uri=uri),
        run_name=t.run_name or cfg.name,
        tags=tags,
        parent_run_id=parent_run_id,
        registry_uri=registry,
    )


def runs_of(tracking_uri: str, experiment: str, filter_string: str = "") -> Iterable[Any]:
    client = client_for(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=filter_string)
