"""A training worker's replay buffer as a Ray actor beside it: one shard per worker, on the worker's node.

The run's buffer is the union of its workers' shards (``buffer.size`` slots per worker under weak scaling,
``scaling.py``). Each Ray Train worker creates its own :class:`BufferShard` actor **after Ray Train has
placed it** (:func:`create_worker_shard`), with soft node affinity to the worker's node: a lease and a
write-back travel between two processes of one node through its object store, never across nodes, and
no actor serves more than one worker. (One shard per *node* shared by that node's workers was the other
choice: it lets chains move between a node's workers but makes one single-threaded actor serve eight GPUs'
leases; ``scripts/bench_buffer.py`` measures both layouts.)

What the actor buys over a buffer inside the worker process (``buffer.shared: false``):

* **Work off the step.** ``write_back`` returns at once (no acknowledgement is awaited on the step's
  critical path) and the next lease is requested right behind it (prefetch), so both happen while the
  worker computes its loss and next attack. The 5 % re-initialisations are drawn from the Gaussian mixture
  ahead of time: after each write-back the actor tops up a reserve of draws (:class:`DrawReserve`), so a
  lease copies ready images instead of running the mixture's matrix products on the hot path.
* **Survival.** The actor keeps its last snapshot in memory and in ``snapshot_dir/shard-<rank>.pt`` on its
  node; Ray restarts a dead actor (``max_restarts``), and the new one reloads that file before serving a
  call and starts a new *epoch*, which revokes every lease handed out before (their write-backs are
  dropped and counted, never applied). If the whole node is lost the worker dies with it: Ray Train
  restarts the worker group on live nodes from the last checkpoint (``trainer.max_failures``, or with fewer
  workers under ``trainer.min_workers``), and each new worker creates its shard where it now runs from the
  checkpoint's buffer files (``replay_buffer.regroup``: a different worker count redistributes the chains).
* **The checkpoint written by the shard.** At a checkpoint the worker asks its shard to keep a snapshot
  (:meth:`SharedReplayBuffer.state_dict` returns a small marker) and to write it into the worker's
  checkpoint directory as ``buffer-<rank>.pt`` (:meth:`SharedReplayBuffer.save`): the contents never
  travel through the worker, and rank 0 carries no other worker's buffer. A divergence rollback restores
  the kept snapshot inside the actor (``load_state_dict`` of the marker).

Consistency needs no barrier: Ray runs one caller's calls to an actor in submission order, so a snapshot
requested after a write-back holds it. The only lease outstanding at a snapshot is the prefetched one; as
in ``LocalReplayBuffer.state_dict`` it is not part of the snapshot (its slots hold their contents at lease
time) and a restore revokes it.

Ray appears in this module and the orchestration files only; the buffer logic is
:class:`~rjem_ray.method.replay_buffer.LocalReplayBuffer`.
"""

from __future__ import annotations

import os
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..core.files import atomic_torch_save
from ..method.gmm import ClassConditionalGMM, as_init_fn
from ..method.replay_buffer import Lease, LocalReplayBuffer, as_numpy, check_write_back

SHARED_KIND = "shared-replay-buffer-v2"
SNAPSHOT_FILE = "shard-{j}.pt"
MAX_RESTARTS = -1  # a dead shard is always recreated: each restart reloads its snapshot file
MAX_TASK_RETRIES = 3  # a call in flight when the shard died is re-run once it is back


def is_shared_state(state: Any) -> bool:
    """Whether ``state`` is a :class:`SharedReplayBuffer` marker (its contents are in the shard)."""
    return isinstance(state, dict) and state.get("kind") == SHARED_KIND


def gmm_arrays(gmm: ClassConditionalGMM) -> dict:
    """The mixture as numpy arrays and plain values, so ``ray.put`` stores it without pickling tensors."""
    return {
        "means": gmm.means.numpy(),
        "factors": gmm.factors.numpy(),
        "resid_std": gmm.resid_std.numpy(),
        "shape": list(gmm.shape),
        "jitter": float(gmm.jitter),
    }


def _gmm_from_arrays(arrays: dict) -> ClassConditionalGMM:
    # Copies: arrays read from the object store are read-only views.
    return ClassConditionalGMM(
        means=torch.from_numpy(np.array(arrays["means"])),
        factors=torch.from_numpy(np.array(arrays["factors"])),
        resid_std=torch.from_numpy(np.array(arrays["resid_std"])),
        shape=tuple(arrays["shape"]),
        jitter=float(arrays["jitter"]),
    )


def _new_epoch() -> int:
    return int.from_bytes(os.urandom(7), "big")


class DrawReserve:
    """Gaussian-mixture draws made ahead of need: the replay buffer's ``InitFn`` served from a reserve.

    ``take(n, rng)`` (the ``InitFn``) returns ``n`` stored draws, drawing the shortfall on the spot if the
    reserve is short; ``refill()`` tops the reserve up to ``target`` images in one batched draw — the shard
    calls it after a write-back, off the worker's critical path. The draws' randomness comes from the
    reserve's own generator, seeded once: a restored buffer does not replay its reinitialisations exactly.
    """

    def __init__(self, init_fn, target: int, seed: int):
        self.init_fn, self.target = init_fn, int(target)
        self.rng = np.random.default_rng([int(seed), 0x5EED])
        self.store: np.ndarray | None = None

    def __len__(self) -> int:
        return 0 if self.store is None else int(self.store.shape[0])

    def refill(self) -> None:
        short = self.target - len(self)
        if short > 0:
            new = np.asarray(self.init_fn(short, self.rng), dtype=np.float32)
            self.store = new if self.store is None else np.concatenate([self.store, new])

    def take(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        have = min(n, len(self))
        out = self.store[:have] if have else None
        self.store = self.store[have:] if have else self.store
        if have < n:
            extra = np.asarray(self.init_fn(n - have, self.rng), dtype=np.float32)
            out = extra if out is None else np.concatenate([out, extra])
        return out


class BufferShard:
    """One worker's slots: a :class:`LocalReplayBuffer` behind an actor on the worker's node.

    Created through :func:`create_worker_shard` (one call at a time, so the local buffer needs no lock).
    ``gmm`` is :func:`gmm_arrays` of the mixture; ``initial_state`` (a ``LocalReplayBuffer`` state, e.g.
    this worker's part of a checkpoint) replaces the fill from the mixture; ``reserve`` is how many
    mixture draws to keep ready (:class:`DrawReserve`); ``noise_init`` the fraction of them that are noise.
    """

    def __init__(self, shard_id: int, size: int, gmm: dict, reinit_freq: float, seed: int, snapshot_dir: str,
                 initial_state: dict | None = None, reserve: int = 0, noise_init: float = 0.0):
        torch.set_num_threads(1)  # a 0-CPU actor: do not compete with the training workers' threads
        self.shard_id = int(shard_id)
        self.snapshot_file = Path(snapshot_dir) / SNAPSHOT_FILE.format(j=self.shard_id)
        self.snapshot_file.parent.mkdir(parents=True, exist_ok=True)
        self.reserve = DrawReserve(as_init_fn(_gmm_from_arrays(gmm), noise_init), reserve, seed)
        init_fn = self.reserve.take
        with warnings.catch_warnings():  # Ray 2.60's property warns about an API it uses itself
            warnings.simplefilter("ignore", DeprecationWarning)
            self.reconstructed = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        if self.reconstructed:
            if not self.snapshot_file.is_file():
                raise RuntimeError(
                    f"buffer shard {self.shard_id} was restarted but its snapshot {self.snapshot_file} is missing; "
                    "refusing to refill it from the Gaussian mixture"
                )
            saved = torch.load(self.snapshot_file, map_location="cpu", weights_only=True)
            self._buffer = LocalReplayBuffer(1, init_fn, reinit_freq, seed=0)
            self._buffer.load_state_dict(saved["state"])
            self.snapshot_id = saved["snapshot_id"]
        else:
            self._buffer = LocalReplayBuffer(int(size) if initial_state is None else 1, init_fn, reinit_freq, seed=seed)
            if initial_state is not None:
                self._buffer.load_state_dict(initial_state)
            self.snapshot_id = "initial"
            self._persist()
        self._kept = self._buffer.state_dict()
        self.epoch = _new_epoch()
        self.dropped = 0
        self.reserve.refill()

    def _persist(self) -> None:
        atomic_torch_save({"snapshot_id": self.snapshot_id, "state": self._buffer.state_dict()}, self.snapshot_file)

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            "shard_id": self.shard_id, "size": len(self._buffer), "sample_shape": list(self._buffer.sample_shape),
            "node_id": ctx.get_node_id(), "pid": os.getpid(), "epoch": self.epoch, "reconstructed": self.reconstructed,
            "outstanding": self._buffer.num_outstanding, "dropped": self.dropped, "snapshot_id": self.snapshot_id,
            "snapshot_file": str(self.snapshot_file), "reserve": len(self.reserve), **self._buffer.stats(),
        }

    def lease(self, n: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """``(epoch, slots int64 [n], x float32 [n, C, H, W], reinit bool [n])``."""
        lease = self._buffer.lease(n)
        return self.epoch, lease.slots, lease.x, lease.reinit

    def write_back(self, epoch: int, slots: np.ndarray, x: np.ndarray) -> int:
        """Store ``x`` at ``slots`` leased in ``epoch``; returns how many were applied (0 if revoked). Then
        tops up the draw reserve: the worker does not wait for this call."""
        if epoch != self.epoch:
            self.dropped += len(slots)
            return 0
        self._buffer.write_back(np.asarray(slots, dtype=np.int64), x)
        self.reserve.refill()
        return len(slots)

    def keep(self, snapshot_id: str) -> None:
        """Keep a snapshot of the buffer in memory (for :meth:`save` and rollback) and in the restart file."""
        self.snapshot_id = snapshot_id
        self._kept = self._buffer.state_dict()
        atomic_torch_save({"snapshot_id": snapshot_id, "state": self._kept}, self.snapshot_file)

    def save(self, path: str) -> str:
        """Write the kept snapshot (a ``LocalReplayBuffer`` state) to ``path`` atomically; returns its id."""
        atomic_torch_save(self._kept, path)
        return self.snapshot_id

    def restore(self, state: dict | None, snapshot_id: str) -> int:
        """Load ``state`` (a ``LocalReplayBuffer`` state; ``None``: the kept snapshot), revoke every lease
        (new epoch) and persist it; returns the epoch."""
        if state is not None:
            state = {**state, "buffer": torch.from_numpy(np.array(as_numpy(state["buffer"]), dtype=np.float32))}
        self._buffer.load_state_dict(self._kept if state is None else state)
        self.keep(snapshot_id)
        self.epoch = _new_epoch()
        return self.epoch

    def reset_leases(self) -> int:
        """Revoke every outstanding lease (their slots keep their contents at lease time); returns the epoch."""
        self._buffer.load_state_dict(self._buffer.state_dict())
        self.epoch = _new_epoch()
        return self.epoch

    def remove_snapshot(self) -> None:
        """Delete the restart file (the run is over; the checkpoint holds the snapshot)."""
        self.snapshot_file.unlink(missing_ok=True)


_BufferShardActor = ray.remote(BufferShard)


def create_worker_shard(gmm: ClassConditionalGMM, size: int, *, rank: int, reinit_freq: float = 0.05, seed: int = 0,
                        batch: int = 1, initial_state: dict | None = None, snapshot_dir: str | Path | None = None,
                        noise_init: float = 0.0):
    """This worker's shard actor, on this process's node (soft affinity: a restart may move it if the node is
    gone), taking no CPU; returns its handle once it is filled and serving.

    ``batch`` (slots per lease) sizes the draw reserve: twice the expected re-initialisations of a lease, at
    least 4. ``noise_init``: the fraction of fresh draws that are uniform noise (``gmm.as_init_fn``).
    ``snapshot_dir`` (default: a directory under this node's temp dir) keeps the restart file.
    """
    node = ray.get_runtime_context().get_node_id()
    snapshot_dir = Path(snapshot_dir or tempfile.mkdtemp(prefix="rjem-buffer-"))
    state = None if initial_state is None else {**initial_state, "buffer": as_numpy(initial_state["buffer"])}
    reserve = max(4, int(np.ceil(2 * batch * reinit_freq)))
    handle = _BufferShardActor.options(
        num_cpus=0, max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
    ).remote(int(rank), int(size), gmm_arrays(gmm), reinit_freq, int(seed), str(snapshot_dir), state, reserve,
             float(noise_init))
    ray.get(handle.info.remote())
    return handle


class SharedReplayBuffer:
    """A worker's client of its :class:`BufferShard`; implements the ``ReplayBuffer`` protocol.

    ``write_back`` sends the results without waiting and, with ``prefetch``, requests the next lease of the
    same size right behind them, so the next step's lease is ready when asked for. :meth:`flush` waits for
    the acknowledgements (counting write-backs a restart revoked); nothing on the step calls it.
    """

    def __init__(self, shard, *, rank: int = 0, prefetch: bool = True):
        self.shard, self.rank, self.prefetch = shard, int(rank), bool(prefetch)
        info = ray.get(shard.info.remote())
        self.size = int(info["size"])
        self.sample_shape = tuple(info["sample_shape"])
        self._pending: tuple[int, Any] | None = None  # (batch, ObjectRef of BufferShard.lease)
        self._held: tuple[int, np.ndarray] | None = None  # (epoch, slots leased)
        self._unacked: list = []
        self._unacked_slots = 0
        self.dropped = 0  # written-back slots the shard refused because their lease had been revoked

    def __len__(self) -> int:
        return self.size

    def flush(self) -> None:
        """Wait until the shard has applied (or, for revoked leases, dropped) every write-back sent so far."""
        if self._unacked:
            applied = sum(ray.get(self._unacked))
            self.dropped += self._unacked_slots - applied
            self._unacked, self._unacked_slots = [], 0

    def _discard_pending(self) -> None:
        """Give a prefetched lease back unchanged (dropped by the shard if a restore revoked it meanwhile)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            epoch, slots, x, _ = ray.get(pending[1])
            ray.get(self.shard.write_back.remote(epoch, slots, x))
        self.flush()

    def lease(self, batch_size: int) -> Lease:
        """``batch_size`` distinct slots (the prefetched lease when it has that size)."""
        batch_size = int(batch_size)
        if not 1 <= batch_size <= self.size:
            raise ValueError(f"batch_size must be in [1, {self.size}], got {batch_size}")
        if self._held is not None:
            raise ValueError("this client already holds a lease; write it back first")
        if self._pending is not None and self._pending[0] != batch_size:
            self._discard_pending()
        ref = self._pending[1] if self._pending is not None else self.shard.lease.remote(batch_size)
        self._pending = None
        epoch, slots, x, reinit = ray.get(ref)
        self._held = (epoch, np.array(slots, dtype=np.int64))
        # copies out of the read-only object-store views
        return Lease(slots=self._held[1].copy(), x=np.array(x, dtype=np.float32), reinit=np.array(reinit, dtype=bool))

    def write_back(self, slots: np.ndarray, x: np.ndarray) -> None:
        """Store ``x [B, C, H, W]`` at ``slots [B]`` (the whole held lease) and release them; does not wait."""
        slots, x = check_write_back(slots, x, self.size, self.sample_shape)
        if self._held is None or not np.array_equal(np.sort(slots), np.sort(self._held[1])):
            raise ValueError("write_back must return exactly the slots of the lease this client holds")
        epoch, _ = self._held
        self._held = None
        self._unacked.append(self.shard.write_back.remote(epoch, slots.astype(np.int64), x))
        self._unacked_slots += slots.size
        if self.prefetch and self._pending is None:
            # same caller, same actor: Ray runs the lease after the write-back above
            self._pending = (slots.size, self.shard.lease.remote(int(slots.size)))
        if len(self._unacked) > 8:  # bound the refs held; these are long done by now
            self.flush()

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """A marker of a snapshot the shard keeps (contents stay in the actor); see :meth:`save`."""
        snapshot_id = uuid.uuid4().hex
        ray.get(self.shard.keep.remote(snapshot_id))
        return {"kind": SHARED_KIND, "snapshot_id": snapshot_id}

    def save(self, path: str | Path) -> None:
        """Have the shard write its kept snapshot to ``path`` (on this node: the worker's checkpoint dir)."""
        ray.get(self.shard.save.remote(str(path)))

    def load_state_dict(self, state: dict) -> None:
        """A marker: back to the snapshot the shard kept; a ``LocalReplayBuffer`` state: load it (a checkpoint's
        part). Either revokes every lease; this client gives back its prefetched one first."""
        self._discard_pending()
        self._held = None
        if is_shared_state(state):
            ray.get(self.shard.restore.remote(None, state["snapshot_id"]))
        else:
            ray.get(self.shard.restore.remote({**state, "buffer": as_numpy(state["buffer"])}, uuid.uuid4().hex))
            self.size = int(ray.get(self.shard.info.remote())["size"])

    def reset_leases(self) -> None:
        """Revoke every lease on the shard (e.g. those of a worker that died before a restart)."""
        self._discard_pending()
        self._held = None
        ray.get(self.shard.reset_leases.remote())

    def close(self, remove: bool = True) -> None:
        """Wait for outstanding write-backs, give back the prefetched lease, and (``remove``) end the actor
        and its restart file: the checkpoint holds the buffer."""
        self._discard_pending()
        if remove:
            try:
                ray.get(self.shard.remove_snapshot.remote(), timeout=30)
            except Exception:  # a dead shard has nothing left to delete
                pass
            ray.kill(self.shard, no_restart=True)

    def stats(self) -> dict[str, int]:
        """Slots leased, re-initialised, and write-backs dropped as revoked."""
        self.flush()
        info = ray.get(self.shard.info.remote())
        return {k: int(info[k]) for k in ("leased", "reinit", "dropped")}


__all__ = ["BufferShard", "DrawReserve", "SHARED_KIND", "SharedReplayBuffer", "create_worker_shard", "gmm_arrays",
           "is_shared_state"]
