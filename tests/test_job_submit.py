"""``ray job submit -- rjem train ...`` against a real head node (``ray start --head``) on 127.0.0.1.

The job gets the repository as its working directory (uploaded by the job server, as on a cluster) and
absolute ``--out`` / tracking / cache paths, since its working directory is a copy. The run must reach
SUCCEEDED, write its outputs, and appear in MLflow as exactly one finished run carrying the job's Ray job
id and its submission id (the tag ``ray.submission_id``, what ``ray job submit`` and ``ray job logs`` call it).

Teardown stops exactly the Ray processes this head started (those whose command line names its private
temp dir, and their descendants) instead of ``ray stop``, which would stop every Ray instance on the
machine, other people's included.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rjem_ray.method.checkpoint import load_state

from helpers_ray import stop_instance

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _submit(cmd: list[str], env: dict, agent_wait_s: float = 120, timeout_s: float = 480) -> subprocess.CompletedProcess:
    """Run ``ray job submit``; retried while the head's job agent is still starting (it registers after
    ``ray start`` returns, which takes a while on a loaded machine)."""
    start = time.time()
    while True:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode == 0 or "No available agent" not in done.stderr or time.time() - start > agent_wait_s:
            return done
        time.sleep(2)


@pytest.fixture(scope="module")
def ray_head():
    """A head node on 127.0.0.1 with the job server; yields ``(dashboard address, env for the CLI)``."""
    temp_dir = tempfile.mkdtemp(prefix="rjjob", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0", MLFLOW_DISABLE_TELEMETRY="true",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `rjem` for the job's entrypoint
    )
    dashboard_port = _free_port()
    cmd = [
        RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--port", str(_free_port()), "--dashboard-port", str(dashboard_port), "--num-cpus", "4",
        # Every port Ray would otherwise take at a fixed default (the dashboard agent's 52365) or pick
        # itself: other Ray instances on this machine (other tests, other users) must not collide.
        "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
        "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
        "--object-store-memory", str(256 * 2**20), "--temp-dir", temp_dir, "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        # Clients of an authenticated cluster say so (a client's default mode is "disabled"); the token is
        # the user's own ~/.ray/auth_token, as Ray generated it.
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_AUTH_MODE", "token")
            yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        survivors = stop_instance(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"Ray processes of {temp_dir} survived teardown: {sorted(survivors)}"


def test_job_submit_runs_rjem_train_to_succeeded_and_tracks_it_in_mlflow(ray_head, cache_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = ray_head
    # The head is authenticated: without the token the job server refuses the same submission.
    anonymous = {**env, "RAY_AUTH_MODE": "disabled"}
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=anonymous, capture_output=True,
                             text=True, timeout=180)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower(), refused.stderr[-2000:]
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    submission_id = f"rjem-test-{uuid.uuid4().hex[:8]}"
    sets = [
        # weak scaling (the default): 2 workers of 8 images, each optimiser step 2 reference steps
        "trainer.num_workers=2", "train.batch_size=8", "train.steps=4", "train.log_every=1",
        f"cache_dir={cache_dir}", f"tracking.tracking_uri=sqlite:///{db}",
        f"tracking.artifact_location={tmp_path}/mlartifacts", "tracking.experiment=jobs",
    ]
    cmd = [RAY, "job", "submit", "--address", address, "--submission-id", submission_id,
           "--working-dir", str(REPO), "--",
           "rjem", "train", "tune_configs/smoke.yaml", "--out", str(out)] + [x for s in sets for x in ("--set", s)]

    done = _submit(cmd, env)

    try:
        status = JobSubmissionClient(address).get_job_status(submission_id)
    except RuntimeError as exc:  # the job was never created
        status = f"unknown ({exc})"
    if done.returncode != 0 or status != JobStatus.SUCCEEDED:  # pytest.fail: the job's log tail, untruncated
        pytest.fail(f"job {submission_id}: exit {done.returncode}, status {status}\n"
                    f"--- stdout ---\n{done.stdout[-6000:]}\n--- stderr ---\n{done.stderr[-3000:]}")
    assert f"Job '{submission_id}' succeeded" in done.stdout
    # The driver ran inside the job and printed its own summary line.
    assert "[rjem] done: checkpoint" in done.stdout

    # The outputs went to the absolute --out, not into the job's temporary copy of the repository.
    state = load_state(out / "checkpoint")
    assert (state["step"], state["images_seen"], state["global_batch"]) == (4, 32, 16)
    assert (out / "checkpoint" / "rank-1.pt").is_file()  # two Ray Train workers reported

    # Exactly one MLflow run, made by this job's driver (Ray's job id of the submission).
    job = JobSubmissionClient(address).get_job_info(submission_id)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("jobs")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.data.tags for r in runs]
    run = runs[0]
    tags, params = run.data.tags, run.data.params
    assert job.job_id and tags["ray.job_id"] == job.job_id, (job.job_id, tags)
    assert run.info.status == "FINISHED"
    assert tags["ray.nodes"] == "1" and float(tags["ray.cluster_cpus"]) == 4.0
    assert tags["trainer.num_workers"] == "2" and params["trainer.num_workers"] == "2"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [2, 4]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} >= {"checkpoint/state.pt"}
    # ... and findable by the id `ray job submit` knows it by.
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`ray.submission_id` = '{submission_id}'")
    assert [r.info.run_id for r in found] == [run.info.run_id], f"ray.submission_id tag is {tags['ray.submission_id']!r}"
