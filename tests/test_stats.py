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


# --- the decision rule: non-inferiority on paired seeds (issue 19.1) --------------------------------------------

def _old_rule_false_tie(delta_sd: float, seeds: int, reps: int = 400) -> float:
    """The rule before issue 19: pooled-variance intervals, 'tied' when they overlap the best's."""
    rng = np.random.default_rng(1)
    tied = 0
    for _ in range(reps):
        groups = {i: list(rng.normal(0.0 if i < 7 else -delta_sd, 1.0, size=seeds)) for i in range(8)}
        ivs = stats.pooled_mean_intervals(groups)
        tied += 7 in stats.choose(ivs).tied  # type: ignore[arg-type]
    return tied / reps


@pytest.mark.parametrize("seeds", [2, 3, 5])
@pytest.mark.parametrize("delta_sd", [2.0, 3.0, 4.0])
def test_a_worse_batch_is_rarely_called_non_inferior_at_any_seed_count(seeds: int, delta_sd: float) -> None:
    """8 batch sizes, the fastest one truly worse by 2-4 seed standard deviations (tolerance 0.5 sd): the new rule
    calls it non-inferior (and so chooses it, ties going to the fastest) at most ~5 % of the time; the old overlap
    rule called a 2-sd-worse batch tied over half the time at 2 seeds."""
    r = stats.simulate_selection([0.0] * 7 + [-delta_sd], 1.0, seeds, 0.5, reps=300, seed=seeds)
    assert r["false_tied"] <= 0.06 and r["wrong_choice"] <= 0.06, r
    if seeds == 2 and delta_sd == 2.0:
        assert _old_rule_false_tie(delta_sd, seeds) > 0.4


def test_the_rule_finds_non_inferior_batches_when_the_data_allow() -> None:
    """Equal batch sizes with a seed spread well under the tolerance: with 3 seeds most are shown non-inferior and
    none is called inferior (false 'apart')."""
    r = stats.simulate_selection([0.0] * 6, 0.2, 3, 1.0, reps=200)
    assert r["shown"] >= 0.8 and r["false_apart"] <= 0.02 and r["wrong_choice"] == 0.0, r


def test_unequal_variances_use_the_noisier_candidates_own_spread() -> None:
    rng = np.random.default_rng(3)
    values = {b: dict(enumerate(rng.normal(0.95, 0.001, 6))) for b in (16, 32, 64)}
    values[128] = dict(enumerate(0.95 + np.array([0.02, -0.02, 0.018, -0.019, 0.021, -0.02])))
    sel = stats.select_non_inferior(values, tolerance=0.005)
    assert "own paired t" in sel.comparisons[128].difference.method
    assert sel.comparisons[128].verdict == "undecided"  # pooled, it would look as precise as the others
    assert {sel.comparisons[b].verdict for b in (16, 32, 64)} <= {"reference", "non-inferior"}


def test_paired_seeds_remove_a_shared_seed_effect() -> None:
    """A seed effect shared by every batch size (seed 1 is good for all) dominates each batch size's spread; on
    shared seeds the differences are precise, so the near-equal batch sizes are shown non-inferior, where
    unpaired intervals overlap and decide nothing."""
    effect = [0.0, 0.02, -0.015]
    values = {b: {s: 0.95 + effect[s] + eps for s, eps in enumerate(noise)}
              for b, noise in ((16, (0.0005, -0.0004, 0.0)), (64, (-0.0003, 0.0, 0.0004)),
                               (256, (0.0002, 0.0004, -0.0006)), (1024, (-0.03, -0.031, -0.029)))}
    sel = stats.select_non_inferior(values, tolerance=0.005)
    assert set(sel.non_inferior) == {16, 64, 256} and sel.inferior == (1024,)
    assert all(c.paired == 3 for c in sel.comparisons.values())


def test_one_seed_leaves_everything_but_the_reference_undecided() -> None:
    sel = stats.select_non_inferior({16: {0: 0.95}, 64: {0: 0.951}, 256: {0: 0.5}}, tolerance=0.01)
    assert sel.reference == 64 and sel.non_inferior == (64,) and set(sel.undecided) == {16, 256}
    assert sel.critical is None and sel.dof == 0


def test_lower_is_better_and_looks_widen_the_bounds() -> None:
    rng = np.random.default_rng(5)
    values = {b: dict(enumerate(rng.normal(m, 0.01, 3))) for b, m in ((8, 0.30), (16, 0.301), (32, 0.40))}
    one = stats.select_non_inferior(values, tolerance=0.02, higher_is_better=False)
    three = stats.select_non_inferior(values, tolerance=0.02, higher_is_better=False, looks=3)
    assert one.reference in (8, 16) and one.comparisons[32].verdict == "inferior"
    assert three.critical > one.critical  # type: ignore[operator]
    d1, d3 = one.comparisons[16 if one.reference == 8 else 8].difference, \
        three.comparisons[16 if three.reference == 8 else 8].difference
    assert d3.low < d1.low  # type: ignore[operator]
    assert stats.select_non_inferior(values, tolerance=0.02, higher_is_better=False).to_dict() == one.to_dict()


# ---------------------------------------------------------------------------------------------------------------
# Issue 19.4: positive quantities get intervals on the log scale; their quotients are never inf


def test_a_positive_quantitys_interval_never_has_a_negative_low() -> None:
    """B_simple over 2-3 seeds is positive and heavy-tailed: a t interval of the raw values often reaches below zero
    (``480 [-93.4, 1.05e+03]``); the t interval of the logs, exponentiated back, never does."""
    rng = np.random.default_rng(0)
    negative_t = 0
    for _ in range(500):
        values = np.exp(rng.normal(np.log(300.0), 1.0, size=int(rng.integers(2, 4))))
        iv = stats.positive_mean_interval(values)
        assert iv.known and 0 < iv.low < iv.estimate < iv.high < math.inf  # type: ignore[operator]
        assert iv.estimate == pytest.approx(math.exp(np.mean(np.log(values))))  # the geometric mean
        negative_t += stats.mean_interval(values).low < 0  # type: ignore[operator]
    assert negative_t > 100  # the old interval reached below zero for a large share of these


def test_positive_mean_interval_covers_the_median_of_lognormal_replicates() -> None:
    def make(rng: np.random.Generator, _: int) -> Interval:
        return stats.positive_mean_interval(np.exp(rng.normal(math.log(50.0), 0.8, 3)))

    assert 0.92 <= _coverage(make, 50.0) <= 0.98


def test_positive_mean_interval_one_value_and_bad_values() -> None:
    one = stats.positive_mean_interval([42.0])
    assert one.estimate == 42.0 and not one.known
    with pytest.raises(ValueError, match="positive values only"):
        stats.positive_mean_interval([3.0, -1.0])
    with pytest.raises(ValueError, match="at least one finite"):
        stats.positive_mean_interval([math.nan])


def test_a_quotient_is_never_inf_and_an_unknown_interval_stays_unknown() -> None:
    q = stats.quotient_interval(64.0, Interval(32.0, 16.0, 128.0))
    assert (q.estimate, q.low, q.high) == (2.0, 0.5, 4.0)  # type: ignore[union-attr]
    unbounded = stats.quotient_interval(64.0, Interval(32.0, 16.0, math.inf))  # B_simple only bounded below
    assert (unbounded.low, unbounded.high) == (0.0, 4.0)  # type: ignore[union-attr]
    for bad in (Interval(32.0, -5.0, 90.0), Interval(32.0, 0.0, 90.0), Interval(32.0, None, None)):
        q = stats.quotient_interval(64.0, bad)
        assert q is not None and q.estimate == 2.0 and not q.known  # unknown, not [.., inf]
    assert stats.quotient_interval(64.0, Interval(0.0, None, None)) is None
    assert stats.quotient_interval(64.0, Interval(math.inf, 10.0, math.inf)) is None
    rng = np.random.default_rng(1)
    for _ in range(200):
        iv = stats.positive_mean_interval(np.exp(rng.normal(5.0, 2.0, 2)))
        q = stats.quotient_interval(256.0, iv)
        assert q is not None and 0 <= q.low <= q.estimate <= q.high < math.inf  # type: ignore[operator]


def test_one_curve_over_every_batch_size_shows_what_per_batch_means_cannot() -> None:
    """A smooth quality curve (flat to 128, falling to 2 tolerances at 2048) at the measured digits spread, 2 seeds:
    read off one quadratic in log2(batch), nearly every equal batch size is shown non-inferior and none worse than
    the tolerance is chosen; per-batch means show about half."""
    delta = 0.0094
    mu = [-2 * delta * max(0.0, (i - 3) / 4) ** 2 for i in range(8)]
    pos = [float(4 + i) for i in range(8)]
    curve = stats.simulate_selection(mu, 0.0025, 2, delta, reps=150, seed_sd=0.005, positions=pos, seed=1)
    per_batch = stats.simulate_selection(mu, 0.0025, 2, delta, reps=150, seed_sd=0.005, seed=1)
    assert curve["shown"] >= 0.85 and curve["wrong_choice"] == 0.0 and curve["false_tied"] == 0.0, curve
    assert per_batch["shown"] <= 0.7, per_batch


def test_a_curve_that_does_not_fit_falls_back_to_per_batch_means() -> None:
    """A step (four equal, four 3 tolerances worse) is no quadratic: the lack-of-fit test sends the decision back to
    the per-batch paired model, which calls the step's far side inferior."""
    rng = np.random.default_rng(2)
    values = {2 ** (4 + i): {s: (0.95 if i < 4 else 0.92) + 0.001 * rng.standard_normal() for s in range(3)}
              for i in range(8)}
    pos = {b: math.log2(b) for b in values}
    sel = stats.select_non_inferior(values, tolerance=0.01, positions=pos)
    assert sel.method.startswith("paired") and set(sel.inferior) == {256, 512, 1024, 2048}
    rng = np.random.default_rng(7)  # (a true quadratic still fails the 5 % lack-of-fit test 1 time in 20)
    smooth = {b: {s: 0.95 - 0.001 * (math.log2(b) - 4) ** 2 + 0.0005 * rng.standard_normal() for s in range(3)}
              for b in values}
    curve = stats.select_non_inferior(smooth, tolerance=0.01, positions=pos)
    assert curve.method.startswith("one quadratic curve") and curve.reference == 16
    assert curve.comparisons[2048].verdict == "inferior" and curve.comparisons[32].verdict == "non-inferior"


def test_the_pooled_curve_does_not_decide_on_one_degree_of_freedom() -> None:
    """Three seeds at batch 16, one at 32-128 whose accuracies lie exactly on a parabola (quantized values can):
    the curve's only residual degree of freedom is zero, and the old rule called 32-128 'inferior' with a
    zero-width interval. The data cannot place them: undecided."""
    from batchfit.stats import select_non_inferior

    q = {16: 0.80, 32: 0.79, 64: 0.76, 128: 0.71}  # seed 0: second differences constant (a parabola in log2 B)
    values = {16: {0: q[16], 1: 0.78, 2: 0.82}, 32: {0: q[32]}, 64: {0: q[64]}, 128: {0: q[128]}}
    sel = select_non_inferior(values, tolerance=0.01, positions={b: math.log2(b) for b in values})
    assert sel.reference == 16
    assert all(sel.comparisons[b].verdict == "undecided" for b in (32, 64, 128))
    # nearly on the parabola (a third difference of 0.0005): 1 degree of freedom gave +-0.0015 and 'inferior'
    near = {**values, 128: {0: 0.7105}}
    sel = select_non_inferior(near, tolerance=0.01, positions={b: math.log2(b) for b in near})
    assert all(sel.comparisons[b].verdict == "undecided" for b in (32, 64, 128))


def test_three_point_peak_is_the_parabola_vertex_and_none_where_nothing_peaks() -> None:
    from batchfit.stats import three_point_peak

    # y = -(x - 1.3)^2 + 2 through x = 0, 1, 2: the vertex is exactly 1.3
    pts = [(x, -(x - 1.3) ** 2 + 2.0) for x in (0.0, 1.0, 2.0)]
    assert three_point_peak(pts) == pytest.approx(1.3)
    assert three_point_peak([(0.0, 1.0), (1.0, 1.0), (2.0, 1.0)]) is None  # flat
    assert three_point_peak([(0.0, 1.0), (1.0, 0.0), (2.0, 1.0)]) is None  # convex: a valley, not a peak
