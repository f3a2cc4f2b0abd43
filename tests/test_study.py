"""scripts/study.py: the tiny study trains each mode, evaluates it with one protocol and writes its table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "scripts" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
                     "--out", str(out), "--set", f"cache_dir={cache_dir}", "--set", "eval.fid_second_extractor=none"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert {r["name"] for r in res["runs"]} == {"classifier-s0", "robust-jem-eps0.6-s0"}
    for r in res["runs"]:
        assert r["steps"] == 6 and Path(r["checkpoint"], "state.pt").is_file()
        assert 0.0 <= r["eval"]["robust_accuracy"] <= r["eval"]["accuracy"] <= 1.0
        assert set(r["generation"]) == {"energy", "pgd", "combined"}
        for g in r["generation"].values():
            assert g["fid"] > 0 and g["fid_seeds"] > 0
        # the seeds row does not depend on the model: both runs drew the same seeds
    seeds = {r["generation"]["energy"]["fid_seeds"] for r in res["runs"]}
    assert len(seeds) == 1
    md = (out / "RESULTS.md").read_text()
    assert "| classifier |" in md and "robust-jem (ε 0.6 = 0.3 on [0, 1])" in md
    assert "Gaussian-mixture seeds alone" in md and "## The paper's claims, checked here" in md
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
