"""The MLflow model of a run: logged from a checkpoint, registered, loaded back by URI with the same logits,
and accepted by `rjem eval` / `rjem sample` in place of a checkpoint directory, looked up in the store the
user's config names. Logging, registering and resolving touch none of MLflow's process-wide state. No Ray:
the functions are called directly on checkpoints written here, into sqlite stores under ``tmp_path``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rjem_ray.method.checkpoint import save_checkpoint
from rjem_ray.method.restore import load_model
from rjem_ray.cli import main
from rjem_ray.config import load_config
from rjem_ray.core.data import dataset_info, load_split
from rjem_ray.method.models import build_model
from rjem_ray.config import ConfigError
from rjem_ray.tracking.models import MODEL_NAME, check_model_name, register_run_model, resolve_checkpoint
from rjem_ray.tracking.stores import client_for
from rjem_ray.tracking.tracker import Tracker

NAME = "rjem-test-model"


def _checkpoint(path, seed: int, favoured: int):
    """A smoke-config checkpoint with seed ``seed`` whose classifier favours class ``favoured`` (if not None)."""
    cfg = load_config("tune_configs/smoke.yaml")
    torch.manual_seed(seed)
    model = build_model(cfg.model, dataset_info(cfg.data.name))
    if favoured is not None:
        with torch.no_grad():
            model.fc.bias[favoured] += 50.0  # predicts `favoured` for (almost) every image
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "step": seed})
    return path


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two checkpoints of different weights, logged into two runs and registered as versions 1 and 2: version 1
    predicts class 3 for every image, version 2 is an untouched random initialisation."""
    tmp = tmp_path_factory.mktemp("mlflow-model")
    labels = load_split("mnist5k", "test")[1]
    a = 3
    uri = f"sqlite:///{tmp}/mlflow.db"
    cks, runs = [], []
    for seed, favoured in ((1, a), (2, None)):
        ck = _checkpoint(tmp / f"ck{seed}" / "checkpoint", seed, favoured)
        t = Tracker.create(uri, "model-test", (tmp / "mlartifacts").as_uri())
        t.log_dataset("mnist5k", torch.zeros(3, 1, 28, 28, dtype=torch.uint8), torch.arange(3))
        t.log_artifacts(ck, "checkpoint")
        info = t.log_model(ck, registered_model_name=NAME)
        t.finish()
        assert info.signature is not None
        cks.append(ck)
        runs.append(t.run_id)
    return {"uri": uri, "checkpoints": cks, "runs": runs, "accuracy_1": float((labels == a).float().mean())}


@pytest.fixture
def store(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    return registry


def test_logged_model_has_the_image_signature_and_the_run_logged_its_dataset(store):
    import mlflow
    import numpy as np

    client = mlflow.MlflowClient(store["uri"])
    version = client.get_model_version(NAME, "1")
    assert version.run_id == store["runs"][0]
    info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    (inp,) = info.signature.inputs.inputs
    (out,) = info.signature.outputs.inputs
    assert inp.type == np.dtype("float32") and inp.shape == (-1, 1, 28, 28)
    assert out.type == np.dtype("float32") and out.shape == (-1, 10)
    (dataset,) = client.get_run(store["runs"][0]).inputs.dataset_inputs
    assert dataset.dataset.name == "mnist5k"
    assert json.loads(dataset.dataset.profile)["features_shape"] == [3, 1, 28, 28]


def test_model_uri_loads_the_same_logits_as_its_checkpoint(store):
    import mlflow

    x = torch.rand(5, 1, 28, 28) * 2 - 1
    for version, ck in ((1, store["checkpoints"][0]), (2, store["checkpoints"][1])):
        expected = load_model(ck)[0](x).detach()
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
        got = torch.from_numpy(pyfunc.predict(x.numpy()))
        assert torch.allclose(got, expected, atol=1e-5), version
        # the CLI's resolution of the URI gives the same weights
        for uri in (f"models:/{NAME}/{version}", f"runs:/{store['runs'][version - 1]}/model",
                    f"runs:/{store['runs'][version - 1]}/checkpoint"):
            resolved, _ = load_model(resolve_checkpoint(uri, store["uri"]))
            assert torch.allclose(resolved(x), expected, atol=1e-5), uri
    one = load_model(resolve_checkpoint(f"models:/{NAME}/1", store["uri"]))[0](x)
    two = load_model(resolve_checkpoint(f"models:/{NAME}/2", store["uri"]))[0](x)
    assert not torch.allclose(one, two)  # the versions hold different weights: a mix-up would show


def test_loading_the_model_unpickles_nothing(store, tmp_path):
    import mlflow

    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path))
    files = sorted(p.name for p in Path(local).rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert "state.pt" in files and "rjem_model.py" in files


def test_eval_accepts_a_model_uri_and_evaluates_that_versions_weights(store, tmp_path):
    result = {}
    for version in (1, 2):
        out = tmp_path / f"v{version}.json"
        assert main(["eval", f"models:/{NAME}/{version}", "--metrics", "accuracy,ece", "--json", str(out)]) == 0
        result[version] = json.loads(out.read_text())
        direct = tmp_path / f"d{version}.json"
        assert main(["eval", str(store["checkpoints"][version - 1]), "--metrics", "accuracy,ece", "--json",
                     str(direct)]) == 0
        assert (result[version]["accuracy"], result[version]["ece"]) == pytest.approx(
            (json.loads(direct.read_text())["accuracy"], json.loads(direct.read_text())["ece"]))
    assert result[1]["accuracy"] == pytest.approx(store["accuracy_1"])  # every image called class 3
    assert result[1]["ece"] > 0.8  # ... with confidence ~1
    assert result[2]["ece"] < 0.5  # the random network is not confident: the wrong version would show


def test_sample_accepts_a_model_uri(store, tmp_path, cache_dir):
    out = tmp_path / "g.png"
    assert main(["sample", f"models:/{NAME}/1", "--mode", "pgd", "--n", "2", "--out", str(out),
                 "--set", "generate.pgd_steps=1", "--set", f"cache_dir={cache_dir}"]) == 0
    assert out.is_file()


@pytest.mark.parametrize("uri", [f"models:/{NAME}/99", "models:/no-such-model/1", "runs:/0123456789abcdef/model"])
def test_unknown_model_uri_is_one_line_exit_2(store, uri, capsys):
    assert main(["eval", uri, "--metrics", "accuracy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and uri in err and "Traceback" not in err


def _mlflow_process_state() -> dict:
    import mlflow
    import os

    return {"env": {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")},
            "tracking": mlflow.get_tracking_uri(), "registry": mlflow.get_registry_uri(),
            "active_run": mlflow.active_run()}


def test_logging_registering_and_resolving_leave_mlflows_process_state_alone(tmp_path, monkeypatch):
    """The cause of the earlier full-suite failure: logging a model pinned MLflow's process-wide tracking URI
    (and with it MLFLOW_TRACKING_URI), so a later run in the process logged to another store. Here the
    process points at a decoy store; everything goes to the explicit one, the decoy is never created, and
    MLflow's state (variables, URIs, active run) is as it was; the run stays RUNNING (no fluent run ended it)."""
    import mlflow

    decoy = tmp_path / "decoy.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{decoy}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{decoy}")
    mlflow.set_tracking_uri(f"sqlite:///{decoy}")  # in-process too; the autouse fixture restores it afterwards
    before = _mlflow_process_state()
    uri = f"sqlite:///{tmp_path}/real.db"
    ck = _checkpoint(tmp_path / "ck" / "checkpoint", 3, None)
    t = Tracker.create(uri, "isolated", (tmp_path / "art").as_uri())
    info = t.log_model(ck, registered_model_name="isolated-model")
    local = resolve_checkpoint("models:/isolated-model/1", uri)
    assert _mlflow_process_state() == before and not decoy.exists()
    client = client_for(uri)
    assert client.get_run(t.run_id).info.status == "RUNNING"
    version = client.get_model_version("isolated-model", "1")
    assert version.run_id == t.run_id and version.source == client.get_logged_model(info.model_id).artifact_location
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert torch.allclose(load_model(local)[0](x), load_model(ck)[0](x))


def test_model_uris_are_looked_up_in_the_store_the_config_names(store, tmp_path, monkeypatch, capsys):
    """`rjem eval models:/...` reads the store with rjem's precedence: --set tracking.tracking_uri >
    MLFLOW_TRACKING_URI > the default; a store without the model is a one-line error naming that store."""
    uri = store["uri"]
    decoy = f"sqlite:///{tmp_path}/decoy.db"
    argv = ["eval", f"models:/{NAME}/1", "--metrics", "accuracy"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", decoy)
    assert main(argv) == 2  # the variable names the decoy store, which holds no model
    assert decoy in capsys.readouterr().err
    out = tmp_path / "set.json"
    assert main(argv + ["--set", f"tracking.tracking_uri={uri}", "--json", str(out)]) == 0  # --set wins
    assert json.loads(out.read_text())["accuracy"] == pytest.approx(store["accuracy_1"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)  # the default store, sqlite:///mlflow.db here, holds no model either
    assert main(argv) == 2 and "mlflow.db" in capsys.readouterr().err


def test_register_run_model_registers_the_runs_own_model_or_logs_its_checkpoint(tmp_path):
    """A run that logged its model has that very model registered (no second copy); a sweep trial's run,
    which logged none, gets its checkpoint logged and registered; registering again returns the same
    version; a run with neither is refused."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    art = (tmp_path / "art").as_uri()
    with_model, trial, empty = (Tracker.create(uri, "reg", art) for _ in range(3))
    ck_a = _checkpoint(tmp_path / "a" / "checkpoint", 4, 7)
    ck_b = _checkpoint(tmp_path / "b" / "checkpoint", 5, None)
    logged = with_model.log_model(ck_a)
    v1 = register_run_model(client, with_model.run_id, "best")
    assert str(v1.version) == "1" and v1.run_id == with_model.run_id
    tag = json.loads(client.get_logged_model(logged.model_id).tags["mlflow.modelVersions"])
    assert tag == [{"name": "best", "version": v1.version}]  # the Models tab links the logged model to its version
    v2 = register_run_model(client, trial.run_id, "best", ck_b)
    assert str(v2.version) == "2" and v2.run_id == trial.run_id
    assert str(register_run_model(client, trial.run_id, "best", ck_b).version) == "2"  # no duplicate version
    exp = client.get_experiment_by_name("reg").experiment_id
    assert sorted(m.source_run_id for m in client.search_logged_models([exp]) if m.name == MODEL_NAME) == sorted(
        [with_model.run_id, trial.run_id])
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    for version, ck in (("1", ck_a), ("2", ck_b)):
        assert torch.allclose(load_model(resolve_checkpoint(f"models:/best/{version}", uri))[0](x), load_model(ck)[0](x))
    with pytest.raises(ValueError, match="no logged model"):
        register_run_model(client, empty.run_id, "best")


@pytest.mark.parametrize("name, refused, enabled, message", [
    ("", None, True, "tune.register_as: '' is not a registered-model name"),
    ("a/b", None, True, "without '/' or ':'"),
    (3, None, True, "tune.register_as: 3 is not"),
    ("ok", "scope sample trains no model", True, "tune.register_as: scope sample trains no model"),
    ("ok", None, False, "needs tracking.enabled: true"),
])
def test_bad_registered_model_names_are_one_line_errors(name, refused, enabled, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_model_name(name, "tune.register_as", refused, enabled)
    assert check_model_name("rjem-best", "tune.register_as") == "rjem-best"
