from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch.nn.functional as F
from torch import nn

from batchfit.errors import ConfigError
from batchfit.progress import ProgressEvent
from batchfit.recommend import Recommendation, recommend
from batchfit.tuning import (
    LR_CALIBRATION_MULTIPLIERS,
    STAGES,
    LRCheck,
    TuneResult,
    _cached,
    _calibrate_lr,
    _Run,
    _store,
    default_batch_sizes,
    noise_probe_batch,
    tune,
)
from conftest import make_tiny_workload
from test_report import parse_page

FAST = dict(budget="epochs:3", batch_sizes=[8, 16, 32], noise_steps=10, seed=0)
TINY = dict(budget="steps:2", batch_sizes=[8, 16], noise_steps=5, precision_check=False, seed=0)


def test_tune_runs_every_stage_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wl = make_tiny_workload()
    events: list[ProgressEvent] = []
    finished: list[int] = []
    out = tmp_path / "out"

    def progress(event: ProgressEvent) -> None:
        events.append(event)
        if event.stage == "sweep" and event.kind == "update" and event.completed:
            # written as it completes: results.json already has this trial when the display hears of it
            on_disk = json.loads((out / "results.json").read_text())
            finished.append(sum(t["status"] == "ok" for t in on_disk["trials"]))
            assert finished[-1] == event.completed

    res = tune(wl, out_dir=out, progress=progress, **FAST)
    assert isinstance(res, TuneResult)
    rec = res.recommendation
    assert isinstance(rec, Recommendation) and rec.batch_size in (8, 16, 32)
    assert rec.micro_batch_size * rec.accumulation_steps >= rec.batch_size
    assert len(rec.reasons) >= 5
    data = res.to_dict()
    assert [t["batch_size"] for t in data["best_per_batch"]] == [8, 16, 32]
    assert all(t["status"] == "ok" for t in data["trials"])
    # every stage ran and reported, in the recipe's order, in the one progress convention
    assert finished == [1, 2, 3]
    assert [e.stage for e in events if e.kind == "end"] == list(STAGES)
    assert {e.stage for e in events if e.kind == "start"} >= {"noise", "lr_check", "sweep", "precision", "report"}
    # every result is on disk, and results.json is the TuneResult's dict form
    for name in ("find.json", "noise.json", "lr.json", "precision.json", "results.json", "report.md", "report.html",
                 "batchfit.db", "tune_state.json"):
        assert (out / name).exists(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert Recommendation.from_dict(on_disk["recommendation"]) == rec
    assert on_disk["find"]["recommended_batch_size"] == res.find["recommended_batch_size"]  # type: ignore[index]
    assert on_disk["noise"]["b_simple"] == res.noise["b_simple"]  # type: ignore[index]
    assert on_disk["lr_calibration"] == res.lr_check.to_dict()  # type: ignore[union-attr]
    assert {"fp32", "bf16"} <= set(on_disk["precision_check"])
    assert TuneResult.from_dict(on_disk).recommendation == rec
    page = parse_page((out / "report.html").read_text())
    assert [row[0] for row in page.tables[0][1:]] == ["8", "16", "32"]
    assert page.rec_text[0] == rec.headline()
    # the store alone has everything tune measured: recommend(load_results(store)) is tune's recommendation,
    # LR check and precision check included, and `batchfit report STORE` prints that same recommendation
    from batchfit.cli import main
    from batchfit.study import load_results

    loaded = load_results(f"sqlite:///{out / 'batchfit.db'}")
    assert loaded.tune["precision_check"] == on_disk["precision_check"]
    assert loaded.tune["lr_calibration"] == on_disk["lr_calibration"]
    assert recommend(loaded) == rec
    assert main(["report", str(out / "batchfit.db"), "--out", str(tmp_path / "rep"), "--json",
                 str(tmp_path / "rep.json"), "-q"]) == 0
    assert Recommendation.from_dict(json.loads((tmp_path / "rep.json").read_text())["recommendation"]) == rec

    # -- resume: nothing is measured again (finder, probe and training would fail loudly if called) ------------
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a finished stage was run again")

    monkeypatch.setattr("batchfit.finder.find_batch_size", boom)
    monkeypatch.setattr("batchfit.noise.noise_scale", boom)
    monkeypatch.setattr("batchfit.engine.train", boom)
    (out / "report.html").unlink()
    resumed: list[ProgressEvent] = []
    again = tune(wl, out_dir=out, progress=resumed.append, **FAST)
    assert again.recommendation == rec
    assert [t["trial_number"] for t in again["trials"]] == [t["trial_number"] for t in data["trials"]]
    assert (out / "report.html").exists()
    assert [e.stage for e in resumed if e.kind == "end" and e.data.get("resumed")] == ["find", "noise", "lr_check",
                                                                                       "precision"]


def test_stage_cache_is_keyed_by_settings(tmp_path: Path) -> None:
    _store(tmp_path, "find", {"device": "cpu", "seed": 0}, {"recommended_batch_size": 64})
    assert _cached(tmp_path, "find", {"device": "cpu", "seed": 0}) == {"recommended_batch_size": 64}
    assert _cached(tmp_path, "find", {"device": "cpu", "seed": 1}) is None
    assert _cached(tmp_path, "noise", {"device": "cpu", "seed": 0}) is None
    # a partial result is not a finished one
    _store(tmp_path, "lr", {"seed": 0}, {"runs": [1]}, partial=True)
    assert _cached(tmp_path, "lr", {"seed": 0}) is None
    assert _cached(tmp_path, "lr", {"seed": 0}, partial=True) == {"runs": [1]}


def _wider(wl: Any, hidden: int) -> Any:
    def model_fn() -> nn.Module:
        return nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    return dataclasses.replace(wl, model_fn=model_fn)


def test_a_wider_model_under_the_same_name_is_measured_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """13.3: every stage's cache key covers the model: a wider model with the same name must not resume."""
    import batchfit.finder
    import batchfit.noise

    calls: dict[str, int] = {"find": 0, "noise": 0}

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(batchfit.finder, "find_batch_size", counting("find", batchfit.finder.find_batch_size))
    monkeypatch.setattr(batchfit.noise, "noise_scale", counting("noise", batchfit.noise.noise_scale))
    base = make_tiny_workload()
    first = tune(_wider(base, 16), out_dir=tmp_path, **TINY)
    same = tune(_wider(base, 16), out_dir=tmp_path, **TINY)
    assert calls == {"find": 1, "noise": 1}
    assert same.lr_check == first.lr_check
    wide = tune(_wider(base, 64), out_dir=tmp_path, **TINY)
    assert calls == {"find": 2, "noise": 2}  # measured again, not "resumed" with the narrow model's numbers
    state = json.loads((tmp_path / "tune_state.json").read_text())
    assert state["find"]["fingerprint"]["model"]["parameters"] == 8 * 64 + 64 + 64 * 3 + 3
    assert wide.lr_check != first.lr_check  # the LR check ran again on the wide model
    assert wide["study_name"] != first["study_name"]


def test_lr_check_keeps_each_finished_run_across_an_interruption(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """13.8: runs of the LR check finished before a Ctrl-C are not run again."""
    import batchfit.tuning as tuning
    from batchfit.study import parse_budget

    wl = make_tiny_workload(lr=1e-3)
    real, ran = tuning._lr_run, []

    def interrupted(*a: Any, **k: Any) -> Any:
        if len(ran) == 3:
            raise KeyboardInterrupt
        ran.append(a[-1])
        return real(*a, **k)

    run = _Run(tmp_path, None, {"workload": "tiny"}, "cpu", "fp32", 0)
    monkeypatch.setattr(tuning, "_lr_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _calibrate_lr(wl, run, budget=parse_budget("epochs:2"), multipliers=LR_CALIBRATION_MULTIPLIERS,
                      tolerance=0.01)
    assert ran == [0.25, 0.5, 1.0]
    saved = json.loads((tmp_path / "lr.json").read_text())
    assert [r["multiplier"] for r in saved["runs"]] == [0.25, 0.5, 1.0]

    def counting(*a: Any, **k: Any) -> Any:
        ran.append(a[-1])
        return real(*a, **k)

    monkeypatch.setattr(tuning, "_lr_run", counting)
    check = _calibrate_lr(wl, run, budget=parse_budget("epochs:2"), multipliers=LR_CALIBRATION_MULTIPLIERS,
                          tolerance=0.01)
    assert ran[3:5] == [2.0, 4.0] and 0.25 not in ran[3:]  # the rerun did only what was left
    assert [r["multiplier"] for r in check.runs][:3] == [0.25, 0.5, 1.0]
    assert json.loads((tmp_path / "tune_state.json").read_text()).get("lr:partial") is None


def test_all_trials_diverged_still_writes_the_report(tmp_path: Path) -> None:
    wl = dataclasses.replace(make_tiny_workload(), loss_fn=lambda out, y: F.cross_entropy(out, y) * math.nan)
    res = tune(wl, out_dir=tmp_path, budget="epochs:2", batch_sizes=[16, 32], find=False, noise=False,
               precision_check=True)
    assert {t["status"] for t in res["trials"]} == {"diverged"}
    assert res.recommendation is None and res.precision_check is None
    assert "precision_check" not in res.to_dict()
    assert "No recommendation yet" in (tmp_path / "report.md").read_text()


def test_default_batch_sizes() -> None:
    # digits: powers of two from 16 and the full batch, never B = 1
    assert default_batch_sizes(1437, 1437, 32) == [16, 32, 64, 128, 256, 512, 1024, 1437]
    # a memory limit of 8 stops at 8 x 64 accumulation steps; the full batch is beyond it
    assert default_batch_sizes(10_000, 8, 32) == [16, 32, 64, 128, 256, 512]
    # what `tune --batch-sizes`'s help says: 13 sizes for 100,000 samples without a memory limit
    assert len(default_batch_sizes(100_000, None, 32)) == 13


def test_noise_probe_batch() -> None:
    """13.11: a base batch of 1 cannot be split for the probe: it uses a batch that can, within what fits."""
    assert noise_probe_batch(64, 1000, None) == 64
    assert noise_probe_batch(1, 1000, None) == 16
    assert noise_probe_batch(1, 1000, 4) == 4
    assert noise_probe_batch(64, 10, 512) == 10
    with pytest.raises(ConfigError, match="noise=False"):
        noise_probe_batch(1, 1000, 1)


def test_tune_with_a_base_batch_of_one(tmp_path: Path) -> None:
    """13.11 end to end: the noise stage picks a batch it can split, and the run ends in a recommendation."""
    res = tune(make_tiny_workload(base_batch_size=1), out_dir=tmp_path, find=False, lr_calibration=False, **TINY)
    assert res.noise["batch_size"] == 16 and math.isfinite(res.noise["b_simple"])  # type: ignore[index]
    assert res.recommendation is not None


def test_workload_options_reach_the_workload_through_tune(tmp_path: Path) -> None:
    """Workload options go to the factory (a narrower digits MLP) and into every stage's cache key; a progress
    consumer that handles only some kinds of events is enough."""
    ends: list[str] = []

    def only_ends(event: ProgressEvent) -> None:
        if event.kind == "end":
            ends.append(event.stage)

    res = tune("demo:digits-mlp", workload_options={"hidden": 4}, out_dir=tmp_path, find=False, noise=False,
               budget="steps:2", batch_sizes=[16, 32], precision_check=False, progress=only_ends)
    assert ends == ["lr_check", "sweep", "report"]
    assert res["num_train"] == 1437 and res.recommendation is not None
    key = json.loads((tmp_path / "tune_state.json").read_text())["lr"]
    assert key["options"] == {"hidden": 4}
    assert key["fingerprint"]["model"]["parameters"] == 64 * 4 + 4 + 4 * 10 + 10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"budget": "weeks:2"}, "budget"), ({"batch_sizes": [16, 0]}, "batch size"),
     ({"batch_sizes": [16, 10_000]}, "exceeds the training set"), ({"target": 1.5}, "target"),
     ({"tolerance": 2.0}, "tolerance"), ({"lr_search": 0}, "lr_search"), ({"eval_every": 0}, "eval_every"),
     ({"precision": "fp8"}, "precision"), ({"memory_budget": "lots"}, "memory"), ({"seed": -1}, "seed"),
     ({"find": False, "memory_budget": "1MiB"}, "only applied by the finder")],
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

    wl = make_tiny_workload(lr=1e-3)  # SGD at 1e-3 barely moves in a few epochs: larger LRs score clearly better
    run = _Run(tmp_path, None, {"workload": "tiny"}, "cpu", "fp32", 0)
    res = _calibrate_lr(wl, run, budget=parse_budget("epochs:4"), multipliers=LR_CALIBRATION_MULTIPLIERS,
                        tolerance=0.01)
    assert isinstance(res, LRCheck)
    scores = {r["multiplier"]: r["score"] for r in res.runs}
    assert set(scores) >= set(LR_CALIBRATION_MULTIPLIERS)
    # the range is extended only past an edge that is the best so far, x2 at a time
    extra = sorted(set(scores) - set(LR_CALIBRATION_MULTIPLIERS))
    assert all(m > max(LR_CALIBRATION_MULTIPLIERS) for m in extra) or all(m < 0.25 for m in extra)
    assert len(extra) <= 3
    best = max(scores, key=lambda m: scores[m])
    assert scores[best] > scores[1.0] * 1.01  # the premise: the base LR is clearly beaten
    assert res.best_multiplier == best and res.lr == pytest.approx(1e-3 * best)
    assert json.loads((tmp_path / "lr.json").read_text())["best_multiplier"] == best
    # with a tolerance wide enough to cover the gap, the base LR is kept
    kept = _calibrate_lr(wl, dataclasses.replace(run, out=tmp_path / "b"), budget=parse_budget("epochs:4"),
                         multipliers=LR_CALIBRATION_MULTIPLIERS, tolerance=0.9)
    assert kept.best_multiplier == 1.0 and kept.kept_base
