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
import subprocess
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
        from rjem_ray.checkpoint import load_model

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

    from .checkpoint import load_model

    model, cfg = load_model(ckpt_dir)
    if example is None:
        from .data import dataset_info

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

    from .checkpoint import STATE_FILE, CheckpointError
    from .config import first_line

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
