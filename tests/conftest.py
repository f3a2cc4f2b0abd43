"""Shared test settings: quiet, fast Ray; one torch thread; per-session caches in a temp dir."""

from __future__ import annotations

import os

# Before anything imports Ray or MLflow. Ray's token authentication stays on (its default), as for users.
# MLflow's own variables would redirect the tests' stores: each test names its store itself.
for _var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME"):
    os.environ.pop(_var, None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

import rjem_ray  # noqa: E402,F401  (installs the torchvision shim before any test imports torchvision)

# Two cores: intra-op threads in the test process fight Ray workers and each other.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def mlflow_state_restored():
    """MLflow's process-wide state as it was before each test: the MLFLOW_* variables (which ``rjem``
    reads before the config file), the in-process tracking and registry URIs that ``mlflow.set_tracking_uri``
    and ``set_registry_uri`` leave behind, the active experiment and the active-run stack. A test that
    points MLflow somewhere cannot send a later test's runs to its store."""
    import mlflow.tracking.fluent as fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    uris = tracking_utils._tracking_uri, registry_utils._registry_uri
    experiment, runs = fluent._active_experiment_id, list(fluent._active_run_stack.get())
    yield
    for k in [k for k in os.environ if k.startswith("MLFLOW_") and k not in env]:
        del os.environ[k]
    os.environ.update(env)
    tracking_utils._tracking_uri, registry_utils._registry_uri = uris  # not set_*(): they rewrite the variables
    fluent._active_experiment_id = experiment
    fluent._active_run_stack.set(runs)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """GMM statistics and reference classifiers, shared by the whole session."""
    return str(tmp_path_factory.mktemp("rjem-cache"))


@pytest.fixture
def tracking_overrides(tmp_path) -> list[str]:
    """``--set`` overrides sending MLflow to a fresh sqlite store under ``tmp_path``."""
    return [
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location={tmp_path}/mlartifacts",
    ]


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the in-process Ray tests of the session (4 logical CPUs on a 2-core box)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=str(tmp_path_factory.mktemp("ray", numbered=True)),
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 on 127.0.0.1 (a free port); yields the AWS variables that point pyarrow (and boto3) at it."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    yield env
    server.stop()
