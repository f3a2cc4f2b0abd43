"""Shared replay buffer on Ray actors: layout arithmetic, config keys, and on a simulated 2-node cluster
(``ray.cluster_utils.Cluster``) lease exclusivity across workers on different nodes, snapshot/restore,
a killed shard coming back with its snapshot, and a real ``run_training`` with the shared buffer.

The cluster tests share one module-scoped cluster. It lives in its own ``RAY_TMPDIR``, so the address
file it writes cannot capture another process's ``ray.init()``; a Ray the session had already started
(``conftest.ray_session``) is shut down for this module and started again afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rjem_ray.buffer_actor import (
    SHARED_KIND,
    SharedReplayBuffer,
    check_capacity,
    create_buffer_shards,
    is_shared_state,
    reshard,
    shard_sizes,
    split_batch,
)
from rjem_ray.config import ConfigError, load_config
from rjem_ray.gmm import fit_class_gmm
from rjem_ray.replay_buffer import LocalReplayBuffer

SHAPE = (3, 4, 4)
REPO = Path(__file__).resolve().parents[1]


def _gmm():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, *SHAPE, generator=g) * 2 - 1  # GMM draws are clamped to [-1, 1]
    return fit_class_gmm(x, torch.arange(60) % 3, 3)


def _shard_state(values: np.ndarray, seed: int = 0) -> dict:
    return {
        "buffer": torch.from_numpy(values.astype(np.float32)),
        "rng": np.random.default_rng(seed).bit_generator.state,
        "reinit_freq": 0.0,
        "stats": {"leased": 7, "reinit": 1},
    }


def _snapshot(parts: list[np.ndarray]) -> dict:
    return {"kind": SHARED_KIND, "snapshot_id": "abc", "sizes": [len(p) for p in parts],
            "shards": [_shard_state(p, j) for j, p in enumerate(parts)]}


# ---------------------------------------------------------------------------------------------- pure helpers


def test_shard_sizes_cover_the_buffer_evenly():
    for total, k in [(10000, 8), (10, 3), (7, 7), (64, 1)]:
        sizes = shard_sizes(total, k)
        assert sum(sizes) == total and len(sizes) == k and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="cannot split 3 slots into 4 shards"):
        shard_sizes(3, 4)


def test_split_batch_is_proportional_and_each_count_is_floor_or_floor_plus_one():
    sizes = [4, 3, 3]
    for batch in range(1, 11):
        deficit = None
        for rank in range(3):
            counts, deficit = split_batch(batch, sizes, deficit, rank=rank)
            assert counts.sum() == batch and counts.dtype == np.int64
            exact = batch * np.array(sizes) / 10
            assert np.all(counts >= np.floor(exact)) and np.all(counts <= np.floor(exact) + 1)
            assert abs(deficit.sum()) < 1e-9


@pytest.mark.parametrize("sizes,batch", [([5, 3, 2], 4), ([3334, 3333, 3333], 64), ([7, 1, 1, 1], 3), ([5, 5, 5, 5], 3),
                                         ([2, 9, 4], 7)])
def test_leases_spread_to_equal_per_slot_rates_with_uneven_shard_sizes(sizes, batch):
    """Over many requests every slot is leased at the same rate B / N, whatever the shard sizes."""
    total, deficit = np.zeros(len(sizes)), None
    calls = 600
    for _ in range(calls):
        counts, deficit = split_batch(batch, sizes, deficit, rank=1)
        total += counts
    # each shard's count stays within a constant of its exact share: rates per slot agree to 1 / calls
    np.testing.assert_array_less(np.abs(total - calls * batch * np.array(sizes) / sum(sizes)), len(sizes))
    assert np.abs(deficit).max() < len(sizes)


def test_split_batch_ties_start_at_the_workers_rank():
    """Equal shards, one slot per lease: worker r's first slot comes from shard r, so workers spread."""
    firsts = [int(np.argmax(split_batch(1, [5, 5, 5, 5], None, rank=r)[0])) for r in range(4)]
    assert firsts == [0, 1, 2, 3]


def test_check_capacity_rejects_layouts_workers_could_exhaust():
    check_capacity([32, 32], batch_per_worker=32, num_workers=2)  # 2 × 16 per shard: exactly full
    with pytest.raises(ValueError, match="buffer shard 0 holds 32 slots but 3 workers"):
        check_capacity([32, 32], batch_per_worker=32, num_workers=3)
    with pytest.raises(ValueError, match="raise buffer.size or lower buffer.shards"):
        check_capacity([2, 2, 2], batch_per_worker=4, num_workers=2)  # 4/3 per shard rounds up to 2


def test_reshard_keeps_every_slot_at_its_global_id():
    a, b = np.arange(6 * 48).reshape(6, *SHAPE), -np.arange(4 * 48).reshape(4, *SHAPE)
    snap = _snapshot([a, b])
    assert reshard(snap, [6, 4]) == snap["shards"]  # same layout: states (RNG, counters) unchanged
    parts = reshard(snap, [4, 3, 3], seed=1)
    joined = torch.cat([p["buffer"] for p in parts]).numpy()
    np.testing.assert_array_equal(joined, np.concatenate([a, b]).astype(np.float32))
    for p in parts:  # each new part is a loadable LocalReplayBuffer state
        LocalReplayBuffer(1, lambda n, rng: np.zeros((n, *SHAPE), np.float32)).load_state_dict(p)
    with pytest.raises(ValueError, match="holds 10 slots, the shards 11"):
        reshard(snap, [6, 5])
    with pytest.raises(ValueError, match="not a shared replay-buffer snapshot"):
        reshard({"buffer": torch.zeros(2, *SHAPE)}, [2])
    assert is_shared_state(snap) and not is_shared_state({"buffer": 1}) and not is_shared_state(None)


def test_config_buffer_shared_and_shards_keys():
    cfg = load_config(None, [])
    assert cfg.buffer.shared == "auto" and cfg.buffer.shards == 0
    assert not cfg.buffer.is_shared(1) and cfg.buffer.is_shared(2)
    assert load_config(None, ["buffer.shared=true"]).buffer.is_shared(1)
    off = load_config(None, ["buffer.shared=false"]).buffer
    assert off.shared == "false" and not off.is_shared(8)
    # YAML reads an unquoted true/yes as a boolean: normalised, not rejected.
    assert load_config(None, ["buffer.shared=yes"]).buffer.shared == "true"
    allowed = r"buffer.shared: 'sometimes' is not allowed; choose one of auto, true, false"
    with pytest.raises(ConfigError, match=allowed):
        load_config(None, ["buffer.shared=sometimes"])
    with pytest.raises(ConfigError, match=r"buffer.shards: -1 is out of range; it must be >= 0"):
        load_config(None, ["buffer.shards=-1"])
    with pytest.raises(ConfigError, match=r"buffer.shards: 65 is out of range; it must be at most buffer.size \(64\)"):
        load_config(None, ["buffer.size=64", "train.batch_size=64", "buffer.shards=65"])


# ---------------------------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two simulated nodes of 1 CPU each (so two 1-CPU trainer workers must land on different nodes)."""
    import ray
    from ray.cluster_utils import Cluster

    restart_session = ray.is_initialized()
    if restart_session:
        ray.shutdown()
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    ray_tmpdir = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rjb-", dir="/tmp")  # short: socket paths
    node = dict(num_cpus=1, object_store_memory=128 * 2**20)
    c = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    try:
        c.add_node(**node)
        ray.init(address=c.address, log_to_driver=False)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
        if restart_session:  # as conftest.ray_session started it
            ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False,
                     _node_ip_address="127.0.0.1", _temp_dir=str(tmp_path_factory.mktemp("ray", numbered=True)))


@pytest.fixture(scope="module")
def gmm():
    return _gmm()


def _node_ids() -> list[str]:
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])


def _worker_class():
    """A simulated training worker: an actor holding a ``SharedReplayBuffer`` (defined here so Ray ships
    it by value: the tests directory is not importable in Ray's processes)."""
    import ray

    @ray.remote(num_cpus=0)
    class Worker:
        def __init__(self, handles, rank):
            self.buffer = SharedReplayBuffer(handles, rank=rank)

        def node_id(self):
            return ray.get_runtime_context().get_node_id()

        def lease(self, batch):
            self.lease_ = self.buffer.lease(batch)
            return self.lease_.slots, self.lease_.x

        def write_back(self, value):
            self.buffer.write_back(self.lease_.slots, np.full_like(self.lease_.x, value))

        def dropped(self):
            self.buffer.flush()
            return self.buffer.dropped

    return Worker


@pytest.mark.slow
def test_two_workers_on_two_nodes_lease_unique_slots(cluster, gmm, tmp_path):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _node_ids()
    assert len(nodes) == 2
    shards = create_buffer_shards(gmm, 40, tmp_path / "buf", reinit_freq=0.0, batch_per_worker=10, num_workers=2)
    try:
        # Default layout: one shard per node, each on its node, contiguous global ids.
        infos = shards.info()
        assert sorted(i["node_id"] for i in infos) == nodes
        assert [(i["offset"], i["size"]) for i in infos] == [(0, 20), (20, 20)]
        Worker = _worker_class()
        workers = [
            Worker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(shards.handles, r)
            for r, n in enumerate(nodes)
        ]
        assert ray.get([w.node_id.remote() for w in workers]) == nodes  # one worker per node

        last_written: dict[int, float] = {}
        checked = 0
        for step in range(6):
            # Both workers hold their leases at the same time (nothing is written back until both have one).
            leases = ray.get([w.lease.remote(10) for w in workers])
            slots = np.concatenate([s for s, _ in leases])
            assert slots.size == 20 and np.unique(slots).size == 20, f"step {step}: a slot leased twice"
            for s, _ in leases:  # B/K from each shard: 5 from [0, 20), 5 from [20, 40)
                assert (s < 20).sum() == 5 and (s >= 20).sum() == 5
            for s, x in leases:  # a slot holds what was last written to its global id
                for slot, xi in zip(s.tolist(), x):
                    if slot in last_written:
                        assert np.all(xi == last_written[slot]), (step, slot)
                        checked += 1
            values = [10.0 + 2 * step + r for r in range(2)]
            ray.get([w.write_back.remote(v) for w, v in zip(workers, values)])
            for (s, _), v in zip(leases, values):
                last_written.update(dict.fromkeys(s.tolist(), v))
        # Many slots came back (about 80 expected); no write-back was lost or dropped.
        assert checked >= 40
        assert ray.get([w.dropped.remote() for w in workers]) == [0, 0]
        stats = sum(i["leased"] for i in shards.info())
        assert 6 * 20 <= stats <= 7 * 20  # + each worker's prefetched next lease
        for w in workers:
            ray.kill(w)
    finally:
        shards.shutdown()
    assert not list((tmp_path / "buf").glob("shard-*.pt"))  # snapshot files removed with the shards


def _pid_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_shard_comes_back_with_its_snapshot_contents(cluster, gmm, tmp_path):
    import ray

    shards = create_buffer_shards(gmm, 24, tmp_path / "buf", reinit_freq=0.5, seed=3)
    try:
        owner = SharedReplayBuffer(shards.handles, owner=True, prefetch=False)
        lease = owner.lease(24)
        owner.write_back(lease.slots, np.broadcast_to(lease.slots[:, None, None, None] + 0.5, lease.x.shape))
        snap = owner.state_dict()
        assert snap["kind"] == SHARED_KIND and len(snap["shards"]) == 2
        saved = [s["buffer"].flatten(1)[:, 0].numpy() for s in snap["shards"]]
        np.testing.assert_array_equal(np.concatenate(saved), np.arange(24) + 0.5)
        # After the snapshot: new contents everywhere, and a lease still held when the shard dies.
        lease = owner.lease(24)
        owner.write_back(lease.slots, np.broadcast_to(lease.slots[:, None, None, None] + 100.0, lease.x.shape))
        held = owner.lease(8)

        victim, other = shards.handles
        before = ray.get(victim.info.remote())
        os.kill(before["pid"], signal.SIGKILL)
        _pid_gone(before["pid"])
        after = ray.get(victim.info.remote())  # waits for Ray to recreate it
        assert after["reconstructed"] and after["pid"] != before["pid"]
        assert after["snapshot_id"] == snap["snapshot_id"] and after["epoch"] != before["epoch"]
        assert after["outstanding"] == 0 and after["leased"] == snap["shards"][0]["stats"]["leased"]

        # The lease from the dead incarnation is revoked: its write-back to shard 0 is dropped, not an error.
        owner.write_back(held.slots, np.full_like(held.x, -5.0))
        owner.flush()
        assert owner.dropped == int((held.slots < 12).sum())

        # Contents *and* RNG are the snapshot's: the restarted shard leases exactly what a LocalReplayBuffer
        # loaded from the snapshot leases (same slots, same reinit coin flips, same fresh GMM draws).
        from rjem_ray.gmm import as_init_fn

        local = LocalReplayBuffer(1, as_init_fn(gmm))
        local.load_state_dict(snap["shards"][0])
        epoch, slots, x, reinit = ray.get(victim.lease.remote(12))
        expect = local.lease(12)
        np.testing.assert_array_equal(slots, expect.slots)  # shard 0 starts at global id 0
        np.testing.assert_array_equal(reinit, expect.reinit)
        np.testing.assert_array_equal(x, expect.x)
        assert 0 < reinit.sum() < 12
        kept = x[~reinit].reshape(int((~reinit).sum()), -1)
        np.testing.assert_array_equal(kept[:, 0], slots[~reinit] + 0.5)  # snapshot values, not the +100 ones
        # The shard that did not die kept its live contents (the post-snapshot writes).
        _, slots1, x1, reinit1 = ray.get(other.lease.remote(12))
        live = x1[~reinit1].reshape(int((~reinit1).sum()), -1)[:, 0]
        assert np.all((live == slots1[~reinit1] + 100.0) | (live == -5.0))

        # A shard whose snapshot file is gone refuses to come back rather than refill from the mixture.
        Path(after["snapshot_file"]).unlink()
        os.kill(after["pid"], signal.SIGKILL)
        _pid_gone(after["pid"])
        with pytest.raises(ray.exceptions.RayActorError, match="snapshot .* is missing"):
            ray.get(victim.info.remote(), timeout=60)
    finally:
        shards.shutdown()


@pytest.mark.slow
def test_snapshot_restore_revokes_prefetched_leases_and_reshards(cluster, gmm, tmp_path):
    # Created from a snapshot of three shards (a cluster of another shape): every global id keeps its value.
    ids = np.arange(20, dtype=np.float32)[:, None, None, None] + np.zeros((1, *SHAPE), np.float32)
    three = _snapshot([ids[:7], ids[7:14], ids[14:]])
    shards = create_buffer_shards(gmm, 999, tmp_path / "a", reinit_freq=0.0, initial_state=three)
    try:
        assert shards.sizes == [10, 10]  # the snapshot's size wins over the requested one
        owner = SharedReplayBuffer(shards.handles, rank=0, owner=True)
        other = SharedReplayBuffer(shards.handles, rank=1)
        lease = owner.lease(20)
        np.testing.assert_array_equal(lease.x.reshape(20, -1)[:, 0], lease.slots)
        owner.write_back(lease.slots, lease.x)

        for client, value in ((owner, 1.0), (other, 2.0)):
            lease = client.lease(6)
            client.write_back(lease.slots, np.full_like(lease.x, value))  # ...and prefetches the next 6
        assert sum(i["outstanding"] for i in shards.info()) == 12  # the two prefetched leases
        snap = owner.state_dict()
        assert owner.state_dict() is snap  # nothing leased since: the same snapshot
        assert other.state_dict() == {"kind": SHARED_KIND, "owner": False}  # non-owners hold no copy
        contents = torch.cat([s["buffer"] for s in snap["shards"]]).flatten(1)[:, 0].numpy()
        assert (contents == 1.0).sum() == 6 and (contents == 2.0).sum() == 6

        stale = other.lease(6)  # the prefetched lease, taken after the snapshot
        owner.load_state_dict(snap)  # restore: every outstanding lease is revoked
        everything = owner.lease(20)  # so all 20 slots are free again, including the stale lease's
        np.testing.assert_array_equal(everything.x[np.argsort(everything.slots)].reshape(20, -1)[:, 0], contents)
        other.write_back(stale.slots, np.full_like(stale.x, 3.0))  # dropped: its lease was revoked
        other.flush()
        assert other.dropped == 6
        owner.write_back(everything.slots, np.full_like(everything.x, 4.0))
        again = owner.lease(20)
        assert np.all(again.x == 4.0)  # the revoked write-back changed nothing
        owner.write_back(again.slots, again.x)

        # Restoring a snapshot of another layout reshards it onto these two shards by global id.
        owner.load_state_dict(three)
        lease = owner.lease(20)
        np.testing.assert_array_equal(lease.x.reshape(20, -1)[:, 0], lease.slots)
        owner.write_back(lease.slots, lease.x)
        with pytest.raises(ValueError, match="per-worker replay buffer"):
            owner.load_state_dict(_shard_state(ids))
    finally:
        shards.shutdown()


@pytest.mark.slow
def test_run_training_shares_one_buffer_across_nodes(cluster, cache_dir, tmp_path, monkeypatch):
    import ray

    from rjem_ray import train_driver
    from rjem_ray.checkpoint import load_state

    created = {}
    real = train_driver.create_shards

    def spy(*args, **kwargs):
        shards = real(*args, **kwargs)
        created.update(handles=list(shards.handles), nodes=list(shards.node_ids), sizes=list(shards.sizes))
        return shards

    monkeypatch.setattr(train_driver, "create_shards", spy)
    cfg = load_config(REPO / "tune_configs" / "smoke.yaml", [
        "trainer.num_workers=2", "train.batch_size=16", "train.steps=3", "train.log_every=3",
        "train.checkpoint_every=3", "train.max_rollbacks=0", "tracking.enabled=false", f"cache_dir={cache_dir}",
    ])
    outcome = train_driver.run_training(cfg, tmp_path / "out", samples=False)

    # One shard per node (each node also ran one of the two 1-CPU workers).
    assert sorted(created["nodes"]) == _node_ids() and created["sizes"] == [64, 64]
    state = load_state(outcome.checkpoint)
    assert state["step"] == 3
    buf = state["buffer"]
    assert buf["kind"] == SHARED_KIND and [s["buffer"].shape[0] for s in buf["shards"]] == [64, 64]
    leased = sum(s["stats"]["leased"] for s in buf["shards"])
    assert 3 * 16 <= leased <= 4 * 16  # 3 steps of 16 slots (+ the prefetched next lease)
    written = torch.cat([s["buffer"] for s in buf["shards"]])
    assert torch.isfinite(written).all() and written.abs().max() <= 1
    # Rank 1's file holds its RNG and data stream but no copy of the buffer.
    assert set(torch.load(outcome.checkpoint / "rank-1.pt", weights_only=True)) == {"rng", "stream"}
    # The driver killed the shards and removed their snapshot files.
    for h in created["handles"]:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(h.info.remote(), timeout=30)
    assert not list((tmp_path / "out" / "buffer").glob("*.pt"))
