"""The critical-batch fit S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018)."""

from __future__ import annotations

import pytest

from batchfit.critical import fit_critical_batch, predict_steps


def test_recovers_a_known_curve() -> None:
    pts = [(b, 200 * (1 + 300 / b)) for b in (16, 32, 64, 128, 256, 512, 1024)]
    fit, reason = fit_critical_batch(pts)
    assert reason is None
    assert fit["b_crit"] == pytest.approx(300, rel=1e-9)
    assert fit["s_min"] == pytest.approx(200, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    assert [p[0] for p in fit["points"]] == [16, 32, 64, 128, 256, 512, 1024]
    assert predict_steps(fit, 300) == pytest.approx(400)


def test_noisy_curve_keeps_the_scale_and_reports_fit_quality() -> None:
    noise = [1.05, 0.96, 1.03, 0.97, 1.04, 0.95]
    pts = [(b, 50 * (1 + 128 / b) * e) for b, e in zip((8, 16, 32, 64, 128, 256), noise)]
    fit, _ = fit_critical_batch(pts)
    assert 90 < fit["b_crit"] < 180
    assert 0.9 < fit["r2"] < 1.0


def test_best_steps_per_batch_and_bad_points_dropped() -> None:
    pts = [(16, 900), (16, 700), (64, 250), (256, 130), (512, float("nan")), (0, 5), (128, -1)]
    fit, _ = fit_critical_batch(pts)
    assert [p for p in fit["points"]] == [[16, 700], [64, 250], [256, 130]]


def test_too_few_points_or_unphysical_fit_give_a_reason() -> None:
    fit, reason = fit_critical_batch([(16, 100), (32, 60)])
    assert fit is None and "at least 3" in reason
    fit, reason = fit_critical_batch([])
    assert fit is None and "only 0" in reason
    # steps grow with the batch: the smallest batch is already past the critical batch
    fit, reason = fit_critical_batch([(16, 100), (64, 120), (256, 150)])
    assert fit is None and "smaller batch sizes" in reason
    # steps fall faster than 1/B: S_min would be negative
    fit, reason = fit_critical_batch([(16, 1000), (32, 400), (64, 100)])
    assert fit is None and "larger batch sizes" in reason
