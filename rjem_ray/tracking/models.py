"""The run's model: logged as an MLflow 3 LoggedModel (a pyfunc "model from code" over the checkpoint directory),
registered as a version of a registered model, and found again from a ``models:/`` or ``runs:/`` URI.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import ConfigError
from ..core.data import dataset_info
from ..core.errors import first_line
from ..method.checkpoint import STATE_FILE, CheckpointError
from ..method.restore import load_model
from .stores import client_for

# MLflow is imported inside the functions that call it (marked `# lazy: MLflow, see top`): `rjem --help` (the
# CLI's parser imports the tune package), every Ray Train worker and a sweep's trials import this module without
# opening a store, and `import mlflow` takes ~1.7 s; it also comes after stores.py's environment defaults.

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
        from rjem_ray.method.restore import load_model

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
    import mlflow.pyfunc  # lazy: MLflow, see top
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus  # lazy: MLflow, see top
    from mlflow.models import Model, infer_signature  # lazy: MLflow, see top

    model, cfg = load_model(ckpt_dir)
    if example is None:
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
    from mlflow.exceptions import MlflowException  # lazy: MLflow, see top
    from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode  # lazy: MLflow, see top

    try:
        client.create_registered_model(name)
    except MlflowException as exc:  # an earlier version, or another process registering at the same time
        if exc.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            raise
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
    import mlflow.artifacts  # lazy: MLflow, see top
    from mlflow.store.artifact.utils.models import get_model_name_and_version  # lazy: MLflow, see top

    if dst is None:  # removed when the process exits
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
