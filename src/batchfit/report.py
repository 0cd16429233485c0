"""The report of a batch-size study: the recommendation first, then the trade-off it rests on, measured.

:func:`write_report` writes, each as soon as it is ready (atomically: a temp file, then a rename):

- ``results.json``: the sweep's results dict plus ``"recommendation"`` (with its per-batch ``intervals``, each with
  the paired ``difference`` from the reference and its ``verdict``; ``non_inferior`` (= ``tied``),
  ``reference_batch_size``, ``selection``, ``holds_for``, ``flags``, ``decision_rule`` and ``recipe``) and B_crit's
  bootstrap ``interval``, ``support`` and ``extrapolated`` inside ``critical_batch_size`` (new keys; the old ones
  are kept);
- PNG plots (matplotlib, Agg canvas; loaded lazily): validation curves per batch size; the validation metric vs
  batch size (seed means with 95 % error bars, the reference and the non-inferior batch sizes shaded) beside each
  batch size's paired difference from the reference with the decision's bounds and the non-inferiority margin;
  throughput (pooled fit with error bars, every trial's reading) and peak memory vs batch size; steps and time to
  target vs batch size with error bars and the fitted ``S(B) = S_min (1 + B_crit / B)`` curve and B_crit's interval
  (McCandlish et al. 2018); B_simple over training and against the training loss (95 % error bars);
- ``report.md`` (plots linked as files) and ``report.html`` (self-contained: plots embedded as base64 PNG, no
  server and no network needed), in this order: the recommendation (headline, reasons, the budget and target it
  holds for, the flags); the trade-off table (:func:`tradeoff_table`: one row per batch size, at most 8 narrow
  columns, each number with its 95 % interval, and the verdict against the reference); what the data can and cannot
  tell apart (the decision rule, the verdicts) and the recipe's snippets; the study's facts; the plots; the details
  (:func:`summary_table`, every number per batch size with its interval, and every trial).

A report written while the study runs (after every finished trial), or without a recommendation, is **interim**
(:func:`is_interim`): it says how many trials finished and that there is no recommendation yet, and names no
chosen batch size anywhere.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from batchfit._io import atomic_write as _atomic_write
from batchfit._io import write_json
from batchfit._io import write_text as _write_text
from batchfit.decide import quality_of_trial
from batchfit.errors import BatchfitError, ConfigError
from batchfit.metric import Metric, finite_or_none
from batchfit.recommend import Measurements, Recommendation, recommend
from batchfit.stats import Interval, mean_interval, positive_mean_interval, quotient_interval
from batchfit.study.results import TrialSummary

__all__ = ["PLOTS", "TRADEOFF_CELL_CHARS", "TRADEOFF_COLUMNS", "check_results", "interim_line", "is_interim",
           "make_plots", "render_html", "render_markdown", "still_running", "summary_rows", "summary_table",
           "tell_apart_lines", "tradeoff_notes", "tradeoff_table", "trial_progress", "with_intervals", "write_report"]

PLOTS = ("val_curves", "metric_vs_batch", "throughput_memory", "steps_to_target", "b_simple")
_TITLES = {
    "val_curves": "Validation curves per batch size",
    "metric_vs_batch": "The validation metric vs batch size, and each one's paired difference from the reference",
    "throughput_memory": "Throughput and peak memory vs batch size",
    "steps_to_target": "Steps and time to target vs batch size, with the fitted S(B)",
    "b_simple": "Gradient noise scale B_simple over training and against the training loss",
    "critical_batch_over_training": "The local critical batch and B_simple over training (batchfit.schedule_check)",
}


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def _bytes(n: Any) -> str:
    from batchfit.memory import format_bytes

    return format_bytes(n) if isinstance(n, (int, float)) else "-"


def _num(x: Any, fmt: str = ".4g") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


# ---------------------------------------------------------------------------------------------------------------
# The summary table


def _measured(results: Any) -> Measurements:
    """``results`` read typed, once at each public entry point: :meth:`batchfit.recommend.Measurements.of` (a
    ``Measurements`` as it is, a ``SweepResult``, ``tune``'s result or their dict form, results.json). A dict without
    a ``trials`` list (a caller's own few keys) reads as a sweep without trials, its dict form left as it was."""
    if isinstance(results, Mapping) and not isinstance(results.get("trials"), list):
        measured = Measurements.of({**results, "trials": []})
        return replace(measured, source={k: v for k, v in measured.source.items() if k != "trials"})
    return Measurements.of(results)


def _rows_source(measured: Measurements) -> list[TrialSummary]:
    """One trial per batch size: the best-LR trial, or, for batch sizes with none finished, the latest trial."""
    best = {t.batch_size: t for t in measured.sweep.best_per_batch}
    for t in measured.trials:
        best.setdefault(t.batch_size, t)
    return [best[b] for b in sorted(best)]


def metric_label(metric: Metric) -> str:
    """``val accuracy``, ``val loss`` or ``train loss`` (a workload without validation data ranks on it)."""
    if metric.name == "train_loss":
        return "train loss"
    return "val loss" if metric.name == "val_loss" else f"val {metric.name}"


def _rec_given(measured: Measurements, recommendation: Any = None) -> Any:
    """The recommendation given, else the one stored with the results (results.json's ``"recommendation"``)."""
    return recommendation if recommendation is not None else measured.source.get("recommendation")


def _rec_dict(measured: Measurements, recommendation: Any = None) -> Mapping[str, Any]:
    """The recommendation's dict form (the given one, else the one in the results; ``{}`` without one)."""
    rec = _rec_given(measured, recommendation)
    if rec is None:
        return {}
    data = rec.to_dict() if hasattr(rec, "to_dict") else rec
    return data if isinstance(data, Mapping) else {}


def _rec_of(measured: Measurements, recommendation: Any = None) -> Recommendation | None:
    """The recommendation (the given one, else the one in the results read back with
    :meth:`Recommendation.from_dict`); ``None`` without one or when it is not a recommendation."""
    rec = _rec_given(measured, recommendation)
    if rec is None or isinstance(rec, Recommendation):
        return rec
    data = rec.to_dict() if hasattr(rec, "to_dict") else rec
    try:
        return Recommendation.from_dict(data) if isinstance(data, Mapping) else None
    except ConfigError:
        return None


def _evidence_of(rec: Recommendation | None) -> dict[int, Mapping[str, Any]]:
    """The decision's per-batch evidence (quality, steps / time to target, seconds per step, each an interval; the
    paired ``difference`` from the reference and its ``verdict``)."""
    return {int(e["batch_size"]): e for e in (rec.intervals if rec else []) if isinstance(e, Mapping)}


def _decision_of(rec: Recommendation | None) -> tuple[int | None, set[int]]:
    """The chosen batch size and the non-inferior ones (the reference among them; ``tied`` in older JSON)."""
    if rec is None:
        return None, set()
    return rec.batch_size, {int(b) for b in rec.non_inferior or rec.tied}


def _reference_of(rec: Recommendation | None) -> int | None:
    """The decision's reference: the batch size with the best fitted quality, every other one is compared with."""
    ref = rec.reference_batch_size if rec is not None else None
    return int(ref) if isinstance(ref, int) and not isinstance(ref, bool) else None


_RUNNING = ("running", "waiting")


def trial_progress(results: Any) -> tuple[int, int]:
    """``(finished, planned)``: trials that ended (ok, diverged, failed, interrupted) and every trial of the study,
    the queued ones (``counts["waiting"]``) included."""
    measured = _measured(results)
    counts = measured.sweep.counts
    waiting = counts.get("waiting") if isinstance(counts, Mapping) else 0
    waiting = waiting if isinstance(waiting, int) and not isinstance(waiting, bool) else 0
    done = sum(1 for t in measured.trials if t.status not in _RUNNING)
    return done, len(measured.trials) + waiting


def still_running(results: Any) -> bool:
    """True while the study is running: its ``status`` is ``running`` or ``empty``, or trials are queued or
    running (the report written after every finished trial)."""
    measured = _measured(results)
    if measured.source.get("status") in ("running", "empty"):  # as stored with the results (a caller's may have none)
        return True
    done, planned = trial_progress(measured)
    return done < planned


def is_interim(results: Any, recommendation: Any = None) -> bool:
    """True when the report must claim no win: the study is still running (:func:`still_running`) or there is no
    recommendation. Such a report shows the evidence so far, never a chosen or recommended batch size."""
    measured = _measured(results)
    return not _rec_dict(measured, recommendation) or still_running(measured)


def interim_line(results: Any) -> str:
    """``Interim report: 1 of 8 trials finished; no recommendation yet (...)``."""
    done, planned = trial_progress(results)
    return (f"Interim report: {done} of {planned} trials finished; no recommendation yet. The numbers below are the "
            "evidence so far, not a decision: the verdicts can change as trials and seeds are added.")


def _iv_text(iv: Mapping[str, Any] | None, fmt: str = ".4g") -> str:
    """``0.95 [0.94, 0.96]``, or the estimate alone with ``(no interval)`` when the interval is unknown (one seed, or
    a number the data give no interval for); an unbounded end reads ``inf``."""
    if not iv or iv.get("estimate") is None:
        return "-"
    est = _num(iv["estimate"], fmt)
    if iv.get("low") is None or iv.get("high") is None:
        return f"{est} (no interval)"

    def end(x: Any) -> str:
        return ("inf" if x > 0 else "-inf") if isinstance(x, (int, float)) and math.isinf(x) else _num(x, fmt)

    return f"{est} [{end(iv['low'])}, {end(iv['high'])}]"


def _bare(value: Any, method: str = "single trial") -> dict[str, Any] | None:
    """A number the data give no interval for, in the interval form (``low``/``high`` unknown, never zero-width)."""
    v = finite_or_none(value)
    return None if v is None else {"estimate": v, "low": None, "high": None, "method": method, "n": 1}


def _over_seeds(values: list[Any]) -> dict[str, Any] | None:
    """The Student-t interval of the mean over seeds (:func:`batchfit.stats.mean_interval`; one seed: unknown)."""
    vals = [v for x in values if (v := finite_or_none(x)) is not None]
    return mean_interval(vals).to_dict() if vals else None


def _gap(t: TrialSummary) -> float | None:
    """A trial's ``generalization_gap`` when it is ``val_loss - train_eval_loss`` (the validation loss minus the
    eval-mode loss on the fixed training subset; its evaluation records carry ``train_eval_loss``). A trial recorded
    before that (val loss minus the running training loss, which grows with the steps a small batch takes) has
    none; a summary without records is taken as it is."""
    hist = [h for h in t.history or [] if isinstance(h, Mapping)]
    if hist and not any("train_eval_loss" in h for h in hist):
        return None
    return finite_or_none(t.generalization_gap)


def _quality_by_seed(trials: list[TrialSummary], metric: Metric) -> dict[Any, float]:
    """Each seed's quality (the decision's, :func:`batchfit.decide.quality_of_trial`); repeated trials of one seed:
    their mean."""
    per: dict[Any, list[float]] = {}
    for x in trials:
        if (q := finite_or_none(quality_of_trial(x, metric))) is not None:
            per.setdefault(x.seed, []).append(q)
    return {seed: sum(v) / len(v) for seed, v in per.items()}


def _paired_difference(trials: list[TrialSummary], reference: list[TrialSummary],
                       metric: Metric) -> dict[str, Any] | None:
    """The configuration's quality minus the reference's, per seed (trials paired by seed, so what a seed does to
    both cancels), with a Student-t interval over the paired differences (one pair: unknown)."""
    mine, ref = _quality_by_seed(trials, metric), _quality_by_seed(reference, metric)
    diffs = [mine[seed] - ref[seed] for seed in mine if seed in ref]
    if not diffs:
        return None
    return dict(mean_interval(diffs).to_dict(), method="paired t over seeds")


def _oriented(iv: Mapping[str, Any] | None, metric: Metric) -> dict[str, Any] | None:
    """A difference in the metric, oriented so that positive is better (the decision's convention): a lower-is-
    better metric's difference changes sign and its ends swap."""
    if iv is None or metric.higher_is_better:
        return None if iv is None else dict(iv)

    def neg(x: Any) -> Any:
        return -x if isinstance(x, (int, float)) else x

    return {**iv, "estimate": neg(iv.get("estimate")), "low": neg(iv.get("high")), "high": neg(iv.get("low"))}


def _reference_row(measured: Measurements, source: list[TrialSummary], reference: int | None,
                   evidence: Mapping[int, Mapping[str, Any]], metric: Metric) -> TrialSummary | None:
    """The row the paired differences are taken from: the decision's reference (the best fitted quality; an older
    recommendation without one: its chosen batch), else the best seed-mean quality."""
    ref = next((t for t in source if t.batch_size == reference), None)
    if ref is not None or not source:
        return ref

    def mean_quality(t: TrialSummary) -> float | None:
        q = _quality_by_seed(_config_trials(measured, t, evidence.get(t.batch_size)), metric)
        return sum(q.values()) / len(q) if q else None

    return min(source, key=lambda t: metric.sort_key(mean_quality(t)))


def _per(scale: float, iv: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The interval of ``scale / x`` from x's, for a positive x: the ends swap (samples/s = B / seconds per step,
    B / B_simple). An end of x at or below zero leaves that end of the quotient unbounded (``inf``)."""
    est = finite_or_none((iv or {}).get("estimate"))
    if iv is None or est is None or est <= 0:
        return None
    lo, hi = finite_or_none(iv.get("low")), finite_or_none(iv.get("high"))
    known = lo is not None and hi is not None
    return {**iv, "estimate": scale / est, "spread": None,
            "low": (scale / hi if hi > 0 else 0.0) if known else None,  # type: ignore[operator]
            "high": (scale / lo if lo > 0 else math.inf) if known else None}  # type: ignore[operator]


def _positive_over_seeds(values: list[Any]) -> dict[str, Any] | None:
    """A positive quantity (B_simple) over seeds: the t interval on the log scale, exponentiated back
    (:func:`batchfit.stats.positive_mean_interval`: the geometric mean, both ends positive; one seed: unknown)."""
    vals = [v for x in values if (v := finite_or_none(x)) is not None and v > 0]
    return positive_mean_interval(vals).to_dict() if vals else None


def _positive_interval(iv: Mapping[str, Any] | None) -> Interval | None:
    """An interval dict of a positive quantity as an :class:`Interval`. Its JSON form writes an unbounded end as
    ``null``: with a known low end, a missing high end is ``inf`` (an unknown interval has both ends missing)."""
    est = finite_or_none((iv or {}).get("estimate"))
    if iv is None or est is None:
        return None
    low = finite_or_none(iv.get("low"))
    high = iv.get("high")
    high = (math.inf if high is None else float(high)) if low is not None else None
    return Interval(est, low, high, float(iv.get("level") or 0.95), str(iv.get("method") or ""),
                    int(iv.get("n") or 1), finite_or_none(iv.get("spread")))


def _noise_ratio(batch: int, iv: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """B / B_simple: ``B / [high, low]`` of B_simple's positive interval (:func:`batchfit.stats.quotient_interval`;
    never an ``inf`` from a division, an unknown interval stays unknown)."""
    pos = _positive_interval(iv)
    q = quotient_interval(float(batch), pos) if pos is not None else None
    return q.to_dict() if q is not None else None


def _noise_of(measured: Measurements, rec: Recommendation | None, pool: bool = True) -> dict[str, Any]:
    """B_simple against the training loss: the recommendation's ``noise_scale`` (with the value at its target's
    training loss), else (``pool``) pooled here from every trial's records
    (:func:`batchfit.noise.b_simple_against_loss`), without a value at a target."""
    noise = rec.noise_scale if rec is not None else None
    if isinstance(noise, Mapping):
        return dict(noise)
    if not pool:
        return {}
    trials = list(measured.trials)
    if not any(isinstance(h, Mapping) and ("noise_window" in h or "b_simple" in h)
               for t in trials for h in t.history or []):
        return {}
    from batchfit import noise as nz

    records = nz.noise_records(trials)
    return {"against_loss": [p.to_dict() for p in nz.b_simple_against_loss(records)], "records": len(records),
            "trials": len({r.trial for r in records}), "at_loss": None}


def _scaled(iv: Mapping[str, Any] | None, factor: float | None) -> dict[str, Any] | None:
    """The interval of ``factor * x`` (a positive factor): :meth:`batchfit.stats.Interval.scaled` on the dict form."""
    if iv is None or factor is None or finite_or_none(iv.get("estimate")) is None:
        return None
    return Interval.from_dict(iv).scaled(factor).to_dict()


def _samples_per_s(batch: int, evidence: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """samples/s = B / (the decision's seconds per step), its interval from that one's (the ends swap)."""
    return _per(batch, (evidence or {}).get("seconds_per_step"))


def _config_trials(measured: Measurements, t: TrialSummary,
                   evidence: Mapping[str, Any] | None) -> list[TrialSummary]:
    """The finished trials, one per seed, of the configuration the row's intervals describe: the decision's best LR
    for this batch size (the evidence's ``lr_multiplier``; grouped as :mod:`batchfit.decide` groups them), else the
    row's own trial's; the row's trial alone when none finished."""
    mult = float((evidence or {}).get("lr_multiplier") or t.lr_multiplier or 1.0)
    same = [x for x in measured.trials if x.status == "ok" and x.batch_size == t.batch_size
            and float(x.lr_multiplier or 1.0) == mult]
    return same or [t]


def _epochs_per_step(measured: Measurements, trials: list[TrialSummary], batch: int) -> float | None:
    """Epochs per optimizer step at this batch size, as the trials recorded them: the engine's evaluation records
    carry ``epoch`` (steps over steps per epoch, from which ``epochs_to_target`` is read) next to ``step``; the pair
    with the most steps rounds least. Without records, ``batch / num_train`` (the results' or a trial's)."""
    pairs = [(s, e) for x in trials for h in (x.history or []) if isinstance(h, Mapping)
             if (s := finite_or_none(h.get("step"))) and s > 0 and (e := finite_or_none(h.get("epoch"))) and e > 0]
    pairs = pairs or [(s, e) for x in trials if (s := finite_or_none(x.steps_to_target)) and s > 0
                      and (e := finite_or_none(x.epochs_to_target)) and e > 0]
    if pairs:
        s, e = max(pairs)
        return e / s
    n = finite_or_none(measured.sweep.num_train) or next(
        (n for x in trials if (n := finite_or_none(x.extra.get("num_train")))), None)
    return batch / n if n and n > 0 else None


def summary_rows(results: Any, recommendation: Any = None) -> list[dict[str, Any]]:
    """The guides' trade-off table, measured: one row per batch size (memory, speed, gradient noise,
    generalization gap, epochs to converge), with the raw values, and — from the recommendation's decision — each
    batch size's quality and time to target with their 95 % intervals, its seeds, and its verdict.

    The raw keys are the row's single trial (``samples_per_s``, ``b_simple``, ``noise_ratio``,
    ``generalization_gap``, ``epochs_to_target``, ``steps_to_target``, ``seconds_to_target``: its measured wall
    clock). Each of the first six also has an interval form (``<key>_interval``: ``estimate``, ``low``, ``high``, ...;
    ``low``/``high`` ``None`` when the data give none): samples/s from the decision's seconds per step; steps to
    target the decision's interval, epochs to target that one at the trials' recorded epochs per step; the
    generalization gap a t interval over the seeds of the decision's configuration; B_simple (each trial's median
    over its run, not at a stated loss) a t interval on the log scale over those seeds
    (:func:`batchfit.stats.positive_mean_interval`: both ends positive); B / B_simple divides B by B_simple at the
    decision's target training loss (the recommendation's ``noise_scale``, pooled over every trial against the
    training loss), or, without one, by the row's own B_simple, as ``B / [high, low]``
    (:func:`batchfit.stats.quotient_interval`: never an ``inf`` from a division). Without a decision, steps and
    epochs to target are t intervals over the row's configuration's seeds.

    ``generalization_gap`` is ``val_loss - train_eval_loss`` (the eval-mode loss on a fixed training subset, the
    engine's records); a trial recorded with the older definition (minus the running training loss) shows none.
    Whether a batch size generalizes worse is read from ``paired_difference_interval``: its quality minus the
    reference batch's (``paired_reference_batch_size``: the decision's reference, the best fitted quality; else the
    best seed mean), per seed (trials paired by seed), with a t interval over the paired differences; ``None`` for
    the reference itself.

    The decision (:func:`batchfit.stats.select_non_inferior`): ``verdict`` is ``reference``, ``non-inferior``,
    ``inferior`` or ``undecided`` (``""`` without a decision); ``difference_interval`` the paired difference from
    the reference the verdict was read from, oriented so that positive is better (the decision's simultaneous
    one-sided 95 % bounds; without a decision, ``paired_difference_interval`` oriented the same way; ``None`` for
    the reference); ``chosen`` whether it is the recommended batch size. ``decision`` is ``chosen`` for that one,
    else the verdict (before the non-inferiority rule: ``tied`` / ``apart``)."""
    measured = _measured(results)
    rec = _rec_of(measured, recommendation)
    metric = measured.metric
    global_bs = measured.sweep.b_simple
    at_target = (_noise_of(measured, rec, pool=False).get("at_loss") or {}).get("b_simple")
    evidence = _evidence_of(rec)
    chosen, _ = _decision_of(rec)
    source = _rows_source(measured)
    ref_t = _reference_row(measured, source, _reference_of(rec) or chosen, evidence, metric)
    ref_batch = ref_t.batch_size if ref_t is not None else None
    ref_seeds = _config_trials(measured, ref_t, evidence.get(ref_batch)) if ref_t is not None else []
    rows = []
    for t in source:
        b_simple, bs_source = t.b_simple, "single trial"
        if not isinstance(b_simple, (int, float)):
            b_simple = global_bs if isinstance(global_bs, (int, float)) else None
            bs_source = "median over the batch sizes"
        batch = t.batch_size
        ev = evidence.get(batch) or {}
        seeds = _config_trials(measured, t, ev)
        bs_iv = _positive_over_seeds([x.b_simple for x in seeds]) or _bare(b_simple, bs_source)
        steps_iv = (ev.get("steps_to_target") or _over_seeds([x.steps_to_target for x in seeds])
                    or _bare(t.steps_to_target))
        epochs_iv = (_scaled(ev.get("steps_to_target"), _epochs_per_step(measured, seeds, batch))
                     or _over_seeds([x.epochs_to_target for x in seeds]) or _bare(t.epochs_to_target))
        paired = None if batch == ref_batch else _paired_difference(seeds, ref_seeds, metric)
        verdict = str(ev.get("verdict") or "")
        if batch == ref_batch and evidence and not verdict:
            verdict = "reference"
        difference = ev.get("difference") if verdict != "reference" else None
        if difference is None and verdict != "reference":
            difference = _oriented(paired, metric)
        rows.append({
            "batch_size": batch,
            "micro_batch_size": t.micro_batch_size,
            "accumulation_steps": t.accumulation_steps,
            "lr": t.lr,
            "status": t.status,
            "best_metric": metric.of_trial(t),
            "peak_memory_bytes": t.peak_memory_bytes,
            "samples_per_s": t.samples_per_s,
            "b_simple": b_simple,
            "noise_ratio": batch / b_simple if b_simple and b_simple > 0 else None,
            "generalization_gap": _gap(t),
            "epochs_to_target": t.epochs_to_target,
            "steps_to_target": t.steps_to_target,
            "seconds_to_target": t.seconds_to_target,
            "quality": ev.get("quality"),
            "time_to_target": ev.get("time_to_target"),
            "seeds": ev.get("seeds"),
            "seed_count": len({x.seed for x in seeds}),
            "decision": "chosen" if batch == chosen else verdict,
            "verdict": verdict,
            "chosen": batch == chosen,
            "difference_interval": difference,
            "samples_per_s_interval": _samples_per_s(batch, ev) or _bare(t.samples_per_s),
            "b_simple_interval": bs_iv,
            # B over B_simple at the decision's target loss (the recommendation's), else over the row's own
            "noise_ratio_interval": _noise_ratio(batch, at_target or bs_iv),
            "generalization_gap_interval": _over_seeds([_gap(x) for x in seeds]) or _bare(_gap(t)),
            "paired_reference_batch_size": ref_batch,
            "paired_difference_interval": paired,
            "epochs_to_target_interval": epochs_iv,
            "steps_to_target_interval": steps_iv,
        })
    return rows


def summary_table(results: Any, recommendation: Any = None, *,
                  interim: bool = False) -> tuple[list[str], list[list[str]]]:
    """The details table, one row per batch size with every number and its interval (the report's first table
    before the trade-off table replaced it: :func:`tradeoff_table`): header and text cells. Columns fourteen to
    seventeen are the decision's: quality with its 95 % interval over seeds, seeds, time to target with its interval,
    and the decision (``chosen``, else the verdict: ``reference``, ``non-inferior``, ``inferior`` or ``undecided``).
    The eighteenth is the quality's difference from the decision's reference batch, paired by seed, with its 95 %
    t interval over the paired differences.

    samples/s, B_simple, B / B_simple, the gap ``val - train(eval) loss`` and epochs / steps to target show their
    95 % interval (see :func:`summary_rows`), or the value with ``(no interval)`` where the data give none (one
    seed). The thirteenth column is the row's one trial's measured wall clock to the target, not an estimate: the
    decision's time to target, with its interval, is the sixteenth. ``interim``: the decision column names no
    chosen batch size (the verdict instead)."""
    measured = _measured(results)
    label = metric_label(measured.metric)
    iv = " (95 % interval)"
    rows = summary_rows(measured, _rec_of(measured, recommendation))
    ref = rows[0]["paired_reference_batch_size"] if rows else None
    header = ["batch", "micro x accum", "LR", "status", f"best {label}", "peak memory",
              f"samples/s{iv}",
              f"B_simple{iv}", f"B / B_simple{iv}", f"val - train(eval) loss{iv}", f"epochs to target{iv}",
              f"steps to target{iv}",
              "s to target (one trial's wall clock)",
              f"{label}{iv}", "seeds", f"time to target, s{iv}", "decision",
              f"{label} minus batch {ref}'s, paired by seed{iv}"]
    body = []
    for r in rows:
        micro = r["micro_batch_size"]
        body.append([
            str(r["batch_size"]),
            f"{micro} x {r['accumulation_steps']}" if micro else "-",
            _num(r["lr"], ".3g"),
            str(r["status"] or "-"),
            _num(r["best_metric"]),
            _bytes(r["peak_memory_bytes"]),
            _iv_text(r["samples_per_s_interval"], ".0f"),
            _iv_text(r["b_simple_interval"], ".3g"),
            _iv_text(r["noise_ratio_interval"], ".2f"),
            _iv_text(r["generalization_gap_interval"], "+.3f"),
            _iv_text(r["epochs_to_target_interval"], ".3g"),
            _iv_text(r["steps_to_target_interval"], ".0f"),
            _num(r["seconds_to_target"], ".3g"),
            _iv_text(r["quality"]),
            str(r["seeds"] or "-"),
            _iv_text(r["time_to_target"], ".3g"),
            (r["verdict"] if interim and r["chosen"] else r["decision"]) or "-",
            "reference" if r["batch_size"] == ref else _iv_text(r["paired_difference_interval"], "+.4f"),
        ])
    return header, body


# ---------------------------------------------------------------------------------------------------------------
# The trade-off table: one row per batch size, at most 8 columns, each cell short


TRADEOFF_COLUMNS = 8
TRADEOFF_CELL_CHARS = 28  # the longest cell text: 8 such columns fit a 1280-px window


def _compact(x: Any, signed: bool = False, scale: tuple[float, str] = (1.0, "")) -> str:
    """A number in a few characters: whole numbers from 100 up as they are, smaller ones to 3 significant digits;
    ``scale`` (e.g. ``(1e3, "k")``) divides it first and appends the unit; ``inf`` for an unbounded end."""
    if not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x):
        return "-"
    sign = "+" if signed and x > 0 else ""
    if math.isinf(x):
        return f"{sign}inf" if x > 0 else "-inf"
    v = x / scale[0]
    return f"{sign}{v:.0f}{scale[1]}" if abs(v) >= 100 else f"{sign}{v:.3g}{scale[1]}"


def _scale_of(x: float) -> tuple[float, str]:
    """One unit for an estimate and its interval's ends: k from 100,000, M from 10^7, G from 10^10 (at most 5
    digits before the unit)."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= 100 * scale:
            return scale, unit
    return 1.0, ""


def _to_uncertainty(est: float, low: float, high: float, signed: bool, scale: tuple[float, str]) -> str | None:
    """The three numbers to the interval's precision: the half-width rounded to 1 significant digit (2 when it
    starts with 1 or 2), and at least one significant digit of the estimate (``-0.0002 [-0.0057, +0.0052]``,
    ``232 [225, 237]``); ``None`` for an interval too narrow to set the precision by."""
    if math.isfinite(low) and math.isfinite(high):
        width = (high - low) / 2
    else:
        width = min((d for d in (est - low, high - est) if math.isfinite(d) and d > 0), default=0.0)
    if not width > 0 or width < 1e-3 * abs(est):
        return None
    width /= scale[0]
    exp = math.floor(math.log10(width))
    decimals = min(6, max(0, (2 if width / 10 ** exp < 3 else 1) - 1 - exp))
    while est != 0 and round(est / scale[0], decimals) == 0 and decimals < 6:
        decimals += 1

    def fmt(x: float) -> str:
        if math.isinf(x):
            return _compact(x, signed)
        return f"{x / scale[0]:{'+' if signed else ''}.{decimals}f}{scale[1]}"

    return f"{fmt(est)} [{fmt(low)}, {fmt(high)}]"


def _civ(iv: Mapping[str, Any] | None, signed: bool = False) -> str:
    """An interval in at most :data:`TRADEOFF_CELL_CHARS` characters where it can be: ``0.9186 [0.9154, 0.9217]``
    (rounded to the interval's own precision), ``125k [119k, 131k]`` (one unit for all three); 3 then 2 significant
    digits when that is too long; ``0.945 (no interval)`` where the data give none."""
    est = finite_or_none((iv or {}).get("estimate"))
    if iv is None or est is None:
        return "-"
    scale = _scale_of(est)
    low, high = iv.get("low"), iv.get("high")
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
        return f"{_compact(est, signed, scale)} (no interval)"
    text = _to_uncertainty(est, float(low), float(high), signed, scale)
    if text is None or len(text) > TRADEOFF_CELL_CHARS:
        text = f"{_compact(est, signed, scale)} [{_compact(low, signed, scale)}, {_compact(high, signed, scale)}]"
    if len(text) > TRADEOFF_CELL_CHARS:  # tiny differences: 2 significant digits, no plus sign on the ends
        text = f"{est:.2g} [{low:.2g}, {high:.2g}]"
    return text


def _verdict_text(row: Mapping[str, Any], interim: bool) -> str:
    verdict = row.get("verdict") or ""
    if row.get("chosen") and not interim:
        return f"chosen ({verdict})" if verdict else "chosen"
    if verdict:
        return str(verdict)
    return "-" if row.get("status") in (None, "ok") else str(row["status"])


def tradeoff_table(results: Any, recommendation: Any = None, *,
                   interim: bool | None = None) -> tuple[list[str], list[list[str]]]:
    """The report's first table: the guides' trade-off, one row per batch size (its decision configuration: the
    best LR's trials, seeds pooled), in :data:`TRADEOFF_COLUMNS` columns whose cells are at most
    :data:`TRADEOFF_CELL_CHARS` characters: batch; peak memory with the micro-batch x accumulation steps it was
    measured at; samples/s; B / B_simple; the paired difference in the metric from the decision's reference (positive
    is better; ``reference`` on its row); steps and time to target; the verdict (``reference``, ``non-inferior``,
    ``inferior``, ``undecided``; the recommended one ``chosen (...)``, never in an interim report). Each number
    carries its 95 % interval as ``estimate [low, high]`` (:func:`summary_rows` says where each comes from); every
    trial and the longer forms are in the details (:func:`summary_table`, the table of every trial)."""
    measured = _measured(results)
    interim = is_interim(measured, recommendation) if interim is None else interim
    label = metric_label(measured.metric)
    rows = summary_rows(measured, _rec_of(measured, recommendation))
    ref = rows[0]["paired_reference_batch_size"] if rows else None
    header = ["batch", "peak memory (micro x accum)", "samples/s", "B / B_simple",
              f"{label} vs batch {ref}, paired (+ = better)", "steps to target", "time to target, s", "verdict"]
    body = []
    for r in rows:
        micro = r["micro_batch_size"]
        mem = _bytes(r["peak_memory_bytes"])
        body.append([
            str(r["batch_size"]),
            f"{mem} ({micro} x {r['accumulation_steps']})" if micro else mem,
            _civ(r["samples_per_s_interval"]),
            _civ(r["noise_ratio_interval"]),
            "reference" if r["batch_size"] == ref else _civ(r["difference_interval"], signed=True),
            _civ(r["steps_to_target_interval"]),
            _civ(r["time_to_target"]),
            _verdict_text(r, interim),
        ])
    return header, body


def tradeoff_notes(results: Any, recommendation: Any = None, *,
                   interim: bool | None = None) -> list[str]:
    """What the trade-off table's cells are, in sentences (below the table)."""
    measured = _measured(results)
    interim = is_interim(measured, recommendation) if interim is None else interim
    rec = _rec_of(measured, recommendation)
    label = metric_label(measured.metric)
    rows = summary_rows(measured, rec)
    if not rows:
        return []
    ref = rows[0]["paired_reference_batch_size"]
    seeds = ", ".join(f"{r['batch_size']}: {r['seeds'] or r['seed_count']}" for r in rows)
    lines = [f"One row per batch size: its best learning rate's trials, seeds pooled (seeds per batch size: {seeds}). "
             "Each number is the estimate with its 95 % interval [low, high]; \"(no interval)\" where the data give "
             "none (one seed). Peak memory is one measurement, at the micro-batch x accumulation steps shown."]
    noise = _noise_of(measured, rec, pool=False)  # read only outside an interim report
    if (noise.get("at_loss") or {}).get("b_simple") and not interim:
        lines.append(f"B / B_simple: the batch over the gradient noise scale B_simple at training loss "
                     f"{_num(noise.get('train_loss'), '.3g')}, the decision's target (pooled over every trial; see "
                     "Study). Below 1 a step's gradient is mostly noise; well above 1 extra samples per step buy "
                     "little.")
    else:
        lines.append("B / B_simple: the batch over its own runs' B_simple (each run's median, seeds pooled on the log "
                     "scale; not at a stated training loss). Below 1 a step's gradient is mostly noise; well above 1 "
                     "extra samples per step buy little.")
    sel = (rec.selection if rec is not None else None) or {}
    margin = finite_or_none(sel.get("tolerance")) if isinstance(sel, Mapping) else None
    margin_txt = f" (-{_compact(margin)} here)" if margin is not None else ""
    if _evidence_of(rec):
        lines.append(f"{label} vs batch {ref}: the paired difference from the reference (the best {label} estimate) "
                     "on the seeds they share, positive = better, with the decision's simultaneous one-sided 95 % "
                     f"bounds. Non-inferior: the lower bound lies above -tolerance x |reference|{margin_txt}; "
                     "inferior: the upper bound lies below it; undecided: neither, at this number of seeds.")
    else:
        lines.append(f"{label} vs batch {ref}: the paired difference from the best seed mean on the seeds they share, "
                     "positive = better, with a t interval over the paired differences; no verdicts without a "
                     "decision.")
    lines.append("Steps to target: the S(B) = S_min (1 + B_crit / B) fit over every batch size and seed (or the seed "
                 "mean where the fit is poor); time to target: those steps x the measured seconds per step"
                 + ("." if interim else "; the fastest of the reference and the non-inferior batch sizes is chosen, "
                                       "the smallest of them when nothing trained in the measured horizon (see the "
                                       "flags)."))
    return lines


def _trials_table(measured: Measurements) -> tuple[list[str], list[list[str]]]:
    """Every trial, one row each, with what it measured (no interval: one run)."""
    metric = measured.metric
    label = metric_label(metric)
    header = ["batch", "micro x accum", "LR", "LR x", "seed", "status", f"best {label}", f"final {label}",
              "final val loss", "peak memory", "samples/s", "B_simple", "val - train(eval) loss", "steps to target",
              "s to target", "steps", "seconds", "error"]
    body = []
    for t in sorted(measured.trials, key=lambda t: (t.batch_size, t.lr or 0, t.seed or 0)):
        micro = t.micro_batch_size
        body.append([
            str(t.batch_size), f"{micro} x {t.accumulation_steps}" if micro else "-",
            _num(t.lr, ".3g"), _num(t.lr_multiplier, "g"), "-" if t.seed is None else str(t.seed),
            str(t.status or "-"), _num(metric.of_trial(t)),
            _num(quality_of_trial(t, metric)) if t.status == "ok" else "-", _num(t.final_val_loss),
            _bytes(t.peak_memory_bytes), _num(t.samples_per_s, ".0f"), _num(t.b_simple, ".3g"),
            _num(_gap(t), "+.3f"), _num(t.steps_to_target, ".0f"), _num(t.seconds_to_target, ".3g"),
            _num(t.steps, ".0f"), _num(t.seconds, ".3g"), str(t.error or ""),
        ])
    return header, body


def _pos_text(iv: Mapping[str, Any] | None, fmt: str = ".3g") -> str:
    """A positive quantity's interval in words (an unbounded end ``inf``; an unbounded estimate ``unbounded``)."""
    pos = _positive_interval(iv)
    if pos is None:
        return "unbounded (|G|^2 estimate <= 0)" if iv else "-"
    return _iv_text(pos.to_dict(), fmt)


def _noise_lines(measured: Measurements, rec: Recommendation | None) -> list[str]:
    """The gradient noise scale: the probe's value labelled as measured at initialisation (never compared with a
    batch), B_simple against the training loss pooled over every trial, and at the decision's target loss."""
    lines = []
    probe = measured.noise
    if probe is not None and finite_or_none(probe.b_simple) is not None:  # unbounded (JSON null): no probe value
        low, high = probe.b_simple_ci
        has_ci = finite_or_none(low) is not None or finite_or_none(high) is not None  # (-inf, inf): none stored
        ci_txt = f" (95% CI {_num(low, '.3g')} - {_num(high, '.3g')})" if has_ci else ""
        steps = probe.train_steps or 0
        when = "at initialisation" if not steps else f"after {steps} training steps"
        batch = f" at batch {probe.batch_size}" if probe.batch_size else ""
        what = ("measured before the loss fell, it is a floor of the noise scale later in training, not the critical "
                "batch" if not steps else "one point early in training, not at the target's loss")
        lines.append(f"gradient noise scale B_simple {when} (the noise probe{batch}): {_num(probe.b_simple, '.4g')}"
                     f"{ci_txt}; {what}")
    noise = _noise_of(measured, rec)
    curve = noise.get("against_loss") or []
    if curve:
        lines.append(f"B_simple against the training loss, pooled over {noise.get('records')} evaluation records of "
                     f"{noise.get('trials')} trial(s) (per loss bin: tr(Sigma) and |G|^2 summed over the records' "
                     "steps, then divided; 95 % bootstrap over trials): "
                     + "; ".join(f"loss {_num(p['train_loss'], '.3g')}: {_pos_text(p['b_simple'])}" for p in curve))
    at = noise.get("at_loss")
    if at:
        lines.append(f"B_simple at training loss {_num(noise.get('train_loss'), '.4g')}, {noise.get('loss_words')}: "
                     f"{_pos_text(at['b_simple'])}; the B / B_simple column divides each batch by it")
    elif isinstance(b_simple := measured.sweep.b_simple, (int, float)):
        lines.append(f"B_simple during training, the median over the batch sizes of each run's median: "
                     f"{_num(b_simple, '.4g')} (not at a stated training loss: B_simple grows as the loss "
                     "falls, and a short large-batch run stays near initialisation); the B / B_simple column divides "
                     "each batch by its own B_simple")
    return lines


def _study_lines(results: Any, recommendation: Any = None) -> list[str]:
    """The study's facts (the report's "Study" section); ``recommendation``: the given one, else the results'."""
    measured = _measured(results)
    return _study_facts(measured, _rec_of(measured, recommendation))


def _study_facts(measured: Measurements, rec: Recommendation | None) -> list[str]:
    """The study's facts, with the noise sentences of ``rec`` (``None``: an interim report's, without one)."""
    sweep = measured.sweep
    budget = sweep.budget or {}
    target = sweep.target or {}
    lines = [
        f"workload {sweep.workload}, device {sweep.device}, precision {sweep.precision}",
        f"budget {budget.get('kind')}:{budget.get('value')}, LR rule {sweep.lr_rule}, primary metric "
        f"{sweep.primary_metric} ({'higher' if sweep.higher_is_better else 'lower'} is better)",
    ]
    if sweep.primary_metric == "train_loss":
        lines.append("ranked on the training loss: the workload has no validation data, so the table and the "
                     "recommendation say how fast each batch size trains, not how well it generalizes")
    if target.get("definition"):
        lines.append(f"target: {target['definition']}")
    elif target:
        lines.append("target: " + ", ".join(f"{k} {v}" for k, v in target.items()))
    crit = sweep.critical_batch_size
    if crit and crit.get("b_crit") is not None:
        iv = crit.get("interval") or {}
        iv_txt = (f" (95 % interval {_num(iv.get('low'), '.3g')}-{_num(iv.get('high'), '.3g')}, stratified bootstrap "
                  "over seeds)" if iv.get("low") is not None else
                  " (no interval: one seed per batch size, resampling cannot show the noise)" if iv else "")
        support = crit.get("support")
        sup_txt = (f"; supported by batch sizes {support[0]}-{support[1]}" if isinstance(support, list) and support
                   else "")
        extra_txt = (f"; extrapolated beyond the largest batch that reached the target: read it as 'above "
                     f"{support[1]}'" if crit.get("extrapolated") and sup_txt else "")
        lines.append(f"critical batch B_crit {_num(crit.get('b_crit'), '.4g')}{iv_txt}, S_min "
                     f"{_num(crit.get('s_min'), '.4g')} steps, fit R^2 {_num(crit.get('r2'), '.3f')} over "
                     f"{len(crit.get('points') or [])} batch sizes{sup_txt}{extra_txt}")
    else:
        why = sweep.critical_batch_size_reason or "too few batch sizes reached the target"
        lines.append(f"critical batch: not fitted ({why})")
    lines += _noise_lines(measured, rec)
    cal = measured.lr_check
    if cal is not None and cal.runs:
        scores = ", ".join(f"x{r['multiplier']:g} {_num(r['score'])}" for r in cal.runs)
        verdict = ("kept" if cal.kept_base else f"moved to {_num(cal.lr, '.3g')}")
        lines.append(f"base LR {_num(cal.base_lr, '.3g')} checked at batch {cal.batch_size} for "
                     f"{cal.steps} steps ({cal.metric}: {scores}): {verdict}")
    find = measured.find
    if find is not None:
        lines.append(f"finder: largest batch that fits with margin {find.recommended_batch_size}, throughput "
                     f"knee {find.throughput_knee_batch_size}, {find.real_trials} real trials")
        if plan_vs_measured := find.extras.get("plan_vs_measured"):  # tune's line beside the finder's result
            lines.append(f"plan vs measured: {plan_vs_measured}")
    lines.append(f"store {sweep.storage}, study {sweep.study_name}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Plots


# Fixed margins in inches (left, right, bottom, top, between two axes): room for the tick labels, the axis labels
# and the one-line title of every plot here. A fixed layout draws each figure once; constrained layout measured
# every label and drew the figure a second time, about a third of the plotting time.
_MARGINS_IN = (0.85, 0.2, 0.6, 0.4, 0.95)


def _figure(ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = 6.4 * ncols, 4.2
    left, right, bottom, top, between = _MARGINS_IN
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes_width = (width - left - right - between * (ncols - 1)) / ncols
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=between / axes_width)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _batch_tick(x: float, _pos: Any = None) -> str:
    """A batch-size tick's label: the size itself (16, 32, ...) up to 8192, else its power of two (2^20, 2^-3)."""
    if 1 <= x <= 8192 and x == round(x):
        return f"{x:.0f}"
    power = math.log2(x) if x > 0 else math.nan
    return f"2^{power:.0f}" if math.isfinite(power) and power == round(power) else f"{x:g}"


def _batch_axis(ax: Any) -> None:
    """A log2 batch-size axis with plain-text labels (:func:`_batch_tick`): matplotlib's own (2^4, 2^5, ...) are
    mathtext, parsed anew for every figure (a fifth of the plotting time)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(_batch_tick))


def _save(fig: Any, path: Path) -> Path:
    return _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _plot_val_curves(measured: Measurements, rec: Recommendation | None, path: Path) -> Path | None:
    metric = measured.metric
    trials = [t for t in _rows_source(measured) if t.history]
    if not trials:
        return None
    fig, (ax_m, ax_l) = _figure(2)
    for t in trials:
        hist = t.history
        ep = [h.get("epoch") for h in hist]
        label = f"B={t.batch_size}"
        values = [metric.of_record(h) for h in hist]
        if any(m is not None for m in values):
            ax_m.plot(ep, [math.nan if m is None else m for m in values], marker=".", label=label)
        ax_l.plot(ep, [math.nan if h.get("val_loss") is None else h["val_loss"] for h in hist], marker=".",
                  label=label)
    ax_m.set(xlabel="epoch", ylabel=metric_label(metric), title=metric_label(metric))
    ax_l.set(xlabel="epoch", ylabel="val loss", title="validation loss")
    ax_l.legend(fontsize="small")
    return _save(fig, path)


def _errorbar(ax: Any, xs: list[float], ivs: list[Mapping[str, Any] | None], label: str, **kw: Any) -> bool:
    """Points with 95 % error bars where the interval is known; hollow markers where it is not (one seed, no
    measured noise: an unknown interval is never drawn as a zero-width one). True when any bar was drawn."""
    known = [(x, iv) for x, iv in zip(xs, ivs) if iv and iv.get("low") is not None and iv.get("high") is not None]
    unknown = [(x, iv) for x, iv in zip(xs, ivs) if iv and iv.get("estimate") is not None
               and (iv.get("low") is None or iv.get("high") is None)]
    color = kw.pop("color", None)
    if known:
        est = [float(iv["estimate"]) for _, iv in known]
        lo = [max(0.0, e - float(iv["low"])) for e, (_, iv) in zip(est, known)]
        hi = [max(0.0, float(iv["high"]) - e) for e, (_, iv) in zip(est, known)]
        bars = ax.errorbar([x for x, _ in known], est, yerr=[lo, hi], fmt="o", capsize=3, color=color,
                           label=f"{label} (95 % interval)", **kw)
        color = bars[0].get_color()
    if unknown:
        ax.plot([x for x, _ in unknown], [float(iv["estimate"]) for _, iv in unknown], "o", mfc="none",
                color=color, label=f"{label} (no interval: one seed)")
    return bool(known)


def _plot_metric_vs_batch(measured: Measurements, rec: Recommendation | None, path: Path,
                          interim: bool = False) -> Path | None:
    """Left: each batch size's quality (its best LR's seed mean, 95 % error bars), the reference and the
    non-inferior batch sizes shaded, the chosen one starred (never in an interim report). Right: each batch size's
    paired difference from the reference with the decision's bounds, and the non-inferiority margin."""
    metric = measured.metric
    label = metric_label(metric)
    rows = [t for t in _rows_source(measured) if metric.of_trial(t) is not None]
    evidence = _evidence_of(rec)
    ref = _reference_of(rec)
    if not rows and not evidence:
        return None
    diffs = {b: e["difference"] for b, e in evidence.items() if isinstance(e.get("difference"), Mapping)
             and e.get("verdict") != "reference"}
    fig, axes = _figure(2) if diffs else _figure()
    ax = axes[0] if diffs else axes
    if evidence:
        bs = sorted(evidence)
        _errorbar(ax, bs, [evidence[b].get("quality") for b in bs], f"{label}: seed mean of the best LR")
        chosen, kept = _decision_of(rec)
        for i, b in enumerate(sorted(kept)):  # one band per batch size: an inferior one between stays unshaded
            ax.axvspan(b / 2 ** 0.25, b * 2 ** 0.25, color="tab:green", alpha=0.08,
                       label=f"non-inferior to the reference {ref}" if i == 0 else None)
        if ref in evidence:
            ax.plot([ref], [evidence[ref]["quality"]["estimate"]], "o", ms=12, mfc="none", color="tab:green",
                    label=f"reference: {ref}")
        if chosen in evidence and not interim:
            ax.plot([chosen], [evidence[chosen]["quality"]["estimate"]], "*", ms=14, color="tab:green",
                    label=f"chosen: {chosen}")
    if rows:
        bs_rows = [t.batch_size for t in rows]
        ax.plot(bs_rows, [metric.of_trial(t) for t in rows], marker=".", linestyle=":", alpha=0.6,
                label=f"best single {label} (max over evaluations)")
    _batch_axis(ax)
    ax.set(xlabel="effective batch size", ylabel=label, title=f"{label} vs batch size")
    ax.legend(fontsize="small")
    if diffs:
        ax_d = axes[1]
        bs = sorted(diffs)
        _errorbar(ax_d, bs, [diffs[b] for b in bs], "paired difference, the decision's bounds")
        for b in bs:
            est = finite_or_none(diffs[b].get("estimate"))
            if est is not None:  # the largest batch size's verdict goes left of its point: inside the fixed layout
                last = b == bs[-1] and len(bs) > 1
                ax_d.annotate(str(evidence[b].get("verdict") or ""), (b, est), textcoords="offset points",
                              xytext=(-6, 4) if last else (6, 4), ha="right" if last else "left", fontsize="small")
        ax_d.axhline(0.0, color="gray", linewidth=0.8)
        sel = (rec.selection if rec is not None else None) or {}
        margin = finite_or_none(sel.get("tolerance")) if isinstance(sel, Mapping) else None
        if margin is not None:
            ax_d.axhline(-margin, color="tab:red", linestyle="--", label=f"non-inferiority margin -{margin:.3g}")
        _batch_axis(ax_d)
        ax_d.set(xlabel="effective batch size", ylabel=f"{label} difference (+ = better)",
                 title=f"paired difference from the reference {ref}")
        ax_d.legend(fontsize="small")
    return _save(fig, path)


def _plot_throughput_memory(measured: Measurements, rec: Recommendation | None, path: Path) -> Path | None:
    rows = [t for t in _rows_source(measured) if t.samples_per_s or t.peak_memory_bytes]
    evidence = _evidence_of(rec)
    if not rows and not evidence:
        return None
    fig, (ax_t, ax_m) = _figure(2)
    every = [t for t in measured.trials if t.status == "ok" and t.samples_per_s]
    if every:
        ax_t.plot([t.batch_size for t in every], [t.samples_per_s for t in every], ".", color="gray",
                  alpha=0.5, label="each trial")
    if evidence:  # samples/s = B / (fitted seconds per step), its interval from the fit's (as the table's)
        bs = sorted(evidence)
        _errorbar(ax_t, bs, [_samples_per_s(b, evidence[b]) for b in bs], "pooled fit")
    elif rows:
        ax_t.plot([t.batch_size for t in rows], [t.samples_per_s or math.nan for t in rows], marker="o")
    ax_t.set(xlabel="effective batch size", ylabel="samples/s", title="throughput")
    if ax_t.get_legend_handles_labels()[0]:
        ax_t.legend(fontsize="small")
    mem = [(t.peak_memory_bytes or math.nan) / 2**20 for t in rows]
    ax_m.plot([t.batch_size for t in rows], mem, marker="o", color="tab:red")
    ax_m.set(xlabel="effective batch size", ylabel="peak memory (MiB)", title="peak memory")
    for ax in (ax_t, ax_m):
        _batch_axis(ax)
    return _save(fig, path)


def _plot_steps_to_target(measured: Measurements, rec: Recommendation | None, path: Path) -> Path | None:
    crit = measured.sweep.critical_batch_size or {}
    points = crit.get("points") or [
        [t.batch_size, t.steps_to_target] for t in _rows_source(measured) if isinstance(t.steps_to_target, (int, float))
    ]
    evidence = {b: e for b, e in _evidence_of(rec).items() if e.get("steps_to_target")}
    if not points and not evidence:
        return None
    fig, (ax, ax_t) = _figure(2)
    if evidence:
        bs = sorted(evidence)

        def positive(iv: Mapping[str, Any] | None) -> Mapping[str, Any] | None:  # log axes: only what they can show
            return iv if iv and isinstance(iv.get("estimate"), (int, float)) and iv["estimate"] > 0 else None

        _errorbar(ax, bs, [positive(evidence[b]["steps_to_target"]) for b in bs], "decision (S(B) fit, or seed mean)")
        _errorbar(ax_t, bs, [positive(evidence[b].get("time_to_target")) for b in bs], "fitted S(B) x t(B)",
                  color="tab:purple")
    else:
        ax.plot([p[0] for p in points], [p[1] for p in points], "o", label="measured")
    b_crit, s_min = crit.get("b_crit"), crit.get("s_min")
    xs = sorted(evidence) or [p[0] for p in points]
    if isinstance(b_crit, (int, float)) and isinstance(s_min, (int, float)):
        lo, hi = min(xs), max(xs)
        grid = [lo * (hi / lo) ** (i / 99) for i in range(100)] if hi > lo else [lo]
        ax.plot(grid, [s_min * (1 + b_crit / b) for b in grid], "-",
                label=f"S(B) = {s_min:.3g} (1 + {b_crit:.3g}/B), R^2 {_num(crit.get('r2'), '.2f')}")
        ax.axvline(b_crit, color="gray", linestyle=":", label=f"B_crit = {b_crit:.3g}")
        iv = crit.get("interval") or {}
        if iv.get("low") is not None and iv.get("high") is not None:
            ax.axvspan(max(iv["low"], 1e-9), iv["high"], color="gray", alpha=0.12,
                       label=f"B_crit 95 % interval {iv['low']:.3g}-{iv['high']:.3g}")
    for a in (ax, ax_t):
        if not a.has_data():  # e.g. no batch size reached the target with a time: leave the axes empty
            continue
        _batch_axis(a)
        a.set_yscale("log")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize="small")
    ax.set(xlabel="effective batch size", ylabel="optimizer steps to target", title="steps to target")
    ax_t.set(xlabel="effective batch size", ylabel="seconds to target", title="time to target")
    return _save(fig, path)


def _plot_b_simple(measured: Measurements, rec: Recommendation | None, path: Path) -> Path | None:
    """Left: each batch size's running B_simple over its run, and the probe's value at initialisation. Right:
    B_simple against the training loss, pooled over every trial (95 % bootstrap over trials), with the value at the
    decision's target loss."""
    trials = [t for t in _rows_source(measured) if t.b_simple_history]
    probe = measured.noise
    global_bs = finite_or_none(probe.b_simple) if probe is not None else None  # unbounded (JSON null): not drawn
    noise = _noise_of(measured, rec)
    curve = [(p, iv) for p in noise.get("against_loss") or [] if (iv := _positive_interval(p.get("b_simple")))]
    if not trials and global_bs is None and not curve:
        return None
    fig, (ax, ax_l) = _figure(2)
    for t in trials:  # the running ratio of two noisy estimates can dip to zero or below: only positive values show
        hist = [h for h in t.b_simple_history if isinstance(h.get("b_simple"), (int, float)) and h["b_simple"] > 0]
        xs = [h["epoch"] if h.get("epoch") is not None else h.get("step") for h in hist]
        ax.plot(xs, [h["b_simple"] for h in hist], marker=".", label=f"B={t.batch_size}")
    if global_bs is not None and probe is not None:
        when = "at initialisation" if not probe.train_steps else f"after {probe.train_steps} steps"
        ax.axhline(global_bs, color="gray", linestyle="--", label=f"noise probe {when}: {global_bs:.3g}")
    ax.set(xlabel="epoch", ylabel="B_simple (EMA)", title="each run's B_simple over training")
    if curve:
        known = [(float(p["train_loss"]), iv.to_dict()) for p, iv in curve if iv.known]
        for _, d in known:  # the error bars need finite ends: an unbounded high end is drawn to the plot's top
            if math.isinf(d["high"]):
                d["high"] = 10 * d["estimate"]
        if known:
            _errorbar(ax_l, [x for x, _ in known], [d for _, d in known], "pooled over trials")
        few = [(float(p["train_loss"]), iv.estimate) for p, iv in curve if not iv.known]
        if few:
            ax_l.plot([x for x, _ in few], [y for _, y in few], "o", mfc="none", color="tab:blue",
                      label="pooled (no interval: fewer than 3 trials)")
        at = noise.get("at_loss") or {}
        est = finite_or_none((at.get("b_simple") or {}).get("estimate"))
        if est is not None and finite_or_none(noise.get("train_loss")) is not None:
            ax_l.plot([noise["train_loss"]], [est], "*", ms=14, color="tab:green",
                      label=f"at the target's loss {noise['train_loss']:.3g}: {est:.3g}")
        if all(float(p["train_loss"]) > 0 for p, _ in curve):
            ax_l.set_xscale("log")
            ax_l.invert_xaxis()  # training runs left to right
    ax_l.set(xlabel="training loss", ylabel="B_simple", title="B_simple against the training loss")
    for a in (ax, ax_l):
        ys = [float(y) for line in a.get_lines() for y in line.get_ydata() if math.isfinite(float(y))]
        if a.has_data() and ys and min(ys) > 0:  # a log axis needs positive data (matplotlib refuses otherwise)
            a.set_yscale("log")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize="small")
    return _save(fig, path)


_PLOTTERS: dict[str, Callable[[Measurements, Recommendation | None, Path], Path | None]] = {
    "val_curves": _plot_val_curves,
    "metric_vs_batch": _plot_metric_vs_batch,
    "throughput_memory": _plot_throughput_memory,
    "steps_to_target": _plot_steps_to_target,
    "b_simple": _plot_b_simple,
}


def make_plots(results: Any, out_dir: str | Path, *, interim: bool = False) -> dict[str, Path]:
    """Write each plot that has data as ``out_dir/<name>.png``; return name -> path. ``interim``: no batch size is
    marked chosen. The decision drawn is the recommendation stored with the results."""
    measured = _measured(results)
    rec = _rec_of(measured)
    out = Path(out_dir)
    written = {}
    for name in PLOTS:
        target = out / f"{name}.png"
        path = (_plot_metric_vs_batch(measured, rec, target, interim=interim) if name == "metric_vs_batch"
                else _PLOTTERS[name](measured, rec, target))
        if path is not None:
            written[name] = path
    return written


# ---------------------------------------------------------------------------------------------------------------
# Markdown and HTML


def _md_table(header: list[str], body: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _answer(rec: Recommendation | None, interim: bool) -> tuple[str | None, list[str], str | None, list[str]]:
    """The recommendation's headline, its reasons, the sentence saying which budget and target it holds for (taken
    out of the first reason, where :func:`batchfit.recommend.recommend` appends it) and its flags; nothing in an
    interim report."""
    if rec is None or interim:
        return None, [], None, []
    holds = ((rec.holds_for or {}).get("text") or "").strip() or None
    reasons = [r.replace(" " + holds, "").replace(holds, "") if holds else r for r in rec.reasons]
    return rec.headline(), reasons, holds, [str(f) for f in rec.flags]


def cost_text(results: Any) -> str:
    """``cost 0.84 runs (24,120 samples, 31 s training) of the train budget epochs:20, cap 1`` from ``results["cost"]``
    (issue 18: every output states what the answer cost), or ``""``."""
    from batchfit.cost import Cost, cost_of

    measured = _measured(results)
    data = measured.source.get("cost")
    if not isinstance(data, Mapping):  # a report rebuilt from the store: the same sum over the stored stages
        data = cost_of(measured.to_dict()).to_dict()
    if not data.get("samples"):
        return ""
    return Cost.from_dict(data).line()


def _span_text(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if sizes else "none"


def tell_apart_lines(rec: Recommendation | None) -> list[str]:
    """What the data can and cannot tell apart: the decision rule, then each batch size's verdict against the
    reference (non-inferior, inferior, undecided); the flags are in the recommendation itself."""
    if rec is None:
        return []
    lines = []
    if rec.decision_rule:
        lines.append(f"Decision rule: {rec.decision_rule}")
    sel = rec.selection or {}
    ref = rec.reference_batch_size
    label = metric_label(Metric(rec.metric, rec.higher_is_better))
    if isinstance(sel, Mapping) and ref is not None:
        non_inferior = [b for b in sel.get("non_inferior") or [] if b != ref]
        margin = finite_or_none(sel.get("tolerance"))
        margin_txt = f" (the margin: {_compact(margin)} below it)" if margin is not None else ""
        lines.append(f"Reference: batch {ref}, the best {label} estimate; every other batch size is compared with it "
                     f"on the seeds they share{margin_txt}.")
        lines.append(f"Non-inferior to batch {ref}: {_span_text(non_inferior)}; inferior (worse beyond the margin): "
                     f"{_span_text(list(sel.get('inferior') or []))}; undecided (more seeds could place them): "
                     f"{_span_text(list(sel.get('undecided') or []))}.")
        lines.append(f"Chosen among batch {ref} and the non-inferior ones on time to target: {rec.batch_size}.")
    else:  # a recommendation made before the non-inferiority rule
        sizes = [int(b) for b in rec.non_inferior or rec.tied]
        if sizes:
            lines.append(f"Batch sizes {_span_text(sizes)} were kept on {label}; chosen among them on time to target: "
                         f"{rec.batch_size}.")
    return lines


def _snippets(rec: Recommendation | None) -> dict[str, str]:
    recipe = (rec.recipe if rec is not None else None) or {}
    return dict(recipe.get("snippets") or {})


def _interim_of(measured: Measurements, recommendation: Any, interim: bool | None) -> bool:
    return is_interim(measured, recommendation) if interim is None else bool(interim or recommendation is None)


def _schedule_check(measured: Measurements) -> Mapping[str, Any] | None:
    """``tune(batch_schedule_check=True)``'s result stored with the results (issue 14.4, batchfit.schedule_check)."""
    check = measured.source.get("batch_schedule_check")
    return check if isinstance(check, Mapping) else None


def render_markdown(results: Any, recommendation: Recommendation | None,
                    plots: Mapping[str, Path], note: str | None = None, *, interim: bool | None = None) -> str:
    """report.md: the recommendation first (or, in an interim report, how many trials finished and no win), the
    trade-off table, what the data can tell apart, the recipe, the study's facts, the plots, then the details (every
    number with its interval per batch size, and every trial)."""
    measured = _measured(results)
    rec = _rec_of(measured, recommendation)  # the tables' decision: the given one, else the results'
    interim = _interim_of(measured, recommendation, interim)
    shown = None if interim else recommendation
    parts = [f"# batchfit report: {measured.sweep.workload}", ""]
    head, reasons, holds, flags = _answer(recommendation, interim)
    spent = cost_text(measured)
    if head:
        parts += ["## Recommendation", "", f"**{head}**", ""] + [f"- {r}" for r in reasons] + [""]
        parts += ([holds, ""] if holds else []) + ([f"- Flag: {f}" for f in flags] + [""] if flags else [])
        parts += [f"This answer's {spent}.", ""] if spent else []
    elif still_running(measured) or recommendation is not None:
        parts += ["## Interim report", "", interim_line(measured), ""]
    else:
        parts += ["## Recommendation", "", f"No recommendation yet: {note or 'no finished trial'}.", ""]
    header, body = tradeoff_table(measured, rec, interim=interim)
    parts += ["## The trade-off, per batch size", "", _md_table(header, body), ""]
    parts += [f"- {line}" for line in tradeoff_notes(measured, rec, interim=interim)] + [""]
    if shown is not None:
        parts += ["## What the data can and cannot tell apart", ""]
        parts += [f"- {line}" for line in tell_apart_lines(shown)] + [""]
        for name, code in _snippets(shown).items():
            parts += [f"### Recipe: {name}", "", "```python", code, "```", ""]
    if (schedule := _schedule_check(measured)) is not None:  # issue 14.4 (batchfit.schedule_check)
        from batchfit.schedule_check import report_lines, report_tables

        parts += ["## The batch size over training", ""] + [f"- {x}" for x in report_lines(schedule)] + [""]
        for title, head_, rows in report_tables(schedule):
            parts += [f"### {title}", "", _md_table(head_, rows), ""]
    # an interim report's facts without the recommendation (whose noise sentence names the chosen configuration)
    parts += ["## Study", ""] + [f"- {line}" for line in _study_facts(measured, shown)] + [""]
    if plots:
        parts += ["## Plots", ""]
    for name, path in plots.items():
        parts += [f"### {_TITLES[name]}", "", f"![{_TITLES[name]}]({Path(path).name})", ""]
    d_header, d_body = summary_table(measured, rec, interim=interim)
    t_header, t_body = _trials_table(measured)
    parts += ["## Details", "", f"### {_DETAILS_BATCH}", "", _md_table(d_header, d_body), "",
              f"### {_DETAILS_TRIALS}", "", _md_table(t_header, t_body), ""]
    return "\n".join(parts)


_DETAILS_BATCH = "Per batch size: every number with its 95 % interval"
_DETAILS_TRIALS = "Every trial"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}
table.tradeoff td{white-space:nowrap}
table.tradeoff th{max-width:10em}
table.tradeoff .iv{display:block;font-size:.85em;color:#555;font-weight:normal}
tr.pick td{background:#eaf6ea;font-weight:600}
.rec{background:#f6f9ff;border-left:4px solid #3b6fd8;padding:.6em 1em}
.interim{background:#fff8e6;border-left:4px solid #d89b3b;padding:.6em 1em}
.notes{font-size:.9em;color:#444}
.scroll{overflow-x:auto}
details{margin:1em 0}
summary{cursor:pointer;font-weight:600}
img{max-width:100%;border:1px solid #eee}
pre.recipe{background:#f7f7f7;padding:.6em 1em;overflow-x:auto}
"""


_SECOND_LINE = re.compile(r"^(.+?) (\[[^\]]*\]|\([^)]*\))$")


def _two_line(cell: str) -> str:
    """``0.843 [0.774, 0.912]`` as the estimate over its interval (a block span, smaller): the cell's text is
    unchanged, its width about halved."""
    m = _SECOND_LINE.match(cell)
    if not m:
        return html.escape(cell)
    return f'{html.escape(m.group(1))} <span class="iv">{html.escape(m.group(2))}</span>'


def _html_table(header: list[str], body: list[list[str]], pick: int | None = None, cls: str | None = None,
                two_line: bool = False) -> str:
    e = html.escape
    cell = _two_line if two_line else e
    out = [f'<table class="{e(cls)}">' if cls else "<table>",
           "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for row in body:
        tr = ' class="pick"' if pick is not None and row[0] == str(pick) else ""
        out.append(f"<tr{tr}>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render_html(results: Any, recommendation: Recommendation | None,
                plots: Mapping[str, Path], note: str | None = None, *, interim: bool | None = None) -> str:
    """A self-contained page (the plots embedded as base64 PNG data URIs), in report.md's order; the details tables
    are folded (``<details>``)."""
    e = html.escape
    measured = _measured(results)
    rec = _rec_of(measured, recommendation)  # the tables' decision: the given one, else the results'
    interim = _interim_of(measured, recommendation, interim)
    shown = None if interim else recommendation
    workload = e(str(measured.sweep.workload))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>batchfit report: {workload}</title>", f"<style>{_CSS}</style>",
             "</head><body>", f"<h1>batchfit report: {workload}</h1>"]
    head, reasons, holds, flags = _answer(recommendation, interim)
    if head:
        parts += ["<h2>Recommendation</h2>", '<div class="rec">', f"<p><strong>{e(head)}</strong></p>", "<ul>"]
        parts += [f"<li>{e(r)}</li>" for r in reasons] + ["</ul>"]
        parts += [f'<p class="holds">{e(holds)}</p>'] if holds else []
        parts += ['<ul class="flags">'] + [f"<li>Flag: {e(f)}</li>" for f in flags] + ["</ul>"] if flags else []
        spent = cost_text(measured)
        parts += [f'<p class="holds">This answer\'s {e(spent)}.</p>'] if spent else []
        parts.append("</div>")
    elif still_running(measured) or recommendation is not None:
        parts += ["<h2>Interim report</h2>", f'<div class="interim"><p>{e(interim_line(measured))}</p></div>']
    else:
        parts += ["<h2>Recommendation</h2>", f"<p>No recommendation yet: {e(note or 'no finished trial')}.</p>"]
    header, body = tradeoff_table(measured, rec, interim=interim)
    parts += ["<h2>The trade-off, per batch size</h2>",
              _html_table(header, body, shown.batch_size if shown is not None else None, cls="tradeoff",
                          two_line=True),
              '<ul class="notes">']
    parts += [f"<li>{e(line)}</li>" for line in tradeoff_notes(measured, rec, interim=interim)]
    parts.append("</ul>")
    if shown is not None:
        parts += ["<h2>What the data can and cannot tell apart</h2>", '<ul class="apart">']
        parts += [f"<li>{e(line)}</li>" for line in tell_apart_lines(shown)] + ["</ul>"]
        for name, code in _snippets(shown).items():
            parts += [f"<h3>Recipe: {e(name)}</h3>", f'<pre class="recipe">{e(code)}</pre>']
    if (schedule := _schedule_check(measured)) is not None:  # issue 14.4 (batchfit.schedule_check)
        from batchfit.schedule_check import report_lines, report_tables

        parts += ["<h2>The batch size over training</h2>", "<ul>"] + [f"<li>{e(x)}</li>"
                                                                     for x in report_lines(schedule)] + ["</ul>"]
        for title, head_, rows in report_tables(schedule):
            parts += [f"<h3>{e(title)}</h3>", _html_table(head_, rows)]
    parts += ["<h2>Study</h2>", "<ul>"] + [f"<li>{e(line)}</li>" for line in _study_facts(measured, shown)]
    parts.append("</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
    for name, path in plots.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts += [f"<h3>{e(_TITLES[name])}</h3>",
                  f'<img alt="{e(_TITLES[name])}" src="data:image/png;base64,{data}">']
    d_header, d_body = summary_table(measured, rec, interim=interim)
    t_header, t_body = _trials_table(measured)
    parts += ["<h2>Details</h2>",
              f'<details class="per-batch"><summary>{e(_DETAILS_BATCH)}</summary><div class="scroll">',
              _html_table(d_header, d_body), "</div></details>",
              f'<details class="trials"><summary>{e(_DETAILS_TRIALS)} ({len(t_body)})</summary>'
              '<div class="scroll">', _html_table(t_header, t_body), "</div></details>", "</body></html>", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# The whole report


_NUMBER_KEYS = ("lr", "lr_multiplier", "samples_per_s", "peak_memory_bytes", "steps_to_target", "epochs_to_target",
                "seconds_to_target", "samples_to_target", "best_val_loss", "final_val_loss", "best_train_loss",
                "generalization_gap", "b_simple", "steps", "seconds")
_MAPPING_KEYS = ("best_val_metrics", "final_val_metrics")
_LIST_KEYS = ("history", "b_simple_history")


def _check_trial(t: Any, where: str) -> None:
    if not isinstance(t, Mapping):
        raise ConfigError(f"{where} is {type(t).__name__}, not an object; fix or remove it")
    batch = t.get("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"{where} has batch_size {batch!r}; it must be a positive integer (fix or remove the trial)")
    where = f"{where} (batch {batch})"
    if t.get("status") is not None and not isinstance(t["status"], str):
        raise ConfigError(f"{where} has status {t['status']!r}; it must be a string such as \"ok\"")
    for key in _NUMBER_KEYS:
        v = t.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{where} has {key} {v!r}; it must be a number or null")
    for key in _MAPPING_KEYS:
        v = t.get(key)
        if v is not None and not (isinstance(v, Mapping) and all(
                x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in v.values())):
            raise ConfigError(f"{where} has {key} {v!r}; it must map metric names to numbers")
    for key in _LIST_KEYS:
        v = t.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(h, Mapping) for h in v)):
            raise ConfigError(f"{where} has {key} of type {type(v).__name__}; it must be a list of records")
    if t.get("status") == "ok" and t.get("lr") is None:
        raise ConfigError(f"{where} finished (status ok) without an lr; fix or remove the trial")


def check_results(results: Mapping[str, Any], source: str = "the results") -> None:
    """Raise :class:`ConfigError` naming the first malformed trial and key, instead of failing inside the report
    (a hand-edited results.json is the usual cause)."""
    if not isinstance(results.get("trials"), list):
        raise ConfigError(f"{source} has no 'trials' list; give a results.json written by batchfit")
    for name in ("primary_metric", "workload"):
        v = results.get(name)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{source}: {name} is {v!r}; it must be a string")
    for i, t in enumerate(results["trials"]):
        _check_trial(t, f"{source}: trial {i}")
    rows = results.get("best_per_batch")
    if rows is not None and not isinstance(rows, list):
        raise ConfigError(f"{source}: best_per_batch must be a list of trials, got {type(rows).__name__}")
    for i, t in enumerate(rows or []):
        _check_trial(t, f"{source}: best_per_batch[{i}]")
    for name in ("find", "noise", "lr_calibration", "precision_check", "critical_batch_size", "budget", "target"):
        v = results.get(name)
        if v is not None and not isinstance(v, Mapping):
            raise ConfigError(f"{source}: {name} must be an object or null, got {type(v).__name__}")


def with_intervals(results: Any, critical: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``results`` with B_crit's bootstrap interval over seeds added to ``critical_batch_size`` (new keys:
    ``interval``, ``s_min_interval``, ``support``, ``extrapolated``; the fitted values are kept as they are).

    ``critical``: the interval the recommendation's decision already bootstrapped (its ``critical_batch``: the same
    estimator on the same trials), used as it is; without it the bootstrap runs here."""
    from batchfit.recommend import critical_interval

    measured = _measured(results)
    data = dict(results) if isinstance(results, Mapping) else measured.to_dict()
    crit = measured.sweep.critical_batch_size
    if not (isinstance(crit, Mapping) and crit.get("b_crit") is not None):
        return data
    if isinstance(critical, Mapping) and isinstance(critical.get("b_crit"), Mapping) and critical.get("support"):
        b_crit, s_min, support = critical["b_crit"], critical.get("s_min"), list(critical["support"])
        failed = critical.get("failed_resamples")
    else:
        boot = critical_interval(measured)
        if boot is None:
            return data
        b_crit, s_min, support, failed = (boot.b_crit.to_dict(), boot.s_min.to_dict(), list(boot.support),
                                          boot.failed_resamples)
    data["critical_batch_size"] = {**crit, "interval": b_crit, "s_min_interval": s_min, "support": support,
                                   "extrapolated": bool(crit["b_crit"] > support[1]), "failed_resamples": failed}
    return data


def write_report(
    results: Any,
    out_dir: str | Path,
    *,
    recommendation: Recommendation | None = None,
    tolerance: float | None = None,
    plots: bool = True,
    interim: bool | None = None,
) -> dict[str, Any]:
    """Write results.json, the plots, report.md and report.html into ``out_dir``, each as soon as it is ready.

    ``results``: ``load_results(store)``, ``tune``'s result or their dict form. ``recommendation`` defaults to
    :func:`batchfit.recommend.recommend` of ``results`` (``None`` with a note when no trial has finished yet).
    ``interim``: the report claims no win (it says how many trials finished and names no chosen batch size); by
    default when the study is still running or there is no recommendation (:func:`is_interim`). results.json
    keeps the recommendation computed from the trials so far either way.
    Returns ``{"results": path, "markdown": path, "html": path, "plots": {...},
    "recommendation": Recommendation | None, "interim": bool}``.
    """
    if isinstance(results, Mapping):
        check_results(results)  # a hand-edited results.json: the malformed trial and key named before it is read
    measured = Measurements.of(results)  # read typed once
    check_results(measured.to_dict())
    out = Path(out_dir)
    note = None
    if recommendation is None:
        try:
            recommendation = recommend(measured, tolerance=tolerance)
        except BatchfitError as exc:
            note = str(exc)
    # the decision's B_crit interval when there is one: the bootstrap is not run a second time (after every trial)
    data = with_intervals(measured, recommendation.critical_batch if recommendation is not None else None)
    data["recommendation"] = recommendation.to_dict() if recommendation is not None else None
    if recommendation is not None:  # the margin it was made with, stored with the results
        data["tolerance"] = recommendation.tolerance
    paths: dict[str, Any] = {"results": write_json(out / "results.json", data)}
    shown = Measurements.of(data)  # what the report shows: the results as written, typed
    interim = _interim_of(shown, recommendation, interim)
    written = make_plots(shown, out, interim=interim) if plots else {}
    if plots and (schedule := _schedule_check(shown)) is not None:  # issue 14.4 (batchfit.schedule_check)
        from batchfit.schedule_check import plot as schedule_plot

        written.update(schedule_plot(schedule, out))
    paths["plots"] = written
    paths["markdown"] = _write_text(out / "report.md", render_markdown(shown, recommendation, written, note,
                                                                       interim=interim))
    paths["html"] = _write_text(out / "report.html", render_html(shown, recommendation, written, note,
                                                                 interim=interim))
    paths["recommendation"] = recommendation
    paths["interim"] = interim
    return paths
