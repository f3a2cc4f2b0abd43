"""MLflow conventions: MLflow's environment variables, no sqlite over NFS, many writers through one server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from rjem_ray.config import ConfigError, load_config
from rjem_ray.tracking.stores import resolve_artifact_location, resolve_tracking_uri, store_uris
from rjem_ray.tracking.tracker import Tracker

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "tune_configs" / "smoke.yaml"


def _race_once(tracker, other):
    """``tracker.client.log_inputs`` that loses the insert race once: ``other`` logs the same dataset between
    this call's lookup and its insert, so the insert breaks the (experiment, name, digest) key."""
    from mlflow.exceptions import MlflowException

    real, calls = tracker.client.log_inputs, []

    def log_inputs(run_id, datasets=None, models=None):
        calls.append(run_id)
        if len(calls) == 1:
            other.log_dataset("digits", IMAGES, LABELS)
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        return real(run_id, datasets=datasets, models=models)

    tracker.client.log_inputs = log_inputs
    return calls


IMAGES = [[[[0, 1], [2, 3]]]] * 3
LABELS = [0, 1, 2]


def test_runs_that_log_one_dataset_at_once_share_it(tmp_path):
    # The trials of a sweep log the same dataset into one experiment at the same moment; CI saw one lose the
    # race between MLflow's lookup and its insert and fail a healthy trial.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    a, b = (Tracker.create(uri, "race", (tmp_path / "art").as_uri(), run_name=n) for n in "ab")
    calls = _race_once(b, a)
    b.log_dataset("digits", IMAGES, LABELS)
    assert len(calls) == 2
    client = MlflowClient(tracking_uri=uri)
    inputs = [client.get_run(t.run_id).inputs.dataset_inputs for t in (a, b)]
    assert [len(i) for i in inputs] == [1, 1]
    assert inputs[0][0].dataset.digest == inputs[1][0].dataset.digest  # one stored dataset, linked twice
    assert inputs[1][0].tags[0].value == "train"


def test_other_dataset_errors_are_not_retried(tmp_path):
    from mlflow.exceptions import MlflowException

    from rjem_ray.tracking.tracker import DATASET_ATTEMPTS

    t = Tracker.create(f"sqlite:///{tmp_path}/mlflow.db", "errors", (tmp_path / "art").as_uri())
    calls = []

    def broken(run_id, datasets=None, models=None):
        calls.append(run_id)
        raise MlflowException("Run 'x' not found")

    t.client.log_inputs = broken
    with pytest.raises(MlflowException, match="not found"):
        t.log_dataset("digits", IMAGES, LABELS)
    assert len(calls) == 1

    def always_racing(run_id, datasets=None, models=None):  # a store that never settles still raises
        calls.append(run_id)
        raise MlflowException("UNIQUE constraint failed: datasets.experiment_id")

    calls.clear()
    t.client.log_inputs = always_racing
    with pytest.raises(MlflowException, match="UNIQUE"):
        t.log_dataset("digits", IMAGES, LABELS)
    assert len(calls) == DATASET_ATTEMPTS


@pytest.fixture
def no_mlflow_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return monkeypatch


def test_mlflow_env_wins_over_the_config_file_and_the_default(no_mlflow_env):
    assert load_config().tracking.tracking_uri == "sqlite:///mlflow.db"
    assert load_config(SMOKE).tracking.experiment == "rjem-smoke"
    no_mlflow_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    no_mlflow_env.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    for cfg in (load_config(), load_config(SMOKE)):  # the default, and a file that names its own store
        assert cfg.tracking.tracking_uri == "http://127.0.0.1:5999"
        assert cfg.tracking.experiment == "from-env"


def test_set_wins_over_mlflow_env(no_mlflow_env):
    no_mlflow_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    no_mlflow_env.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    cfg = load_config(SMOKE, ["tracking.tracking_uri=sqlite:///other.db", "tracking.experiment=from-set"])
    assert (cfg.tracking.tracking_uri, cfg.tracking.experiment) == ("sqlite:///other.db", "from-set")


def test_the_registry_is_the_tracking_store_unless_named(no_mlflow_env, tmp_path):
    """store_uris: the registry follows the tracking store; MLFLOW_REGISTRY_URI, then --set, name another."""
    no_mlflow_env.chdir(tmp_path)
    here = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert store_uris(load_config().tracking) == (here, here)  # relative sqlite made absolute, for both
    no_mlflow_env.setenv("MLFLOW_REGISTRY_URI", "http://127.0.0.1:5998")
    assert store_uris(load_config().tracking) == (here, "http://127.0.0.1:5998")
    cfg = load_config(None, ["tracking.registry_uri=sqlite:///reg.db"])
    assert store_uris(cfg.tracking) == (here, f"sqlite:///{tmp_path.resolve()}/reg.db")
    t = Tracker(here, "0123", store_uris(cfg.tracking)[1])  # the client holds exactly these two stores
    assert (t.client.tracking_uri, t.client._registry_uri) == (here, f"sqlite:///{tmp_path.resolve()}/reg.db")


def test_a_sweep_follows_the_same_precedence(no_mlflow_env, tmp_path):
    from rjem_ray.tune import load_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(textwrap.dedent(f"""\
        scope: train
        base: {SMOKE}
        train: {{eval_every: 3}}
        tune: {{num_samples: 1}}
        search: {{optim.lr: {{loguniform: [0.0001, 0.01]}}}}
        """))
    assert load_sweep(sweep).cfg.tracking.tracking_uri == "sqlite:///mlflow.db"  # the base file's store
    no_mlflow_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert load_sweep(sweep).cfg.tracking.tracking_uri == "http://127.0.0.1:5999"
    assert load_sweep(sweep, ["tracking.tracking_uri=sqlite:///x.db"]).cfg.tracking.tracking_uri == "sqlite:///x.db"


def test_sqlite_on_a_network_file_system_is_refused(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nfs-1.efs.aws:/ {tmp_path}/efs nfs4 rw 0 0\n")
    (tmp_path / "efs").mkdir()
    with pytest.raises(ConfigError, match=r"tracking.tracking_uri: .* sqlite file on nfs4 .*MLflow server"):
        resolve_tracking_uri(f"sqlite:///{tmp_path}/efs/mlflow/mlflow.db", mounts=mounts)
    with pytest.raises(ConfigError, match="nfs4"):  # relative to a working directory on the mount
        resolve_tracking_uri("sqlite:///mlflow.db", base=tmp_path / "efs", mounts=mounts)
    local = resolve_tracking_uri(f"sqlite:///{tmp_path}/local/mlflow.db", mounts=mounts)
    assert local == f"sqlite:///{tmp_path}/local/mlflow.db"
    assert resolve_tracking_uri("http://head:5000", mounts=mounts) == "http://head:5000"


def test_a_server_chooses_the_artifact_location_unless_it_is_absolute(tmp_path):
    assert resolve_artifact_location("mlartifacts", tracking_uri="http://head:5000") is None
    assert resolve_artifact_location("s3://b/a", tracking_uri="http://head:5000") == "s3://b/a"
    assert resolve_artifact_location("mlartifacts", base=tmp_path) == (tmp_path / "mlartifacts").resolve().as_uri()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 with a sqlite store on local disk and proxied artifacts."""
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--artifacts-destination", str(store / "artifacts")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "mlflow server did not answer /health"
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield uri, store
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


WRITER = """
import sys, time
from pathlib import Path
from rjem_ray.tracking.tracker import Tracker

uri, run_id, index, steps, go, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6])
tracker = Tracker(uri, run_id)
while not go.exists():  # every writer starts logging at the same moment
    time.sleep(0.05)
for step in range(steps):
    tracker.log_metrics({f"writer{index}/value": index * 1000 + step, "shared/value": index * 1000 + step}, step=step)
tracker.log_dataset("digits", [[[[0, 1], [2, 3]]]] * 3, [0, 1, 2])  # every writer, one dataset, same moment
tracker.set_tags({f"writer{index}": "done"})
out.write_text(f"artifact of writer {index}")
tracker.log_artifact(out, "writers")
"""


@pytest.mark.slow
def test_many_processes_log_through_one_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, store = mlflow_server
    tracker = Tracker.create(uri, "many-writers", resolve_artifact_location("mlartifacts", tracking_uri=uri),
                             run_name="shared")
    n_writers, steps = 5, 30
    go = tmp_path / "go"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, str(script), uri, tracker.run_id, str(i), str(steps), str(go),
                               str(tmp_path / f"writer{i}.txt")], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(n_writers)]
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    tracker.finish()

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    for i in range(n_writers):
        history = client.get_metric_history(tracker.run_id, f"writer{i}/value")
        assert sorted((m.step, m.value) for m in history) == [(s, i * 1000 + s) for s in range(steps)]
        assert run.data.tags[f"writer{i}"] == "done"
    # One key from many processes: every value arrives. (The values differ per writer: MLflow stores two
    # identical (key, value, step, millisecond) rows once, which CI saw as a "lost" point.)
    shared = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "shared/value"))
    assert shared == sorted((s, i * 1000 + s) for i in range(n_writers) for s in range(steps))
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["digits"]
    names = sorted(f.path for f in client.list_artifacts(tracker.run_id, "writers"))
    assert names == [f"writers/writer{i}.txt" for i in range(n_writers)]
    # Uploaded through the server into its --artifacts-destination, not written by the clients elsewhere.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert len(list((store / "artifacts").rglob("writer*.txt"))) == n_writers


def test_a_resumed_trial_gets_the_evaluations_its_lost_head_never_logged(tmp_path):
    # Rank 0 logs train/fid at every evaluation it runs; the driver logs fid from Tune's results. A head lost in
    # between leaves fid with holes: the resumed trial fills them from train/fid, up to the step it resumes at only
    # (later steps are evaluated again), never twice, and copies no training statistic.
    from rjem_ray.tune.trials import backfill_evaluations

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = Tracker.create(uri, "backfill", (tmp_path / "art").as_uri())
    for step, fid in ((8, 30.0), (16, 25.0), (24, 21.0)):
        t.log_metrics({"train/fid": fid, "train/accuracy": 0.9, "train/loss": 1.0}, step=step)
    t.log_metrics({"fid": 30.0}, step=8)  # the old driver logged step 8 before the head was lost
    added = backfill_evaluations(uri, t.run_id, upto=16)
    assert sorted(added) == [("accuracy", 8), ("accuracy", 16), ("fid", 16)]
    history = {m.step: m.value for m in t.client.get_metric_history(t.run_id, "fid")}
    assert history == {8: 30.0, 16: 25.0}
    assert len(t.client.get_metric_history(t.run_id, "fid")) == 2
    assert "loss" not in t.client.get_run(t.run_id).data.metrics
    assert backfill_evaluations(uri, t.run_id, upto=16) == []  # a second resume adds nothing


def test_metrics_are_logged_through_a_server_restart_and_other_errors_raise_at_once(tmp_path, monkeypatch):
    # A POST whose answer broke off while the server restarted is sent again (same metric objects: stored once);
    # any other MLflow error is the caller's at once.
    from mlflow.exceptions import MlflowException

    import rjem_ray.tracking.tracker as tracker_mod

    monkeypatch.setattr(tracker_mod.time, "sleep", lambda s: None)
    t = Tracker.create(f"sqlite:///{tmp_path}/mlflow.db", "restart", (tmp_path / "art").as_uri())
    real, calls = t.client.log_batch, []

    def flaky(run_id, metrics=(), **kw):
        calls.append(len(metrics))
        if len(calls) == 1:
            real(run_id, metrics=metrics, **kw)  # stored, then the answer is lost
            raise MlflowException("API request failed with exception ('Connection broken: IncompleteRead(0 bytes read)')")
        return real(run_id, metrics=metrics, **kw)

    t.client.log_batch = flaky
    t.log_metrics({"train/loss": 1.5}, step=2)
    assert calls == [1, 1]
    assert [(m.step, m.value) for m in t.client.get_metric_history(t.run_id, "train/loss")] == [(2, 1.5)]

    def broken(run_id, metrics=(), **kw):
        calls.append("bad")
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: Run 'x' not found")

    t.client.log_batch = broken
    with pytest.raises(MlflowException, match="not found"):
        t.log_metrics({"train/loss": 1.0}, step=4)
    assert calls.count("bad") == 1
