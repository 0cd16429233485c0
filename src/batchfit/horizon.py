"""Measure short, decide long: what the sweep's curves say about the batch size for the whole train budget.

A sweep measured to a horizon ``h`` samples per trial is biased toward small batches when the user will train
``T > h`` samples: the critical batch grows as training goes on (McCandlish et al. 2018, B_crit rises as the loss
falls; Zhang et al. 2024, it scales with the data seen; Merrill et al. 2025 measure it rising from near zero), so a
batch that is still behind at ``h`` catches up by ``T``. This module extrapolates the one quantity that carries the
bias, with its uncertainty:

1. **B_crit at several horizons from the same curves.** At ``h/4``, ``h/2`` and ``h``, the level the reference
   configuration's seed-mean curve has reached there is a target; every trial is timed to it on its raw curve and
   the S(B) fit (:func:`batchfit.stats.critical_batch_interval`, bootstrapped over seeds) gives B_crit at that
   level. Nothing is trained for this.
2. **Its growth with the data seen**: ``B_crit(s) = B_crit(h) (s / h)^alpha``, ``alpha`` the log-log slope over
   the horizons (Zhang et al. 2024 fit the same power law in data), each bootstrap replicate giving one
   ``alpha``; extrapolated to ``T``.
3. **What a batch costs in quality at T.** In the critical-batch model a batch ``B`` needs ``1 + B / B_crit`` times
   the samples of a small batch for the same loss, so at an equal sample budget ``T`` it reaches what the small
   batch reached at ``T / (1 + B / B_crit)``. With the reference curve's gain per e-fold of data at ``T``,
   ``g(T) = dq / d ln s`` (from a saturating power law ``q(s) = q_inf - c s^-beta`` fitted to the reference curve;
   Hestness et al. 2017, Kaplan et al. 2020 for data scaling), batch ``B`` is within the tolerance ``delta`` of the
   reference batch ``B_ref`` while ``g(T) ln((1 + B / B_crit(T)) / (1 + B_ref / B_crit(T))) <= delta``, i.e. up to
   ``B_max(T) = B_crit(T) (e^(delta / g) - 1) + B_ref e^(delta / g)``.

The recommendation moves up from the short-horizon choice only to a candidate below the **lower** end of
``B_max(T)``'s interval, so noise and a poor extrapolation never move it (less evidence never picks a larger
batch), and only when the train budget is within :data:`FAR` x the measured horizon: farther, the extrapolation is
reported and flagged but moves nothing (B_crit grows fastest early in training, Merrill et al. 2025, so a power law
fitted on the first few percent of a run overshoots: demo:tiny-lm's s^0.82 over 150-600 samples, carried x55 to
its one epoch, moved batch 8 to 64, which the full-horizon reference puts 1.8 % behind the best). It moves
nothing unless ``alpha``'s interval lies above zero (the growth the move rests on, measured), and B_crit is fitted
only at horizons where it is measured, not bounded (:func:`_in_reach`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from batchfit.metric import Metric, crossing
from batchfit.stats import DEFAULT_LEVEL, CriticalBatchInterval, Interval
from batchfit.study.results import TrialSummary

__all__ = ["HORIZONS", "LongHorizon", "long_horizon", "saturating_fit"]

HORIZONS = (0.125, 0.25, 0.5, 1.0)  # fractions of the measured horizon at which B_crit is fitted
FAR = 8.0  # a train budget more than this many times the measured horizon is flagged as far
REACH = 2.0  # a horizon's B_crit enters the growth fit only within this factor of the largest batch at the level


def _curve(trial: TrialSummary, metric: Metric) -> list[tuple[float, float]]:
    out = []
    for r in trial.history or []:
        if not isinstance(r, Mapping):
            continue
        s, v = r.get("samples"), metric.of_record(r)
        if isinstance(s, (int, float)) and s > 0 and v is not None:
            out.append((float(s), float(v)))
    return out


def _value_at(curve: Sequence[tuple[float, float]], s: float) -> float | None:
    """The curve's value at ``s`` samples, linearly interpolated (``None`` outside its range)."""
    if not curve or s < curve[0][0] or s > curve[-1][0]:
        return None
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if s0 <= s <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (s - s0) / (s1 - s0)
    return curve[-1][1]


def saturating_fit(points: Sequence[tuple[float, float]], higher_is_better: bool = True
                   ) -> tuple[float, float, float] | None:
    """``(q_inf, c, beta)`` of ``q(s) = q_inf - sign c s^-beta`` by least squares (``beta`` on a grid, ``q_inf`` and
    ``c`` linear), ``sign`` = +1 for a higher-is-better metric; ``None`` with fewer than 4 points or no rising
    (falling, for a loss) fit."""
    pts = [(s, q) for s, q in points if s > 0 and math.isfinite(q)]
    if len(pts) < 4:
        return None
    s = np.array([p[0] for p in pts])
    q = np.array([p[1] for p in pts])
    sign = 1.0 if higher_is_better else -1.0
    best: tuple[float, float, float, float] | None = None
    for beta in np.geomspace(0.03, 3.0, 60):
        x = s ** -beta
        design = np.stack([np.ones_like(x), -sign * x], axis=1)
        (q_inf, c), *_ = np.linalg.lstsq(design, q, rcond=None)
        if c <= 0:
            continue
        sse = float(np.sum((design @ np.array([q_inf, c]) - q) ** 2))
        if best is None or sse < best[0]:
            best = (sse, float(q_inf), float(c), float(beta))
    return None if best is None else best[1:]


def _gain(fit: tuple[float, float, float], s: float) -> float:
    """``|dq / d ln s|`` of the saturating fit at ``s``: the quality one e-fold more data buys there."""
    _, c, beta = fit
    return c * beta * s ** -beta


@dataclass
class LongHorizon:
    """The long-horizon extrapolation (:func:`long_horizon`); ``None`` fields where the data did not allow it."""

    train_samples: int
    measured_samples: float
    reference_batch: int
    horizons: list[dict[str, Any]]  # per fitted horizon: samples, level, b_crit (Interval dict)
    alpha: Interval | None
    b_crit_at_train: Interval | None
    gain_at_train: float | None  # quality per e-fold of data at T (reference curve)
    tolerance: float  # absolute, in the metric's units
    b_max: Interval | None  # the largest batch within the tolerance of the small batch at T
    batch: int | None  # the largest candidate below b_max's lower end (None: no confident move)
    reason: str
    flags: list[str] = field(default_factory=list)
    b_simple: dict[str, Any] | None = None  # the cross-check: B_simple's growth in the reference's own trials

    @property
    def far(self) -> bool:
        return self.train_samples > FAR * self.measured_samples

    def to_dict(self) -> dict[str, Any]:
        def iv(x: Interval | None) -> dict[str, Any] | None:
            return None if x is None else x.to_dict()

        return {"train_samples": self.train_samples, "measured_samples": self.measured_samples,
                "reference_batch": self.reference_batch, "horizons": self.horizons, "alpha": iv(self.alpha),
                "b_crit_at_train": iv(self.b_crit_at_train), "gain_at_train": self.gain_at_train,
                "tolerance": self.tolerance, "b_max": iv(self.b_max), "batch": self.batch, "reason": self.reason,
                "flags": list(self.flags), "far": self.far, "b_simple_check": self.b_simple}


def _critical_at(trials: Sequence[TrialSummary], metric: Metric, level: float, *,
                 seed: int) -> CriticalBatchInterval | None:
    from batchfit.decide import critical_from_trials

    timed = [replace(t, steps_to_target=crossing(t.history, metric, level, "step")) for t in trials
             if t.status == "ok"]
    return critical_from_trials(timed, seed=seed)


def _in_reach(crit: CriticalBatchInterval) -> bool:
    """Whether B_crit was measured, not only bounded: within :data:`REACH` of the largest batch that reached the
    level. Far beyond it every batch tried is in the linear regime of ``S(B) = S_min (1 + B_crit / B)``, the curve
    bends too little to place B_crit, and the fit's value is a lower bound; a power law through it would
    extrapolate an extrapolation (demo:mnist1d: B_crit 63, 67, then 1,160 with batch 128 the largest to reach the
    level gave a growth exponent of 2.1 and moved the answer to a batch the whole run shows worse)."""
    return crit.b_crit.estimate <= REACH * crit.support[1]


def b_simple_check(ref: Sequence[TrialSummary], alpha: Interval, h: float, *, level: float = DEFAULT_LEVEL,
                   n_boot: int = 500, seed: int = 0) -> dict[str, Any] | None:
    """The extrapolation's growth against an independent measurement: the gradient noise scale B_simple the
    reference configuration's trials measured while training (McCandlish et al. 2018: B_crit ~ B_noise, and both
    grow as the loss falls). A pooled log-log fit of B_simple against the samples seen, over the second half of
    the measured horizon of every reference seed (earlier, the initial transient dominates), with a bootstrap over
    the points. ``agrees``: the two growth intervals overlap. ``None`` without 4 points spanning 1.5x in samples."""
    pts = [(float(r["samples"]), float(r["b_simple"])) for t in ref for r in t.history or []
           if isinstance(r, Mapping) and isinstance(r.get("samples"), (int, float)) and r["samples"] >= h / 2
           and isinstance(r.get("b_simple"), (int, float)) and math.isfinite(r["b_simple"]) and r["b_simple"] > 0]
    if len(pts) < 4 or max(s for s, _ in pts) < 1.5 * min(s for s, _ in pts):
        return None
    arr = np.log(np.asarray(pts))
    slope = float(np.polyfit(arr[:, 0], arr[:, 1], 1)[0])
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        sample = arr[rng.integers(0, len(arr), len(arr))]
        if np.ptp(sample[:, 0]) > 0:
            boots.append(float(np.polyfit(sample[:, 0], sample[:, 1], 1)[0]))
    q = [(1 - level) / 2, (1 + level) / 2]
    lo, hi = (float(x) for x in np.quantile(boots, q))
    growth = Interval(slope, min(lo, slope), max(hi, slope), level, "log-log slope of B_simple, bootstrap", len(pts))
    agrees = growth.high >= alpha.low and growth.low <= alpha.high
    text = (f"B_simple grows as s^{growth.estimate:.2f} ({growth.low:.2f} to {growth.high:.2f}) over the second half "
            f"of the measured horizon, B_crit as s^{alpha.estimate:.2f} ({alpha.low:.2f} to {alpha.high:.2f})"
            + ("" if agrees else ": the gradient noise scale does not confirm the critical batch's growth, so the "
               "extrapolation to the train budget is less certain than its interval says"))
    return {"growth": growth.to_dict(), "points": len(pts), "agrees": agrees, "text": text}


def long_horizon(trials: Sequence[TrialSummary | Mapping[str, Any]], metric: Metric, *, reference_batch: int,
                 reference_multiplier: float, train_samples: int, tolerance: float, candidates: Sequence[int],
                 level: float = DEFAULT_LEVEL) -> LongHorizon | None:
    """Extrapolate the trade-off from the measured horizon to ``train_samples`` (module docstring).

    ``reference_batch`` / ``reference_multiplier``: the decision's reference configuration (its curve gives the
    levels and the gain); ``tolerance``: the decision's margin in the metric's units; ``candidates``: the batch
    sizes the answer may move to (those that trained). ``None`` when the reference has no curve.
    """
    from batchfit.decide import as_trials

    trials = as_trials(trials)  # a caller's trial dicts read once; the decision's evidence is typed already
    ref = [t for t in trials if t.status == "ok" and int(t.batch_size) == int(reference_batch)
           and float(t.lr_multiplier or 1.0) == float(reference_multiplier)]
    curves = [c for t in ref if (c := _curve(t, metric))]
    if not curves:
        return None
    h = min(c[-1][0] for c in curves)
    grid = sorted({s for c in curves for s, _ in c if s <= h})
    mean_curve = [(s, float(np.mean(vals))) for s in grid
                  if len(vals := [v for c in curves if (v := _value_at(c, s)) is not None]) == len(curves)]
    out = LongHorizon(int(train_samples), float(h), int(reference_batch), [], None, None, None, float(tolerance),
                      None, None, "")
    fits: list[tuple[float, CriticalBatchInterval]] = []
    for frac in HORIZONS:
        s_k = frac * h
        q_k = _value_at(mean_curve, s_k)
        if q_k is None:
            continue
        crit = _critical_at(trials, metric, q_k, seed=int(frac * 1000))
        out.horizons.append({"samples": s_k, "level": q_k,
                             "b_crit": None if crit is None else crit.b_crit.to_dict(),
                             "extrapolated": None if crit is None else crit.extrapolated,
                             "in_reach": None if crit is None else _in_reach(crit)})
        if crit is not None and crit.b_crit.estimate > 0 and len(crit.replicates) >= 20 and _in_reach(crit):
            fits.append((s_k, crit))
    sat = saturating_fit(mean_curve[len(mean_curve) // 4:] or mean_curve, metric.higher_is_better)
    if sat is not None:
        out.gain_at_train = _gain(sat, float(train_samples))  # for the report: quality per e-fold of data at T
    if len(fits) < 2:
        beyond = [f"{hz['samples']:,.0f}" for hz in out.horizons if hz.get("in_reach") is False]
        past = (f"; at {', '.join(beyond)} samples it lay more than x{REACH:g} beyond the largest batch that reached "
                "the level, a lower bound only" if beyond else "")
        out.reason = (f"B_crit could be fitted at {len(fits)} of {len(HORIZONS)} horizons (at least 2 are needed to "
                      f"see it grow){past}: the answer stays the short-horizon one")
        out.flags.append("no long-horizon extrapolation: " + out.reason)
        return out
    logs = np.log([s for s, _ in fits])
    est = np.log([c.b_crit.estimate for _, c in fits])
    alpha_hat = float(np.polyfit(logs, est, 1)[0])
    n = min(len(c.replicates) for _, c in fits)
    reps = np.array([[math.log(max(c.replicates[i][0], 1e-9)) for _, c in fits] for i in range(n)])
    alphas = np.array([np.polyfit(logs, r, 1)[0] for r in reps])
    q = [(1 - level) / 2, (1 + level) / 2]
    a_lo, a_hi = (float(x) for x in np.quantile(alphas, q))
    out.alpha = Interval(alpha_hat, a_lo, a_hi, level, "log-log slope over horizons, bootstrap", n)
    out.b_simple = b_simple_check(ref, out.alpha, h, level=level)
    if out.b_simple is not None and not out.b_simple["agrees"]:
        out.flags.append("cross-check: " + out.b_simple["text"])
    last_s, last = fits[-1]
    beyond = float(train_samples) / h  # the train budget over the measured horizon (FAR's ratio)
    if out.far:
        out.flags.append(f"far horizon: the train budget is {beyond:.0f}x the measured horizon "
                         f"({float(train_samples) / last_s:.0f}x the last horizon B_crit was fitted at); the "
                         "extrapolation rests on B_crit's power law holding that far, so beyond "
                         f"x{FAR:g} it is reported and moves nothing")
    if a_lo <= 0.0:  # the move rests on B_crit growing; growth the data cannot show moves nothing
        out.reason = (f"B_crit's growth with the data seen is not measured: alpha {alpha_hat:.2f} ({a_lo:.2f} to "
                      f"{a_hi:.2f}) from " + ", ".join(f"{c.b_crit.estimate:.3g} at {s:,.0f}" for s, c in fits)
                      + " samples reaches zero or below: the answer stays the short-horizon one")
        out.flags.append("no long-horizon extrapolation: " + out.reason)
        return out
    if sat is None or tolerance <= 0:
        out.reason = "the reference curve has no saturating fit, so the quality a batch gives up at T is unknown"
        out.flags.append("no long-horizon extrapolation: " + out.reason)
        return out
    _, c, beta = sat
    # the level within the tolerance of the reference's at T, and the samples s* at which the reference reaches it
    # (the same for a loss: q_inf + c s^-beta, the level q(T) + delta)
    room = c * float(train_samples) ** -beta + tolerance  # distance of that level from the asymptote
    s_star = (c / room) ** (1.0 / beta)
    need = float(train_samples) / s_star  # a batch within the tolerance may need up to this many times the samples
    # B_crit at the level in question (reached by the reference at s*), from the fitted growth
    bc_reps = np.exp(reps[:, -1]) * (s_star / last_s) ** np.maximum(alphas, 0.0)  # B_crit does not shrink
    bc_hat = last.b_crit.estimate * (s_star / last_s) ** max(alpha_hat, 0.0)
    lo, hi = (float(x) for x in np.quantile(bc_reps, q))
    out.b_crit_at_train = Interval(bc_hat, min(lo, bc_hat), max(hi, bc_hat), level,
                                   f"B_crit(h) x (s*/h)^alpha at the level within the tolerance, s* = {s_star:,.0f}",
                                   n)
    b_ref = float(reference_batch)

    def largest(bc: np.ndarray | float) -> np.ndarray | float:
        # (1 + B / Bc) / (1 + B_ref / Bc) <= T / s*: B <= Bc (T/s* - 1) + B_ref T/s*
        return bc * (need - 1.0) + b_ref * need

    bmax_hat = float(largest(bc_hat))
    b_lo, b_hi = (float(x) for x in np.quantile(largest(bc_reps), q))
    out.b_max = Interval(bmax_hat, min(b_lo, bmax_hat), max(b_hi, bmax_hat), level,
                         "B_crit (T/s* - 1) + B_ref T/s*", n)
    fit_ok = [int(b) for b in sorted(candidates) if b <= out.b_max.low]  # type: ignore[operator]
    out.batch = fit_ok[-1] if fit_ok else None
    out.reason = (f"B_crit grows with the data seen as s^{alpha_hat:.2f} ({a_lo:.2f} to {a_hi:.2f}) from "
                  + ", ".join(f"{c.b_crit.estimate:.3g} at {s:,.0f}" for s, c in fits)
                  + f" samples; at the train budget ({train_samples:,} samples) B_crit ~ {out.b_crit_at_train}, and "
                  f"a batch stays within {tolerance:.3g} of the small batch up to ~ {out.b_max}")
    if out.far:  # reported, not acted on: B_crit's growth early in training does not hold that far
        out.batch = None
        out.reason += (f"; the train budget is {beyond:.0f}x the measured horizon (beyond "
                       f"x{FAR:g}), so this extrapolation is reported, not acted on: the answer stays the "
                       "short-horizon one")
    return out
