"""The statistics behind every interval and decision, checked on synthetic data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchfit import stats
from batchfit.stats import Interval


def _coverage(make, truth: float, reps: int = 600, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for r in range(reps):
        iv = make(rng, r)
        hits += iv.contains(truth)
    return hits / reps


def test_mean_interval_covers_near_nominal_with_five_seeds() -> None:
    cov = _coverage(lambda rng, r: stats.mean_interval(rng.normal(0.9, 0.02, size=5)), 0.9, reps=2000)
    assert 0.93 <= cov <= 0.97, cov


def test_one_replicate_gives_an_unknown_interval_not_zero_width() -> None:
    iv = stats.mean_interval([0.95])
    assert not iv.known and iv.width == math.inf
    assert iv.overlaps(Interval(0.1, 0.0, 0.2))  # unknown overlaps everything: nothing can be told apart


def test_median_interval_covers_heavy_tailed_timings() -> None:
    # exponential timings: the median of Exp(1) is ln 2
    cov = _coverage(lambda rng, r: stats.median_interval(0.01 + rng.exponential(1.0, size=15)), 0.01 + math.log(2))
    assert 0.93 <= cov <= 0.995, cov


def test_median_interval_needs_six_values_for_95_percent() -> None:
    assert not stats.median_interval([1, 2, 3, 4, 5]).known
    assert stats.median_interval([1, 2, 3, 4, 5, 6]).known


def test_busy_machine_widens_the_interval_instead_of_moving_the_answer() -> None:
    rng = np.random.default_rng(1)
    quiet = 1.0 + 0.02 * rng.standard_normal(30)
    busy = quiet.copy()
    busy[::4] *= rng.uniform(1.5, 3.0, size=len(busy[::4]))  # a quarter of the steps slowed by other work
    q, b = stats.median_interval(quiet), stats.median_interval(busy)
    assert abs(b.estimate - q.estimate) / q.estimate < 0.03  # the centre barely moves (the mean moves by ~30 %)
    assert abs(busy.mean() - quiet.mean()) / quiet.mean() > 0.15
    assert b.width > q.width and b.spread > q.spread


def test_cluster_bootstrap_mean_covers_a_chunked_accuracy() -> None:
    p = 0.9

    def make(rng: np.random.Generator, r: int) -> Interval:
        correct = rng.random(400) < p
        chunks = correct.reshape(25, 16)
        return stats.cluster_bootstrap_mean(chunks.mean(axis=1), [16] * 25, seed=r, n_boot=800)

    cov = _coverage(make, p, reps=400)
    assert 0.90 <= cov <= 0.98, cov


def test_bootstrap_interval_is_reproducible_and_covers() -> None:
    x = np.random.default_rng(3).normal(size=50)
    assert stats.bootstrap_interval(x, seed=7) == stats.bootstrap_interval(x, seed=7)
    cov = _coverage(lambda rng, r: stats.bootstrap_interval(rng.normal(2.0, 1.0, 40), seed=r, n_boot=500), 2.0,
                    reps=400)
    assert 0.90 <= cov <= 0.98, cov


def test_ratio_interval_covers_a_true_speedup() -> None:
    def make(rng: np.random.Generator, r: int) -> Interval:
        slow = 1.5 * rng.lognormal(0, 0.1, 25)
        fast = rng.lognormal(0, 0.1, 25)
        return stats.ratio_interval(slow, fast, seed=r, n_boot=500)

    cov = _coverage(make, 1.5, reps=300)
    assert 0.90 <= cov <= 0.995, cov


def test_speedup_inside_the_noise_is_not_a_speedup() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.lognormal(0, 0.3, 8), rng.lognormal(0, 0.3, 8)
    iv = stats.ratio_interval(a, b)
    assert iv.contains(1.0)


def test_choose_reports_a_tie_and_breaks_it_on_cost() -> None:
    q = {16: Interval(0.955, 0.94, 0.97), 64: Interval(0.960, 0.945, 0.975), 256: Interval(0.950, 0.935, 0.965),
         1024: Interval(0.90, 0.88, 0.92)}
    cost = {16: Interval(10.0, 9.0, 11.0), 64: Interval(4.0, 3.5, 4.5), 256: Interval(2.0, 1.8, 2.2),
            1024: Interval(1.0, 0.9, 1.1)}
    c = stats.choose(q, cost, describe=lambda b: f"batch {b}")
    assert c.best_quality == 64
    assert set(c.tied) == {16, 64, 256}  # 1024 is worse beyond the noise
    assert c.chosen == 256 and c.cost_separated
    assert "tied on quality" in c.reason and "batch 256" in c.reason


def test_choose_states_when_the_cost_win_is_inside_the_noise() -> None:
    q = {32: Interval(0.95, 0.93, 0.97), 64: Interval(0.95, 0.93, 0.97)}
    cost = {32: Interval(2.0, 1.5, 2.6), 64: Interval(1.9, 1.4, 2.5)}
    c = stats.choose(q, cost)
    assert c.chosen == 64 and not c.cost_separated and "inside the noise" in c.reason


def test_choose_clear_winner_and_lower_is_better() -> None:
    q = {8: Interval(0.30, 0.29, 0.31), 16: Interval(0.50, 0.48, 0.52)}  # losses
    c = stats.choose(q, {8: Interval(5, 4, 6), 16: Interval(1, 0.5, 1.5)}, higher_is_better=False)
    assert c.chosen == 8 and c.tied == (8,)


def test_choose_is_stable_under_reordering_and_replays() -> None:
    q = {1: Interval(0.9, 0.85, 0.95), 2: Interval(0.91, 0.86, 0.96)}
    cost = {1: Interval(3.0, 2.0, 4.0), 2: Interval(3.0, 2.0, 4.0)}
    assert stats.choose(q, cost).chosen == stats.choose(q, cost).chosen == 1  # equal cost: caller's order decides
    assert stats.choose(dict(reversed(list(q.items()))), cost).chosen == 2


def test_racing_asks_for_replicates_only_where_they_can_change_the_decision() -> None:
    q = {1: Interval(0.90, 0.88, 0.92), 2: Interval(0.95, 0.94, 0.96), 3: Interval(0.945, 0.93, 0.955)}
    assert stats.undecided(q) == [2, 3]
    q[3] = Interval(0.92, 0.91, 0.93)
    assert stats.undecided(q) == []


def test_interval_round_trips_through_json_dict() -> None:
    iv = Interval(1.0, 0.5, 1.5, 0.9, "t", 4, 0.2)
    assert Interval.from_dict(iv.to_dict()) == iv


def test_critical_batch_interval_covers_the_true_value_and_flags_extrapolation() -> None:
    def make(rng: np.random.Generator, r: int) -> Interval:
        pts = [(b, 100 * (1 + 128 / b) * rng.lognormal(0, 0.05)) for b in (16, 32, 64, 128, 256, 512) for _ in range(3)]
        ci = stats.critical_batch_interval(pts, seed=r, n_boot=200)
        assert ci is not None and not ci.extrapolated and ci.support == (16, 512)
        return ci.b_crit

    cov = _coverage(make, 128.0, reps=120)
    assert 0.85 <= cov <= 0.99, cov  # 3 seeds per batch: measured 0.90 over 200 repetitions
    rng = np.random.default_rng(0)
    narrow = [(b, 100 * (1 + 2000 / b) * rng.lognormal(0, 0.05)) for b in (16, 32, 64, 128) for _ in range(3)]
    ci2 = stats.critical_batch_interval(narrow, seed=1)
    assert ci2 is not None and ci2.extrapolated  # B_crit beyond the largest batch tried is flagged
    assert ci2.b_crit.width > ci2.b_crit.estimate  # and its interval says how little the data pin it down


def test_fitted_steps_to_target_cover_the_true_curve() -> None:
    """The decision's steps to target come from the S(B) fit's bootstrap: near-nominal coverage of the true curve
    at a batch inside the tried range, with 3 seeds per batch (stratified) and with one seed (residual)."""
    sizes = (16, 32, 64, 128, 256, 512)

    def make(seeds: int):
        def one(rng: np.random.Generator, r: int) -> Interval:
            pts = [(b, 100 * (1 + 128 / b) * rng.lognormal(0, 0.08)) for b in sizes for _ in range(seeds)]
            ci = stats.critical_batch_interval(pts, seed=r, n_boot=200)
            assert ci is not None
            return ci.steps(64)
        return one

    cov3 = _coverage(make(3), 100 * (1 + 128 / 64), reps=120)
    assert 0.85 <= cov3 <= 1.0, cov3  # measured 0.925 over 200 repetitions
    cov1 = _coverage(make(1), 100 * (1 + 128 / 64), reps=120)
    assert 0.85 <= cov1 <= 1.0, cov1  # measured 0.97 over 200 repetitions
    rng = np.random.default_rng(5)
    one_seed = stats.critical_batch_interval([(b, 100 * (1 + 128 / b) * rng.lognormal(0, 0.08)) for b in sizes])
    assert one_seed is not None and one_seed.b_crit.known and one_seed.method == "residual-bootstrap"
    mid = one_seed.steps(64)
    assert mid.known and mid.width < 0.5 * mid.estimate  # a pooled fit pins steps down far better than 1 seed's t


def test_critical_batch_interval_unknown_without_replicates() -> None:
    pts = [(b, 100 * (1 + 64 / b)) for b in (16, 64, 256)]
    ci = stats.critical_batch_interval(pts)
    assert ci is not None and not ci.b_crit.known


@pytest.mark.parametrize("bad", [[], [math.nan]])
def test_empty_inputs_are_errors(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        stats.mean_interval(bad)
