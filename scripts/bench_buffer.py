"""Benchmark (not a test): the shared replay buffer's cost per training step against the step's compute.

For 1, 2, 4 and 8 simulated workers it starts a simulated multi-node cluster (``ray.cluster_utils.Cluster``,
``--nodes`` nodes), one buffer shard per node (``buffer_actor.create_buffer_shards``), and one actor per
worker spread over the nodes. Each worker runs the real training step (:class:`rjem_ray.training.Learner`,
robust-jem: PGD, then lease → PYLD sampler → write-back, then the loss) on CIFAR-shaped data, with its
:class:`~rjem_ray.buffer_actor.SharedReplayBuffer` wrapped in a stopwatch. Reported per worker and step
(means over the measured steps of all workers):

* ``step``: wall time of ``Learner.step()``;
* ``lease`` / ``write-back``: time inside ``buffer.lease`` / ``buffer.write_back`` (includes waiting for the
  prefetched lease and for the write-back's acknowledgement);
* ``compute``: ``step − lease − write-back``;
* ``buffer %``: ``(lease + write-back) / step``. The issue's target is at most 3 %.

The data are random CIFAR-shaped images (only shapes and costs matter here); the Gaussian mixture is fitted
on them with a ``--gmm-max-mb`` budget. Every worker shares this machine's cores, so on a small machine the
absolute times grow with the worker count; the ratio is what the table is for.

    python scripts/bench_buffer.py                       # 1 2 4 8 workers, 2 nodes, 10,000 slots of 3x32x32
    python scripts/bench_buffer.py --workers 1 2 --steps 5 --no-prefetch
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8], help="simulated worker counts")
    p.add_argument("--nodes", type=int, default=2, help="simulated nodes (one buffer shard each)")
    p.add_argument("--steps", type=int, default=12, help="measured steps per worker")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per worker first")
    p.add_argument("--size", type=int, default=10000, help="buffer slots (CIFAR-10: 10,000)")
    p.add_argument("--batch", type=int, default=16, help="slots leased per worker and step")
    p.add_argument("--depth", type=int, default=10, help="WRN depth of the simulated workers' model")
    p.add_argument("--widen", type=int, default=1, help="WRN widening factor")
    p.add_argument("--attack-steps", type=int, default=5, help="PGD steps per training step")
    p.add_argument("--sampler-steps", type=int, default=10, help="PYLD outer steps (inner: 5)")
    p.add_argument("--gmm-max-mb", type=int, default=64, help="memory budget of the Gaussian mixture")
    p.add_argument("--no-prefetch", action="store_true", help="lease on demand instead of prefetching")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    import torch
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rjem_ray.buffer_actor import create_buffer_shards
    from rjem_ray.gmm import fit_class_gmm

    torch.set_num_threads(1)
    ray_tmpdir = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rjbb-", dir="/tmp")  # private, short path
    max_w = max(args.workers)
    per_node = -(-max_w // args.nodes)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=per_node, object_store_memory=256 * 2**20, include_dashboard=False))
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=per_node, object_store_memory=256 * 2**20)
    shards = None
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]

        g = torch.Generator().manual_seed(0)
        x = torch.rand(2000, 3, 32, 32, generator=g) * 2 - 1
        y = torch.arange(2000) % 10
        gmm = fit_class_gmm(x, y, 10, max_bytes=args.gmm_max_mb * 2**20)
        t0 = time.time()
        shards = create_buffer_shards(gmm, args.size, Path(os.environ["RAY_TMPDIR"]) / "buffer", seed=0,
                                      batch_per_worker=args.batch, num_workers=max_w)
        fill_s = time.time() - t0

        cfg = {
            "data": {"name": "cifar10"},
            "model": {"depth": args.depth, "widen": args.widen, "stem_stride": 1},
            "optim": {"name": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant"},
            "attack": {"steps": args.attack_steps, "eps": 0.1, "step_size": 0.02},
            "sampler": {"kind": "pyld", "steps": args.sampler_steps, "inner_steps": 5},
            "buffer": {"size": args.size},
            "train": {"mode": "robust-jem", "batch_size": args.batch, "steps": 10**6, "energy_l2": 0.1},
        }

        @ray.remote(num_cpus=1)
        class SimWorker:
            """One training worker: a real Learner whose shared buffer is timed."""

            def __init__(self, cfg, handles, rank, prefetch):
                import torch

                from rjem_ray.buffer_actor import SharedReplayBuffer
                from rjem_ray.config import Config
                from rjem_ray.training import Learner

                torch.set_num_threads(1)
                buffer = SharedReplayBuffer(handles, rank=rank, prefetch=prefetch)
                self.t_lease = self.t_write = 0.0
                outer = self

                class Timed:
                    def lease(self, b):
                        t = time.perf_counter()
                        out = buffer.lease(b)
                        outer.t_lease += time.perf_counter() - t
                        return out

                    def write_back(self, slots, x):
                        t = time.perf_counter()
                        buffer.write_back(slots, x)
                        outer.t_write += time.perf_counter() - t

                    def __len__(self):
                        return len(buffer)

                g = torch.Generator().manual_seed(rank)
                images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=g)
                labels = torch.arange(256) % 10
                self.buffer = buffer
                self.learner = Learner(Config.from_dict(cfg), images, labels, None, rank=rank, buffer=Timed())

            def run(self, steps):
                self.t_lease = self.t_write = 0.0
                t = time.perf_counter()
                for _ in range(steps):
                    self.learner.step()
                return {"step": time.perf_counter() - t, "lease": self.t_lease, "write": self.t_write}

            def close(self):
                self.buffer.close()

        workers = [
            SimWorker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[r % len(nodes)], soft=False))
            .remote(cfg, shards.handles, r, not args.no_prefetch)
            for r in range(max_w)
        ]
        ray.get([w.run.remote(0) for w in workers])

        rows = []
        for n in args.workers:
            active = workers[:n]
            ray.get([w.run.remote(args.warmup) for w in active])
            res = ray.get([w.run.remote(args.steps) for w in active])
            ray.get([w.close.remote() for w in active])  # no prefetched lease left between rows
            k = args.steps * n
            step = sum(r["step"] for r in res) / k
            lease = sum(r["lease"] for r in res) / k
            write = sum(r["write"] for r in res) / k
            rows.append((n, step, step - lease - write, lease, write, lease + write, 100 * (lease + write) / step))

        print(f"# shared replay buffer: {args.size} slots of 3x32x32 in {len(shards.sizes)} shard(s) on "
              f"{args.nodes} simulated node(s) (fill {fill_s:.1f} s); {args.batch} slots per worker and step; "
              f"prefetch {'off' if args.no_prefetch else 'on'}")
        print(f"# step: robust-jem Learner.step, WRN-{args.depth}-{args.widen}, PGD {args.attack_steps} steps, "
              f"PYLD {args.sampler_steps}x5; GMM rank {gmm.rank}; {os.cpu_count()} CPU cores, "
              f"load average {os.getloadavg()[0]:.1f} at the end")
        print(f"{'workers':>7} | {'step ms':>8} | {'compute ms':>10} | {'lease ms':>8} | {'write-back ms':>13} | "
              f"{'buffer ms':>9} | {'buffer %':>8}")
        print("-" * 85)
        for n, step, compute, lease, write, buf, pct in rows:
            print(f"{n:>7} | {1e3 * step:>8.1f} | {1e3 * compute:>10.1f} | {1e3 * lease:>8.2f} | "
                  f"{1e3 * write:>13.2f} | {1e3 * buf:>9.2f} | {pct:>7.2f}%")
        worst = max(r[-1] for r in rows)
        print(f"target: buffer <= 3 % of step time -> {'met' if worst <= 3 else 'NOT met'} (worst {worst:.2f} %)")
        for w in workers:
            ray.kill(w)
    finally:
        if shards is not None:
            shards.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
