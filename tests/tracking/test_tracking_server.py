"""A stateless MLflow server: runs in PostgreSQL, artifacts in S3, nothing on the server's own disk.

The parts are real: PostgreSQL 16 (pgserver's self-contained build, from the ``[test]`` extra) on a Unix socket
in a temporary directory, moto's S3 on 127.0.0.1 (``s3_server`` in conftest.py), and ``mlflow server`` started
by the code of ``rjem server`` (``tracking.server.start_server``). Only the server holds the S3 credentials: the
sweeps' processes upload their artifacts through it (proxied artifacts).

Slow: a train sweep of 4 trials whose server is killed (SIGKILL) and restarted mid-sweep; a sweep whose head
dies, resumed by ``rjem tune --resume`` on a fresh head (a new local Ray, an empty ``--out``) from its Tune
state and checkpoints in S3; ``rjem migrate-store`` of a sqlite store into PostgreSQL and S3. Fast: a wrong or
unreachable store fails in one line with its password masked, and ``rjem server`` without a database says
that its runs will not outlive the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from rjem_ray.tracking.models import register_run_model, resolve_checkpoint
from rjem_ray.tracking.server import ARTIFACTS_ENV, BACKEND_ENV, start_server, stop_server
from rjem_ray.tracking.stores import StoreError, check_database, client_for
from rjem_ray.tracking.tracker import Tracker
from rjem_ray.tune import load_sweep, run_sweep

from helpers_ray import stop_instance

REPO = Path(__file__).resolve().parents[2]
RJEM = str(Path(sys.executable).with_name("rjem"))
SWEEP = REPO / "tune_configs" / "tune-smoke-train.yaml"
BUCKET = "rjem-mlflow-server"
PASSWORD = "s3cr3t-pw"
# The smallest train sweep that evaluates twice: fid at steps 2 and 4, train/loss at every step.
SMALL = ["tune.scheduler=fifo", "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
         "train.eval_metrics=[fid]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own; yields ``database(name)``, which creates a database and returns its URI.

    Its data directory is outside pytest's (which pytest keeps private to root): run as root, pgserver runs
    PostgreSQL as a user of its own, which must reach the directory."""
    import pgserver

    home = tempfile.mkdtemp(prefix="rjpg", dir="/tmp")
    os.chmod(home, 0o755)
    server = pgserver.get_server(Path(home) / "data", cleanup_mode="delete")
    socket_dir = server.get_uri().split("host=", 1)[1]

    def database(name: str) -> str:
        server.psql(f"CREATE DATABASE {name};")
        return f"postgresql+psycopg://postgres:{PASSWORD}@/{name}?host={socket_dir}"

    yield database
    server.cleanup()
    shutil.rmtree(home, ignore_errors=True)


def _sql(uri: str, query: str, **params) -> list[tuple]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sqlalchemy.text(query), params)]
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def bucket(s3_server):
    """A boto3 client on the test's S3 with the server's bucket; the credentials stay out of this process."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    return client


def _text(client, key: str) -> str:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def _keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


class Server:
    """``mlflow server`` on a PostgreSQL database with artifacts proxied to ``s3://BUCKET/PREFIX``."""

    def __init__(self, db: str, prefix: str, s3_env: dict, log: Path):
        self.db, self.destination, self.env, self.log = db, f"s3://{BUCKET}/{prefix}", s3_env, log
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        self.proc = start_server(self.db, self.destination, port=self.port, log=self.log, env=self.env)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None:
            stop_server(self.proc.pid, sig)
            self.proc.wait(timeout=30)
            self.proc = None


@pytest.fixture(scope="module")
def server(postgres, bucket, s3_server, tmp_path_factory):
    srv = Server(postgres("mlflow"), "mlflow", s3_server, tmp_path_factory.mktemp("server") / "mlflow.log")
    srv.start()
    yield srv
    srv.stop()


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(client, experiment: str, deleted: bool = False) -> list:
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL if deleted else ViewType.ACTIVE_ONLY)


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------------------------------------- bad input


def test_a_wrong_or_unreachable_database_is_one_line_with_the_password_masked(postgres, tmp_path, capsys,
                                                                               monkeypatch):
    from rjem_ray.cli import main

    good = postgres("checked")
    check_database(good)  # a real server accepts it
    closed = f"postgresql+psycopg://mlflow:{PASSWORD}@127.0.0.1:{_free_port()}/mlflow"
    wrong = good.replace("/checked?", "/no_such_db?")
    for uri, why in ((closed, "Connection refused"), (wrong, 'database "no_such_db" does not exist')):
        with pytest.raises(StoreError) as err:
            check_database(uri)
        msg = str(err.value)
        assert "\n" not in msg and PASSWORD not in msg and why in msg, msg
        assert msg.startswith(f"the MLflow backend store {uri.replace(PASSWORD, '***')} cannot be reached")

    # `rjem server` checks before it starts anything: one line, exit 2, no server, no pid file.
    monkeypatch.chdir(tmp_path)
    pid, log = tmp_path / "server.pid", tmp_path / "server.log"
    argv = ["server", "--backend-store-uri", wrong, "--detach", "--pid-file", str(pid), "--log", str(log),
            "--port", str(_free_port())]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rjem server: error: the MLflow backend store ") and PASSWORD not in err
    assert not pid.exists() and not log.exists()
    with pytest.raises(StoreError, match=r"write postgresql:// .*not postgres://"):
        check_database("postgres://u:p@127.0.0.1/db")

    # `rjem tune` with the store in a database it cannot reach: one line before Ray starts, nothing logged elsewhere.
    import ray

    started = ray.is_initialized()
    out = tmp_path / "sweep"
    assert main(["tune", str(SWEEP), "--out", str(out), "--set", f"tracking.tracking_uri={closed}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mlflow:***@127.0.0.1" in err and PASSWORD not in err, err
    assert ray.is_initialized() == started and not out.exists()
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "mlartifacts").exists()
    # An MLflow server that does not answer, the same way.
    dead = f"http://127.0.0.1:{_free_port()}"
    assert main(["tune", str(SWEEP), "--out", str(out), "--set", f"tracking.tracking_uri={dead}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rjem tune: error: the MLflow server {dead} does not answer") and err.count("\n") == 1


def test_rjem_server_without_a_database_says_the_runs_will_not_outlive_the_machine(tmp_path, capsys, monkeypatch):
    from rjem_ray.cli import main

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv(ARTIFACTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    ran = []

    def execvpe(program, argv, env):  # what would have replaced this process
        ran.append((argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execvpe", execvpe)
    with pytest.raises(SystemExit):
        main(["server", "--port", "5123"])
    out = capsys.readouterr().out
    assert "runs are kept in sqlite:///" in out and "will not outlive it (`ray down` deletes them)" in out
    argv, env = ran[0]
    assert argv[1] == "server" and env[BACKEND_ENV] == f"sqlite:///{tmp_path}/mlflow.db"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5123"

    # With the database and object store in MLflow's own variables: no warning, and those are what it runs on,
    # passed in its environment (argv is public: `ps` shows it to every user).
    db = f"postgresql+psycopg://mlflow:{PASSWORD}@db.internal:5432/mlflow"
    monkeypatch.setenv(BACKEND_ENV, db)
    monkeypatch.setenv(ARTIFACTS_ENV, "s3://bucket/mlflow")
    monkeypatch.setattr("rjem_ray.tracking.stores.check_database", lambda uri: None)  # no database at that address here
    with pytest.raises(SystemExit):
        main(["server"])
    assert "WARNING" not in capsys.readouterr().out
    argv, env = ran[1]
    assert env[BACKEND_ENV] == db and env[ARTIFACTS_ENV] == "s3://bucket/mlflow"
    assert not any(PASSWORD in a for a in argv)
    assert "--default-artifact-root" not in argv and "--no-serve-artifacts" not in argv  # proxied artifacts


# ---------------------------------------------------------------------------------------------- kill and restart


class KillAndRestart(threading.Thread):
    """Kills the server (its whole process group, SIGKILL) once the sweep has logged its first FID, waits, and
    starts it again on the same port and database."""

    def __init__(self, server: Server, pause_s: float = 2.0):
        super().__init__(daemon=True)
        self.server, self.pause_s = server, pause_s
        self.killed_at = self.back_at = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self):
        try:
            while not _sql(self.server.db, "SELECT 1 FROM metrics WHERE key = 'fid' LIMIT 1"):
                if self.done.wait(0.5):
                    return
            self.killed_at = int(time.time() * 1000)
            self.server.stop(signal.SIGKILL)
            time.sleep(self.pause_s)
            self.server.start()
            self.back_at = int(time.time() * 1000)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sweep_logs_through_a_server_killed_and_restarted_mid_sweep(server, bucket, ray_session, tmp_path,
                                                                       cache_dir):
    sets = SMALL + [f"tracking.tracking_uri={server.uri}", "tracking.experiment=killed-server",
                    f"cache_dir={cache_dir}", "search.optim.lr.grid=[0.001, 0.002, 0.003, 0.004]",
                    "tune.max_concurrent=2", "tune.trial_cpus=0.25", "tune.register_as=server-best"]
    sweep = load_sweep(SWEEP, sets)
    assert sweep.num_trials() == 4
    killer = KillAndRestart(server)
    killer.start()
    try:
        outcome = run_sweep(sweep, tmp_path / "sweep")
    finally:
        killer.done.set()
        killer.join(timeout=120)
    assert killer.error is None, killer.error
    assert killer.killed_at and killer.back_at, "the server was never killed: no FID was logged"

    rows = outcome.rows
    assert not outcome.interrupted and [r["status"] for r in rows] == ["finished"] * 4
    client = _client(server.uri)
    runs = _runs(client, "killed-server")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id]
    assert [p.info.run_id for p in parents] == [outcome.parent_run_id] and len(runs) == 5
    assert sorted(c.data.tags["rjem.trial_id"] for c in children) == sorted(r["trial_id"] for r in rows)
    parent = client.get_run(outcome.parent_run_id)
    # Killed mid-sweep: the sweep logged before the kill and after the restart, and the trials that were training
    # during the outage lost nothing.
    assert parent.info.start_time < killer.killed_at < killer.back_at < parent.info.end_time
    stamps = [m.timestamp for c in children for m in client.get_metric_history(c.info.run_id, "train/loss")]
    assert min(stamps) < killer.killed_at and max(stamps) > killer.back_at
    assert sum(c.info.start_time > killer.back_at for c in children) >= 1  # a trial that started after the restart
    assert parent.info.status == "FINISHED" and parent.data.metrics["num_finished"] == 4
    exp_id = parent.info.experiment_id
    for c in children:
        run_id = c.info.run_id
        assert c.info.status == "FINISHED" and c.info.artifact_uri == f"mlflow-artifacts:/{exp_id}/{run_id}/artifacts"
        assert _steps(client, run_id, "train/loss") == [1, 2, 3, 4]  # every step once: none lost, none twice
        assert _steps(client, run_id, "fid") == [2, 4]
        row = next(r for r in rows if r["trial_id"] == c.data.tags["rjem.trial_id"])
        assert float(c.data.params["optim.lr"]) == row["optim.lr"]
        assert client.get_metric_history(run_id, "fid")[-1].value == pytest.approx(row["fid"])
        stored = _keys(bucket, f"mlflow/{exp_id}/{run_id}/artifacts/")
        assert {f"mlflow/{exp_id}/{run_id}/artifacts/{a}" for a in ("config.yaml", "samples/samples.png")} <= stored
    # No duplicate row anywhere in the database: one per (run, key, step) for the sweep's metrics.
    dup = _sql(server.db, "SELECT run_uuid, key, step FROM metrics WHERE key IN ('train/loss', 'fid') "
                          "GROUP BY run_uuid, key, step HAVING count(*) > 1")
    assert dup == []
    assert _sql(server.db, "SELECT count(*) FROM runs WHERE experiment_id = :e", e=int(exp_id)) == [(5,)]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "summary")} >= {"summary/trials.csv"}

    # The registered best model: one version, the best trial's, its weights served from S3 through the server.
    (version,) = client.search_model_versions("name = 'server-best'")
    assert version.run_id == rows[0]["run_id"] and version.source.startswith(f"mlflow-artifacts:/{exp_id}/")
    import torch

    from rjem_ray.method.restore import load_model

    ckpt = resolve_checkpoint("models:/server-best/1", server.uri, dst=tmp_path / "model")
    best = outcome.out_dir / "trials" / rows[0]["trial_id"] / "checkpoint"
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    assert torch.equal(load_model(ckpt)[0](x), load_model(best)[0](x))


# ---------------------------------------------------------------------------------------------- a new head


def _tune(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """``rjem tune`` in its own session with its own local Ray (``RAY_TMPDIR``): a head of its own."""
    with open(log, "w") as fh:
        return subprocess.Popen([RJEM, "tune", *argv], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sweep_resumes_on_a_new_head_from_its_state_in_s3(server, bucket, s3_server, tmp_path, cache_dir):
    prefix = "sweeps/new-head"
    # Long enough after its first evaluated checkpoint (step 8) for the head to die mid-trial: steps take ~0.1 s.
    sets = ["tune.scheduler=fifo", "train.steps=24", "train.eval_every=8", "train.checkpoint_every=4",
            "train.log_every=2", "train.eval_metrics=[fid]", f"trainer.storage_path=s3://{BUCKET}/{prefix}",
            "tracking.experiment=new-head", f"cache_dir={cache_dir}", "tune.max_concurrent=1", "tune.trial_cpus=0.25"]
    argv = [str(SWEEP)] + [x for s in sets for x in ("--set", s)]
    heads = [tempfile.mkdtemp(prefix="rjhd", dir="/tmp") for _ in range(2)]  # short: Ray's socket paths
    base = {**os.environ, **s3_server, "MLFLOW_TRACKING_URI": server.uri,
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base.pop("RAY_ADDRESS", None)
    first_out, second_out = tmp_path / "head1", tmp_path / "head2"
    first = _tune(argv + ["--out", str(first_out)], {**base, "RAY_TMPDIR": heads[0]}, tmp_path / "head1.log")
    try:
        # The head is lost mid-trial, as soon as Ray Train has registered the first trial's checkpoint of step 8
        # (an evaluation step) in S3, while the trial trains on to step 24: the driver may not have logged that
        # evaluation yet. Tune's state (saved every ~10 s) knows the trial by then.
        deadline = time.time() + 420
        while time.time() < deadline and first.poll() is None:
            keys = _keys(bucket, prefix + "/")
            ckpts = [k for k in keys if k.endswith("/train/checkpoint-00000008/state.pt")]
            if ckpts:
                trial = ckpts[0].split("/")[3]
                snapshot = f"{prefix}/trials/{trial}/train/checkpoint_manager_snapshot.json"
                states = [k for k in keys if "/experiment_state" in k]
                if (snapshot in keys and "checkpoint-00000008" in _text(bucket, snapshot)
                        and any(trial in _text(bucket, k) for k in states)):
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the first head never reached step 8: " + (tmp_path / "head1.log").read_text()[-3000:])
        killed_at = int(time.time() * 1000)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        assert not stop_instance(heads[0])
    client = _client(server.uri)
    (before_parent,) = [r for r in _runs(client, "new-head") if "mlflow.parentRunId" not in r.data.tags]
    before = {r.data.tags["rjem.trial_id"]: r.info.run_id for r in _runs(client, "new-head")
              if "mlflow.parentRunId" in r.data.tags}
    assert list(before) == [trial] and not list((tmp_path / "head1" / "trials").glob("*/checkpoint"))
    shutil.rmtree(first_out)  # the old head's disk is gone with it

    # A fresh head: a new local Ray, an empty --out, the same storage path and tracking store.
    second = _tune(argv + ["--out", str(second_out), "--resume"], {**base, "RAY_TMPDIR": heads[1]},
                   tmp_path / "head2.log")
    try:
        rc = second.wait(timeout=600)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
        assert not stop_instance(heads[1])
        for head in heads:
            shutil.rmtree(head, ignore_errors=True)
    text = (tmp_path / "head2.log").read_text()
    assert rc == 0, text[-5000:]
    assert f"resuming s3://{BUCKET}/{prefix}/tune-smoke-train" in text
    assert f"MLflow parent run id: {before_parent.info.run_id}" in text

    runs = _runs(client, "new-head")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["rjem.trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert [p.info.run_id for p in parents] == [before_parent.info.run_id]  # the same parent, not a second one
    parent = client.get_run(before_parent.info.run_id)
    assert parent.info.status == "FINISHED" and "rjem.resumed" in parent.data.tags
    assert len(children) == 2 and all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id
                                      for c in children.values())
    resumed = children[trial]
    assert resumed.info.run_id == before[trial]  # the interrupted trial's own run, reopened
    (other,) = [c for t, c in children.items() if t != trial]
    assert other.info.start_time > killed_at  # the remaining child, created by the new head
    assert resumed.info.status == other.info.status == "FINISHED"
    # The interrupted trial continued from its last checkpoint in S3 (step 8, or a later one written before the
    # kill took effect), not from step 0: the steps up to it were trained (and logged) once, and every evaluation
    # is in its run exactly once (step 8's, reported again by the resumed trial if the old driver missed it).
    start = int(resumed.data.tags["resumed_at_step"])
    assert start % 4 == 0 and 8 <= start < 24, start
    losses = _steps(client, resumed.info.run_id, "train/loss")
    assert set(losses) == set(range(2, 25, 2)) and [s for s in losses if s <= start] == list(range(2, start + 1, 2))
    assert _steps(client, resumed.info.run_id, "fid") == [8, 16, 24]
    assert _steps(client, other.info.run_id, "fid") == [8, 16, 24]

    keys = _keys(bucket, prefix + "/")
    assert f"{prefix}/tune-smoke-train/tuner.pkl" in keys and f"{prefix}/tune-smoke-train/rjem-sweep.json" in keys
    stored = json.loads(bucket.get_object(Bucket=BUCKET, Key=f"{prefix}/tune-smoke-train/rjem-sweep.json")["Body"]
                        .read())
    assert stored["state"]["parent_run_id"] == parent.info.run_id
    for t in children:
        assert any(k.startswith(f"{prefix}/trials/{t}/train/checkpoint-00000024/") for k in keys), t
    import csv

    with open(second_out / "trials.csv") as fh:
        table = list(csv.DictReader(fh))
    assert sorted(r["trial_id"] for r in table) == sorted(children) and {r["status"] for r in table} == {"finished"}
    assert not first_out.exists()


# ---------------------------------------------------------------------------------------------- migration


@pytest.fixture
def sqlite_store(tmp_path):
    """Today's store: sqlite with local artifacts, holding a sweep-like parent with two children (metrics at
    steps, params, an artifact) and a registered model."""
    from rjem_ray.method.checkpoint import save_checkpoint
    from rjem_ray.config import load_config
    from rjem_ray.core.data import dataset_info
    from rjem_ray.method.models import build_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    location = (tmp_path / "mlartifacts").as_uri()
    parent = Tracker.create(uri, "old-sweep", location, run_name="sweep", tags={"rjem.sweep": "true"})
    children = []
    for i in range(2):
        child = Tracker.create(uri, "old-sweep", location, run_name=f"trial-{i}", parent_run_id=parent.run_id,
                                        tags={"rjem.trial_id": f"t{i}"})
        child.log_params({"optim": {"lr": 0.001 * (i + 1)}})
        for step in (1, 2, 3):
            child.log_metrics({"train/loss": 1.0 / (step + i)}, step=step)
        (tmp_path / f"notes{i}.txt").write_text(f"trial {i}")
        child.log_artifact(tmp_path / f"notes{i}.txt", "notes")
        child.finish()
        children.append(child.run_id)
    cfg = load_config(REPO / "tune_configs" / "smoke.yaml")
    ckpt = save_checkpoint(tmp_path / "ckpt", {"model": build_model(cfg.model, dataset_info(cfg.data.name)).state_dict(),
                                               "config": cfg.to_dict(), "step": 6})
    register_run_model(client_for(uri), children[1], "old-best", ckpt)
    parent.finish()
    return uri, parent.run_id, children, ckpt


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_migrate_store_copies_a_sqlite_store_into_postgres_and_its_artifacts_into_s3(
        sqlite_store, postgres, bucket, s3_server, tmp_path, monkeypatch, capsys):
    import torch

    from rjem_ray.method.restore import load_model
    from rjem_ray.cli import main

    uri, parent_id, children, ckpt = sqlite_store
    db = postgres("migrated")
    for k, v in s3_server.items():  # the migration writes the artifacts to S3 itself
        monkeypatch.setenv(k, v)
    assert main(["migrate-store", uri, "--to", db, "--artifacts-destination", f"s3://{BUCKET}/migrated"]) == 0
    assert PASSWORD not in capsys.readouterr().out
    for k in s3_server:
        monkeypatch.delenv(k)
    old = _client(uri)
    # Served by `rjem server --detach` (what cluster.yaml runs), the S3 credentials in its environment only.
    port, pid_file = _free_port(), tmp_path / "server.pid"
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(BACKEND_ENV, db)
    monkeypatch.setenv(ARTIFACTS_ENV, f"s3://{BUCKET}/migrated")
    assert main(["server", "--detach", "--port", str(port), "--pid-file", str(pid_file),
                 "--log", str(tmp_path / "server.log")]) == 0
    printed = capsys.readouterr().out
    assert f"MLflow server on http://127.0.0.1:{port}" in printed and PASSWORD not in printed
    for k in [*s3_server, BACKEND_ENV, ARTIFACTS_ENV]:
        monkeypatch.delenv(k)
    srv_uri = f"http://127.0.0.1:{port}"
    try:
        new = _client(srv_uri)
        exp = new.get_experiment_by_name("old-sweep")
        assert exp.experiment_id == old.get_experiment_by_name("old-sweep").experiment_id
        assert exp.artifact_location == f"mlflow-artifacts:/{exp.experiment_id}"
        assert sorted(r.info.run_id for r in _runs(new, "old-sweep")) == sorted([parent_id, *children])
        for run_id in children:
            a, b = old.get_run(run_id), new.get_run(run_id)
            assert b.data.params == a.data.params and b.data.tags == a.data.tags and b.info.status == "FINISHED"
            assert b.data.tags["mlflow.parentRunId"] == parent_id
            history = [(m.step, m.timestamp, m.value) for m in new.get_metric_history(run_id, "train/loss")]
            assert history == [(m.step, m.timestamp, m.value) for m in old.get_metric_history(run_id, "train/loss")]
            assert [m[0] for m in history] == [1, 2, 3]
            # artifacts: copied to S3 and served by the server (the sqlite store's files are not read)
            got = Path(new.download_artifacts(run_id, "notes", str(tmp_path / run_id)))
            assert sorted(p.read_text() for p in got.iterdir()) == [f"trial {children.index(run_id)}"]
        assert any(k.startswith(f"migrated/{exp.experiment_id}/{children[0]}/artifacts/notes/")
                   for k in _keys(bucket, "migrated/"))
        (version,) = new.search_model_versions("name = 'old-best'")
        assert version.run_id == children[1] and version.version == "1"
        served = resolve_checkpoint("models:/old-best/1", srv_uri, dst=tmp_path / "served")
        x = torch.rand(2, 1, 28, 28) * 2 - 1
        assert torch.equal(load_model(served)[0](x), load_model(ckpt)[0](x))
        # New experiments continue after the copied ids.
        fresh = Tracker.create(srv_uri, "after-migration", None)
        assert int(new.get_run(fresh.run_id).info.experiment_id) > int(exp.experiment_id)
    finally:
        stop_server(int(pid_file.read_text()))
    # A database that already holds runs is refused, in one line.
    assert main(["migrate-store", uri, "--to", db]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds" in err and PASSWORD not in err
