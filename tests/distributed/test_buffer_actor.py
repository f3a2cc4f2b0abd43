"""The replay buffer's shard actors (rjem_ray/distributed/buffer_actor.py): one per worker, created by the worker on its own
node; prefetched leases; the kept snapshot written by the shard; a killed shard back with its snapshot; a real
two-worker ``run_training`` whose checkpoint holds each worker's part."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rjem_ray.distributed.buffer_actor import (
    SHARED_KIND,
    DrawReserve,
    SharedReplayBuffer,
    create_worker_shard,
    is_shared_state,
)
from rjem_ray.config import ConfigError, load_config
from rjem_ray.method.gmm import as_init_fn, fit_class_gmm
from rjem_ray.method.replay_buffer import LocalReplayBuffer

SHAPE = (3, 4, 4)
REPO = Path(__file__).resolve().parents[2]


def _gmm():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, *SHAPE, generator=g) * 2 - 1  # GMM draws are clamped to [-1, 1]
    return fit_class_gmm(x, torch.arange(60) % 3, 3)


# ---------------------------------------------------------------------------------------------- pure helpers


def test_the_draw_reserve_serves_stored_draws_first_and_draws_a_shortfall_on_the_spot():
    calls = []

    def init_fn(n, rng):
        calls.append(n)
        return np.full((n, 1), float(len(calls)), np.float32)

    r = DrawReserve(init_fn, target=5, seed=0)
    r.refill()
    assert len(r) == 5 and calls == [5]
    got = r.take(3)
    assert got.flatten().tolist() == [1, 1, 1] and len(r) == 2 and calls == [5]  # no draw on the hot path
    got = r.take(4)  # 2 stored + 2 drawn now
    assert got.flatten().tolist() == [1, 1, 2, 2] and len(r) == 0
    r.refill()
    assert calls == [5, 2, 5] and len(r) == 5


def test_config_buffer_shared_key():
    cfg = load_config(None, [])
    assert cfg.buffer.shared == "auto" and not cfg.buffer.is_shared(1) and cfg.buffer.is_shared(2)
    assert load_config(None, ["buffer.shared=true"]).buffer.is_shared(1)
    off = load_config(None, ["buffer.shared=false"]).buffer
    assert off.shared == "false" and not off.is_shared(8)
    assert load_config(None, ["buffer.shared=yes"]).buffer.shared == "true"
    with pytest.raises(ConfigError, match=r"buffer.shared: 'sometimes' is not allowed; choose one of auto, true, false"):
        load_config(None, ["buffer.shared=sometimes"])
    assert is_shared_state({"kind": SHARED_KIND}) and not is_shared_state({"buffer": 1}) and not is_shared_state(None)


# ---------------------------------------------------------------------------------------------- on Ray
# One local Ray on 127.0.0.1 (conftest's ray_session): ray.cluster_utils.Cluster addresses the machine's own
# network interface, which nothing here may use, so the node-placement checks run on one node.


@pytest.fixture
def cluster(ray_session):
    return ray_session


def _node_ids() -> list[str]:
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])


def _node_ids() -> list[str]:
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])


def _worker_class():
    """A simulated training worker: an actor that creates its shard and holds the client (defined here so
    Ray ships it by value: the tests directory is not importable in Ray's processes)."""
    import ray

    @ray.remote(num_cpus=0)
    class Worker:
        def __init__(self, gmm, size, rank, initial_state=None):
            self.shard = create_worker_shard(gmm, size, rank=rank, reinit_freq=0.0, batch=4,
                                             initial_state=initial_state)
            self.buffer = SharedReplayBuffer(self.shard, rank=rank)

        def where(self):
            return ray.get_runtime_context().get_node_id(), ray.get(self.shard.info.remote())["node_id"]

        def step(self, batch, value):
            lease = self.buffer.lease(batch)
            self.buffer.write_back(lease.slots, np.full_like(lease.x, value))
            return lease.slots

        def save(self, path):
            marker = self.buffer.state_dict()
            self.buffer.save(path)
            return marker

    return Worker


@pytest.mark.slow
def test_each_worker_creates_its_shard_on_its_own_node_and_the_shard_writes_the_checkpoint_part(cluster, tmp_path):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _node_ids() * 2  # two workers on the one node
    gmm = _gmm()
    Worker = _worker_class()
    workers = [Worker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(gmm, 12, r)
               for r, n in enumerate(nodes)]
    where = ray.get([w.where.remote() for w in workers])
    assert [s for _, s in where] == [w for w, _ in where] == nodes, where  # each shard on its worker's node
    for w, value in zip(workers, (1.0, 2.0)):
        for _ in range(3):
            ray.get(w.step.remote(12, value))  # each lease takes every slot: all rewritten with `value`
    markers = ray.get([w.save.remote(str(tmp_path / f"buffer-{r}.pt")) for r, w in enumerate(workers)])
    assert all(is_shared_state(m) and set(m) == {"kind", "snapshot_id"} for m in markers)  # no contents
    for r, value in enumerate((1.0, 2.0)):
        part = torch.load(tmp_path / f"buffer-{r}.pt", weights_only=True)
        assert part["buffer"].shape == (12, *SHAPE) and torch.all(part["buffer"] == value)
        assert part["stats"]["leased"] == 4 * 12  # three leases + the prefetched fourth
    for w in workers:
        ray.kill(w)


@pytest.mark.slow
def test_a_marker_rolls_back_to_the_kept_snapshot_and_a_state_of_another_size_is_adopted(cluster):
    gmm = _gmm()
    shard = create_worker_shard(gmm, 10, rank=0, reinit_freq=0.0, batch=5)
    buf = SharedReplayBuffer(shard)
    try:
        lease = buf.lease(10)
        buf.write_back(lease.slots, np.broadcast_to(lease.slots[:, None, None, None] + 0.5, lease.x.shape))
        marker = buf.state_dict()
        lease = buf.lease(10)  # the prefetched lease
        buf.write_back(lease.slots, np.full_like(lease.x, 9.0))
        buf.load_state_dict(marker)  # rollback: the kept snapshot, inside the actor
        lease = buf.lease(10)
        np.testing.assert_array_equal(lease.x.reshape(10, -1)[:, 0], lease.slots + 0.5)
        buf.write_back(lease.slots, lease.x)
        bigger = LocalReplayBuffer(16, as_init_fn(gmm), 0.0).state_dict()  # e.g. a regrouped checkpoint part
        buf.load_state_dict(bigger)
        assert len(buf) == 16 and buf.lease(16).x.shape == (16, *SHAPE)
    finally:
        buf.close()


def _pid_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_shard_comes_back_with_its_kept_snapshot(cluster, tmp_path):
    import ray

    gmm = _gmm()
    shard = create_worker_shard(gmm, 12, rank=0, reinit_freq=0.5, seed=3, batch=12, snapshot_dir=tmp_path / "s")
    client = SharedReplayBuffer(shard, prefetch=False)
    try:
        lease = client.lease(12)
        client.write_back(lease.slots, np.broadcast_to(lease.slots[:, None, None, None] + 0.5, lease.x.shape))
        client.state_dict()  # kept: contents slot + 0.5, also in the restart file
        lease = client.lease(12)
        client.write_back(lease.slots, np.full_like(lease.x, 100.0))
        held = client.lease(8)  # still held when the shard dies

        before = ray.get(shard.info.remote())
        os.kill(before["pid"], signal.SIGKILL)
        _pid_gone(before["pid"])
        after = ray.get(shard.info.remote())  # waits for Ray to recreate it
        assert after["reconstructed"] and after["pid"] != before["pid"] and after["epoch"] != before["epoch"]
        assert after["outstanding"] == 0 and after["snapshot_id"] == before["snapshot_id"]
        # the lease of the dead incarnation is revoked: its write-back is dropped, not applied, not an error
        client.write_back(held.slots, np.full_like(held.x, -5.0))
        client.flush()
        assert client.dropped == 8
        epoch, slots, x, reinit = ray.get(shard.lease.remote(12))
        assert 0 < reinit.sum() < 12
        kept = x[~reinit].reshape(int((~reinit).sum()), -1)[:, 0]
        np.testing.assert_array_equal(kept, slots[~reinit] + 0.5)  # the snapshot's values, not the +100 ones

        # a shard whose snapshot file is gone refuses to come back rather than refill from the mixture
        Path(after["snapshot_file"]).unlink()
        os.kill(after["pid"], signal.SIGKILL)
        _pid_gone(after["pid"])
        with pytest.raises(ray.exceptions.RayActorError, match="snapshot .* is missing"):
            ray.get(shard.info.remote(), timeout=60)
    finally:
        ray.kill(shard, no_restart=True)


@pytest.mark.slow
def test_run_training_keeps_each_workers_buffer_part_in_its_own_file(cluster, cache_dir, tmp_path):
    from rjem_ray.distributed import train_driver
    from rjem_ray.method.checkpoint import load_state

    cfg = load_config(REPO / "tune_configs" / "smoke.yaml", [
        "trainer.num_workers=2", "train.steps=4", "train.log_every=2", "train.checkpoint_every=4",
        "train.max_rollbacks=0", "tracking.enabled=false", f"cache_dir={cache_dir}",
    ])
    outcome = train_driver.run_training(cfg, tmp_path / "out", samples=False)
    state = load_state(outcome.checkpoint)
    # weak scaling: 2 workers of 16 images, so each optimiser step is 2 reference steps of 16 images
    assert state["step"] == 4 and state["images_seen"] == 64 and state["world_size"] == 2
    assert "buffer" not in state  # rank 0 carries no buffer
    assert set(torch.load(outcome.checkpoint / "rank-1.pt", weights_only=True)) == {"rng"}
    for r in (0, 1):
        part = torch.load(outcome.checkpoint / f"buffer-{r}.pt", weights_only=True)
        assert part["buffer"].shape[0] == 128  # buffer.size per worker
        assert 2 * 16 <= part["stats"]["leased"] <= 3 * 16  # 2 steps of 16 (+ the prefetched lease)
        assert torch.isfinite(part["buffer"]).all() and part["buffer"].abs().max() <= 1
