"""The weak-scaling study: does training on N workers at equal images seen keep the method?

For each worker count and seed it runs ``rjem train`` on a config (default ``tune_configs/demo.yaml``, the
digits demo) with ``trainer.num_workers=N`` under ``trainer.scaling=weak`` — every run sees the same number
of training images: N workers take 1/N of the optimiser steps on an N-times larger batch, at the rule's
learning rate — then ``rjem eval`` on its checkpoint (clean accuracy, AutoAttack as the demo config sets it,
energy-mode FID beside the seeds-only FID, same protocol as ``make demo``). Workers use one CPU and one torch
thread each (``trainer.cpus_per_worker``); on a 2-core box two workers share the cores. Writes
``OUT/study.json`` and prints a Markdown table.

    python scripts/scaling_study.py --workers 1 2 --seeds 0 1 --out runs/scaling-study
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tune_configs/demo.yaml")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--metrics", default="accuracy,autoattack,fid")
    p.add_argument("--out", default="runs/scaling-study")
    p.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    args = p.parse_args(argv)
    rjem = str(Path(sys.executable).with_name("rjem"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.workers:
        for seed in args.seeds:
            run_dir = out / f"w{n}-s{seed}"
            sets = [f"trainer.num_workers={n}", "trainer.scaling=weak", f"train.seed={seed}",
                    "tracking.experiment=rjem-scaling-study"] + args.set
            cmd = [rjem, "train", args.config, "--out", str(run_dir), "--fresh"] + [x for s in sets for x in ("--set", s)]
            t0 = time.time()
            print("+ " + " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            train_s = time.time() - t0
            metrics = run_dir / "eval.json"
            subprocess.run([rjem, "eval", str(run_dir / "checkpoint"), "--metrics", args.metrics, "--json",
                            str(metrics)], check=True)
            m = json.loads(metrics.read_text())
            state = json.loads((run_dir / "metrics.json").read_text())["train"]
            row = {"workers": n, "seed": seed, "train_s": round(train_s, 1), "reference_steps": state["steps"],
                   "accuracy": m.get("accuracy"), "autoattack": m.get("robust_accuracy"), "fid": m.get("fid"),
                   "fid_seeds": m.get("fid_seeds")}
            results.append(row)
            (out / "study.json").write_text(json.dumps({"config": args.config, "overrides": args.set,
                                                        "runs": results}, indent=2))
            print(json.dumps(row), flush=True)
    print("| workers | seed | global batch | clean | AutoAttack | energy FID | seeds FID | train min |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['seed']} | {64 * r['workers']} | {r['accuracy']:.3f} | {r['autoattack']:.3f} | "
              f"{r['fid']:.1f} | {r['fid_seeds']:.1f} | {r['train_s'] / 60:.1f} |")
    for n in args.workers:
        rows = [r for r in results if r["workers"] == n]
        if len(rows) > 1:
            print(f"workers {n}: AutoAttack {statistics.mean(r['autoattack'] for r in rows):.3f} "
                  f"(range {min(r['autoattack'] for r in rows):.3f}-{max(r['autoattack'] for r in rows):.3f}), "
                  f"FID {statistics.mean(r['fid'] for r in rows):.1f} "
                  f"(range {min(r['fid'] for r in rows):.1f}-{max(r['fid'] for r in rows):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
