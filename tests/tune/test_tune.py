"""`rjem tune` on mnist5k with the reference-classifier FID.

Sweeps (slow): a sample-scope sweep of 4 trials and a train-scope sweep of 3 trials (ASHA, one trial
forced to diverge), each checked through MLflow's API (parent/child runs, FID on every finished child,
the best trial's tag, the summary artifacts); best.yaml driving `rjem sample`; a sweep interrupted after
its first trial and resumed. Fast: what `load_sweep` refuses before Ray starts.
"""

from __future__ import annotations

import csv
import math
import os
import signal
from pathlib import Path

import pytest
import yaml
from ray.tune import Callback

from rjem_ray.config import Config, ConfigError, load_config
from rjem_ray.tune import load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "tune_configs"
SAMPLE_KEYS = ("generate.mode", "generate.contrast", "generate.sampler.step_size", "generate.sampler.steps",
               "generate.pgd_eps")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, ray_session, cache_dir) -> Path:
    """A tiny robust-jem checkpoint (tune_configs/smoke.yaml) for the sample-scope sweeps."""
    from rjem_ray.distributed.train_driver import run_training

    out = tmp_path_factory.mktemp("tune-ckpt")
    cfg = load_config(CONFIGS / "smoke.yaml", [f"cache_dir={cache_dir}", "tracking.enabled=false"])
    return run_training(cfg, out / "run", samples=False).checkpoint


def _store(tmp_path: Path, cache_dir: str) -> list[str]:
    # tracking.enabled: a sample sweep inherits the checkpoint's config, whose tracking the fixture turned off
    return [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/art",
            "tracking.enabled=true", f"cache_dir={cache_dir}"]


def _client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


def _children(client, parent_run_id: str) -> dict:
    """Child runs of the sweep's parent run, keyed by trial id."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags["rjem.trial_id"]: r for r in runs}


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def _csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------------------- sample scope


@pytest.mark.slow
def test_sample_sweep_tracks_trials_and_its_best_yaml_drives_rjem_sample(checkpoint, tmp_path, cache_dir, monkeypatch):
    sweep = load_sweep(CONFIGS / "tune-smoke-sample.yaml", _store(tmp_path, cache_dir) + [f"checkpoint={checkpoint}"])
    outcome = run_sweep(sweep, tmp_path / "sweep")

    rows = outcome.rows
    assert not outcome.interrupted and len(rows) == 4  # grid of 2 modes x num_samples 2
    assert [r["status"] for r in rows] == ["finished"] * 4
    fids = [r["fid"] for r in rows]
    assert all(math.isfinite(f) and f > 0 for f in fids) and fids == sorted(fids)  # ranked, best first
    assert sorted(r["generate.mode"] for r in rows) == ["combined", "combined", "energy", "energy"]
    for r in rows:  # each drawn value inside its distribution
        assert 0.5 <= r["generate.contrast"] <= 0.9 and 0.05 <= r["generate.sampler.step_size"] <= 0.5
        assert r["generate.sampler.steps"] in (1, 2, 3, 4) and r["generate.pgd_eps"] in (0.3, 0.5)

    client = _client(tmp_path)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["rjem.sweep"] == "true"
    assert parent.data.tags["rjem.fid.extractor"] == "reference-classifier"
    assert parent.data.tags["rjem.fid.num_samples"] == "50"
    assert parent.data.tags["rjem.fid.reference"] == "mnist5k train split (4500 images)"
    assert {"summary/trials.csv", "summary/summary.png"} <= _artifacts(client, parent.info.run_id, "summary")
    assert "best.yaml" in _artifacts(client, parent.info.run_id)

    children = _children(client, outcome.parent_run_id)
    assert set(children) == {r["trial_id"] for r in rows}
    for r in rows:
        child = children[r["trial_id"]]
        assert child.info.status == "FINISHED"
        assert child.data.metrics["fid"] == pytest.approx(r["fid"])
        # measured once per sweep: robust_accuracy by AutoAttack, pgd_robust_accuracy by PGD
        assert {"inception_score", "accuracy", "robust_accuracy", "pgd_robust_accuracy"} <= set(child.data.metrics)
        assert child.data.metrics["kid"] == pytest.approx(r["kid"])  # both estimates of the same samples
        assert child.data.params["generate.mode"] == r["generate.mode"]
        assert child.data.tags["rjem.fid.extractor"] == "reference-classifier"
        assert "samples/samples.png" in _artifacts(client, child.info.run_id, "samples")
    best = rows[0]
    tagged = [t for t, c in children.items() if c.data.tags.get("rjem.best") == "true"]
    assert tagged == [best["trial_id"]]
    assert parent.data.tags["rjem.best_run_id"] == children[best["trial_id"]].info.run_id
    assert parent.data.metrics["best_fid"] == pytest.approx(best["fid"])

    table = _csv(outcome.trials_csv)
    assert [t["trial_id"] for t in table] == [r["trial_id"] for r in rows]
    assert {"status", "fid", "kid", *SAMPLE_KEYS} <= set(table[0])

    # best.yaml is a full experiment config holding the best knobs ...
    tuned = load_config(outcome.best_config)
    assert tuned.generate.mode == best["generate.mode"]
    assert tuned.generate.contrast == pytest.approx(best["generate.contrast"])
    assert tuned.generate.sampler.steps == best["generate.sampler.steps"]
    # ... and `rjem sample CKPT --config best.yaml` generates with exactly those knobs.
    import rjem_ray.evaluation.generate
    from rjem_ray.cli import main

    seen = []
    real = rjem_ray.evaluation.generate.generate

    def spy(model, gmm, gen, **kw):
        seen.append(gen)
        return real(model, gmm, gen, **kw)

    monkeypatch.setattr(rjem_ray.evaluation.generate, "generate", spy)
    png = tmp_path / "best.png"
    assert main(["sample", str(checkpoint), "--config", str(outcome.best_config), "--n", "6", "--out", str(png)]) == 0
    assert png.is_file() and len(seen) == 1
    assert seen[0].mode == best["generate.mode"] and seen[0].pgd_eps == best["generate.pgd_eps"]
    assert seen[0].sampler.step_size == pytest.approx(best["generate.sampler.step_size"])
    assert seen[0].sampler.steps == best["generate.sampler.steps"] and seen[0].n == 6

    # The sweep's FID is the one `rjem eval` reports for best.yaml's knobs (same protocol, same seed).
    from rjem_ray.evaluation.evaluate import evaluate_checkpoint
    from rjem_ray.tracking.tracker import flatten

    sets = [f"generate.{k}={v}" for k, v in flatten(tuned.to_dict()["generate"]).items()]
    sets += [f"eval.fid_samples={tuned.eval.fid_samples}", f"eval.fid_extractor={tuned.eval.fid_extractor}",
             f"cache_dir={cache_dir}"]
    assert evaluate_checkpoint(checkpoint, ["fid"], sets)["fid"] == pytest.approx(best["fid"], rel=1e-4)


# ----------------------------------------------------------------------------------------------- train scope


@pytest.mark.slow
def test_train_sweep_reports_fid_over_time_and_keeps_a_diverged_trial_local(ray_session, tmp_path, cache_dir,
                                                                             monkeypatch):
    # optim.lr = 1e30 makes the loss explode at once; it rolls back train.max_rollbacks times, then fails.
    # The store is the shipped configs' relative sqlite:///mlflow.db, from the directory rjem tune starts in: the
    # trials (which Tune runs in directories of their own) must log into that same store.
    monkeypatch.chdir(tmp_path)
    sets = _store(tmp_path, cache_dir)[2:] + ["tracking.tracking_uri=sqlite:///mlflow.db",
                                              "tracking.artifact_location=art",
                                              "search.optim.lr.grid=[0.001, 0.003, 1.0e+30]",
                                          "tune.max_concurrent=3", "tune.trial_cpus=0.25",
                                          "tune.register_as=smoke-best"]
    sweep = load_sweep(CONFIGS / "tune-smoke-train.yaml", sets)
    assert sweep.scheduler == "asha" and sweep.num_trials() == 3
    outcome = run_sweep(sweep, tmp_path / "sweep")

    rows = outcome.rows
    assert not outcome.interrupted and len(rows) == 3
    failed = [r for r in rows if r["status"] == "failed"]
    done = [r for r in rows if r["status"] in ("finished", "stopped")]
    assert len(failed) == 1 and failed[0]["optim.lr"] == 1e30 and failed[0]["fid"] == math.inf
    assert "diverged" in failed[0]["error"]
    assert len(done) == 2 and all(math.isfinite(r["fid"]) for r in done) and rows[-1] is failed[0]
    assert outcome.best is rows[0] and rows[0]["status"] == "finished" and rows[0]["step"] == 6

    client = _client(tmp_path)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["rjem.scheduler"] == "asha"
    assert parent.data.metrics["num_failed"] == 1
    assert {"summary/trials.csv", "summary/summary.png"} <= _artifacts(client, parent.info.run_id, "summary")
    children = _children(client, outcome.parent_run_id)
    assert set(children) == {r["trial_id"] for r in rows}
    bad = children[failed[0]["trial_id"]]
    assert bad.info.status == "FAILED" and "diverged" in bad.data.tags["rjem.error"]
    # Each trial is `rjem train`'s run_training logging into its child run: no other run was made.
    everything = client.search_runs([parent.info.experiment_id])
    assert sorted(r.info.run_id for r in everything) == sorted([parent.info.run_id, *(c.info.run_id for c in
                                                                                         children.values())])
    for r in done:
        child = children[r["trial_id"]]
        trial_dir = outcome.out_dir / "trials" / r["trial_id"]
        # run_training's own tags and artifacts, in the trial's directory under the sweep's --out
        assert child.data.tags["rjem.mode"] == sweep.cfg.train.mode and child.data.tags["ray.job_id"]
        assert "config.yaml" in _artifacts(client, child.info.run_id)
        assert list((trial_dir / "ray" / "train").glob("checkpoint-*")) and (trial_dir / "config.yaml").is_file()
        assert load_config(trial_dir / "config.yaml").optim.lr == r["optim.lr"]
        assert child.info.status == "FINISHED" and child.data.tags["rjem.trial_status"] == r["status"]
        history = client.get_metric_history(child.info.run_id, "fid")  # FID over time, every eval_every steps
        assert sorted(m.step for m in history) == ([3, 6] if r["status"] == "finished" else [3])
        assert child.data.metrics["fid"] == pytest.approx(r["fid"])
        # train.eval_metrics has `robust` (PGD, the cheap training-time signal), not `autoattack`
        assert {"inception_score", "accuracy", "pgd_robust_accuracy", "train/loss"} <= set(child.data.metrics)
        assert "robust_accuracy" not in child.data.metrics
        assert "samples/samples.png" in _artifacts(client, child.info.run_id, "samples")
        assert "kid" in child.data.metrics  # FID's evaluation reports KID beside it
    assert "checkpoint/state.pt" in _artifacts(client, children[rows[0]["trial_id"]].info.run_id, "checkpoint")
    assert [t for t, c in children.items() if c.data.tags.get("rjem.best") == "true"] == [rows[0]["trial_id"]]

    table = {t["trial_id"]: t for t in _csv(outcome.trials_csv)}
    assert table[failed[0]["trial_id"]]["status"] == "failed" and table[failed[0]["trial_id"]]["fid"] == "inf"
    # best.yaml is what `rjem train` accepts, with the winning values; the trial's checkpoint is kept.
    tuned = load_config(outcome.best_config)
    assert tuned.optim.lr == rows[0]["optim.lr"] and tuned.attack.eps == pytest.approx(rows[0]["attack.eps"])
    ckpt = outcome.out_dir / "trials" / rows[0]["trial_id"] / "checkpoint"
    assert (ckpt / "state.pt").is_file()
    # tune.register_as: the best trial's model is version 1 of smoke-best, with that checkpoint's logits
    (version,) = client.search_model_versions("name = 'smoke-best'")
    assert version.run_id == rows[0]["run_id"] == children[rows[0]["trial_id"]].info.run_id
    import torch

    from rjem_ray.method.restore import load_model
    from rjem_ray.tracking.models import resolve_checkpoint

    x = torch.rand(3, 1, 28, 28) * 2 - 1
    registered = load_model(resolve_checkpoint("models:/smoke-best/1", f"sqlite:///{tmp_path}/mlflow.db"))[0]
    assert torch.allclose(registered(x), load_model(ckpt)[0](x))


# ----------------------------------------------------------------------------------------------- resume


class InterruptAfterFirstTrial(Callback):
    """Presses Ctrl-C once the first trial has completed (Tune then saves its state and returns).

    Tune restores a resumed sweep's callbacks with their saved state: this one stays spent.
    """

    def __init__(self):
        self.sent = False

    def get_state(self):
        return {"sent": self.sent}

    def set_state(self, state):
        self.sent = state["sent"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(checkpoint, tmp_path, cache_dir, capsys):
    from rjem_ray.cli import main

    spec = {
        "scope": "sample", "checkpoint": str(checkpoint), "name": "resume-test",
        "eval": {"fid_samples": 50, "fid_extractor": "reference-classifier"},
        "generate": {"mode": "combined", "pgd_steps": 3, "pgd_step_size": 0.1,
                     "sampler": {"kind": "pyld", "steps": 2, "inner_steps": 2, "step_size": 0.2}},
        "search": {"generate.contrast": {"grid": [0.5, 0.7, 0.9]}},
        "tune": {"max_concurrent": 1, "metric": "kid"},  # KID, the small-sample objective, ranks this sweep
    }
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(spec))
    sets = _store(tmp_path, cache_dir)
    out = tmp_path / "sweep"
    first = run_sweep(load_sweep(path, sets), out, callbacks=[InterruptAfterFirstTrial()])
    assert first.interrupted and first.best is None and not (out / "best.yaml").exists()
    done_first = [r for r in first.rows if r["status"] == "finished"]
    assert len(done_first) == 1
    client = _client(tmp_path)
    assert client.get_run(first.parent_run_id).info.status == "RUNNING"

    with pytest.raises(ConfigError, match="already holds a sweep; pass --resume"):
        run_sweep(load_sweep(path, sets), out)
    with pytest.raises(ConfigError, match="different configuration"):
        run_sweep(load_sweep(path, sets + ["eval.fid_samples=60"]), out, resume=True)

    argv = ["tune", str(path), "--out", str(out), "--resume"]
    for s in sets:
        argv += ["--set", s]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"MLflow parent run id: {first.parent_run_id}" in printed and "best config:" in printed

    table = _csv(out / "trials.csv")
    assert sorted(t["generate.contrast"] for t in table) == ["0.5", "0.7", "0.9"]
    assert [t["status"] for t in table] == ["finished"] * 3
    kids = [float(t["kid"]) for t in table]
    assert kids == sorted(kids) and all(math.isfinite(float(t["fid"])) for t in table)  # ranked by KID, FID beside
    assert (out / "best.yaml").is_file()
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["num_finished"] == 3
    assert parent.data.tags["rjem.metric"] == "kid" and parent.data.metrics["best_kid"] == pytest.approx(kids[0])
    children = _children(client, first.parent_run_id)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children.values())
    # The trial finished before the interruption was not run again: one FID, logged once.
    assert len(client.get_metric_history(children[done_first[0]["trial_id"]].info.run_id, "fid")) == 1


# ----------------------------------------------------------------------------------------------- optuna


def _optuna_spec(checkpoint, **tune) -> dict:
    return {
        "scope": "sample", "checkpoint": str(checkpoint), "name": "optuna-test",
        "eval": {"fid_samples": 50, "fid_extractor": "reference-classifier"},
        "generate": {"mode": "combined", "contrast": 0.7, "pgd_steps": 3, "pgd_step_size": 0.1,
                     "sampler": {"kind": "pyld", "steps": 2, "inner_steps": 2, "step_size": 0.2}},
        "search": {"generate.mode": {"choice": ["energy", "combined"]},
                   "generate.contrast": {"uniform": [0.5, 0.9]},
                   "generate.sampler.step_size": {"loguniform": [0.05, 0.5]},
                   "generate.sampler.steps": {"randint": [1, 4]}},
        "tune": {"search": "optuna", "num_samples": 4, "max_concurrent": 2, "seed": 0, **tune},
    }


BASELINE = {"generate.mode": "combined", "generate.contrast": 0.7, "generate.sampler.step_size": 0.2,
            "generate.sampler.steps": 2}


@pytest.mark.slow
def test_optuna_sweep_runs_the_base_config_first_and_feeds_tpe_every_result(checkpoint, tmp_path, cache_dir,
                                                                             monkeypatch):
    from ray.tune.search.optuna import OptunaSearch

    # The searcher lives in this (driver) process: record what Optuna suggests, in order, and what it is told.
    suggested, told = [], []
    real_suggest, real_complete = OptunaSearch.suggest, OptunaSearch.on_trial_complete

    def suggest(self, trial_id):
        config = real_suggest(self, trial_id)
        if isinstance(config, dict):
            suggested.append((trial_id, config))
        return config

    def on_trial_complete(self, trial_id, result=None, error=False):
        told.append((trial_id, None if result is None else result.get("fid")))
        return real_complete(self, trial_id, result, error)

    monkeypatch.setattr(OptunaSearch, "suggest", suggest)
    monkeypatch.setattr(OptunaSearch, "on_trial_complete", on_trial_complete)
    path = tmp_path / "optuna.yaml"
    path.write_text(yaml.safe_dump(_optuna_spec(checkpoint)))
    sweep = load_sweep(path, [f"cache_dir={cache_dir}", "tracking.enabled=false"])
    assert sweep.num_trials() == 4
    outcome = run_sweep(sweep, tmp_path / "sweep")

    rows = outcome.rows
    assert len(rows) == 4 and [r["status"] for r in rows] == ["finished"] * 4
    assert all(math.isfinite(r["fid"]) for r in rows)
    assert len(suggested) == 4 and suggested[0][1] == BASELINE  # Optuna's first suggestion: the base config
    by_id = {r["trial_id"]: r for r in rows}
    first, rest = by_id[suggested[0][0]], [by_id[t] for t, _ in suggested[1:]]
    assert {k: first[k] for k in BASELINE} == pytest.approx(BASELINE)  # and that trial ran with it
    for r in rest:  # drawn by TPE inside the domains (continuous draws never repeat the baseline)
        assert r["generate.mode"] in ("energy", "combined") and 0.5 <= r["generate.contrast"] <= 0.9
        assert 0.05 <= r["generate.sampler.step_size"] <= 0.5 and r["generate.sampler.steps"] in (1, 2, 3, 4)
        assert r["generate.contrast"] != BASELINE["generate.contrast"]
    assert sorted(t for t, _ in told) == sorted(r["trial_id"] for r in rows)
    assert sorted(f for _, f in told) == pytest.approx(sorted(r["fid"] for r in rows))
    assert load_config(outcome.best_config).generate.mode == rows[0]["generate.mode"]


def test_optuna_search_algorithm_gets_the_baseline_and_the_seed(fake_checkpoint, tmp_path):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from rjem_ray.tune.sweep import search_algorithm

    path = tmp_path / "optuna.yaml"
    path.write_text(yaml.safe_dump(_optuna_spec(fake_checkpoint, seed=5, max_concurrent=3)))
    alg = search_algorithm(load_sweep(path))
    assert isinstance(alg, ConcurrencyLimiter) and alg.max_concurrent == 3
    assert isinstance(alg.searcher, OptunaSearch)
    assert alg.searcher._points_to_evaluate == [BASELINE] and alg.searcher._seed == 5
    spec = _optuna_spec(fake_checkpoint)
    spec["tune"]["search"] = "random"
    path.write_text(yaml.safe_dump(spec))
    assert not isinstance(search_algorithm(load_sweep(path)), ConcurrencyLimiter)


@pytest.mark.parametrize("sets, message", [
    (["tune.search=bayes"], "tune.search: 'bayes' is not allowed; choose one of random, optuna"),
    (["search.generate.sampler.steps.randint=[3, 4]"],
     "search.generate.sampler.steps: the base config's value 2 is outside randint(3, 4)"),
    (["generate.mode=pgd"], "search.generate.mode: the base config's value 'pgd' is outside choice(energy, combined)"),
])
def test_bad_optuna_sweeps_fail_before_ray_starts(fake_checkpoint, tmp_path, sets, message):
    path = tmp_path / "optuna.yaml"
    path.write_text(yaml.safe_dump(_optuna_spec(fake_checkpoint)))
    with pytest.raises(ConfigError) as err:
        load_sweep(path, sets)
    assert message in str(err.value)


def test_optuna_takes_no_grid_and_says_how_to_install_it(fake_checkpoint, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="search.generate.mode: tune.search optuna .* takes no grid"):
        load_sweep(CONFIGS / "tune-smoke-sample.yaml", [f"checkpoint={fake_checkpoint}", "tune.search=optuna"])
    import sys

    path = tmp_path / "optuna.yaml"
    path.write_text(yaml.safe_dump(_optuna_spec(fake_checkpoint)))
    load_sweep(path)
    monkeypatch.setitem(sys.modules, "optuna", None)  # what an install without the extra sees
    with pytest.raises(ConfigError, match=r"pip install 'rjem-ray\[optuna\]'"):
        load_sweep(path)


# ----------------------------------------------------------------------------------------------- validation


@pytest.fixture
def fake_checkpoint(tmp_path) -> Path:
    """A checkpoint file with an untrained smoke model: enough for load_sweep, no Ray."""
    from rjem_ray.method.checkpoint import save_checkpoint
    from rjem_ray.core.data import dataset_info
    from rjem_ray.method.models import build_model

    cfg = load_config(CONFIGS / "smoke.yaml")
    model = build_model(cfg.model, dataset_info(cfg.data.name))
    return save_checkpoint(tmp_path / "ckpt", {"model": model.state_dict(), "config": cfg.to_dict(), "step": 0})


def test_shipped_sweeps_load(fake_checkpoint):
    for name in ("tune-smoke-sample", "tune-cifar10-sample", "tune-demo-sample", "tune-demo-energy"):
        sweep = load_sweep(CONFIGS / f"{name}.yaml", [f"checkpoint={fake_checkpoint}"])
        assert sweep.scope == "sample" and sweep.metric == "fid" and sweep.mode == "min"
        assert all(p.key.startswith("generate.") for p in sweep.params)
    for name in ("tune-smoke-train", "tune-cifar10-train"):
        sweep = load_sweep(CONFIGS / f"{name}.yaml")
        assert sweep.scope == "train" and sweep.scheduler == "asha" and sweep.cfg.train.eval_every > 0
        assert "fid" in sweep.cfg.train.eval_metrics


def test_sample_scope_takes_the_checkpoint_config_and_overrides(fake_checkpoint):
    sweep = load_sweep(CONFIGS / "tune-smoke-sample.yaml", [f"checkpoint={fake_checkpoint}", "eval.fid_samples=77",
                                                            "search.generate.contrast.grid=[0.4, 0.6]"])
    assert sweep.cfg.model.depth == 10 and sweep.cfg.eval.fid_samples == 77  # model from the checkpoint
    contrast = next(p for p in sweep.params if p.key == "generate.contrast")
    assert contrast.kind == "grid" and contrast.values == (0.4, 0.6)  # --set replaced the file's uniform
    assert sweep.num_trials() == 2 * 2 * 2


@pytest.mark.parametrize("sets, message", [
    (["scope=both"], "scope: 'both' is not allowed"),
    (["checkpoint="], "scope sample needs the checkpoint"),
    (["base=smoke.yaml"], "takes its base config from the checkpoint"),
    (["model.depth=16"], "may override only"),
    (["search.optim.lr.grid=[0.1]"], "allowed keys start with generate."),
    (["search.eval.fid_samples.grid=[10]"], "allowed keys start with generate."),
    (["tune.metric=accuracy"], "scope sample scores generated images; choose one of fid, kid, inception_score"),
    (["tune.metric=kld"], "tune.metric: 'kld' is not allowed; choose one of fid, kid, "),
    (["tune.scheduler=asha"], "ASHA cannot stop anything"),
    (["tune.mode=lowest"], "tune.mode: 'lowest' is not allowed"),
    (["tune.num_samples=0"], "tune.num_samples: 0 is out of range"),
    (["tune.bogus=1"], "unknown key tune.bogus"),
    (["tune.register_as=best"], "tune.register_as: scope sample trains no model"),
    (["search.generate.contrast.grid=[0.5]", "search.generate.contrast.choice=[0.5]"],
     "search.generate.contrast: give one distribution, got grid, choice"),
])
def test_bad_sample_sweeps_fail_before_ray_starts(fake_checkpoint, sets, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(CONFIGS / "tune-smoke-sample.yaml", [f"checkpoint={fake_checkpoint}"] + sets)
    assert message in str(err.value)


@pytest.mark.parametrize("sets, message", [
    (["train.eval_every=0"], "train.eval_every: scope train reports fid every train.eval_every"),
    (["train.eval_metrics=[accuracy]"], "does not produce tune.metric 'fid'; add 'fid'"),
    (["tune.metric=ece"], "add 'ece'"),
    (["tune.metric=kid", "train.eval_metrics=[accuracy]"], "does not produce tune.metric 'kid'; add 'fid'"),
    (["search.train.steps.grid=[4, 6]"], "search.train.steps: must not be searched"),
    (["search.train.eval_every.grid=[2]"], "must not be searched"),
    (["checkpoint=/nowhere"], "only scope sample takes a checkpoint"),
    (["tune.grace_period=99"], "tune.grace_period: 99 must be in 1..train.steps (6)"),
    (["search.optim.lr.loguniform=[0, 1]"], "loguniform needs low > 0"),
    (["tune.register_as=a/b"], "tune.register_as: 'a/b' is not a registered-model name"),
    (["tune.register_as=best", "tracking.enabled=false"], "tune.register_as: registering a model needs tracking"),
    # declared on TuneSettings' fields: one key per message (Ray places no trial that asks for 0 CPUs)
    (["tune.trial_cpus=0"], "tune.trial_cpus: 0.0 is out of range; it must be > 0"),
    (["tune.trial_gpus=-1"], "tune.trial_gpus: -1.0 is out of range; it must be >= 0"),
    (["tune.max_failures=-1"], "tune.max_failures: -1 is out of range; it must be >= 0"),
    (["tune.reduction_factor=1"], "tune.reduction_factor: 1 is out of range; it must be >= 2"),
    (["tune.grace_period=0"], "tune.grace_period: 0 is out of range; it must be >= 1"),
    (["tune.search=grid"], "tune.search: 'grid' is not allowed; choose one of random, optuna"),
])
def test_bad_train_sweeps_fail_before_ray_starts(sets, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(CONFIGS / "tune-smoke-train.yaml", sets)
    assert message in str(err.value)


def test_train_scope_extends_its_base_and_defaults_the_mode():
    sweep = load_sweep(CONFIGS / "tune-smoke-train.yaml", ["tune.metric=accuracy"])
    base = load_config(CONFIGS / "smoke.yaml")
    assert sweep.cfg.model == base.model and sweep.cfg.train.eval_every == 3  # base + the sweep's overrides
    assert sweep.mode == "max" and sweep.worst == -math.inf  # accuracy is maximised; failures rank last
    assert isinstance(sweep.cfg, Config) and sweep.name == "tune-smoke-train"


def test_kid_is_an_objective_minimised_like_fid(fake_checkpoint):
    for path, sets in ((CONFIGS / "tune-smoke-sample.yaml", [f"checkpoint={fake_checkpoint}"]),
                       (CONFIGS / "tune-smoke-train.yaml", [])):
        sweep = load_sweep(path, sets + ["tune.metric=kid"])
        assert sweep.metric == "kid" and sweep.mode == "min" and sweep.worst == math.inf


def test_related_work_metrics_are_objectives_of_a_train_sweep():
    """E[BR] and a minimum-norm median are maximised and need their eval metric in train.eval_metrics."""
    for metric, needs in (("ebr", "ebr"), ("min_norm_median_proxlogbarrier_linf", "min-norm")):
        sweep = load_sweep(CONFIGS / "tune-smoke-train.yaml", [f"tune.metric={metric}", f"train.eval_metrics=[{needs}]"])
        assert sweep.mode == "max" and sweep.worst == -math.inf
        with pytest.raises(ConfigError, match=f"add '{needs}'"):
            load_sweep(CONFIGS / "tune-smoke-train.yaml", [f"tune.metric={metric}", "train.eval_metrics=[accuracy]"])


def test_a_resumed_sweep_takes_no_new_callbacks(fake_checkpoint, tmp_path):
    sweep = load_sweep(CONFIGS / "tune-smoke-sample.yaml", [f"checkpoint={fake_checkpoint}"])
    with pytest.raises(ValueError, match="callbacks of its first start"):
        run_sweep(sweep, tmp_path / "sweep", resume=True, callbacks=[InterruptAfterFirstTrial()])
