"""Resubmission resumes: `rjem train` keeps one Ray Train run per output directory, so the same command run
again after its driver was SIGKILLed continues from the latest checkpoint through Ray's own restoration.

The driver runs as a real `rjem train` process with its own local Ray (under a private ``RAY_TMPDIR``).
After the SIGKILL the test stops what is left of that Ray instance (the driver's process group), as a
cluster does with the processes of a job whose driver died (``ray job stop``, a lost head), then runs the
same command again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rjem_ray.method.checkpoint import buffer_parts, load_state

from helpers_ray import stop_instance

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RJEM = str(Path(sys.executable).with_name("rjem"))
STEPS, EVERY, BATCH = 12, 3, 16


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of group ``pgid``, one by one (``killpg`` on a group whose leader is gone did
    not reach them on this machine), until none is left."""
    while True:
        members = []
        for d in Path("/proc").iterdir():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if d.name.isdigit() and fields[3] == str(pgid) and fields[0] != "Z":
                members.append(int(d.name))
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _leased(ckpt: Path) -> int:
    return sum(int(part["stats"]["leased"]) for part in buffer_parts(ckpt))


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


@pytest.fixture
def rjem_train(tmp_path, cache_dir):
    """``start(*extra)``: a `rjem train` process on the smoke config with its own Ray temp dir."""
    db = tmp_path / "mlflow.db"
    sets = [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.log_every=1", f"cache_dir={cache_dir}",
            f"tracking.tracking_uri=sqlite:///{db}", f"tracking.artifact_location={tmp_path}/mlartifacts",
            "tracking.experiment=resubmit"]
    temps: list[str] = []

    def start(*extra: str) -> tuple[subprocess.Popen, str]:
        temp = tempfile.mkdtemp(prefix="rjrs", dir="/tmp")  # short: Ray's socket paths have a length limit
        temps.append(temp)
        env = {**os.environ, "RAY_TMPDIR": temp, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("RAY_ADDRESS", None)
        argv = [RJEM, "train", "tune_configs/smoke.yaml", "--out", str(tmp_path / "run")]
        argv += [x for s in sets for x in ("--set", s)] + list(extra)
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        return proc, temp

    yield start, tmp_path / "run", f"sqlite:///{db}"
    for temp in temps:
        stop_instance(temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_rerun_after_a_killed_driver_continues_from_the_latest_checkpoint(rjem_train, tmp_path):
    start, out, uri = rjem_train
    run_dir = out / "ray" / "train"

    first, temp = start()
    mid = run_dir / f"checkpoint-{2 * EVERY:08d}" / "state.pt"
    deadline = time.time() + 600
    while not mid.is_file():  # a condition to wait for, not a timing assertion
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "the first run never reached its second checkpoint"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    # The job's processes go with its driver, as on a cluster. Locally they would linger a while (the
    # workers keep training until they notice the dead GCS), so end them: they are this driver's group.
    _kill_group(first.pid)
    stop_instance(temp)
    saved = tmp_path / "at-kill"
    shutil.copytree(run_dir, saved)  # what the killed run left, before the rerun replaces old checkpoints
    on_disk = sorted(int(p.name.split("-")[1]) for p in saved.glob("checkpoint-*") if (p / "state.pt").is_file())
    assert on_disk and on_disk[-1] < STEPS, on_disk

    second, _ = start()
    text, _ = second.communicate(timeout=900)
    assert second.returncode == 0, text[-5000:]
    assert "continuing the run in" in text
    resumed = [ln for ln in text.splitlines() if "resumed from ray-checkpoint at step" in ln]
    assert len(resumed) == 1, text[-5000:]
    at = int(resumed[0].split("at step ")[1].split()[0])
    assert at in on_disk and at >= EVERY, (at, on_disk)  # Ray's latest registered checkpoint
    assert "with its replay buffer" in resumed[0]

    # Ends at the step count, and the replay buffer went on from the checkpoint's: its lease counter grew by
    # exactly the steps after it (a fresh buffer would count only those).
    final = out / "checkpoint"
    assert load_state(final)["step"] == STEPS
    assert _leased(final) == _leased(saved / f"checkpoint-{at:08d}") + (STEPS - at) * BATCH
    assert _leased(saved / f"checkpoint-{at:08d}") == at * BATCH

    # MLflow: the killed run closed as KILLED by the rerun; the rerun logged only steps after the checkpoint.
    client = MlflowClient(tracking_uri=uri)
    runs = sorted(client.search_runs([client.get_experiment_by_name("resubmit").experiment_id]),
                  key=lambda r: r.info.start_time)
    assert len(runs) == 2
    killed, rerun = runs
    assert killed.info.status == "KILLED" and rerun.info.status == "FINISHED"
    assert rerun.data.tags["resumed_at_step"] == str(at) and rerun.data.tags["rjem.continues_run"] == killed.info.run_id
    assert _steps(client, rerun.info.run_id) == list(range(at + 1, STEPS + 1))
    assert set(range(1, at + 1)) <= set(_steps(client, killed.info.run_id))

    # A config that cannot continue the run is refused in one line, before any work ...
    refused, _ = start("--set", "model.widen=2")
    text, _ = refused.communicate(timeout=300)
    assert refused.returncode == 2, text[-3000:]
    err = [ln for ln in text.strip().splitlines() if ln.startswith("rjem train")]
    assert err and err[-1].startswith("rjem train: error: model: ") and "--fresh" in err[-1], text[-3000:]
    # ... and --fresh starts over from step 0, keeping the earlier run aside.
    fresh, _ = start("--fresh", "--set", f"train.steps={EVERY}")
    text, _ = fresh.communicate(timeout=900)
    assert fresh.returncode == 0, text[-5000:]
    assert "resumed from" not in text
    assert load_state(out / "checkpoint")["step"] == EVERY
    assert len(list((out / "ray").glob("train-replaced-*"))) == 1
