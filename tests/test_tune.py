from __future__ import annotations

import dataclasses
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch.nn.functional as F

from batchfit.errors import ConfigError
from batchfit.tuning import _cached, _store, default_batch_sizes, tune
from conftest import make_tiny_workload

FAST = dict(budget="epochs:3", batch_sizes=[8, 16, 32], noise_steps=10, seed=0)


def test_tune_runs_every_stage_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wl = make_tiny_workload()
    stages: list[tuple[str, str]] = []
    finished: list[int] = []

    class Rec:
        def stage_start(self, stage: str, message: str, total: int | None = None) -> None:
            stages.append(("start", stage))

        def stage_update(self, stage: str, completed: int, message: str) -> None:
            if stage == "sweep" and completed:  # written as it completes: results.json already has this trial
                on_disk = json.loads((out / "results.json").read_text())
                finished.append(sum(t["status"] == "ok" for t in on_disk["trials"]))
                assert finished[-1] == completed

        def stage_end(self, stage: str, message: str) -> None:
            stages.append(("end", stage))

    out = tmp_path / "out"
    res = tune(wl, out_dir=out, reporter=Rec(), **FAST)
    rec = res["recommendation"]
    assert rec["batch_size"] in (8, 16, 32)
    assert rec["batch_size"] == rec["micro_batch_size"] * rec["accumulation_steps"] or (
        rec["micro_batch_size"] * rec["accumulation_steps"] >= rec["batch_size"])
    assert len(rec["reasons"]) >= 5
    assert [t["batch_size"] for t in res["best_per_batch"]] == [8, 16, 32]
    assert all(t["status"] == "ok" for t in res["trials"])
    # every stage ran and reported, in the recipe's order
    assert finished == [1, 2, 3]
    ends = [s for kind, s in stages if kind == "end"]
    assert ends == ["find", "noise", "lr", "sweep", "precision", "report"]
    # every result is on disk
    for name in ("find.json", "noise.json", "lr.json", "precision.json", "results.json", "report.md", "report.html",
                 "batchfit.db", "tune_state.json"):
        assert (out / name).exists(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["recommendation"]["batch_size"] == rec["batch_size"]
    assert on_disk["find"]["recommended_batch_size"] == res["find"]["recommended_batch_size"]
    assert on_disk["noise"]["b_simple"] == res["noise"]["b_simple"]
    assert {"fp32", "bf16"} <= set(on_disk["precision_check"])
    HTMLParser().feed((out / "report.html").read_text())
    # the store alone (batchfit report STORE) has tune's own results too
    from batchfit.cli.report import load_any

    from_store = load_any(str(out / "batchfit.db"))
    assert from_store["precision_check"] == on_disk["precision_check"]
    assert from_store["lr_calibration"]["best_multiplier"] == res["lr_calibration"]["best_multiplier"]

    # -- resume: nothing is measured again (finder, probe and training would fail loudly if called) ------------
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a finished stage was run again")

    monkeypatch.setattr("batchfit.finder.find_batch_size", boom)
    monkeypatch.setattr("batchfit.noise.noise_scale", boom)
    monkeypatch.setattr("batchfit.engine.train", boom)
    (out / "report.html").unlink()
    again = tune(wl, out_dir=out, **FAST)
    assert again["recommendation"] == rec
    assert [t["trial_number"] for t in again["trials"]] == [t["trial_number"] for t in res["trials"]]
    assert (out / "report.html").exists()


def test_stage_cache_is_keyed_by_settings(tmp_path: Path) -> None:
    _store(tmp_path, "find", {"device": "cpu", "seed": 0}, {"recommended_batch_size": 64})
    assert _cached(tmp_path, "find", {"device": "cpu", "seed": 0}) == {"recommended_batch_size": 64}
    assert _cached(tmp_path, "find", {"device": "cpu", "seed": 1}) is None
    assert _cached(tmp_path, "noise", {"device": "cpu", "seed": 0}) is None


def test_all_trials_diverged_still_writes_the_report(tmp_path: Path) -> None:
    wl = dataclasses.replace(make_tiny_workload(), loss_fn=lambda out, y: F.cross_entropy(out, y) * math.nan)
    res = tune(wl, out_dir=tmp_path, budget="epochs:2", batch_sizes=[16, 32], find=False, noise=False,
               precision_check=True)
    assert {t["status"] for t in res["trials"]} == {"diverged"}
    assert res["recommendation"] is None
    assert "precision_check" not in res
    assert "No recommendation yet" in (tmp_path / "report.md").read_text()


def test_default_batch_sizes() -> None:
    # digits: powers of two from 16 and the full batch, never B = 1
    assert default_batch_sizes(1437, 1437, 32) == [16, 32, 64, 128, 256, 512, 1024, 1437]
    # a memory limit of 8 stops at 8 x 64 accumulation steps; the full batch is beyond it
    assert default_batch_sizes(10_000, 8, 32) == [16, 32, 64, 128, 256, 512]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"budget": "weeks:2"}, "budget"), ({"batch_sizes": [16, 0]}, "batch size"),
     ({"batch_sizes": [16, 10_000]}, "exceeds the training set"), ({"target": 1.5}, "target"),
     ({"tolerance": 2.0}, "tolerance"), ({"lr_search": 0}, "lr_search"), ({"eval_every": 0}, "eval_every"),
     ({"precision": "fp8"}, "precision"), ({"memory_budget": "lots"}, "memory size")],
)
def test_bad_input_fails_before_any_work(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tune(make_tiny_workload(), out_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        tune(make_tiny_workload(), out_dir=f)


def test_lr_calibration_moves_an_untuned_base_lr_and_keeps_a_good_one(tmp_path: Path) -> None:
    from batchfit.study import parse_budget
    from batchfit.tuning import LR_CALIBRATION_MULTIPLIERS, _calibrate_lr, _Quiet

    wl = make_tiny_workload(lr=1e-3)  # SGD at 1e-3 barely moves in a few epochs: larger LRs score clearly better
    res = _calibrate_lr(wl, tmp_path, _Quiet(), budget=parse_budget("epochs:4"),
                        multipliers=LR_CALIBRATION_MULTIPLIERS, tolerance=0.01, device="cpu", precision="fp32",
                        seed=0)
    scores = {r["multiplier"]: r["score"] for r in res["runs"]}
    assert set(scores) >= set(LR_CALIBRATION_MULTIPLIERS)
    # the range is extended only past an edge that is the best so far, x2 at a time
    extra = sorted(set(scores) - set(LR_CALIBRATION_MULTIPLIERS))
    assert all(m > max(LR_CALIBRATION_MULTIPLIERS) for m in extra) or all(m < 0.25 for m in extra)
    assert len(extra) <= 3
    best = max(scores, key=lambda m: scores[m])
    assert scores[best] > scores[1.0] * 1.01  # the premise: the base LR is clearly beaten
    assert res["best_multiplier"] == best and res["lr"] == pytest.approx(1e-3 * best)
    assert json.loads((tmp_path / "lr.json").read_text())["best_multiplier"] == best
    # with a tolerance wide enough to cover the gap, the base LR is kept
    kept = _calibrate_lr(wl, tmp_path / "b", _Quiet(), budget=parse_budget("epochs:4"),
                         multipliers=LR_CALIBRATION_MULTIPLIERS, tolerance=0.9, device="cpu", precision="fp32",
                         seed=0)
    assert kept["best_multiplier"] == 1.0 and kept["kept_base"]
