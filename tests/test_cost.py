"""What an answer costs, in runs of the user's train budget (issue 18.1), and the cap on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchfit import cost
from batchfit.errors import ConfigError
from conftest import make_tiny_workload


@pytest.mark.parametrize(("text", "samples"), [("samples:5000", 5000), ("epochs:2.5", 240), ("steps:10", 160),
                                               ("tokens:960", 30)])
def test_train_budget_in_samples(text: str, samples: int) -> None:
    b = cost.parse_train_budget(text)
    assert cost.train_budget_samples(b, num_train=96, base_batch_size=16, tokens_per_sample=32) == samples


@pytest.mark.parametrize("bad", ["epochs", "weeks:3", "samples:-1", "samples:nan", "epochs:inf", 20])
def test_a_bad_train_budget_is_one_clear_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="train_budget"):
        cost.parse_train_budget(bad)  # type: ignore[arg-type]


def test_a_token_budget_needs_the_tokens_per_sample() -> None:
    with pytest.raises(ConfigError, match="tokens_per_sample"):
        cost.train_budget_samples(cost.parse_train_budget("tokens:1e6"), num_train=10, base_batch_size=2)


def test_measure_counts_every_sample_the_one_training_step_trains() -> None:
    from batchfit.engine import train

    with cost.measure() as m:
        train(make_tiny_workload(), batch_size=8, micro_batch_size=4, steps=5, seed=0)
    assert m.samples == 5 * 8 and m.seconds > 0.0  # micro-batches count once: samples, not forward calls
    with cost.measure() as inner:
        pass
    assert inner.samples == 0


def test_plan_horizon_fits_the_cap_and_never_passes_the_train_budget() -> None:
    h, runs = cost.plan_horizon(100_000, 1.0, 8)
    room = 1.0 - (cost.STAGE_SHARES["lr_check"] + cost.STAGE_SHARES["step_time"] + cost.STAGE_SHARES["precision"])
    assert runs == 8 + 4 + 2 and h == int(room * 100_000 / runs)  # 8, the finalists' 2 more seeds, 2 undecided
    assert cost.plan_horizon(100_000, 1.0, 8, spent=50_000)[0] == int((room * 100_000 - 50_000) / runs)
    assert cost.plan_horizon(1000, 100.0, 2)[0] == 1000  # a generous cap: the whole train budget
    # batch sizes that search their LR (3 trials each for 4 of 8 sizes): racing's seeds cost 1.5 trials each too
    assert cost.plan_horizon(100_000, 1.0, 8, first_round=16)[1] == 16 + 2 * 6


def test_each_stage_gets_its_share_of_the_cap() -> None:
    assert cost.allowance("lr_check", 10_000, None) is None
    assert cost.allowance("lr_check", 10_000, 0.5) == int(cost.STAGE_SHARES["lr_check"] * 5_000)
    assert sum(cost.STAGE_SHARES.values()) < 0.5  # the sweep keeps most of the cap


def test_step_timing_fits_its_sample_share() -> None:
    from batchfit.steptime import MIN_ROUNDS, WARMUP_STEPS, calibrate_step_time, sample_plan

    sizes, rounds, chunk, out = sample_plan([8, 16, 64], 8, 10_000)
    assert (sizes, out) == ([8, 16, 64], []) and rounds == 8 and chunk >= 1
    assert (WARMUP_STEPS + 1) * 88 + rounds * chunk * 88 <= 10_000
    # too little for one step a round at 64: it is left out, the smaller ones are still timed
    sizes, rounds, chunk, out = sample_plan([8, 16, 64], 8, (WARMUP_STEPS + 1 + MIN_ROUNDS) * 24)
    assert sizes == [8, 16] and out == [64] and rounds == MIN_ROUNDS and chunk == 1
    wl = make_tiny_workload(n=256)
    budget = 3_000
    with cost.measure() as m:
        cal = calibrate_step_time(wl, {8: 8, 16: 16, 64: 64}, max_samples=budget)
    assert 0 < m.samples <= budget and set(cal.seconds) == {8, 16, 64}
    with cost.measure() as m:
        cal = calibrate_step_time(wl, {8: 8, 16: 16, 64: 64}, max_samples=(WARMUP_STEPS + 1 + MIN_ROUNDS) * 24)
    assert m.samples <= (WARMUP_STEPS + 1 + MIN_ROUNDS) * 24 and set(cal.seconds) == {8, 16}
    assert "cost cap" in cal.errors[64]


def test_tune_is_capped_at_one_run_by_default_unless_it_is_given_a_budget(tmp_path: Path) -> None:
    from batchfit.tuning import tune

    wl = make_tiny_workload(n=512)
    res = tune(wl, out_dir=tmp_path / "auto", batch_sizes=[8, 16, 32], train_budget="epochs:20", seeds=1,
               seed=0).to_dict()
    spent = res["cost"]
    assert res["train_budget"]["max_cost"] == cost.DEFAULT_MAX_COST == 1.0
    assert spent["within_cap"] is True and spent["runs"] <= 1.0
    assert res["find"].get("throughput_knee_batch_size") is None  # capped: step timing times the candidates
    # the finder searched only the sizes a trial could use, and says so (issue 23.3)
    assert res["find"]["max_batch_size"] < 512 and "under the cost cap" in res["find"]["search_cap_reason"]
    assert set(spent["by_stage"]) >= {"find", "lr_check", "sweep"}
    for stage in ("noise", "lr_check", "step_time", "precision"):  # each stage within its share
        if stage in spent["by_stage"]:
            assert spent["by_stage"][stage]["samples"] <= cost.allowance(stage, 512 * 20, 1.0), stage
    given = tune(wl, out_dir=tmp_path / "given", batch_sizes=[8, 16], budget="steps:4", seeds=1, seed=0, find=False,
                 noise=False, precision_check=False, lr_calibration=False).to_dict()
    assert given["train_budget"]["max_cost"] is None  # a budget set by hand is not capped unless asked


def test_a_cap_too_small_for_the_precision_check_says_so(tmp_path: Path) -> None:
    from batchfit.tuning import tune

    res = tune(make_tiny_workload(n=256), out_dir=tmp_path, batch_sizes=[8, 16], train_budget="epochs:2",
               find=False, noise=False, lr_calibration=False, seeds=1, seed=0).to_dict()
    check = res["precision_check"]
    assert check["note"].startswith("not run: the cost cap leaves") and "raise --max-cost" in check["note"]
    assert res["cost"]["by_stage"]["precision"]["samples"] == 0


def test_cost_of_adds_every_stage_and_trial() -> None:
    results = {"find": {"cost": {"samples": 100, "seconds": 1.0}}, "noise": {"cost": {"samples": 50, "seconds": 0.5}},
               "lr_calibration": {"runs": [{"samples": 10, "seconds": 0.1}, {"samples": 20, "seconds": 0.2}]},
               "trials": [{"samples": 400, "seconds": 2.0, "status": "ok"}, {"samples": None, "status": "failed"}],
               "train_budget": {"budget": "samples:290", "samples": 290, "max_cost": 1.0}}
    c = cost.cost_of(results)
    assert c.samples == 580 and c.runs == pytest.approx(2.0) and c.within_cap is False
    assert c.by_stage["lr_check"] == {"samples": 30, "seconds": pytest.approx(0.3)}
    assert c.by_stage["sweep"]["trials"] == 2
    assert "cost 2.00 runs" in c.line() and "cap 1" in c.line()
    assert cost.Cost.from_dict(c.to_dict()).to_dict() == c.to_dict()


def test_tune_states_its_cost_and_a_cap_shortens_every_trial_to_an_equal_share(tmp_path: Path) -> None:
    from batchfit.tuning import tune

    wl = make_tiny_workload(n=256)
    res = tune(wl, out_dir=tmp_path / "capped", batch_sizes=[8, 16, 32], train_budget="epochs:10", max_cost=2.0,
               noise=False, find=False, precision_check=False, lr_calibration=False, seed=0)
    data = res.to_dict()
    plan, spent = data["train_budget"], data["cost"]
    assert plan["samples"] == 2560 and plan["max_cost"] == 2.0
    h = plan["measurement_samples"]
    assert h < 2560 and data["budget"] == {"kind": "samples", "value": h}
    for t in data["trials"]:  # equal samples at every batch size (the last step may round up)
        assert h <= t["samples"] < h + t["batch_size"]
    assert spent["runs"] == pytest.approx(spent["samples"] / 2560) and spent["by_stage"]["sweep"]["trials"] >= 3
    assert any(f.startswith("short horizon") for f in data["recommendation"]["flags"])
    # uncapped: every candidate trains the whole train budget, and the cost says how many runs that was
    full = tune(wl, out_dir=tmp_path / "full", batch_sizes=[8, 16], train_budget="epochs:2", noise=False,
                find=False, precision_check=False, lr_calibration=False, seeds=1, seed=0, max_cost=None).to_dict()
    assert full["train_budget"]["measurement"] == "epochs:2"
    # two whole runs, and B_simple's extra half-batch passes on every 8th step (1/8 more)
    assert full["cost"]["by_stage"]["sweep"]["samples"] == pytest.approx(2 * 512 * 9 / 8, rel=0.05)
    assert full["cost"]["runs"] > 2.0  # and step timing on top
    assert not any(f.startswith("short horizon") for f in full["recommendation"]["flags"])


def test_an_equal_steps_budget_warns_that_large_batches_got_more_data(tmp_path: Path) -> None:
    from batchfit.tuning import tune

    res = tune(make_tiny_workload(n=256), out_dir=tmp_path, batch_sizes=[8, 32], budget="steps:6", noise=False,
               find=False, precision_check=False, lr_calibration=False, seeds=1, seed=0)
    flags = res.to_dict()["recommendation"]["flags"]
    assert any(f.startswith("equal-steps budget: batch 32 trained 4x the samples of batch 8") for f in flags), flags


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True])
def test_a_bad_max_cost_is_refused_before_any_work(tmp_path: Path, bad: object) -> None:
    from batchfit.tuning import tune

    with pytest.raises(ConfigError, match="max_cost"):
        tune(make_tiny_workload(), out_dir=tmp_path, max_cost=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "find.json").exists()


def test_every_output_states_its_cost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """results.json, the report and the -q line each say what the answer cost in runs of the train budget."""
    import json

    from batchfit.cli import main

    (tmp_path / "tinywl.py").write_text("from conftest import make_tiny_workload\n"
                                        "def make():\n    return make_tiny_workload(n=256)\n")
    wl = f"{tmp_path / 'tinywl.py'}:make"
    out = tmp_path / "out"
    assert main(["tune", "-w", wl, "-b", "8,16", "--train-budget", "epochs:3", "--no-find", "--no-noise",
                 "--no-precision-check", "--no-lr-calibration", "--seeds", "1", "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    runs = data["cost"]["runs"]
    assert 0 < runs <= 1.0 and f"cost {runs:.2f} runs" in err and "of the train budget epochs:3" in err
    assert "cap 1" in err and data["cost"]["within_cap"] is True  # the default cap, stated
    assert f"This answer's cost {runs:.2f} runs" in (out / "report.md").read_text()
    assert f"This answer&#x27;s cost {runs:.2f} runs" in (out / "report.html").read_text() or \
        f"This answer's cost {runs:.2f} runs" in (out / "report.html").read_text()


@pytest.mark.parametrize(("argv", "words"), [(["--max-cost", "-1"], "--max-cost"),
                                             (["--max-cost", "lots"], "--max-cost"),
                                             (["--train-budget", "weeks:3"], "--train-budget"),
                                             (["--train-budget", "epochs:0"], "--train-budget")])
def test_bad_budget_flags_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  argv: list[str], words: str) -> None:
    from batchfit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["tune", *argv, "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and words in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o").exists()


def test_a_capped_lr_check_far_shorter_than_the_run_moves_the_lr_at_most_x4(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Short runs favour large LRs (Wu et al. 2018): a capped check of a few steps is not extended past its range
    and its move is held at x4; uncapped, the same scores extend the range and move the LR further."""
    import batchfit.tuning as tuning
    from batchfit.study import parse_budget

    calls: list[float] = []

    def lr_run(workload: object, run: object, metric: object, batch: int, steps: int, m: float,
               seed: int | None = None) -> dict[str, object]:
        calls.append(m)  # the score grows with the LR up to x32: a short-horizon curve
        return {"multiplier": m, "lr": 0.1 * m, "score": 0.5 + 0.05 * min(m, 32.0), "diverged": False,
                "seconds": 0.0, "samples": steps * batch, "seed": seed}

    monkeypatch.setattr(tuning, "_lr_run", lr_run)
    wl = make_tiny_workload(n=512, n_val=1000)
    run = tuning._Run(tmp_path / "capped", None, {"workload": "tiny"}, "cpu", "fp32", 0)
    capped = tuning._calibrate_lr(wl, run, budget=parse_budget("epochs:20"),
                                  multipliers=tuning.LR_CALIBRATION_MULTIPLIERS, tolerance=0.0, max_samples=2_000,
                                  train_samples=512 * 20)
    assert max(calls) == 8.0 and capped.best_multiplier == tuning.LR_SHORT_CHECK_MAX_MOVE == 4.0
    assert "held at x4" in capped.decision and capped.steps >= tuning.LR_CHECK_MIN_STEPS
    calls.clear()
    free = tuning._calibrate_lr(wl, tuning._Run(tmp_path / "free", None, {"workload": "tiny"}, "cpu", "fp32", 0),
                                budget=parse_budget("epochs:20"), multipliers=tuning.LR_CALIBRATION_MULTIPLIERS,
                                tolerance=0.0)
    assert max(calls) > 8.0 and free.best_multiplier > 4.0 and "held at" not in free.decision


def test_a_capped_lr_check_races_to_a_longer_horizon_and_carries_the_lr_to_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18.2: under the cap the LR check is a race -- every multiplier for a few steps, then the region's best
    and its x1/2 and x2 neighbours for as long as the share allows; the peak there, scaled to the train budget by
    horizon^-LR_HORIZON_EXPONENT, is the LR. On scores whose peak falls with the horizon (x16 at 8 steps, as
    16 * (8 / steps)^0.3 after), the chosen LR is the peak at the second rung's horizon, carried to the run."""
    import math

    import batchfit.tuning as tuning
    from batchfit.study import parse_budget

    calls: list[tuple[float, int, int]] = []

    def peak(steps: int) -> float:
        return 16.0 * (8 / steps) ** 0.3

    def lr_run(workload: object, run: object, metric: object, batch: int, steps: int, m: float,
               seed: int | None = None) -> dict[str, object]:
        calls.append((m, steps, seed or 0))
        score = max(0.05, 0.9 - 0.05 * (math.log2(m) - math.log2(peak(steps))) ** 2)  # an accuracy
        return {"multiplier": m, "lr": 0.1 * m, "score": score, "diverged": False, "seconds": 0.0,
                "samples": steps * batch, "seed": seed}

    monkeypatch.setattr(tuning, "_lr_run", lr_run)
    wl = make_tiny_workload(n=512, n_val=1000, lr=0.01)  # base batch 16
    s0, s1 = tuning._lr_check_steps(16, 10_000, 2_304 + 512, len(tuning.LR_CALIBRATION_MULTIPLIERS))
    assert (s0, s1) == (tuning.LR_CHECK_MIN_STEPS, 34)  # 5 x 8 + 4 x 34 steps = the share's 176
    run = tuning._Run(tmp_path, None, {"workload": "tiny"}, "cpu", "fp32", 0)
    check = tuning._calibrate_lr(wl, run, budget=parse_budget("epochs:20"),
                                 multipliers=tuning.LR_CALIBRATION_MULTIPLIERS, tolerance=0.0, max_samples=2_816,
                                 train_samples=5_120)
    first = [c for c in calls if c[1] == s0]
    second = [c for c in calls if c[1] == s1]
    assert [c[0] for c in first] == list(tuning.LR_RACE_MULTIPLIERS)  # x1/4 ... x64, x4 apart, short
    # the region's best (x16) and its x2 neighbours; the peak at 34 steps (x10.3) puts x8 first, at the rung's lower
    # edge: one more x2 step that way
    assert sorted(c[0] for c in second) == [4.0, 8.0, 16.0, 32.0]
    assert len(calls) == len(first) + len(second) and sum(s * 16 for _, s, _ in calls) <= 2_816  # within its share
    factor = (s1 * 16 / 5_120) ** tuning.LR_HORIZON_EXPONENT
    assert check.lr_at_check_horizon == pytest.approx(0.01 * peak(s1), rel=1e-6)  # the peak at 34 steps, not x16
    assert check.horizon_factor == pytest.approx(factor) and check.lr == pytest.approx(0.01 * peak(s1) * factor)
    assert check.lr_interval[0] <= check.lr <= check.lr_interval[1] and not check.kept_base
    assert check.lr_interval_open == []  # the tied x8 and x16 lie inside x4 ... x32: the response was bracketed
    assert check.steps == s1 and [r["steps"] for r in check.rungs] == [s0, s1] and "Bjorck" in check.decision
    assert tuning.LRCheck.from_dict(check.to_dict()) == check
    calls.clear()  # a rerun reads the finished check back, with nothing trained
    again = tuning._calibrate_lr(wl, run, budget=parse_budget("epochs:20"),
                                 multipliers=tuning.LR_CALIBRATION_MULTIPLIERS, tolerance=0.0, max_samples=2_816,
                                 train_samples=5_120)
    assert calls == [] and again.lr == check.lr
    top = 40.0  # x64 first at 8 steps; the peak below the second rung's edge (x25.9 at 34): one more x2 step down
    calls.clear()

    def _shifted(workload: object, run: object, metric: object, batch: int, steps: int, m: float,
                 seed: int | None = None) -> dict[str, object]:
        calls.append((m, steps, seed or 0))
        score = max(0.05, 0.9 - 0.05 * (math.log2(m) - math.log2(top * (8 / steps) ** 0.3)) ** 2)  # an accuracy
        return {"multiplier": m, "lr": 0.1 * m, "score": score, "diverged": False, "seconds": 0.0,
                "samples": steps * batch, "seed": seed}

    monkeypatch.setattr(tuning, "_lr_run", _shifted)
    past = tuning._calibrate_lr(wl, tuning._Run(tmp_path / "past", None, {"workload": "tiny"}, "cpu", "fp32", 0),
                                budget=parse_budget("epochs:20"), multipliers=tuning.LR_CALIBRATION_MULTIPLIERS,
                                tolerance=0.0, max_samples=2_816, train_samples=5_120)
    assert sorted(c[0] for c in calls if c[1] == s1) == [16.0, 32.0, 64.0, 128.0]
    assert sum(s * 16 for _, s, _ in calls) <= 2_816
    assert past.lr_at_check_horizon == pytest.approx(0.01 * top * (8 / s1) ** 0.3, rel=1e-6)


def test_the_plan_takes_back_a_size_the_longer_horizon_now_fits() -> None:
    """Leaving sizes out lengthens every other trial; a size dropped on the first pass that then has its 8 steps
    comes back (and is not named as left out)."""
    from batchfit.tuning import MIN_PLANNED_STEPS, _measurement_plan

    wl = make_tiny_workload(n=512)
    train = cost.parse_train_budget("epochs:45")  # 23,040 samples
    sizes = [8, 16, 32, 64, 128, 256, 512]
    h_all = cost.plan_horizon(23_040, 1.0, len(sizes), overhead=1 / 8)[0]
    assert h_all // 128 < MIN_PLANNED_STEPS  # all seven: 128 would get too few steps ...
    bud, kept, plan = _measurement_plan(wl, train, None, 1.0, sizes)
    h = plan["measurement_samples"]
    assert 128 in kept and h // 128 >= MIN_PLANNED_STEPS  # ... without 256 and 512 it has them
    assert plan["dropped"] == [b for b in sizes if b not in kept] and all(h // b < MIN_PLANNED_STEPS
                                                                         for b in plan["dropped"])
    assert h == cost.plan_horizon(23_040, 1.0, len(kept), overhead=1 / 8)[0] and bud.kind == "samples"


def test_a_budget_in_which_nothing_trained_says_it_cannot_tell_batch_sizes_apart(tmp_path: Path) -> None:
    """Issue 18.3: when no candidate's loss fell beyond 5 % of its first evaluation, the recommendation says the
    budget is too short to tell batch sizes apart; a budget in which the model trains does not say it."""
    from batchfit.tuning import tune

    kw = dict(batch_sizes=[8, 32], budget="samples:2048", noise=False, find=False, precision_check=False,
              lr_calibration=False, seeds=2, seed=0)
    still = tune(make_tiny_workload(n=512, lr=1e-7), out_dir=tmp_path / "still", **kw)
    rec = still.to_dict()["recommendation"]
    flags = rec["flags"]
    assert any(f.startswith("budget too short to tell batch sizes apart: no candidate's loss fell more than 5%")
               for f in flags), flags
    # a tie at the starting point is not broken toward the faster batch: the smallest tied one is kept
    # (here the decision's time rule took 32; the recommendation keeps 8 and says why)
    assert rec["tied"] == [8, 32] and rec["batch_size"] == 8 and "Nothing trained" in rec["reasons"][0]
    trained = tune(make_tiny_workload(n=512, lr=0.05), out_dir=tmp_path / "trained", **kw)
    assert not any(f.startswith("budget too short to tell") for f in trained.to_dict()["recommendation"]["flags"])


def test_an_lr_interval_reaches_past_an_unbracketed_edge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the LRs tied with the best reach the edge of those tried, nothing measured shows the response falling
    beyond it: the LR interval reaches one x2 step further that way and says so (lr_interval_open)."""
    import math

    import batchfit.tuning as tuning
    from conftest import capped_lr_check

    # still rising at the largest LR tried
    check = capped_lr_check(tmp_path, monkeypatch, lambda m, steps: min(0.95, 0.2 + 0.08 * math.log2(m)))
    top = max(float(r["multiplier"]) for r in check.runs if r["steps"] == check.steps)
    assert check.lr_at_check_horizon == pytest.approx(0.01 * top)  # the best is the largest LR tried
    assert check.lr_interval_open == ["above"]
    fraction = check.horizon_fraction
    flat = fraction ** min(tuning.LR_HORIZON_EXPONENT_RANGE)
    assert check.lr_interval[1] == pytest.approx(0.01 * top * tuning.LR_INTERVAL_EDGE_STEP * flat)
    assert check.lr_interval[0] == pytest.approx(0.01 * top * fraction ** max(tuning.LR_HORIZON_EXPONENT_RANGE))
    assert "reach the top of those tried" in check.decision and "one x2 step beyond" in check.decision
    assert tuning.LRCheck.from_dict(check.to_dict()) == check


def test_lr_interval_opens_only_where_the_tied_lrs_reach_an_edge_of_those_tried() -> None:
    from batchfit.metric import Metric
    from batchfit.stats import Interval
    from batchfit.tuning import LR_HORIZON_EXPONENT_RANGE, lr_interval

    acc = Metric("accuracy", True)

    def iv(x: float) -> Interval:
        return Interval(x, x - 0.02, x + 0.02)

    fraction, factor = 0.05, 0.05 ** 0.3
    steep, flat = fraction ** max(LR_HORIZON_EXPONENT_RANGE), fraction ** min(LR_HORIZON_EXPONENT_RANGE)
    peaked = {4.0: iv(0.5), 8.0: iv(0.7), 16.0: iv(0.69), 32.0: iv(0.4)}  # tied 8 and 16, inside 4 ... 32
    (low, high), sides = lr_interval(0.01, 8.0, peaked, acc, sorted(peaked), factor, fraction)
    assert sides == [] and low == pytest.approx(0.01 * 8 * steep) and high == pytest.approx(0.01 * 16 * flat)
    rising = {8.0: iv(0.5), 16.0: iv(0.6), 32.0: iv(0.7)}  # the best at the top
    (low, high), sides = lr_interval(0.01, 32.0, rising, acc, sorted(rising), factor, fraction)
    assert sides == ["above"] and high == pytest.approx(0.01 * 32 * 2 * flat)
    assert low == pytest.approx(0.01 * 32 * steep)
    # x64 was run too but diverged (no score): it bounds the top, so the interval stays closed there
    (_, high), sides = lr_interval(0.01, 32.0, rising, acc, [8.0, 16.0, 32.0, 64.0], factor, fraction)
    assert sides == [] and high == pytest.approx(0.01 * 32 * flat)
    flat_response = {8.0: iv(0.6), 16.0: iv(0.61), 32.0: iv(0.6)}  # every LR tried is tied: open both ways
    (low, high), sides = lr_interval(0.01, 16.0, flat_response, acc, sorted(flat_response), factor, fraction)
    assert sides == ["below", "above"]
    assert low == pytest.approx(0.01 * 4 * steep) and high == pytest.approx(0.01 * 64 * flat)
    # one LR tried (the base kept with nothing else scored): no edge to speak of, and no carrying
    (low, high), sides = lr_interval(0.01, 1.0, {1.0: iv(0.5)}, acc, [1.0], 1.0, 1.0)
    assert sides == [] and low == high == pytest.approx(0.01)
