"""The `rjem` command line end to end: a tiny train -> sample -> eval round trip, and its errors."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rjem_ray.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session, cache_dir):
    """One tiny `rjem train` run shared by the round-trip tests."""
    out = tmp_path_factory.mktemp("train")
    store = out / "mlflow.db"
    sets = [f"tracking.tracking_uri=sqlite:///{store}", f"tracking.artifact_location={out}/mlartifacts",
            f"cache_dir={cache_dir}", "tracking.experiment=cli-test"]
    argv = ["train", "tune_configs/smoke.yaml", "--out", str(out / "run")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return out / "run", f"sqlite:///{store}", sets


@pytest.mark.slow
def test_train_writes_checkpoint_samples_metrics_and_an_mlflow_run(trained, monkeypatch):
    run, uri, _ = trained
    assert (run / "checkpoint" / "state.pt").is_file() and (run / "checkpoint" / "gmm.pt").is_file()
    for mode in ("energy", "pgd", "combined"):
        img = Image.open(run / "samples" / f"{mode}.png")
        assert img.size[0] > 28 * 4 and img.size[1] > 28 * 4
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 6

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("cli-test")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("rjem.kind") != "eval"]
    assert len(runs) == 1  # exactly one MLflow run per training run (`rjem eval` runs are its children)
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.params["attack.eps"] == "0.6" and r.data.params["train.mode"] == "robust-jem"
    assert "train/loss" in r.data.metrics and "train/e_neg" in r.data.metrics
    history = client.get_metric_history(r.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [2, 3, 4, 6]
    assert r.data.tags["rjem.mode"] == "robust-jem" and "mlflow.source.git.commit" in r.data.tags
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"samples", "checkpoint", "metrics.json", "config.yaml"} <= artifacts
    # the MLflow model of the run (runs:/RUN_ID/model) holds the final checkpoint; the data is the run's input
    import mlflow
    import torch

    from rjem_ray.checkpoint import load_model

    model_uri = f"runs:/{r.info.run_id}/model"
    assert client.search_logged_models([exp.experiment_id])[0].source_run_id == r.info.run_id
    (dataset,) = r.inputs.dataset_inputs
    assert dataset.dataset.name == "mnist5k" and json.loads(dataset.dataset.profile)["features_shape"][1:] == [1, 28, 28]
    (output,) = r.outputs.model_outputs  # the model is the run's output at the final step
    assert output.step == 6
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # as a user points MLflow at the store; restored after the test
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    got = torch.from_numpy(mlflow.pyfunc.load_model(model_uri).predict(x.numpy()))
    assert torch.allclose(got, load_model(run / "checkpoint")[0](x).detach(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["energy", "pgd", "combined"])
def test_sample_each_mode(trained, tmp_path, mode, cache_dir):
    run, _, _ = trained
    out = tmp_path / f"{mode}.png"
    assert main(["sample", str(run / "checkpoint"), "--mode", mode, "--n", "6", "--class", "4", "--out", str(out),
                 "--set", "generate.pgd_steps=3", "--set", "generate.sampler.steps=2"]) == 0
    assert Image.open(out).size[0] > 28


@pytest.mark.slow
def test_sample_to_directory_writes_single_images(trained, tmp_path):
    run, _, _ = trained
    assert main(["sample", str(run / "checkpoint"), "--mode", "pgd", "--n", "3", "--out", str(tmp_path / "d"),
                 "--set", "generate.pgd_steps=2"]) == 0
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert names == ["00000_class0.png", "00001_class1.png", "00002_class2.png", "grid.png"]


@pytest.mark.slow
def test_eval_writes_every_metric_with_its_protocol(trained, tmp_path, cache_dir, capsys):
    run, _, _ = trained
    out = tmp_path / "metrics.json"
    assert main(["eval", str(run / "checkpoint"), "--json", str(out), "--set", f"cache_dir={cache_dir}",
                 "--metrics", "accuracy,robust,autoattack,masking,ece,fid,is,ood",
                 "--set", "eval.autoattack_max_samples=100",
                 "--set", "generate.pgd_steps=3", "--set", "generate.sampler.steps=2"]) == 0
    res = json.loads(out.read_text())
    for key in ("accuracy", "robust_accuracy", "pgd_robust_accuracy", "ece", "fid", "inception_score", "ood_auroc"):
        assert isinstance(res[key], float), key
    assert 0 <= res["accuracy"] <= 1 and 0 <= res["robust_accuracy"] <= res["accuracy"]
    assert 0 <= res["pgd_robust_accuracy"] <= res["accuracy"]
    p = res["protocol"]
    # robust_accuracy is AutoAttack's (standard version by default); PGD has its own key and protocol.
    aa = p["robust_accuracy"]
    assert aa["library"] == "pyautoattack" and aa["version"] == "standard"
    assert aa["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert [s["attack"] for s in aa["accuracy_after"]] == aa["attacks"]
    assert aa["accuracy_after"][-1]["accuracy"] == res["robust_accuracy"]
    assert aa["eps"] == 0.6 and aa["eps_01_scale"] == 0.3 and "[-1, 1]" in aa["eps_unit"]
    assert aa["num_samples"] == 100 and aa["subset"] == "100 drawn at random (seed 0)"
    pgd = p["pgd_robust_accuracy"]
    assert pgd["eps"] == 0.6 and pgd["eps_01_scale"] == 0.3
    assert pgd["steps"] == 5 and "[-1, 1]" in pgd["eps_unit"]
    m = res["masking"]
    assert m["autoattack_accuracy"] == res["robust_accuracy"] and m["num_samples"] == 100
    assert m["pgd_grid"][-1]["eps"] == 2.0 and isinstance(m["warnings"], list)
    printed = [line.removeprefix("[eval] masking warning: ") for line in capsys.readouterr().out.splitlines()
               if line.startswith("[eval] masking warning: ")]
    assert printed == m["warnings"]  # one line per warning
    assert p["ece"]["bins"] == 20
    assert p["fidelity"]["extractor"] == "reference-classifier" and p["fidelity"]["num_samples"] == 50


@pytest.mark.slow
def test_eval_logs_a_child_run_of_the_training_run_with_its_drawn_files(trained, tmp_path, cache_dir, capsys):
    """`rjem eval OUT/checkpoint` finds the training run (OUT/mlflow_run.json) and logs beside it: a child run
    with the figures as metrics, eval.json and the min-norm plot; the plot's local copy goes to OUT/eval-checkpoint
    (one folder per checkpoint), and a second checkpoint of the same folder does not overwrite it."""
    from mlflow.tracking import MlflowClient

    run, uri, _ = trained
    sets = ["--set", f"cache_dir={cache_dir}", "--set", "eval.min_norm_max_samples=4", "--set",
            "eval.min_norm_runs=[logbarrier-l2]", "--set", "eval.min_norm_outer_steps=2", "--set",
            "eval.min_norm_inner_steps=3", "--set", "eval.min_norm_reference=none"]
    assert main(["eval", str(run / "checkpoint"), "--metrics", "accuracy,ece,min-norm"] + sets) == 0
    training = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=uri)
    mine = f"tags.mlflow.parentRunId = '{training}' and params.metrics = 'accuracy,ece,min-norm'"
    (child,) = client.search_runs([client.get_run(training).info.experiment_id], filter_string=mine)
    assert f"MLflow run {child.info.run_id}" in capsys.readouterr().out
    assert child.info.status == "FINISHED" and child.info.run_name == "eval"
    assert child.data.tags["rjem.kind"] == "eval" and child.data.tags["rjem.checkpoint"] == str(run / "checkpoint")
    printed = json.loads(Path(client.download_artifacts(child.info.run_id, "eval.json", str(tmp_path))).read_text())
    assert child.data.metrics["accuracy"] == pytest.approx(printed["accuracy"])
    assert child.data.metrics["min_norm_median_logbarrier_l2"] == pytest.approx(printed["min_norm_median_logbarrier_l2"])
    assert child.data.params["metrics"] == "accuracy,ece,min-norm" and child.data.params["eval.min_norm_max_samples"] == "4"
    assert "protocol" in printed and printed["protocol"]["min_norm"]["num_samples"] == 4
    logged = {a.path for a in client.list_artifacts(child.info.run_id, "eval")}
    assert logged == {"eval/min_norm.png", "eval/min_norm_distances.csv"}
    local = run / "eval-checkpoint"
    assert sorted(p.name for p in local.iterdir()) == ["min_norm.png", "min_norm_distances.csv"]
    # a second checkpoint in the same folder draws into its own folder, and tracking can be switched off
    import shutil

    shutil.copytree(run / "checkpoint", run / "checkpoint-copy")
    before = (local / "min_norm_distances.csv").read_bytes()
    assert main(["eval", str(run / "checkpoint-copy"), "--metrics", "min-norm", "--set", "tracking.enabled=false"]
                + sets + ["--set", "eval.min_norm_max_samples=2"]) == 0
    assert (local / "min_norm_distances.csv").read_bytes() == before
    assert len((run / "eval-checkpoint-copy" / "min_norm_distances.csv").read_text().splitlines()) == 3
    assert len(client.search_runs([client.get_run(training).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{training}' and params.metrics = 'min-norm'")) == 0


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint_step(trained, tmp_path):
    run, _, sets = trained
    argv = ["train", "tune_configs/smoke.yaml", "--out", str(tmp_path / "more"), "--resume", str(run),
            "--set", "train.steps=8"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "more" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 8


@pytest.mark.slow
def test_divergence_exits_1_with_one_clear_line(tmp_path, ray_session, cache_dir, tracking_overrides, capsys):
    argv = ["train", "tune_configs/smoke.yaml", "--out", str(tmp_path / "run"),
            "--set", "train.divergence_threshold=1e-9", "--set", "train.max_rollbacks=0", "--set", f"cache_dir={cache_dir}"]
    for s in tracking_overrides:
        argv += ["--set", s]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rjem train: training failed: loss diverged at step 0")
    assert "stopped after 0 rollback(s)" in err and "no checkpoint was saved" in err


@pytest.mark.slow
def test_divergence_is_final_even_with_retries_left(tmp_path, ray_session, cache_dir, tracking_overrides, capsys):
    """trainer.max_failures=2 retries crashed workers; a divergence past its rollbacks is not retried."""
    from mlflow.tracking import MlflowClient

    argv = ["train", "tune_configs/smoke.yaml", "--out", str(tmp_path / "run"), "--set", "train.divergence_threshold=1e-9",
            "--set", "train.max_rollbacks=1", "--set", "trainer.max_failures=2", "--set", f"cache_dir={cache_dir}",
            "--set", "tracking.experiment=diverge"]
    for s in tracking_overrides:
        argv += ["--set", s]
    assert main(argv) == 1
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "mlflow" not in ln]  # its store creation
    assert len(err) == 1 and err[0].startswith("rjem train: training failed: loss diverged at step 0"), err
    assert "stopped after 1 rollback(s)" in err[0]
    client = MlflowClient(tracking_uri=tracking_overrides[0].split("=", 1)[1])
    [run] = client.search_runs([client.get_experiment_by_name("diverge").experiment_id])
    assert run.info.status == "FAILED" and "loss diverged" in run.data.tags["rjem.error"]
    # One attempt: its single rollback was logged once; every retry would have logged its own.
    assert len(client.get_metric_history(run.info.run_id, "train/rollback")) == 1
    assert "resumed_at_step" not in run.data.tags


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "tune_configs/smoke.yaml", "--set", "attack.eps=-0.1"], "attack.eps: -0.1 is out of range"),
        (["train", "tune_configs/smoke.yaml", "--set", "attack.steps=0"], "attack.steps: 0 is out of range"),
        (["train", "tune_configs/smoke.yaml", "--set", "attack.epsilon=1"], "unknown key attack.epsilon"),
        (["train", "tune_configs/smoke.yaml", "--set", "data.name=imagenet"], "data.name: 'imagenet' is not allowed"),
        (["train", "tune_configs/smoke.yaml", "--set", "data.name=cifar10"], "data_dir"),
        (["train", "tune_configs/smoke.yaml", "--set", "data.name=cifar10", "--set", "data.data_dir=/no/such/dir"],
         "/no/such/dir"),
        (["train", "tune_configs/missing.yaml"], "does not exist"),
        (["sample", "/no/such/checkpoint"], "is not a checkpoint"),
        (["eval", "README.md"], "is not a readable rjem checkpoint"),
    ],
)
def test_bad_input_is_one_clear_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err


def test_console_script_prints_no_traceback():
    exe = Path(sys.executable).with_name("rjem")
    proc = subprocess.run([str(exe), "train", "tune_configs/smoke.yaml", "--set", "sampler.steps=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "rjem train: error: sampler.steps: 0 is out of range; it must be >= 1"


def test_eval_help_names_every_metric():
    from rjem_ray.cli import build_parser
    from rjem_ray.config import METRIC_NAMES

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    (metrics,) = [a for a in sub.choices["eval"]._actions if "--metrics" in a.option_strings]
    listed = metrics.help.split("comma list of ", 1)[1].split(" ", 1)[0].split(",")
    assert listed == list(METRIC_NAMES)


def test_eval_draws_into_one_folder_per_checkpoint(tmp_path, monkeypatch):
    from rjem_ray.cli import eval_artifact_dir

    monkeypatch.chdir(tmp_path)
    a, b = eval_artifact_dir(str(tmp_path / "out" / "checkpoint"), str(tmp_path / "out" / "checkpoint")), \
        eval_artifact_dir("out/checkpoint_000002", "out/checkpoint_000002")
    assert a == tmp_path / "out" / "eval-checkpoint" and b == tmp_path / "out" / "eval-checkpoint_000002"
    # a model URI's checkpoint is a temporary download: its files go to the working directory instead
    assert eval_artifact_dir("models:/demo/3", "/tmp/rjem-model-x/checkpoint") == tmp_path / "rjem-eval" / "models_demo_3"
    assert eval_artifact_dir("runs:/abc/model", "/tmp/x/checkpoint") == tmp_path / "rjem-eval" / "runs_abc_model"
