"""MLflow tracking: the only module that talks to MLflow.

One MLflow run per training run. The driver (``rjem train``) creates it and logs parameters, tags and
artifacts; Ray Train's rank-0 worker logs the step metrics into the same run by id, so many workers
still make exactly one run. Relative ``sqlite:///`` URIs and artifact locations are made absolute at
the edge so that Ray workers, whose working directory differs, write to the same store. The run's final
model, its registration and the lookup of ``models:/``/``runs:/`` URIs are at the end. Every call goes
through an ``MlflowClient`` with explicit tracking and registry URIs (:func:`client_for`), never through
MLflow's process-wide fluent state.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow draws a progress bar for every artifact copy (log_model reads the checkpoint back through one), which
# breaks the training log into bar fragments; MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true brings it back.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# The MLflow run of an output directory (OUT/mlflow_run.json: run id and store), written by ``rjem train``: a rerun
# closes it as KILLED if its driver died, and ``rjem eval OUT/checkpoint`` nests its evaluation run under it.
RUN_FILE = "mlflow_run.json"

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


def store_uris(tracking) -> tuple[str, str]:
    """``(tracking URI, registry URI)`` of a :class:`rjem_ray.config.TrackingConfig`, made absolute.

    The config already holds the precedence ``--set`` > ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` >
    the config file > the default (:func:`rjem_ray.config.load_config`); an empty registry URI is the
    tracking store, as in MLflow.
    """
    uri = resolve_tracking_uri(tracking.tracking_uri)
    return uri, resolve_tracking_uri(tracking.registry_uri) if tracking.registry_uri else uri


def client_for(tracking_uri: str, registry_uri: str | None = None):
    """An ``MlflowClient`` on exactly these stores (registry: the tracking store unless given).

    Both URIs are explicit, so the client never falls back to MLflow's process-wide state
    (``mlflow.set_tracking_uri``/``set_registry_uri`` or the environment at call time).
    """
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


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


# ------------------------------------------------------------------------------------------ the logged model
# Every call below goes through an explicit ``MlflowClient`` (tracking and registry URI given) and a run id:
# MLflow's fluent API (``mlflow.start_run``, ``mlflow.pyfunc.log_model``, ``mlflow.register_model``) reads
# and writes process-wide state (the tracking and registry URIs, the MLFLOW_* variables, the active run),
# which would send a later run in the same process to another store.
MODEL_NAME = "model"  # the logged model's name: ``runs:/RUN_ID/model``
CHECKPOINT_ARTIFACT = "checkpoint"  # the key of the checkpoint directory among the model's artifacts

# An MLflow "model from code": MLflow stores this file's text and runs it to load the model, so loading
# unpickles nothing; the weights are the checkpoint directory, read by ``load_model`` (weights_only=True).
_MODEL_CODE = '''\
"""rjem-ray classifier: images [N, C, H, W] float32 in [-1, 1] -> logits [N, K]."""
import mlflow.models
import mlflow.pyfunc
import numpy as np


class RjemClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from rjem_ray.method.checkpoint import load_model

        self.model, self.cfg = load_model(context.artifacts["checkpoint"])

    # np.ndarray: a type hint MLflow passes through unconverted (the signature is the logged one)
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).numpy()


mlflow.models.set_model(RjemClassifier())
'''


def log_model(client, run_id: str, ckpt_dir: str | Path, registered_model_name: str | None = None,
              example=None, step: int = 0):
    """Log checkpoint ``ckpt_dir`` as run ``run_id``'s MLflow model (pyfunc, signature and input example).

    ``client`` is an ``MlflowClient`` (:func:`client_for`). The model is an MLflow 3 LoggedModel named
    ``model`` in the run's experiment, linked to the run as an output at ``step`` (the Models tab;
    ``runs:/RUN_ID/model``). ``example`` is a float32 tensor/array ``[N, C, H, W]`` in ``[-1, 1]``
    (default: two zero images of the checkpoint's shape); the signature maps it to logits ``[N, K]``.
    With ``registered_model_name`` the model also becomes a new version of that registered model
    (:func:`register_model`). Returns MLflow's ``ModelInfo``. The run's status is left as it is.
    """
    import tempfile

    import mlflow.pyfunc
    import torch
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model, infer_signature

    from .method.checkpoint import load_model

    model, cfg = load_model(ckpt_dir)
    if example is None:
        from .core.data import dataset_info

        info = dataset_info(cfg.data.name)
        example = torch.zeros((2, info.channels, info.size, info.size))
    x = torch.as_tensor(example, dtype=torch.float32).cpu().numpy()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                        params=dict(run.data.params), model_type="rjem-classifier")
    mlflow_model = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                         model_id=logged.model_id)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            code = Path(tmp) / "rjem_model.py"
            code.write_text(_MODEL_CODE)
            local = Path(tmp) / MODEL_NAME
            mlflow.pyfunc.save_model(  # local files only: no tracking store is involved
                str(local), python_model=str(code), artifacts={CHECKPOINT_ARTIFACT: str(ckpt_dir)},
                signature=infer_signature(x, logits), input_example=x, mlflow_model=mlflow_model,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                                  "rjem-ray"],
            )
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    logged = client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    info = mlflow_model.get_model_info(logged)
    if registered_model_name:
        info.registered_model_version = register_model(client, registered_model_name, logged.model_id).version
    return info


def check_model_name(name: Any, key: str, refused: str | None = None, tracking_enabled: bool = True) -> str:
    """``name`` if it can name a registered model (MLflow's rule: non-empty, no ``/`` or ``:``), else a
    one-line :class:`~rjem_ray.config.ConfigError` naming ``key``; ``refused`` is a reason the key cannot
    be used at all here, and registering needs tracking."""
    from .config import ConfigError

    if refused:
        raise ConfigError(f"{key}: {refused}; remove {key}")
    if not tracking_enabled:
        raise ConfigError(f"{key}: registering a model needs tracking.enabled: true")
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/:"):
        raise ConfigError(f"{key}: {name!r} is not a registered-model name; give a non-empty name without '/' or ':'")
    return name


def register_model(client, name: str, model_id: str):
    """Register LoggedModel ``model_id`` as a version of the registered model ``name`` (created if new);
    returns the ``ModelVersion`` (``models:/NAME/VERSION``). A model that already is a version of ``name``
    (e.g. a resumed sweep registering its best trial again) returns that version instead of a new one."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(name)
    except MlflowException as exc:  # an earlier version, or another process registering at the same time
        if exc.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            raise
    import json

    logged = client.get_logged_model(model_id)
    for version in client.search_model_versions(f"run_id = '{logged.source_run_id}'"):
        if version.name == name and version.source == logged.artifact_location:
            return version
    # The source is the model's artifact location, not models:/MODEL_ID as in mlflow.register_model: MLflow's
    # sqlite registry resolves the latter through the process-wide tracking URI, not this client's (and keeps
    # no model id). The logged model's mlflow.modelVersions tag links it to its versions, as MLflow does.
    version = client.create_model_version(name, source=logged.artifact_location, run_id=logged.source_run_id,
                                          model_id=model_id)
    links = json.loads(logged.tags.get("mlflow.modelVersions", "[]"))
    client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(
        links + [{"name": version.name, "version": version.version}])})
    return version


def register_run_model(client, run_id: str, name: str, ckpt_dir: str | Path | None = None):
    """Register run ``run_id``'s model as a new version of ``name`` (e.g. the best trial of a sweep).

    The run's own logged model (its latest, by step) is registered; a run that logged none (a sweep's
    trial) first gets ``ckpt_dir`` logged as its model (:func:`log_model`). Returns the ``ModelVersion``.
    """
    run = client.get_run(run_id)
    outputs = sorted((run.outputs.model_outputs if run.outputs else []), key=lambda o: o.step)
    models = [o.model_id for o in outputs if client.get_logged_model(o.model_id).name == MODEL_NAME]
    if models:
        return register_model(client, name, models[-1])
    if ckpt_dir is None:
        raise ValueError(f"run {run_id} has no logged model to register; give its checkpoint directory")
    info = log_model(client, run_id, ckpt_dir)
    return register_model(client, name, info.model_id)


MODEL_URI_SCHEMES = ("models:/", "runs:/")


def resolve_checkpoint(path_or_uri: str, tracking_uri: str, registry_uri: str | None = None,
                       dst: str | Path | None = None) -> str:
    """A checkpoint directory for ``path_or_uri``.

    A path is returned as it is. A ``models:/NAME/VERSION`` (or ``models:/NAME@ALIAS``) or
    ``runs:/RUN_ID/model`` URI is looked up in exactly the stores given (:func:`store_uris` of the
    user's config; never MLflow's process-wide URI), downloaded into ``dst`` (default: a temporary
    directory removed at exit), and the checkpoint directory inside it returned. A URI the store
    cannot resolve is a one-line :class:`CheckpointError`.
    """
    if not str(path_or_uri).startswith(MODEL_URI_SCHEMES):
        return path_or_uri
    import tempfile

    import mlflow.artifacts
    import yaml
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from .method.checkpoint import STATE_FILE, CheckpointError
    from .core.errors import first_line

    if dst is None:  # removed when the process exits
        import atexit
        import shutil

        dst = tempfile.mkdtemp(prefix="rjem-model-")
        atexit.register(shutil.rmtree, dst, ignore_errors=True)
    dst = Path(dst)
    client = client_for(tracking_uri, registry_uri)
    try:
        source = path_or_uri
        if path_or_uri.startswith("models:/"):  # MLflow's own resolver would ask the process-wide registry
            found = get_model_name_and_version(client, path_or_uri)
            source = (client.get_logged_model(found[0]).artifact_location if len(found) == 1
                      else client.get_model_version_download_uri(*found))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                         tracking_uri=tracking_uri,
                                                         registry_uri=registry_uri or tracking_uri))
    except Exception as exc:
        raise CheckpointError(f"{path_or_uri!r}: MLflow cannot find this model in {tracking_uri} "
                              f"({first_line(exc, type(exc).__name__)}); give "
                              "models:/NAME/VERSION, runs:/RUN_ID/model or a checkpoint directory (the store is "
                              "tracking.tracking_uri, MLFLOW_TRACKING_URI or --set tracking.tracking_uri=...)") from None
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


# ------------------------------------------------------------------------------------------ `rjem eval` runs

EVAL_RUN_NAME = "eval"


def training_run_of(checkpoint: str, checkpoint_dir: str | Path, tracking_uri: str,
                    registry_uri: str | None = None) -> tuple[str, str] | None:
    """``(tracking URI, run id)`` of the MLflow run that trained ``checkpoint``, or None when it cannot be told.

    ``runs:/RUN_ID/...`` names it; ``models:/NAME/VERSION`` (or ``models:/NAME@ALIAS``, or a logged model's id)
    through the model's source run in the given stores; a checkpoint directory through the
    :data:`RUN_FILE` that ``rjem train`` leaves in its OUT, beside ``OUT/checkpoint``.
    """
    import json

    if checkpoint.startswith("runs:/"):
        return tracking_uri, checkpoint.removeprefix("runs:/").split("/", 1)[0]
    if checkpoint.startswith("models:/"):
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


# ------------------------------------------------------------------------------------------ the store and its server
# A cluster's runs outlive its head when the one `mlflow server` keeps them in a database server (PostgreSQL) and an
# object store (s3://...): the server itself then holds nothing (docs/CLUSTER.md). `rjem server` checks the database
# before it starts the server, so a wrong or unreachable URI is one line at `ray up`, not a traceback in a log;
# `rjem migrate-store` copies an existing sqlite store into that database.

BACKEND_ENV = "MLFLOW_BACKEND_STORE_URI"  # mlflow server's own variables, read by `rjem server` too
ARTIFACTS_ENV = "MLFLOW_ARTIFACTS_DESTINATION"
DATABASE_TIMEOUT_S = 10
_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^@\s]*)@")


class StoreError(ValueError):
    """A tracking store or server that cannot be used; the message is one line naming it (password masked)."""


def masked(uri: str) -> str:
    """``uri`` with the password of its ``user:password@`` part replaced by ``***``."""
    return _PASSWORD.sub(r"\1***@", str(uri))


def _scrub(text: str, uri: str) -> str:
    """``text`` (e.g. a driver's error message) without ``uri``'s password in it."""
    m = _PASSWORD.search(str(uri))
    secret = m.group(2) if m else ""
    text = text.replace(str(uri), masked(uri))
    return text.replace(secret, "***") if len(secret) >= 3 else text


def is_database_uri(uri: str) -> bool:
    """Whether ``uri`` names a database server store (``postgresql://``, ``postgresql+psycopg://``, ``mysql://``,
    ...): an SQLAlchemy URL other than sqlite."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    return scheme.split("+", 1)[0] in ("postgresql", "postgres", "mysql", "mssql")


def check_database(uri: str, timeout_s: float = DATABASE_TIMEOUT_S) -> None:
    """Connect to the database store ``uri`` and run ``SELECT 1``; a :class:`StoreError` (one line, password
    masked) when the URI is malformed, its driver is missing or the server refuses or does not answer within
    ``timeout_s``. Nothing is created."""
    from mlflow.store.db.utils import create_sqlalchemy_engine

    shown = masked(uri)
    scheme = uri.split("://", 1)[0].lower()
    if scheme.split("+", 1)[0] == "postgres":
        raise StoreError(f"{shown}: write postgresql:// (or postgresql+psycopg://), not postgres://")
    probe = uri
    if scheme.split("+", 1)[0] in ("postgresql", "mysql") and "connect_timeout=" not in uri:
        probe += ("&" if "?" in uri else "?") + f"connect_timeout={max(1, int(timeout_s))}"
    engine = None
    try:
        engine = create_sqlalchemy_engine(probe)  # MLflow's own engine: SQLAlchemy comes with MLflow
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except ImportError as exc:  # the dialect's driver package
        raise StoreError(f"{shown}: the database driver is not installed ({_first_line(exc)}); for PostgreSQL "
                         "pip install 'psycopg[binary]' and use postgresql+psycopg://") from None
    except Exception as exc:
        if type(exc).__name__ in ("ArgumentError", "NoSuchModuleError"):
            raise StoreError(f"{shown} is not a database URI MLflow can open ({_first_line(exc)}); give e.g. "
                             "postgresql+psycopg://USER:PASSWORD@HOST:5432/DB") from None
        reason = _scrub(" ".join(str(getattr(exc, "orig", None) or exc).split()), uri)
        raise StoreError(f"the MLflow backend store {shown} cannot be reached ({reason[:300]}); check its host, "
                         "port, database name, user and password") from None
    finally:
        if engine is not None:
            engine.dispose()


def _first_line(exc: BaseException) -> str:
    from .core.errors import first_line

    return first_line(exc, type(exc).__name__)


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """A :class:`StoreError` when the MLflow server at ``uri`` does not answer ``/health``."""
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            resp.read()
    except Exception as exc:
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
        raise StoreError(f"the MLflow server {masked(uri)} does not answer ({reason}); start it (`rjem server`, "
                         "docs/CLUSTER.md) or point MLFLOW_TRACKING_URI / tracking.tracking_uri at a running one") from None


def check_store(uri: str) -> None:
    """Fail at start, in one line, when the tracking store ``uri`` (resolved) cannot be used: a database server
    must accept a connection, an MLflow server must answer. Nothing is logged anywhere else instead."""
    if is_database_uri(uri):
        check_database(uri)
    elif is_server_uri(uri):
        check_server(uri)


def server_command(backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1", port: int = 5000,
                   workers: int = 1) -> tuple[list[str], dict[str, str]]:
    """``(argv, environment)`` of the ``mlflow server`` of a stateless tracking server: runs in
    ``backend_store_uri``, artifacts uploaded and downloaded through the server (proxied: clients need no
    storage credentials) into ``artifacts_destination``. Both go in MLflow's own variables, not in argv, where
    any user of the machine would read the database's password (``ps``)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    argv = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--host", host, "--port", str(port),
            "--workers", str(workers)]
    return argv, {**os.environ, BACKEND_ENV: backend_store_uri, ARTIFACTS_ENV: artifacts_destination}


def wait_for_server(url: str, proc=None, timeout_s: float = 120.0, log: str | Path | None = None) -> None:
    """Wait until ``url/health`` answers; a :class:`StoreError` with the log's last line when the server process
    ``proc`` exits first or ``timeout_s`` passes."""
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StoreError(f"mlflow server exited with status {proc.returncode}: {_last_line(log)}")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise StoreError(f"mlflow server at {url} did not answer within {timeout_s:.0f} s: {_last_line(log)}")


def _last_line(log: str | Path | None) -> str:
    """The last line of a server log that says something (a traceback's last line is its error)."""
    try:
        lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    except (OSError, TypeError):
        return "see its log"
    return lines[-1][:400] if lines else "its log is empty"


def start_server(backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1", port: int = 5000,
                 workers: int = 1, log: str | Path = "mlflow-server.log", env: dict | None = None,
                 timeout_s: float = 120.0):
    """Check the database, then start ``mlflow server`` (:func:`server_command`) in its own session, so that it
    outlives the caller (``ray up``'s SSH command) and its process group can be ended alone; returns the
    ``Popen`` once ``/health`` answers. A bad store is a :class:`StoreError` before anything starts."""
    if is_database_uri(backend_store_uri):
        check_database(backend_store_uri)
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv, server_env = server_command(backend_store_uri, artifacts_destination, host, port, workers)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env={**server_env, **(env or {})}, start_new_session=True)
    try:
        wait_for_server(f"http://{host}:{port}", proc, timeout_s, log)
    except BaseException:
        stop_server(proc.pid)
        raise
    return proc


def stop_server(pid: int, sig: int | None = None, timeout_s: float = 20.0) -> None:
    """End the server started as ``pid`` and its workers (its process group, :func:`start_server`), with
    ``sig`` (default SIGTERM, which MLflow's server passes to its workers), then SIGKILL after ``timeout_s``."""
    import signal

    try:
        os.killpg(pid, sig or signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it when it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# Where a store keeps artifact locations: rewritten by migrate_store when the artifacts move to the server.
ARTIFACT_COLUMNS = {"experiments": ("artifact_location",), "runs": ("artifact_uri",),
                    "logged_models": ("artifact_location",), "model_versions": ("source", "storage_location")}


def migrate_store(source: str, target: str, artifacts_destination: str | None = None, say=print) -> dict[str, int]:
    """Copy the sqlite store ``source`` into the database store ``target``, which must hold no runs yet.

    Everything keeps its id (experiments, runs, logged models, registered models and their versions), so
    ``runs:/``/``models:/`` URIs, ``OUT/mlflow_run.json`` and a sweep's parent run id stay valid; metrics keep
    their steps and timestamps. MLflow's own migrations bring both schemas to the installed version first (as
    ``mlflow db upgrade`` does; the source is upgraded in a temporary copy, never in place); MLflow has no
    tool that copies one database store into another, so the rows then go table by table in foreign-key order.
    With ``artifacts_destination`` (the server's ``--artifacts-destination``, e.g. ``s3://bucket/mlflow``) every
    experiment whose artifacts are local files is copied to ``DEST/EXPERIMENT_ID`` and its locations re-pointed
    at ``mlflow-artifacts:/EXPERIMENT_ID``, which the server serves; without it they stay where they are.
    Returns the rows copied per table.
    """
    import shutil
    import tempfile

    from mlflow.store.db import utils as db_utils

    if not source.startswith("sqlite:///"):
        raise StoreError(f"{masked(source)}: the source must be a sqlite store, sqlite:///PATH")
    src_path = Path(resolve_tracking_uri(source)[len("sqlite:///"):])
    if not src_path.is_file():
        raise StoreError(f"{source}: no such file")
    if not is_database_uri(target):
        raise StoreError(f"{masked(target)}: the target must be a database server, e.g. postgresql+psycopg://...")
    check_database(target)
    with tempfile.TemporaryDirectory(prefix="rjem-migrate-") as tmp:
        copy = Path(tmp) / "source.db"
        shutil.copyfile(src_path, copy)
        src = db_utils.create_sqlalchemy_engine(f"sqlite:///{copy}")
        dst = db_utils.create_sqlalchemy_engine(target)
        try:
            if db_utils._is_empty_database(src):
                raise StoreError(f"{source} holds no MLflow store")
            if db_utils._all_tables_exist(dst):
                _check_empty(dst, target)
            else:
                db_utils._initialize_tables(dst)
            db_utils._verify_schema(dst)
            if db_utils._get_schema_version(src) != db_utils._get_latest_schema_revision():
                db_utils._upgrade_db(src)
            return _copy_rows(src, dst, source, target, artifacts_destination, say)
        except StoreError:
            raise
        except Exception as exc:  # MLflow's, SQLAlchemy's and pyarrow's messages run over many lines
            raise StoreError(f"migrating {source} into {masked(target)} failed: "
                             f"{_scrub(_first_line(exc), target)}") from exc
        finally:
            src.dispose()
            dst.dispose()


def _check_empty(dst, target: str) -> None:
    """Ids are copied as they are: the target must hold no experiment but MLflow's Default and no run."""
    with dst.connect() as conn:
        runs = conn.exec_driver_sql("SELECT count(*) FROM runs").scalar()
        experiments = conn.exec_driver_sql("SELECT count(*) FROM experiments WHERE experiment_id <> 0").scalar()
    if runs or experiments:
        raise StoreError(f"{masked(target)} already holds {experiments} experiment(s) and {runs} run(s); migrate "
                         "into a new, empty database (before the server's first run)")


def _copy_rows(src, dst, source: str, target: str, artifacts_destination: str | None, say) -> dict[str, int]:
    """Every table of MLflow's schema (its own ORM definitions, which both stores now match), in foreign-key order."""
    import mlflow.store.model_registry.dbmodels.models  # noqa: F401  (registers the registry's tables)
    import mlflow.store.tracking.dbmodels.models  # noqa: F401  (and the tracking store's)
    from mlflow.store.db.base_sql_model import Base

    moved = _move_artifacts(src, artifacts_destination, say) if artifacts_destination else {}
    counts: dict[str, int] = {}
    with src.connect() as read, dst.begin() as write:
        for table in Base.metadata.sorted_tables:
            pk = list(table.primary_key.columns)
            present = {tuple(r) for r in write.execute(table.select().with_only_columns(*pk))} if pk else set()
            rows = []
            for row in read.execute(table.select()):
                values = dict(row._mapping)
                if pk and tuple(values[c.name] for c in pk) in present:  # e.g. the Default experiment of both
                    continue
                for col in ARTIFACT_COLUMNS.get(table.name, ()):
                    if values.get(col):
                        values[col] = _relocated(values[col], moved)
                rows.append(values)
            for i in range(0, len(rows), 1000):
                write.execute(table.insert(), rows[i:i + 1000])
            counts[table.name] = len(rows)
            if dst.dialect.name == "postgresql" and rows and len(pk) == 1 and pk[0].type.python_type is int:
                # a serial id continues after the copied ones (a new experiment gets max + 1)
                write.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table.name}', '{pk[0].name}'), "
                                      f"(SELECT MAX({pk[0].name}) FROM {table.name}))")
    say(f"[rjem] copied {source} into {masked(target)}: " + ", ".join(
        f"{counts.get(t, 0)} {t}" for t in ("experiments", "runs", "metrics", "params", "registered_models",
                                            "model_versions")))
    return counts


def _relocated(value: str, moved: dict[str, str]) -> str:
    """``value`` with its artifact-location prefix replaced by the one the artifacts moved to."""
    for old, new in moved.items():
        if value == old or value.startswith(old + "/"):
            return new + value[len(old):]
    return value


def _move_artifacts(src, destination: str, say) -> dict[str, str]:
    """Copy each experiment's local artifact directory to ``destination/ID``; ``{old location: mlflow-artifacts:/ID}``."""
    import urllib.parse

    import pyarrow.fs as pafs

    from .core import storage

    dst_fs, dst_root = storage.filesystem(destination)
    moved = {}
    with src.connect() as conn:
        rows = conn.exec_driver_sql("SELECT experiment_id, artifact_location FROM experiments").all()
    for exp_id, location in rows:
        if not location or not (location.startswith("file:") or location.startswith("/")):
            continue  # already in an object store or behind a server: reachable as it is
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(location).path) if location.startswith("file:")
                    else location)
        if path.is_dir():
            pafs.copy_files(str(path), f"{dst_root.rstrip('/')}/{exp_id}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=dst_fs)
            say(f"[rjem] copied the artifacts of experiment {exp_id} ({path}) to {destination.rstrip('/')}/{exp_id}")
        moved[location.rstrip("/")] = f"mlflow-artifacts:/{exp_id}"
    return moved
