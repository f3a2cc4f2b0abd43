"""A model of one data-parallel training step's time on N workers, and the scaling efficiencies it implies.

Pure arithmetic: no torch, no Ray. ``scripts/scaling_model.py`` fills it with numbers (counted FLOPs and
operator counts of the paper-scale network, a GPU's rate, a node type's links; or a CPU box's measured
calibration) and checks it against measured steps; ``docs/SCALING.md`` states every input.

One optimiser step of a worker with ``b`` images (``t`` in seconds)::

    t(N) = s(N) · C(b)                                    compute (PGD, sampler, loss, optimiser)
         + AR(N) − min((1 − last) · AR(N), φ · w · s(N) · C(b))   gradient all-reduce not hidden by the backward
         + Σ AR_small(N)                                  per-step small collectives (loss check, BN buffers)
         + k · λ_buf + 2 b · image_bytes / β_buf          replay-buffer lease and write-back
         + T_ckpt(N) · increment / checkpoint_every       checkpoint, amortised

* ``C(b)`` (:class:`Compute`). On a CPU box ``fixed + per_image · b``, both fitted to measured 1-worker
  steps. On a GPU ``optimiser + max(host, per_image · (b + b½))`` (:func:`gpu_compute`): ``per_image`` is
  the step's FLOPs per image over the sustained rate, ``b½`` the batch at which a pass runs at half that
  rate, ``host`` the operators' dispatch on the host (queued ahead of the device, so only the longer of
  the two counts), the optimiser its memory traffic. ``s(N)`` is the slowdown of N concurrent workers on
  shared cores (1 on GPUs, one per rank).
* ``AR`` is a ring all-reduce, ``2 (n − 1)/n · bytes / β + 2 (n − 1) α``, zero for ``n = 1``; beyond one
  node it is hierarchical (:func:`allreduce_time`): a ring over the node's ``G`` GPUs (NVLink) plus a
  ring over the ``M`` nodes in which each GPU carries ``bytes / G`` over its ``1 / G`` of the node's link.
* Overlap: DDP all-reduces each bucket as soon as the backward has produced it, so all buckets but the
  last (``last``: its share of the bytes) can hide behind the part ``w`` of the step that is loss backward
  after the first bucket is ready, of which a fraction ``φ`` is usable (compute and communication share
  the device). Hiding never makes the step shorter than its compute.
* Checkpoint: model + optimiser + every replay-buffer slot, written at the slower of the per-node client
  bandwidth and the file system's aggregate bandwidth, every ``checkpoint_every`` reference steps; weak
  scaling advances ``N`` reference steps per optimiser step.

Scaling (``trainer.scaling``, ``rjem_ray/method/scaling.py``): ``weak`` keeps ``b`` per worker (global ``N b``),
``strong`` splits a global ``B`` (``b = B / N``). Efficiencies: weak ``E(N) = t(1) / t(N)``, strong
``E(N) = t(1) / (N · t(N))``; 1 is perfect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

MIB = 2**20
DDP_BUCKET_CAP = 25 * MIB  # DistributedDataParallel(bucket_cap_mb=25), torch's default
DDP_FIRST_BUCKET = 1 * MIB  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES: the first bucket (last layers) is small


@dataclass(frozen=True)
class Compute:
    """One worker's compute per optimiser step at ``b`` images:
    ``fixed_s + max(host_s, per_image_s · (b + half_batch))``.

    A CPU box: ``fixed_s + per_image_s · b`` (both fitted; the host's work is the compute). A GPU: the
    device's time ``per_image_s · (b + half_batch)`` (a pass on ``b`` images runs at ``b / (b + half_batch)``
    of the sustained rate) runs behind the host's operator dispatch ``host_s``, which is queued ahead
    asynchronously: whichever is longer sets the pace; ``fixed_s`` is what neither hides (the optimiser)."""

    fixed_s: float
    per_image_s: float
    host_s: float = 0.0
    half_batch: float = 0.0

    def time(self, b: float) -> float:
        if b <= 0:
            raise ValueError(f"batch per worker must be positive, got {b}")
        return self.fixed_s + max(self.host_s, self.per_image_s * (b + self.half_batch))


@dataclass(frozen=True)
class Link:
    """A link as the collective sees it: achieved bandwidth (bytes/s) and latency per ring step (s)."""

    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Cluster:
    """``gpus_per_node`` workers per node on ``intra``; ``inter`` is one node's share of the network (None:
    a single node, N may not exceed ``gpus_per_node``)."""

    gpus_per_node: int
    intra: Link
    inter: Link | None = None


@dataclass(frozen=True)
class Storage:
    """Checkpoint writes: per-node (client) and whole-file-system bandwidth, bytes/s."""

    client_bandwidth: float
    aggregate_bandwidth: float


@dataclass(frozen=True)
class Workload:
    """What one step of the training run moves and computes (see the module docstring for the terms)."""

    compute: Compute
    batch: int  # weak: images per worker; strong: the global batch
    grad_bytes: float  # bytes one worker all-reduces per step (after compression)
    last_bucket_share: float = 1.0  # share of grad_bytes in the bucket that is ready last
    overlap_window: float = 0.0  # w: share of C(b) during which earlier buckets can be all-reduced
    sync_bytes: tuple[float, ...] = ()  # other collectives per step (each an all-reduce of that size)
    buffer_image_bytes: float = 0.0  # one replay-buffer image, each way (0: no buffer traffic modelled)
    buffer_calls: int = 2  # lease + write-back
    model_state_bytes: float = 0.0  # model + optimiser state in a checkpoint
    buffer_slots: int = 0  # replay-buffer slots: per worker under weak, in all under strong (scaling.plan)
    checkpoint_every: int = 0  # reference steps between checkpoints (0: none)


@dataclass(frozen=True)
class System:
    """Where the step runs."""

    name: str
    cluster: Cluster
    overlap: float = 0.8  # φ
    buffer_link: Link | None = None
    storage: Storage | None = None


@dataclass(frozen=True)
class StepTime:
    """The terms of one optimiser step (seconds) and what they add up to."""

    workers: int
    batch_per_worker: float
    compute: float
    allreduce: float
    allreduce_hidden: float
    sync: float
    buffer: float
    checkpoint: float
    step_increment: int
    extra: dict = field(default_factory=dict)

    @property
    def allreduce_exposed(self) -> float:
        return self.allreduce - self.allreduce_hidden

    @property
    def total(self) -> float:
        return self.compute + self.allreduce_exposed + self.sync + self.buffer + self.checkpoint

    def as_dict(self) -> dict:
        return {"workers": self.workers, "batch_per_worker": self.batch_per_worker, "compute_ms": 1e3 * self.compute,
                "allreduce_ms": 1e3 * self.allreduce, "allreduce_exposed_ms": 1e3 * self.allreduce_exposed,
                "sync_ms": 1e3 * self.sync, "buffer_ms": 1e3 * self.buffer, "checkpoint_ms": 1e3 * self.checkpoint,
                "total_ms": 1e3 * self.total}


# ------------------------------------------------------------------------------------------- terms


def ring_allreduce_time(nbytes: float, n: int, link: Link) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` ranks: ``2 (n − 1)/n · nbytes / β + 2 (n − 1) α``."""
    if n < 1:
        raise ValueError(f"workers must be at least 1, got {n}")
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.bandwidth + 2 * (n - 1) * link.latency


def allreduce_time(nbytes: float, n: int, cluster: Cluster) -> float:
    """All-reduce over ``n`` workers: a ring inside one node, hierarchical across nodes.

    Across ``M = ⌈n / G⌉`` nodes: reduce-scatter and all-gather over the node's ``G`` GPUs (together the
    cost of a ring all-reduce on ``G``) plus a ring all-reduce over the ``M`` nodes in which each of the
    ``G`` GPUs carries ``nbytes / G`` on its ``1 / G`` share of the node's bandwidth, i.e.
    ``2 (M − 1)/M · nbytes / β_node + 2 (M − 1) α_node``.
    """
    g = cluster.gpus_per_node
    if n <= g:
        return ring_allreduce_time(nbytes, n, cluster.intra)
    if cluster.inter is None:
        raise ValueError(f"{n} workers do not fit one node of {g} and this cluster has no inter-node link")
    m = math.ceil(n / g)
    return ring_allreduce_time(nbytes, g, cluster.intra) + ring_allreduce_time(nbytes, m, cluster.inter)


def last_bucket_share(grad_bytes_fp32: float, cap: float = DDP_BUCKET_CAP, first: float = DDP_FIRST_BUCKET) -> float:
    """Share of the gradient in DDP's last-ready bucket (the first layers'): DDP fills buckets in reverse
    parameter order, the first up to ``first`` bytes and the rest up to ``cap``; the remainder is the last.
    Sizes are those of the fp32 gradients (a compression hook halves the wire bytes, not the buckets)."""
    if grad_bytes_fp32 <= first:
        return 1.0
    rest = grad_bytes_fp32 - first
    tail = rest - cap * math.floor(rest / cap)
    return (tail if tail > 0 else min(cap, rest)) / grad_bytes_fp32


def exposed_allreduce(t_ar: float, last_share: float, window_s: float, overlap: float) -> tuple[float, float]:
    """``(hidden, exposed)``: all buckets but the last may hide behind ``overlap · window_s`` of backward."""
    hidden = max(0.0, min(t_ar * (1.0 - last_share), overlap * window_s))
    return hidden, t_ar - hidden


def checkpoint_seconds(model_state_bytes: float, slot_bytes: float, slots_per_worker: float, n: int,
                       workers_per_node: int, storage: Storage) -> float:
    """One checkpoint: model + optimiser state once and every worker's buffer slots, all nodes writing at
    once; the slower of the busiest node's client link and the file system's aggregate rate."""
    total = model_state_bytes + slot_bytes * slots_per_worker * n
    per_node = model_state_bytes + slot_bytes * slots_per_worker * min(n, workers_per_node)
    return max(per_node / storage.client_bandwidth, total / storage.aggregate_bandwidth)


def gpu_compute(*, flops_per_image: float, peak_flops: float, sustained: float, ops_per_step: int,
                op_overhead_s: float, half_batch: float = 0.0, optimizer_bytes: float = 0.0,
                memory_bandwidth: float = float("inf")) -> Compute:
    """A GPU's :class:`Compute`: ``per_image = flops_per_image / (sustained · peak)``, ``host = operators ×
    per-operator overhead``, ``fixed`` = the optimiser's memory traffic over the memory bandwidth."""
    if not 0 < sustained <= 1:
        raise ValueError(f"sustained fraction must be in (0, 1], got {sustained}")
    return Compute(fixed_s=optimizer_bytes / memory_bandwidth, per_image_s=flops_per_image / (sustained * peak_flops),
                   host_s=ops_per_step * op_overhead_s, half_batch=half_batch)


# -------------------------------------------------------------------------------------------- step


def batch_per_worker(workload: Workload, n: int, mode: str) -> float:
    if mode == "weak":
        return float(workload.batch)
    if mode == "strong":
        return workload.batch / n
    raise ValueError(f"mode {mode!r}: choose weak or strong")


def step_time(workload: Workload, system: System, n: int, mode: str, slowdown: float = 1.0) -> StepTime:
    """The modelled optimiser step of ``n`` workers under ``mode`` (weak | strong) on ``system``.

    ``slowdown`` multiplies the compute (``s(N)``: workers sharing cores; 1 where each has its own GPU).
    """
    if n < 1:
        raise ValueError(f"workers must be at least 1, got {n}")
    b = batch_per_worker(workload, n, mode)
    compute = slowdown * workload.compute.time(b)
    ar = allreduce_time(workload.grad_bytes, n, system.cluster)
    hidden, _ = exposed_allreduce(ar, workload.last_bucket_share, workload.overlap_window * compute, system.overlap)
    sync = sum(allreduce_time(x, n, system.cluster) for x in workload.sync_bytes)
    buffer = 0.0
    if workload.buffer_image_bytes and system.buffer_link is not None:
        link = system.buffer_link
        buffer = workload.buffer_calls * link.latency + 2 * b * workload.buffer_image_bytes / link.bandwidth
    increment = n if mode == "weak" else 1
    checkpoint = 0.0
    if workload.checkpoint_every and system.storage is not None:
        per_worker_slots = workload.buffer_slots if mode == "weak" else max(b, workload.buffer_slots / n)
        ckpt = checkpoint_seconds(workload.model_state_bytes, workload.buffer_image_bytes, per_worker_slots, n,
                                  system.cluster.gpus_per_node, system.storage)
        checkpoint = ckpt * increment / workload.checkpoint_every
    return StepTime(n, b, compute, ar, hidden, sync, buffer, checkpoint, increment)


def efficiency(workload: Workload, system: System, n: int, mode: str, slowdown: float = 1.0) -> float:
    """Weak ``t(1)/t(N)``; strong ``t(1)/(N·t(N))`` (1 = perfect)."""
    t1 = step_time(workload, system, 1, mode).total
    tn = step_time(workload, system, n, mode, slowdown).total
    return t1 / tn if mode == "weak" else t1 / (n * tn)


def run_seconds(workload: Workload, system: System, n: int, mode: str, reference_steps: int) -> float:
    """Wall time of a run of ``reference_steps`` steps of ``workload.batch`` images (``train.steps``):
    weak takes ``⌈steps / N⌉`` optimiser steps of ``N·b`` images, strong ``steps`` steps."""
    st = step_time(workload, system, n, mode)
    steps = math.ceil(reference_steps / n) if mode == "weak" else reference_steps
    return steps * st.total


def workers_for_deadline(workload: Workload, system: System, mode: str, reference_steps: int, deadline_s: float,
                         candidates) -> int | None:
    """The fewest of ``candidates`` workers that finish ``reference_steps`` within ``deadline_s`` (None: none)."""
    for n in sorted(candidates):
        if mode == "strong" and workload.batch < n:
            break
        if run_seconds(workload, system, n, mode, reference_steps) <= deadline_s:
            return n
    return None


def with_compression(workload: Workload, grad_bytes_fp32: float, compression: str) -> Workload:
    """``workload`` with the wire bytes of ``compression`` (none: 4 bytes per parameter; bf16: 2)."""
    factor = {"none": 1.0, "bf16": 0.5}[compression]
    return replace(workload, grad_bytes=grad_bytes_fp32 * factor)


def fit_line(xs, ys, weights=None) -> tuple[float, float]:
    """Weighted least-squares ``(intercept, slope)`` of ``y = a + c x`` (two or more distinct x)."""
    xs, ys = list(map(float, xs)), list(map(float, ys))
    ws = [1.0] * len(xs) if weights is None else list(map(float, weights))
    if len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError("fit_line needs two or more distinct x")
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / sw
    my = sum(w * y for w, y in zip(ws, ys)) / sw
    c = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    return my - c * mx, c


def fit_ring(sizes_bytes, seconds, n: int) -> Link:
    """The :class:`Link` whose ring all-reduce on ``n`` ranks best fits measured ``(bytes, seconds)``, in
    relative terms (weights ``1 / t²``: a 4-byte all-reduce's latency counts as much as a 4 MiB one's time)."""
    a, c = fit_line(sizes_bytes, seconds, [1.0 / max(t, 1e-12) ** 2 for t in seconds])
    steps = 2 * (n - 1)
    return Link(bandwidth=(steps / n) / c if c > 0 else float("inf"), latency=max(a, 0.0) / steps)


__all__ = [
    "Cluster", "Compute", "Link", "StepTime", "Storage", "System", "Workload", "allreduce_time", "batch_per_worker",
    "checkpoint_seconds", "efficiency", "exposed_allreduce", "fit_line", "fit_ring", "gpu_compute",
    "last_bucket_share", "ring_allreduce_time", "run_seconds", "step_time", "with_compression", "workers_for_deadline",
]
