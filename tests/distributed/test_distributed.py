"""Distributed training on Ray Train: DDP keeps the ranks identical, a killed worker is survived, a stopped
run resumes.

Each test runs the real ``rjem train`` path (``run_training`` → ``TorchTrainer`` → ``train_loop_per_worker``)
with two gloo workers on smoke-sized settings: one run whose rank 1 is killed mid-way (the DDP and the
failure test both read it) and a stopped-then-resumed run through the CLI. To look inside the workers
without touching the package,
``train_driver.worker_entry`` (the function the trainer ships to every worker) is replaced by a wrapper
that calls the real ``train_loop_per_worker`` after swapping, inside that worker process only, two names
it looks up at call time: ``Learner`` (a subclass that can pause one rank before a chosen step, so the
test kills it from outside at a known point) and ``run_loop`` (which dumps each rank's parameters before
and after the real loop, plus a DDP-free control run). Nothing of the training itself is replaced.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from rjem_ray.distributed import train_driver
from rjem_ray.method.checkpoint import buffer_parts, load_state
from rjem_ray.cli import main as rjem_main
from rjem_ray.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "tune_configs" / "smoke.yaml"
BATCH = 16  # global batch: 8 per worker (strong scaling: these tests count optimiser steps one by one)
TWO_WORKERS = ["trainer.num_workers=2", "trainer.scaling=strong", f"train.batch_size={BATCH}", "train.log_every=2",
               "train.checkpoint_every=3"]


# ---------------------------------------------------------------------------------------------- helpers


def _hooked_entry(spy_dir: str, pause_rank: int | None = None, pause_before_step: int | None = None):
    """A ``train_loop_per_worker`` replacement that runs the real one with observation hooks.

    Every attempt writes ``pid-rank{r}-{pid}``; rank 0 of a restarted attempt copies the checkpoint Ray
    hands it to ``restored-{pid}/``. Rank ``pause_rank`` of the first attempt writes ``victim.pid`` and
    waits (to be SIGKILLed by the test) before optimiser step ``pause_before_step + 1``. After the real loop
    each rank saves its parameters at the loop's start and end, and the parameters of a control learner
    trained 2 steps from rank 0's initial weights *without* DDP.
    """

    def entry(config: dict) -> None:
        import shutil
        import time

        import ray.train
        import torch
        import torch.distributed as dist

        import rjem_ray.distributed.train_worker as tw

        spy = Path(spy_dir)
        rank = ray.train.get_context().get_world_rank()
        pid = os.getpid()
        (spy / f"pid-rank{rank}-{pid}").write_text(str(pid))
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None and rank == 0:
            with checkpoint.as_directory() as d:
                shutil.copytree(d, spy / f"restored-{pid}")

        real_learner, real_run_loop = tw.Learner, tw.run_loop
        built: dict = {}

        def dump(model, kind: str, step: int) -> None:
            params = {k: v.detach().cpu().clone() for k, v in model.named_parameters()}
            torch.save({"step": step, "params": params}, spy / f"{kind}-rank{rank}-{pid}.pt")

        class HookedLearner(real_learner):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                built["args"], built["kwargs"] = args, kwargs

            def step(self):
                victim = spy / "victim.pid"
                if rank == pause_rank and self.step_count == pause_before_step and not victim.exists():
                    tmp = spy / "victim.tmp"
                    tmp.write_text(str(pid))
                    os.replace(tmp, victim)
                    deadline = time.time() + 120
                    while time.time() < deadline:  # the test kills this process now
                        time.sleep(0.2)
                    raise RuntimeError("rank %d was paused for a SIGKILL that never came" % rank)
                return super().step()

        def hooked_run_loop(learner, report, **kwargs):
            dump(learner.model, "start", learner.step_count)
            real_run_loop(learner, report, **kwargs)
            dump(learner.model, "end", learner.step_count)
            # Control: same data shard, same start (rank 0's weights), no DDP wrapper.
            control = real_learner(*built["args"], **{**built["kwargs"], "wrap": None, "buffer": None})
            with torch.no_grad():
                for p in control.model.parameters():
                    dist.broadcast(p.data, src=0)
            control.step()
            control.step()
            dump(control.model, "control", control.step_count)

        tw.Learner, tw.run_loop = HookedLearner, hooked_run_loop
        tw.train_loop_per_worker(config)

    return entry


def _dumps(spy: Path, kind: str, rank: int) -> list[dict]:
    """``{"step", "params"}`` dumped at ``kind`` (start/end/control) by ``rank``, one per attempt, oldest first."""
    files = sorted(spy.glob(f"{kind}-rank{rank}-*.pt"), key=lambda p: p.stat().st_mtime)
    assert files, f"rank {rank} wrote no {kind} dump: {sorted(p.name for p in spy.iterdir())}"
    return [torch.load(f, weights_only=True) for f in files]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _buffer_parts(ckpt: Path) -> tuple[list[dict], bool]:
    """The workers' ``LocalReplayBuffer`` states in a checkpoint (``buffer-K.pt``) and whether they lived in
    shard actors (``buffer.shared: auto``: with more than one worker), whose counters include the prefetched
    lease of the next step."""
    parts = buffer_parts(ckpt)
    assert parts, f"{ckpt} holds no replay buffer"
    return parts, int(load_state(ckpt)["world_size"]) > 1


def _leased(parts: list[dict]) -> int:
    return sum(int(p["stats"]["leased"]) for p in parts)


def _contents(parts: list[dict]) -> torch.Tensor:
    return torch.cat([torch.as_tensor(p["buffer"]) for p in parts])


def _mlflow_runs(db: Path, experiment: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {db}"
    return sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)


def _metric_steps(db: Path, run_id: str, key: str = "train/loss") -> list[int]:
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _overrides(cache_dir: str, directory: Path) -> list[str]:
    return TWO_WORKERS + [
        f"cache_dir={cache_dir}",
        f"tracking.tracking_uri=sqlite:///{directory}/mlflow.db",
        f"tracking.artifact_location={directory}/mlartifacts",
        "tracking.experiment=dist",
    ]


KILLED_STEPS, KILL_BEFORE = 9, 7  # checkpoints at steps 3, 6, 9; rank 1 dies right before step 8


@pytest.fixture(scope="module")
def killed_run(ray_session, cache_dir, tmp_path_factory) -> SimpleNamespace:
    """A 2-worker run of 9 steps (``trainer.max_failures=1``) whose rank 1 is SIGKILLed before step 8.

    The kill comes from this process, by pid, while rank 1 waits at the kill point, so it lands at a
    known step whatever the machine's load. Shared by the DDP and the failure test: one run, two questions.
    """
    tmp = tmp_path_factory.mktemp("killed")
    spy = tmp / "spy"
    spy.mkdir()
    cfg = load_config(SMOKE, _overrides(cache_dir, tmp) + [f"train.steps={KILLED_STEPS}", "trainer.max_failures=1"])
    killed: dict = {}

    def kill_paused_worker():
        victim = spy / "victim.pid"
        deadline = time.time() + 240
        while not victim.exists() and time.time() < deadline:
            time.sleep(0.1)
        if not victim.exists():
            return
        pid = int(victim.read_text())
        killed["title"] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    killer = threading.Thread(target=kill_paused_worker, daemon=True)
    killer.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_driver, "worker_entry",
                   _hooked_entry(str(spy), pause_rank=1, pause_before_step=KILL_BEFORE))
        outcome = train_driver.run_training(cfg, tmp / "out", samples=False)
    killer.join(timeout=5)
    return SimpleNamespace(spy=spy, outcome=outcome, killed=killed, db=tmp / "mlflow.db")


# ---------------------------------------------------------------------------------------------- tests


def test_ddp_keeps_parameters_identical_across_ranks(killed_run):
    spy = killed_run.spy
    first_start = [_dumps(spy, "start", r)[0]["params"] for r in (0, 1)]
    end = [_dumps(spy, "end", r)[-1]["params"] for r in (0, 1)]
    control = [_dumps(spy, "control", r)[-1]["params"] for r in (0, 1)]
    # Each rank seeds its own initialisation (seed + 1000 rank): equal starts mean DDP broadcast rank 0's.
    assert _same(first_start[0], first_start[1])
    moved = [k for k in first_start[0] if not torch.equal(first_start[0][k], end[0][k])]
    assert len(moved) > len(first_start[0]) // 2, "training left most parameters unchanged"
    # After 9 steps on different data shards (and a restart) the ranks agree bit for bit: the gradients
    # were all-reduced at every step.
    assert _same(end[0], end[1]), [k for k in end[0] if not torch.equal(end[0][k], end[1][k])][:5]
    # The control trains 2 steps from one common start on the same shards without DDP and drifts apart,
    # so the equality above is DDP's doing, not an artefact of identical data or seeds.
    assert not _same(control[0], control[1])
    # The run's final checkpoint holds exactly what the ranks trained.
    saved = load_state(killed_run.outcome.checkpoint)
    assert saved["step"] == KILLED_STEPS
    assert all(torch.equal(saved["model"][k], v) for k, v in end[0].items())


def test_killed_worker_restarts_from_last_checkpoint_with_buffer_restored(killed_run):
    spy, outcome, killed, steps = killed_run.spy, killed_run.outcome, killed_run.killed, KILLED_STEPS
    # The victim was a Ray Train worker process, and a new worker group replaced it.
    assert killed.get("pid"), "rank 1 never paused: the run did not reach the kill point"
    assert "RayTrainWorker" in killed["title"], killed["title"]
    rank1_pids = {int(p.name.rsplit("-", 1)[1]) for p in spy.glob("pid-rank1-*")}
    assert killed["pid"] in rank1_pids and len(rank1_pids) == 2

    # The restarted attempt was handed a checkpoint from before the failure, not a fresh start.
    restored_dirs = list(spy.glob("restored-*"))
    assert len(restored_dirs) == 1, "the restarted workers got no checkpoint from Ray"
    pre = restored_dirs[0]
    resumed_at = int(load_state(pre)["step"])
    assert resumed_at in (3, 6)  # the last checkpoint registered when rank 1 died (6 only if Ray had it)
    # Both restarted ranks began their loop at that step with that checkpoint's weights.
    for rank in (0, 1):
        start = _dumps(spy, "start", rank)[-1]
        assert start["step"] == resumed_at
        assert all(torch.equal(load_state(pre)["model"][k], v) for k, v in start["params"].items())

    # The run ends at the configured step count.
    final = load_state(outcome.checkpoint)
    assert final["step"] == steps
    assert outcome.metrics["train"]["steps"] == steps

    # Replay buffer restored, not re-initialised: its lease counters continue from the pre-failure
    # checkpoint (a fresh buffer restarts them at 0, i.e. resumed_at * BATCH too low) ...
    before, shared = _buffer_parts(pre)
    after, shared_after = _buffer_parts(outcome.checkpoint)
    assert shared == shared_after
    # (A shared buffer's counters also include the next step's lease, prefetched before the snapshot.)
    slack = BATCH if shared else 0
    assert resumed_at * BATCH <= _leased(before) <= resumed_at * BATCH + slack
    assert 0 <= _leased(after) - (_leased(before) + (steps - resumed_at) * BATCH) <= slack
    # ... and the steps after the restart rewrote at most a batch of chains each: every other slot still
    # holds exactly what it held in the pre-failure checkpoint.
    x_before, x_after = _contents(before), _contents(after)
    assert x_before.shape == x_after.shape
    unchanged = (x_before == x_after).flatten(1).all(1).sum().item()
    assert unchanged >= len(x_before) - (steps - resumed_at) * BATCH - slack

    # The MLflow run records the restart point.
    [run] = _mlflow_runs(killed_run.db, "dist")
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_at_step"] == str(resumed_at)
    assert max(_metric_steps(killed_run.db, run.info.run_id)) == steps


def test_cli_resume_continues_a_stopped_run_from_its_step(ray_session, cache_dir, tmp_path):
    out = tmp_path / "run"
    db = tmp_path / "mlflow.db"
    args = ["train", str(SMOKE), "--out", str(out)]
    sets = [x for o in _overrides(cache_dir, tmp_path) for x in ("--set", o)]

    assert rjem_main(args + sets + ["--set", "train.steps=4"]) == 0
    assert load_state(out / "checkpoint")["step"] == 4
    first_leased = _leased(_buffer_parts(out / "checkpoint")[0])

    assert rjem_main(args + sets + ["--set", "train.steps=6", "--resume", str(out)]) == 0

    state = load_state(out / "checkpoint")
    assert state["step"] == 6
    assert load_config(out / "config.yaml").train.steps == 6
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 6
    # The buffer came along: its counters went on from the stopped run's, two more steps of leases.
    parts, shared = _buffer_parts(out / "checkpoint")
    assert 0 <= _leased(parts) - (first_leased + 2 * BATCH) <= (BATCH if shared else 0)

    first, second = _mlflow_runs(db, "dist")
    assert first.info.status == second.info.status == "FINISHED"
    assert second.data.tags["resumed_at_step"] == "4"
    assert "resumed_at_step" not in first.data.tags
    # The resumed run logged only the steps after 4: it did not start over from step 0.
    assert _metric_steps(db, first.info.run_id) == [2, 3, 4]
    assert _metric_steps(db, second.info.run_id) == [6]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert "checkpoint/state.pt" in {a.path for a in client.list_artifacts(second.info.run_id, "checkpoint")}
    assert {p.name for p in (out / "samples").iterdir()} >= {"energy.png", "pgd.png", "combined.png"}


def test_a_run_resized_between_1_and_2_workers_continues_from_its_images_with_its_buffer(ray_session, cache_dir,
                                                                                       tmp_path):
    """Weak scaling, one OUT: 1 worker to step 4, 2 workers to step 8, 1 worker to step 10. Each continuation
    starts at the images the previous one saw, and every saved chain is still in the buffer afterwards except
    those the new steps leased and rewrote."""
    out = tmp_path / "run"
    base = ["train", str(SMOKE), "--out", str(out)]
    sets = ["train.log_every=2", "train.checkpoint_every=2", "tracking.enabled=false", f"cache_dir={cache_dir}"]

    def run(workers: int, steps: int) -> tuple[dict, torch.Tensor]:
        args = base + [x for o in sets + [f"trainer.num_workers={workers}", f"train.steps={steps}"] for x in ("--set", o)]
        assert rjem_main(args) == 0
        state = load_state(out / "checkpoint")
        return state, _contents(buffer_parts(out / "checkpoint"))

    one, x1 = run(1, 4)
    assert (one["step"], one["images_seen"], one["world_size"]) == (4, 64, 1) and len(x1) == 128
    two, x2 = run(2, 8)  # 2 optimiser steps of 2 x 16 images
    assert (two["step"], two["images_seen"], two["world_size"], two["global_batch"]) == (8, 128, 2, 32)
    assert len(x2) == 256  # weak scaling: 128 slots per worker; the first worker kept the saved 128
    rewritten = 2 * 16 + 16  # rank 0 leased 16 a step (+ its prefetched lease)
    kept = (x2[:128] == x1).flatten(1).all(1).sum().item()
    assert kept >= 128 - rewritten
    back, x3 = run(1, 10)  # two optimiser steps of 16 (one reference step each on one worker)
    assert (back["step"], back["images_seen"], back["world_size"]) == (10, 160, 1)
    assert len(x3) == 256  # fewer workers drop no chain
    assert (x3 == x2).flatten(1).all(1).sum().item() >= 256 - 2 * 16
