"""Decisions from pooled fits: ties detected, clear winners found, flags raised, re-runs agree."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from batchfit import decide
from batchfit.metric import Metric
from batchfit.stats import CriticalBatchInterval, Interval

ACC = Metric("accuracy", True)


def _trial(batch: int, acc: float | list[float], *, seed: int = 0, mult: float = 1.0, sps: float | None = None,
           steps_to_target: float | None = 100.0, status: str = "ok", val_samples: int | None = None) -> dict[str, Any]:
    accs = acc if isinstance(acc, list) else [acc * f for f in (0.8, 0.9, 0.97, 1.0, 1.0)]
    hist = [{"step": i, "val_metrics": {"accuracy": a}, "val_loss": 1 - a, "train_loss": 1 - a} for i, a in
            enumerate(accs)]
    return {"batch_size": batch, "lr_multiplier": mult, "lr": 0.01 * mult, "status": status, "seed": seed,
            "history": hist, "best_val_metrics": {"accuracy": max(accs)},
            "samples_per_s": sps if sps is not None else batch / (0.001 + 0.0001 * batch),
            "steps_to_target": steps_to_target, "val_samples": val_samples}


def test_a_single_lucky_evaluation_does_not_make_the_quality() -> None:
    spiky = _trial(16, [0.5, 0.6, 0.99, 0.6, 0.62])
    steady = _trial(32, [0.5, 0.7, 0.80, 0.81, 0.80])
    assert decide.quality_of_trial(spiky, ACC) < decide.quality_of_trial(steady, ACC)
    assert spiky["best_val_metrics"]["accuracy"] > steady["best_val_metrics"]["accuracy"]  # argmax would pick 16


def test_a_trials_quality_is_read_over_one_window_in_samples_whatever_the_evaluation_cadence() -> None:
    """Over an epochs budget every batch size is evaluated at one step cadence, so the last 3 evaluations reach back
    over different shares of the run (demo:tiny-lm's one epoch, its full-horizon reference: half of it at batch 8,
    only the last evaluation at batch 32). The quality reads the evaluations in the last 3/16 of the samples, so both
    are read at the end of the run; a sweep trial's 16 evaluations at equal shares keep their last 3."""
    loss = Metric("val_loss", False)
    dense = [{"samples": s, "val_loss": v} for s, v in ((8192, 1.60), (16384, 1.06), (24576, 0.99), (32768, 0.940))]
    sparse = [{"samples": 32768, "val_loss": 0.944}]
    assert decide.quality_of_trial({"history": dense}, loss) == pytest.approx(0.940)  # was (1.06+0.99+0.94)/3
    assert decide.quality_of_trial({"history": sparse}, loss) == pytest.approx(0.944)
    assert decide.quality_of_trial({"history": dense}, loss) < decide.quality_of_trial({"history": sparse}, loss)
    even = [{"samples": 100 * i, "val_loss": 2.0 - 0.1 * i} for i in range(1, 17)]
    assert decide.quality_of_trial({"history": even}, loss) == pytest.approx((0.6 + 0.5 + 0.4) / 3)
    steps_only = [{"step": i, "val_loss": v} for i, v in enumerate((1.6, 1.06, 0.99, 0.94))]  # no samples: last 3
    assert decide.quality_of_trial({"history": steps_only}, loss) == pytest.approx((1.06 + 0.99 + 0.94) / 3)


def test_clear_winner_on_quality_with_seed_replicates() -> None:
    trials = [_trial(b, a + 0.002 * s, seed=s) for b, a in ((16, 0.95), (64, 0.90), (256, 0.85)) for s in range(3)]
    d = decide.decide(trials, ACC)
    assert d is not None and d.batch_size == 16 and d.choice.tied == (16,)
    assert any("edge of range" in f for f in d.flags)  # 16 is the smallest batch tried


def test_non_inferior_batch_sizes_are_broken_on_time_to_target() -> None:
    rng = np.random.default_rng(0)
    trials = []
    for b, steps in ((16, 400), (64, 110), (256, 60)):
        for s in range(3):
            trials.append(_trial(b, 0.95 + 0.001 * rng.standard_normal(), seed=s,
                                 steps_to_target=steps * (1 + 0.05 * rng.standard_normal())))
    d = decide.decide(trials, ACC, tolerance=0.01)
    assert d is not None and set(d.choice.tied) == {16, 64, 256}
    assert {d.evidence[b].verdict for b in (16, 64, 256)} == {"reference", "non-inferior"}
    tt = {b: d.evidence[b].time_to_target for b in d.evidence}
    fastest = min(tt, key=lambda b: tt[b].estimate)
    time_tied = sorted(b for b in tt if tt[b].overlaps(tt[fastest]))
    # the least estimate: 400 x 2.6 ms = 1.04 s, 110 x 7.4 ms = 0.81 s, 60 x 26.6 ms = 1.6 s
    # 64 is the least estimate; a batch size tied with it on time would be taken over it only if larger
    assert d.choice.details["time_tied"] == time_tied and d.batch_size == max(time_tied) and fastest == 64
    assert d.choice.cost_separated == (len(time_tied) == 1)  # beyond the noise only when alone in its time tie


def test_one_seed_shows_nothing_non_inferior_so_the_best_estimate_is_chosen() -> None:
    """One seed per batch size gives no seed noise to judge by (the validation set's binomial noise mostly cancels
    between configurations): no batch size is shown non-inferior, the best estimate is chosen, and the faster
    undecided ones are flagged for more seeds, never chosen on the time rule."""
    trials = [_trial(16, 0.955, val_samples=360, steps_to_target=400),
              _trial(64, 0.953, val_samples=360, steps_to_target=110),
              _trial(256, 0.80, val_samples=360, steps_to_target=60)]
    d = decide.decide(trials, ACC, tolerance=0.01)
    assert d is not None and d.batch_size == 16 and d.choice.tied == (16,)
    assert d.evidence[64].verdict == "undecided" and d.evidence[16].verdict == "reference"
    assert not d.evidence[16].quality.known  # no seed noise measured: no interval
    assert d.faster_undecided() == [64]  # 256 is slower to the target than 16 (60 x 26.6 ms > 400 x 2.6 ms)
    assert any(f.startswith("undecided: batch size 64 ") for f in d.flags)


def test_pooled_step_time_survives_one_slow_trial() -> None:
    def sweep(slow: bool) -> int:
        trials = []
        for b, steps in ((16, 400), (32, 210), (64, 120), (128, 80), (256, 70)):
            for s in range(3):
                sps = b / (0.001 + 0.0001 * b)
                if slow and b == 64 and s == 0:
                    sps /= 3  # the machine was busy during this one trial
                trials.append(_trial(b, 0.95 + 0.001 * s, seed=s, sps=sps, steps_to_target=steps))
        d = decide.decide(trials, ACC)
        assert d is not None
        return d.batch_size

    assert sweep(False) == sweep(True)


def test_fit_step_time_recovers_a_linear_cost_with_an_interval() -> None:
    rng = np.random.default_rng(2)
    pts = [(b, (0.002 + 1e-4 * b) * rng.lognormal(0, 0.05)) for b in (8, 32, 128, 512) for _ in range(4)]
    fit = decide.fit_step_time(pts)
    assert fit is not None
    p = fit.predict(256)
    assert p.contains(0.002 + 1e-4 * 256) and p.width < 0.3 * p.estimate
    assert decide.fit_step_time([(8, 0.1), (8, 0.2)]) is None  # one batch size: no slope


def test_flags_for_extrapolated_critical_batch_and_few_step_lr_move() -> None:
    trials = [_trial(b, 0.95, seed=s) for b in (16, 64) for s in range(2)]
    crit = CriticalBatchInterval(Interval(2500.0, 900.0, 9000.0), Interval(10.0, 5.0, 20.0), (16, 64), True, 3)
    d = decide.decide(trials, ACC, b_crit=crit, lr_calibration={"best_multiplier": 4.0, "steps": 9})
    assert d is not None
    assert any("extrapolated" in f for f in d.flags)
    assert any("only 9 steps" in f for f in d.flags)


def test_reruns_agree_where_the_argmax_of_noisy_points_does_not() -> None:
    """Ground truth: accuracy flat (0.95) from 16 to 128, 0.948 at 256, lower at 1024; steps to target
    S(B) = 80 (1 + 160 / B) and step time 1 ms + 0.1 ms x B, so the true time to target S(B) t(B) is flat around
    its minimum at B = sqrt(160 x 10) = 40 (2.02 s at 32, 2.07 s at 64; 2.29 s at 16, 2.48 s at 128). With a seed
    spread of 0.2 points and 3 seeds, every re-run shows 16-256 non-inferior at 1 % and picks the fastest."""
    truth_steps = {b: 80 * (1 + 160 / b) for b in (16, 32, 64, 128, 256, 1024)}
    truth_acc = {16: 0.95, 32: 0.95, 64: 0.95, 128: 0.95, 256: 0.948, 1024: 0.90}
    picks, argmax_picks = [], []
    for rerun in range(8):
        rng = np.random.default_rng(100 + rerun)
        trials = [_trial(b, truth_acc[b] + 0.002 * rng.standard_normal(), seed=s,
                         steps_to_target=truth_steps[b] * rng.lognormal(0, 0.1))
                  for b in truth_steps for s in range(3)]
        d = decide.decide(trials, ACC, tolerance=0.01)
        assert d is not None and d.evidence[1024].verdict == "inferior"
        picks.append(d.batch_size)
        argmax_picks.append(max(trials, key=lambda t: t["best_val_metrics"]["accuracy"])["batch_size"])
    assert max(picks) / min(picks) <= 2, picks
    assert set(picks) <= {32, 64}, picks
    assert len(set(argmax_picks)) > 1, argmax_picks  # the argmax of single evaluations moves between re-runs


def test_precision_advice_needs_a_speedup_beyond_noise_or_binding_memory() -> None:
    rng = np.random.default_rng(0)
    fp32 = list(1.0 * rng.lognormal(0, 0.05, 12))
    slower = list(1.3 * rng.lognormal(0, 0.05, 12))
    faster = list(0.6 * rng.lognormal(0, 0.05, 12))
    same = list(1.0 * rng.lognormal(0, 0.05, 12))
    a = decide.advise_precision(fp32, slower, fp32_max_micro_batch=4096, effective_batch=256, memory_ratio=0.6)
    assert a.precision == "fp32" and "memory does not bind" in a.reason  # the old rule recommended bf16 here
    b = decide.advise_precision(fp32, faster, fp32_max_micro_batch=4096, effective_batch=256)
    assert b.precision == "bf16" and b.speedup is not None and b.speedup.low > 1
    c = decide.advise_precision(fp32, same, fp32_max_micro_batch=64, effective_batch=256, memory_ratio=0.6)
    assert c.precision == "bf16" and c.memory_binds and "memory binds" in c.reason
    d = decide.advise_precision(fp32, faster, fp32_max_micro_batch=4096, effective_batch=256, loss_ok=False)
    assert d.precision == "fp32"


def test_decision_serialises() -> None:
    d = decide.decide([_trial(b, 0.9, seed=s) for b in (8, 16) for s in range(2)], ACC)
    assert d is not None
    out = d.to_dict()
    assert out["batch_size"] == d.batch_size and len(out["evidence"]) == 2
    assert all(math.isfinite(e["quality"]["estimate"]) for e in out["evidence"])


def test_a_busy_machine_slowing_every_trial_unevenly_does_not_move_the_choice() -> None:
    """11: the same training (same seeds, steps and quality), timed once quietly and once with load bursts that
    slow some evaluation intervals 2-5x: the robust per-trial step time and the time-tie rule give the same batch."""
    rng = np.random.default_rng(7)
    truth_steps = {16: 800, 32: 420, 64: 230, 128: 140, 256: 100}
    base = [(b, s, 0.95 + 0.006 * rng.standard_normal(), truth_steps[b] * rng.lognormal(0, 0.1))
            for b in truth_steps for s in range(3)]

    def timed(busy: bool) -> list[dict[str, Any]]:
        r = np.random.default_rng(11)
        out = []
        for b, s, acc, steps in base:
            t = _trial(b, acc, seed=s, steps_to_target=steps)
            sps = b / (0.001 + 0.0001 * b)
            for h in t["history"]:
                slow = r.choice([1.0, 1.0, 1.0, 2.0, 5.0]) if busy else r.lognormal(0, 0.05)
                h["samples_per_s"] = sps / slow
            t["samples_per_s"] = float(np.mean([h["samples_per_s"] for h in t["history"]]))
            out.append(t)
        return out

    quiet, busy = decide.decide(timed(False), ACC), decide.decide(timed(True), ACC)
    assert quiet is not None and busy is not None
    assert quiet.batch_size == busy.batch_size, (quiet.choice.details, busy.choice.details)


def test_an_accuracy_interval_stays_inside_zero_and_one() -> None:
    """Two seeds at 0.99 and 1.0: the t interval (12.7 x the standard error) passes 1; it is clipped, the tie is
    unchanged."""
    trials = [_trial(16, [0.9, 0.99, 0.99, 0.99], seed=0), _trial(16, [0.9, 1.0, 1.0, 1.0], seed=1),
              _trial(64, [0.9, 0.98, 0.98, 0.98], seed=0), _trial(64, [0.9, 0.99, 0.99, 0.99], seed=1)]
    d = decide.decide(trials, ACC, tolerance=0.02)
    assert d is not None
    q = d.evidence[16].quality
    assert q.known and q.high == 1.0 and q.low >= 0.0  # type: ignore[operator]
    assert set(d.choice.tied) == {16, 64}
    assert Interval(0.5, -0.2, 1.3).clipped(0.0, 1.0) == Interval(0.5, 0.0, 1.0)


def test_a_batch_size_that_missed_the_target_in_one_seed_does_not_win_on_the_others() -> None:
    """256 reaches the target fastest in 2 of its 3 seeds and misses it in the third: it has no time to target
    (a run that misses the goal never reached it), so the fastest batch size that reached it in every seed wins."""
    trials = []
    for s in range(3):
        trials.append(_trial(64, 0.95 + 0.002 * s, seed=s, steps_to_target=200))
        trials.append(_trial(128, 0.95 - 0.002 * s, seed=s, steps_to_target=80))
        trials.append(_trial(256, 0.949 + 0.001 * s, seed=s, steps_to_target=None if s == 2 else 30))
    d = decide.decide(trials, ACC, tolerance=0.02)
    assert d is not None and 256 in d.choice.tied
    assert d.evidence[256].time_to_target is None and d.evidence[256].seeds_reached == 2
    assert d.batch_size == 128
    reached = [dict(t, steps_to_target=30) if t["batch_size"] == 256 else t for t in trials]
    d2 = decide.decide(reached, ACC, tolerance=0.02)
    assert d2 is not None and d2.batch_size == 256  # reaching it in every seed, it is the fastest


def test_the_decision_times_every_batch_to_a_fraction_of_the_best_configurations_mean() -> None:
    """The target is 97 % of the best configuration's seed-mean final quality (here 256's 0.9467, not its lucky
    0.96 evaluation), crossed on each trial's raw curve, interpolated between evaluations; the sweep's B_crit uses
    the same target and crossing (tests/test_sweep.py), so the printed B_crit is the decision's."""
    curves = {64: [0.80, 0.90, 0.93, 0.94, 0.94, 0.94], 128: [0.85, 0.92, 0.935, 0.94, 0.94, 0.94],
              256: [0.90, 0.93, 0.94, 0.94, 0.96, 0.94]}
    trials = []
    for b, accs in curves.items():
        for s in range(3):
            t = _trial(b, [a + 0.01 * (s - 1) for a in accs], seed=s, steps_to_target=None)
            for i, h in enumerate(t["history"]):
                h["step"] = (i + 1) * 1000 // b
            trials.append(t)
    sweep_target = {"kind": "fraction", "fraction": 0.97, "value": 0.97 * 0.97}  # from the lucky spike: 0.9409
    d = decide.decide(trials, ACC, target=sweep_target, tolerance=0.01)
    assert d is not None and set(d.choice.tied) == {64, 128, 256}
    assert d.target == pytest.approx(0.97 * (0.94 + 0.96 + 0.94) / 3) and d.target < 0.93
    assert all(d.evidence[b].seeds_reached == 3 and d.evidence[b].time_to_target is not None for b in curves)
    assert d.to_dict()["critical_batch"] == (None if d.critical is None else d.critical.to_dict())
    # the raw curve's crossing, interpolated: 0.85 lies half-way between step 0 (0.80) and step 1 (0.90)
    t = _trial(64, [0.80, 0.90, 0.93, 0.94], steps_to_target=None)
    assert decide.steps_to(t, ACC, 0.85) == pytest.approx(0.5) and decide.steps_to(t, ACC, 0.9) == 1.0
    assert decide.steps_to(t, ACC, 0.95) is None and decide.steps_to(t, ACC, 0.5) == 0.0
    assert decide.decision_target({"kind": "absolute", "value": 0.9}, 0.95, ACC) == 0.9
    assert decide.decision_target(None, 0.95, ACC) is None
    loss = Metric("val_loss", False)
    assert decide.decision_target({"kind": "fraction", "fraction": 0.97}, 0.3, loss) == pytest.approx(0.3 / 0.97)


def test_a_time_difference_inside_the_noise_decides_nothing_the_largest_tied_is_taken() -> None:
    """Among non-inferior batch sizes whose times to target overlap the least estimate's, the largest is chosen:
    a re-run whose noise reorders the time estimates inside their intervals keeps the answer."""
    rng = np.random.default_rng(3)
    trials = []
    for b, steps in ((64, 240), (128, 130), (256, 70)):
        for s in range(3):
            trials.append(_trial(b, 0.95 + 0.0005 * rng.standard_normal(), seed=s, sps=b / 0.01,
                                 steps_to_target=steps * (1 + 0.3 * rng.standard_normal())))
    d = decide.decide(trials, ACC, tolerance=0.01)
    assert d is not None and len(d.choice.details["time_tied"]) > 1
    assert d.batch_size == max(d.choice.details["time_tied"]) and "the largest of them" in d.choice.reason
