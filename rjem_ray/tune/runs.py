"""The sweep's MLflow runs: one parent run per sweep, one child run per trial (``mlflow.parentRunId``).

The driver creates the parent run (:func:`parent_run`) and, through the Tune callback ``SweepRuns``, one child
run per trial: the trial's config as params, FID / KID / IS / accuracy / robust accuracy at their step, the
sample grid, the status. A train-scope trial's ``run_training`` logs its ``train/*`` step metrics, config,
metrics.json and checkpoint into the same child run; the callback opens and closes it. At the end
(``runner.finalize``) the best child is tagged ``rjem.best`` and the parent gets ``summary/trials.csv`` and
``summary/summary.png``. Every value carries its FID protocol (extractor, sample count, reference set) as tags.
Tracking trouble in the callback is printed, never raised: it must not stop the sweep.
"""

from __future__ import annotations

import functools
import importlib
import json
import time
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from ..distributed.train_driver import root_message
from ..tracking.stores import StoreError, masked, resolve_artifact_location, resolve_tracking_uri
from ..tracking.tracker import RUN_FILE, Tracker, git_commit, runs_of
from .sweep import FIGURES, Sweep, trial_params


def tracking_info(cfg: Config) -> dict | None:
    """The sweep's MLflow store (URI, experiment, artifact location), or None with tracking off."""
    t = cfg.tracking
    if not t.enabled:
        return None
    uri = resolve_tracking_uri(t.tracking_uri)
    return {"uri": uri, "experiment": t.experiment,
            "artifact_location": resolve_artifact_location(t.artifact_location, tracking_uri=uri)}


def parent_run(sweep: Sweep, out: Path, state: dict, prepared: dict):
    """The sweep's MLflow parent run: created on the first start, reopened by ``--resume``."""
    info = tracking_info(sweep.cfg)
    if info is None:
        return None
    if state.get("parent_run_id"):
        parent = Tracker(info["uri"], state["parent_run_id"])
        try:
            parent.client.get_run(parent.run_id)
        except Exception:  # another store than the sweep's: never a second parent run somewhere else
            raise StoreError(f"--resume: the sweep's MLflow parent run {parent.run_id} is not in {masked(info['uri'])}; "
                             "resume with the tracking store the sweep started with") from None
        parent.client.update_run(parent.run_id, status="RUNNING")
        parent.set_tags({"rjem.resumed": time.strftime("%Y-%m-%d %H:%M:%S")})
        return parent
    proto = prepared["protocol"]
    parent = Tracker.create(
        info["uri"], info["experiment"], info["artifact_location"], run_name=sweep.name,
        tags={"rjem.sweep": "true", "rjem.scope": sweep.scope, "rjem.metric": sweep.metric, "rjem.mode": sweep.mode,
              "rjem.scheduler": sweep.scheduler, "rjem.sweep_dir": str(out),
              "rjem.checkpoint": str(sweep.checkpoint or ""), "rjem.dataset": sweep.cfg.data.name,
              "rjem.fid.protocol": json.dumps(proto, sort_keys=True)[:4900],
              "rjem.fid.extractor": proto["extractor"], "rjem.fid.num_samples": proto["num_samples"],
              "rjem.fid.reference": proto["reference_set"],
              "rjem.robust.protocol": json.dumps(prepared["robust_protocol"], sort_keys=True),
              "mlflow.source.git.commit": git_commit(Path(__file__).resolve().parent)},
    )
    parent.log_params({**{f"search.{p.key}": p.describe() for p in sweep.params},
                       **{f"tune.{k}": v for k, v in vars(sweep.settings).items()}})
    if prepared["checkpoint_metrics"]:
        parent.log_metrics(prepared["checkpoint_metrics"])
    return parent


def child_runs(tracking: dict, parent_run_id: str) -> dict[str, Any]:
    """The parent run's children, keyed by their ``rjem.trial_id``."""
    runs = runs_of(tracking["uri"], tracking["experiment"], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.data.tags.get("rjem.trial_id"): r for r in runs}


# This process's view of each sweep it runs, by parent run id. A resumed sweep's SweepRuns comes back from Tune's
# state with the first start's info; the store's address (a new head's MLflow server) and --out are this start's.
_ACTIVE: dict[str, dict] = {}


def activate(info: dict) -> None:
    """Make ``info`` the store, ``--out`` and settings of the sweep whose parent run is ``info["parent_run_id"]``."""
    _ACTIVE[info["parent_run_id"]] = info


@functools.cache
def _sweep_runs_class():
    """Built on first use, so that importing this module (for the CLI's parser) does not import Ray. The
    instance is pickled into Tune's state with the run config; a resumed sweep gets it back from there."""
    from ray.tune import Callback  # lazy: rjem_ray/cli.py's parser imports this module; Ray loads when a sweep runs

    class SweepRuns(Callback):
        """Driver side: one MLflow child run per trial under the sweep's parent run.

        ``on_trial_start`` creates the run (or reopens it when a resumed sweep reruns the trial), logs the
        trial's full config as params and writes its id into the trial directory; ``on_trial_result``
        logs the figures at their step (FID over time); ``on_trial_complete`` / ``on_trial_error`` log
        the sample grid and close the run, FAILED with the reason in ``rjem.error`` for a failed trial.
        Tracking trouble is printed, never raised: it must not stop the sweep. The run's id in the trial
        directory (``mlflow_run.json``, the file ``rjem train`` keeps in its OUT) is where a train-scope
        trial's ``run_training`` finds the run to log into.
        """

        def __init__(self, info: dict):
            self._saved_info = info
            self.runs: dict[str, str] | None = None

        @property
        def info(self) -> dict:
            # Looked up at call time: Tune's state holds this class by value (it is built in a function), with a
            # copy of the module globals it saw; the live registry is the module's.
            live = importlib.import_module("rjem_ray.tune.runs")

            return live._ACTIVE.get(self._saved_info["parent_run_id"], self._saved_info)

        def __getstate__(self):
            return {"_saved_info": self.info, "runs": None}

        def _tracker(self, run_id: str):
            return Tracker(self.info["uri"], run_id)

        def _known(self) -> dict[str, str]:
            if self.runs is None:
                self.runs = {k: r.info.run_id for k, r in child_runs(self.info, self.info["parent_run_id"]).items()}
            return self.runs

        def _safely(self, what: str, fn) -> None:
            try:
                fn()
            except Exception as exc:
                print(f"[rjem] MLflow: could not {what}: {exc}", flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._safely(f"open the run of trial {trial.trial_id}", lambda: self._start(trial))

        def _start(self, trial) -> None:
            i = self.info
            run_id = self._known().get(trial.trial_id)
            if run_id:
                self._tracker(run_id).client.update_run(run_id, status="RUNNING")
            else:
                proto = i["protocol"]
                child = Tracker.create(
                    i["uri"], i["experiment"], i["artifact_location"], run_name=f"{i['sweep']}-{trial.trial_id}",
                    parent_run_id=i["parent_run_id"],
                    tags={"rjem.trial_id": trial.trial_id, "rjem.scope": i["scope"],
                          "rjem.searched": ",".join(i["searched"]),
                          "rjem.fid.protocol": json.dumps(proto, sort_keys=True)[:4900],
                          "rjem.fid.extractor": proto["extractor"], "rjem.fid.num_samples": proto["num_samples"],
                          "rjem.fid.reference": proto["reference_set"],
                          "rjem.robust.protocol": json.dumps(i["robust_protocol"], sort_keys=True)},
                )
                run_id = self.runs[trial.trial_id] = child.run_id
                self._drop_copies(trial.trial_id, run_id)
                try:
                    params = Config.from_dict(i["cfg"]).replace(trial_params(trial.config)).to_dict()
                except ConfigError:  # the trial will fail on it and report why
                    params = trial_params(trial.config)
                child.log_params(params)
            d = Path(i["out_dir"]) / "trials" / trial.trial_id
            d.mkdir(parents=True, exist_ok=True)
            (d / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": i["uri"]}))

        def _drop_copies(self, trial_id: str, keep: str) -> None:
            """A server killed after storing a new run but before answering makes the client retry, and the run
            exists twice: delete every copy but the one the client got."""
            i = self.info
            found = runs_of(i["uri"], i["experiment"], f"tags.`mlflow.parentRunId` = '{i['parent_run_id']}' and "
                                                       f"tags.`rjem.trial_id` = '{trial_id}'")
            for run in found:
                if run.info.run_id != keep:
                    self._tracker(run.info.run_id).client.delete_run(run.info.run_id)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            run_id = self._known().get(trial.trial_id)
            if run_id is None or result.get("failed"):
                return
            figures = {k: result[k] for k in FIGURES if isinstance(result.get(k), (int, float))}
            self._safely(f"log the results of trial {trial.trial_id}",
                         lambda: self._log(run_id, figures, int(result.get("step", 0))))

        def _log(self, run_id: str, figures: dict, step: int) -> None:
            tracker, key = self._tracker(run_id), self.info["metric"]
            if key in figures and any(m.step == step for m in tracker.client.get_metric_history(run_id, key)):
                return  # a resumed trial reporting again an evaluation its run holds (its head was lost after it)
            tracker.log_metrics(figures, step=step)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._safely(f"close the run of trial {trial.trial_id}", lambda: self._complete(trial))

        def _complete(self, trial) -> None:
            i = self.info
            run_id = self._known().get(trial.trial_id)
            last = trial.last_result or {}
            if run_id is None or i["metric"] not in last:
                return
            child = self._tracker(run_id)
            if last.get("failed"):
                child.set_tags({"rjem.trial_status": "failed", "rjem.error": str(last.get("error", ""))[:4000]})
                child.finish("FAILED")
                return
            grid = Path(i["out_dir"]) / "trials" / trial.trial_id / "samples.png"
            if grid.is_file():
                child.log_artifact(grid, "samples")
            stopped = i["scope"] == "train" and int(last.get("step", 0)) < i["steps"]
            child.set_tags({"rjem.trial_status": "stopped" if stopped else "finished"})
            if not stopped:  # a stopped trial's grid is drawn by finalize(), which then closes the run
                child.finish()

        def on_trial_error(self, iteration, trials, trial, **info):
            def fail():
                run_id = self._known().get(trial.trial_id)
                if run_id:
                    child = self._tracker(run_id)
                    err = trial.get_error()
                    reason = root_message(err) if err is not None else "the trial process crashed"
                    child.set_tags({"rjem.trial_status": "failed", "rjem.error": reason[:4000]})
                    child.finish("FAILED")

            self._safely(f"close the run of trial {trial.trial_id}", fail)

    return SweepRuns


def sweep_runs(info: dict):
    """The ``SweepRuns`` Tune callback for the sweep described by ``info`` (store, parent run, protocol, ...)."""
    activate(info)
    return _sweep_runs_class()(info)
