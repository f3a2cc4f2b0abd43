"""Weak and strong scaling of the real training step over 1, 2, 4, ... DDP workers, without Ray.

Every worker is a process started by ``torch.multiprocessing`` (spawn), joined in one ``torch.distributed``
process group (gloo on CPUs; nccl with one GPU per rank when ``torch.cuda.is_available()``: the same
script), and runs a real :class:`rjem_ray.method.learner.Learner` on the digits (``load_split('mnist5k',
'train')``; random images of the dataset's shape if they do not load, as in ``bench_step.py``), with the
class-conditional Gaussian mixture of ``rjem_ray.method.gmm`` for the replay buffer, and its loss module wrapped by
``rjem_ray.method.ddp.wrap_ddp(module, device, grad_compression)`` (no wrap on one worker, as ``train_worker``
does). Each rank runs **one torch thread** (``--threads``), ``--warmup`` untimed steps, then ``--steps``
timed ones.

Modes (``trainer.scaling``):

* ``weak``: ``--batch`` images **per worker**; N workers step on a global batch of ``N · batch``.
* ``strong``: ``--strong-batch`` images **in all**, split over the workers (``batch / N`` each).

Figures per (mode, N, compression):

* ``ms/step``: the median over the timed steps of each rank's step time, then the maximum over ranks
  (the ranks meet at every step's collectives, so they differ little). Every timed step starts right after
  a barrier (untimed), so that no rank carries a lag from the previous step or probe into it;
* ``images/s``: global batch ÷ that step time;
* efficiency, against the 1-worker run of the same mode and batch (``1`` must be in ``--workers``):
  weak ``E(N) = t(1) / t(N)`` (per-worker throughput kept; 1 = perfect), strong
  ``E(N) = t(1) / (N · t(N))`` (speed-up over N; 1 = perfect);
* the gradient all-reduce's share (``--comm-share``, on by default): every rank also holds a second
  Learner whose DDP module has a **no-op communication hook** (each bucket comes back as it is: no bytes
  move), and its steps alternate with the real one's. ``all-reduce ms = t(real) − t(no-op)`` is the time
  the gradient all-reduce adds to a step after what DDP overlaps with the backward; ``share`` is that over
  ``t(real)``. Both learners still run the per-step scalar reduction (the loss check) and DDP's buffer
  broadcast, so those stay in both times and out of the difference.

On a small CPU box the workers share its cores: with 2 cores, 2 workers use both (with whatever else runs
there) and 4 workers oversubscribe them 2:1. The output prints the core count, the load average before and
after, and the oversubscription next to the figures.

    python scripts/bench_scaling.py                                   # 1 2 workers, weak + strong, smoke model
    python scripts/bench_scaling.py --workers 1 2 4 --grad-compression none bf16
    python scripts/bench_scaling.py --config tune_configs/demo.yaml --batch 32 --strong-batch 64 --json > s.json

``--json`` prints the figures as JSON on stdout (the table then goes to stderr). ``run_workers`` and
``probe_box`` are the runner that ``scripts/scaling_model.py`` imports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("weak", "strong")


def _env() -> None:
    """One thread per worker and loopback-only sockets, set before any worker starts (children inherit)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


# ------------------------------------------------------------------------------------ process group


def _entry(rank: int, world: int, init: str, out: str, threads: int, target, payload: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend(), init_method=init, rank=rank, world_size=world)
    try:
        result = target(rank, world, device, payload)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # both done before either tears the group down
    finally:
        dist.destroy_process_group()


def spawn(target, world: int, payload: dict, threads: int = 1) -> list[dict]:
    """Run ``target(rank, world, device, payload) -> dict`` on ``world`` spawned ranks; their results by rank."""
    import torch
    import torch.multiprocessing as mp

    _env()
    if torch.cuda.is_available() and world > torch.cuda.device_count():
        raise SystemExit(f"{world} workers need {world} GPUs (one per rank); {torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory(prefix="rjem-scaling-") as tmp:
        mp.start_processes(_entry, args=(world, f"file://{tmp}/pg", tmp, threads, target, payload),
                           nprocs=world, start_method="spawn")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


# ------------------------------------------------------------------------------------------ learner


def _noop_hook(state, bucket):
    """A DDP communication hook that moves nothing: the bucket's own gradients come back at once."""
    import torch

    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _data(cfg):
    from bench_step import load_images

    from rjem_ray.core.data import dataset_info, to_model_space
    from rjem_ray.method.gmm import fit_class_gmm

    images, labels, desc = load_images(cfg, "auto", max(2000, cfg.buffer.size))
    info = dataset_info(cfg.data.name)
    import torch

    sel = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:200 * info.num_classes]
    gmm = fit_class_gmm(to_model_space(images[sel]), labels[sel], info.num_classes,
                        max_bytes=cfg.buffer.gmm_max_mb * 2**20) if cfg.uses_energy else None
    return images, labels, gmm, desc


def _overrides(p: dict, world: int, batch_setting: int) -> list[str]:
    return list(p["overrides"]) + [f"trainer.num_workers={world}", f"trainer.scaling={p['mode']}",
                                   f"train.batch_size={batch_setting}", f"trainer.grad_compression={p['compression']}"]


def make_learner(p: dict, rank: int, world: int, device, images, labels, gmm, wrap):
    """A Learner whose per-worker batch is what ``p`` asks for, whichever rule the Learner applies.

    Under ``weak`` the wanted per-worker batch is ``p['batch']``: a Learner that follows ``scaling.plan``
    takes ``train.batch_size`` as it is; one that still divides ``train.batch_size`` by the world size is
    rebuilt with ``batch · N``. Under ``strong`` ``train.batch_size`` is the global batch either way."""
    from rjem_ray.config import load_config
    from rjem_ray.method.learner import Learner

    want = p["batch"] if p["mode"] == "weak" else p["batch"] // world
    for setting in ((p["batch"], p["batch"] * world) if p["mode"] == "weak" else (p["batch"],)):
        cfg = load_config(p["config"], _overrides(p, world, setting))
        learner = Learner(cfg, images, labels, gmm, rank=rank, world_size=world, device=device, wrap=wrap)
        if learner.batch_per_worker == want:
            return learner, setting
    raise RuntimeError(f"no train.batch_size gives {want} images per worker on {world} workers")


class ProbeWork:
    """A fixed piece of work that times how fast a worker computes on this box at this moment: ``reps``
    forwards + backwards of the config's network on ``batch`` fixed random images (no optimiser, no
    communication); the time per repetition. The repetitions make it last several scheduler time slices
    (about 40 ms for the smoke model): a probe shorter than a slice can run start to end on a core while
    the other workers wait for theirs, and so see no sharing at all.

    Timed once per step in every rank at the same moment (after a barrier), so that with N workers it runs
    N at once: its median against a 1-worker run's is the slowdown ``s(N)`` that N workers sharing the
    cores (and anything else running here) cause each other's compute, measured while the steps run."""

    def __init__(self, cfg, device, batch: int, reps: int = 6):
        import torch

        from rjem_ray.core.data import dataset_info
        from rjem_ray.method.models import build_model

        info = dataset_info(cfg.data.name)
        self.device = device
        self.model = build_model(cfg.model, info).to(device)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, info.channels, info.size, info.size, generator=gen).to(device)
        self.reps = reps
        self()

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self) -> float:
        self._sync()
        t0 = time.perf_counter()
        for _ in range(self.reps):
            self.model(self.x).logsumexp(1).sum().backward()
        self._sync()
        return (time.perf_counter() - t0) / self.reps


def _step_worker(rank: int, world: int, device, p: dict) -> dict:
    import torch
    import torch.distributed as dist

    from rjem_ray.config import load_config
    from rjem_ray.method.ddp import wrap_ddp

    cfg0 = load_config(p["config"], p["overrides"])
    images, labels, gmm, desc = _data(cfg0)

    def real(m):
        return wrap_ddp(m, device, p["compression"])

    def noop(m):
        ddp = wrap_ddp(m, device, "none")
        ddp.register_comm_hook(None, _noop_hook)
        return ddp

    multi = world > 1
    learner, setting = make_learner(p, rank, world, device, images, labels, gmm, real if multi else None)
    learners = {"real": learner}
    if multi and p["comm_share"]:
        learners["noop"] = make_learner(p, rank, world, device, images, labels, gmm, noop)[0]
    probe = ProbeWork(cfg0, device, p["probe_batch"]) if p["probe"] else None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {k: [] for k in learners}
    probes = []
    t_load = os.getloadavg()[0]
    for i in range(p["warmup"] + p["steps"]):
        for name, lrn in learners.items():  # alternate: a load change on a shared box reaches both alike
            if multi:  # every timed step starts with the ranks together: no lag carried in from before
                dist.barrier()
            sync()
            t = time.perf_counter()
            lrn.step()
            sync()
            if i >= p["warmup"]:
                times[name].append(time.perf_counter() - t)
        if probe is not None:
            dist.barrier()  # every rank probes at the same moment
            dt = probe()
            if i >= p["warmup"]:
                probes.append(dt)
    return {"rank": rank, "times": times, "probe": probes, "batch_per_worker": learner.batch_per_worker,
            "batch_setting": setting, "data": desc, "threads": torch.get_num_threads(),
            "device": str(device), "load_start": t_load, "load_end": os.getloadavg()[0],
            "params": sum(q.numel() for q in learner.model.parameters())}


def run_workers(world: int, *, config: str = "tune_configs/smoke.yaml", overrides=(), mode: str = "weak",
                batch: int = 16, compression: str = "none", steps: int = 12, warmup: int = 3,
                comm_share: bool = True, threads: int = 1, probe: bool = True, probe_batch: int = 16) -> dict:
    """Time ``steps`` Learner steps on ``world`` workers. ``batch`` is per worker under ``weak`` and global
    under ``strong``. Returns the figures of one row (times in ms); ``probe_ms`` is the median
    :class:`ProbeWork` time (median over ranks) when ``probe``."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose weak or strong")
    if mode == "strong" and batch % world:
        raise ValueError(f"strong scaling: the global batch {batch} is not divisible by {world} workers")
    p = {"config": config, "overrides": list(overrides), "mode": mode, "batch": batch, "compression": compression,
         "steps": steps, "warmup": warmup, "comm_share": comm_share, "probe": probe, "probe_batch": probe_batch}
    t0 = time.perf_counter()
    ranks = spawn(_step_worker, world, p, threads)
    med = [1e3 * statistics.median(r["times"]["real"]) for r in ranks]
    row = {
        "mode": mode, "workers": world, "compression": compression, "batch_per_worker": ranks[0]["batch_per_worker"],
        "global_batch": ranks[0]["batch_per_worker"] * world, "ms_per_step": max(med), "ms_per_step_ranks": med,
        "ms_all_rank0": [1e3 * t for t in ranks[0]["times"]["real"]], "steps": steps, "warmup": warmup,
        "threads_per_worker": ranks[0]["threads"], "device": ranks[0]["device"], "backend": backend(),
        "data": ranks[0]["data"], "params": ranks[0]["params"], "train.batch_size": ranks[0]["batch_setting"],
        "load_start": max(r["load_start"] for r in ranks), "load_end": max(r["load_end"] for r in ranks),
        "wall_s": time.perf_counter() - t0,
    }
    row["images_per_s"] = row["global_batch"] / (row["ms_per_step"] / 1e3)
    if "noop" in ranks[0]["times"]:
        noop = max(1e3 * statistics.median(r["times"]["noop"]) for r in ranks)
        row["noop_ms_per_step"] = noop
        row["allreduce_ms"] = row["ms_per_step"] - noop
        row["allreduce_share"] = row["allreduce_ms"] / row["ms_per_step"]
    if probe:
        row["probe_ms"] = 1e3 * statistics.median(statistics.median(r["probe"]) for r in ranks)
    return row


# ------------------------------------------------------------------------------------------ box probe


def _probe_worker(rank: int, world: int, device, p: dict) -> dict:
    """Median seconds of an all-reduce of each size on this box's backend."""
    import torch
    import torch.distributed as dist

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    allreduce = {}
    for nbytes in p["sizes"]:
        t = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
        for _ in range(3):
            dist.all_reduce(t)
        ts = []
        for _ in range(p["repeats"]):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            sync()
            ts.append(time.perf_counter() - t0)
        allreduce[str(t.numel() * 4)] = statistics.median(ts)
    return {"allreduce_s": allreduce, "load": os.getloadavg()[0]}


def probe_box(world: int = 2, *, sizes=None, repeats: int = 30, threads: int = 1) -> dict:
    """All-reduce times by size on ``world`` ranks (median seconds over ``repeats``, max over ranks)."""
    sizes = sizes or [4, 65536, 262144, 1048576, 4194304]
    ranks = spawn(_probe_worker, world, {"sizes": sizes, "repeats": repeats}, threads)
    keys = ranks[0]["allreduce_s"].keys()
    return {"workers": world, "backend": backend(), "repeats": repeats,
            "allreduce_s": {int(k): max(r["allreduce_s"][k] for r in ranks) for k in keys},
            "load": max(r["load"] for r in ranks)}


# ------------------------------------------------------------------------------------------------ main


def efficiencies(rows: list[dict]) -> None:
    """Add ``efficiency`` to each row that has a 1-worker row of the same mode (any compression)."""
    for r in rows:
        base = next((b for b in rows if b["workers"] == 1 and b["mode"] == r["mode"]), None)
        if base is None:
            r["efficiency"] = None
        elif r["mode"] == "weak":
            r["efficiency"] = base["ms_per_step"] / r["ms_per_step"]
        else:
            r["efficiency"] = base["ms_per_step"] / (r["workers"] * r["ms_per_step"])


def box_line(cores: int, workers) -> str:
    over = [n for n in workers if n > cores]
    s = (f"{cores} CPU core(s) here; every worker runs 1 torch thread" if backend() == "gloo"
         else f"{backend()}, one GPU per rank")
    if backend() == "gloo":
        s += f"; {min(max(workers), cores)} worker(s) fill the cores"
        if over:
            s += "; " + ", ".join(f"{n} workers oversubscribe them {n / cores:g}:1" for n in over)
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tune_configs/smoke.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--batch", type=int, default=16, help="weak scaling: images per worker")
    ap.add_argument("--strong-batch", type=int, default=64, help="strong scaling: images in all")
    ap.add_argument("--grad-compression", nargs="+", choices=["none", "bf16"], default=["none"])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--no-comm-share", dest="comm_share", action="store_false",
                    help="skip the no-op-hook learner (halves the run time; no all-reduce share)")
    ap.add_argument("--no-probe", dest="probe", action="store_false",
                    help="skip the per-step compute probe (ProbeWork)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout (table on stderr)")
    args = ap.parse_args(argv)

    out = sys.stderr if args.json else sys.stdout
    cores = os.cpu_count() or 1
    print(f"[scaling] {platform.node()} {platform.machine()}, backend {backend()}; {box_line(cores, args.workers)}; "
          f"load average {os.getloadavg()[0]:.2f}; {args.config} {' '.join(args.set)}", file=out, flush=True)
    rows = []
    for mode in args.modes:
        for n in args.workers:
            # one worker has nothing to compress: one run is every compression's baseline
            for comp in (["none"] if n == 1 else args.grad_compression):
                batch = args.batch if mode == "weak" else args.strong_batch
                row = run_workers(n, config=args.config, overrides=args.set, mode=mode, batch=batch, compression=comp,
                                  steps=args.steps, warmup=args.warmup, comm_share=args.comm_share,
                                  threads=args.threads, probe=args.probe)
                if n == 1:
                    row["compression"] = "n/a"
                rows.append(row)
                print(f"[scaling] {mode} N={n} {comp}: {row['ms_per_step']:.1f} ms/step "
                      f"({row['wall_s']:.0f} s with start-up; load {row['load_end']:.2f})", file=out, flush=True)
    efficiencies(rows)
    for r in rows:  # the probe against the 1-worker run's of the same mode and compression
        base = next((b for b in rows if b["workers"] == 1 and b["mode"] == r["mode"] and b.get("probe_ms")), None)
        if base and r.get("probe_ms"):
            r["probe_slowdown"] = r["probe_ms"] / base["probe_ms"]

    r0 = rows[0]
    print(file=out)
    print(f"{r0['device']} ({r0['backend']}), {r0['threads_per_worker']} torch thread(s) per worker, {box_line(cores, args.workers)}; "
          f"{args.config} {' '.join(args.set)}; {r0['params']:,} parameters; data: {r0['data']}; median of {args.steps} "
          f"steps after {args.warmup} warm-up, max over ranks", file=out)
    print(file=out)
    print("| mode | workers | compression | batch/worker | global batch | ms/step | images/s | efficiency "
          "| all-reduce ms | all-reduce share | compute slowdown (probe) | load (end) | note |", file=out)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|", file=out)
    for r in rows:
        eff = "—" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        ar = "—" if "allreduce_ms" not in r else f"{r['allreduce_ms']:.2f}"
        share = "—" if "allreduce_share" not in r else f"{100 * r['allreduce_share']:.1f} %"
        slow = f"{r['probe_slowdown']:.2f}×" if r.get("probe_slowdown") else "—"
        note = ""
        if r["backend"] == "gloo" and r["workers"] > cores:
            note = f"{r['workers']} workers on {cores} cores"
        elif r["backend"] == "gloo" and r["workers"] == cores:
            note = "all cores busy"
        print(f"| {r['mode']} | {r['workers']} | {r['compression']} | {r['batch_per_worker']} | {r['global_batch']} "
              f"| {r['ms_per_step']:.1f} | {r['images_per_s']:.0f} | {eff} | {ar} | {share} | {slow} | {r['load_end']:.2f} "
              f"| {note} |",
              file=out)
    print(file=out)
    print("efficiency: weak t(1)/t(N) at a fixed per-worker batch; strong t(1)/(N·t(N)) at a fixed global batch. "
          "all-reduce ms: step time with DDP's all-reduce minus with a no-op hook (interleaved steps). compute "
          "slowdown (probe): a fixed forward+backward timed after every step in all workers at once, over the "
          "same in the 1-worker run (how much the workers, and anything else running here, share the cores).",
          file=out)
    if args.json:
        print(json.dumps({"config": args.config, "overrides": args.set, "cores": cores,
                          "threads_per_worker": args.threads, "backend": backend(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
