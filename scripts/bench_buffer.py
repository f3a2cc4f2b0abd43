"""Benchmark (not a test): the replay buffer's share of a training step at 1, 2 and 4 workers.

One local Ray on 127.0.0.1; for each worker count it starts that many worker actors (one CPU each, one torch
thread each), each running the real training step (:class:`rjem_ray.method.learner.Learner`, robust-jem: PGD, then
lease → PYLD sampler → write-back, then the loss) on CIFAR-shaped data, with its
:class:`~rjem_ray.distributed.buffer_actor.SharedReplayBuffer` wrapped in a stopwatch. Two layouts (``--layout``):

* ``worker`` (what ``rjem train`` does): every worker creates its own shard actor beside it
  (``buffer_actor.create_worker_shard``) holding ``--size`` slots;
* ``node``: one shard of ``--size × workers`` slots for all workers of the node (the alternative that
  was measured against it).

Reported per worker and step (means over the measured steps of all workers): ``step`` (wall time of
``Learner.step()``), ``lease`` / ``write-back`` (time inside ``buffer.lease`` / ``buffer.write_back``: waiting
for the prefetched lease; the write-back does not wait), ``compute`` = ``step − lease − write-back`` and
``buffer %`` = ``(lease + write-back) / step``. The data are random CIFAR-shaped images and the Gaussian
mixture is fitted on them (only shapes and costs matter). On a small machine every worker shares its cores,
so absolute times grow with the worker count; the ratio is what the table is for.

    python scripts/bench_buffer.py                           # 1 2 4 workers, both layouts
    python scripts/bench_buffer.py --workers 1 2 --steps 5 --layout worker
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
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts")
    p.add_argument("--layout", choices=["worker", "node", "both"], default="both",
                   help="one shard per worker (rjem train's) or one shard shared by the node's workers")
    p.add_argument("--steps", type=int, default=12, help="measured steps per worker")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per worker first")
    p.add_argument("--size", type=int, default=10000, help="buffer slots per worker (CIFAR-10: 10,000)")
    p.add_argument("--batch", type=int, default=16, help="slots leased per worker and step")
    p.add_argument("--depth", type=int, default=10, help="WRN depth of the simulated workers' model")
    p.add_argument("--widen", type=int, default=1, help="WRN widening factor")
    p.add_argument("--attack-steps", type=int, default=5, help="PGD steps per training step")
    p.add_argument("--sampler-steps", type=int, default=10, help="PYLD outer steps (inner: 5)")
    p.add_argument("--gmm-max-mb", type=int, default=64, help="memory budget of the Gaussian mixture")
    p.add_argument("--no-prefetch", action="store_true", help="lease on demand instead of prefetching")
    return p.parse_args(argv)


def _sim_worker_class():
    import ray

    @ray.remote(num_cpus=1)
    class SimWorker:
        """One training worker: a real Learner whose buffer client is timed."""

        def __init__(self, cfg, gmm, shard, rank, prefetch):
            import torch

            from rjem_ray.distributed.buffer_actor import SharedReplayBuffer, create_worker_shard
            from rjem_ray.config import Config
            from rjem_ray.method.learner import Learner

            torch.set_num_threads(1)
            c = Config.from_dict(cfg)
            if shard is None:  # layout "worker": the shard beside this worker, as train_worker creates it
                shard = create_worker_shard(gmm, c.buffer.size, rank=rank, reinit_freq=c.buffer.reinit_freq,
                                            seed=rank, batch=c.train.batch_size)
                self.own = True
            else:
                self.own = False
            buffer = SharedReplayBuffer(shard, rank=rank, prefetch=prefetch)
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
            self.learner = Learner(c, images, labels, None, buffer=Timed())  # no DDP: the buffer is measured

        def run(self, steps):
            self.t_lease = self.t_write = 0.0
            t = time.perf_counter()
            for _ in range(steps):
                self.learner.step()
            return {"step": time.perf_counter() - t, "lease": self.t_lease, "write": self.t_write}

        def close(self):
            self.buffer.close(remove=self.own)

    return SimWorker


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    import torch

    from rjem_ray.distributed.buffer_actor import create_worker_shard
    from rjem_ray.method.gmm import fit_class_gmm

    torch.set_num_threads(1)
    ray_tmpdir = tempfile.mkdtemp(prefix="rjbb-", dir="/tmp")  # private, short path
    max_w = max(args.workers)
    layouts = ["worker", "node"] if args.layout == "both" else [args.layout]
    try:
        ray.init(address="local", num_cpus=max_w, include_dashboard=False, object_store_memory=512 * 2**20,
                 log_to_driver=False, _node_ip_address="127.0.0.1", _temp_dir=ray_tmpdir)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(2000, 3, 32, 32, generator=g) * 2 - 1
        y = torch.arange(2000) % 10
        gmm = fit_class_gmm(x, y, 10, max_bytes=args.gmm_max_mb * 2**20)
        cfg = {
            "data": {"name": "cifar10"},
            "model": {"depth": args.depth, "widen": args.widen, "stem_stride": 1},
            "optim": {"name": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant"},
            "attack": {"steps": args.attack_steps, "eps": 0.1, "step_size": 0.02},
            "sampler": {"kind": "pyld", "steps": args.sampler_steps, "inner_steps": 5},
            "buffer": {"size": args.size},
            "train": {"mode": "robust-jem", "batch_size": args.batch, "steps": 10**6, "energy_l2": 0.1},
        }
        SimWorker = _sim_worker_class()
        rows = []
        for layout in layouts:
            for n in args.workers:
                shard = None
                if layout == "node":
                    shard = create_worker_shard(gmm, args.size * n, rank=0, seed=0, batch=args.batch * n)
                workers = [SimWorker.remote(cfg, gmm, shard, r, not args.no_prefetch) for r in range(n)]
                ray.get([w.run.remote(args.warmup) for w in workers])
                res = ray.get([w.run.remote(args.steps) for w in workers])
                ray.get([w.close.remote() for w in workers])
                for w in workers:
                    ray.kill(w)
                if shard is not None:
                    ray.kill(shard)
                k = args.steps * n
                step = sum(r["step"] for r in res) / k
                lease = sum(r["lease"] for r in res) / k
                write = sum(r["write"] for r in res) / k
                rows.append((layout, n, step, step - lease - write, lease, write, 100 * (lease + write) / step))

        print(f"# replay buffer: {args.size} slots of 3x32x32 per worker; {args.batch} slots per worker and step; "
              f"prefetch {'off' if args.no_prefetch else 'on'}; one local Ray, one CPU and one torch thread per worker")
        print(f"# step: robust-jem Learner.step, WRN-{args.depth}-{args.widen}, PGD {args.attack_steps} steps, "
              f"PYLD {args.sampler_steps}x5; GMM rank {gmm.rank}; {os.cpu_count()} CPU cores, "
              f"load average {os.getloadavg()[0]:.1f} at the end")
        print(f"{'layout':>6} | {'workers':>7} | {'step ms':>8} | {'compute ms':>10} | {'lease ms':>8} | "
              f"{'write-back ms':>13} | {'buffer %':>8}")
        print("-" * 84)
        for layout, n, step, compute, lease, write, pct in rows:
            print(f"{layout:>6} | {n:>7} | {1e3 * step:>8.1f} | {1e3 * compute:>10.1f} | {1e3 * lease:>8.2f} | "
                  f"{1e3 * write:>13.2f} | {pct:>7.2f}%")
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
