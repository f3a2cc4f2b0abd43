"""``trainer.storage_path`` as an ``s3://`` URI: checkpoints go to a bucket and a rerun continues from them.

The bucket lives on moto's S3 server (``s3_server`` in conftest.py), started in this process on 127.0.0.1. Credentials and
the endpoint reach pyarrow — and, through the environment, every `rjem train` process and its Ray workers —
as the standard AWS variables (pyarrow 14+ reads ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from rjem_ray.core import storage
from rjem_ray.method.checkpoint import load_state
from rjem_ray.config import ConfigError, load_config
from rjem_ray.distributed.train_driver import RUN_NAME, STORED_CONFIG, latest_checkpoint_path, prepare_run_dir, resolve_resume

from helpers_ray import stop_instance

REPO = Path(__file__).resolve().parents[2]
RJEM = str(Path(sys.executable).with_name("rjem"))
BUCKET = "rjem-test-bucket"
EVERY = 3


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh, empty bucket on the server; yields a boto3 client for checking what is stored."""
    import boto3

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    for key in keys:
        client.delete_object(Bucket=BUCKET, Key=key)
    client.delete_bucket(Bucket=BUCKET)


def _keys(client, prefix: str = "") -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


# --- the config edge ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["s3://bucket/prefix", "gs://bucket/p", "file:///tmp/x", "/shared/ray", "rel/dir",
                                   "memory://fsspec/only"])
def test_storage_path_takes_local_paths_and_known_uris(value):
    assert load_config("tune_configs/smoke.yaml", [f"trainer.storage_path={value}"]).trainer.storage_path == value


def test_storage_path_defaults_to_out_and_rejects_unknown_schemes():
    assert load_config("tune_configs/smoke.yaml").trainer.storage_path is None
    with pytest.raises(ConfigError) as err:
        load_config("tune_configs/smoke.yaml", ["trainer.storage_path=nosuchfs://bucket/x"])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("trainer.storage_path: 'nosuchfs://bucket/x' is not allowed")
    assert "s3" in msg and "fsspec" in msg


# --- the storage helpers -----------------------------------------------------------------------------

def test_uri_and_path_forms_are_kept_apart(tmp_path):
    assert storage.is_uri("s3://b/p") and storage.is_uri("memory://x")
    assert not storage.is_uri(tmp_path) and not storage.is_uri("file:///tmp/x") and not storage.is_uri(None)
    assert storage.join("s3://b/p/", "train", "checkpoint-1") == "s3://b/p/train/checkpoint-1"  # never a Path: // kept
    assert storage.join(tmp_path, "train") == tmp_path / "train"
    assert storage.normalize("file:///tmp/x") == Path("/tmp/x") and storage.normalize("s3://b/p/") == "s3://b/p"
    assert storage.name("s3://b/p/checkpoint-00000003/") == "checkpoint-00000003"
    assert storage.ray_storage("s3://b/p") == {"storage_path": "s3://b/p"}  # Ray resolves pyarrow's own schemes
    fsspec_only = storage.ray_storage("memory://bucket/p")  # a scheme pyarrow lacks: handed over as a filesystem
    assert fsspec_only["storage_path"] == "/bucket/p"
    assert type(fsspec_only["storage_filesystem"]).__name__ == "PyFileSystem"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_helpers_read_list_move_and_download_the_same_way_locally_and_on_s3(where, tmp_path, request):
    if where == "s3":
        request.getfixturevalue("s3")
        base = f"s3://{BUCKET}/helpers"
    else:
        base = tmp_path / "helpers"
    run = storage.join(base, "train")
    assert not storage.is_dir(run) and storage.subdirs(run) == []
    for step in (3, 6):
        storage.write_text(storage.join(run, f"checkpoint-{step:08d}", "state.pt"), f"state {step}")
    storage.write_text(storage.join(run, "checkpoint-00000009", "rank-1.pt"), "no state.pt: an incomplete upload")
    storage.write_text(storage.join(run, "other", "x.txt"), "x")
    assert storage.is_dir(run) and storage.is_file(storage.join(run, "checkpoint-00000006", "state.pt"))
    assert storage.subdirs(run, "checkpoint-") == [f"checkpoint-{s:08d}" for s in (3, 6, 9)]
    # The newest *complete* checkpoint, from the run directory or from the storage path above it.
    assert latest_checkpoint_path(run) == storage.join(run, "checkpoint-00000006")
    assert latest_checkpoint_path(base) == storage.join(run, "checkpoint-00000006")
    latest = storage.join(run, "checkpoint-00000006")
    assert resolve_resume(base if where == "s3" else latest) == latest
    with storage.local_copy(storage.join(run, "checkpoint-00000006")) as d:
        assert (Path(d) / "state.pt").read_text() == "state 6"
    aside = storage.join(base, "train-replaced")
    storage.move(run, aside)
    assert not storage.is_dir(run)
    assert storage.read_text(storage.join(aside, "checkpoint-00000003", "state.pt")) == "state 3"


def test_an_unwritable_bucket_is_one_line_naming_the_key(s3):
    from rjem_ray.cli import check_writable

    check_writable(f"s3://{BUCKET}/ok", "trainer.storage_path", directory=True)
    assert not [k for k in _keys(s3) if "probe" in k]  # the probe object is gone again
    with pytest.raises(ValueError) as err:
        check_writable("s3://no-such-bucket-here/x", "trainer.storage_path", directory=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("trainer.storage_path 's3://no-such-bucket-here/x' cannot be written")


def test_fresh_moves_a_stored_run_aside_and_a_new_out_checks_the_stored_config(s3, tmp_path):
    uri = f"s3://{BUCKET}/prep"
    cfg = load_config("tune_configs/smoke.yaml", [f"trainer.storage_path={uri}"])
    run = storage.join(uri, RUN_NAME)
    assert prepare_run_dir(cfg, tmp_path / "a") is False  # nothing stored yet
    storage.write_text(storage.join(run, "checkpoint-00000003", "state.pt"), "s")
    storage.write_text(storage.join(run, STORED_CONFIG), yaml.safe_dump(cfg.to_dict()))
    # Another machine (a new, empty OUT) continues the stored run, and is refused a config that cannot.
    assert prepare_run_dir(cfg, tmp_path / "b") is True
    wider = load_config("tune_configs/smoke.yaml", [f"trainer.storage_path={uri}", "model.widen=2"])
    with pytest.raises(ConfigError, match=f"^model: {run} holds a run with model"):
        prepare_run_dir(wider, tmp_path / "c")
    assert prepare_run_dir(wider, tmp_path / "c", fresh=True) is False
    assert not storage.is_dir(run)
    assert any(k.startswith("prep/train-replaced-") and k.endswith("checkpoint-00000003/state.pt") for k in _keys(s3))


# --- end to end: rjem train with its checkpoints in S3 -----------------------------------------------

@pytest.fixture
def rjem_train(tmp_path, cache_dir, s3_server):
    """``run(out, steps, *extra)``: a finished `rjem train` process on the smoke config, its own local Ray."""
    db = tmp_path / "mlflow.db"
    temps: list[str] = []

    def run(out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
        temp = tempfile.mkdtemp(prefix="rjs3", dir="/tmp")  # short: Ray's socket paths have a length limit
        temps.append(temp)
        env = {**os.environ, **s3_server, "RAY_TMPDIR": temp,
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("RAY_ADDRESS", None)
        sets = [f"train.steps={steps}", f"train.checkpoint_every={EVERY}", "train.log_every=1",
                f"cache_dir={cache_dir}", f"tracking.tracking_uri=sqlite:///{db}",
                f"tracking.artifact_location={tmp_path}/mlartifacts", "tracking.experiment=s3"]
        argv = [RJEM, "train", "tune_configs/smoke.yaml", "--out", str(out)]
        argv += [x for s in sets for x in ("--set", s)] + list(extra)
        try:
            return subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=900)
        finally:
            stop_instance(temp)

    yield run, f"sqlite:///{db}"
    for temp in temps:
        shutil.rmtree(temp, ignore_errors=True)


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


@pytest.mark.slow
def test_checkpoints_go_to_s3_and_a_rerun_elsewhere_continues_from_them(s3, rjem_train, tmp_path):
    run, uri = rjem_train
    storage_path = f"s3://{BUCKET}/exp"
    first = run(tmp_path / "first", 2 * EVERY, "--set", f"trainer.storage_path={storage_path}")
    assert first.returncode == 0, first.stdout[-5000:]
    keys = _keys(s3, "exp/")
    stored = sorted(k.split("/")[2] for k in keys if k.startswith("exp/train/checkpoint-") and k.endswith("/state.pt"))
    assert stored == [f"checkpoint-{EVERY:08d}", f"checkpoint-{2 * EVERY:08d}"], sorted(keys)
    assert f"exp/train/{STORED_CONFIG}" in keys
    assert not (tmp_path / "first" / "ray").exists()  # nothing of Ray's run on the local disk
    assert load_state(tmp_path / "first" / "checkpoint")["step"] == 2 * EVERY  # OUT still gets the final one

    # The same command on another machine (a new OUT: nothing local to go on) continues from the bucket.
    second = run(tmp_path / "second", 4 * EVERY, "--set", f"trainer.storage_path={storage_path}")
    text = second.stdout
    assert second.returncode == 0, text[-5000:]
    assert f"continuing the run in {storage_path}/train" in text
    resumed = [ln for ln in text.splitlines() if "resumed from ray-checkpoint at step" in ln]
    assert len(resumed) == 1 and f"at step {2 * EVERY} " in resumed[0] + " ", text[-5000:]
    assert load_state(tmp_path / "second" / "checkpoint")["step"] == 4 * EVERY
    stored = sorted(k.split("/")[2] for k in _keys(s3, "exp/train/") if k.endswith("/state.pt"))
    assert stored == [f"checkpoint-{3 * EVERY:08d}", f"checkpoint-{4 * EVERY:08d}"]  # num_to_keep=2, in S3

    # No step was trained twice: the rerun logged only the steps after the stored checkpoint.
    client = MlflowClient(tracking_uri=uri)
    runs = sorted(client.search_runs([client.get_experiment_by_name("s3").experiment_id]),
                  key=lambda r: r.info.start_time)
    assert len(runs) == 2
    assert _steps(client, runs[0].info.run_id) == list(range(1, 2 * EVERY + 1))
    assert _steps(client, runs[1].info.run_id) == list(range(2 * EVERY + 1, 4 * EVERY + 1))
    assert runs[1].data.tags["resumed_at_step"] == str(2 * EVERY)

    # --resume takes the storage path too: a new local run starts from the bucket's latest checkpoint.
    third = run(tmp_path / "third", 4 * EVERY + 2, "--resume", storage_path)
    assert third.returncode == 0, third.stdout[-5000:]
    assert f"resumed from {storage_path}/train/checkpoint-{4 * EVERY:08d} at step {4 * EVERY}" in third.stdout
    assert load_state(tmp_path / "third" / "checkpoint")["step"] == 4 * EVERY + 2
    assert (tmp_path / "third" / "ray" / "train").is_dir()  # without trainer.storage_path: OUT/ray as before
