"""One replay buffer shared by every training worker, sharded over Ray actors.

The logical buffer holds ``N`` slots (``buffer.size``, 10,000 for CIFAR-10) with *global* ids
``0 .. N-1``. It is cut into ``K`` contiguous shards; shard ``j`` owns ids
``[offset_j, offset_j + size_j)`` and is one :class:`BufferShard` actor wrapping a
:class:`~rjem_ray.replay_buffer.LocalReplayBuffer` of ``size_j`` slots. By default there is one shard
per alive node, pinned there (hard node affinity), so no single actor serves all workers and most
lease traffic stays inside a node's object store.

Each worker uses a :class:`SharedReplayBuffer` client (the :class:`~rjem_ray.replay_buffer.ReplayBuffer`
protocol, so :class:`~rjem_ray.training.Learner` needs no change):

* ``lease(B)`` takes ``B_j ≈ B · size_j / N`` slots from every shard (:func:`split_batch`; each rounding
  remainder goes to the shards that are owed most by this worker's running deficit), so every slot is
  equally likely to be leased whatever the shard sizes. The shard does the 5 % re-initialisation from
  the Gaussian mixture itself: the mixture's arrays are sent to each shard once, at creation.
* ``write_back`` sends the results back and, without waiting, requests the *next* lease of the same
  size (prefetch), so it is ready when the next step asks for it; the rest of the step (the loss, the
  next PGD) hides both round trips. Arrays travel as numpy through Ray's object store; no torch tensor
  is pickled on this path.
* Two workers never hold the same slot: each shard hands out only free slots and every lease carries
  the shard's *epoch*; a restore, a lease reset or an actor restart starts a new epoch, which revokes
  every outstanding lease (its write-back is dropped and counted, never applied).

**Consistent snapshot.** Rank 0's client (the *owner*) snapshots every shard in ``state_dict()``; the
other ranks return a small marker, so their rank files do not duplicate the buffer. The training loop
calls ``state_dict()`` after the metrics all-reduce of checkpoint step ``s`` and before the report
barrier. Every rank waits for its write-back acknowledgements (:meth:`SharedReplayBuffer.flush`) before
each cross-rank reduction (``train_worker`` fences its reducer), and no rank starts step ``s + 1``
before the report barrier, so the snapshot holds every write-back of steps ``<= s`` and none of step
``s + 1``: "consistent" means every slot holds a chain state some step finished, all shards are taken
at the same step boundary, and each shard's part is atomic (an actor runs one call at a time). The only
leases outstanding then are the prefetched ones for step ``s + 1``: as in ``LocalReplayBuffer.state_dict``
they are not part of the snapshot (their slots hold their contents at lease time, fresh GMM draw
included) and a restore revokes them. Exact replay of the leases after a resume is not promised: the
order in which workers lease from a shard is not deterministic.

**Shard death.** Every snapshot (and the initial fill, and every restore) is also written by the shard
to ``snapshot_dir/shard-<j>.pt`` on its own node. Ray recreates a dead shard (``max_restarts``) on the
same node, and its constructor, seeing ``was_current_actor_reconstructed``, reloads that file before it
serves any call: the shard comes back with its last snapshot's contents and RNG, never a fresh GMM fill
(a reconstructed shard without its file refuses to start). A file beats a copy held in the object
store or by the driver because it outlives the actor process without an owner, costs no memory, and is
there before the first call reaches the restarted actor. On a multi-node cluster without a shared file
system each node simply keeps its own shards' files under the same path.

Ray appears in this module and the orchestration files only; the buffer logic stays in
:class:`~rjem_ray.replay_buffer.LocalReplayBuffer`.
"""

from __future__ import annotations

import os
import uuid
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
import torch

from .checkpoint import atomic_torch_save
from .gmm import ClassConditionalGMM, as_init_fn
from .replay_buffer import Lease, LocalReplayBuffer, check_write_back

SHARED_KIND = "shared-replay-buffer-v1"
SNAPSHOT_FILE = "shard-{j}.pt"
MAX_RESTARTS = -1  # a dead shard is always recreated: each restart reloads its snapshot file
MAX_TASK_RETRIES = 3  # a call in flight when the shard died is re-run once it is back


# ---------------------------------------------------------------------------------------------- pure helpers


def shard_sizes(total: int, num_shards: int) -> list[int]:
    """Split ``total`` slots into ``num_shards`` contiguous shards whose sizes differ by at most 1."""
    total, num_shards = int(total), int(num_shards)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if total < num_shards:
        raise ValueError(f"cannot split {total} slots into {num_shards} shards (each needs at least one slot)")
    base, extra = divmod(total, num_shards)
    return [base + (j < extra) for j in range(num_shards)]


def split_batch(
    batch: int, sizes: Sequence[int], deficit: np.ndarray | None = None, rank: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Slots to lease from each shard: ``floor(B · size_j / N)``, plus one for ``r`` shards chosen by deficit.

    ``r = B − Σ_j floor(B · size_j / N)`` is the rounding remainder (``r < K``). Each call adds every shard's
    fractional share ``f_j = B · size_j / N − floor(B · size_j / N)`` (``Σ_j f_j = r``) to its running
    ``deficit_j``, gives the extra slot to the ``r`` shards with the largest deficit (ties: shards in order
    from ``rank`` on, so workers do not all favour shard 0) and subtracts 1 from theirs. The deficits sum
    to 0 and stay bounded, so over ``T`` calls shard ``j`` hands out ``T · B · size_j / N`` slots up to a
    constant: every slot of the logical buffer has the same lease rate, whatever the shard sizes (a plain
    rotation of the remainder does not: with sizes 5, 3, 2 and ``B = 4`` it leases the small shard's
    slots at 0.42× the rate B / N every slot should have, the largest shard's at 1.17×). Each count is
    ``floor`` or ``floor + 1`` of ``B · size_j / N``, which :func:`check_capacity` relies on.

    Returns ``(counts int64 [K] summing to batch, the new deficit float64 [K])``; pass the deficit back
    on the next call (``None`` starts from zeros).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    counts = (int(batch) * sizes) // total
    frac = (int(batch) * sizes - counts * total) / total
    k = sizes.size
    deficit = (np.zeros(k) if deficit is None else np.asarray(deficit, dtype=np.float64)) + frac
    r = int(batch) - int(counts.sum())
    if r:
        order = (np.arange(k) - int(rank)) % k  # tie-break: shards from `rank` on come first
        chosen = np.lexsort((order, -deficit))[:r]
        counts[chosen] += 1
        deficit[chosen] -= 1.0
    return counts, deficit


def check_capacity(sizes: Sequence[int], batch_per_worker: int, num_workers: int) -> None:
    """Raise ``ValueError`` if ``num_workers`` clients leasing ``batch_per_worker`` each could exhaust a shard.

    Each client holds at most one lease per shard at a time (the prefetch is requested only after the
    previous lease is written back), of at most ``floor(b · size_j / N) + 1`` slots.
    """
    sizes = list(sizes)
    total = sum(sizes)
    remainder = (batch_per_worker * np.asarray(sizes)) % total
    for j, size in enumerate(sizes):
        worst = num_workers * (batch_per_worker * size // total + int(remainder.any()))
        if worst > size:
            raise ValueError(
                f"buffer shard {j} holds {size} slots but {num_workers} workers leasing {batch_per_worker} each "
                f"may hold up to {worst} of them at once; raise buffer.size or lower buffer.shards"
            )


def is_shared_state(state: Any) -> bool:
    """Whether ``state`` is a :class:`SharedReplayBuffer` state (snapshot or non-owner marker)."""
    return isinstance(state, dict) and state.get("kind") == SHARED_KIND


def _as_numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def reshard(state: dict, sizes: Sequence[int], seed: int = 0) -> list[dict]:
    """Per-shard ``LocalReplayBuffer`` states of the snapshot ``state`` laid out as shards of ``sizes``.

    The same layout returns the saved shard states unchanged (contents, RNGs, counters). Another layout
    (e.g. the cluster now has a different number of nodes) keeps every slot's contents at its global id
    and gives each new shard a fresh PCG64 seeded by ``(seed, j)``; the counters restart at 0. The total
    number of slots must match.
    """
    if not is_shared_state(state) or "shards" not in state:
        raise ValueError("state is not a shared replay-buffer snapshot (it holds no shard states)")
    old = [int(_as_numpy(s["buffer"]).shape[0]) for s in state["shards"]]
    sizes = [int(s) for s in sizes]
    if old == sizes:
        return list(state["shards"])
    if sum(old) != sum(sizes):
        raise ValueError(f"the snapshot holds {sum(old)} slots, the shards {sum(sizes)}")
    contents = np.concatenate([_as_numpy(s["buffer"]) for s in state["shards"]])
    reinit_freq = float(state["shards"][0]["reinit_freq"])
    out, offset = [], 0
    for j, size in enumerate(sizes):
        rng = np.random.default_rng([int(seed), j])
        out.append({
            "buffer": torch.from_numpy(np.array(contents[offset:offset + size], dtype=np.float32)),
            "rng": rng.bit_generator.state,
            "reinit_freq": reinit_freq,
            "stats": {"leased": 0, "reinit": 0},
        })
        offset += size
    return out


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


# ---------------------------------------------------------------------------------------------- the shard actor


class BufferShard:
    """Slots ``[offset, offset + size)`` of the logical buffer: a :class:`LocalReplayBuffer` behind an actor.

    Created through :func:`create_buffer_shards` as a Ray actor (one call at a time, so the local buffer
    needs no lock). ``gmm`` is :func:`gmm_arrays` of the mixture; ``initial_state`` (a
    ``LocalReplayBuffer`` state) replaces the fill from the mixture. Slot ids in and out are global.
    """

    def __init__(
        self,
        shard_id: int,
        offset: int,
        size: int,
        gmm: dict,
        reinit_freq: float,
        seed: int,
        snapshot_dir: str,
        initial_state: dict | None = None,
    ):
        torch.set_num_threads(1)  # a 0-CPU actor: do not compete with the training workers' threads
        self.shard_id, self.offset = int(shard_id), int(offset)
        self.snapshot_file = Path(snapshot_dir) / SNAPSHOT_FILE.format(j=self.shard_id)
        self._gmm = _gmm_from_arrays(gmm)
        init_fn = as_init_fn(self._gmm)
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
        elif initial_state is not None:
            self._buffer = LocalReplayBuffer(1, init_fn, reinit_freq, seed=0)
            self._buffer.load_state_dict(initial_state)
            self.snapshot_id = "initial"
            self._persist()
        else:
            self._buffer = LocalReplayBuffer(int(size), init_fn, reinit_freq, seed=seed)
            self.snapshot_id = "initial"
            self._persist()
        if len(self._buffer) != int(size):
            raise ValueError(f"buffer shard {self.shard_id}: state holds {len(self._buffer)} slots, expected {size}")
        self.epoch = _new_epoch()
        self.dropped = 0

    def _persist(self) -> None:
        atomic_torch_save(
            {"snapshot_id": self.snapshot_id, "state": self._buffer.state_dict()}, self.snapshot_file,
        )

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            "shard_id": self.shard_id, "offset": self.offset, "size": len(self._buffer),
            "sample_shape": list(self._buffer.sample_shape), "node_id": ctx.get_node_id(), "pid": os.getpid(),
            "epoch": self.epoch, "reconstructed": self.reconstructed, "outstanding": self._buffer.num_outstanding,
            "dropped": self.dropped, "snapshot_id": self.snapshot_id, "snapshot_file": str(self.snapshot_file),
            **self._buffer.stats(),
        }

    def lease(self, n: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """``(epoch, global slots int64 [n], x float32 [n, C, H, W], reinit bool [n])``."""
        lease = self._buffer.lease(n)
        return self.epoch, lease.slots + self.offset, lease.x, lease.reinit

    def write_back(self, epoch: int, slots: np.ndarray, x: np.ndarray) -> int:
        """Store ``x`` at global ``slots`` leased in ``epoch``; returns how many were applied (0 if revoked)."""
        if epoch != self.epoch:
            self.dropped += len(slots)
            return 0
        self._buffer.write_back(np.asarray(slots, dtype=np.int64) - self.offset, x)
        return len(slots)

    def snapshot(self, snapshot_id: str) -> dict:
        """This shard's ``LocalReplayBuffer`` state (contents as numpy), also persisted for restarts."""
        self.snapshot_id = snapshot_id
        state = self._buffer.state_dict()
        atomic_torch_save({"snapshot_id": snapshot_id, "state": state}, self.snapshot_file)
        return {**state, "buffer": state["buffer"].numpy()}

    def restore(self, state: dict, snapshot_id: str) -> int:
        """Load a ``LocalReplayBuffer`` state, revoke every lease (new epoch) and persist it; returns the epoch."""
        if int(_as_numpy(state["buffer"]).shape[0]) != len(self._buffer):
            raise ValueError(
                f"buffer shard {self.shard_id} holds {len(self._buffer)} slots, the state "
                f"{int(_as_numpy(state['buffer']).shape[0])}"
            )
        self._buffer.load_state_dict(state)
        self.snapshot_id = snapshot_id
        self._persist()
        self.epoch = _new_epoch()
        return self.epoch

    def reset_leases(self) -> int:
        """Revoke every outstanding lease (their slots keep their contents at lease time); returns the epoch."""
        self._buffer.load_state_dict(self._buffer.state_dict())
        self.epoch = _new_epoch()
        return self.epoch

    def remove_snapshot(self) -> None:
        """Delete the snapshot file (the run is over; the checkpoint holds the snapshot)."""
        self.snapshot_file.unlink(missing_ok=True)


_BufferShardActor = ray.remote(BufferShard)


# ---------------------------------------------------------------------------------------------- the driver's group


def _alive_nodes() -> list[str]:
    """Ids of alive nodes that offer CPUs (where training workers can run), else of all alive nodes."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    with_cpu = [n for n in alive if n.get("Resources", {}).get("CPU", 0) > 0]
    return [n["NodeID"] for n in (with_cpu or alive)]


@dataclass
class BufferShards:
    """The shard actors of one run, created and owned by the driver; pass :attr:`handles` to the workers."""

    handles: list
    sizes: list[int]
    node_ids: list[str]
    snapshot_dir: Path
    _keep: list = field(default_factory=list, repr=False)  # object refs the shards' constructors read on restart

    def info(self) -> list[dict]:
        return ray.get([h.info.remote() for h in self.handles])

    def shutdown(self, remove_snapshots: bool = True) -> None:
        """Kill every shard (no restart), first deleting their snapshot files. Idempotent."""
        if remove_snapshots:
            for ref in [h.remove_snapshot.remote() for h in self.handles]:
                try:
                    ray.get(ref, timeout=30)
                except Exception:  # a dead shard has nothing left to delete
                    pass
        for h in self.handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # already dead
                pass
        if remove_snapshots:
            try:
                self.snapshot_dir.rmdir()  # only if empty: shards on other nodes wrote their files there
            except OSError:
                pass
        self.handles = []
        self._keep = []


def create_buffer_shards(
    gmm: ClassConditionalGMM,
    size: int,
    snapshot_dir: str | Path,
    *,
    reinit_freq: float = 0.05,
    seed: int = 0,
    num_shards: int = 0,
    initial_state: dict | None = None,
    batch_per_worker: int | None = None,
    num_workers: int | None = None,
) -> BufferShards:
    """Create the shard actors of a ``size``-slot buffer: ``num_shards`` (0: one per alive node) actors.

    Nodes are the alive nodes that offer CPUs (all alive nodes if none does). Shard ``j`` is pinned
    (hard node affinity) to node ``j mod #nodes``, takes no CPU, and is
    recreated by Ray when it dies. ``initial_state`` (a snapshot from :meth:`SharedReplayBuffer.state_dict`,
    e.g. the checkpoint being resumed) fills the shards instead of the mixture; its size wins over
    ``size``. With ``batch_per_worker`` and ``num_workers`` the layout is checked for capacity.
    """
    nodes = _alive_nodes()
    k = int(num_shards) or len(nodes)
    if initial_state is not None:
        size = sum(int(_as_numpy(s["buffer"]).shape[0]) for s in initial_state["shards"])
    sizes = shard_sizes(size, k)
    if batch_per_worker is not None and num_workers is not None:
        check_capacity(sizes, batch_per_worker, num_workers)
    states = reshard(initial_state, sizes, seed) if initial_state is not None else [None] * k
    snapshot_dir = Path(snapshot_dir).resolve()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    keep = [ray.put(gmm_arrays(gmm))]
    handles, node_ids, offset = [], [], 0
    for j, n in enumerate(sizes):
        node = nodes[j % len(nodes)]
        state_ref = None
        if states[j] is not None:
            state_ref = ray.put({**states[j], "buffer": _as_numpy(states[j]["buffer"])})
            keep.append(state_ref)
        seed_j = int(np.random.SeedSequence([int(seed), j]).generate_state(1)[0])
        handles.append(_BufferShardActor.options(
            num_cpus=0,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(j, offset, n, keep[0], reinit_freq, seed_j, str(snapshot_dir), state_ref))
        node_ids.append(node)
        offset += n
    shards = BufferShards(handles, sizes, node_ids, snapshot_dir, keep)
    try:
        shards.info()  # wait until every shard is filled and serving
    except BaseException:
        shards.shutdown()
        raise
    return shards


# ---------------------------------------------------------------------------------------------- the worker's client


@dataclass
class _Request:
    batch: int
    refs: list[tuple[int, Any]]  # (shard index, ObjectRef of BufferShard.lease)


class SharedReplayBuffer:
    """A worker's view of the sharded buffer; implements the ``ReplayBuffer`` protocol with global slot ids.

    ``owner`` (rank 0) snapshots and restores the shards through ``state_dict``/``load_state_dict``; the
    other ranks' ``state_dict`` is a marker and their ``load_state_dict`` only drops their prefetched
    lease. With ``prefetch`` the next lease is requested as soon as a lease is fully written back.

    ``write_back`` does not wait for the shards' acknowledgements: :meth:`flush` does, and every other
    method calls it first (``lease`` for free: the prefetched lease is answered after the write-back).
    The training worker flushes before each cross-rank reduction, which is what makes rank 0's snapshot
    hold every rank's write-backs (module docstring).
    """

    def __init__(self, shards: Sequence, *, rank: int = 0, owner: bool = False, prefetch: bool = True):
        if not shards:
            raise ValueError("SharedReplayBuffer needs at least one shard")
        self.shards = list(shards)
        self.rank, self.owner, self.prefetch = int(rank), bool(owner), bool(prefetch)
        infos = ray.get([s.info.remote() for s in self.shards])
        self.sizes = [int(i["size"]) for i in infos]
        self.offsets = np.cumsum([0] + self.sizes[:-1]).astype(np.int64)
        if [int(i["offset"]) for i in infos] != self.offsets.tolist():
            raise ValueError(f"shards are not contiguous: offsets {[i['offset'] for i in infos]}, sizes {self.sizes}")
        self.sample_shape = tuple(infos[0]["sample_shape"])
        self._deficit: np.ndarray | None = None  # split_batch's running deficits: equal lease rates per slot
        self._pending: _Request | None = None
        self._held: dict[int, tuple[int, np.ndarray]] = {}  # shard index -> (epoch, global slots leased)
        self._cache: dict | None = None  # the owner's last snapshot, valid until this client leases again
        self._unacked: list = []  # ObjectRefs of write-backs not yet acknowledged
        self._unacked_slots = 0
        self.dropped = 0  # written-back slots a shard refused because their lease had been revoked

    def __len__(self) -> int:
        return int(sum(self.sizes))

    # ------------------------------------------------------------------------------------------ leases

    def _request(self, batch: int) -> _Request:
        counts, self._deficit = split_batch(batch, self.sizes, self._deficit, rank=self.rank)
        return _Request(batch, [(j, self.shards[j].lease.remote(int(c))) for j, c in enumerate(counts) if c])

    def flush(self) -> None:
        """Wait until the shards have applied (or, for revoked leases, dropped) every write-back sent so far."""
        if self._unacked:
            applied = sum(ray.get(self._unacked))
            self.dropped += self._unacked_slots - applied
            self._unacked, self._unacked_slots = [], 0

    def _discard_pending(self) -> None:
        """Give a prefetched lease back unchanged (dropped by the shard if a restore revoked it meanwhile)."""
        self.flush()
        pending, self._pending = self._pending, None
        if pending is None:
            return
        parts = ray.get([ref for _, ref in pending.refs])
        acks = [self.shards[j].write_back.remote(epoch, slots, x)
                for (j, _), (epoch, slots, x, _) in zip(pending.refs, parts)]
        ray.get(acks)

    def lease(self, batch_size: int) -> Lease:
        """``batch_size`` distinct slots spread over the shards (the prefetched lease when it fits)."""
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > len(self):
            raise ValueError(f"cannot lease {batch_size} slots from a buffer of {len(self)}")
        if self._pending is not None and self._pending.batch != batch_size:
            self._discard_pending()
        request = self._pending or self._request(batch_size)
        self._pending = None
        self._cache = None
        parts = ray.get([ref for _, ref in request.refs])
        self.flush()  # answered before the lease above (same caller, same actors): no wait
        for (j, _), (epoch, slots, _, _) in zip(request.refs, parts):
            if j in self._held:
                old_epoch, old = self._held[j]
                self._held[j] = (epoch, np.concatenate([old, slots])) if old_epoch == epoch else (epoch, slots.copy())
            else:
                self._held[j] = (epoch, slots.copy())
        # np.concatenate copies out of the read-only object-store views.
        return Lease(
            slots=np.concatenate([p[1] for p in parts]).astype(np.int64),
            x=np.concatenate([p[2] for p in parts]).astype(np.float32, copy=False),
            reinit=np.concatenate([p[3] for p in parts]).astype(bool, copy=False),
        )

    def write_back(self, slots: np.ndarray, x: np.ndarray) -> None:
        """Store ``x [B, C, H, W]`` at global ``slots [B]`` (all leased by this client) and release them."""
        slots, x = check_write_back(slots, x, len(self), self.sample_shape)
        shard_of = np.searchsorted(self.offsets, slots, side="right") - 1
        for j in np.unique(shard_of).tolist():
            held = self._held.get(j, (None, np.empty(0, np.int64)))[1]
            mine = slots[shard_of == j]
            missing = mine[~np.isin(mine, held)]
            if missing.size:
                # Checked before any write so a bad call changes nothing.
                raise ValueError(f"slots {missing[:10].tolist()} are not leased by this client")
        acks = []
        for j in np.unique(shard_of).tolist():
            sel = shard_of == j
            epoch, held = self._held[j]
            acks.append(self.shards[j].write_back.remote(epoch, slots[sel].astype(np.int64), x[sel]))
            rest = held[~np.isin(held, slots[sel])]
            if rest.size:
                self._held[j] = (epoch, rest)
            else:
                del self._held[j]
        if self.prefetch and not self._held and self._pending is None:
            # Same caller, same actor: Ray runs these after the write-backs above.
            self._pending = self._request(slots.size)
        self._unacked += acks
        self._unacked_slots += slots.size
        self._cache = None

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Owner: a snapshot of every shard (contents as tensors, RNGs, counters); others: a marker.

        ``{"kind", "snapshot_id", "sizes", "shards": [LocalReplayBuffer state per shard]}``, readable with
        ``torch.load(weights_only=True)``. The owner returns its previous snapshot again while it has not
        leased or written back since (the rollback copy taken right after a checkpoint then equals it).
        """
        self.flush()
        if not self.owner:
            return {"kind": SHARED_KIND, "owner": False}
        if self._cache is not None:
            return self._cache
        snapshot_id = uuid.uuid4().hex
        parts = ray.get([s.snapshot.remote(snapshot_id) for s in self.shards])
        shards = [{**p, "buffer": torch.from_numpy(np.array(p["buffer"]))} for p in parts]
        self._cache = {"kind": SHARED_KIND, "snapshot_id": snapshot_id, "sizes": list(self.sizes), "shards": shards}
        return self._cache

    def load_state_dict(self, state: dict) -> None:
        """Owner: restore every shard from a snapshot (resharded if the layout changed), revoking all leases.

        Every client first gives back its prefetched lease and forgets what it holds.
        """
        if not is_shared_state(state):
            raise ValueError("state is a per-worker replay buffer's, not a shared buffer snapshot")
        self._discard_pending()
        self._held.clear()
        self._cache = None
        if not self.owner:
            return
        if "shards" not in state:
            raise ValueError("the owner (rank 0) needs a full shared-buffer snapshot, got a non-owner marker")
        states = reshard(state, self.sizes, seed=zlib.crc32(str(state.get("snapshot_id", "")).encode()))
        ray.get([
            s.restore.remote({**st, "buffer": _as_numpy(st["buffer"])}, state["snapshot_id"])
            for s, st in zip(self.shards, states)
        ])

    def reset_leases(self) -> None:
        """Owner: revoke every lease on every shard (e.g. those of workers that died before a restart)."""
        self._discard_pending()
        self._held.clear()
        ray.get([s.reset_leases.remote() for s in self.shards])

    def close(self) -> None:
        """Wait for outstanding write-backs and give back the prefetched lease, if any."""
        self._discard_pending()

    def stats(self) -> dict[str, int]:
        """Totals over all shards: slots leased, re-initialised, and write-backs dropped as revoked."""
        self.flush()
        infos = ray.get([s.info.remote() for s in self.shards])
        return {k: sum(int(i[k]) for i in infos) for k in ("leased", "reinit", "dropped")}


__all__ = [
    "BufferShard", "BufferShards", "SHARED_KIND", "SharedReplayBuffer", "check_capacity", "create_buffer_shards",
    "gmm_arrays", "is_shared_state", "reshard", "shard_sizes", "split_batch",
]
