"""MLflow tracking: the only module that talks to MLflow.

One MLflow run per training run. The driver (``rjem train``) creates it and logs parameters, tags and
artifacts; Ray Train's rank-0 worker logs the step metrics into the same run by id, so many workers
still make exactly one run. Relative ``sqlite:///`` URIs and artifact locations are made absolute at
the edge so that Ray workers, whose working directory differs, write to the same store.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "lustre", "glusterfs", "ceph")


def filesystem_of(path: str | Path, mounts: str | Path = "/proc/mounts") -> tuple[str, str]:
    """``(type, mount point)`` of the mount holding ``path`` (its nearest existing parent), or ("", "")."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    best = ("", "")
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (str(p) == point or str(p).startswith(point.rstrip("/") + "/")) and len(point) >= len(best[1]):
            best = (fields[2], point)
    return best


def resolve_tracking_uri(uri: str, base: str | Path | None = None, mounts: str | Path = "/proc/mounts") -> str:
    """Make a relative ``sqlite:///path`` absolute (against ``base`` or the working directory).

    A sqlite file on a network file system is refused: several writers over NFS lock up or lose records
    (SQLite's own documentation warns against it). A cluster logs to one ``mlflow server`` over HTTP.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = Path(uri[len(prefix):]) if uri.startswith(prefix + "/") else Path(base or os.getcwd()) / uri[len(prefix):]
    fstype, point = filesystem_of(path, mounts)
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("nfs"):
        from .config import ConfigError

        raise ConfigError(
            f"tracking.tracking_uri: {uri} is a sqlite file on {fstype} ({point}); sqlite over a network file "
            "system loses records with several writers. Log to an MLflow server instead (MLFLOW_TRACKING_URI="
            "http://HOST:5000, see docs/CLUSTER.md) or use a sqlite file on local disk")
    if not uri.startswith(prefix + "/"):
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path.resolve())
    return uri


def is_server_uri(uri: str) -> bool:
    """Whether ``uri`` names an MLflow tracking server (which then owns the store and the artifacts)."""
    return uri.startswith(("http://", "https://"))


def resolve_artifact_location(location: str | None, base: str | Path | None = None,
                              tracking_uri: str | None = None) -> str | None:
    """Absolute artifact location of a new experiment; None lets an MLflow server choose.

    With a tracking server, a relative (or empty) location would name a directory on this machine only:
    the server's own ``--artifacts-destination`` is used instead (artifacts are uploaded through it).
    """
    if not location or (tracking_uri and is_server_uri(tracking_uri) and "://" not in location
                        and not Path(location).is_absolute()):
        return None
    if "://" in location:
        return location
    path = Path(location)
    if not path.is_absolute():
        path = Path(base or os.getcwd()) / path
    return path.resolve().as_uri()


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


class Tracker:
    """A thin wrapper over ``MlflowClient`` bound to one run id."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)

    @classmethod
    def create(
        cls,
        tracking_uri: str,
        experiment: str,
        artifact_location: str | None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> "Tracker":
        """Create (or reuse) the experiment and start a new run in it."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
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
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
        return cls(tracking_uri, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # the REST API takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dataset(self, name: str, images, labels, split: str = "train", source: str | Path | None = None) -> None:
        """Log a dataset as the run's input: its name, digest, schema and shape profile (not the data).

        ``source`` is the data directory (default: the code that logged it, MLflow's own default).
        """
        import mlflow.data
        import numpy as np
        from mlflow.entities import DatasetInput, InputTag

        ds = mlflow.data.from_numpy(np.asarray(images), targets=np.asarray(labels), name=name,
                                    source=str(Path(source).resolve()) if source else None)
        tag = InputTag(key="mlflow.data.context", value=split)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=[tag])])

    def log_model(self, ckpt_dir: str | Path, registered_model_name: str | None = None):
        """:func:`log_model` into this run."""
        return log_model(self.tracking_uri, self.run_id, ckpt_dir, registered_model_name)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def tracker_for(cfg, tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> Tracker | None:
    """Create a run for ``cfg`` (a :class:`rjem_ray.config.Config`) when tracking is enabled."""
    t = cfg.tracking
    if not t.enabled:
        return None
    uri = resolve_tracking_uri(t.tracking_uri)
    return Tracker.create(
        uri,
        t.experiment,
        resolve_artifact_location(t.artifact_location, tracking_uri=uri),
        run_name=t.run_name or cfg.name,
        tags=tags,
        parent_run_id=parent_run_id,
    )


def runs_of(tracking_uri: str, experiment: str, filter_string: str = "") -> Iterable[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=filter_string)


# ------------------------------------------------------------------------------------------ the logged model
MODEL_NAME = "model"  # the logged model's name: ``runs:/RUN_ID/model``
CHECKPOINT_ARTIFACT = "checkpoint"  # the key of the checkpoint directory among the model's artifacts

# An MLflow "model from code": MLflow stores this file's text and runs it to load the model, so loading
# unpickles nothing; the weights are the checkpoint directory, read by ``load_model`` (weights_only=True).
_MODEL_CODE = '''\
"""rjem-ray classifier: images [N, C, H, W] float32 in [-1, 1] -> logits [N, K]."""
import mlflow.models
import mlflow.pyfunc


class RjemClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from rjem_ray.checkpoint import load_model

        self.model, self.cfg = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


mlflow.models.set_model(RjemClassifier())
'''


def log_model(tracking_uri: str, run_id: str, ckpt_dir: str | Path, registered_model_name: str | None = None,
              example=None):
    """Log checkpoint ``ckpt_dir`` as the run's MLflow model (pyfunc, signature and input example).

    ``example`` is a float32 tensor/array ``[N, C, H, W]`` in ``[-1, 1]`` (default: zeros of the
    checkpoint's image shape). Returns MLflow's ``ModelInfo``; with ``registered_model_name`` the model is
    also registered (a new version under that name).
    """
    import tempfile

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from .checkpoint import load_model

    model, cfg = load_model(ckpt_dir)
    if example is None:
        from .data import dataset_info

        info = dataset_info(cfg.data.name)
        example = torch.zeros((2, info.channels, info.size, info.size))
    x = torch.as_tensor(example, dtype=torch.float32).cpu().numpy()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    signature = infer_signature(x, logits)
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = getattr(tracking_utils, "_tracking_uri", None)  # None: MLFLOW_TRACKING_URI or MLflow's default
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            code = Path(tmp) / "rjem_model.py"
            code.write_text(_MODEL_CODE)
            # start_run's exit marks the run FINISHED: call this last, before Tracker.finish
            with mlflow.start_run(run_id=run_id):
                return mlflow.pyfunc.log_model(
                    name=MODEL_NAME, python_model=str(code), artifacts={CHECKPOINT_ARTIFACT: str(ckpt_dir)},
                    signature=signature, input_example=x, registered_model_name=registered_model_name,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                                      "rjem-ray"],
                )
    finally:
        mlflow.set_tracking_uri(previous)


MODEL_URI_SCHEMES = ("models:/", "runs:/")


def resolve_checkpoint(path_or_uri: str, dst: str | Path | None = None) -> str:
    """A checkpoint directory for ``path_or_uri``: a path is returned as it is; a ``models:/NAME/VERSION``
    or ``runs:/RUN_ID/model`` URI (MLflow's store from ``MLFLOW_TRACKING_URI``) is downloaded into ``dst``
    (default: a temporary directory removed at exit) and the checkpoint directory inside it returned; a URI
    MLflow cannot resolve is a one-line :class:`CheckpointError`.
    """
    if not str(path_or_uri).startswith(MODEL_URI_SCHEMES):
        return path_or_uri
    import tempfile

    import mlflow.artifacts
    import yaml

    from .checkpoint import STATE_FILE, CheckpointError

    if dst is None:  # removed when the process exits
        import atexit
        import shutil

        dst = tempfile.mkdtemp(prefix="rjem-model-")
        atexit.register(shutil.rmtree, dst, ignore_errors=True)
    dst = Path(dst)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=path_or_uri, dst_path=str(dst)))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path_or_uri!r}: MLflow cannot find this model in {mlflow.get_tracking_uri()} "
                              f"({first}); give models:/NAME/VERSION, runs:/RUN_ID/model or a checkpoint "
                              "directory (set MLFLOW_TRACKING_URI to the store that holds the model)") from None
    if (local / STATE_FILE).is_file():  # e.g. runs:/RUN_ID/checkpoint, the plain artifact
        return str(local)
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        entry = (flavor.get("artifacts") or {}).get(CHECKPOINT_ARTIFACT)
        if entry and (local / entry["path"] / STATE_FILE).is_file():
            return str(local / entry["path"])
    raise CheckpointError(f"{path_or_uri!r} is an MLflow model but not an rjem model (no {CHECKPOINT_ARTIFACT} "
                          "artifact holding state.pt); give a model logged by `rjem train`")
