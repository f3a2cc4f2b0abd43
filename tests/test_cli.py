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

    from rjem_ray.method.restore import load_model

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


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained smoke-config checkpoint with its Gaussian mixture: enough for sample/eval to reach their
    argument checks (made in a second, no training)."""
    import torch

    from rjem_ray.method.checkpoint import save_checkpoint
    from rjem_ray.config import load_config
    from rjem_ray.core.data import dataset_info
    from rjem_ray.method.gmm import fit_class_gmm
    from rjem_ray.method.models import build_model

    cfg = load_config("tune_configs/smoke.yaml")
    model = build_model(cfg.model, dataset_info(cfg.data.name))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 28, 28, generator=g) * 2 - 1, torch.arange(40) % 10
    d = tmp_path_factory.mktemp("tiny") / "checkpoint"
    save_checkpoint(d, {"model": model.state_dict(), "config": cfg.to_dict(), "step": 3},
                    gmm_state=fit_class_gmm(x, y, 10, rank=2).state_dict())
    return d


SMOKE = "tune_configs/smoke.yaml"
NO_MLFLOW = ["--set", "tracking.enabled=false"]
# Every way `rjem` is told something it cannot use, and a fragment of the one line that must say what. {ck} is
# a readable checkpoint, {tmp} a fresh directory; `train` gets --out {tmp}/run (nothing lands in the repo).
# None of them starts work: each fails before Ray starts, images are drawn or a sweep runs.
BAD_INPUT = [
    # the config file and --set (ConfigError)
    (["train", SMOKE, "--set", "attack.eps=-0.1"], "attack.eps: -0.1 is out of range"),
    (["train", SMOKE, "--set", "attack.steps=0"], "attack.steps: 0 is out of range"),
    (["train", SMOKE, "--set", "attack.epsilon=1"], "unknown key attack.epsilon"),
    (["train", SMOKE, "--set", "attack.eps=true"], "attack.eps: expected a number, got True"),
    (["train", SMOKE, "--set", "data.name=imagenet"], "data.name: 'imagenet' is not allowed"),
    (["train", SMOKE, "--set", "attack.eps"], "--set 'attack.eps': expected key.sub=value"),
    (["train", SMOKE, "--set", "=3"], "--set '=3': the key is empty or malformed"),
    (["train", SMOKE, "--set", "attack.eps.x=1"], "--set 'attack.eps.x=1': eps is a value, not a section"),
    (["train", SMOKE, "--set", "attack=3"], "attack: expected a mapping, got int"),
    # a YAML parse error spans lines (where, the text, a caret): one line, the location kept
    (["train", SMOKE, "--set", "attack.eps=[1,"], "--set 'attack.eps=[1,': cannot parse value"),
    (["train", "{tmp}/broken.yaml"], "broken.yaml' is not valid YAML: while parsing a flow sequence"),
    (["train", "{tmp}/broken.yaml"], 'line 1, column 7'),
    (["train", "{tmp}/list.yaml"], "list.yaml' must hold a mapping at the top level"),
    (["train", "tune_configs/missing.yaml"], "config file 'tune_configs/missing.yaml' does not exist"),
    # data (DataError)
    (["train", SMOKE, "--set", "data.name=cifar10"], "data_dir"),
    (["train", SMOKE, "--set", "data.name=cifar10", "--set", "data.data_dir=/no/such/dir"], "/no/such/dir"),
    # paths and values checked by the command itself (plain ValueError)
    (["train", SMOKE, "--out", "s3://bucket/run"], "--out 's3://bucket/run': OUT is a local directory"),
    (["train", SMOKE, "--set", "trainer.storage_path={tmp}/afile/sub"], "trainer.storage_path '{tmp}/afile/sub' "
                                                                         "cannot be written"),
    (["sample", "{ck}", "--class", "10", "--out", "{tmp}/s.png"], "--class 10 is out of range; allowed 0..9"),
    (["sample", "{ck}", "--class", "-1", "--out", "{tmp}/s.png"], "--class -1 is out of range"),
    (["sample", "{ck}", "--device", "bogus", "--out", "{tmp}/s.png"], "--device 'bogus' is not a device"),
    (["sample", "{ck}", "--device", "mps", "--out", "{tmp}/s.png"], "--device 'mps' is not allowed"),
    (["sample", "{ck}", "--n", "0"], "--n must be >= 1, got 0"),
    (["sample", "{ck}", "--set", "generate.n=0", "--out", "{tmp}/s.png"], "generate.n: 0 is out of range"),
    (["sample", "{ck}", "--set", "generate.bogus=1", "--out", "{tmp}/s.png"], "unknown key generate.bogus"),
    (["sample", "{ck}", "--config", "nope.yaml", "--out", "{tmp}/s.png"], "config file 'nope.yaml' does not exist"),
    (["eval", "{ck}", "--metrics", "accuracy,bogus"] + NO_MLFLOW, "--metrics: 'bogus' is not a metric; choose from"),
    (["eval", "{ck}", "--set", "eval.metrics=[bogus]"] + NO_MLFLOW, "eval.metrics: 'bogus' is not allowed"),
    (["eval", "{ck}", "--json", "{tmp}"] + NO_MLFLOW, "--json '{tmp}' cannot be written (it is a directory)"),
    (["eval", "{ck}", "--device", "bogus"] + NO_MLFLOW, "--device 'bogus' is not a device"),
    (["eval", "{ck}", "--set", "attack.eps"] + NO_MLFLOW, "--set 'attack.eps': expected key.sub=value"),
    # checkpoints that are not there (CheckpointError)
    (["sample", "/no/such/checkpoint"], "'/no/such/checkpoint' is not a checkpoint"),
    (["eval", "README.md"], "'README.md' is not a readable rjem checkpoint"),
    (["train", SMOKE, "--resume", "/no/such/run"] + NO_MLFLOW, "'/no/such/run' is not a checkpoint"),
    (["eval", "runs:/abc/model", "--set", "tracking.tracking_uri=sqlite:///{tmp}/mlflow.db"],
     "'runs:/abc/model': MLflow cannot find this model"),
    # the other commands
    (["ui", "--set", "tracking.tracking_uri=http://127.0.0.1:5999"], "tracking.tracking_uri is the MLflow server"),
    (["ui", "--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["tune", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["tune", SMOKE], "scope: None is not allowed; choose one of sample, train"),
    (["tune", "tune_configs/tune-smoke-sample.yaml", "--set", "checkpoint=/no/such"], "'/no/such' is not a checkpoint"),
    (["tune", "tune_configs/tune-smoke-sample.yaml", "--set", "checkpoint={ck}", "--set", "tune.num_samples=0"],
     "tune.num_samples: 0 is out of range"),
]


def _expand(argv: list[str], tmp_path: Path, ckpt: Path) -> list[str]:
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "afile").write_text("a file, not a directory")
    argv = [a.format(tmp=tmp_path, ck=ckpt) for a in argv]
    return argv + ["--out", str(tmp_path / "run")] if argv[0] == "train" and "--out" not in argv else argv


def _one_error_line(capsys, command: str) -> str:
    """The single line `rjem` wrote for the error (MLflow's own log lines about creating a store aside)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if not (" INFO " in ln or " WARNING " in ln)]
    assert len(lines) == 1 and lines[0].startswith(f"rjem {command}: error: "), lines
    return lines[0]


@pytest.mark.parametrize("argv, fragment", BAD_INPUT, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_clear_line(argv, fragment, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    for work in ("rjem_ray.distributed.train_driver.ensure_ray", "rjem_ray.evaluation.generate.generate",
                 "rjem_ray.tune.cli.run_sweep"):
        monkeypatch.setattr(work, lambda *a, **k: pytest.fail(f"{argv[0]} started its work"))
    argv = _expand(argv, tmp_path, tiny_checkpoint)
    assert main(argv) == 2
    assert fragment.format(tmp=tmp_path) in _one_error_line(capsys, argv[0])
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["bogus"], "invalid choice: 'bogus'"),
    (["sample"], "the following arguments are required: checkpoint"),
    (["sample", "ck", "--n", "abc"], "argument --n: invalid int value: 'abc'"),
    (["eval", "ck", "--metrics"], "argument --metrics: expected one argument"),
])
def test_bad_arguments_are_argparse_usage_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: rjem") and fragment in err.strip().splitlines()[-1]


def test_an_unreadable_path_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """An OSError other than a missing file (no permission, an I/O error) on a path the user gave."""
    config = tmp_path / "locked.yaml"
    config.write_text("name: locked\n")
    real_read = Path.read_text

    def locked(self, *args, **kwargs):
        if self == config:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", locked)
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys, "train")
    assert "Permission denied" in line and str(config) in line


def test_rjem_debug_shows_the_traceback(tmp_path, monkeypatch):
    from rjem_ray.config import ConfigError

    monkeypatch.setenv("RJEM_DEBUG", "1")
    with pytest.raises(ConfigError, match="attack.eps: -0.1 is out of range"):
        main(["train", SMOKE, "--set", "attack.eps=-0.1", "--out", str(tmp_path / "run")])
    with pytest.raises(ValueError, match="OUT is a local directory"):
        main(["train", SMOKE, "--out", "s3://bucket/run"])


def test_module_entry_point_prints_one_line_for_a_value_error(tmp_path):
    """`python -m rjem_ray`, as a user's shell sees it: a plain ValueError (not a ConfigError) and a
    multi-line YAML error each end in one stderr line and exit status 2."""
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    for argv, want in [(["train", SMOKE, "--out", "s3://bucket/run"], "rjem train: error: --out 's3://bucket/run': "
                                                                       "OUT is a local directory"),
                       (["train", str(tmp_path / "broken.yaml"), "--out", str(tmp_path / "run")], "is not valid YAML")]:
        proc = subprocess.run([sys.executable, "-m", "rjem_ray", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and want in proc.stderr, proc.stderr


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
