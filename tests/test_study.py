"""scripts/study.py: the tiny study trains each mode, evaluates it with one protocol and writes its table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _study():
    return _load("study")


def test_mode_set_names_what_is_wrong(tmp_path, capsys):
    study = _study()
    for bad in ("jempp", "gan:train.steps=1", "jempp:train.steps"):
        with pytest.raises(SystemExit):
            study.main(["--mode-set", bad, "--out", str(tmp_path)])
        assert f"--mode-set {bad!r}: expected MODE:key=value" in capsys.readouterr().err


def test_frontier_reads_knobs_and_checks_every_target(tmp_path):
    frontier = _load("frontier")
    run = {"seed": 0, "mode": "robust-jem", "train_s": 600.0, "eval": {"accuracy": 0.972, "robust_accuracy": 0.71, "ood_auroc": 0.96,
                                                 "ood": {"uniform": {"logsumexp": 0.99}, "photos": {"logsumexp": 0.96}}},
           "generation": {"energy": {"fid": 19.0, "fid_seeds": 47.0, "recall": 0.5, "recall_seeds": 0.6}}}
    cmd = "python scripts/study.py --set buffer.noise_init=0.5 --set 'train.energy_l2=0.01' --out x"
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"command": cmd}, "runs": [run]}))
    (row,) = frontier.rows([tmp_path])
    assert row["knobs"] == "robust-jem: buffer.noise_init=0.5 train.energy_l2=0.01" and row["meets"] is True
    for key, bad in (("accuracy", 0.969), ("robust_accuracy", 0.69), ("ood_auroc", 0.949)):
        run["eval"][key] = bad
        (tmp_path / "results.json").write_text(json.dumps({"meta": {"command": cmd}, "runs": [run]}))
        assert frontier.rows([tmp_path])[0]["meets"] is False, key
        run["eval"][key] = 0.99
    run["generation"]["energy"]["fid"] = 20.5
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"command": cmd}, "runs": [run]}))
    assert frontier.rows([tmp_path])[0]["meets"] is False
    assert "| `robust-jem: buffer.noise_init=0.5 train.energy_l2=0.01` | 0 |" in frontier.markdown(frontier.rows([tmp_path]))
    run["overrides"] = ["buffer.noise_init=0.25", "train.mode=robust-jem", "train.seed=0"]  # a run's own overrides win
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"command": cmd}, "runs": [run]}))
    assert frontier.rows([tmp_path])[0]["knobs"] == "robust-jem: buffer.noise_init=0.25"


def test_plan_runs_robust_jem_at_every_eps_and_every_mode_per_seed():
    study = _study()
    runs = study.plan(study.MODES, [0.2, 0.6], [0, 1], base_eps=0.6)
    names = [r["name"] for r in runs]
    assert len(names) == len(set(names)) == 2 * (1 + 1 + 1 + 2)
    assert {r["eps"] for r in runs if r["mode"] == "robust-jem"} == {0.2, 0.6}
    assert {r["eps"] for r in runs if r["mode"] == "robust-classifier"} == {0.6}
    assert all(r["eps"] is None for r in runs if r["mode"] in ("classifier", "jempp"))


def test_claims_are_checked_seed_for_seed():
    study = _study()
    groups = {
        "jempp": {"mode": "jempp", "eps": None, "rows": {"robust_accuracy": [0.0, 0.1], "energy.fid": [30.0, 40.0],
                                                        "rollbacks": [0, 0]}},
        "rj": {"mode": "robust-jem", "eps": 0.6, "rows": {"robust_accuracy": [0.5, 0.2], "energy.fid": [20.0, 50.0],
                                                         "rollbacks": [0, 1]}},
    }
    def verdict(claims, words):
        (found,) = [c["verdict"] for c in claims if words in c["claim"]]
        return found

    claims = study.check_claims(groups)
    assert verdict(claims, "AutoAttack") == "mixed"  # +0.5 on seed 0, +0.1 on seed 1
    assert verdict(claims, "plain reference") == "mixed"  # 20 < 30 on seed 0, 50 > 40 on seed 1
    assert verdict(claims, "robust reference") == "not measured"
    assert verdict(claims, "stability") == "mixed"
    groups["rj"]["rows"]["robust_accuracy"] = [0.5, 0.6]
    assert verdict(study.check_claims(groups), "AutoAttack") == "holds"
    assert "not measured" in {c["verdict"] for c in study.check_claims(groups)}  # IS was not in the rows


@pytest.mark.slow
def test_tiny_study_writes_its_table(tmp_path, cache_dir):
    study = _study()
    out = tmp_path / "study"
    rc = study.main(["--tiny", "--modes", "classifier,robust-jem", "--eps", "0.6", "--seeds", "0", "--jobs", "1",
                     "--out", str(out), "--set", f"cache_dir={cache_dir}", "--set", "eval.fid_second_extractor=none",
                     "--mode-set", "robust-jem:buffer.noise_init=0.5"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    extra = {r["mode"]: "buffer.noise_init=0.5" in r["overrides"] for r in res["runs"]}
    assert extra == {"classifier": False, "robust-jem": True}
    assert "robust-jem also `buffer.noise_init=0.5`" in res["meta"]["protocol"][0]
    assert {r["name"] for r in res["runs"]} == {"classifier-s0", "robust-jem-eps0.6-s0"}
    for r in res["runs"]:
        assert r["steps"] == 6 and Path(r["checkpoint"], "state.pt").is_file()
        assert 0.0 <= r["eval"]["robust_accuracy"] <= r["eval"]["accuracy"] <= 1.0
        assert set(r["generation"]) == {"energy", "pgd", "combined"}
        for g in r["generation"].values():
            assert g["fid"] > 0 and g["fid_seeds"] > 0
            assert 0 <= g["precision"] <= 1 and 0 <= g["recall"] <= 1 and 0 <= g["recall_seeds"] <= 1
        ood = r["eval"]["ood"]
        assert set(ood) == {"uniform", "photos", "smooth", "inverted"}
        assert r["eval"]["ood_auroc"] == min(v["logsumexp"] for v in ood.values())
        # the seeds row does not depend on the model: both runs drew the same seeds
    seeds = {r["generation"]["energy"]["fid_seeds"] for r in res["runs"]}
    assert len(seeds) == 1
    md = (out / "RESULTS.md").read_text()
    assert "| classifier |" in md and "robust-jem (ε 0.6 = 0.3 on [0, 1])" in md
    assert "Gaussian-mixture seeds alone" in md and "## The paper's claims, checked here" in md
    assert "| model | uniform | photos | smooth | inverted |" in md and "| precision | recall |" in md
    frontier = _load("frontier")
    table = frontier.rows([out])
    knobs = {r["knobs"].split(":")[0]: r["knobs"] for r in table}
    assert set(knobs) == {"classifier", "robust-jem"} and all("train.steps=6" in k for k in knobs.values())
    assert knobs["robust-jem"].endswith("buffer.noise_init=0.5") and "noise_init" not in knobs["classifier"]
    assert all(r["meets"] is False for r in table)  # six tiny steps reach no target
    assert "| OOD photos |" in frontier.markdown(table)
    assert len(list((out / "grids").glob("*.png"))) == 6
    # --reuse adds to an earlier study: runs already in OUT/runs are read back, not trained again
    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("state.pt")}
    (out / "runs" / "classifier-s0.json").write_text(
        json.dumps({**next(r for r in res["runs"] if r["name"] == "classifier-s0"), "train_s": 12345.0}))
    rc = study.main(["--tiny", "--modes", "classifier,robust-jem", "--eps", "0.6", "--seeds", "0", "--jobs", "1",
                     "--out", str(out), "--reuse", "--set", f"cache_dir={cache_dir}",
                     "--set", "eval.fid_second_extractor=none"])
    assert rc == 0
    again = json.loads((out / "results.json").read_text())
    assert sorted(again["meta"]["reused"]) == ["classifier-s0", "robust-jem-eps0.6-s0"]
    assert {r["name"]: r["train_s"] for r in again["runs"]}["classifier-s0"] == 12345.0
    assert before == {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("state.pt")}
    assert "not timed here: classifier-s0" in (out / "RESULTS.md").read_text()
