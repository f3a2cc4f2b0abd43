"""The Ray-free part of ``scripts/gpu_check.sh``: Learner steps, generation and metrics on one device.

Needs only torch (and numpy/PyYAML): no Ray, no MLflow, no torch-fidelity, no dataset files. Images are
random uint8 images of each config's dataset shape — the figures below are costs and sanity checks
(finite losses, fp32 iterates, compilation working), not accuracies of a trained model.

    python scripts/gpu_check.py --out DIR [--smoke-steps 300] [--cifar-steps 100] [--device auto]

Writes ``DIR/gpu_check.json``: per shape the ms/step (median over the timed steps, after the first
steps that compile), first/last loss, whether every loss was finite and whether compilation fell back;
per generation mode its time and the output's dtype and range; the evaluation metrics' values and
times. Prints one line per check.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rjem_ray.config import load_config  # noqa: E402
from rjem_ray.core.data import dataset_info, to_model_space  # noqa: E402
from rjem_ray.core.devices import resolve_device  # noqa: E402
from rjem_ray.method.gmm import fit_class_gmm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic(cfg, n: int):
    info = dataset_info(cfg.data.name)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, info.channels, info.size, info.size), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % info.num_classes
    sel = torch.randperm(n, generator=g)[: 100 * info.num_classes]
    gmm = fit_class_gmm(to_model_space(x[sel]), y[sel], info.num_classes, max_bytes=cfg.buffer.gmm_max_mb * 2**20)
    return x, y, gmm


def learner_steps(name: str, config: str, steps: int, device, overrides: list[str]) -> tuple[dict, object, object]:
    from rjem_ray.method.learner import Learner

    cfg = load_config(REPO / config, overrides)
    x, y, gmm = synthetic(cfg, max(1000, cfg.buffer.size))
    learner = Learner(cfg, x, y, gmm, device=device)
    say(f"{name}: {config} WRN-{cfg.model.depth}-{cfg.model.widen}, batch {cfg.train.batch_size}, "
        f"precision {learner.net.precision}, compile {learner.net.compiled}, channels_last {learner.net.channels_last}, "
        f"fused {learner.fused}; {steps} steps")
    losses, times = [], []
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for i in range(steps):
            sync(device)
            t = time.perf_counter()
            losses.append(learner.step()["loss"])
            sync(device)
            times.append(time.perf_counter() - t)
            if i == 0:
                say(f"{name}: first step (compilation included) {times[0]:.1f} s, loss {losses[0]:.4f}")
    fallback = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    timed = times[min(3, len(times) - 1):]
    out = {
        "config": config, "overrides": overrides, "steps": steps, "batch": cfg.train.batch_size,
        "precision": learner.net.precision, "compiled": learner.net.compiled, "channels_last": learner.net.channels_last,
        "fused": learner.fused, "first_step_s": times[0], "ms_per_step_median": 1e3 * statistics.median(timed),
        "wall_s": time.perf_counter() - t0, "loss_first": losses[0], "loss_last": losses[-1],
        "all_finite": all(math.isfinite(v) for v in losses), "compile_fallback": fallback,
        "params_fp32": all(p.dtype == torch.float32 for p in learner.model.parameters()),
        "buffer_fp32": learner.buffer.state_dict()["buffer"].dtype == torch.float32,
    }
    say(f"{name}: {out['ms_per_step_median']:.1f} ms/step (median after 3), loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
        f"finite {out['all_finite']}" + (f"; COMPILE FELL BACK: {fallback[0]}" if fallback else ""))
    return out, learner, gmm


def generation(learner, gmm, device) -> dict:
    from rjem_ray.evaluation.generate import generate

    out = {}
    for mode in ("energy", "pgd", "combined"):
        sync(device)
        t = time.perf_counter()
        x, y = generate(learner.model, gmm, learner.cfg.generate, mode=mode, n=32, device=device,
                        precision=learner.net.precision, generator=torch.Generator().manual_seed(0))
        sync(device)
        out[mode] = {"s": time.perf_counter() - t, "dtype": str(x.dtype), "min": float(x.min()), "max": float(x.max()),
                     "finite": bool(torch.isfinite(x).all()), "n": len(x)}
        say(f"generation {mode}: {out[mode]['s']:.2f} s for 32 images, {x.dtype}, range [{out[mode]['min']:.2f}, "
            f"{out[mode]['max']:.2f}], finite {out[mode]['finite']}")
    return out


def metrics(learner, device) -> dict:
    from rjem_ray.evaluation.metrics import accuracy, energy_scores, expected_calibration_error, ood_auroc, predict_logits, robust_accuracy
    from rjem_ray.method.speed import FastNet

    cfg = learner.cfg
    info = dataset_info(cfg.data.name)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(256, info.channels, info.size, info.size, generator=g).to(device) * 2 - 1
    y = (torch.arange(256) % info.num_classes).to(device)
    net = FastNet(learner.model, precision=learner.net.precision, device=device).eval()
    out = {}
    t = time.perf_counter()
    out["accuracy"] = accuracy(net, x, y, 128)
    out["ece"] = expected_calibration_error(predict_logits(net, x, 128).softmax(1).cpu(), y.cpu(), 20)
    out["pgd_robust_accuracy"] = robust_accuracy(net, x, y, eps=0.1, steps=10, step_size=0.025, norm="linf",
                                                 restarts=1, batch_size=128, generator=torch.Generator().manual_seed(0))
    s_in = energy_scores(net, x, 128).cpu()
    s_out = energy_scores(net, (torch.rand_like(x) * 2 - 1), 128).cpu()
    out["ood_auroc"] = ood_auroc(s_in, s_out)
    sync(device)
    out["s"] = time.perf_counter() - t
    say("metrics (random images, untrained-scale model: values are sanity checks only): "
        + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke-steps", type=int, default=300)
    p.add_argument("--cifar-steps", type=int, default=100)
    p.add_argument("--cifar-config", default="tune_configs/cifar10.yaml")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compile", default="true")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    figures: dict = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "ray_imported": "ray" in sys.modules, "mlflow_imported": "mlflow" in sys.modules,
    }
    speed = [f"train.precision={args.precision}", f"train.compile={args.compile}", "train.channels_last=auto"]
    path = out_dir / "gpu_check.json"
    ok = True
    for name, config, steps, extra in (
        ("smoke", "tune_configs/smoke.yaml", args.smoke_steps, ["train.steps=100000"]),
        ("cifar10", args.cifar_config, args.cifar_steps, []),
    ):
        try:
            res, learner, gmm = learner_steps(name, config, steps, device, speed + extra)
            figures[f"learner_{name}"] = res
            ok &= res["all_finite"] and not res["compile_fallback"] and res["params_fp32"] and res["buffer_fp32"]
            figures[f"generation_{name}"] = generation(learner, gmm, device)
            figures[f"metrics_{name}"] = metrics(learner, device)
            ok &= all(g["finite"] and g["dtype"] == "torch.float32" for g in figures[f"generation_{name}"].values())
        except Exception as exc:  # record and go on: the other checks still tell something
            ok = False
            figures[f"error_{name}"] = f"{type(exc).__name__}: {exc}"
            say(f"{name}: FAILED {type(exc).__name__}: {exc}")
        finally:
            path.write_text(json.dumps(figures, indent=2))
        if device.type == "cuda":
            figures[f"max_memory_gib_{name}"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.empty_cache()
    figures["ray_imported"], figures["mlflow_imported"] = "ray" in sys.modules, "mlflow" in sys.modules
    figures["ok"] = bool(ok)
    path.write_text(json.dumps(figures, indent=2))
    say(f"wrote {path}; {'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
