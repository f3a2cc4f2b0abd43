"""``rjem tune``: the command line of the sweep runner (registered by ``rjem_ray/cli.py``)."""

from __future__ import annotations

import sys

from .runner import run_sweep
from .sweep import load_sweep


def cmd_tune(args) -> int:
    sweep = load_sweep(args.config, args.set)
    outcome = run_sweep(sweep, args.out, resume=args.resume)
    print(f"[rjem] trials: {outcome.trials_csv}" + (f", summary: {outcome.summary_plot}" if outcome.summary_plot else ""))
    if outcome.parent_run_id:
        print(f"[rjem] MLflow parent run id: {outcome.parent_run_id}")
    if outcome.interrupted:
        return 130
    if outcome.best is None:
        print(f"rjem tune: every trial failed; reasons in {outcome.trials_csv}", file=sys.stderr)
        return 1
    print(f"[rjem] best config: {outcome.best_config}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``rjem tune`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "tune", help="Ray Tune sweep minimising FID or KID (scope sample: inference knobs of a checkpoint; "
                     "scope train: training knobs, ASHA), tracked as one MLflow parent run")
    p.add_argument("config", help="sweep YAML, e.g. tune_configs/tune-smoke-sample.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a sweep or experiment key, e.g. --set tune.num_samples=8 (repeatable)")
    p.add_argument("--out", help="sweep directory (default runs/tune/NAME)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --out")
    p.set_defaults(func=cmd_tune)
