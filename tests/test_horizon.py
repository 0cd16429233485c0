"""Measure short, decide long: the long-horizon extrapolation recovers a known critical-batch model (issue 18.2)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from batchfit import horizon
from batchfit.metric import Metric

ACC = Metric("accuracy", True)
Q_INF, C, BETA = 0.98, 2.0, 0.5  # the small batch's curve q(s) = Q_INF - C s^-BETA
BC0, S0, ALPHA = 64.0, 1000.0, 0.5  # B_crit at the level a small batch reaches after s samples: BC0 (s / S0)^ALPHA


def _samples_needed(b: int, s_small: float) -> float:
    """Samples batch b needs for the level a small batch reaches at s_small (McCandlish et al. 2018)."""
    return s_small * (1 + b / (BC0 * (s_small / S0) ** ALPHA))


def _quality(b: int, samples: float) -> float:
    lo, hi = 1e-3, samples  # the small-batch samples that batch b's `samples` are worth: monotone, bisect
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _samples_needed(b, mid) < samples else (lo, mid)
    return Q_INF - C * lo ** -BETA


def _trials(h: float, batches=(16, 32, 64, 128, 256, 512), seeds: int = 3, noise: float = 0.0005,
            b_simple_growth: float | None = None) -> list[dict]:
    rng = np.random.default_rng(0)
    out: list[dict[str, Any]] = []
    for b in batches:
        for s in range(seeds):
            hist = []
            for e in np.geomspace(h / 64, h, 40):
                step = max(1, round(e / b))
                hist.append({"step": step, "samples": step * b,
                             "val_metrics": {"accuracy": _quality(b, step * b) + noise * rng.standard_normal()}})
                if b_simple_growth is not None:  # a measured B_simple: the model's growth, 20 % noise
                    hist[-1]["b_simple"] = BC0 * (step * b / S0) ** b_simple_growth * math.exp(
                        0.2 * rng.standard_normal())
            out.append({"batch_size": b, "lr_multiplier": 1.0, "seed": s, "status": "ok", "history": hist})
    return out


def test_the_extrapolation_recovers_the_growth_of_the_critical_batch_and_moves_up_only_with_evidence() -> None:
    h, train = 40_000.0, 320_000
    res = horizon.long_horizon(_trials(h), ACC, reference_batch=16, reference_multiplier=1.0, train_samples=train,
                               tolerance=0.005, candidates=[16, 32, 64, 128, 256, 512])
    assert res is not None and res.alpha is not None and res.b_max is not None
    assert res.alpha.estimate == pytest.approx(ALPHA, abs=0.2)
    # the truth at T: the largest batch within 0.005 of batch 16 (about 2,300), and B_crit at that level
    q16 = _quality(16, train)
    b_max_true = max(b for b in range(16, 20000, 4) if _quality(b, train) >= q16 - 0.005)
    s_star = (C / (Q_INF - q16 + 0.005)) ** (1 / BETA)
    bc_true = BC0 * (s_star / S0) ** ALPHA
    assert res.b_crit_at_train.low <= bc_true * 1.3 and res.b_crit_at_train.high >= bc_true / 1.3
    assert res.b_max.low <= b_max_true * 1.2 and res.b_max.high >= b_max_true / 1.2
    assert res.b_max.estimate == pytest.approx(b_max_true, rel=0.25)
    assert res.batch is not None and res.batch <= b_max_true  # never past the true limit
    # at the measured horizon the same batches look worse than they will be: the short answer is smaller
    short_ok = [b for b in (16, 32, 64, 128, 256, 512) if _quality(b, h) >= _quality(16, h) - 0.005]
    assert max(short_ok) < res.batch
    assert res.to_dict()["batch"] == res.batch and not res.far


def test_noisy_curves_and_a_far_horizon_widen_and_flag_and_never_move_on_noise() -> None:
    h = 40_000.0
    res = horizon.long_horizon(_trials(h, noise=0.01), ACC, reference_batch=16, reference_multiplier=1.0,
                               train_samples=int(100 * h), tolerance=0.005, candidates=[16, 32, 64, 128, 256, 512])
    assert res is not None
    assert res.far and any(f.startswith("far horizon") for f in res.flags)
    if res.b_max is not None:
        assert res.b_max.high / max(res.b_max.low, 1e-9) > 2  # wide: noise and a 100x extrapolation


def test_without_curves_at_two_horizons_the_answer_stays_short() -> None:
    trials = _trials(40_000.0, batches=(16, 32))  # two batch sizes: no S(B) fit anywhere
    res = horizon.long_horizon(trials, ACC, reference_batch=16, reference_multiplier=1.0, train_samples=10**6,
                               tolerance=0.005, candidates=[16, 32])
    assert res is not None and res.batch is None and res.alpha is None
    assert any(f.startswith("no long-horizon extrapolation") for f in res.flags)


def test_saturating_fit_recovers_a_power_law() -> None:
    s = np.geomspace(100, 1e5, 30)
    fit = horizon.saturating_fit([(x, 0.9 - 3 * x ** -0.4) for x in s])
    assert fit is not None
    q_inf, c, beta = fit
    assert q_inf == pytest.approx(0.9, abs=0.01) and beta == pytest.approx(0.4, rel=0.1)
    loss = horizon.saturating_fit([(x, 1.5 + 3 * x ** -0.4) for x in s], higher_is_better=False)
    assert loss is not None and loss[0] == pytest.approx(1.5, abs=0.01)
    assert horizon.saturating_fit([(1, 0.5), (2, 0.6)]) is None


def test_the_recommendation_is_for_the_train_budget_not_the_measured_horizon() -> None:
    """Measured at h, trained for 8 h: the recommendation moves from the short-horizon choice to the largest batch
    the extrapolation shows within the tolerance, says so, and flags the short horizon."""
    from batchfit.recommend import recommend

    h = 40_000.0
    trials = _trials(h)
    for t in trials:
        t.update(lr=0.01, samples_per_s=t["batch_size"] / (0.001 + 0.0001 * t["batch_size"]), warmup_steps=0,
                 micro_batch_size=t["batch_size"], accumulation_steps=1, steps=t["history"][-1]["step"])
    results = {"workload": "synthetic", "primary_metric": "accuracy", "higher_is_better": True, "trials": trials,
               "best_per_batch": [], "lr_rule": "linear", "target": {"kind": "fraction", "fraction": 0.97},
               "train_budget": {"budget": "samples:320000", "samples": 320_000, "measurement_samples": h}}
    rec = recommend(results, tolerance=0.005)
    longer = rec.long_horizon
    assert longer is not None and longer["batch"] == rec.batch_size == 512
    short = rec.reference_batch_size
    assert short < 512 and "moves from the short-horizon choice" in rec.reasons[0]
    assert any(f.startswith("short horizon") for f in rec.flags)
    # measured at the whole train budget: no extrapolation, the short answer stands
    same = dict(results, train_budget={"budget": "samples:40000", "samples": 40_000, "measurement_samples": h})
    assert recommend(same, tolerance=0.005).long_horizon is None
    # a train budget past FAR x the measured horizon: the extrapolation is reported and flagged, not acted on
    # (the same curves, whose power law holds to any horizon here, but a real run's early growth does not)
    far = dict(results, train_budget={"budget": "samples:640000", "samples": 640_000, "measurement_samples": h})
    rec_far = recommend(far, tolerance=0.005)
    assert rec_far.batch_size < 512 and rec_far.long_horizon["batch"] is None
    assert "moves from the short-horizon choice" not in rec_far.reasons[0]
    assert rec_far.long_horizon["b_max"]["low"] > 512  # the extrapolation still says 512 would do ...
    assert "16x the measured horizon (beyond x8), so this extrapolation is reported, not acted on" in \
        rec_far.reasons[0]  # ... and why it moves nothing
    assert any(f.startswith("far horizon: the train budget is 16x the measured horizon (32x the last horizon")
               for f in rec_far.flags), rec_far.flags


def test_b_simple_cross_checks_the_growth_of_the_critical_batch() -> None:
    """B_simple measured in the reference's trials confirms the extrapolated growth when it grows alike, and a
    flag says so when it does not (issue 18.2's cross-check)."""
    h, train = 40_000.0, 320_000
    kw = dict(reference_batch=16, reference_multiplier=1.0, train_samples=train, tolerance=0.005,
              candidates=[16, 32, 64, 128, 256, 512])
    same = horizon.long_horizon(_trials(h, b_simple_growth=ALPHA), ACC, **kw)
    assert same is not None and same.b_simple is not None and same.b_simple["agrees"]
    assert same.b_simple["growth"]["low"] <= ALPHA <= same.b_simple["growth"]["high"]
    assert not any(f.startswith("cross-check") for f in same.flags)
    flat = horizon.long_horizon(_trials(h, b_simple_growth=-1.0), ACC, **kw)
    assert flat is not None and flat.b_simple is not None and not flat.b_simple["agrees"]
    assert any(f.startswith("cross-check: B_simple grows as s^-1") for f in flat.flags)
    assert flat.to_dict()["b_simple_check"]["agrees"] is False
    none = horizon.long_horizon(_trials(h), ACC, **kw)  # no B_simple measured: no cross-check, nothing claimed
    assert none is not None and none.b_simple is None


def test_a_critical_batch_far_beyond_the_batches_tried_is_a_bound_and_does_not_enter_the_growth_fit() -> None:
    """B_crit more than x2 the largest batch that reached the level is not measured (the curve barely bends there):
    that horizon is recorded but left out of the power law; with fewer than two left, no move."""
    h, train = 40_000.0, 320_000
    res = horizon.long_horizon(_trials(h, batches=(16, 32, 64, 128)), ACC, reference_batch=16,
                               reference_multiplier=1.0, train_samples=train, tolerance=0.005,
                               candidates=[16, 32, 64, 128])
    assert res is not None and res.alpha is not None
    reach = [hz["in_reach"] for hz in res.horizons if hz["b_crit"] is not None]
    assert reach == [True, True, False]  # B_crit 142, 196 and 267 with batch 128 the largest: the last is a bound
    assert "142 at 5,000, 196 at 10,000 samples" in res.reason and "267" not in res.reason
    assert res.alpha.low <= ALPHA <= res.alpha.high  # the two measured horizons still see the true growth
    small = horizon.long_horizon(_trials(h, batches=(16, 32, 64)), ACC, reference_batch=16, reference_multiplier=1.0,
                                 train_samples=train, tolerance=0.005, candidates=[16, 32, 64])
    assert small is not None and small.alpha is None and small.batch is None and small.b_max is None
    assert "more than x2 beyond the largest batch that reached the level" in small.reason
    assert any(f.startswith("no long-horizon extrapolation") for f in small.flags)


def test_no_move_when_the_data_cannot_show_the_critical_batch_growing() -> None:
    """A critical batch that does not grow (alpha = 0 in the model) gives an alpha interval reaching zero: the
    extrapolation moves nothing, and says why (examples/text_dict at 6 % of its run, every accuracy near chance:
    alpha -1.3 (-7.3 to 4.6) had moved batch 32 to 64)."""
    global ALPHA
    old, ALPHA = ALPHA, 0.0
    try:
        res = horizon.long_horizon(_trials(40_000.0, noise=0.002), ACC, reference_batch=16, reference_multiplier=1.0,
                                   train_samples=320_000, tolerance=0.005, candidates=[16, 32, 64, 128, 256, 512])
    finally:
        ALPHA = old
    assert res is not None and res.alpha is not None and res.alpha.low <= 0.0
    assert res.batch is None and res.b_max is None
    assert "is not measured" in res.reason and any(f.startswith("no long-horizon") for f in res.flags)
