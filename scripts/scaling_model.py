"""The step-time model (``rjem_ray/distributed/stepmodel.py``) for the paper-scale run on the cluster's DDP node type,
and its check against steps measured on this box.

**Modelled** (no GPU is needed): the step of ``--config`` (default ``tune_configs/cifar10.yaml``: WRN-28-10,
batch 64, PGD-15, PYLD 10×5, robust-jem) on the DDP node type of ``--cluster`` (``cluster.yaml``), bf16 gradient
compression, for N = 1, 8, 16, 64 workers under weak and strong scaling:

* compute: the step's FLOPs per image (``F · (2 (K + S) + 3 L)``: K PGD and S sampler passes of forward +
  input gradient, each 2 F; L loss batches, forward + full backward, 3 F each; F counted by
  ``torch.utils.flop_counter`` on the network on the meta device) over the GPU's bf16 dense peak × an
  assumed sustained fraction, at ``b / (b + b½)`` of that rate for ``b`` images per worker; paced instead by
  the host when its operator dispatch (aten operators per step, counted on the meta device, × a
  per-operator overhead) takes longer; plus the optimiser's memory traffic over HBM bandwidth;
* the gradient all-reduce (ring inside a node over NVLink, hierarchical over EFA across nodes), with the
  part DDP overlaps with the loss backward; the per-step small collectives (loss check, BatchNorm buffers);
* the replay buffer's lease and write-back to a node-local actor;
* checkpoints (model, optimiser, every buffer slot) to the shared file system, amortised.

Every constant is in ``NODE_TYPES`` / ``ASSUMED`` below, with where it comes from; ``docs/SCALING.md``
lists them.

**Checked** (``--validate``, the default): the same model for this box: 1, 2 and 4 gloo workers
(``bench_scaling.run_workers``: real Learners, one torch thread each) on a small model (``--box-config``,
default the smoke WRN-10-1 on digits). Calibration: the box's compute from the two 1-worker runs (weak
batch and strong batch: ``C(b) = fixed + per_image · b``), gloo's bandwidth and latency from an all-reduce
of 4 B–4 MiB on 2 idle ranks. Predictions for 2 and 4 workers, two ways for the compute slowdown of
workers sharing cores: ``predicted_ms`` uses the slowdown measured while the run's steps ran (a fixed
forward+backward timed in every worker at once after each step, against the same in the 1-worker run:
``bench_scaling.ProbeWork``), ``predicted_ms_cores`` assumes ``s(N) = max(1, N / cores)`` from the core
count alone.

    python scripts/scaling_model.py                      # model + validation here (a few minutes on 2 cores)
    python scripts/scaling_model.py --no-validate        # the model alone (seconds)
    python scripts/scaling_model.py --json > model.json  # JSON on stdout, the tables on stderr
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rjem_ray.distributed.stepmodel import (  # noqa: E402
    Cluster,
    Compute,
    Link,
    Storage,
    System,
    Workload,
    allreduce_time,
    efficiency,
    fit_line,
    fit_ring,
    gpu_compute,
    last_bucket_share,
    run_seconds,
    step_time,
    workers_for_deadline,
)

GB = 1e9
GBIT = 1e9 / 8
MIB = 2**20
GIB = 2**30

# Node types: GPUs per node, the GPU's bf16 dense peak (no sparsity) and HBM bandwidth, NVLink bandwidth per
# GPU and direction, network bandwidth per node. Sources: NVIDIA's A100 and H100 datasheets (A100 SXM 312
# TFLOP/s bf16, 1,555 GB/s (40 GB) / 2,039 GB/s (80 GB), NVLink 600 GB/s per GPU both directions; H100 SXM
# 989 TFLOP/s bf16, 3.35 TB/s, NVLink 900 GB/s both directions; H200 the same compute, 4.8 TB/s), AWS's
# instance pages (p4d/p4de: 400 Gbit/s EFA; p5/p5e/p5en: 3,200 Gbit/s EFA; g5.2xlarge: up to 10 Gbit/s, no
# EFA, one A10G). The A10G's tensor rate is an approximation: AWS's A10G has a lower tensor-core rate than
# the A10's datasheet 125 TFLOP/s; 70 is the commonly quoted figure. Not measured here.
NODE_TYPES = {
    "p4d.24xlarge": {"gpu": "A100-SXM4-40GB", "gpus": 8, "peak_bf16": 312e12, "hbm": 1555 * GB,
                     "nvlink": 300 * GB, "network": 400 * GBIT, "efa": True},
    "p4de.24xlarge": {"gpu": "A100-SXM4-80GB", "gpus": 8, "peak_bf16": 312e12, "hbm": 2039 * GB,
                      "nvlink": 300 * GB, "network": 400 * GBIT, "efa": True},
    "p5.48xlarge": {"gpu": "H100-SXM5-80GB", "gpus": 8, "peak_bf16": 989e12, "hbm": 3350 * GB,
                    "nvlink": 450 * GB, "network": 3200 * GBIT, "efa": True},
    "p5e.48xlarge": {"gpu": "H200-SXM-141GB", "gpus": 8, "peak_bf16": 989e12, "hbm": 4800 * GB,
                     "nvlink": 450 * GB, "network": 3200 * GBIT, "efa": True},
    "p5en.48xlarge": {"gpu": "H200-SXM-141GB", "gpus": 8, "peak_bf16": 989e12, "hbm": 4800 * GB,
                      "nvlink": 450 * GB, "network": 3200 * GBIT, "efa": True},
    "g5.2xlarge": {"gpu": "A10G-24GB", "gpus": 1, "peak_bf16": 70e12, "hbm": 600 * GB,
                   "nvlink": None, "network": 10 * GBIT, "efa": False},
}
# The DDP node type when cluster.yaml names none of the above (documented in docs/SCALING.md).
DEFAULT_NODE_TYPE = "p4d.24xlarge"

# Assumptions (not measured: no GPU cluster here). Each is an input of the model; change it here or by flag.
ASSUMED = {
    "sustained": 0.25,  # of the bf16 dense peak, reached by the step's passes at a large per-GPU batch
    "half_batch": 8,  # images per worker at which a pass runs at half the sustained rate (b / (b + 8))
    "op_overhead_s": 6e-6,  # per aten operator: dispatch + kernel launch on the host, eager PyTorch
    "link_efficiency": 0.75,  # share of a link's rate a ring all-reduce achieves (NCCL bus bandwidth)
    "latency_nvlink_s": 5e-6,  # per ring step inside a node
    "latency_efa_s": 15e-6,  # per ring step across nodes (EFA, SRD)
    "latency_tcp_s": 50e-6,  # per ring step across nodes without EFA (plain TCP)
    "overlap": 0.8,  # usable share of the backward window for hiding the all-reduce of earlier buckets
    "buffer_latency_s": 0.5e-3,  # per Ray actor call (lease, write-back) to the node-local buffer actor
    "buffer_bandwidth": 1 * GB,  # serialisation + object-store copy, bytes/s
    # Checkpoints on EFS (cluster.yaml mounts one at /mnt/efs): AWS's EFS performance table, General Purpose
    # mode: 500 MiB/s per client (1,500 with Elastic throughput on recent clients) and 1-5 GiB/s per file
    # system for writes; the low ends are taken.
    "storage_client": 500 * MIB,
    "storage_aggregate": 1 * GIB,
}

EFFICIENCY_WORKERS = (1, 8, 16, 64)
DAY_S = 24 * 3600


# ------------------------------------------------------------------------------------------ the step


def loss_batches(cfg) -> int:
    """Batches through the network in the loss: x_cls, plus x_pos (robust-jem) and x_neg (energy modes)."""
    return 1 + int(cfg.uses_energy and cfg.robust) + int(cfg.uses_energy)


def input_grad_passes(cfg) -> tuple[int, int]:
    """(PGD passes, sampler passes): each a forward plus the gradient with respect to the input.
    PYLD's inner steps reuse their outer step's gradient (``samplers.pyld``): one pass per outer step."""
    k = cfg.attack.steps if (cfg.robust and cfg.train.robust_term == "pgd") else 0
    s = cfg.sampler.steps if cfg.uses_energy else 0
    return k, s


def count_network(cfg) -> dict:
    """Parameters, buffers, forward FLOPs per image and aten operators per pass of ``cfg``'s network, on
    the meta device (nothing is computed)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from rjem_ray.core.data import dataset_info
    from rjem_ray.method.models import build_model

    class _Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    class _NoModules:  # FlopCounterMode's module tracker refuses autograd.grad (as in bench_step.py)
        parents = {"Global"}

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    info = dataset_info(cfg.data.name)
    with torch.device("meta"):
        model = build_model(cfg.model, info)
    b = 4
    x = torch.zeros(b, info.channels, info.size, info.size, device="meta", requires_grad=True)
    flops = FlopCounterMode(display=False)
    flops.mod_tracker = _NoModules()
    with flops:
        model(x)
    ops = {}
    for name in ("forward", "input_grad", "full"):
        counter = _Ops()
        with counter:
            out = model(x)
            if name == "input_grad":
                torch.autograd.grad(out.logsumexp(1).sum(), x)
            elif name == "full":
                out.logsumexp(1).sum().backward()
        ops[name] = counter.n
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "buffer_bytes": sum(t.numel() * t.element_size() for t in model.buffers()),
        "has_batchnorm": any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        "forward_flops_per_image": flops.get_total_flops() / b,
        "ops": ops,
        "image_bytes": info.channels * info.size * info.size * 4,  # float32 in the replay buffer
    }


def step_shape(cfg, net: dict) -> dict:
    """FLOPs per image of one optimiser step and aten operators per step, from the counted network."""
    k, s = input_grad_passes(cfg)
    lb = loss_batches(cfg)
    f = net["forward_flops_per_image"]
    per_image = f * (2 * (k + s) + 3 * lb)
    ops = (k + s) * net["ops"]["input_grad"] + lb * net["ops"]["full"]
    backward_share = 2 * lb / (2 * (k + s) + 3 * lb)  # the loss backward's share of the FLOPs
    # With BatchNorm the loss's batches go through the network as separate calls (loss.JointForward), and
    # autograd runs the last call's backward first: a gradient is complete, and its bucket can be sent,
    # only during the backward of the batch processed last, 1/L of the loss backward.
    window = backward_share / lb if net["has_batchnorm"] else backward_share
    return {"attack_passes": k, "sampler_passes": s, "loss_batches": lb, "flops_per_image": per_image,
            "flop_multiplier": per_image / f, "ops_per_step": ops, "backward_share": backward_share,
            "overlap_window": window}


def optimizer_state_words(cfg) -> tuple[int, int]:
    """(fp32 words of optimiser state per parameter, words read+written per parameter per step)."""
    if cfg.optim.name == "adam":
        return 2, 7  # m, v; read p g m v, write p m v
    return (1, 5) if cfg.optim.momentum else (0, 3)


def gpu_workload(cfg, net: dict, shape: dict, node: dict, compression: str, a: dict) -> Workload:
    params = net["params"]
    state_words, traffic_words = optimizer_state_words(cfg)
    compute = gpu_compute(flops_per_image=shape["flops_per_image"], peak_flops=node["peak_bf16"],
                          sustained=a["sustained"], ops_per_step=shape["ops_per_step"],
                          op_overhead_s=a["op_overhead_s"], half_batch=a["half_batch"],
                          optimizer_bytes=traffic_words * 4 * params, memory_bandwidth=node["hbm"])
    return Workload(
        compute=compute, batch=cfg.train.batch_size,
        grad_bytes=params * (2 if compression == "bf16" else 4),
        last_bucket_share=last_bucket_share(4 * params), overlap_window=shape["overlap_window"],
        sync_bytes=(8, net["buffer_bytes"]),  # Reducer.max of the loss; DDP's broadcast of BatchNorm buffers
        buffer_image_bytes=net["image_bytes"] if cfg.uses_energy else 0,
        model_state_bytes=4 * params * (1 + state_words) + net["buffer_bytes"],
        buffer_slots=cfg.buffer.size if cfg.uses_energy else 0, checkpoint_every=cfg.train.checkpoint_every,
    )


def gpu_system(name: str, node: dict, a: dict) -> System:
    eff = a["link_efficiency"]
    intra = Link(node["nvlink"] * eff, a["latency_nvlink_s"]) if node["nvlink"] else Link(float("inf"), 0.0)
    inter = Link(node["network"] * eff, a["latency_efa_s"] if node["efa"] else a["latency_tcp_s"])
    return System(name, Cluster(node["gpus"], intra, inter), overlap=a["overlap"],
                  buffer_link=Link(a["buffer_bandwidth"], a["buffer_latency_s"]),
                  storage=Storage(a["storage_client"], a["storage_aggregate"]))


# ------------------------------------------------------------------------------------ the node type


def ddp_node_type(cluster_yaml: Path, accelerator: str | None) -> tuple[str, str]:
    """The node type DDP runs on, and why: among ``cluster_yaml``'s node types whose instance type is in
    ``NODE_TYPES``, the first that advertises ``accelerator_type:<trainer.accelerator_type>`` or whose GPU's
    name starts with it; without a match (or with the key unset) the one with the most GPUs per node;
    ``DEFAULT_NODE_TYPE`` when the file names no known GPU instance type."""
    try:
        import yaml

        spec = yaml.safe_load(cluster_yaml.read_text()) or {}
    except (OSError, ValueError) as exc:
        return DEFAULT_NODE_TYPE, f"{cluster_yaml} unreadable ({type(exc).__name__}); the default"
    known = []
    for key, nt in (spec.get("available_node_types") or {}).items():
        nt = nt or {}
        itype = (nt.get("node_config") or {}).get("InstanceType")
        if itype in NODE_TYPES:
            known.append((key, itype, {str(r).lower() for r in (nt.get("resources") or {})}))
    if not known:
        return DEFAULT_NODE_TYPE, f"no known GPU instance type in {cluster_yaml.name}; the default"
    if accelerator:
        acc = accelerator.strip().lower()
        for key, itype, res in known:
            if f"accelerator_type:{acc}" in res or NODE_TYPES[itype]["gpu"].lower().startswith(acc):
                return itype, f"{cluster_yaml.name} node type {key!r} (trainer.accelerator_type {accelerator})"
    key, itype, _ = max(known, key=lambda k: NODE_TYPES[k[1]]["gpus"])
    return itype, f"{cluster_yaml.name} node type {key!r}: the most GPUs per node" + (
        f" (no node type has a {accelerator} GPU)" if accelerator else " (trainer.accelerator_type unset)")


# ------------------------------------------------------------------------------------------ modelled


def model_node(cfg, net, shape, itype: str, a: dict, compression: str = "bf16") -> dict:
    node = NODE_TYPES[itype]
    wl = gpu_workload(cfg, net, shape, node, compression, a)
    sysm = gpu_system(itype, node, a)
    out = {"efficiency": {}, "breakdown": {}}
    for mode in ("weak", "strong"):
        out["efficiency"][mode] = {str(n): efficiency(wl, sysm, n, mode) for n in EFFICIENCY_WORKERS
                                   if mode == "weak" or wl.batch / n >= 1}
        out["breakdown"][mode] = {str(n): step_time(wl, sysm, n, mode).as_dict() for n in EFFICIENCY_WORKERS
                                  if mode == "weak" or wl.batch / n >= 1}
    out["workload"], out["system"] = wl, sysm
    return out


def day_answer(cfg, net, shape, a: dict, compression: str = "bf16") -> list[dict]:
    """For each node type and mode: the fewest GPUs that run ``train.steps`` within 24 h, with the hours."""
    rows = []
    cands = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    for itype in ("p4d.24xlarge", "p5.48xlarge", "g5.2xlarge"):
        node = NODE_TYPES[itype]
        for sustained in (a["sustained"] / 2, a["sustained"], a["sustained"] * 2):
            aa = dict(a, sustained=sustained)
            wl = gpu_workload(cfg, net, shape, node, compression, aa)
            sysm = gpu_system(itype, node, aa)
            for mode in ("weak", "strong"):
                n = workers_for_deadline(wl, sysm, mode, cfg.train.steps, DAY_S, cands)
                g = node["gpus"]
                rows.append({"node_type": itype, "gpu": node["gpu"], "sustained": sustained, "mode": mode,
                             "gpus": n, "hours": None if n is None else run_seconds(wl, sysm, n, mode, cfg.train.steps) / 3600,
                             "hours_1_gpu": run_seconds(wl, sysm, 1, mode, cfg.train.steps) / 3600,
                             "hours_8_gpus": run_seconds(wl, sysm, 8, mode, cfg.train.steps) / 3600,
                             "max_gpus": cfg.train.batch_size if mode == "strong" else max(cands), "gpus_per_node": g})
    return rows


def break_even_sustained(cfg, net, shape, itype: str, a: dict, n: int = 1, compression: str = "bf16",
                         deadline_s: float = DAY_S) -> float | None:
    """The sustained fraction at which ``n`` GPUs of ``itype`` (weak scaling) finish ``train.steps`` in
    ``deadline_s`` (bisection; None if even the full peak does not)."""
    node = NODE_TYPES[itype]

    def hours(f):
        aa = dict(a, sustained=f)
        return run_seconds(gpu_workload(cfg, net, shape, node, compression, aa), gpu_system(itype, node, aa), n,
                           "weak", cfg.train.steps)

    if hours(1.0) > deadline_s:
        return None
    lo, hi = 1e-4, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if hours(mid) <= deadline_s else (mid, hi)
    return hi


# ---------------------------------------------------------------------------------------- validation


def validate(args, log) -> dict:
    """Measure 1, 2, 4 gloo workers here and compare with the box model's predictions."""
    import bench_scaling as bs

    from rjem_ray.config import load_config

    cores = os.cpu_count() or 1
    workers = [n for n in args.workers if n > 1]
    log(f"[model] box: {cores} core(s), load average {os.getloadavg()[0]:.2f}; all-reduce probe on 2 gloo ranks")
    probe = bs.probe_box(2)
    sizes = sorted(probe["allreduce_s"])
    gloo = fit_ring(sizes, [probe["allreduce_s"][s] for s in sizes], 2)
    log(f"[model] gloo fit: latency {1e6 * gloo.latency:.0f} µs per ring step, bandwidth {gloo.bandwidth / GB:.2f} GB/s")

    common = dict(config=args.box_config, overrides=args.box_set, steps=args.steps, warmup=args.warmup, threads=1)
    runs = {}

    def run(n, mode, comp="none"):
        batch = args.box_batch if mode == "weak" else args.box_strong_batch
        r = bs.run_workers(n, mode=mode, batch=batch, compression=comp, **common)
        log(f"[model] measured {mode} N={n} {comp}: {r['ms_per_step']:.1f} ms/step (probe {r['probe_ms']:.2f} ms, "
            f"all-reduce {r.get('allreduce_ms', 0):.2f} ms, load {r['load_end']:.2f})")
        runs[(n, mode, comp)] = r
        return r

    w1, s1 = run(1, "weak"), run(1, "strong")
    # compute in units of the probe's time (so a load change between the runs cancels): u(b) = t(b) / probe
    fixed_u, per_u = fit_line([w1["batch_per_worker"], s1["batch_per_worker"]],
                              [w1["ms_per_step"] / w1["probe_ms"], s1["ms_per_step"] / s1["probe_ms"]])
    probe1 = (w1["probe_ms"] + s1["probe_ms"]) / 2
    log(f"[model] box compute: C(b) = ({fixed_u:.3f} + {per_u:.4f} b) probe units; probe {probe1:.2f} ms alone "
        f"-> {probe1 * fixed_u:.1f} ms + {probe1 * per_u:.2f} ms/image")

    cfg = load_config(args.box_config, args.box_set)
    net = count_network(cfg)
    shape = step_shape(cfg, net)
    box = System("this box (gloo)", Cluster(max(args.workers), gloo), overlap=ASSUMED["overlap"])
    validation = []
    plan = [(n, m, "none") for m in ("weak", "strong") for n in workers]
    plan += [(2, "weak", "bf16")] if 2 in workers and args.bf16_check else []
    for n, mode, comp in plan:
        r = run(n, mode, comp)
        wl = Workload(compute=Compute(fixed_u, per_u), batch=args.box_batch if mode == "weak" else args.box_strong_batch,
                      grad_bytes=net["params"] * (2 if comp == "bf16" else 4),
                      last_bucket_share=last_bucket_share(4 * net["params"]), overlap_window=shape["overlap_window"],
                      sync_bytes=(8, net["buffer_bytes"]))
        pred = step_time(wl, box, n, mode, slowdown=r["probe_ms"] / 1e3)  # compute in probe units × probe seconds
        pred_cores = step_time(wl, box, n, mode, slowdown=probe1 / 1e3 * max(1.0, n / cores))
        row = {"workers": n, "mode": mode, "compression": comp, "batch_per_worker": r["batch_per_worker"],
               "measured_ms": r["ms_per_step"], "predicted_ms": 1e3 * pred.total,
               "predicted_ms_cores": 1e3 * pred_cores.total,
               "error": pred.total * 1e3 / r["ms_per_step"] - 1, "error_cores": pred_cores.total * 1e3 / r["ms_per_step"] - 1,
               "measured_allreduce_ms": r.get("allreduce_ms"), "predicted_allreduce_ms": 1e3 * pred.allreduce_exposed,
               "predicted_sync_ms": 1e3 * pred.sync, "predicted_compute_ms": 1e3 * pred.compute,
               "probe_slowdown": r["probe_ms"] / probe1, "load_end": r["load_end"]}
        validation.append(row)
    flops_check = None
    if args.flop_check:
        import torch

        from bench_step import count_step_flops
        from bench_scaling import _data

        torch.set_num_threads(1)
        images, labels, gmm, _ = _data(cfg)
        c = load_config(args.box_config, args.box_set + [f"train.batch_size={args.box_batch}"])
        counted = count_step_flops(c, images, labels, gmm, torch.device("cpu"))
        flops_check = {"counted_gflop": counted / 1e9, "formula_gflop": shape["flops_per_image"] * args.box_batch / 1e9}
    return {
        "box": {"cores": cores, "threads_per_worker": 1, "config": args.box_config, "overrides": args.box_set,
                "params": net["params"], "gloo_latency_us": 1e6 * gloo.latency, "gloo_bandwidth_GBps": gloo.bandwidth / GB,
                "allreduce_probe_s": {str(k): v for k, v in probe["allreduce_s"].items()},
                "compute_fixed_ms": probe1 * fixed_u, "compute_per_image_ms": probe1 * per_u, "probe_ms_1_worker": probe1,
                "steps": args.steps, "warmup": args.warmup},
        "runs": [dict(v, key=list(k)) for k, v in runs.items()],
        "validation": validation,
        "flop_check": flops_check,
    }


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tune_configs/cifar10.yaml", help="the paper-scale run to model")
    ap.add_argument("--cluster", default=str(ROOT / "cluster.yaml"))
    ap.add_argument("--node-type", choices=sorted(NODE_TYPES), help="model this instance type (default: cluster.yaml's)")
    ap.add_argument("--compression", choices=["none", "bf16"], default="bf16")
    ap.add_argument("--sustained", type=float, default=ASSUMED["sustained"], help="fraction of the bf16 dense peak")
    ap.add_argument("--no-validate", dest="validate", action="store_false")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="box validation: worker counts")
    ap.add_argument("--box-config", default="tune_configs/smoke.yaml")
    ap.add_argument("--box-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--box-batch", type=int, default=16, help="box validation, weak: images per worker")
    ap.add_argument("--box-strong-batch", type=int, default=64, help="box validation, strong: images in all")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-bf16-check", dest="bf16_check", action="store_false")
    ap.add_argument("--no-flop-check", dest="flop_check", action="store_false")
    ap.add_argument("--json", action="store_true", help="JSON on stdout; the tables go to stderr")
    args = ap.parse_args(argv)
    out = sys.stderr if args.json else sys.stdout

    def log(msg=""):
        print(msg, file=out, flush=True)

    from rjem_ray.config import load_config

    cfg = load_config(args.config, [])
    a = dict(ASSUMED, sustained=args.sustained)
    net = count_network(cfg)
    shape = step_shape(cfg, net)
    if args.node_type:
        itype, why = args.node_type, "--node-type"
    else:
        itype, why = ddp_node_type(Path(args.cluster), cfg.trainer.accelerator_type)
    node = NODE_TYPES[itype]
    res = model_node(cfg, net, shape, itype, a, args.compression)
    wl, sysm = res.pop("workload"), res.pop("system")

    log(f"MODELLED: {args.config}: WRN-{cfg.model.depth}-{cfg.model.widen}, {net['params']:,} parameters, batch "
        f"{cfg.train.batch_size}, PGD-{shape['attack_passes']}, {cfg.sampler.kind} {cfg.sampler.steps}x{cfg.sampler.inner_steps}, "
        f"{shape['loss_batches']} loss batches; forward {net['forward_flops_per_image'] / 1e9:.2f} GFLOP/image, step "
        f"{shape['flop_multiplier']:.0f}x that = {shape['flops_per_image'] * cfg.train.batch_size / 1e12:.2f} TFLOP at batch "
        f"{cfg.train.batch_size}; {shape['ops_per_step']} aten ops/step")
    log(f"node type {itype} ({node['gpus']}x {node['gpu']}): {why}; {args.compression} gradients "
        f"({wl.grad_bytes / 1e6:.1f} MB per all-reduce, last bucket {100 * wl.last_bucket_share:.0f} %); "
        f"sustained {a['sustained']:.0%} of {node['peak_bf16'] / 1e12:.0f} TFLOP/s")
    c = wl.compute
    log(f"one worker: C(b) = {1e3 * c.fixed_s:.2f} ms (optimiser) + max({1e3 * c.host_s:.1f} ms host dispatch, "
        f"{1e3 * c.per_image_s:.2f} ms x (b + {c.half_batch:g})); C({cfg.train.batch_size}) = "
        f"{1e3 * c.time(cfg.train.batch_size):.1f} ms")
    log()
    log("| mode | N | batch/worker | compute ms | all-reduce ms | exposed ms | sync ms | buffer ms | checkpoint ms | step ms | efficiency |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in ("weak", "strong"):
        for n, b in res["breakdown"][mode].items():
            log(f"| {mode} | {n} | {b['batch_per_worker']:g} | {b['compute_ms']:.1f} | {b['allreduce_ms']:.2f} | "
                f"{b['allreduce_exposed_ms']:.2f} | {b['sync_ms']:.2f} | {b['buffer_ms']:.2f} | {b['checkpoint_ms']:.1f} | "
                f"{b['total_ms']:.1f} | {res['efficiency'][mode][n]:.3f} |")
    # what the conclusions depend on
    sens = {}
    for label, aa, comp, ckpt in (("sustained x0.5", dict(a, sustained=a["sustained"] / 2), args.compression, True),
                                  ("sustained x2", dict(a, sustained=min(1.0, a["sustained"] * 2)), args.compression, True),
                                  ("no gradient compression", a, "none", True),
                                  ("no checkpoint term", a, args.compression, False),
                                  ("file system x3 (3 GiB/s, 1.5 GiB/s per client)",
                                   dict(a, storage_client=3 * a["storage_client"], storage_aggregate=3 * a["storage_aggregate"]),
                                   args.compression, True),
                                  ("no overlap", dict(a, overlap=0.0), args.compression, True)):
        w = gpu_workload(cfg, net, shape, node, comp, aa)
        if not ckpt:
            w = replace(w, checkpoint_every=0)
        s = gpu_system(itype, node, aa)
        sens[label] = {m: efficiency(w, s, 64, m) for m in ("weak", "strong")}
    log()
    log("64-worker efficiency when one input changes: " + "; ".join(
        f"{k}: weak {v['weak']:.3f}, strong {v['strong']:.3f}" for k, v in sens.items()))
    day = day_answer(cfg, net, shape, a, args.compression)
    log()
    log(f"GPUs to run train.steps = {cfg.train.steps:,} reference steps of {cfg.train.batch_size} images "
        f"({cfg.train.steps * cfg.train.batch_size / 1e6:.2f} M images) within 24 h (candidates 1, 2, 4, ... 256):")
    breakeven = {t: break_even_sustained(cfg, net, shape, t, a, 1, args.compression) for t in
                 ("p4d.24xlarge", "p5.48xlarge", "g5.2xlarge")}
    log("one GPU finishes within 24 h from a sustained fraction of: " + ", ".join(
        f"{t} ({NODE_TYPES[t]['gpu']}) {'never' if f is None else format(f, '.3f')}" for t, f in breakeven.items()))
    log("| node type | GPU | sustained | mode | fewest GPUs within 24 h | hours there | hours on 1 GPU | hours on 8 GPUs |")
    log("|---|---|---|---|---|---|---|---|")
    for d in day:
        log(f"| {d['node_type']} | {d['gpu']} | {d['sustained']:.3g} | {d['mode']} | {d['gpus'] or 'none up to %d' % d['max_gpus']} | "
            f"{'—' if d['hours'] is None else format(d['hours'], '.1f')} | {d['hours_1_gpu']:.1f} | {d['hours_8_gpus']:.1f} |")

    result = {
        "efficiency": res["efficiency"], "node_type": itype, "node_type_reason": why, "gpu": node["gpu"],
        "gpus_per_node": node["gpus"], "compression": args.compression, "config": args.config,
        "breakdown": res["breakdown"], "sensitivity_64": sens, "gpus_in_a_day": day,
        "one_gpu_in_a_day_from_sustained": breakeven,
        "inputs": {"assumed": a, "node": node, "network": net, "step": shape,
                   "compute_fixed_ms": 1e3 * wl.compute.fixed_s, "compute_per_image_ms": 1e3 * wl.compute.per_image_s,
                   "compute_host_ms": 1e3 * wl.compute.host_s, "half_batch": wl.compute.half_batch,
                   "grad_bytes": wl.grad_bytes, "last_bucket_share": wl.last_bucket_share,
                   "checkpoint_state_bytes": wl.model_state_bytes, "buffer_slots": wl.buffer_slots,
                   "allreduce_ms_64": 1e3 * allreduce_time(wl.grad_bytes, 64, sysm.cluster)},
        "validation": [],
    }
    if args.validate:
        log()
        v = validate(args, log)
        result["validation"] = v["validation"]
        result["box"] = v["box"]
        result["box_runs"] = v["runs"]
        result["flop_check"] = v["flop_check"]
        b = v["box"]
        log()
        log(f"MEASURED vs PREDICTED on this box: {b['cores']} cores, 1 torch thread per worker, gloo; {b['config']} "
            f"{' '.join(b['overrides'])} ({b['params']:,} parameters); median of {b['steps']} steps after {b['warmup']} "
            f"warm-up, max over ranks")
        log("| mode | workers | compression | batch/worker | measured ms | predicted ms (in-run slowdown) | error "
            "| predicted ms (cores only) | error | all-reduce measured / predicted ms | slowdown | load |")
        log("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in v["validation"]:
            mar = "—" if r["measured_allreduce_ms"] is None else f"{r['measured_allreduce_ms']:.2f}"
            log(f"| {r['mode']} | {r['workers']} | {r['compression']} | {r['batch_per_worker']} | {r['measured_ms']:.1f} | "
                f"{r['predicted_ms']:.1f} | {100 * r['error']:+.0f} % | {r['predicted_ms_cores']:.1f} | "
                f"{100 * r['error_cores']:+.0f} % | {mar} / {r['predicted_allreduce_ms']:.2f} | {r['probe_slowdown']:.2f}x "
                f"| {r['load_end']:.2f} |")
        if v["flop_check"]:
            fc = v["flop_check"]
            log(f"FLOP formula check on the box model's step (batch {args.box_batch}): FlopCounterMode "
                f"{fc['counted_gflop']:.4f} GFLOP, formula {fc['formula_gflop']:.4f} GFLOP")
    if args.json:
        print(json.dumps(result, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
