"""Decisions from pooled models with their uncertainty, so a re-run with another seed or on a busy machine agrees.

The recommendation used to take the argmax of noisy single-seed points: the best validation value of each batch size
(itself the maximum over many noisy evaluations), a 1 % tolerance around it, and time to target as samples divided by
one wall-clock throughput reading. Here every quantity the guides' trade-off is made of is an interval, fitted over
all trials and seeds where a model exists:

- **Quality** of a trial: the best value of its 3-evaluation moving average (a single lucky evaluation does not win);
  of a configuration (batch, LR): the mean over its seeds with a t interval; with one seed, the sampling interval of
  the validation set where the record carries one (``val_interval``, or a binomial interval for an accuracy-like
  metric on ``val_samples`` samples), else unknown — and an unknown interval ties with everything.
- **Time per step** against batch size: ``t(B) = a + b B`` fitted over every trial's measured step time (a pooled
  model: one slow trial on a busy machine moves the fit little), with a bootstrap interval.
- **Steps to target** per batch: the mean over seeds (t interval), and the critical-batch fit
  ``S(B) = S_min (1 + B_crit / B)`` (McCandlish et al. 2018; Shallue et al. 2019) with a stratified bootstrap
  (:func:`batchfit.stats.critical_batch_interval`).
- **Time to target** = steps to target x fitted time per step.
- **The decision** (:func:`batchfit.stats.choose`): batch sizes whose quality intervals overlap the best are tied; among
  them, those whose time-to-target interval overlaps the fastest one's are tied on time too, and the middle one (lower
  median batch size) is chosen — a busy machine widens timing intervals and reorders estimates inside them, and the
  middle of a tie moves least; the output says whether the win is beyond noise.
- **Flags**: a choice at the edge of the tried range, B_crit extrapolated beyond the largest batch tried, a quality
  tie, a base-LR move decided on few steps.
- **Precision**: a lower precision for speed only when its speed-up interval excludes 1; for memory only when memory
  binds (the fp32 micro-batch that fits is below the effective batch, or below the throughput knee).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchfit.metric import Metric, finite_or_none
from batchfit.stats import DEFAULT_LEVEL, Choice, Interval, choose, mean_interval, ratio_interval

__all__ = [
    "BatchEvidence",
    "Decision",
    "PrecisionAdvice",
    "StepTimeFit",
    "advise_precision",
    "decide",
    "fit_step_time",
    "quality_of_trial",
]

SMOOTH = 3  # evaluations in the moving average a trial's quality is read from
FEW_STEPS = 50  # a base-LR move decided on fewer optimizer steps than this is flagged


def _z(level: float) -> float:
    return {0.9: 1.6449, 0.95: 1.96, 0.99: 2.5758}.get(round(level, 2), 1.96)


def quality_of_trial(trial: Mapping[str, Any], metric: Metric, smooth: int = SMOOTH) -> float | None:
    """The best value of the trial's ``smooth``-evaluation moving average of ``metric`` (fewer evals: their mean)."""
    values = [v for r in trial.get("history") or [] if (v := metric.of_record(r)) is not None]
    if not values:
        return metric.of_trial(trial)
    k = min(smooth, len(values))
    means = np.convolve(np.asarray(values, float), np.ones(k) / k, mode="valid")
    return float(metric.best(list(means)))


def _sampling_interval(trial: Mapping[str, Any], value: float, metric: Metric, level: float) -> Interval:
    """One seed: the validation set's sampling interval, when the record or the metric allows one."""
    last = (trial.get("history") or [{}])[-1]
    given = last.get("val_interval") if isinstance(last, Mapping) else None
    if isinstance(given, Mapping) and given.get("low") is not None:
        half = (float(given["high"]) - float(given["low"])) / 2
        return Interval(value, value - half, value + half, level, "validation-bootstrap", 1)
    n = trial.get("val_samples")
    if isinstance(n, int) and n > 0 and not metric.is_loss and 0.0 <= value <= 1.0 and metric.higher_is_better:
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


def _seconds_per_step(trial: Mapping[str, Any]) -> float | None:
    """The trial's seconds per step: the median over its evaluation intervals' throughputs when it has at least 3
    (a burst of load on the machine slows one interval, not the median), else its mean throughput."""
    segments = [v for r in trial.get("history") or [] if isinstance(r, Mapping)
                and (v := finite_or_none(r.get("samples_per_s"))) is not None and v > 0]
    if len(segments) >= 3:
        return float(trial["batch_size"]) / float(np.median(segments))
    sps = finite_or_none(trial.get("samples_per_s"))
    if sps and sps > 0:
        return float(trial["batch_size"]) / sps
    return None


@dataclass
class BatchEvidence:
    """What the data say about one batch size (its best learning rate, pooled over seeds)."""

    batch_size: int
    lr_multiplier: float
    lr: float | None
    quality: Interval
    steps_to_target: Interval | None
    seconds_per_step: Interval | None
    time_to_target: Interval | None
    seeds: int
    trials: list[Mapping[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        def iv(x: Interval | None) -> dict[str, Any] | None:
            return None if x is None else x.to_dict()

        return {"batch_size": self.batch_size, "lr_multiplier": self.lr_multiplier, "lr": self.lr,
                "quality": iv(self.quality), "steps_to_target": iv(self.steps_to_target),
                "seconds_per_step": iv(self.seconds_per_step), "time_to_target": iv(self.time_to_target),
                "seeds": self.seeds}


@dataclass
class Decision:
    """The chosen batch size, what it was chosen among, and the flags a reader must see."""

    batch_size: int
    choice: Choice
    evidence: dict[int, BatchEvidence]
    flags: list[str]
    metric: Metric

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "choice": self.choice.to_dict(), "flags": list(self.flags),
                "metric": self.metric.to_dict(),
                "evidence": [self.evidence[b].to_dict() for b in sorted(self.evidence)]}


def _config_quality(trials: list[Mapping[str, Any]], metric: Metric, level: float) -> Interval | None:
    values = [q for t in trials if (q := quality_of_trial(t, metric)) is not None]
    if not values:
        return None
    if len(values) >= 2:
        return mean_interval(values, level)
    return _sampling_interval(trials[0], values[0], metric, level)


def _evidence(trials: Sequence[Mapping[str, Any]], metric: Metric, step_fit: StepTimeFit | None,
              level: float) -> dict[int, BatchEvidence]:
    by_config: dict[tuple[int, float], list[Mapping[str, Any]]] = {}
    for t in trials:
        if t.get("status") == "ok":
            by_config.setdefault((int(t["batch_size"]), float(t.get("lr_multiplier") or 1.0)), []).append(t)
    out: dict[int, BatchEvidence] = {}
    for (batch, mult), ts in sorted(by_config.items()):
        q = _config_quality(ts, metric, level)
        if q is None:
            continue
        cur = out.get(batch)
        if cur is not None and not metric.better(q.estimate, cur.quality.estimate):
            continue
        steps = [float(s) for t in ts if (s := finite_or_none(t.get("steps_to_target"))) is not None]
        steps_iv = mean_interval(steps, level) if steps else None
        sec = step_fit.predict(batch) if step_fit is not None else None
        if sec is None:
            own = [s for t in ts if (s := _seconds_per_step(t)) is not None]
            sec = mean_interval(own, level) if own else None
        ttt = _product(steps_iv, sec) if steps_iv is not None and sec is not None else None
        if ttt is None:  # no throughput recorded: the measured wall-clock seconds to the target, over seeds
            walls = [float(w) for t in ts if (w := finite_or_none(t.get("seconds_to_target"))) is not None]
            ttt = mean_interval(walls, level) if walls else None
        out[batch] = BatchEvidence(batch, mult, finite_or_none(ts[0].get("lr")), q, steps_iv, sec, ttt, len(ts),
                                   list(ts))
    return out


def _product(a: Interval, b: Interval) -> Interval:
    """``a * b`` for positive quantities; relative half-widths add in quadrature (delta method on the log scale)."""
    est = a.estimate * b.estimate
    if not (a.known and b.known) or a.estimate <= 0 or b.estimate <= 0:
        return Interval(est, None, None, a.level, "product", min(a.n, b.n))
    ra = (a.high - a.low) / (2 * a.estimate)  # type: ignore[operator]
    rb = (b.high - b.low) / (2 * b.estimate)  # type: ignore[operator]
    r = math.hypot(ra, rb)
    return Interval(est, est * max(0.0, 1 - r), est * (1 + r), a.level, "product", min(a.n, b.n))


def _smooth_costs(ev: dict[int, BatchEvidence], level: float) -> None:
    """Replace each batch's time-to-target estimate by the pooled model's ``S(B) t(B)``, keeping its interval width.

    Steps to target come from the critical-batch fit over every batch and seed (when one exists), so the ranking of
    candidates follows two smooth fitted curves instead of per-batch noisy readings; the interval keeps the measured
    spread so "beyond the noise" still means what was measured.
    """
    from batchfit.critical import fit_critical_batch, predict_steps

    points = [(b, e.steps_to_target.estimate) for b, e in ev.items() if e.steps_to_target is not None]
    fit, _ = fit_critical_batch(points)
    if fit is None or fit.get("r2", 0) < 0.5:
        return
    for b, e in ev.items():
        if e.time_to_target is None or e.seconds_per_step is None:
            continue
        est = predict_steps(fit, b) * e.seconds_per_step.estimate
        factor = est / e.time_to_target.estimate if e.time_to_target.estimate > 0 else 1.0
        e.time_to_target = Interval(est, None if e.time_to_target.low is None else e.time_to_target.low * factor,
                                    None if e.time_to_target.high is None else e.time_to_target.high * factor,
                                    level, "pooled-fit", e.time_to_target.n)


def _with_margin(iv: Interval, margin: float) -> Interval:
    """``iv`` widened to a half-width of at least ``margin x |estimate|`` (a practical-equivalence margin)."""
    half = margin * abs(iv.estimate)
    if half <= 0 or (iv.known and min(iv.estimate - iv.low, iv.high - iv.estimate) >= half):  # type: ignore[operator]
        return iv
    lo = iv.estimate - half if not iv.known else min(iv.low, iv.estimate - half)  # type: ignore[type-var]
    hi = iv.estimate + half if not iv.known else max(iv.high, iv.estimate + half)  # type: ignore[type-var]
    method = iv.method + ("+margin" if iv.known else "margin")
    return Interval(iv.estimate, lo, hi, iv.level, method, iv.n, iv.spread)


def _time_tie_break(choice: Choice, cost: Mapping[int, Interval]) -> Choice:
    """Among the batch sizes tied on quality, those whose time-to-target interval overlaps the fastest one's are tied
    on time as well; their middle one (the lower median batch size) is chosen.

    Timing is the one measurement a busy machine disturbs: it widens the intervals (pooled, robust fits) but can
    still reorder the estimates, so the fastest *estimate* inside a time tie moves with the load. The ends of a tie
    set move too (an extra seed or a busier machine widens or narrows it at either end); its middle moves least. A
    batch size that is faster beyond the noise is alone in its time tie and still wins.
    """
    reached = [b for b in choice.tied if math.isfinite(cost[b].estimate)]
    if not reached:
        return choice
    fastest = min(reached, key=lambda b: (cost[b].estimate, b))
    time_tied = sorted(b for b in reached if cost[b].overlaps(cost[fastest]))
    pick = time_tied[(len(time_tied) - 1) // 2]
    others = [b for b in choice.tied if b != pick]
    separated = bool(others) and all(cost[pick].known and cost[b].known and cost[pick].high < cost[b].low
                                     for b in others)  # type: ignore[operator]
    reason = (f"batch sizes {', '.join(map(str, choice.tied))} are tied on quality; batch {fastest} is the fastest "
              f"to the target and {', '.join(map(str, time_tied))} cannot be told apart from it on time; the middle "
              f"of those, {pick}, is chosen") if len(choice.tied) > 1 else choice.reason
    return Choice(pick, choice.best_quality, choice.tied, separated, reason,
                  {"fastest": fastest, "time_tied": time_tied})


def decide(trials: Sequence[Mapping[str, Any]], metric: Metric, *, b_crit: Any = None,
           lr_calibration: Mapping[str, Any] | None = None, level: float = DEFAULT_LEVEL,
           margin: float = 0.0) -> Decision | None:
    """Choose the effective batch from every trial (all LRs and seeds); ``None`` when no trial finished.

    ``b_crit`` is a :class:`batchfit.stats.CriticalBatchInterval` (or ``None``); ``lr_calibration`` the tune LR
    check's dict (``best_multiplier``, ``steps``) for the few-steps flag. ``margin`` (relative, e.g. 0.005) only
    widens ties: every quality interval gets a half-width of at least ``margin x |estimate|``, so differences
    smaller than that are ties even when measured precisely, and a quality with no measured noise (one seed, no
    validation size) is compared within that margin instead of tying with everything.
    """
    step_fit = fit_step_time((t["batch_size"], _seconds_per_step(t)) for t in trials if t.get("status") == "ok")
    ev = _evidence(trials, metric, step_fit, level)
    if not ev:
        return None
    if margin > 0:
        for e in ev.values():
            e.quality = _with_margin(e.quality, margin)
    _smooth_costs(ev, level)
    sizes = sorted(ev)
    quality = {b: ev[b].quality for b in sizes}  # smaller batch first: the final tie-break
    cost = {b: ev[b].time_to_target for b in sizes if ev[b].time_to_target is not None}
    # a batch size that never reached the target within its budget is the slowest to it (not a reason to stop
    # comparing times); with no time to target anywhere, quality alone decides
    use_cost = {b: cost.get(b) or Interval(math.inf, None, None, level, "not reached", 0) for b in sizes} \
        if cost else None
    choice = choose(quality, use_cost, higher_is_better=metric.higher_is_better, describe=lambda b: f"batch {b}")
    if use_cost is not None:
        choice = _time_tie_break(choice, use_cost)
    flags: list[str] = []
    tried = sorted({int(t["batch_size"]) for t in trials})
    if len(tried) > 1 and choice.chosen in (tried[0], tried[-1]):
        side = "smallest" if choice.chosen == tried[0] else "largest"
        flags.append(f"edge of range: batch {choice.chosen} is the {side} batch size tried; the best may lie beyond")
    if len(choice.tied) > 1:
        flags.append(f"quality tie: batch sizes {', '.join(map(str, choice.tied))} cannot be told apart on "
                     f"{metric.name} at this number of seeds")
    if b_crit is not None and getattr(b_crit, "extrapolated", False):
        flags.append(f"B_crit {b_crit.b_crit.estimate:.3g} is extrapolated beyond the largest batch that reached the "
                     f"target ({b_crit.support[1]}); read it as 'above {b_crit.support[1]}'")
    if lr_calibration and lr_calibration.get("best_multiplier") not in (None, 1, 1.0):
        steps = lr_calibration.get("steps")
        if isinstance(steps, int) and steps < FEW_STEPS:
            flags.append(f"the base LR was moved x{lr_calibration['best_multiplier']:g} on runs of only {steps} "
                         "steps; confirm it on a longer run")
    return Decision(int(choice.chosen), choice, ev, flags, metric)


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
