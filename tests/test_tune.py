from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch.nn.functional as F
from torch import nn

from batchfit.decide import PrecisionCheck, PrecisionRun
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
    # the first seed of each batch, then racing's added seeds (the count goes on; results.json keeps up)
    assert finished[:3] == [1, 2, 3] and finished == sorted(finished) and finished[-1] == len(data["trials"])
    assert {t["seed"] for t in data["trials"]} <= {0, 1, 2}
    # (the batch-schedule check is off by default: every other stage, in order)
    assert [e.stage for e in events if e.kind == "end"] == [s for s in STAGES if s != "batch_schedule_check"]
    assert {e.stage for e in events if e.kind == "start"} >= {"noise", "lr_check", "sweep", "precision", "report"}
    # every result is on disk, and results.json is the TuneResult's dict form
    for name in ("find.json", "noise.json", "lr.json", "step_time.json", "precision.json", "results.json",
                 "report.md", "report.html", "batchfit.db", "tune_state.json"):
        assert (out / name).exists(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert Recommendation.from_dict(on_disk["recommendation"]) == rec
    assert on_disk["find"]["recommended_batch_size"] == res.find["recommended_batch_size"]  # type: ignore[index]
    assert on_disk["noise"]["b_simple"] == res.noise["b_simple"]  # type: ignore[index]
    assert on_disk["lr_calibration"] == res.lr_check.to_dict()  # type: ignore[union-attr]
    assert {"fp32", "bf16"} <= set(on_disk["precision_check"])
    # the decision's seconds per step are the interleaved calibration's, for every candidate batch size (timed
    # before the sweep, at the micro-batch the recommendation would give it), and racing decided on them too
    cal = on_disk["step_time"]
    assert sorted(map(int, cal["seconds"])) == [8, 16, 32] and cal["rounds"] >= 6
    ev = {e["batch_size"]: e for e in on_disk["recommendation"]["intervals"]}
    assert all(ev[b]["seconds_per_step"] == cal["seconds_per_step"][str(b)] for b in ev)
    assert TuneResult.from_dict(on_disk).recommendation == rec
    page = parse_page((out / "report.html").read_text())
    assert [row[0] for row in page.tables[0][1:]] == ["8", "16", "32"]
    assert page.rec_text[0] == rec.headline()
    # the store holds the trials, tune's out_dir its stages and tolerance: recommend(load_results(out)) is tune's
    # recommendation (LR check and precision check included), and `batchfit report OUT` prints that same one
    from batchfit.cli import main
    from batchfit.study import load_results
    from batchfit.study.store import open_study, read_namespace

    assert read_namespace(open_study(f"sqlite:///{out / 'batchfit.db'}", None)) == {}  # trials only
    loaded = load_results(out)
    assert loaded.tune["precision_check"] == on_disk["precision_check"]
    assert loaded.tune["step_time"] == on_disk["step_time"]
    assert loaded.tune["lr_calibration"] == on_disk["lr_calibration"]
    assert loaded.tolerance == on_disk["tolerance"] == rec.tolerance == 0.01
    assert recommend(loaded) == rec
    assert main(["report", str(out), "--out", str(tmp_path / "rep"), "--json", str(tmp_path / "rep.json"),
                 "-q"]) == 0
    assert Recommendation.from_dict(json.loads((tmp_path / "rep.json").read_text())["recommendation"]) == rec

    # -- resume: nothing is measured again (finder, probe and training would fail loudly if called) ------------
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a finished stage was run again")

    monkeypatch.setattr("batchfit.finder.find_batch_size", boom)
    monkeypatch.setattr("batchfit.noise.noise_scale", boom)
    monkeypatch.setattr("batchfit.engine.train", boom)
    monkeypatch.setattr("batchfit.steptime.calibrate_step_time", boom)
    (out / "report.html").unlink()
    resumed: list[ProgressEvent] = []
    again = tune(wl, out_dir=out, progress=resumed.append, **FAST)
    assert again.recommendation == rec
    assert [t.trial_number for t in again.sweep.trials] == [t["trial_number"] for t in data["trials"]]
    assert (out / "report.html").exists()
    assert [e.stage for e in resumed if e.kind == "end" and e.data.get("resumed")] == ["find", "noise", "lr_check",
                                                                                       "step_time", "precision"]


def test_stage_cache_is_keyed_by_settings(tmp_path: Path) -> None:
    _store(tmp_path, "find", {"device": "cpu", "seed": 0}, {"recommended_batch_size": 64})
    assert _cached(tmp_path, "find", {"device": "cpu", "seed": 0}) == {"recommended_batch_size": 64}
    assert _cached(tmp_path, "find", {"device": "cpu", "seed": 1}) is None
    assert _cached(tmp_path, "noise", {"device": "cpu", "seed": 0}) is None
    # a partial result is not a finished one
    runs = {"runs": [{"multiplier": 1.0, "score": 0.5, "seed": 0}]}
    _store(tmp_path, "lr", {"seed": 0}, runs, partial=True)
    assert _cached(tmp_path, "lr", {"seed": 0}) is None
    assert _cached(tmp_path, "lr", {"seed": 0}, partial=True) == runs


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
    assert wide.sweep.study_name != first.sweep.study_name


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
    assert {t.status for t in res.sweep.trials} == {"diverged"}
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
    assert ends == ["lr_check", "step_time", "sweep", "report"]
    assert res.sweep.num_train == 1437 and res.recommendation is not None
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

    # SGD at 1e-3 barely moves in 60 steps: larger LRs score better beyond the noise of 400 validation samples
    wl = make_tiny_workload(lr=1e-3, n_val=400)
    run = _Run(tmp_path, None, {"workload": "tiny"}, "cpu", "fp32", 0)
    res = _calibrate_lr(wl, run, budget=parse_budget("epochs:40"), multipliers=LR_CALIBRATION_MULTIPLIERS,
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
    # the chosen multiplier is the LR-response curve's peak next to the best score, inside the tied multipliers
    assert best / 2 <= res.best_multiplier <= best * 2 and res.lr == pytest.approx(1e-3 * res.best_multiplier)
    assert json.loads((tmp_path / "lr.json").read_text())["best_multiplier"] == res.best_multiplier
    # with a tolerance wide enough to cover the gap, the base LR is kept
    assert "better beyond the noise" in res.decision
    kept = _calibrate_lr(wl, dataclasses.replace(run, out=tmp_path / "b"), budget=parse_budget("epochs:40"),
                         multipliers=LR_CALIBRATION_MULTIPLIERS, tolerance=1.0)
    assert kept.best_multiplier == 1.0 and kept.kept_base


# ---------------------------------------------------------------------------------------------------------------
# 11: seeds, racing, the interleaved precision check, LR-check replicates


def _synthetic_trial(batch: int, seed: int, acc: float, steps: float) -> dict[str, Any]:
    hist = [{"step": i, "val_metrics": {"accuracy": acc * f}} for i, f in enumerate((0.8, 0.9, 1.0, 1.0))]
    return {"batch_size": batch, "lr_multiplier": 1.0, "lr": 0.01, "status": "ok", "seed": seed, "history": hist,
            "samples_per_s": batch / (0.001 + 0.0001 * batch), "steps_to_target": steps}


class _FakeSweep:
    """Stands for the sweep: every call trains (synthetically) the seeds ``replicates`` asks for that are missing;
    16 and 32 are tied on accuracy, 256 is clearly worse."""

    TRUTH = {16: (0.95, 420.0), 32: (0.95, 230.0), 256: (0.80, 100.0)}

    def __init__(self) -> None:
        self.trained: list[tuple[int, int]] = []
        self.calls: list[dict[int, int] | None] = []

    def __call__(self, replicates: dict[int, int] | None) -> dict[str, Any]:
        self.calls.append(replicates)
        import numpy as np

        for b in self.TRUTH:
            for seed in range((replicates or {}).get(b, 1)):
                if (b, seed) not in self.trained:
                    self.trained.append((b, seed))
        trials = []
        for b, seed in self.trained:
            rng = np.random.default_rng(1000 * b + seed)
            acc, steps = self.TRUTH[b]
            trials.append(_synthetic_trial(b, seed, acc + 0.004 * rng.standard_normal(),
                                           steps * rng.lognormal(0, 0.05)))
        return {"primary_metric": "accuracy", "higher_is_better": True, "trials": trials, "num_val": 360}


def test_racing_adds_seeds_only_where_they_can_change_the_choice(tmp_path: Path) -> None:
    import batchfit.tuning as tuning

    fake = _FakeSweep()
    run = _Run(tmp_path, None, {}, "cpu", "fp32", 0)
    final = tuning._race(fake(None), fake, lambda swept: TuneResult(sweep=swept).results(), run, tolerance=0.01,
                         cap=3)
    seeds = tuning.seeds_per_batch(final)
    # 256 is far worse and slower to the target than the choice: never replicated; the finalist 32 gets 3 seeds,
    # 16 only while it is a finalist (the reference) or could still win (it is slower than 32: it cannot)
    assert seeds[256] == 1 and seeds[32] == 3 and 2 <= seeds[16] <= 3, seeds
    assert fake.calls[0] is None and all(256 not in (c or {}) for c in fake.calls)
    assert tuning.race_round(final, tolerance=0.01, cap=3)[0] == {}
    d = __import__("batchfit.recommend", fromlist=["x"]).decide_results(final, 0.01)
    assert d.batch_size == 32 and d.evidence[32].verdict in ("reference", "non-inferior")


def test_race_round_asks_the_finalists_for_three_seeds_and_the_faster_undecided_for_one_more() -> None:
    from batchfit.tuning import race_round

    one = {"primary_metric": "accuracy", "higher_is_better": True, "num_val": 100_000,
           "trials": [_synthetic_trial(16, 0, 0.95, 400), _synthetic_trial(64, 0, 0.80, 100),
                      _synthetic_trial(256, 0, 0.949, 600)]}
    want, why = race_round(one, tolerance=0.01, cap=3)
    # one seed: nothing can be shown non-inferior; 16 (the reference, chosen) is a finalist, 64 is faster and
    # undecided, 256 is slower than 16 and cannot change the choice
    assert want == {16: 2, 64: 2} and "finalist" in why and "undecided" in why
    assert race_round(one, tolerance=0.01, cap=1) == ({}, "seed cap 1 reached for the undecided batch sizes 64")


def test_seeds_forces_n_seeds_everywhere(tmp_path: Path) -> None:
    res = tune(make_tiny_workload(), out_dir=tmp_path, seeds=2, **TINY)
    trials = res.to_dict()["trials"]
    assert sorted((t["batch_size"], t["seed"]) for t in trials) == [(8, 0), (8, 1), (16, 0), (16, 1)]
    assert {e["batch_size"]: e["seeds"] for e in res.recommendation.intervals} == {8: 2, 16: 2}
    with pytest.raises(ConfigError, match="seeds"):
        tune(make_tiny_workload(), out_dir=tmp_path / "x", seeds=0, **TINY)


def test_precision_check_interleaves_repeated_timings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """11.4: fp32 and bf16 alternate (a load change hits both), each round gives one step time, and the advice is
    taken from the two samples: a bf16 'speed-up' inside the noise keeps fp32."""
    import numpy as np

    import batchfit.tuning as tuning

    order: list[str] = []
    rng = np.random.default_rng(0)

    def fake_round(workload: Any, run: Any, rec: Any, precision: str, steps: int, dev: Any) -> PrecisionRun:
        order.append(precision)
        t = 0.01 * rng.lognormal(0, 0.3)  # the same speed, a noisy machine
        return PrecisionRun("ok", step_seconds=t, samples_per_s=rec.batch_size / t, peak_memory_bytes=None,
                            train_loss=0.5, val_loss=0.6, seconds=0.1)

    monkeypatch.setattr(tuning, "_precision_round", fake_round)
    rec = recommend(__import__("_study_fixture").make_results())
    run = _Run(tmp_path, None, {}, "cpu", "fp32", 0)
    check = tuning._precision_check(make_tiny_workload(), run, rec, steps=48)
    assert order == ["fp32", "bf16"] * tuning.PRECISION_ROUNDS
    assert check.fp32 is not None and check.bf16 is not None and check.fp32.ok and check.bf16.ok
    assert len(check.fp32.timings()) == len(check.bf16.timings()) == tuning.PRECISION_ROUNDS
    # its JSON: the keys it always had, in their order, and back to the same check
    data = check.to_dict()
    assert list(data) == ["steps", "rounds", "steps_per_round", "batch_size", "micro_batch_size", "cost", "fp32",
                          "bf16"]
    assert list(data["bf16"]) == ["status", "step_seconds", "samples_per_s", "peak_memory_bytes", "train_loss",
                                  "val_loss", "seconds"]
    assert len(data["fp32"]["step_seconds"]) == tuning.PRECISION_ROUNDS
    assert PrecisionCheck.from_dict(json.loads(json.dumps(data))) == check
    # resumed from precision.json: the same check
    assert tuning._precision_check(make_tiny_workload(), run, rec, steps=48) == check
    assert len(order) == 2 * tuning.PRECISION_ROUNDS
    for given in (check, data):  # recommend reads the check typed or as its JSON, to the same advice
        advised = recommend(dict(__import__("_study_fixture").make_results(), precision_check=given))
        assert advised.precision == "fp32" and "not a speed-up beyond the noise" in advised.reasons[4]


def test_precision_check_json_forms_round_trip() -> None:
    """Every form the precision check has written (not run, a failed or diverged side, an older check with one
    throughput reading) comes back from its JSON unchanged, unknown keys included."""
    forms = [
        {"note": "bf16 is not available here (no)"},
        {"note": "not run: the cost cap ...", "cost": {"samples": 0, "seconds": 0.0}},
        {"steps": 16, "rounds": 2, "steps_per_round": 8, "batch_size": 32, "micro_batch_size": 32,
         "cost": {"samples": 1024, "seconds": 1.5},
         "fp32": {"status": "ok", "step_seconds": [0.01, 0.011], "samples_per_s": 3000.0, "peak_memory_bytes": 10,
                  "train_loss": 0.5, "val_loss": None, "seconds": 0.2},
         "bf16": {"status": "failed", "error": "boom"}},
        {"fp32": {"status": "diverged", "step_seconds": 0.01, "samples_per_s": 3200.0, "peak_memory_bytes": None,
                  "train_loss": None, "val_loss": None, "seconds": 0.1},
         "bf16": {"status": "ok", "samples_per_s": 1500.0, "newer": 1}, "newer": True},
    ]
    for data in forms:
        check = PrecisionCheck.from_dict(data)
        back = check.to_dict()
        if "newer" in data:  # an older side gets the readings it lacked, as null; nothing it had changes
            assert back["newer"] is True and back["bf16"]["newer"] == 1 and back["bf16"]["step_seconds"] is None
            assert all(back["bf16"][k] == v for k, v in data["bf16"].items())
        else:
            assert back == data
        assert PrecisionCheck.from_dict(back) == check


def test_lr_peak_is_the_curves_vertex_not_the_argmax_of_noisy_scores() -> None:
    """11.3: x16 and x32 score within noise of each other: whichever a seed put first, the chosen multiplier is the
    same point between them (the parabola's vertex), not a x2 jump."""
    from batchfit.metric import Metric
    from batchfit.stats import Interval
    from batchfit.tuning import _lr_peak

    acc = Metric("accuracy", True)

    def ivs(scores: dict[float, float], half: float = 0.004) -> dict[float, Interval]:
        return {m: Interval(v, v - half, v + half) for m, v in scores.items()}

    a = ivs({4: 0.93, 8: 0.945, 16: 0.9530, 32: 0.9526, 64: 0.93})
    b = ivs({4: 0.93, 8: 0.945, 16: 0.9526, 32: 0.9530, 64: 0.93})
    pa, pb = _lr_peak(a, acc, 16), _lr_peak(b, acc, 32)
    assert 16 <= pa <= 32 and 16 <= pb <= 32 and max(pa, pb) / min(pa, pb) < 1.25, (pa, pb)
    # the peak stays inside the multipliers tied with the best (here only x2 is): a clear winner is itself
    clear = ivs({1: 0.70, 2: 0.95, 4: 0.80}, half=0.01)
    assert _lr_peak(clear, acc, 2) == 2
    # at the edge of the tried range, or where the curve is not peaked, the best itself
    assert _lr_peak(ivs({1: 0.90, 2: 0.93, 4: 0.95}), acc, 4) == 4
    assert _lr_peak(ivs({1: 0.95, 2: 0.90, 4: 0.95}, half=0.1), acc, 1) == 1
    loss = Metric("val_loss", False)
    assert 1 < _lr_peak(ivs({0.5: 0.50, 1: 0.30, 2: 0.31, 4: 0.6}, half=0.05), loss, 1) < 2


def test_lr_check_replicates_a_close_call_and_keeps_the_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """11.2: x2 looks 0.3 % better than x1 on one seed: both get more seeds; still inside the noise -> base kept,
    and the check says so. A clear win moves the base LR without extra seeds."""
    import batchfit.tuning as tuning
    from batchfit.study import parse_budget

    def fake(scores: dict[float, float]) -> Any:
        calls: list[tuple[float, int]] = []

        def lr_run(workload: Any, run: Any, metric: Any, batch: int, steps: int, m: float,
                   seed: int | None = None) -> dict[str, Any]:
            calls.append((m, seed))
            noise = 0.004 * (((seed or 0) + int(4 * m)) % 3 - 1)  # each run its own: x2 - x1 is +0.007, -0.005, +0.007
            return {"multiplier": m, "lr": 0.1 * m, "score": scores.get(m, 0.5) + noise, "diverged": False,
                    "seconds": 0.0, "samples": 1, "seed": seed}

        return lr_run, calls

    close = {0.25: 0.80, 0.5: 0.90, 1.0: 0.950, 2.0: 0.953, 4.0: 0.90, 8.0: 0.7}
    lr_run, calls = fake(close)
    monkeypatch.setattr(tuning, "_lr_run", lr_run)
    run = _Run(tmp_path, None, {"workload": "tiny"}, "cpu", "fp32", 0)
    check = _calibrate_lr(make_tiny_workload(n_val=1000), run, budget=parse_budget("epochs:2"),
                          multipliers=LR_CALIBRATION_MULTIPLIERS, tolerance=0.0)
    assert check.kept_base and check.best_multiplier == 1.0
    assert sorted(c for c in calls if c[1] != 0) == [(1.0, 1), (1.0, 2), (2.0, 1), (2.0, 2)]  # only the close two
    assert "inside the noise" in check.decision and check.intervals["2"]["n"] == 3
    clear = {0.25: 0.5, 0.5: 0.6, 1.0: 0.70, 2.0: 0.95, 4.0: 0.80, 8.0: 0.6}
    lr_run, calls = fake(clear)
    monkeypatch.setattr(tuning, "_lr_run", lr_run)
    moved = _calibrate_lr(make_tiny_workload(n_val=1000), dataclasses.replace(run, out=tmp_path / "b"),
                          budget=parse_budget("epochs:2"), multipliers=LR_CALIBRATION_MULTIPLIERS, tolerance=0.0)
    assert moved.best_multiplier == 2.0 and not moved.kept_base and "beyond the noise" in moved.decision
    assert all(seed == 0 for _, seed in calls)  # decided on one seed each


def test_lr_check_decides_on_paired_seeds_and_adjusts_for_them(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A close call's extra seeds share each seed's initialization and data order with every multiplier: x4 beats
    x1 by about 0.03 on every seed while the seeds themselves move both by +-0.05 (demo:mnist1d's 8-step runs at
    cap 0.5: x1 0.16, 0.115, 0.086 and x2 0.184, 0.128, 0.104). Compared unpaired, their t intervals overlap and
    the base LR stays; two seeds are too few for the paired test (two equal differences by chance would give a
    zero-width interval), so the intervals still decide; three (+0.03 [+0.018, +0.042]) are not inside the noise:
    the base LR moves, and the estimates of x1 and x4 are read on the seeds' average, like those of the
    multipliers that ran on the first seed only."""
    import batchfit.tuning as tuning
    from batchfit.metric import Metric
    from batchfit.study import parse_budget

    scores = {0.25: 0.10, 0.5: 0.12, 1.0: 0.14, 2.0: 0.16, 4.0: 0.17, 8.0: 0.12}
    seed_effect = {0: 0.05, 1: 0.0, 2: -0.05}

    def lr_run(workload: Any, run: Any, metric: Any, batch: int, steps: int, m: float,
               seed: int | None = None) -> dict[str, Any]:
        jitter = {(4.0, 1): -0.005, (4.0, 2): 0.005}.get((m, seed or 0), 0.0)  # x4 - x1: 0.03, 0.025, 0.035
        return {"multiplier": m, "lr": 0.1 * m, "score": scores[m] + seed_effect[seed or 0] + jitter,
                "diverged": False, "seconds": 0.0, "samples": 1, "seed": seed}

    monkeypatch.setattr(tuning, "_lr_run", lr_run)
    run = _Run(tmp_path, None, {"workload": "tiny"}, "cpu", "fp32", 0)
    check = _calibrate_lr(make_tiny_workload(n_val=100), run, budget=parse_budget("epochs:2"),
                          multipliers=LR_CALIBRATION_MULTIPLIERS, tolerance=0.01)
    assert {r["seed"] for r in check.runs if r["multiplier"] in (1.0, 4.0)} == {0, 1, 2}  # the close call got seeds
    assert not check.kept_base and 2.0 <= check.best_multiplier <= 4.0, check.decision
    assert "paired over 3 seeds, x4 better than x1 by +0.03 [+0.0176, +0.0424]" in check.decision, check.decision
    # the seeds' effects out: x1 and x2 at their scores + the seeds' mean effect (0), not shifted by seed 0's +0.05;
    # the multipliers run on seed 0 only are read at that seed's level minus its effect
    ests = {float(m): iv["estimate"] for m, iv in check.intervals.items()}
    assert ests[1.0] == pytest.approx(0.14) and ests[4.0] == pytest.approx(0.17)
    assert ests[2.0] == pytest.approx(0.16) and ests[0.25] == pytest.approx(0.10)
    # unpaired, the same runs would be inside the noise
    runs = check.runs
    ivs = tuning._lr_intervals([r for r in runs if r["multiplier"] in (1.0, 4.0)], Metric("accuracy", True), 100,
                               0.01)
    assert ivs[1.0].overlaps(ivs[4.0])
    # a paired difference inside the noise keeps the base (the other test); one seed each: the intervals decide
    assert tuning._paired_gain(runs[:6], Metric("accuracy", True), 4.0) is None
    # three equal differences (an accuracy moves in steps of 1/n) say nothing of the spread: no paired test
    equal = [{"multiplier": m, "seed": sd, "score": 0.5 + 0.02 * (m == 4.0) + 0.01 * sd}
             for sd in range(3) for m in (1.0, 4.0)]
    assert tuning._paired_gain(equal, Metric("accuracy", True), 4.0) is None
    # a loss: lower is better, and "better by" is positive when x4's loss is lower
    loss = [{"multiplier": m, "seed": sd, "score": 1.0 - 0.03 * (m == 4.0) + 0.1 * sd + 0.001 * sd * (m == 4.0)}
            for sd in range(3) for m in (1.0, 4.0)]
    gain = tuning._paired_gain(loss, Metric("val_loss", False), 4.0)
    assert gain is not None and gain.estimate == pytest.approx(0.029) and gain.low > 0


def test_a_capped_lr_check_races_below_the_base_batch_when_the_base_cannot_afford_it(tmp_path: Path) -> None:
    """demo:mnist1d at cap 0.5: the check's share buys 93 steps at the base batch 64, too few for the race's
    second rung (one rung of 8-step runs, its move held at x4: every answer 9-15 % behind the whole run's best).
    At a quarter of the base batch the same samples buy 4x the steps and the race; each LR there is the LR rule's
    for that batch x the multiplier, so the multiplier still moves the base LR."""
    from batchfit.metric import Metric
    from batchfit.study import parse_budget
    from batchfit.tuning import _check_batch, _lr_check_steps, _lr_run

    wl = make_tiny_workload(n=2048, n_val=64, base_batch_size=64, lr=0.1)  # SGD: the linear rule
    bud = parse_budget("epochs:4")
    share = 64 * 100  # 100 steps at the base batch
    assert _lr_check_steps(64, bud.steps_for(64, 2048), share, 6)[1] is None  # no race at the base batch
    batch, s0, s1 = _check_batch(wl, bud, share, 6, 3, 5, smallest=16)
    assert (batch, s0, s1) == (16, 19, 76) and 5 * s0 + 4 * s1 <= share // 16
    assert _check_batch(wl, bud, share, 6, 3, 5, smallest=32)[:1] == (32,)  # never below the smallest candidate
    assert _check_batch(wl, bud, share, 6, 3, 5, smallest=64) == (64, 8, None)  # nowhere to go: one rung
    assert _check_batch(wl, bud, None, 6, 3, 5, smallest=16)[0] == 64  # uncapped
    assert _check_batch(wl, bud, 64 * 1000, 6, 3, 5, smallest=16)[0] == 64  # the race fits at the base batch
    run = _Run(tmp_path, None, {"workload": "tiny"}, "cpu", "fp32", 0)
    metric = Metric.for_workload(wl)
    assert _lr_run(wl, run, metric, 16, 3, 2.0)["lr"] == pytest.approx(0.1 * 2.0 * 16 / 64)
    assert _lr_run(wl, run, metric, 64, 3, 2.0)["lr"] == pytest.approx(0.1 * 2.0)
    check = _calibrate_lr(wl, run, budget=bud, multipliers=LR_CALIBRATION_MULTIPLIERS, tolerance=0.01,
                          max_samples=share, train_samples=4 * 2048, smallest=16)
    assert check.batch_size == 16 and check.rungs[1]["steps"] == 76
    assert "checked at batch 16, not the base batch 64" in check.decision
    assert check.lr == pytest.approx(0.1 * check.best_multiplier)  # a multiplier of the base LR
    assert all(r["lr"] == pytest.approx(0.1 * r["multiplier"] / 4) for r in check.runs)
    assert sum(r["samples"] for r in check.runs) <= share


def test_the_race_moves_the_base_lr_only_against_x1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/text_dict at cap 1.0: every first-rung run at chance (0.49-0.51), x16 first by noise. The race then
    searched x8-x32 at the second rung, also at chance, and with x1 absent there its best "won": the base LR moved
    x6.8 on nothing (21.6 % behind the reference's best instead of 14 % at the base LR). Now a first-rung best
    inside x1's noise sends x1 to the second rung too, and the decision there is against it: at chance, the base LR
    stays. A first rung that does tell (mnist1d: x16 0.20 vs x1 0.12) leaves x1 behind, as before."""
    import batchfit.tuning as tuning
    from batchfit.study import parse_budget

    def fake(first: dict[float, float], second: dict[float, float]) -> Any:
        def lr_run(workload: Any, run: Any, metric: Any, batch: int, steps: int, m: float,
                   seed: int | None = None) -> dict[str, Any]:
            score = (first if steps < 40 else second).get(m, 0.495) + 0.002 * (seed or 0)
            return {"multiplier": m, "lr": 0.1 * m, "score": score, "diverged": False, "seconds": 0.0,
                    "samples": batch * steps, "seed": seed}
        return lr_run

    wl = make_tiny_workload(n=2048, n_val=1000, base_batch_size=16, lr=0.1)
    run = _Run(tmp_path, None, {"workload": "tiny"}, "cpu", "fp32", 0)
    chance = {0.25: 0.497, 1.0: 0.499, 4.0: 0.496, 16.0: 0.506, 64.0: 0.498}
    monkeypatch.setattr(tuning, "_lr_run", fake(chance, {8.0: 0.498, 16.0: 0.503, 32.0: 0.501, 1.0: 0.500}))
    check = _calibrate_lr(wl, run, budget=parse_budget("epochs:10"), multipliers=LR_CALIBRATION_MULTIPLIERS,
                          tolerance=0.01, max_samples=16 * 400, train_samples=20000)
    second = {r["multiplier"] for r in check.runs if r["steps"] == check.steps}
    assert check.rungs[0]["steps"] == 19 and check.steps == 76
    assert second == {8.0, 16.0, 32.0, 1.0}, second
    assert check.kept_base, check.decision
    assert "the first rung's best, x16, was inside x1's noise at 19 steps, so x1 ran at 76 steps too" in \
        check.decision
    # a first rung that tells leaves x1 behind and leads the second
    tells = {0.25: 0.10, 1.0: 0.12, 4.0: 0.15, 16.0: 0.20, 64.0: 0.16}
    monkeypatch.setattr(tuning, "_lr_run", fake(tells, {8.0: 0.30, 16.0: 0.34, 32.0: 0.31}))
    led = _calibrate_lr(wl, dataclasses.replace(run, out=tmp_path / "b"), budget=parse_budget("epochs:10"),
                        multipliers=LR_CALIBRATION_MULTIPLIERS, tolerance=0.01, max_samples=16 * 400,
                        train_samples=20000)
    assert {r["multiplier"] for r in led.runs if r["steps"] == led.steps} == {8.0, 16.0, 32.0}
    assert not led.kept_base and "x1 was left at the first rung, where x16 beat it beyond the noise" in led.decision
    # x1 sent to the second rung and diverging there: said as such, not as left behind

    def diverging(workload: Any, run: Any, metric: Any, batch: int, steps: int, m: float,
                  seed: int | None = None) -> dict[str, Any]:
        r = fake(chance, {8.0: 0.498, 16.0: 0.503, 32.0: 0.501})(workload, run, metric, batch, steps, m, seed)
        return {**r, "score": None, "diverged": True} if m == 1.0 and steps >= 40 else r

    monkeypatch.setattr(tuning, "_lr_run", diverging)
    lost = _calibrate_lr(wl, dataclasses.replace(run, out=tmp_path / "c"), budget=parse_budget("epochs:10"),
                         multipliers=LR_CALIBRATION_MULTIPLIERS, tolerance=0.01, max_samples=16 * 400,
                         train_samples=20000)
    assert "x1 diverged at 76 steps" in lost.decision and "left at the first rung" not in lost.decision


def test_the_tolerance_is_stored_with_the_results_and_every_reader_decides_with_it(tmp_path: Path) -> None:
    """Issue 20.2: recommend(load_results(out)) equals what `batchfit report out` prints, at tune's own tolerance
    (stored, not the 0.01 default) and at any other one given to both."""
    from batchfit.cli import main
    from batchfit.study import load_results

    out = tmp_path / "out"
    res = tune(make_tiny_workload(), out_dir=out, tolerance=0.2, find=False, lr_calibration=False, **TINY)
    assert res.recommendation is not None and res.recommendation.tolerance == 0.2
    stages = json.loads((out / "stages.json").read_text())
    assert stages["tolerance"] == 0.2 and {"noise", "train_budget", "num_val"} <= set(stages["stages"])
    loaded = load_results(out)
    assert loaded.tolerance == 0.2 and recommend(loaded) == res.recommendation
    for extra in ([], ["--tolerance", "0.001"]):
        rep = tmp_path / f"rep{len(extra)}.json"
        assert main(["report", str(out), "--out", str(tmp_path / "r"), "--json", str(rep), "-q", *extra]) == 0
        printed = Recommendation.from_dict(json.loads(rep.read_text())["recommendation"])
        assert printed == recommend(loaded, tolerance=float(extra[1]) if extra else None)
        assert printed.tolerance == (0.001 if extra else 0.2)
    with pytest.raises(ConfigError, match="holds no batchfit.db"):
        load_results(tmp_path)


def test_tune_decides_once_and_the_precision_check_only_sets_the_precision(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20.2: one recommend() in tune; the precision check (measured on the recommended configuration) then
    sets only the precision, its reason, advice and snippets, and equals a full recommend() of the final results."""
    import batchfit.recommend as rec_module

    calls: list[int] = []
    real = rec_module.recommend

    def counting(*a: object, **k: object) -> Recommendation:
        calls.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(rec_module, "recommend", counting)
    res = tune(make_tiny_workload(), out_dir=tmp_path, find=False, lr_calibration=False,
               **{**TINY, "precision_check": True})
    assert calls == [1]
    assert res.precision_check is not None and res.recommendation is not None
    assert res.recommendation == real(res.results())  # the same as deciding again on everything
    assert res.recommendation.precision_advice is not None


def test_seed_adjusted_scores_recover_additive_effects_on_any_unbalanced_design() -> None:
    """`_seed_adjusted` on scores that are exactly `a_m + b_seed`: every multiplier on the first seed, the extra
    seeds on x1 and one contender (the LR check's design), runs that gave no score left out -- it returns
    `a_m + mean(b)` whatever the effects; a balanced design gives the plain means."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from batchfit.tuning import _seed_adjusted

    mults = (0.25, 1.0, 4.0, 16.0, 64.0)
    effect = st.floats(-0.3, 0.3, allow_nan=False)

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(a=st.lists(effect, min_size=5, max_size=5), b=st.lists(effect, min_size=3, max_size=3),
           contender=st.sampled_from([0.25, 4.0, 16.0, 64.0]), extra=st.integers(0, 2),
           lost=st.sampled_from([None, 0.25, 16.0]))
    def check(a: list[float], b: list[float], contender: float, extra: int, lost: float | None) -> None:
        seeds = list(range(1 + extra))
        runs = [{"multiplier": m, "seed": 0, "score": None if m == lost and m not in (1.0, contender) else
                 a[i] + b[0]} for i, m in enumerate(mults)]
        runs += [{"multiplier": m, "seed": s, "score": a[mults.index(m)] + b[s]} for s in seeds[1:]
                 for m in (1.0, contender)]
        got = _seed_adjusted(runs)
        mean_b = sum(b[s] for s in seeds) / len(seeds)
        for i, m in enumerate(mults):
            if m == lost and m not in (1.0, contender):
                assert m not in got
            else:
                assert got[m] == pytest.approx(a[i] + mean_b, abs=1e-9)

    check()
    balanced = [{"multiplier": m, "seed": s, "score": 0.1 * m + 0.01 * s} for m in (1.0, 2.0) for s in (0, 1)]
    assert _seed_adjusted(balanced) == pytest.approx({1.0: 0.105, 2.0: 0.205})
