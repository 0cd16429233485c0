"""Uncertainty for every number batchfit reports, and decisions that say when the data cannot tell candidates apart.

batchfit is a measuring instrument, so each measured number is an :class:`Interval` (estimate, low, high, level,
method, n) rather than a bare float, and each comparison is a decision that may be a tie:

- :func:`mean_interval`: Student-t interval for the mean of a few replicates (seeds); with one replicate the
  interval is unknown (``low``/``high`` are ``None``), never a fake zero width. :func:`pooled_mean_intervals`:
  the same with the variance pooled over every configuration's seeds (the one-way ANOVA error term).
- :func:`bootstrap_interval`: percentile bootstrap (Efron & Tibshirani 1993, ch. 13) of any statistic over samples;
  :func:`cluster_bootstrap_mean` resamples whole clusters (e.g. validation chunks whose metric is a chunk mean), the
  standard way to keep within-cluster correlation (Davison & Hinkley 1997, sec. 3.8).
- :func:`median_interval`: distribution-free order-statistic interval for a median (the binomial argument, see
  Conover 1999, sec. 3.2), with a scaled MAD as the spread: timings on a busy machine have heavy right tails, so
  the median moves little while the interval widens — a busy machine widens the interval instead of moving the
  answer.
- :func:`ratio_interval`: bootstrap interval of a ratio of medians of two timing samples (a speed-up), the way
  hyperfine and Criterion.rs report a comparison with its own uncertainty.
- :func:`choose`: the decision rule. Candidates whose quality interval overlaps the best candidate's are *tied* on
  quality; among the tied, the one with the least cost (e.g. time to target) is chosen, and whether that cost
  difference is itself beyond the noise is reported. The same data always give the same choice.
- :func:`undecided`: racing (Maron & Moore 1997, "The racing algorithm"; Birattari et al. 2002, F-Race): the
  candidates whose interval still overlaps the decision boundary are the only ones worth another replicate.
- :func:`unbiased_estimates` and :func:`noise_scale_interval`: the gradient noise scale B_simple's estimator
  (McCandlish et al. 2018, appendix A), the one every B_simple in batchfit goes through.

Every random resampling takes a seed, so a report rebuilt from the same data prints the same intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchfit.errors import ConfigError

__all__ = [
    "DEFAULT_LEVEL",
    "Choice",
    "Interval",
    "bootstrap_interval",
    "CriticalBatchInterval",
    "choose",
    "critical_batch_interval",
    "cluster_bootstrap_mean",
    "mean_interval",
    "median_interval",
    "pooled_mean_intervals",
    "ratio_interval",
    "undecided",
]

DEFAULT_LEVEL = 0.95
DEFAULT_BOOT = 2000


@dataclass(frozen=True)
class Interval:
    """A measured number with its uncertainty. ``low``/``high`` are ``None`` when the data cannot give an interval."""

    estimate: float
    low: float | None
    high: float | None
    level: float = DEFAULT_LEVEL
    method: str = ""
    n: int = 1
    spread: float | None = None  # a scale of the raw data (std or scaled MAD), when meaningful

    @property
    def known(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def width(self) -> float:
        return (self.high - self.low) if self.known else math.inf  # type: ignore[operator]

    def overlaps(self, other: Interval) -> bool:
        """True unless both intervals are known and disjoint (an unknown interval overlaps everything)."""
        if not (self.known and other.known):
            return True
        return not (self.high < other.low or other.high < self.low)  # type: ignore[operator]

    def contains(self, value: float) -> bool:
        return self.known and self.low <= value <= self.high  # type: ignore[operator]

    def scaled(self, factor: float) -> Interval:
        """The interval of ``factor * x`` (a positive factor)."""
        lo, hi = (None, None) if not self.known else (self.low * factor, self.high * factor)  # type: ignore[operator]
        spread = None if self.spread is None else self.spread * abs(factor)
        return Interval(self.estimate * factor, lo, hi, self.level, self.method, self.n, spread)

    def shifted(self, delta: float) -> Interval:
        """The interval of ``x + delta`` (the spread unchanged)."""
        lo, hi = (None, None) if not self.known else (self.low + delta, self.high + delta)  # type: ignore[operator]
        return Interval(self.estimate + delta, lo, hi, self.level, self.method, self.n, self.spread)

    def clipped(self, low: float, high: float) -> Interval:
        """The interval kept inside a quantity's range (an accuracy's ``[0, 1]``: a t interval over few seeds
        can pass 1); the estimate and an unknown interval are unchanged."""
        if not self.known:
            return self
        return Interval(self.estimate, min(max(self.low, low), high), max(min(self.high, high), low),  # type: ignore
                        self.level, self.method, self.n, self.spread)

    def with_margin(self, margin: float) -> Interval:
        """Widened to a half-width of at least ``margin x |estimate|`` (a practical-equivalence margin); an unknown
        interval gets exactly that half-width."""
        half = margin * abs(self.estimate)
        if half <= 0 or (self.known and min(self.estimate - self.low, self.high - self.estimate) >= half):  # type: ignore
            return self
        lo = self.estimate - half if not self.known else min(self.low, self.estimate - half)  # type: ignore
        hi = self.estimate + half if not self.known else max(self.high, self.estimate + half)  # type: ignore
        method = self.method + ("+margin" if self.known else "margin")
        return Interval(self.estimate, lo, hi, self.level, method, self.n, self.spread)

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level,
                "method": self.method, "n": self.n, "spread": self.spread}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Interval:
        return cls(float(d["estimate"]), _opt(d.get("low")), _opt(d.get("high")), float(d.get("level", DEFAULT_LEVEL)),
                   str(d.get("method", "")), int(d.get("n", 1)), _opt(d.get("spread")))

    def __str__(self) -> str:
        if not self.known:
            return f"{self.estimate:.4g} (interval unknown, n={self.n})"
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _opt(x: Any) -> float | None:
    return None if x is None else float(x)


def _clean(values: Sequence[float]) -> np.ndarray:
    a = np.asarray([float(v) for v in values], dtype=float)
    return a[np.isfinite(a)]


def _t_quantile(level: float, dof: int) -> float:
    try:
        from scipy.special import stdtrit  # scipy.stats' t.ppf itself; scipy.special imports in a third of the time

        return float(stdtrit(dof, 0.5 + level / 2))
    except ImportError:  # pragma: no cover - scipy is optional; a normal quantile with a small-sample correction
        z = float(np.sqrt(2) * _erfinv(level))
        return z * (1 + (z * z + 1) / (4 * dof))


def _erfinv(y: float) -> float:  # pragma: no cover - only without scipy
    a = 0.147
    ln = math.log(1 - y * y)
    first = 2 / (math.pi * a) + ln / 2
    return math.copysign(math.sqrt(math.sqrt(first * first - ln / a) - first), y)


def mean_interval(values: Sequence[float], level: float = DEFAULT_LEVEL) -> Interval:
    """Student-t interval for the mean of replicates; one replicate gives an unknown interval."""
    a = _clean(values)
    if len(a) == 0:
        raise ValueError("mean_interval needs at least one finite value")
    mean = float(a.mean())
    if len(a) == 1:
        return Interval(mean, None, None, level, "t", 1)
    sd = float(a.std(ddof=1))
    half = _t_quantile(level, len(a) - 1) * sd / math.sqrt(len(a))
    return Interval(mean, mean - half, mean + half, level, "t", len(a), sd)


def pooled_mean_intervals(groups: Mapping[Any, Sequence[float]], level: float = DEFAULT_LEVEL,
                          min_dof: int = 2) -> dict[Any, Interval | None]:
    """A t interval for each group's mean from the **pooled** within-group variance (the one-way ANOVA error term).

    Seeds vary a configuration's result about as much at every batch size, so one variance estimated from every
    group's replicates (degrees of freedom = sum of n_i - 1) is far better determined than each group's own: two
    seeds alone give a t interval with one degree of freedom (12.7 standard errors wide at 95 %), while eight
    groups of two give eight. A group with at least three seeds whose own standard deviation is larger keeps its
    own (the pooled one must not hide a noisier batch size). A single-seed group gets ``t x s_pooled``. ``None``
    for every group when the pooled degrees of freedom are below ``min_dof`` (then each group's own evidence
    decides).
    """
    clean = {k: _clean(v) for k, v in groups.items()}
    dof = sum(len(a) - 1 for a in clean.values() if len(a) > 1)
    if dof < min_dof:
        return {k: None for k in clean}
    pooled = math.sqrt(sum(float(((a - a.mean()) ** 2).sum()) for a in clean.values() if len(a) > 1) / dof)
    t = _t_quantile(level, dof)
    out: dict[Any, Interval | None] = {}
    for k, a in clean.items():
        if len(a) == 0:
            out[k] = None
            continue
        mean = float(a.mean())
        sd = pooled
        if len(a) >= 3 and float(a.std(ddof=1)) > pooled:
            sd, tq = float(a.std(ddof=1)), _t_quantile(level, len(a) - 1)
        else:
            tq = t
        half = tq * sd / math.sqrt(len(a))
        out[k] = Interval(mean, mean - half, mean + half, level, "pooled-t", len(a), sd)
    return out


def bootstrap_interval(values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean, *,
                       level: float = DEFAULT_LEVEL, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (reproducible for a given ``seed``)."""
    a = _clean(values)
    if len(a) == 0:
        raise ValueError("bootstrap_interval needs at least one finite value")
    est = float(statistic(a))
    if len(a) == 1:
        return Interval(est, None, None, level, "bootstrap", 1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    boots = np.array([statistic(a[i]) for i in idx]) if statistic is not np.mean else a[idx].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return Interval(est, float(lo), float(hi), level, "bootstrap", len(a), float(a.std(ddof=1)))


def cluster_bootstrap_mean(means: Sequence[float], sizes: Sequence[int], *, level: float = DEFAULT_LEVEL,
                           n_boot: int = DEFAULT_BOOT, seed: int = 0) -> Interval:
    """Interval of a sample-weighted mean from cluster means (e.g. a metric evaluated on validation chunks).

    Resamples whole clusters with replacement and recomputes the size-weighted mean: valid for any metric that is a
    mean over samples, without needing per-sample values.
    """
    m = np.asarray(means, dtype=float)
    w = np.asarray(sizes, dtype=float)
    ok = np.isfinite(m) & (w > 0)
    m, w = m[ok], w[ok]
    if len(m) == 0:
        raise ValueError("cluster_bootstrap_mean needs at least one finite cluster")
    est = float(np.sum(m * w) / np.sum(w))
    if len(m) == 1:
        return Interval(est, None, None, level, "cluster-bootstrap", int(w.sum()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(m), size=(n_boot, len(m)))
    boots = np.sum(m[idx] * w[idx], axis=1) / np.sum(w[idx], axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return Interval(est, float(lo), float(hi), level, "cluster-bootstrap", int(w.sum()))


def _binom_cdf(k: int, n: int) -> float:
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_interval(values: Sequence[float], level: float = DEFAULT_LEVEL) -> Interval:
    """Median with a distribution-free order-statistic interval and a scaled MAD as the spread.

    The interval ``[x_(k), x_(n-k+1)]`` has coverage >= ``level`` for any continuous distribution; with too few
    values for that coverage (n < 6 at 95 %) it is unknown. Robust to a few slow outliers.
    """
    a = np.sort(_clean(values))
    n = len(a)
    if n == 0:
        raise ValueError("median_interval needs at least one finite value")
    med = float(np.median(a))
    mad = float(np.median(np.abs(a - med))) * 1.4826  # consistent with the std for normal data
    k = 0
    while k + 1 <= n // 2 and 1 - 2 * _binom_cdf(k, n) >= level:  # the largest k whose interval still covers
        k += 1
    if k == 0:
        return Interval(med, None, None, level, "order-statistic", n, mad)
    return Interval(med, float(a[k - 1]), float(a[n - k]), level, "order-statistic", n, mad)


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float], *, level: float = DEFAULT_LEVEL,
                   n_boot: int = DEFAULT_BOOT, seed: int = 0) -> Interval:
    """Interval of ``median(numerator) / median(denominator)`` by an independent bootstrap of both samples.

    For a speed-up pass times per sample (or per step): ``ratio_interval(t_slow, t_fast)`` > 1 means faster.
    """
    a, b = _clean(numerator), _clean(denominator)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("ratio_interval needs values on both sides")
    est = float(np.median(a) / np.median(b))
    if len(a) < 2 or len(b) < 2:
        return Interval(est, None, None, level, "bootstrap-ratio", min(len(a), len(b)))
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, len(a), size=(n_boot, len(a)))], axis=1)
    mb = np.median(b[rng.integers(0, len(b), size=(n_boot, len(b)))], axis=1)
    lo, hi = np.quantile(ma / mb, [(1 - level) / 2, (1 + level) / 2])
    return Interval(est, float(lo), float(hi), level, "bootstrap-ratio", min(len(a), len(b)))


@dataclass(frozen=True)
class Choice:
    """The outcome of :func:`choose`: the chosen key, the keys tied with the best on quality, and why."""

    chosen: Any
    best_quality: Any
    tied: tuple[Any, ...]
    cost_separated: bool  # True when the chosen one's cost is below every other tied candidate's beyond the noise
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "best_quality": self.best_quality, "tied": list(self.tied),
                "cost_separated": self.cost_separated, "reason": self.reason}


def choose(quality: Mapping[Any, Interval], cost: Mapping[Any, Interval] | None = None, *,
           higher_is_better: bool = True, describe: Callable[[Any], str] = str) -> Choice:
    """Pick among candidates whose quality the data may not tell apart.

    1. The best candidate is the one with the best quality *estimate*.
    2. Every candidate whose quality interval overlaps the best's is tied with it (an unknown interval is always
       tied: without replicates nothing can be told apart).
    3. Among the tied, the least cost estimate wins (ties in cost: the first key in ``quality``'s order, so the
       caller states the final tie-break by ordering, e.g. smaller batch first). Without costs, the best quality wins.
    """
    if not quality:
        raise ValueError("choose needs at least one candidate")
    keys = list(quality)
    sign = 1.0 if higher_is_better else -1.0
    best = max(keys, key=lambda k: (sign * quality[k].estimate, -keys.index(k)))
    tied = tuple(k for k in keys if quality[k].overlaps(quality[best]))
    if cost is None or not all(k in cost for k in tied):
        reason = (f"{describe(best)} has the best quality; "
                  + (f"{len(tied) - 1} other candidate(s) are within its interval" if len(tied) > 1 else
                     "no other candidate is within its interval"))
        return Choice(best, best, tied, False, reason)
    chosen = min(tied, key=lambda k: (cost[k].estimate, keys.index(k)))
    others = [k for k in tied if k != chosen]
    separated = bool(others) and all(cost[chosen].known and cost[k].known and cost[chosen].high < cost[k].low
                                     for k in others)  # type: ignore[operator]
    if len(tied) == 1:
        reason = f"{describe(best)} is better than every other candidate beyond the noise"
    else:
        names = ", ".join(describe(k) for k in tied)
        reason = (f"{names} are tied on quality; chosen on cost: {describe(chosen)}"
                  + (" (its cost is lower beyond the noise)" if separated else
                     " (its cost advantage is inside the noise: the tie-break is the stated rule, not a measured win)"))
    return Choice(chosen, best, tied, separated, reason)


def undecided(quality: Mapping[Any, Interval], *, higher_is_better: bool = True) -> list[Any]:
    """Racing: the candidates worth another replicate — those whose interval overlaps the current best's.

    When only the best remains, the decision is stable. Candidates with unknown intervals are undecided.
    """
    if not quality:
        return []
    keys = list(quality)
    sign = 1.0 if higher_is_better else -1.0
    best = max(keys, key=lambda k: sign * quality[k].estimate)
    contenders = [k for k in keys if quality[k].overlaps(quality[best])]
    return contenders if len(contenders) > 1 else []


def _erfinv_exact(y: float) -> float:
    try:
        from scipy.special import erfinv

        return float(erfinv(y))
    except ImportError:  # pragma: no cover
        return _erfinv(y)


def _widened(estimate: float, bounds: np.ndarray, factor: float) -> tuple[float, float]:
    lo, hi = float(bounds[0]), float(bounds[1])
    return estimate - (estimate - lo) * factor, estimate + (hi - estimate) * factor


@dataclass(frozen=True)
class CriticalBatchInterval:
    """B_crit and S_min of ``S(B) = S_min (1 + B_crit / B)`` with bootstrap intervals and the batches behind them.

    ``replicates`` are the bootstrap fits ``(b_crit, s_min)`` and ``widen`` the factor their quantiles are widened
    by; :meth:`steps` predicts the steps to target at any batch size from the same fits, so B_crit and the steps
    the decision compares come from one pooled model.
    """

    b_crit: Interval
    s_min: Interval
    support: tuple[int, int]  # the smallest and largest batch size that reached the target
    extrapolated: bool  # B_crit (its estimate) lies beyond the largest batch size tried
    failed_resamples: int  # bootstrap resamples where no fit exists (a large share means a fragile fit)
    replicates: tuple[tuple[float, float], ...] = field(default=(), repr=False, compare=False)
    widen: float = 1.0
    method: str = "stratified-bootstrap"
    r2: float | None = None  # the full fit's weighted coefficient of determination

    def steps(self, batch_size: float) -> Interval:
        """Fitted steps to target at ``batch_size``, with the bootstrap fits' interval (unknown without them)."""
        est = self.s_min.estimate * (1.0 + self.b_crit.estimate / float(batch_size))
        if len(self.replicates) < 20:
            return Interval(est, None, None, self.b_crit.level, "S(B) fit", self.b_crit.n)
        preds = np.array([s * (1.0 + b / float(batch_size)) for b, s in self.replicates])
        level = self.b_crit.level
        lo, hi = _widened(est, np.quantile(preds, [(1 - level) / 2, (1 + level) / 2]), self.widen)
        return Interval(est, max(lo, 0.0), hi, level, f"S(B) fit, {self.method}", self.b_crit.n)

    def to_dict(self) -> dict[str, Any]:
        return {"b_crit": self.b_crit.to_dict(), "s_min": self.s_min.to_dict(), "support": list(self.support),
                "extrapolated": self.extrapolated, "failed_resamples": self.failed_resamples, "r2": self.r2}


def critical_batch_interval(points: Sequence[Sequence[float]], *, level: float = DEFAULT_LEVEL,
                            n_boot: int = 500, seed: int = 0) -> CriticalBatchInterval | None:
    """Bootstrap the S(B) fit over trials and seeds, stratified by batch size (every resample keeps every batch).

    ``points`` are ``(B, steps_to_target)`` pairs, one per replicate (seed) of a batch size, each already the best
    over that batch size's learning rates (Shallue et al. 2019 retune the LR per batch size). Replicates of a batch
    size are pooled by their geometric mean (steps are positive and their noise is multiplicative), not by the
    minimum, which would be biased low and shrink the interval. With one replicate per batch size and at least
    four batch sizes, the fit's own scatter is resampled instead (a residual bootstrap on the log scale, Davison &
    Hinkley 1997, sec. 6.2: residuals rescaled by ``sqrt(n / (n - 2))`` for the two fitted parameters); with three,
    the interval is unknown. Returns ``None`` when the pooled data have no fit (see
    :func:`batchfit.critical.fit_critical_batch`).
    """
    from batchfit.critical import fit_critical_batch, pooled_points, predict_steps

    by_b: dict[int, list[float]] = {}
    for b, s in points:
        if math.isfinite(float(s)) and float(s) > 0:
            by_b.setdefault(int(b), []).append(float(s))

    def pooled(groups: Mapping[int, Sequence[float]]) -> list[tuple[int, float]]:
        return pooled_points((b, s) for b, v in groups.items() for s in v)

    full, _ = fit_critical_batch(pooled(by_b))
    if full is None:
        return None
    rng = np.random.default_rng(seed)
    replicated = any(len(v) > 1 for v in by_b.values())
    sizes = sorted(by_b)
    n = len(sizes)
    resid = np.array([math.log(by_b[b][0] / predict_steps(full, b)) for b in sizes]) if not replicated else None
    reps: list[tuple[float, float]] = []
    failed = 0
    for _ in range(n_boot if replicated or n >= 4 else 0):
        if replicated:
            sample = {b: [ss[i] for i in rng.integers(0, len(ss), size=len(ss))] for b, ss in by_b.items()}
        else:
            assert resid is not None
            draw = resid[rng.integers(0, n, size=n)] * math.sqrt(n / (n - 2))
            sample = {b: [predict_steps(full, b) * math.exp(float(r))] for b, r in zip(sizes, draw)}
        fit, _ = fit_critical_batch(pooled(sample))
        if fit is None:
            failed += 1
            continue
        reps.append((float(fit["b_crit"]), float(fit["s_min"])))
    q = [(1 - level) / 2, (1 + level) / 2]
    n_trials = sum(len(v) for v in by_b.values())
    widen = 1.0
    method = "stratified-bootstrap" if replicated else "residual-bootstrap"
    if len(reps) >= 20:
        z = float(np.sqrt(2) * _erfinv_exact((1 + level) / 2 * 2 - 1))
        if replicated:
            # A percentile bootstrap with a few replicates per stratum undercovers (its variance is short by a factor
            # (m - 1) / m and it uses normal tails); widen around the estimate by sqrt(m / (m - 1)) and the ratio of
            # the t to the normal quantile on the pooled within-batch degrees of freedom (Davison & Hinkley 1997,
            # sec. 3.2).
            m = float(np.median([len(v) for v in by_b.values() if len(v) > 1]))
            dof = sum(len(v) - 1 for v in by_b.values())
            widen = math.sqrt(m / (m - 1)) * _t_quantile(level, dof) / z
        else:  # the residuals are already rescaled; t tails on the fit's n - 2 degrees of freedom
            widen = _t_quantile(level, n - 2) / z
        b_arr, s_arr = np.array([r[0] for r in reps]), np.array([r[1] for r in reps])
        blo, bhi = _widened(full["b_crit"], np.quantile(b_arr, q), widen)
        slo, shi = _widened(full["s_min"], np.quantile(s_arr, q), widen)
    else:  # one trial per batch size at three batch sizes: resampling cannot show the noise
        blo = bhi = slo = shi = None
        reps = []
    return CriticalBatchInterval(
        b_crit=Interval(full["b_crit"], blo, bhi, level, method, n_trials),
        s_min=Interval(full["s_min"], slo, shi, level, method, n_trials),
        support=(sizes[0], sizes[-1]),
        extrapolated=full["b_crit"] > sizes[-1],
        failed_resamples=failed,
        replicates=tuple(reps),
        widen=widen,
        method=method,
        r2=float(full.get("r2", 0.0)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Non-inferiority on paired seeds: the decision rule (issue 19.1)


@dataclass(frozen=True)
class Comparison:
    """One candidate against the reference (the best-estimated candidate), on the seeds they share.

    ``difference`` is ``candidate - reference`` signed so that positive is better, with *simultaneous* one-sided
    bounds at the selection's level (both ends: the low end shows non-inferiority, the high end inferiority).
    ``verdict``: ``reference``, ``non-inferior`` (low end above ``-tolerance``), ``inferior`` (high end below
    ``-tolerance``) or ``undecided`` (the data cannot say yet; more seeds can).
    """

    key: Any
    difference: Interval
    verdict: str
    paired: int  # seeds shared with the reference

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "difference": self.difference.to_dict(), "verdict": self.verdict,
                "paired": self.paired}


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select_non_inferior`: the reference, every candidate's comparison with it, and the
    rule's constants (the tolerance in the metric's units, the level, the critical value, the error degrees of
    freedom and the number of interim looks the level was split over)."""

    reference: Any
    comparisons: dict[Any, Comparison]
    tolerance: float
    level: float
    critical: float | None
    dof: int
    looks: int
    method: str = "paired two-way model, max-t (Dunnett/Hsu) bounds"

    def _with(self, verdict: str) -> tuple[Any, ...]:
        return tuple(k for k, c in self.comparisons.items() if c.verdict == verdict)

    @property
    def non_inferior(self) -> tuple[Any, ...]:
        """The reference and every candidate shown non-inferior to it, in the caller's order."""
        return tuple(k for k, c in self.comparisons.items() if c.verdict in ("reference", "non-inferior"))

    @property
    def undecided(self) -> tuple[Any, ...]:
        return self._with("undecided")

    @property
    def inferior(self) -> tuple[Any, ...]:
        return self._with("inferior")

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "tolerance": self.tolerance, "level": self.level,
                "critical": self.critical, "dof": self.dof, "looks": self.looks, "method": self.method,
                "non_inferior": list(self.non_inferior), "undecided": list(self.undecided),
                "inferior": list(self.inferior),
                "comparisons": [c.to_dict() for c in self.comparisons.values()]}


_MAXT_DRAWS = 20000
UNEQUAL_MIN_PAIRS = 4  # a candidate's own variance is tested against the pooled one from this many paired seeds


def _max_t_quantile(corr: np.ndarray, dof: int, level: float) -> float:
    """The ``level`` quantile of ``max_j T_j`` for a multivariate t with correlation ``corr`` and ``dof`` degrees
    of freedom: the one-sided simultaneous critical value of Dunnett (1955) and Hsu's MCB (Hsu 1996, ch. 4) for any
    design. One comparison: the t quantile. Computed by a seeded Monte Carlo (deterministic)."""
    m = corr.shape[0]
    if m == 1:
        from scipy.special import stdtrit

        return float(stdtrit(dof, level))
    key = (tuple(np.round(corr, 2).ravel().tolist()), int(dof), round(float(level), 6))
    hit = _MAXT_CACHE.get(key)
    if hit is not None:
        return hit
    rng = np.random.default_rng(12345)
    vals, vecs = np.linalg.eigh(np.asarray(key[0]).reshape(m, m))
    root = vecs * np.sqrt(np.clip(vals, 0.0, None))
    z = rng.standard_normal((_MAXT_DRAWS, m)) @ root.T
    s = np.sqrt(rng.chisquare(dof, size=_MAXT_DRAWS) / dof)
    q = float(np.quantile((z / s[:, None]).max(axis=1), level))
    _MAXT_CACHE[key] = q
    return q


_MAXT_CACHE: dict[tuple[Any, ...], float] = {}


class _TwoWay:
    """Least squares of ``y = mu[config] + beta[seed]`` over ``(config index, seed, y)`` rows."""

    def __init__(self, rows: Sequence[tuple[int, Any, float]]) -> None:
        live = sorted({i for i, _, _ in rows})
        seeds = sorted({s for _, s, _ in rows}, key=repr)
        self.col = {i: j for j, i in enumerate(live)}
        scol = {s: len(live) + j - 1 for j, s in enumerate(seeds) if j > 0}
        self.x = np.zeros((len(rows), len(live) + len(seeds) - 1))
        y = np.zeros(len(rows))
        for r, (i, s, v) in enumerate(rows):
            self.x[r, self.col[i]] = 1.0
            if s in scol:
                self.x[r, scol[s]] = 1.0
            y[r] = v
        self.beta, *_ = np.linalg.lstsq(self.x, y, rcond=None)
        self.dof = len(rows) - int(np.linalg.matrix_rank(self.x)) if len(rows) else 0
        self.resid = y - self.x @ self.beta
        self.xtx_inv = np.linalg.pinv(self.x.T @ self.x)
        self.sigma2 = float(self.resid @ self.resid) / self.dof if self.dof > 0 else None

    def has(self, i: int) -> bool:
        return i in self.col

    def mu(self, i: int) -> float:
        return float(self.beta[self.col[i]])


def _noisier(rows: Sequence[tuple[int, Any, float]], fit: _TwoWay, cands: Sequence[Any], ref: Any) -> set[Any]:
    """Candidates (not the reference) with >= :data:`UNEQUAL_MIN_PAIRS` values whose residual variance exceeds
    the rest's beyond chance (one-sided F test at 5 %): their variance is not the pooled one."""
    from scipy.special import fdtri  # scipy.stats' f.ppf(q, d1, d2) is fdtri(d1, d2, q)

    out: set[Any] = set()
    if fit.dof <= 0:
        return out
    for i, k in enumerate(cands):
        idx = np.array([r for r, row in enumerate(rows) if row[0] == i], dtype=int)
        n = len(idx)
        rest = fit.dof - (n - 1)
        if k == ref or n < UNEQUAL_MIN_PAIRS or rest < 1:
            continue
        own = float(fit.resid[idx] @ fit.resid[idx]) / (n - 1)
        mask = np.ones(len(fit.resid), dtype=bool)
        mask[idx] = False
        other = float(fit.resid[mask] @ fit.resid[mask]) / rest
        if other <= 0 or own / other > float(fdtri(n - 1, rest, 0.95)):
            out.add(k)
    return out


SMOOTH_MIN_POSITIONS = 4  # the pooled curve needs this many distinct batch sizes (3 parameters + lack of fit)
SMOOTH_MIN_DOF = 3  # ... and this many error degrees of freedom: fewer estimate the noise from a curve's wiggle


def _smooth_selection(values: Mapping[Any, Mapping[Any, float]], positions: Mapping[Any, float], *,
                      tolerance: float, sign: float, level: float, looks: int) -> Selection | None:
    """Non-inferiority read from one curve pooled over every batch size: ``y = a + b x + c x^2 + seed`` with ``x``
    the candidate's position (log2 of the batch size), fitted by least squares over every seed of every candidate.

    Each batch size's quality then borrows strength from its neighbours (a difference between two batch sizes is
    estimated from all the data, not from their own 2-3 seeds), so the reference is the curve's best point rather
    than the argmax of noisy means, and a re-run with other seeds lands on the same choice. ``None`` (use the
    per-configuration model) with fewer than :data:`SMOOTH_MIN_POSITIONS` positions, no error degrees of freedom,
    or when the curve does not fit the per-configuration means (lack-of-fit F test at 5 %, when replicates allow
    it; Montgomery, *Design and Analysis of Experiments*, sec. 10.3)."""
    from scipy.special import fdtri

    cands = [k for k in values if k in positions]
    if len({positions[k] for k in cands}) < SMOOTH_MIN_POSITIONS:
        return None
    rows = [(i, s, sign * float(y)) for i, k in enumerate(cands) for s, y in values[k].items()
            if math.isfinite(float(y))]
    seeds = sorted({s for _, s, _ in rows}, key=repr)
    scol = {s: 3 + j - 1 for j, s in enumerate(seeds) if j > 0}
    xs = {i: float(positions[k]) for i, k in enumerate(cands)}
    center = float(np.mean(list(xs.values())))
    x = np.zeros((len(rows), 3 + len(seeds) - 1))
    y = np.zeros(len(rows))
    for r, (i, sd, v) in enumerate(rows):
        u = xs[i] - center
        x[r, :3] = (1.0, u, u * u)
        if sd in scol:
            x[r, scol[sd]] = 1.0
        y[r] = v
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    dof = len(rows) - int(np.linalg.matrix_rank(x))
    if dof < SMOOTH_MIN_DOF:
        # e.g. 3 seeds at one batch size and 1 elsewhere: the seed effects absorb the replicates, and the only
        # "noise" left is how far 4 one-seed points sit from a parabola (1 df); quantized accuracies can sit on it
        # exactly, and a zero-width interval would then call batch sizes apart on one seed
        return None
    resid = y - x @ beta
    rss = float(resid @ resid)
    if rss <= 1e-12 * max(1.0, float(y @ y)):  # no measured noise at all (quantized values on the curve)
        return None
    full = _TwoWay(rows)
    if full.dof > 0 and dof > full.dof:  # replicates: is the curve as good as one mean per batch size?
        rss_full = float(full.resid @ full.resid)
        f = ((rss - rss_full) / (dof - full.dof)) / max(rss_full / full.dof, 1e-300)
        if f > float(fdtri(dof - full.dof, full.dof, 0.95)):
            return None
    sigma2 = rss / dof
    xtx_inv = np.linalg.pinv(x.T @ x)

    def vec(i: int) -> np.ndarray:
        u = xs[i] - center
        v = np.zeros(x.shape[1])
        v[:3] = (1.0, u, u * u)
        return v

    fitted = {k: float(vec(i)[:3] @ beta[:3]) for i, k in enumerate(cands)}
    ref = max(cands, key=lambda k: (fitted[k], -cands.index(k)))
    r_i = cands.index(ref)
    others_c = [k for k in cands if k != ref]
    alpha = (1.0 - level) / max(1, int(looks))
    comps: dict[Any, Comparison] = {}
    crit: float | None = None
    if others_c:
        vs = np.stack([vec(cands.index(k)) - vec(r_i) for k in others_c])
        cov = vs @ xtx_inv @ vs.T * sigma2
        sd = np.sqrt(np.clip(np.diag(cov), 1e-300, None))
        crit = _max_t_quantile(cov / np.outer(sd, sd), dof, 1.0 - alpha)
        se = {k: float(sd[j]) for j, k in enumerate(others_c)}
    ref_seeds = set(values[ref])
    for k in values:
        paired = sum(1 for s in values[k] if s in ref_seeds)
        if k == ref:
            comps[k] = Comparison(k, Interval(0.0, 0.0, 0.0, level, "reference", paired), "reference", paired)
            continue
        if k not in fitted:
            comps[k] = Comparison(k, Interval(math.nan, None, None, level, "no position", 0), "undecided", paired)
            continue
        d = fitted[k] - fitted[ref]
        half = crit * se[k]  # type: ignore[operator]
        lo, hi = d - half, d + half
        verdict = "non-inferior" if lo > -tolerance else ("inferior" if hi < -tolerance else "undecided")
        comps[k] = Comparison(k, Interval(d, lo, hi, level, "quadratic in log2 B, max-t", paired), verdict, paired)
    return Selection(ref, comps, float(tolerance), level, crit, dof, max(1, int(looks)),
                     method="one quadratic curve in log2(batch) over every seed (+ seed effects), max-t bounds")


def select_non_inferior(values: Mapping[Any, Mapping[Any, float]], *, tolerance: float,
                        higher_is_better: bool = True, level: float = DEFAULT_LEVEL, looks: int = 1,
                        others: Mapping[Any, Mapping[Any, float]] | None = None,
                        positions: Mapping[Any, float] | None = None) -> Selection:
    """Which candidates are non-inferior to the best, judged on paired seeds with multiplicity handled.

    ``values`` maps each candidate to ``{seed: quality}``; ``others`` are further configurations (e.g. the other
    learning rates of a batch size) that inform the noise estimate and the seed effects but are not candidates.

    The model is two-way additive, ``y[c, s] = mu[c] + beta[s] + e`` (configuration and seed effects; Montgomery,
    *Design and Analysis of Experiments*, randomized complete block design, fitted by least squares so unequal
    seed counts are fine): a seed that is good for one batch size tends to be good for all, so comparing on shared
    seeds removes that part of the noise. The reference is the candidate with the best fitted ``mu``; each other
    candidate's difference from it gets simultaneous one-sided bounds ``d -/+ c se``, where ``c`` is the max-t
    critical value over all comparisons for the contrasts' own correlation (Dunnett 1955; Hsu 1996's multiple
    comparisons with the best) and ``level`` is split over ``looks`` interim analyses (Bonferroni over the racing
    rounds: racing looks at the data after every added seed). A candidate is *non-inferior* when its low bound lies
    above ``-tolerance`` (Wellek 2010, *Testing Statistical Hypotheses of Equivalence and Noninferiority*), *inferior*
    when its high bound lies below it, else *undecided*. A candidate with >= 4 seeds shared with the reference whose
    own paired differences are noisier than the model says beyond chance (one-sided F test at 5 %) keeps its own
    standard error (unequal variances), with a Bonferroni t quantile on its own degrees of freedom.

    Less data never makes a candidate non-inferior: without error degrees of freedom (one seed everywhere) every
    candidate but the reference is undecided, and wider bounds only move verdicts toward undecided.

    ``positions`` (candidate -> a coordinate, e.g. log2 of the batch size): read the comparisons from one curve
    pooled over every candidate (:func:`_smooth_selection`) when it fits, else as above.
    """
    if not values:
        raise ValueError("select_non_inferior needs at least one candidate")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    sign = 1.0 if higher_is_better else -1.0
    if positions:
        smooth = _smooth_selection(values, positions, tolerance=float(tolerance), sign=sign, level=level,
                                   looks=looks)
        if smooth is not None:
            return smooth
    cands = list(values)
    configs: list[tuple[str, Any]] = [("c", k) for k in cands] + [("o", k) for k in (others or {})]
    table = {("c", k): values[k] for k in cands}
    table.update({("o", k): v for k, v in (others or {}).items()})
    rows: list[tuple[int, Any, float]] = []
    for i, cfg in enumerate(configs):
        for s, y in table[cfg].items():
            fy = float(y)
            if math.isfinite(fy):
                rows.append((i, s, sign * fy))
    if not any(i < len(cands) for i, _, _ in rows):
        raise ValueError("select_non_inferior needs a finite value for at least one candidate")
    fit = _TwoWay(rows)
    mu = {k: fit.mu(i) for i, k in enumerate(cands) if fit.has(i)}
    ref = max(mu, key=lambda k: (mu[k], -cands.index(k)))
    others_c = [k for k in cands if k != ref and k in mu]
    alpha = (1.0 - level) / max(1, int(looks))
    noisy = _noisier(rows, fit, cands, ref)
    if noisy:  # the pooled model without them: their noise must not widen (or their seeds shift) the others
        fit = _TwoWay([r for r in rows if not (r[0] < len(cands) and cands[r[0]] in noisy)])
        mu.update({k: fit.mu(i) for i, k in enumerate(cands) if fit.has(i)})
    x, xtx_inv, col, dof = fit.x, fit.xtx_inv, fit.col, fit.dof
    sigma2 = fit.sigma2

    def contrast(k: Any) -> np.ndarray:
        v = np.zeros(x.shape[1])
        v[col[cands.index(k)]], v[col[cands.index(ref)]] = 1.0, -1.0
        return v

    crit: float | None = None
    se: dict[Any, float] = {}
    modelled = [k for k in others_c if k not in noisy]
    if sigma2 is not None and modelled:
        vs = np.stack([contrast(k) for k in modelled])
        cov = vs @ xtx_inv @ vs.T * sigma2
        sd = np.sqrt(np.clip(np.diag(cov), 1e-300, None))
        se = {k: float(sd[j]) for j, k in enumerate(modelled)}
        crit = _max_t_quantile(cov / np.outer(sd, sd), dof, 1.0 - alpha)
    ref_vals = {s: sign * float(v) for s, v in values[ref].items() if math.isfinite(float(v))}
    comps: dict[Any, Comparison] = {}
    for k in cands:
        if k not in mu:
            comps[k] = Comparison(k, Interval(math.nan, None, None, level, "no value", 0), "undecided", 0)
            continue
        pairs = [sign * float(v) - ref_vals[s] for s, v in values[k].items()
                 if s in ref_vals and math.isfinite(float(v))]
        if k == ref:
            comps[k] = Comparison(k, Interval(0.0, 0.0, 0.0, level, "reference", len(pairs)), "reference",
                                  len(pairs))
            continue
        d = mu[k] - mu[ref]
        if k in noisy:
            from scipy.special import stdtrit

            d = float(np.mean(pairs))
            tq = float(stdtrit(len(pairs) - 1, 1.0 - alpha / max(1, len(others_c))))
            half, method = tq * float(np.std(pairs, ddof=1)) / math.sqrt(len(pairs)), \
                "own paired t (noisier than the pooled error), Bonferroni"
        elif k in se and crit is not None:
            half, method = crit * se[k], "max-t"
        else:
            comps[k] = Comparison(k, Interval(d, None, None, level, "no error degrees of freedom", len(pairs)),
                                  "undecided", len(pairs))
            continue
        lo, hi = d - half, d + half
        verdict = "non-inferior" if lo > -tolerance else ("inferior" if hi < -tolerance else "undecided")
        comps[k] = Comparison(k, Interval(d, lo, hi, level, method, len(pairs)), verdict, len(pairs))
    return Selection(ref, comps, float(tolerance), level, crit, dof, max(1, int(looks)))


def simulate_selection(true_means: Sequence[float], sd: float | Sequence[float], seeds: int, tolerance: float, *,
                       reps: int = 2000, seed_sd: float = 0.0, level: float = DEFAULT_LEVEL, looks: int = 1,
                       seed: int = 0, positions: Sequence[float] | None = None) -> dict[str, Any]:
    """The error rates of :func:`select_non_inferior` with the fastest non-inferior chosen, simulated.

    Candidates ``0 .. k-1`` have true qualities ``true_means`` (higher is better) and per-seed noise ``sd`` (one
    value, or one per candidate for unequal variances), plus a seed effect shared by every candidate
    (``seed_sd``); cost falls with the index (candidate ``k-1`` is the fastest, as the largest batch is), the
    worst case for a rule whose ties go to the fastest; ``positions`` (e.g. log2 of the batch sizes) selects the
    pooled-curve model, as :func:`batchfit.decide.decide` uses it. Rates, over ``reps`` repetitions:

    - ``false_tied``: of the comparisons of a candidate truly worse than the best by more than ``tolerance``, the
      share called non-inferior (the rule's promise: at most ``1 - level``);
    - ``false_apart``: of the comparisons of a candidate truly within ``tolerance`` of the best, the share called
      inferior;
    - ``shown``: of those, the share shown non-inferior (the power);
    - ``wrong_choice``: the share of repetitions whose choice is truly worse than the best by more than
      ``tolerance``.
    """
    mu = np.asarray(true_means, dtype=float)
    k = len(mu)
    sds = np.broadcast_to(np.asarray(sd, dtype=float), (k,))
    best = float(mu.max())
    worse = mu < best - tolerance
    rng = np.random.default_rng(seed)
    counts = {"false_tied": [0, 0], "false_apart": [0, 0], "shown": [0, 0]}
    wrong = 0
    for _ in range(reps):
        block = rng.normal(0.0, seed_sd, size=seeds)
        y = mu[:, None] + block[None, :] + rng.normal(0.0, 1.0, size=(k, seeds)) * sds[:, None]
        sel = select_non_inferior({i: dict(enumerate(y[i])) for i in range(k)}, tolerance=tolerance, level=level,
                                  looks=looks, positions=None if positions is None else dict(enumerate(positions)))
        for i, c in sel.comparisons.items():
            if c.verdict == "reference":
                continue
            if worse[i]:
                counts["false_tied"][0] += c.verdict == "non-inferior"
                counts["false_tied"][1] += 1
            else:
                counts["false_apart"][0] += c.verdict == "inferior"
                counts["false_apart"][1] += 1
                counts["shown"][0] += c.verdict == "non-inferior"
                counts["shown"][1] += 1
        wrong += bool(worse[max(sel.non_inferior)])
    out: dict[str, Any] = {name: (hit / n if n else None) for name, (hit, n) in counts.items()}
    out.update(wrong_choice=wrong / reps, reps=reps, seeds=seeds, tolerance=tolerance, level=level, looks=looks)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Positive quantities (issue 19.4): intervals on the log scale, and quotients that never divide by an end <= 0


def positive_mean_interval(values: Sequence[float], level: float = DEFAULT_LEVEL) -> Interval:
    """Interval for a positive, right-skewed quantity over a few replicates (B_simple over seeds): the Student-t
    interval of the **log** values, exponentiated back. The estimate is the geometric mean; both ends are positive
    by construction (a t interval on the raw values of 10 and 200 reaches below zero, a noise scale cannot), and the
    interval is wider above the estimate than below, as a multiplicative spread is. One replicate: unknown.

    Non-finite values are ignored; a value <= 0 is not a positive quantity and raises ``ValueError``.
    """
    a = _clean(values)
    if len(a) == 0:
        raise ValueError("positive_mean_interval needs at least one finite value")
    if np.any(a <= 0):
        raise ValueError(f"positive_mean_interval takes positive values only, got {float(a.min()):g}")
    if len(a) == 1:
        return Interval(float(a[0]), None, None, level, "log-t", 1)
    logs = np.log(a)
    est = float(np.exp(logs.mean()))
    sd = float(logs.std(ddof=1))
    half = _t_quantile(level, len(a) - 1) * sd / math.sqrt(len(a))
    return Interval(est, est * math.exp(-half), est * math.exp(half), level, "log-t", len(a), sd)


def quotient_interval(numerator: float, denominator: Interval) -> Interval | None:
    """The interval of ``numerator / x`` for a positive x known by ``denominator`` (B / B_simple): the ends swap,
    ``numerator / [high, low]``. Never an ``inf`` from a division: an unbounded ``high`` gives a low end of 0, a
    ``low`` at or below zero (not an interval of a positive quantity) leaves the quotient's interval unknown, and an
    unknown interval stays unknown. ``None`` when the estimate itself is not a positive finite number. ``spread`` is
    the denominator's relative spread (a log-scale standard deviation) when it has one, else ``None``."""
    est = denominator.estimate
    if not (math.isfinite(est) and est > 0 and math.isfinite(numerator)):
        return None
    low, high = denominator.low, denominator.high
    spread = denominator.spread if denominator.method == "log-t" else None
    if low is None or high is None or not low > 0 or math.isnan(high) or high < low:
        return Interval(numerator / est, None, None, denominator.level, f"quotient of {denominator.method}",
                        denominator.n, spread)
    q_low = 0.0 if math.isinf(high) else numerator / high
    return Interval(numerator / est, q_low, numerator / low, denominator.level, f"quotient of {denominator.method}",
                    denominator.n, spread)


__all__ += ["positive_mean_interval", "quotient_interval", "three_point_peak"]


def three_point_peak(points: Sequence[tuple[float, float]]) -> float | None:
    """The ``x`` of the vertex of the parabola through three ``(x, y)`` points (larger ``y`` is better): classic
    three-point peak interpolation, e.g. of a score against log2(LR). ``None`` where the points do not bend down
    (flat or convex: there is no peak to interpolate). Not clamped: callers keep it inside their own range."""
    (x0, y0), (x1, y1), (x2, y2) = points
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    return None if a >= 0 else -b / (2 * a)


# ---------------------------------------------------------------------------------------------------------------
# The gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, appendix A): the per-unit estimates and
# the ratio with its interval, the one implementation every B_simple in batchfit goes through (the noise probe and
# callback in :mod:`batchfit.noise`, branching's B_simple beside the local critical batch, the Lightning logger)


def unbiased_estimates(small_sq: Any, big_sq: Any, k: int, batch_size: int,
                       population: int | None = None) -> tuple[Any, Any]:
    """One step's unbiased ``(|G|², tr(Σ))`` estimates from k micro-batch gradients (floats or tensors).

    ``small_sq = Σ_i (b_i/B)|g_i|²`` (g_i: the mean gradient of micro-batch i), ``big_sq = |Σ_i (b_i/B) g_i|²``.
    ``population``: the dataset size N when batches are drawn without replacement from it (as in an epoch). Then
    Var(mean of b) = c (1/b - 1/N) with c = tr(Σ) N/(N-1) (Σ: the population covariance), which shifts the
    estimates by O(tr(Σ)/N): ``|G|² += c/N``, ``tr(Σ) = c (N-1)/N``. None: an infinite population.

    >>> unbiased_estimates(3.0, 1.5, k=2, batch_size=8)
    (0.0, 12.0)
    """
    if k < 2:
        raise ConfigError(f"the noise scale needs at least 2 micro-batches per step, got {k}")
    c = batch_size * (small_sq - big_sq) / (k - 1)
    grad_norm_sq = (k * big_sq - small_sq) / (k - 1)
    if population is None:
        return grad_norm_sq, c
    return grad_norm_sq + c / population, c * (population - 1) / population


def ratio_bootstrap_ci(g2: np.ndarray, tr: np.ndarray, rng: np.random.Generator, n_boot: int = 1000,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(tr)/mean(g2), resampling units (a non-positive |G|² mean -> inf)."""
    n = len(g2)
    idx = rng.integers(0, n, size=(n_boot, n))
    mg, mt = g2[idx].mean(axis=1), tr[idx].mean(axis=1)
    ratios = np.sort(np.where(mg > 0, mt / np.where(mg > 0, mg, 1.0), np.inf))
    alpha = (1 - level) / 2
    low = ratios[int(math.floor(alpha * n_boot))]
    high = ratios[min(n_boot - 1, int(math.ceil((1 - alpha) * n_boot)) - 1)]
    return float(low), float(high)


def noise_scale_interval(grad_norm_sq: Sequence[float], trace_cov: Sequence[float], *, seed: int = 0,
                         n_boot: int = 1000, level: float = 0.95, method: str = "bootstrap") -> Interval:
    """B_simple from paired per-unit estimates of |G|² and tr(Σ) (:func:`unbiased_estimates`; a unit is a probe
    step, a gradient pair, or a trial's pooled sums): the **ratio of their means** (McCandlish et al. 2018, appendix
    A: numerator and denominator averaged separately, divided last), with a percentile bootstrap interval over the
    units. A non-positive |G|² mean gives ``inf`` (the signal is below the noise: B_simple is only bounded below);
    tr(Σ) estimates are never negative, so the low end is never below zero. Fewer than 2 units: unknown interval.
    """
    g2, tr = np.asarray(grad_norm_sq, dtype=float), np.asarray(trace_cov, dtype=float)
    if len(g2) == 0 or len(g2) != len(tr):
        raise ValueError("noise_scale_interval needs as many |G|^2 as tr(Sigma) estimates, at least one")
    mg, mt = float(g2.mean()), float(tr.mean())
    est = mt / mg if mg > 0 else math.inf
    if len(g2) < 2:
        return Interval(est, None, None, level, method, len(g2))
    low, high = ratio_bootstrap_ci(g2, tr, np.random.default_rng(seed), n_boot=n_boot, level=level)
    return Interval(est, low, high, level, method, len(g2))


__all__ += ["noise_scale_interval", "ratio_bootstrap_ci", "unbiased_estimates"]
