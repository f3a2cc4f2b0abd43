"""The paper's comparison at small scale: four training modes, one budget, one evaluation protocol.

    .venv/bin/python scripts/study.py --out runs/study                 # the full study (docs/RESULTS.md)
    .venv/bin/python scripts/study.py --tiny --out /tmp/study-tiny     # minutes: what the tests run

Trains ``classifier``, ``robust-classifier``, ``jempp`` and ``robust-jem`` from one base config
(``tune_configs/demo.yaml``: the same network, optimiser, data, step budget and sampler for all),
robust-jem also at several training ε, each with several seeds. Every model is then evaluated with one
protocol (``rjem_ray.evaluation.evaluate.evaluate_model``): clean accuracy, AutoAttack robust accuracy at the
*same* evaluation ε for every model, PGD accuracy, ECE, OOD AUROC, and FID/KID/IS of each generation mode
(``energy``, ``pgd``, ``combined``) beside the Gaussian-mixture seeds alone, in both feature spaces
(the plain and the adversarially trained reference classifier).

Training is Ray-free (``learner.Learner`` + ``loop.run_loop``): the study runs on one machine, ``--jobs``
runs at a time, each on one torch thread. Writes ``OUT/results.json`` (every figure and protocol),
``OUT/RESULTS.md`` (the tables with mean ± std over seeds, the claims of the paper checked, the
protocol, the command and the wall times) and ``OUT/grids/<run>-<mode>.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

MODES = ("classifier", "robust-classifier", "jempp", "robust-jem")
GEN_MODES = ("energy", "pgd", "combined")


def run_name(mode: str, eps: float | None, seed: int) -> str:
    return f"{mode}" + (f"-eps{eps:g}" if eps is not None else "") + f"-s{seed}"


def plan(modes, eps_list, seeds, base_eps: float) -> list[dict]:
    """One entry per model: robust-jem at every ε of ``eps_list``, robust-classifier at ``base_eps``."""
    runs = []
    for mode in modes:
        eps_values = eps_list if mode == "robust-jem" else ([base_eps] if mode == "robust-classifier" else [None])
        for eps in eps_values:
            for seed in seeds:
                runs.append({"mode": mode, "eps": eps, "seed": seed, "name": run_name(mode, eps, seed)})
    return runs


def train_and_evaluate(job: dict) -> dict:
    """Train one model Ray-free, save its checkpoint, evaluate it; runs in a worker process."""
    import torch

    torch.set_num_threads(1)
    from rjem_ray.method.checkpoint import save_checkpoint
    from rjem_ray.config import load_config
    from rjem_ray.core.data import load_split
    from rjem_ray.evaluation.evaluate import evaluate_model
    from rjem_ray.method.prior import load_train_gmm
    from rjem_ray.method.learner import DivergenceError, Learner
    from rjem_ray.method.loop import run_loop

    out = Path(job["out"])
    overrides = list(job["overrides"]) + [f"train.mode={job['mode']}", f"train.seed={job['seed']}"]
    if job["eps"] is not None:
        overrides.append(f"attack.eps={job['eps']}")
    cfg = load_config(job["config"], overrides)
    images, labels = load_split(cfg.data.name, "train", cfg.data.data_dir)
    gmm = load_train_gmm(cfg, images, labels)  # every mode generates from the same prior
    learner = Learner(cfg, images, labels, gmm if cfg.uses_energy else None)
    last: dict = {}
    lines: list[str] = []

    def report(metrics, state):
        if state is not None:
            last["state"] = state

    t0 = time.time()
    diverged = None
    try:
        run_loop(learner, report, log=lines.append)
    except DivergenceError as exc:
        diverged = str(exc)
    train_s = time.time() - t0
    ckpt = out / "checkpoints" / job["name"]
    if "state" in last:
        save_checkpoint(ckpt, last["state"], gmm.state_dict())
    result = {**{k: job[k] for k in ("name", "mode", "eps", "seed")}, "train_s": round(train_s, 1),
              "rollbacks": learner.rollbacks, "diverged": diverged, "steps": learner.step_count,
              "checkpoint": str(ckpt), "overrides": overrides}
    model = learner.model.eval()
    t1 = time.time()
    base = evaluate_model(model, cfg, job["metrics"], gmm=gmm, seed=job["eval_seed"])
    result["eval"] = base
    result["generation"] = {}
    from torchvision.utils import save_image

    from rjem_ray.evaluation.generate import generate

    grids = out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    for gen_mode in job["gen_modes"]:
        gcfg = cfg.override([f"generate.mode={gen_mode}"])
        result["generation"][gen_mode] = evaluate_model(model, gcfg, ["fid", "is"], gmm=gmm, seed=job["eval_seed"])
        x, _ = generate(model, gmm, gcfg.generate, n=80, generator=torch.Generator().manual_seed(1))
        save_image((x + 1) / 2, grids / f"{job['name']}-{gen_mode}.png", nrow=10)
    result["eval_s"] = round(time.time() - t1, 1)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{job['name']}.json").write_text(json.dumps(result, indent=1, default=str))
    return result


# ------------------------------------------------------------------------------------------ summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def _fmt(values: list[float], digits: int = 3) -> str:
    m, sd = _mean_std(values)
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def group_key(r: dict) -> str:
    return r["mode"] + (f" (ε {r['eps']:g} = {r['eps'] / 2:g} on [0, 1])" if r["eps"] is not None else "")


def summarise(results: list[dict]) -> dict:
    """Per model group (mode, ε): lists over seeds of every headline figure."""
    groups: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: (MODES.index(r["mode"]), r["eps"] or 0, r["seed"])):
        g = groups.setdefault(group_key(r), {"mode": r["mode"], "eps": r["eps"], "seeds": [], "rows": {}})
        g["seeds"].append(r["seed"])
        e = r["eval"]

        def put(key, value):
            g["rows"].setdefault(key, []).append(value)

        for key in ("accuracy", "robust_accuracy", "pgd_robust_accuracy", "ece", "ood_auroc"):
            put(key, e.get(key))
        put("rollbacks", r["rollbacks"])
        put("diverged", 1.0 if r["diverged"] else 0.0)
        put("train_s", r["train_s"])
        for shift, by_score in e.get("ood", {}).items():
            for score, value in by_score.items():
                put(f"ood.{shift}.{score}", value)
        for gm, ge in r["generation"].items():
            for key in ("fid", "kid", "inception_score", "fid_2", "kid_2", "precision", "recall"):
                put(f"{gm}.{key}", ge.get(key))
            for key in ("fid_seeds", "fid_2_seeds", "kid_seeds", "kid_2_seeds", "precision_seeds", "recall_seeds"):
                put(f"seeds.{key.replace('_seeds', '')}", ge.get(key))
    return groups


def check_claims(groups: dict) -> list[dict]:
    """The paper's claims, each compared seed-for-seed between Robust JEM (per ε) and JEM++.

    A claim *holds* at an ε when the comparison goes the paper's way for every seed, *does not hold*
    when it goes the other way for every seed, and is *mixed* otherwise.
    """
    jempp = next((g for g in groups.values() if g["mode"] == "jempp"), None)
    rjems = [g for g in groups.values() if g["mode"] == "robust-jem"]
    claims = []
    if jempp is None or not rjems:
        return claims
    specs = [
        ("Robust JEM-Energy FID < JEM++ FID (plain reference features)", "energy.fid", "jempp:energy.fid", "lt"),
        ("Robust JEM-Energy FID < JEM++ FID (robust reference features)", "energy.fid_2", "jempp:energy.fid_2", "lt"),
        ("Robust JEM (combined) IS > JEM++ IS", "combined.inception_score", "jempp:energy.inception_score", "gt"),
        ("Robust JEM-Energy recall ≥ JEM++'s (diversity)", "energy.recall", "jempp:energy.recall", "ge"),
        ("Robustness ≫ JEM++ (AutoAttack accuracy, +0.2 or more)", "robust_accuracy", "jempp:robust_accuracy", "gt+0.2"),
        ("Training stability (no more rollbacks or divergences than JEM++)", "rollbacks", "jempp:rollbacks", "le"),
    ]
    for text, ours, theirs, op in specs:
        for g in rjems:
            a = g["rows"].get(ours, [])
            b = jempp["rows"].get(theirs.split(":", 1)[1], [])
            pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
            if not pairs:
                verdict = "not measured"
            else:
                ok = [
                    (x < y) if op == "lt" else (x > y) if op == "gt" else (x >= y + 0.2) if op == "gt+0.2" else (x >= y) if op == "ge" else (x <= y)
                    for x, y in pairs
                ]
                verdict = "holds" if all(ok) else "does not hold" if not any(ok) else "mixed"
            claims.append({"claim": text, "eps": g["eps"], "verdict": verdict,
                           "robust_jem": _fmt([p[0] for p in pairs], 3), "jempp": _fmt([p[1] for p in pairs], 3)})
    return claims


def write_markdown(path: Path, groups: dict, claims: list[dict], meta: dict) -> None:
    lines = ["# Study: the paper's comparison at small scale", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; wall time {meta['wall_min']:.1f} min "
             f"({meta['jobs']} runs at a time, one torch thread each, on {meta['machine']})"
             + (f"; taken from an earlier run of the same protocol, not timed here: {', '.join(meta['reused'])}."
                if meta.get("reused") else "."), "",
             "## Protocol", "", *[f"- {line}" for line in meta["protocol"]], "",
             "## Classification and robustness (mean ± std over seeds)", "",
             "| model | seeds | clean acc | AutoAttack acc | PGD acc | ECE | OOD AUROC | rollbacks | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, g in groups.items():
        r = g["rows"]
        lines.append(f"| {name} | {len(g['seeds'])} | {_fmt(r['accuracy'])} | {_fmt(r['robust_accuracy'])} | "
                     f"{_fmt(r['pgd_robust_accuracy'])} | {_fmt(r['ece'])} | {_fmt(r['ood_auroc'])} | "
                     f"{_fmt(r['rollbacks'], 1)} | {_fmt(r['train_s'], 0)} |")
    lines += ["", "## Generation (FID ↓ / KID ↓ in the plain and the robust reference classifier's features, IS ↑)", "",
              "| model | mode | FID (plain) | FID (robust) | KID (robust) | IS | precision | recall |",
              "|---|---|---|---|---|---|---|---|"]
    first = next(iter(groups.values()), None)
    if first is not None and "seeds.fid" in first["rows"]:
        r = first["rows"]
        lines.append(f"| Gaussian-mixture seeds alone (no model) | — | {_fmt(r['seeds.fid'], 1)} | "
                     f"{_fmt(r['seeds.fid_2'], 1)} | {_fmt(r['seeds.kid_2'], 4)} | — | "
                     f"{_fmt(r.get('seeds.precision', []))} | {_fmt(r.get('seeds.recall', []))} |")
    for name, g in groups.items():
        r = g["rows"]
        for gm in GEN_MODES:
            if f"{gm}.fid" not in r:
                continue
            lines.append(f"| {name} | {gm} | {_fmt(r[f'{gm}.fid'], 1)} | {_fmt(r.get(f'{gm}.fid_2', []), 1)} | "
                         f"{_fmt(r.get(f'{gm}.kid_2', []), 4)} | {_fmt(r[f'{gm}.inception_score'], 2)} | "
                         f"{_fmt(r.get(f'{gm}.precision', []))} | {_fmt(r.get(f'{gm}.recall', []))} |")
    shifts = list(dict.fromkeys(k.split(".")[1] for g in groups.values() for k in g["rows"] if k.startswith("ood.")))
    if shifts:
        scores = list(dict.fromkeys(k.split(".")[2] for g in groups.values() for k in g["rows"] if k.startswith("ood.")))
        lines += ["", "## OOD detection: AUROC of the test split against each shift (score: " + " / ".join(scores) + ")",
                  "", "| model | " + " | ".join(shifts) + " |", "|---|" + "---|" * len(shifts)]
        for name, g in groups.items():
            r = g["rows"]
            lines.append(f"| {name} | " + " | ".join(
                " / ".join(_fmt(r.get(f"ood.{sh}.{sc}", []), 3) for sc in scores) for sh in shifts) + " |")
    lines += ["", "## The paper's claims, checked here", "", "| claim | robust-jem ε | Robust JEM | JEM++ | verdict |",
              "|---|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c['claim']} | {c['eps']:g} | {c['robust_jem']} | {c['jempp']} | **{c['verdict']}** |")
    lines += ["", "Grids: `grids/<run>-<mode>.png` (rows: classes 0–9 cycled, 8 rows of 10)."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tune_configs/demo.yaml", help="the base config every model shares")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--eps", default="0.2,0.4,0.6", help="robust-jem training ε list, [-1, 1] units")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (separate processes when > 1)")
    p.add_argument("--set", action="append", default=[], help="overrides for every run (key.sub=value)")
    p.add_argument("--mode-set", action="append", default=[], metavar="MODE:KEY=VALUE",
                   help="an override for one training mode's runs, after --set (e.g. a baseline at its tuned "
                        "settings: jempp:train.energy_weight=1.0)")
    p.add_argument("--reuse", action="store_true",
                   help="take a run whose OUT/runs/<name>.json exists from that file instead of training it again "
                        "(adds seeds to an earlier study; the protocol must be the same)")
    p.add_argument("--gen-modes", default=",".join(GEN_MODES),
                   help="generation modes whose FID/IS/precision/recall each model gets (default: all three)")
    p.add_argument("--tiny", action="store_true",
                   help="a few steps of tiny models and small evaluation sets (for tests)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(a.set)
    if a.tiny:
        overrides = [
            "train.steps=6", "train.batch_size=16", "train.log_every=2", "train.checkpoint_every=3",
            "model.widen=1", "buffer.size=64", "attack.steps=2", "sampler.steps=2", "sampler.inner_steps=2",
            "attack.eps_warmup_steps=2",
            "generate.pgd_steps=3", "generate.sampler.steps=2", "generate.sampler.inner_steps=2",
            "eval.robust_steps=3", "eval.robust_max_samples=24", "eval.autoattack_version=custom",
            "eval.autoattack_attacks=[apgd-ce]", "eval.autoattack_max_samples=24", "eval.fid_samples=40",
        ] + overrides
    from rjem_ray.config import load_config
    from rjem_ray.evaluation.ood import shifts_for

    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: {m!r} is not a training mode; choose from {', '.join(MODES)}")
    gen_modes = [m for m in a.gen_modes.split(",") if m]
    for m in gen_modes:
        if m not in GEN_MODES:
            p.error(f"--gen-modes: {m!r} is not a generation mode; choose from {', '.join(GEN_MODES)}")
    eps_list = [float(e) for e in a.eps.split(",") if e]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    cfg = load_config(a.config, overrides)  # validated once, at the edge
    per_mode: dict[str, list[str]] = {}
    for item in a.mode_set:
        mode, sep, kv = item.partition(":")
        if not sep or mode not in MODES or "=" not in kv:
            p.error(f"--mode-set {item!r}: expected MODE:key=value with MODE one of {', '.join(MODES)}")
        per_mode.setdefault(mode, []).append(kv)
    for mode, extra in per_mode.items():
        load_config(a.config, overrides + extra + [f"train.mode={mode}"])  # each mode's config validated here too
    metrics = ["accuracy", "autoattack", "robust", "ece", "ood"]
    jobs = [{**r, "out": str(out), "config": a.config, "overrides": overrides + per_mode.get(r["mode"], []),
             "metrics": metrics,
             "gen_modes": gen_modes, "eval_seed": 0} for r in plan(modes, eps_list, seeds, cfg.attack.eps)]
    results, reused = [], []
    if a.reuse:
        for job in list(jobs):
            done = out / "runs" / f"{job['name']}.json"
            if done.is_file():
                results.append(json.loads(done.read_text()))
                reused.append(job["name"])
                jobs.remove(job)
    print(f"[study] {len(jobs)} runs to train, {a.jobs} at a time -> {out}"
          + (f"; reused from {out / 'runs'}: {', '.join(reused)}" if reused else ""), flush=True)
    t0 = time.time()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import multiprocessing as mp

    pool = None
    if a.jobs > 1:  # one process per run keeps each on its own torch thread; --jobs 1 runs in this process
        pool = ProcessPoolExecutor(max_workers=a.jobs, mp_context=mp.get_context("spawn"))
    with pool if pool is not None else contextlib.nullcontext():
        for r in (pool.map(train_and_evaluate, jobs) if pool is not None else map(train_and_evaluate, jobs)):
            e = r["eval"]
            print(f"[study] {r['name']}: acc {e.get('accuracy', float('nan')):.3f} AutoAttack "
                  f"{e.get('robust_accuracy', float('nan')):.3f} train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s",
                  flush=True)
            results.append(r)
    wall = (time.time() - t0) / 60
    groups = summarise(results)
    claims = check_claims(groups)
    e = cfg.eval
    protocol = [
        f"base config `{a.config}` with `{' '.join(overrides) or '(no overrides)'}`; every model: {cfg.train.steps} "
        f"steps of batch {cfg.train.batch_size}, WRN-{cfg.model.depth}-{cfg.model.widen}, {cfg.optim.name} lr {cfg.optim.lr}"
        + "".join(f"; {mode} also `{' '.join(extra)}`" for mode, extra in per_mode.items()),
        f"test split of {cfg.data.name}; AutoAttack ({e.autoattack_version}"
        + (f": {', '.join(e.autoattack_attacks)}" if e.autoattack_version == "custom" else "")
        + f") and PGD-{e.robust_steps} at L∞ ε = {e.robust_eps} in [-1, 1] = {e.robust_eps / 2} on [0, 1] for every model, "
        f"up to {e.autoattack_max_samples} / {e.robust_max_samples} images",
        f"FID/KID/IS: {e.fid_samples} class-cycled samples per mode against the {cfg.data.name} training split, in the "
        "plain reference classifier's features (`fid`) and the adversarially trained one's (`fid_2`); the seeds row "
        "is the Gaussian-mixture draws the modes start from, with no model",
        f"generation: pgd {cfg.generate.pgd_norm} ε {cfg.generate.pgd_eps}, {cfg.generate.pgd_steps} steps; contrast κ {cfg.generate.contrast} "
        f"about the {cfg.generate.contrast_center}; sampler {cfg.generate.sampler.kind} {cfg.generate.sampler.steps}×"
        f"{cfg.generate.sampler.inner_steps} lr {cfg.generate.sampler.step_size}",
        f"ECE {e.ece_bins} bins; OOD AUROC (sklearn roc_auc_score) of the test split against each of "
        f"{', '.join(shifts_for(cfg.data.name, e.ood_shifts))} ({e.ood_samples} images each), scores "
        f"{', '.join(e.ood_scores)}; `ood_auroc` is the worst shift under logsumexp f(x) = −E(x)",
    ]
    meta = {"command": "python scripts/study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"), "wall_min": wall, "jobs": a.jobs,
            "machine": f"{os.cpu_count()} CPU cores", "protocol": protocol, "reused": reused}
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": results, "claims": claims}, indent=1,
                                                 default=str))
    write_markdown(out / "RESULTS.md", groups, claims, meta)
    print(f"[study] wrote {out / 'RESULTS.md'} in {wall:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
