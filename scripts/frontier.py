"""The density frontier: one row per trained model of one or more study outputs, knobs beside targets.

    .venv/bin/python scripts/frontier.py /tmp/ex/*/ > frontier.md

Reads each ``OUT/results.json`` of ``scripts/study.py`` and prints a markdown table: the run's overrides
(the knobs: its mode and the overrides it ran with, beyond demo.yaml), clean accuracy, AutoAttack accuracy, OOD AUROC per shift under the logsumexp score (and the
worst), energy-mode FID beside its seeds', energy-mode recall beside the seeds', training seconds, and
whether the run meets issue 21's targets (worst OOD ≥ 0.95, AutoAttack ≥ 0.70, clean ≥ 0.97, FID ≤ 20).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

TARGETS = {"ood_auroc": 0.95, "robust_accuracy": 0.70, "accuracy": 0.97, "fid": 20.0}


def knobs(command: str) -> str:
    """The ``--set`` overrides of a study command, ``key=value`` joined by spaces (``defaults`` when none);
    for results written before runs recorded their own overrides."""
    words = shlex.split(command)
    sets = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]
    return " ".join(sets) or "defaults (tune_configs/demo.yaml)"


def rows(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            continue
        data = json.loads(f.read_text())
        for r in data["runs"]:
            e, g = r["eval"], r["generation"].get("energy", {})
            ood = {k: v["logsumexp"] for k, v in e.get("ood", {}).items()}
            own = [o for o in r.get("overrides", []) if not o.startswith(("train.mode=", "train.seed=", "attack.eps="))]
            row = {"knobs": f"{r['mode']}: " + (" ".join(own) if "overrides" in r else knobs(data["meta"]["command"])),
                   "seed": r["seed"], "accuracy": e.get("accuracy"),
                   "robust_accuracy": e.get("robust_accuracy"), "ood": ood, "ood_auroc": e.get("ood_auroc"),
                   "fid": g.get("fid"), "fid_seeds": g.get("fid_seeds"), "recall": g.get("recall"),
                   "recall_seeds": g.get("recall_seeds"), "train_s": r["train_s"], "source": str(f)}
            row["meets"] = all(row[k] is not None and (row[k] <= t if k == "fid" else row[k] >= t)
                               for k, t in TARGETS.items())
            out.append(row)
    return out


def _f(v, d=3):
    return "—" if v is None else f"{v:.{d}f}"


def markdown(table: list[dict]) -> str:
    shifts = list(dict.fromkeys(s for r in table for s in r["ood"]))
    head = ("| knobs | seed | clean | AutoAttack | " + " | ".join(f"OOD {s}" for s in shifts)
            + " | FID energy (seeds) | recall (seeds) | train s | all targets |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        lines.append(f"| `{r['knobs']}` | {r['seed']} | {_f(r['accuracy'])} | {_f(r['robust_accuracy'])} | "
                     + " | ".join(_f(r["ood"].get(s)) for s in shifts)
                     + f" | {_f(r['fid'], 1)} ({_f(r['fid_seeds'], 1)}) | {_f(r['recall'])} ({_f(r['recall_seeds'])}) | "
                     f"{r['train_s']:.0f} | {'**yes**' if r['meets'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outs", nargs="+", type=Path, help="study output directories (or their results.json)")
    a = p.parse_args(argv)
    print(markdown(rows(a.outs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
