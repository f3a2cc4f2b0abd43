"""Replay buffer of persistent sampler chains (JEM / JEM++ persistent contrastive divergence).

Each training step *leases* ``B`` slots, runs the sampler from their contents and *writes back* the
results. On lease each slot is independently replaced by a fresh draw of the informative
initialisation with probability ``reinit_freq`` (0.05 in JEM++), so a chain's expected length is
``1 / reinit_freq`` steps and the buffer keeps a supply of short chains.

Slots stay leased until written back, so concurrent consumers (several Ray workers sharing one buffer
actor) never run the same chain twice at once. :class:`ReplayBuffer` is the interface; this module
provides the in-process implementation, the Ray actor implements the same methods.

Images are float32 ``[C, H, W]`` in [-1, 1] (whatever ``init_fn`` and the writers store).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch

from ..core.settings import ConfigError, setting
from .speed import SWITCHES

if TYPE_CHECKING:
    from ..config import Config

InitFn = Callable[[int, np.random.Generator], np.ndarray]
"""``(n, rng) -> float32 [n, C, H, W]``: ``n`` fresh draws, all randomness taken from ``rng``."""


@dataclass
class Lease:
    """Slots handed to one consumer: ``slots int64 [B]`` (distinct), ``x float32 [B, C, H, W]`` (their
    contents after reinitialisation, a copy), ``reinit bool [B]`` (which slots got a fresh draw)."""

    slots: np.ndarray
    x: np.ndarray
    reinit: np.ndarray


class ReplayBuffer(Protocol):
    def lease(self, batch_size: int) -> Lease: ...
    def write_back(self, slots: np.ndarray, x: np.ndarray) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def __len__(self) -> int: ...


_BIT_GENERATORS = {g.__name__: g for g in (np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64, np.random.MT19937)}


@dataclass(frozen=True)
class BufferConfig:
    """The ``buffer.*`` section: the replay buffer's size, its reinitialisation and where its slots live."""

    size: int = setting(10000, ge=1)  # slots per worker under weak scaling; of the whole buffer under strong
    reinit_freq: float = setting(0.05, ge=0.0, le=1.0)
    # Of the fresh chains (reinit_freq), the fraction that starts from uniform noise on [-1, 1] instead of the
    # Gaussian mixture (JEM starts every chain from noise, JEM++ none): negatives that also visit noise teach
    # the energy to rank it below data (docs/RESULTS.md "An energy that is also a density").
    noise_init: float = setting(0.0, ge=0.0, le=1.0)
    gmm_max_mb: int = setting(256, ge=1)  # memory bound for the class-conditional Gaussian mixture factors
    # Where each worker's slots live (rjem_ray/distributed/buffer_actor.py): true = in a shard actor the worker
    # creates on its own node (survives the worker's process; draws reinitialisations off the step); false =
    # inside the worker process; auto = true when trainer.num_workers > 1. YAML true/false load as "true"/"false".
    shared: str = setting("auto", choices=SWITCHES, bools=True)

    def is_shared(self, num_workers: int) -> bool:
        """Whether ``num_workers`` training workers use the shared (actor-sharded) buffer."""
        return self.shared == "true" or (self.shared == "auto" and num_workers > 1)

    def cross_check(self, cfg: Config) -> None:
        if cfg.uses_energy and self.size < cfg.train.batch_size:
            raise ConfigError(f"buffer.size: {self.size} must be at least train.batch_size ({cfg.train.batch_size})")


def check_write_back(slots, x, size: int, sample_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Validate a write-back of ``x [B, *sample_shape]`` to ``slots [B]`` of a buffer of ``size`` slots.

    Returns ``(slots, x)`` as a 1-D integer array and a contiguous float32 array; raises ``ValueError``
    naming the problem (shape, range, duplicates) before anything is written.
    """
    slots = np.asarray(slots)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if slots.ndim != 1 or not np.issubdtype(slots.dtype, np.integer):
        raise ValueError(f"slots must be a 1-D integer array, got shape {slots.shape} dtype {slots.dtype}")
    if x.shape != (slots.size, *sample_shape):
        raise ValueError(f"x has shape {x.shape}, expected {(slots.size, *sample_shape)}")
    if slots.size and (slots.min() < 0 or slots.max() >= size):
        raise ValueError(f"slots must lie in [0, {size - 1}], got range [{slots.min()}, {slots.max()}]")
    if np.unique(slots).size != slots.size:
        raise ValueError("slots contains duplicates")
    return slots, x


def _check_reinit_freq(reinit_freq: float) -> float:
    reinit_freq = float(reinit_freq)
    if not 0.0 <= reinit_freq <= 1.0:
        raise ValueError(f"reinit_freq must be in [0, 1], got {reinit_freq}")
    return reinit_freq


class LocalReplayBuffer:
    """In-process replay buffer of ``size`` slots, filled at construction with ``init_fn(size, rng)``.

    All randomness (slot choice, reinit coin flips, the fresh draws through ``init_fn``) comes from one
    ``numpy`` PCG64 generator seeded with ``seed``, so the state dict reproduces future leases exactly.
    Not thread-safe: one caller at a time (an actor serialises its calls).
    """

    def __init__(self, size: int, init_fn: InitFn, reinit_freq: float = 0.05, seed: int = 0):
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._init_fn = init_fn
        self.reinit_freq = _check_reinit_freq(reinit_freq)
        self._rng = np.random.default_rng(seed)
        self._buffer = self._draw(int(size))
        self._leased = np.zeros(int(size), dtype=bool)
        self._num_leased = 0
        self._num_reinit = 0

    def _draw(self, n: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
        x = np.asarray(self._init_fn(n, self._rng), dtype=np.float32)
        if x.ndim < 2 or x.shape[0] != n or (shape is not None and x.shape[1:] != shape):
            want = f"[{n}, {', '.join(map(str, shape))}]" if shape is not None else f"[{n}, ...]"
            raise ValueError(f"init_fn({n}, rng) returned shape {x.shape}, expected {want}")
        return x

    def __len__(self) -> int:
        return self._buffer.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one stored image, e.g. ``(3, 32, 32)``."""
        return self._buffer.shape[1:]

    @property
    def num_outstanding(self) -> int:
        """Slots leased and not yet written back."""
        return int(self._leased.sum())

    def lease(self, batch_size: int) -> Lease:
        """Lease ``batch_size`` distinct slots drawn uniformly from the free ones; reinit each w.p. ``reinit_freq``."""
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        free = np.flatnonzero(~self._leased)
        if batch_size > free.size:
            raise ValueError(
                f"cannot lease {batch_size} slots: {free.size} of {len(self)} are free "
                f"({len(self) - free.size} leased and not written back)"
            )
        slots = self._rng.choice(free, size=batch_size, replace=False).astype(np.int64)
        # random() is in [0, 1): freq 0 never reinitialises, freq 1 always does.
        reinit = self._rng.random(batch_size) < self.reinit_freq
        n_new = int(reinit.sum())
        if n_new:
            self._buffer[slots[reinit]] = self._draw(n_new, self.sample_shape)
        self._leased[slots] = True
        self._num_leased += batch_size
        self._num_reinit += n_new
        return Lease(slots=slots, x=self._buffer[slots].copy(), reinit=reinit)

    def write_back(self, slots: np.ndarray, x: np.ndarray) -> None:
        """Store ``x [B, C, H, W]`` (as float32) at ``slots [B]`` and release them; all must be leased."""
        slots, x = check_write_back(slots, x, len(self), self.sample_shape)
        not_leased = slots[~self._leased[slots]]
        if not_leased.size:
            # Checked before any write so a bad call leaves the buffer untouched.
            raise ValueError(f"slots {not_leased[:10].tolist()} are not leased (never leased or already written back)")
        self._buffer[slots] = x
        self._leased[slots] = False

    def stats(self) -> dict[str, int]:
        """Running totals since construction (or restore): slots leased, slots reinitialised."""
        return {"leased": self._num_leased, "reinit": self._num_reinit}

    def state_dict(self) -> dict:
        """Contents, RNG and counters; tensors and plain Python values only (``torch.load(weights_only=True)``).

        Outstanding leases are not saved: a restored buffer has none, and their slots hold the contents
        they had when leased.
        """
        return {
            "buffer": torch.from_numpy(self._buffer.copy()),
            "rng": self._rng.bit_generator.state,  # dict of str / int (PCG64's 128-bit ints pickle fine)
            "reinit_freq": self.reinit_freq,
            "stats": self.stats(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore contents, RNG and counters (size and image shape follow the saved buffer); drops all leases."""
        buffer = as_numpy(state["buffer"])
        if buffer.ndim < 2 or buffer.shape[0] < 1:
            raise ValueError(f"state['buffer'] must be [size >= 1, C, H, W], got shape {buffer.shape}")
        rng_state = state["rng"]
        name = rng_state.get("bit_generator")
        if name not in _BIT_GENERATORS:
            raise ValueError(f"state['rng'] has bit_generator {name!r}, expected one of {sorted(_BIT_GENERATORS)}")
        bit_generator = _BIT_GENERATORS[name]()
        bit_generator.state = rng_state
        self.reinit_freq = _check_reinit_freq(state["reinit_freq"])
        self._rng = np.random.Generator(bit_generator)
        self._buffer = np.array(buffer, dtype=np.float32, copy=True)
        self._leased = np.zeros(self._buffer.shape[0], dtype=bool)
        stats = state.get("stats", {})
        self._num_leased = int(stats.get("leased", 0))
        self._num_reinit = int(stats.get("reinit", 0))


def shard_sizes(total: int, num_shards: int) -> list[int]:
    """Split ``total`` slots into ``num_shards`` contiguous parts whose sizes differ by at most 1."""
    total, num_shards = int(total), int(num_shards)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if total < num_shards:
        raise ValueError(f"cannot split {total} slots into {num_shards} parts (each needs at least one slot)")
    base, extra = divmod(total, num_shards)
    return [base + (j < extra) for j in range(num_shards)]


def as_numpy(a) -> np.ndarray:
    """A tensor's (or array-like's) values as a numpy array (a buffer state's contents may be either)."""
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _contents(state: dict) -> np.ndarray:
    return as_numpy(state["buffer"])


def regroup(parts: list[dict], per_worker: int, world_size: int, rank: int, init_fn: InitFn, seed: int) -> dict:
    """The ``LocalReplayBuffer`` state of worker ``rank`` of ``world_size`` from a checkpoint's ``parts``.

    ``parts`` are the saved workers' buffer states in rank order. Same layout (as many parts as workers,
    each of ``per_worker`` slots or more): ``parts[rank]`` unchanged, contents, RNG and counters. Another
    worker count: the saved slots in rank order form one sequence of ``M`` chains, the new buffer holds
    ``T = max(M, world_size · per_worker)`` slots split by :func:`shard_sizes`, and worker ``r`` takes slots
    ``[o_r, o_r + T_r)`` of the sequence — every saved chain continues on exactly one worker, and slots past
    ``M`` (more workers than before) are fresh draws of ``init_fn``. A regrouped part gets a fresh PCG64
    seeded by ``(seed, rank, M)``; its counters restart at 0. No saved chain is dropped: fewer workers keep
    all of them (each worker then holds more than ``per_worker``).
    """
    if not parts:
        raise ValueError("no saved replay-buffer parts to regroup")
    if len(parts) == world_size and all(len(_contents(p)) >= per_worker for p in parts):
        return parts[rank]
    contents = np.concatenate([_contents(p) for p in parts]).astype(np.float32, copy=False)
    saved = contents.shape[0]
    sizes = shard_sizes(max(saved, world_size * int(per_worker)), world_size)
    start = sum(sizes[:rank])
    mine = contents[start:start + sizes[rank]]
    rng = np.random.default_rng([int(seed), int(rank), saved])
    if mine.shape[0] < sizes[rank]:
        fresh = np.asarray(init_fn(sizes[rank] - mine.shape[0], rng), dtype=np.float32)
        mine = np.concatenate([mine, fresh])
    return {
        "buffer": torch.from_numpy(np.array(mine, dtype=np.float32)),
        "rng": rng.bit_generator.state,
        "reinit_freq": float(parts[0]["reinit_freq"]),
        "stats": {"leased": 0, "reinit": 0},
    }


__all__ = ["BufferConfig", "InitFn", "Lease", "LocalReplayBuffer", "ReplayBuffer", "as_numpy", "regroup", "shard_sizes"]
