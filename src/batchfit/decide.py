"""Decisions from pooled models with their uncertainty, so a re-run with another seed or on a busy machine agrees.

The recommendation used to take the argmax of noisy single-seed points: the best validation value of each batch size
(itself the maximum over many noisy evaluations), a 1 % tolerance around it, and time to target as samples divided by
one wall-clock throughput reading. Here every quantity the guides' trade-off is made of is an interval, fitted over
all trials and seeds where a model exists:

- **Quality** of a trial: the mean of its last 3 evaluations in the last 3/16 of its samples
  (:func:`batchfit.metric.final_quality`; a maximum over noisy evaluations is biased up; one window in samples for
  every batch size, whatever its evaluation cadence); of a configuration (batch, LR): its seed mean, shown with a
  t interval whose variance is pooled over every configuration's seeds (unknown with one seed everywhere: the
  validation set's binomial noise mostly cancels between configurations and is not a seed spread).
- **Time per step** at each batch size: from the step-time calibration (:mod:`batchfit.steptime`: every candidate
  timed in the same interleaved rounds, the median over rounds with its order-statistic interval; on the CPU in
  one-thread process CPU time, which other processes on the machine do not move) when tune ran it; otherwise
  ``t(B) = a + b B`` fitted over every trial's measured step time (a pooled model: one slow trial on a busy
  machine moves the fit little), with a bootstrap interval.
- **Steps to target** per batch: the critical-batch fit ``S(B) = S_min (1 + B_crit / B)`` (McCandlish et al.
  2018; Shallue et al. 2019) over every batch size and seed, with its bootstrap (stratified by batch size over
  seeds; a residual bootstrap with one seed; :func:`batchfit.stats.critical_batch_interval`) — the estimator the
  report's B_crit comes from, at the one target (:func:`decision_target`: the target fraction of the best
  configuration's seed-mean final quality, crossed on each trial's raw curve, interpolated); the per-batch mean over
  seeds (t interval) where the fit is poor. A configuration that missed the target in any seed has no time to it.
- **Time to target** = steps to target x fitted time per step.
- **The decision** (:func:`batchfit.stats.select_non_inferior`): one quadratic curve in log2(batch) over every seed
  with seed effects (per-batch means on paired seeds where it does not fit); the curve's best batch size is the
  reference, and a batch size is non-inferior when its simultaneous one-sided 95 % bound (max-t, the level split
  over racing's looks) lies within the tolerance of it. Among the reference and the non-inferior, those whose time
  to target overlaps the least estimate are equal on time within the noise, and the largest of them is chosen.
  Without non-inferiority evidence the reference is: less data never picks a larger batch.
- **Flags**: a choice at the edge of the tried range, B_crit extrapolated beyond the largest batch tried, faster
  batch sizes still undecided, a base-LR move decided on few steps.
- **Precision**: a lower precision for speed only when its speed-up interval excludes 1; for memory only when memory
  binds (the fp32 micro-batch that fits is below the effective batch, or below the throughput knee).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from batchfit._io import split_fields
from batchfit.critical import seed_points
from batchfit.metric import Metric, best_config_mean, crossing, final_quality, finite_or_none
from batchfit.stats import (
    DEFAULT_LEVEL,
    Choice,
    CriticalBatchInterval,
    Interval,
    Selection,
    critical_batch_interval,
    mean_interval,
    pooled_mean_intervals,
    ratio_interval,
    select_non_inferior,
)
from batchfit.study.results import TrialSummary

__all__ = [
    "BatchEvidence",
    "Decision",
    "LRCheck",
    "PrecisionAdvice",
    "PrecisionCheck",
    "PrecisionRun",
    "StepTimeFit",
    "advise_precision",
    "as_trials",
    "critical_from_trials",
    "decide",
    "fit_step_time",
    "quality_of_trial",
]

SMOOTH = 3  # a trial's quality: the mean of its last SMOOTH evaluations (batchfit.metric.FINAL_EVALS)
FINALIST_SEEDS = 3  # the reference and the chosen batch size need this many seeds before racing stops
FEW_STEPS = 50  # a base-LR move decided on fewer optimizer steps than this is flagged


def _z(level: float) -> float:
    return {0.9: 1.6449, 0.95: 1.96, 0.99: 2.5758}.get(round(level, 2), 1.96)


def as_trials(trials: Iterable[TrialSummary | Mapping[str, Any]]) -> list[TrialSummary]:
    """The trials typed: a :class:`batchfit.study.TrialSummary` as it is; a trial dict (results.json's form, a
    caller's own) read once with :meth:`TrialSummary.from_dict`, which names a malformed one."""
    return [t if isinstance(t, TrialSummary) else TrialSummary.from_dict(t, f"trial {i}") for i, t in enumerate(trials)]


@dataclass
class LRCheck:
    """The LR check: short runs at ``base_lr x multiplier`` at the base batch (``lr.json``, ``"lr_calibration"``).

    ``tune`` runs it (:mod:`batchfit.tuning`, which re-exports it); it lives here, beside :class:`PrecisionCheck`,
    because the decision and the recommendation read it too (a layer below ``tuning``)."""

    batch_size: int
    steps: int
    metric: str
    base_lr: float
    runs: list[dict[str, Any]]
    best_multiplier: float = 1.0
    lr: float = 0.0
    kept_base: bool = True
    intervals: dict[str, Any] = field(default_factory=dict)  # multiplier -> its score's interval (Interval dict)
    decision: str = ""  # what was decided and whether it was beyond the noise
    # the capped check's race: [{"steps", "multipliers"}] per rung; its last rung's share of the train budget; the
    # LR best at that horizon and the factor that carries it to the train budget (LR_HORIZON_EXPONENT)
    rungs: list[dict[str, Any]] = field(default_factory=list)
    horizon_fraction: float | None = None
    horizon_factor: float = 1.0
    lr_at_check_horizon: float | None = None
    lr_interval: list[float] | None = None  # [low, high]: the LRs tied with the best, at the chosen LR's horizon
    # the sides ("below", "above") where the tied LRs reach the edge of those tried: the response was not bracketed
    # there, and the interval reaches one x2 step further
    lr_interval_open: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["runs"] = [dict(r) for r in self.runs]
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LRCheck:
        known, extra = split_fields(cls, data, rest="extra")
        return cls(**known, extra=extra)

    @property
    def open_ends(self) -> list[str]:
        """The ends of the LRs tried that the interval reaches past, in words: ``["bottom", "top"]``."""
        return [{"below": "bottom", "above": "top"}.get(side, side) for side in self.lr_interval_open]

    @property
    def moved(self) -> bool:
        """Whether the check moved the base LR (its best multiplier is not 1)."""
        return self.best_multiplier not in (None, 1, 1.0)

    @classmethod
    def of(cls, check: Any) -> LRCheck | None:
        """``check`` (an ``LRCheck``, its ``"lr_calibration"`` dict or ``None``) as an ``LRCheck``: a dict read with
        :meth:`from_dict`; a partial one (a caller's own, an older file) reads a missing ``batch_size``, ``steps``,
        ``metric`` or ``base_lr`` as ``None`` and missing ``runs`` as ``[]``."""
        if check is None or isinstance(check, LRCheck):
            return check
        if not isinstance(check, Mapping):
            check = {f.name: getattr(check, f.name) for f in fields(cls) if hasattr(check, f.name)}
        return cls.from_dict({"batch_size": None, "steps": None, "metric": None, "base_lr": None, "runs": [],
                              **check})


def _history(trial: TrialSummary | Mapping[str, Any]) -> Any:
    """A trial's evaluation records: a summary's attribute, a dict's ``history`` (tune's LR-check runs, which are not
    sweep trials)."""
    return trial.history if isinstance(trial, TrialSummary) else trial.get("history")


def quality_of_trial(trial: TrialSummary | Mapping[str, Any], metric: Metric, smooth: int = SMOOTH) -> float | None:
    """A trial's quality: the mean of its last ``smooth`` evaluations of ``metric``
    (:func:`batchfit.metric.final_quality`; a summary without history: its recorded best). ``trial``: a
    :class:`batchfit.study.TrialSummary`, or a dict with its ``history`` (tune's LR-check runs)."""
    q = final_quality(_history(trial), metric, smooth)
    return q if q is not None else metric.of_trial(trial)


def _is_proportion(metric: Metric, values: Sequence[float]) -> bool:
    """An accuracy-like metric: higher is better, not a loss, every value in ``[0, 1]``."""
    return metric.higher_is_better and not metric.is_loss and all(0.0 <= v <= 1.0 for v in values)


def sampling_interval(trial: Mapping[str, Any], value: float, metric: Metric, level: float) -> Interval:
    """One seed: the validation set's sampling interval, when the record or the metric allows one (the LR check's
    single-seed score; the batch decision uses seed noise, :func:`decide`)."""
    last = (trial.get("history") or [{}])[-1]
    given = last.get("val_interval") if isinstance(last, Mapping) else None
    if isinstance(given, Mapping) and given.get("low") is not None:
        half = (float(given["high"]) - float(given["low"])) / 2
        return Interval(value, value - half, value + half, level, "validation-bootstrap", 1)
    n = trial.get("val_samples")
    if isinstance(n, int) and n > 0 and _is_proportion(metric, [value]):
        half = _z(level) * math.sqrt(max(value * (1 - value), 1.0 / n) / n)  # a proportion over n samples
        return Interval(value, value - half, value + half, level, "binomial", 1)
    return Interval(value, None, None, level, "single-seed", 1)


@dataclass(frozen=True)
class StepTimeFit:
    """``seconds per step = a + b * B`` over all trials, with a bootstrap interval for predictions."""

    a: float
    b: float
    boot: tuple[tuple[float, float], ...]  # (a, b) bootstrap replicates
    n: int
    level: float = DEFAULT_LEVEL

    def predict(self, batch_size: float) -> Interval:
        est = self.a + self.b * batch_size
        if len(self.boot) < 20:
            return Interval(est, None, None, self.level, "pooled-fit", self.n)
        preds = np.array([a + b * batch_size for a, b in self.boot])
        lo, hi = np.quantile(preds, [(1 - self.level) / 2, (1 + self.level) / 2])
        return Interval(est, float(lo), float(hi), self.level, "pooled-fit", self.n)

    def to_dict(self) -> dict[str, Any]:
        return {"seconds_fixed": self.a, "seconds_per_sample": self.b, "n": self.n}


def fit_step_time(points: Iterable[Sequence[float]], *, level: float = DEFAULT_LEVEL, n_boot: int = 500,
                  seed: int = 0) -> StepTimeFit | None:
    """Least-squares ``t = a + b B`` on relative error over ``(B, seconds_per_step)`` pairs; None with < 2 batches."""
    pts = [(float(b), float(t)) for b, t in points if t is not None and math.isfinite(t) and t > 0 and b >= 1]
    if len({b for b, _ in pts}) < 2:
        return None
    arr = np.asarray(pts)

    def fit(sample: np.ndarray) -> tuple[float, float] | None:
        if len(np.unique(sample[:, 0])) < 2:
            return None
        w = 1.0 / sample[:, 1]
        design = np.stack([np.ones(len(sample)), sample[:, 0]], axis=1) * w[:, None]
        (a, b), *_ = np.linalg.lstsq(design, sample[:, 1] * w, rcond=None)
        return float(max(a, 0.0)), float(max(b, 0.0))

    full = fit(arr)
    assert full is not None
    rng = np.random.default_rng(seed)
    boot = tuple(f for _ in range(n_boot) if (f := fit(arr[rng.integers(0, len(arr), len(arr))])) is not None)
    return StepTimeFit(full[0], full[1], boot, len(arr), level)


def _seconds_per_step(trial: TrialSummary) -> float | None:
    """The trial's seconds per step: the median over its evaluation intervals' throughputs when it has at least 3
    (a burst of load on the machine slows one interval, not the median), else its mean throughput."""
    segments = [v for r in trial.history or [] if isinstance(r, Mapping)
                and (v := finite_or_none(r.get("samples_per_s"))) is not None and v > 0]
    if len(segments) >= 3:
        return float(trial.batch_size) / float(np.median(segments))
    sps = finite_or_none(trial.samples_per_s)
    if sps and sps > 0:
        return float(trial.batch_size) / sps
    return None


@dataclass
class BatchEvidence:
    """What the data say about one batch size (its best learning rate, pooled over seeds).

    ``quality`` is the seed mean with the pooled-variance t interval (for display); ``difference`` is the batch
    size's paired difference from the reference on shared seeds (positive = better) with the decision's
    simultaneous bounds, and ``verdict`` what the decision concluded from it (:class:`batchfit.stats.Comparison`).
    """

    batch_size: int
    lr_multiplier: float
    lr: float | None
    quality: Interval
    steps_to_target: Interval | None
    seconds_per_step: Interval | None
    time_to_target: Interval | None
    seeds: int
    trials: list[TrialSummary] = field(default_factory=list, repr=False)
    seeds_reached: int | None = None  # seeds that reached the target (a time to target needs all of them)
    difference: Interval | None = None
    verdict: str | None = None

    def to_dict(self) -> dict[str, Any]:
        def iv(x: Interval | None) -> dict[str, Any] | None:
            return None if x is None else x.to_dict()

        return {"batch_size": self.batch_size, "lr_multiplier": self.lr_multiplier, "lr": self.lr,
                "quality": iv(self.quality), "steps_to_target": iv(self.steps_to_target),
                "seconds_per_step": iv(self.seconds_per_step), "time_to_target": iv(self.time_to_target),
                "seeds": self.seeds, "seeds_reached": self.seeds_reached, "difference": iv(self.difference),
                "verdict": self.verdict}


@dataclass
class Decision:
    """The chosen batch size, what it was chosen among, and the flags a reader must see.

    ``selection`` is the non-inferiority verdict of every batch size against the reference; ``critical`` the S(B)
    fit at the decision's target (the one B_crit the recommendation and the report print)."""

    batch_size: int
    choice: Choice
    evidence: dict[int, BatchEvidence]
    flags: list[str]
    metric: Metric
    target: float | None = None  # the quality time to target was measured to (:func:`decision_target`)
    selection: Selection | None = None
    critical: CriticalBatchInterval | None = None
    tolerance: float = 0.0  # relative

    @property
    def reference(self) -> int:
        return int(self.choice.best_quality)

    def faster_undecided(self) -> list[int]:
        """Batch sizes the data could not yet place, whose time to target is below the chosen one's: more seeds for
        them could change the choice (racing's candidates)."""
        if self.selection is None:
            return []
        chosen = self.evidence[self.batch_size].time_to_target
        limit = chosen.estimate if chosen is not None else math.inf
        out = []
        for b in self.selection.undecided:
            t = self.evidence[b].time_to_target
            if t is not None and math.isfinite(t.estimate) and t.estimate < limit:
                out.append(int(b))
        return sorted(out)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "choice": self.choice.to_dict(), "flags": list(self.flags),
                "metric": self.metric.to_dict(), "target": self.target, "tolerance": self.tolerance,
                "selection": None if self.selection is None else self.selection.to_dict(),
                "critical_batch": None if self.critical is None else self.critical.to_dict(),
                "evidence": [self.evidence[b].to_dict() for b in sorted(self.evidence)]}


def _seed_values(ts: Sequence[TrialSummary], metric: Metric) -> dict[Any, float]:
    """``{seed: quality}`` of one configuration's trials (a seed trained twice: the mean of its runs)."""
    acc: dict[Any, list[float]] = {}
    for t in ts:
        q = quality_of_trial(t, metric)
        if q is not None:
            acc.setdefault(t.seed, []).append(q)
    return {s: float(np.mean(v)) for s, v in acc.items()}


def _evidence(trials: Sequence[TrialSummary], metric: Metric, step_fit: StepTimeFit | None,
              level: float, step_time: Mapping[int, Interval] | None = None
              ) -> tuple[dict[int, BatchEvidence], dict[tuple[int, float], dict[Any, float]]]:
    """Per batch size its best LR's evidence, and every configuration's ``{seed: quality}``."""
    by_config: dict[tuple[int, float], list[TrialSummary]] = {}
    for t in trials:
        if t.status == "ok":
            by_config.setdefault((int(t.batch_size), float(t.lr_multiplier or 1.0)), []).append(t)
    seeds = {k: _seed_values(ts, metric) for k, ts in by_config.items()}
    pooled = pooled_mean_intervals({k: list(v.values()) for k, v in seeds.items()}, level)
    out: dict[int, BatchEvidence] = {}
    for (batch, mult), ts in sorted(by_config.items()):
        vals = list(seeds[(batch, mult)].values())
        if not vals:
            continue
        q = pooled.get((batch, mult))
        if q is None:
            q = mean_interval(vals, level) if len(vals) >= 2 else Interval(vals[0], None, None, level,
                                                                           "single-seed", 1)
        cur = out.get(batch)
        if cur is not None and not metric.better(q.estimate, cur.quality.estimate):
            continue
        out[batch] = BatchEvidence(batch, mult, finite_or_none(ts[0].lr), q, None, None, None, len(vals),
                                   list(ts))
        _set_times(out[batch], step_fit, level, step_time)
    return out, seeds


def _set_times(e: BatchEvidence, step_fit: StepTimeFit | None, level: float,
               step_time: Mapping[int, Interval] | None = None) -> None:
    """A batch's steps, seconds per step and time to the target, from its trials' ``steps_to_target``."""
    ts = e.trials
    steps = [float(s) for t in ts if (s := finite_or_none(t.steps_to_target)) is not None]
    # reaching the target is part of the result: a configuration that missed it in any seed has no time to it
    # (Shallue et al. 2019 count a run that misses the goal as never reaching it), so a batch size that reaches it
    # in 2 of 3 seeds does not win on the two lucky ones
    steps_iv = mean_interval(steps, level) if steps and len(steps) == len(ts) else None
    sec = (step_time or {}).get(e.batch_size)  # the interleaved calibration, where it timed this batch size
    if sec is None and step_fit is not None:
        sec = step_fit.predict(e.batch_size)
    if sec is None:
        own = [s for t in ts if (s := _seconds_per_step(t)) is not None]
        sec = mean_interval(own, level) if own else None
    ttt = _product(steps_iv, sec) if steps_iv is not None and sec is not None else None
    if ttt is None and steps_iv is not None:  # no throughput: the measured wall-clock seconds to the target
        walls = [float(w) for t in ts if (w := finite_or_none(t.seconds_to_target)) is not None]
        ttt = mean_interval(walls, level) if len(walls) == len(ts) else None
    e.steps_to_target, e.seconds_per_step, e.time_to_target, e.seeds_reached = steps_iv, sec, ttt, len(steps)


def steps_to(trial: TrialSummary | Mapping[str, Any], metric: Metric, value: float) -> float | None:
    """Where the trial's raw evaluation curve first reaches ``value``, interpolated between evaluations
    (:func:`batchfit.metric.crossing`; ``None``: it never does)."""
    return crossing(_history(trial), metric, value, "step")


def decision_target(target: Mapping[str, Any] | None, best_quality: float, metric: Metric) -> float | None:
    """The quality the decision times every batch size to: the target's fraction of the best configuration's
    seed-mean final quality (:func:`batchfit.metric.best_config_mean`, the sweep's own target too), not of the
    best single evaluation of any trial; an absolute target as given. ``None``: no target spec (the trials'
    recorded steps are used)."""
    if not isinstance(target, Mapping):
        return None
    if target.get("kind") == "absolute" and target.get("value") is not None:
        return float(target["value"])
    frac = target.get("fraction")
    if target.get("kind") != "fraction" or not isinstance(frac, (int, float)) or frac <= 0:
        return None
    return best_quality * frac if metric.higher_is_better else best_quality / frac


def _product(a: Interval, b: Interval) -> Interval:
    """``a * b`` for positive quantities; relative half-widths add in quadrature (delta method on the log scale)."""
    est = a.estimate * b.estimate
    if not (a.known and b.known) or a.estimate <= 0 or b.estimate <= 0:
        return Interval(est, None, None, a.level, "product", min(a.n, b.n))
    ra = (a.high - a.low) / (2 * a.estimate)  # type: ignore[operator]
    rb = (b.high - b.low) / (2 * b.estimate)  # type: ignore[operator]
    r = math.hypot(ra, rb)
    return Interval(est, est * max(0.0, 1 - r), est * (1 + r), a.level, "product", min(a.n, b.n))


def critical_from_trials(trials: Sequence[TrialSummary | Mapping[str, Any]], *, level: float = DEFAULT_LEVEL,
                         seed: int = 0) -> CriticalBatchInterval | None:
    """The pooled S(B) fit with its bootstrap (:func:`batchfit.stats.critical_batch_interval`) over every trial.

    One point per (batch size, seed): the fewest steps to the target over that batch size's learning rates
    (:func:`batchfit.critical.seed_points`; Shallue et al. 2019 retune the LR per batch size). The sweep's B_crit is
    the same estimator on the same steps, so the printed B_crit is the one the decision uses.
    """
    points = seed_points(t for t in trials if isinstance(t, (TrialSummary, Mapping)))
    if not points:
        return None
    return critical_batch_interval(points, level=level, seed=seed)


def _pooled_costs(ev: dict[int, BatchEvidence], crit: CriticalBatchInterval | None) -> None:
    """Each batch's time to target = the pooled S(B) fit's steps (with its bootstrap interval) x seconds per step.

    Steps to target come from the critical-batch fit over every batch size and seed, so candidates are ranked on
    one smooth fitted curve and its uncertainty instead of per-batch readings with a t interval over two seeds
    (which spans zero). A batch size that reached the target in none of its runs stays "not reached": the fit is
    not trusted to say it would have. With a poor fit (r2 < 0.5) the per-batch readings are kept.
    """
    if crit is None or (crit.r2 is not None and crit.r2 < 0.5):
        return
    for b, e in ev.items():
        if e.steps_to_target is None or e.seconds_per_step is None:
            continue
        e.steps_to_target = crit.steps(b)
        e.time_to_target = _product(e.steps_to_target, e.seconds_per_step)


def _fastest(choice: Choice, cost: Mapping[int, Interval], sel: Selection) -> Choice:
    """Among the batch sizes non-inferior to the reference, the one with the least time-to-target estimate is
    chosen; those whose time interval overlaps its are reported as tied with it on time (the win over them is not
    beyond the noise).

    Both factors of the estimate are pooled, so its ordering is what the whole data say rather than one noisy
    reading: steps from the S(B) fit over every batch size and seed, seconds per step from interleaved rounds that a
    busy machine widens but does not shift (:mod:`batchfit.steptime`).
    """
    reached = [b for b in choice.tied if math.isfinite(cost[b].estimate)]
    if not reached:
        return choice
    fastest = min(reached, key=lambda b: (cost[b].estimate, b))
    time_tied = sorted(b for b in reached if cost[b].overlaps(cost[fastest]))
    # a time difference inside its noise decides nothing: among the batch sizes that cannot be told apart from the
    # fastest estimate, the largest is chosen (the fewest steps for the same time; the critical batch only grows as
    # training goes on), a stated rule rather than a noisy reading (on digits the least estimate moved between 128
    # and 512 from seed to seed)
    chosen = max(time_tied)
    others = [b for b in choice.tied if b != chosen]
    separated = bool(others) and all(cost[chosen].known and cost[b].known and cost[chosen].high < cost[b].low
                                     for b in others)  # type: ignore[operator]
    if len(choice.tied) > 1:
        reason = (f"batch sizes {', '.join(map(str, choice.tied))} are non-inferior to batch {sel.reference} (the "
                  f"best estimate); batch {fastest} has the least time to the target"
                  + (f", and {', '.join(str(b) for b in time_tied if b != fastest)} are equal to it on time within "
                     f"the noise, so the largest of them, {chosen}, is chosen" if len(time_tied) > 1 else ""))
    else:
        reason = choice.reason
    return Choice(chosen, choice.best_quality, choice.tied, separated, reason,
                  {"fastest": fastest, "time_tied": time_tied})


def _selection_reason(sel: Selection, metric: Metric) -> str:
    ref, n_inf, n_und = sel.reference, len(sel.inferior), len(sel.undecided)
    ni = [b for b in sel.non_inferior if b != ref]
    parts = [f"batch {ref} has the best {metric.name} estimate"]
    if ni:
        parts.append(f"{', '.join(map(str, ni))} shown non-inferior to it (within {sel.tolerance:.3g})")
    if n_inf:
        parts.append(f"{n_inf} worse beyond the tolerance")
    if n_und:
        parts.append(f"{n_und} undecided (the data cannot place them yet)")
    return "; ".join(parts)


def decide(trials: Sequence[TrialSummary | Mapping[str, Any]], metric: Metric, *,
           b_crit: CriticalBatchInterval | None = None, lr_calibration: Any = None, level: float = DEFAULT_LEVEL,
           margin: float = 0.0, step_time: Mapping[int, Interval] | None = None,
           target: Mapping[str, Any] | None = None, tolerance: float | None = None) -> Decision | None:
    """Choose the effective batch from every trial (all LRs and seeds); ``None`` when no trial finished.

    **The rule** (non-inferiority on paired seeds, :func:`batchfit.stats.select_non_inferior`): each batch size's
    quality is the seed mean of its best LR's trials (a trial's quality: the mean of its last evaluations); the
    batch size with the best fitted quality is the reference; every other batch size is compared with it on the
    seeds they share, with simultaneous one-sided bounds (max-t over all comparisons, the level split over the
    racing rounds). The fastest batch size whose bound shows it within ``tolerance`` (relative to the reference's
    quality; ``margin`` is the old half-tolerance spelling) of the reference is chosen; without that evidence the
    reference itself is. Less data therefore never picks a larger batch.

    ``b_crit`` is ignored when a ``target`` spec is given (the decision fits S(B) at its own target, and
    :attr:`Decision.critical` is that fit); ``lr_calibration`` the tune LR check (:class:`LRCheck`
    or its dict) for the few-steps flag; ``trials``: :class:`batchfit.study.TrialSummary` (a dict is
    read once with :meth:`TrialSummary.from_dict`);
    ``step_time`` (batch size -> seconds per step, :func:`batchfit.steptime.calibrate_step_time`) replaces the
    pooled fit of the trials' own timings; ``target`` (the sweep's ``target`` dict: ``kind``, ``fraction`` /
    ``value``) times every batch size to :func:`decision_target` on each trial's raw curve.
    """
    tol = float(tolerance) if tolerance is not None else 2.0 * float(margin)
    trials = as_trials(trials)
    step_fit = fit_step_time((t.batch_size, _seconds_per_step(t)) for t in trials if t.status == "ok")
    ev, seeds = _evidence(trials, metric, step_fit, level, step_time)
    if not ev:
        return None
    if _is_proportion(metric, [e.quality.estimate for e in ev.values()]):
        for e in ev.values():  # an accuracy's interval stays inside [0, 1]
            e.quality = e.quality.clipped(0.0, 1.0)
    sizes = sorted(ev)
    best_mean = best_config_mean(trials, metric)
    goal = decision_target(target, best_mean, metric) if target is not None and best_mean is not None else None
    if goal is not None:  # every trial timed to the decision's own target, on its raw curve
        retimed = {id(t): replace(t, steps_to_target=steps_to(t, metric, goal)) if t.history else t
                   for t in trials}
        trials = [retimed[id(t)] for t in trials]
        for e in ev.values():  # the evidence holds the same trial objects
            e.trials = [retimed[id(t)] for t in e.trials]
            _set_times(e, step_fit, level, step_time)
        crit = critical_from_trials(trials, level=level)
    else:
        crit = b_crit if b_crit is not None else critical_from_trials(trials, level=level)
    _pooled_costs(ev, crit)
    cands = {b: seeds[(b, ev[b].lr_multiplier)] for b in sizes}  # smaller batch first: the final tie-break
    others = {k: v for k, v in seeds.items() if k[0] in ev and k[1] != ev[k[0]].lr_multiplier}
    ref_q = metric.best([ev[b].quality.estimate for b in sizes])
    counts = {len(v) for v in cands.values()}
    # unequal seed counts mean racing chose where to add seeds after looking at the data, once per added seed: the
    # level is split over those looks (Bonferroni); a balanced design is analysed once
    looks = 1 if len(counts) == 1 else max(1, max(counts) - 1)
    sel = select_non_inferior(cands, tolerance=tol * abs(ref_q), higher_is_better=metric.higher_is_better,
                              level=level, looks=looks, others=others,
                              positions={b: math.log2(b) for b in sizes})  # one curve over every batch size
    for b in sizes:
        comp = sel.comparisons[b]
        ev[b].difference, ev[b].verdict = comp.difference, comp.verdict
    cost = {b: ev[b].time_to_target for b in sizes if ev[b].time_to_target is not None}
    # a batch size that never reached the target within its budget is the slowest to it; with no time to target
    # anywhere, the reference (the best quality) is the choice
    use_cost = {b: cost.get(b) or Interval(math.inf, None, None, level, "not reached", 0) for b in sizes} \
        if cost else None
    choice = Choice(sel.reference, sel.reference, sel.non_inferior, False, _selection_reason(sel, metric))
    if use_cost is not None:
        choice = _fastest(choice, use_cost, sel)
    decision = Decision(int(choice.chosen), choice, ev, [], metric, goal, sel, crit, tol)
    decision.flags = _flags(decision, trials, LRCheck.of(lr_calibration))
    return decision


def _flags(decision: Decision, trials: Sequence[TrialSummary], lr_check: LRCheck | None) -> list[str]:
    flags: list[str] = []
    chosen, crit, sel = decision.batch_size, decision.critical, decision.selection
    tried = sorted({int(t.batch_size) for t in trials})
    if len(tried) > 1 and chosen in (tried[0], tried[-1]):
        side = "smallest" if chosen == tried[0] else "largest"
        flags.append(f"edge of range: batch {chosen} is the {side} batch size tried; the best may lie beyond")
    open_ = decision.faster_undecided()
    if open_ and sel is not None:
        seeds = max(decision.evidence[b].seeds for b in open_)
        many = len(open_) > 1
        flags.append(f"undecided: batch size{'s' if many else ''} {', '.join(map(str, open_))} "
                     f"{'are' if many else 'is'} faster than batch {chosen} but "
                     f"could be shown neither non-inferior nor worse than batch {sel.reference} at {seeds} seed(s) "
                     f"(tolerance {decision.tolerance:.2%}); more seeds could change the choice")
    if crit is not None and crit.extrapolated:
        flags.append(f"B_crit {crit.b_crit.estimate:.3g} is extrapolated beyond the largest batch that reached the "
                     f"target ({crit.support[1]}); read it as 'above {crit.support[1]}'")
    if lr_check is not None and lr_check.moved:
        steps = lr_check.steps
        if isinstance(steps, int) and steps < FEW_STEPS:
            flags.append(f"the base LR was moved x{lr_check.best_multiplier:.3g} on runs of only {steps} "
                         "steps; confirm it on a longer run")
    return flags


@dataclass(frozen=True)
class PrecisionAdvice:
    """The precision to use and why; ``speedup`` is lower-precision speed / fp32 speed with its interval."""

    precision: str
    reason: str
    speedup: Interval | None
    memory_binds: bool

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "reason": self.reason, "memory_binds": self.memory_binds,
                "speedup": None if self.speedup is None else self.speedup.to_dict()}


_RUN_MEASURES = ("step_seconds", "samples_per_s", "peak_memory_bytes", "train_loss", "val_loss", "seconds")


@dataclass(frozen=True)
class PrecisionRun:
    """One precision's side of the precision check (``"fp32"`` / ``"bf16"`` in its JSON).

    ``status`` ``"ok"``: ``step_seconds`` has every round's seconds per step, ``samples_per_s`` is at their median,
    ``train_loss`` the rounds' median, ``val_loss`` the last round's, ``seconds`` their sum. Otherwise the first round
    that did not finish: ``"failed"`` with its ``error``, or ``"diverged"`` with that round's readings (its
    ``step_seconds`` one number). A check from an older batchfit may have only ``samples_per_s``.
    """

    status: str
    step_seconds: tuple[float, ...] | float | None = None
    samples_per_s: float | None = None
    peak_memory_bytes: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    seconds: float | None = None
    error: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys another batchfit wrote, kept on a round trip

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def timings(self) -> list[float]:
        """The finite seconds per step of the rounds (none for a run that did not finish)."""
        times = self.step_seconds if isinstance(self.step_seconds, (tuple, list)) else ()
        return [float(x) for x in times if finite_or_none(x)]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.error is not None:
            out["error"] = self.error
        else:
            out.update({name: getattr(self, name) for name in _RUN_MEASURES})
            if isinstance(self.step_seconds, (tuple, list)):
                out["step_seconds"] = list(self.step_seconds)
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrecisionRun:
        names = {"status", "error", *_RUN_MEASURES}
        known = {k: v for k, v in data.items() if k in names}
        if isinstance(known.get("step_seconds"), list):
            known["step_seconds"] = tuple(known["step_seconds"])
        known["status"] = str(known.get("status") or "")
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})


_CHECK_PLAN = ("note", "steps", "rounds", "steps_per_round", "batch_size", "micro_batch_size", "cost")


@dataclass(frozen=True)
class PrecisionCheck:
    """``tune``'s precision check (``precision.json``, results.json's ``"precision_check"``): the recommended
    configuration in fp32 and bf16 over ``rounds`` interleaved rounds of ``steps_per_round`` steps, or only a
    ``note`` saying why it was not run. ``cost``: what it trained (:meth:`batchfit.cost.Cost.to_dict`)."""

    note: str | None = None
    steps: int | None = None
    rounds: int | None = None
    steps_per_round: int | None = None
    batch_size: int | None = None
    micro_batch_size: int | None = None
    cost: Mapping[str, Any] | None = None
    fp32: PrecisionRun | None = None
    bf16: PrecisionRun | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys another batchfit wrote, kept on a round trip

    def run(self, precision: str) -> PrecisionRun | None:
        """The ``fp32`` or ``bf16`` side; ``None`` when the check did not run it."""
        return {"fp32": self.fp32, "bf16": self.bf16}.get(precision)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _CHECK_PLAN if getattr(self, name) is not None}
        if self.cost is not None:
            out["cost"] = dict(self.cost)
        for name in ("fp32", "bf16"):
            side = self.run(name)
            if side is not None:
                out[name] = side.to_dict()
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrecisionCheck:
        """The check from its JSON (an empty mapping: a check that ran nothing)."""
        known: dict[str, Any] = {k: data[k] for k in _CHECK_PLAN if data.get(k) is not None}
        for name in ("fp32", "bf16"):
            if isinstance(data.get(name), Mapping) and data[name]:
                known[name] = PrecisionRun.from_dict(data[name])
        skip = {*_CHECK_PLAN, "fp32", "bf16"}
        return cls(**known, extra={k: v for k, v in data.items() if k not in skip})


def advise_precision(fp32_step_seconds: Sequence[float], low_step_seconds: Sequence[float], *, low: str = "bf16",
                     fp32_max_micro_batch: int | None, effective_batch: int, knee: int | None = None,
                     memory_ratio: float | None = None, loss_ok: bool = True) -> PrecisionAdvice:
    """Lower precision for speed only beyond the timing noise; for memory only when memory binds.

    ``*_step_seconds`` are repeated, interleaved timings of the same step in each precision.
    """
    speed = ratio_interval(fp32_step_seconds, low_step_seconds) if fp32_step_seconds and low_step_seconds else None
    binds = fp32_max_micro_batch is not None and (
        fp32_max_micro_batch < effective_batch or (knee is not None and fp32_max_micro_batch < knee))
    if not loss_ok:
        return PrecisionAdvice("fp32", f"keep fp32: the {low} run's loss was worse", speed, binds)
    if speed is not None and speed.known and speed.low > 1.0:  # type: ignore[operator]
        return PrecisionAdvice(low, f"{low}: {speed.estimate:.2f}x the fp32 speed (interval {speed.low:.2f}-"
                               f"{speed.high:.2f}, beyond the timing noise)", speed, binds)
    if binds and memory_ratio is not None and memory_ratio < 0.9:
        assert fp32_max_micro_batch is not None
        limit = (f"effective batch {effective_batch}" if fp32_max_micro_batch < effective_batch
                 else f"throughput knee {knee}")
        return PrecisionAdvice(low, f"{low}: memory binds (fp32 fits micro-batch {fp32_max_micro_batch} < {limit}) "
                               f"and {low} needs x{memory_ratio:.2f} the memory", speed, binds)
    speed_txt = "no timing" if speed is None else (
        f"speed x{speed.estimate:.2f}" + (f" (interval {speed.low:.2f}-{speed.high:.2f})" if speed.known else ""))
    why = "memory does not bind" if not binds else f"{low} does not save memory here"
    return PrecisionAdvice("fp32", f"keep fp32: {low} {speed_txt} is not a speed-up beyond the noise, and {why}",
                           speed, binds)
