"""What a sweep leaves behind: its trials ranked, ``trials.csv``, ``summary.png``, ``best.yaml`` and the table.

Ranking: finished trials first, then those ASHA stopped early, interrupted ones, failed ones last (their
metric is the worst value: ``inf`` when minimising); within a status, by the objective in its mode.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..config import dump_config
from ..core import storage
from ..distributed.train_driver import root_message, storage_root
from ..evaluation.generation_metrics import fid_extractor_for
from .sweep import FIGURES, Sweep, plain

# Ray is imported inside the functions that call it (marked `# lazy: Ray, see top`): rjem_ray/cli.py's parser
# imports the tune package (`rjem --help`), and `import ray.tune` takes ~1.2 s; it loads when a sweep runs.


def _trial_statuses(exp_path: Path) -> dict[str, str]:
    """Tune's own status of each trial (TERMINATED, ERROR, RUNNING, ...), read from its experiment state."""
    from ray.tune import ExperimentAnalysis  # lazy: Ray, see top

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(str(exp_path)).trials}
    except Exception:
        return {}


def rank_trials(sweep: Sweep, out: Path, results) -> tuple[list[dict], bool]:
    """One row per started trial of Tune's ``results``, ranked and numbered; and whether the sweep is
    unfinished (trials missing or interrupted)."""
    statuses = _trial_statuses(storage.join(storage_root(sweep.cfg, out), sweep.name))
    rows = []
    for res in results:
        if not res.path:  # created but never started (an interrupted sweep): counted as missing below
            continue
        trial_id = Path(res.path).name.removeprefix("trial_")
        m = res.metrics or {}
        row: dict = {"trial_id": trial_id}
        row.update({p.key: plain(res.config.get(p.key)) for p in sweep.params})
        tune_status = statuses.get(trial_id, "TERMINATED" if m else "UNKNOWN")
        error = ""
        if res.error is not None:
            status, error = "failed", root_message(res.error)
        elif m.get("failed"):
            status, error = "failed", str(m.get("error", ""))
        elif tune_status not in ("TERMINATED", "ERROR") or sweep.metric not in m:
            status = "interrupted"
        elif sweep.scope == "train" and int(m.get("step", 0)) < sweep.cfg.train.steps:
            status = "stopped"  # by ASHA
        else:
            status = "finished"
        value = m.get(sweep.metric)
        row["status"] = status
        row[sweep.metric] = sweep.worst if status == "failed" or value is None else float(value)
        for k in FIGURES:
            if k not in row and k in m and not m.get("failed"):
                row[k] = float(m[k])
        if sweep.scope == "train":
            row["step"] = int(m.get("step", 0)) if m and not m.get("failed") else ""
        row["error"] = error
        rows.append(row)
    interrupted = (len(rows) < sweep.num_trials()) or any(r["status"] == "interrupted" for r in rows)
    order = {"finished": 0, "stopped": 1, "interrupted": 2, "failed": 3}
    sign = 1 if sweep.mode == "min" else -1
    rows.sort(key=lambda r: (order[r["status"]], sign * r[sweep.metric] if r["status"] != "interrupted" else 0))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows, interrupted


def _columns(sweep: Sweep, rows: list[dict]) -> list[str]:
    cols = ["rank", "trial_id", "status", sweep.metric]
    cols += [k for k in FIGURES if k != sweep.metric and any(k in r for r in rows)]
    cols[4:4] = [k for k in ("fid", "kid") if k not in cols]  # always both: one protocol, two estimates
    if sweep.scope == "train":
        cols.append("step")
    return cols + [p.key for p in sweep.params] + ["error", "run_id", "fid_extractor", "fid_samples", "fid_reference"]


def write_trials_csv(sweep: Sweep, rows: list[dict], path: Path) -> Path:
    """One row per trial: rank, status, the metric (inf for failed trials), the other figures, the
    parameters, the failure reason and the FID/KID protocol."""
    cols = _columns(sweep, rows)
    extra = {"fid_extractor": fid_extractor_for(sweep.cfg), "fid_samples": sweep.cfg.eval.fid_samples,
             "fid_reference": f"{sweep.cfg.data.name} train split"}
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**extra, **{c: r.get(c, "") for c in cols if c in r}})
    return path


def plot_summary(sweep: Sweep, rows: list[dict], path: Path) -> Path | None:
    """The metric against each searched parameter, one panel each; failed trials drawn as red crosses
    above the finite values, the best trial as a star."""
    import matplotlib  # lazy: matplotlib (~0.5 s), only for this plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg") above

    metric = sweep.metric
    finite = [r[metric] for r in rows if r["status"] in ("finished", "stopped") and math.isfinite(r[metric])]
    top = max(finite) if finite else 1.0
    low = min(finite) if finite else 0.0
    fail_y = top + 0.1 * (top - low if top > low else abs(top) or 1.0)
    n = len(sweep.params)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, sweep.params):
        cats = [str(v) for v in p.values] if p.kind in ("grid", "choice") else None  # evenly spaced, labelled
        for r in rows:
            v = r.get(p.key)
            if r["status"] == "interrupted" or v is None or v == "":
                continue
            x = cats.index(str(v)) if cats else v
            if r["status"] == "failed":
                ax.scatter([x], [fail_y], marker="x", color="tab:red", zorder=3)
            else:
                star = r["rank"] == 1 and r["status"] == "finished"
                ax.scatter([x], [r[metric]], marker="*" if star else "o", s=140 if star else 30,
                           color="tab:orange" if star else ("tab:blue" if r["status"] == "finished" else "tab:gray"),
                           zorder=3)
        if cats:
            ax.set_xticks(range(len(cats)), cats, rotation=20)
        if p.log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(f"{p.key}  [{p.kind}]")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{sweep.name}: {metric} ({sweep.mode}imised); FID/KID: {fid_extractor_for(sweep.cfg)} features, "
                 f"{sweep.cfg.eval.fid_samples} samples vs {sweep.cfg.data.name} train\n"
                 "red x = failed, grey = stopped early by ASHA, star = best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_best_config(sweep: Sweep, best: dict, path: Path) -> Path:
    """A complete experiment config with the best trial's values (``rjem train`` / ``rjem sample --config``)."""
    cfg = sweep.cfg.replace({p.key: best[p.key] for p in sweep.params}, name=f"{sweep.name}-best")
    dump_config(cfg, path)
    values = ", ".join(f"{p.key}={best[p.key]}" for p in sweep.params)
    if sweep.scope == "sample":
        use = f"rjem sample {sweep.checkpoint} --config {path}"
    else:
        use = f"rjem train {path}   (the trial's own checkpoint: {path.parent / 'trials' / best['trial_id'] / 'checkpoint'})"
    head = (f"# Best trial {best['trial_id']} of sweep {sweep.name} (scope {sweep.scope}): {sweep.metric} "
            f"{best[sweep.metric]:.6g} ({sweep.mode}imised)\n# Searched values: {values}\n# Use: {use}\n")
    path.write_text(head + path.read_text())
    return path


def print_ranking(sweep: Sweep, rows: list[dict], say=print) -> None:
    cols = ["rank", "trial_id", "status", sweep.metric] + [
        k for k in ("fid", "kid", "inception_score", "accuracy", "robust_accuracy", "pgd_robust_accuracy")
        if k != sweep.metric and any(k in r for r in rows)]
    keys = [p.key for p in sweep.params]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [cols + keys] + [[fmt(r.get(c, "")) for c in cols + keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    say(f"[rjem] trials ranked by {sweep.metric} ({sweep.mode}):")
    for row in table:
        say("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for r in rows:
        if r["status"] == "failed":
            say(f"  trial {r['trial_id']} failed: {r['error']}")


