"""``rjem tune``: Ray Tune sweeps with FID or KID as the objective, one MLflow parent run per sweep.

One idea per file:

* ``sweep.py`` — the sweep file (``scope``, ``base``/``checkpoint``, ``search``, ``tune``): loading,
  validation, the search algorithm and the scheduler.
* ``scoring.py`` — the FID/KID/IS protocol and the preparation done once per sweep.
* ``trials.py`` — one trial of each scope (scope train: ``train_driver.run_training``, as ``rjem train``).
* ``runs.py`` — the MLflow parent run and the ``SweepRuns`` Tune callback (a child run per trial).
* ``report.py`` — ranking, ``trials.csv``, ``summary.png``, ``best.yaml``, the printed table.
* ``runner.py`` — ``run_sweep`` (start or ``--resume``) and ``finalize``.
* ``cli.py`` — ``rjem tune``.

Failures stay local: a trial that raises (a diverged run, non-finite samples, a bad value) reports
``metric = inf`` (``-inf`` when maximising) with ``failed = 1`` and its reason, its MLflow run ends
FAILED with the reason in the tag ``rjem.error``, and the sweep goes on. Nothing here imports Ray at
import time (the CLI's parser imports this package).
"""

from .cli import add_parser, cmd_tune
from .runner import SweepOutcome, finalize, run_sweep
from .sweep import METRIC_MODES, Sweep, TuneSettings, load_sweep

__all__ = ["METRIC_MODES", "Sweep", "SweepOutcome", "TuneSettings", "add_parser", "cmd_tune", "finalize",
           "load_sweep", "run_sweep"]
