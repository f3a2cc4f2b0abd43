"""Replay buffer: reinit rate, lease exclusivity, write-back persistence, state round trip, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rjem_ray.method.replay_buffer import Lease, LocalReplayBuffer, ReplayBuffer, regroup, shard_sizes

SHAPE = (3, 2, 2)
WRITTEN = 7.0  # outside the init range [-1, 1): a slot holding it was written back, not redrawn


def init_fn(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-1, 1, size=(n, *SHAPE)).astype(np.float32)


def test_is_a_replay_buffer_and_filled_by_init_fn():
    buf: ReplayBuffer = LocalReplayBuffer(10, init_fn)
    assert len(buf) == 10
    lease = buf.lease(10)
    assert isinstance(lease, Lease)
    assert lease.x.dtype == np.float32 and lease.x.shape == (10, *SHAPE)
    assert lease.slots.dtype == np.int64 and lease.reinit.dtype == bool
    # the contents are init_fn's first draw from the generator seeded with `seed` (0), slot i holding draw i
    np.testing.assert_array_equal(lease.x, init_fn(10, np.random.default_rng(0))[lease.slots])


@pytest.mark.parametrize("freq", [0.05, 0.0, 1.0])
def test_reinit_rate_and_write_back_persistence(freq):
    buf = LocalReplayBuffer(500, init_fn, reinit_freq=freq, seed=1)
    batch, steps = 100, 400  # 40k leased slots
    written = np.zeros(500, dtype=bool)
    n_reinit = 0
    for _ in range(steps):
        lease = buf.lease(batch)
        n_reinit += int(lease.reinit.sum())
        # A slot written back before and not reinitialised still holds what was written.
        kept = written[lease.slots] & ~lease.reinit
        assert np.all(lease.x[kept] == WRITTEN)
        assert np.all(lease.x[lease.reinit] < 1)  # fresh draws replaced the written values
        buf.write_back(lease.slots, np.full_like(lease.x, WRITTEN))
        written[lease.slots] = True
    rate = n_reinit / (batch * steps)
    # Binomial sd at p = 0.05, n = 40k is 0.0011; ±0.006 is 5.5 sd.
    assert abs(rate - freq) <= 0.006, rate
    if freq in (0.0, 1.0):
        assert rate == freq
    assert buf.stats() == {"leased": batch * steps, "reinit": n_reinit}


def test_leased_slots_are_distinct_and_outstanding_leases_disjoint():
    buf = LocalReplayBuffer(100, init_fn)
    leases = [buf.lease(30) for _ in range(3)]
    slots = np.concatenate([lease.slots for lease in leases])
    assert np.unique(slots).size == 90
    assert buf.num_outstanding == 90
    with pytest.raises(ValueError, match="cannot lease 11 slots: 10 of 100 are free"):
        buf.lease(11)
    rest = buf.lease(10)
    assert set(rest.slots).isdisjoint(slots)
    buf.write_back(leases[0].slots, leases[0].x)
    again = buf.lease(30)
    assert set(again.slots) == set(leases[0].slots)  # only those were free


def _contents_of(buf: LocalReplayBuffer) -> np.ndarray:
    """The stored images, read through the public state dict (a copy, in slot order)."""
    return buf.state_dict()["buffer"].numpy()


@pytest.mark.parametrize("n", [4, 3])  # every slot (contiguous slots, where a slice would be a view) and some
def test_lease_returns_a_copy(n):
    buf = LocalReplayBuffer(4, init_fn, reinit_freq=0.0)
    stored = _contents_of(buf)
    lease = buf.lease(n)
    np.testing.assert_array_equal(lease.x, stored[lease.slots])  # the lease holds the stored images ...
    lease.x[:] = 99  # ... and a caller scribbling on them (the sampler updates x in place) leaves the buffer alone
    np.testing.assert_array_equal(_contents_of(buf), stored)
    # written back, the slots hold what was written, and changing that array later changes nothing either
    new = np.full_like(lease.x, 5.0)
    buf.write_back(lease.slots, new)
    new[:] = 42
    after = _contents_of(buf)
    assert np.all(after[lease.slots] == 5.0)
    np.testing.assert_array_equal(np.delete(after, lease.slots, axis=0), np.delete(stored, lease.slots, axis=0))


def test_state_dict_round_trip_restores_contents_and_rng(tmp_path):
    buf = LocalReplayBuffer(64, init_fn, reinit_freq=0.3, seed=5)
    for _ in range(3):
        lease = buf.lease(16)
        buf.write_back(lease.slots, lease.x * 0.5)
    outstanding = buf.lease(8)
    torch.save(buf.state_dict(), tmp_path / "buf.pt")
    state = torch.load(tmp_path / "buf.pt", weights_only=True)
    restored = LocalReplayBuffer(1, init_fn, reinit_freq=0.9, seed=123)
    restored.load_state_dict(state)
    assert len(restored) == 64 and restored.reinit_freq == 0.3 and restored.num_outstanding == 0
    assert restored.stats() == buf.stats()
    np.testing.assert_array_equal(state["buffer"].numpy(), buf._buffer)
    # Outstanding leases are not part of the state.
    with pytest.raises(ValueError, match="not leased"):
        restored.write_back(outstanding.slots, outstanding.x)
    buf.write_back(outstanding.slots, outstanding.x)  # the original still may
    # Same RNG and contents: the next leases (slots, reinit flips, fresh draws) are identical.
    for _ in range(4):
        a, b = buf.lease(16), restored.lease(16)
        np.testing.assert_array_equal(a.slots, b.slots)
        np.testing.assert_array_equal(a.reinit, b.reinit)
        np.testing.assert_array_equal(a.x, b.x)
        buf.write_back(a.slots, a.x + 1)
        restored.write_back(b.slots, b.x + 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, r"size must be >= 1"),
        ({"reinit_freq": -0.1}, r"reinit_freq must be in \[0, 1\]"),
        ({"reinit_freq": 1.5}, r"reinit_freq must be in \[0, 1\]"),
    ],
)
def test_constructor_validation(kwargs, match):
    args = {"size": 8, "init_fn": init_fn} | kwargs
    with pytest.raises(ValueError, match=match):
        LocalReplayBuffer(**args)


def test_init_fn_with_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="init_fn"):
        LocalReplayBuffer(8, lambda n, rng: np.zeros((n + 1, *SHAPE), np.float32))
    shapes = iter([(8, *SHAPE), (1, 1, 2, 2)])
    buf = LocalReplayBuffer(8, lambda n, rng: np.zeros(next(shapes), np.float32), reinit_freq=1.0)
    with pytest.raises(ValueError, match="init_fn"):
        buf.lease(1)


def test_lease_and_write_back_errors():
    buf = LocalReplayBuffer(8, init_fn)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        buf.lease(0)
    lease = buf.lease(4)
    free = np.setdiff1d(np.arange(8), lease.slots)
    with pytest.raises(ValueError, match="not leased"):
        buf.write_back(free[:2], np.zeros((2, *SHAPE), np.float32))
    with pytest.raises(ValueError, match="shape"):
        buf.write_back(lease.slots, np.zeros((4, 3, 2, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        buf.write_back(lease.slots[:3], lease.x)
    with pytest.raises(ValueError, match="duplicates"):
        buf.write_back(lease.slots[[0, 0]], lease.x[:2])
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 7\]"):
        buf.write_back(np.array([8]), lease.x[:1])
    # A rejected call changed nothing: a mixed leased/unleased write leaves the leased slot leased.
    with pytest.raises(ValueError, match="not leased"):
        buf.write_back(np.array([lease.slots[0], free[0]]), np.full((2, *SHAPE), 5, np.float32))
    assert buf.num_outstanding == 4
    buf.write_back(lease.slots, lease.x)
    with pytest.raises(ValueError, match="not leased"):  # already written back
        buf.write_back(lease.slots, lease.x)
    assert buf.num_outstanding == 0


# ---------------------------------------------------------------------------------------------- regrouping


def _part(values, seed=0) -> dict:
    b = LocalReplayBuffer(len(values), lambda n, rng: np.zeros((n, 1, 1, 1), np.float32), 0.0, seed=seed)
    state = b.state_dict()
    state["buffer"] = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)
    return state


def _fresh(n, rng):
    return np.full((n, 1, 1, 1), -1.0, np.float32)


def _values(state) -> list[float]:
    return state["buffer"].flatten().tolist()


def test_shard_sizes_cover_the_buffer_evenly():
    assert shard_sizes(10, 3) == [4, 3, 3] and sum(shard_sizes(10001, 7)) == 10001
    with pytest.raises(ValueError, match="cannot split 2 slots into 3"):
        shard_sizes(2, 3)


def test_regroup_keeps_a_part_unchanged_when_the_layout_is_the_same():
    parts = [_part([1, 2, 3], seed=1), _part([4, 5, 6], seed=2)]
    assert regroup(parts, 3, 2, 1, _fresh, seed=0) is parts[1]  # contents, RNG and counters as saved


def test_regroup_to_more_workers_keeps_every_chain_and_adds_fresh_slots():
    parts = [_part([1, 2, 3, 4])]  # one worker of 4 slots
    new = [regroup(parts, 4, 2, r, _fresh, seed=0) for r in range(2)]  # two workers of 4 (weak scaling)
    assert _values(new[0]) == [1, 2, 3, 4] and _values(new[1]) == [-1, -1, -1, -1]
    assert new[0]["stats"] == {"leased": 0, "reinit": 0}
    # every regrouped part loads into a buffer that leases from it
    b = LocalReplayBuffer(1, _fresh, 0.0)
    b.load_state_dict(new[0])
    assert len(b) == 4 and sorted(b.lease(4).x.flatten().tolist()) == [1, 2, 3, 4]


def test_regroup_to_fewer_workers_drops_no_chain():
    parts = [_part([1, 2, 3]), _part([4, 5, 6])]
    [one] = [regroup(parts, 3, 1, 0, _fresh, seed=0)]
    assert _values(one) == [1, 2, 3, 4, 5, 6]  # more than per_worker: the saved chains all continue
    three = [_values(regroup(parts, 2, 3, r, _fresh, seed=0)) for r in range(3)]
    assert three == [[1, 2], [3, 4], [5, 6]]
    # different ranks draw their fresh slots from different generators
    a, b = (regroup([_part([1])], 2, 2, r, lambda n, rng: rng.random((n, 1, 1, 1)), seed=0) for r in (0, 1))
    assert _values(a)[0] == 1 and _values(a)[1] != _values(b)[0]
