"""The recommendation: which effective batch, micro-batch, accumulation, LR, warm-up and precision to train with.

A pure function of measurements — the sweep's results and what ``tune`` measured beside them (finder, LR check,
precision check) — returning a :class:`Recommendation`, so the same numbers always give the same advice, and every
choice carries a one-sentence reason that quotes what was measured. Every metric value is read through
:class:`batchfit.metric.Metric` (a workload without validation data is ranked on its training loss).

1. **Effective batch** (:func:`batchfit.decide.decide`, docs/decisions.md): every trial of every LR and seed is
   pooled; a batch size's quality is its best LR's seed mean (a trial's: the mean of its last evaluations). Batch
   sizes shown *non-inferior* to the best estimate on paired seeds (simultaneous one-sided bounds within the
   tolerance, :func:`batchfit.stats.select_non_inferior`) join it; among them, the least time to target — steps
   to target from the critical-batch fit
   ``S(B) = S_min (1 + B_crit / B)`` over every batch size and seed x seconds per step (tune's interleaved timing
   rounds, :mod:`batchfit.steptime`; else fitted over every trial) — is chosen, and the batch sizes that cannot be
   told from it on time are named (:data:`DECISION_RULE`). Time to target at a fixed quality is
   the comparison of Shallue et al. (2019) and McCandlish et al. (2018). Flags: a choice at the edge of the tried
   range, B_crit extrapolated, faster batch sizes still undecided, a base-LR move decided on few steps.
2. **Micro-batch and accumulation.** From the finder: its throughput knee when that fits in memory (memory is
   plentiful), else the largest batch that fits with the safety margin; accumulation makes up the effective batch.
3. **LR.** The LR the winning trial trained with (the rule-scaled LR times the best multiplier of the LR search).
4. **Warm-up.** The warm-up the winning trial used (measured stable), and a note when larger LRs diverged.
5. **Precision** (:func:`batchfit.decide.advise_precision`): a lower precision for speed only when the interval of
   its speed-up, from repeated interleaved step timings, excludes 1; for memory only when memory binds.
6. **Recipe.** Every optimizer setting the winning trial used (read from its optimizer's param group), with
   paste-ready PyTorch (and Lightning or Keras) snippets. Where the LR rule was outside its range at the winning
   batch (adam-sqrt with ``k (1 - beta1) > 0.5``: beta1 held at 0.5, :func:`batchfit.scaling.scale_lr`), the LR and
   recipe reasons say :data:`OUTSIDE_RANGE` — the betas are batchfit's choice, to be copied with the batch and LR.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from batchfit import checks
from batchfit._io import split_fields
from batchfit.decide import (
    Decision,
    LRCheck,
    PrecisionCheck,
    PrecisionRun,
    advise_precision,
    critical_from_trials,
    decide,
    quality_of_trial,
)
from batchfit.errors import ConfigError
from batchfit.metric import Metric, finite_or_none
from batchfit.scaling import optimizer_settings  # re-exported: what a trial records, read by the recipe
from batchfit.stats import CriticalBatchInterval, Interval
from batchfit.study.results import SweepResult, TrialSummary

if TYPE_CHECKING:  # the stage results' types: imported where a dict is read (their modules load torch and the step)
    from batchfit.cost import TrainBudgetPlan
    from batchfit.finder import FindResult
    from batchfit.noise import NoiseResult
    from batchfit.steptime import StepTimeCalibration

__all__ = [
    "DECISION_RULE",
    "OUTSIDE_RANGE",
    "TUNE_KEYS",
    "Measurements",
    "Recommendation",
    "critical_interval",
    "decide_results",
    "decision_trials",
    "metric_of",
    "noise_scale_summary",
    "optimizer_settings",
    "recipe",
    "recommend",
    "target_train_loss",
    "with_precision_check",
    "within_tolerance",
]

# a lower precision's training loss may be this much (relative) above fp32's
_PRECISION_LOSS_TOLERANCE = 0.05
# what ``tune`` adds beside the sweep's own results (stored in the study under its namespace)
TUNE_KEYS = ("find", "noise", "lr_calibration", "precision_check", "step_time")
DEFAULT_TOLERANCE = 0.01  # the non-inferiority margin when neither the call nor the results give one


@dataclass
class Recommendation:
    """What to train with, each choice with the measured reason.

    ``to_dict()`` is the ``"recommendation"`` object of results.json: the choice, then the decision's evidence as
    fields (``intervals``, ``tied`` / ``non_inferior``, ``selection``, ``flags``, ``critical_batch``,
    ``precision_advice``, ``recipe``, ...; empty or ``None`` in a recommendation from an older batchfit); keys a
    newer batchfit adds are kept in ``extra`` on a round trip through :meth:`from_dict`, so nothing written is lost.
    """

    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    lr: float
    warmup_steps: int
    precision: str
    reasons: list[str]
    candidates: list[int]
    tolerance: float
    metric: str = "val_loss"
    higher_is_better: bool = False
    world_size: int = 1  # under torchrun: the ranks; micro_batch_size is one rank's
    parallel: str | None = None  # under torchrun: ddp | fsdp
    # the decision's evidence (results.json's keys; a recommendation from an older batchfit may lack them)
    intervals: list[dict[str, Any]] = field(default_factory=list)  # per batch size: decide.Evidence.to_dict()
    tied: list[int] = field(default_factory=list)  # the reference and the batch sizes non-inferior to it
    non_inferior: list[int] = field(default_factory=list)  # = tied (the name the rule gives them)
    reference_batch_size: int | None = None  # the best fitted quality, every other batch is compared with
    selection: dict[str, Any] | None = None  # stats.Selection.to_dict(): every verdict against the reference
    flags: list[str] = field(default_factory=list)
    decision_rule: str | None = None  # DECISION_RULE, worded for the metric
    decision_target: float | None = None  # the quality time to target was measured to
    holds_for: dict[str, Any] | None = None  # the train budget and target the answer holds for, and its sentence
    long_horizon: dict[str, Any] | None = None  # horizon.LongHorizon.to_dict()
    critical_batch: dict[str, Any] | None = None  # the decision's B_crit fit, stats.CriticalBatchInterval.to_dict()
    noise_scale: dict[str, Any] | None = None  # B_simple against the training loss (noise_scale_summary)
    precision_advice: dict[str, Any] | None = None  # decide.PrecisionAdvice.to_dict() when the check ran
    recipe: dict[str, Any] | None = None  # every optimizer setting of the winning trial, and the snippets
    extra: dict[str, Any] = field(default_factory=dict)  # keys a newer batchfit wrote, kept on a round trip

    @property
    def ranked_on_training_loss(self) -> bool:
        """True when the workload had no validation data and the batch sizes were ranked on the training loss."""
        return self.metric == "train_loss"

    def headline(self) -> str:
        """The one-line recommendation (what ``batchfit tune -q`` prints)."""
        ranks = (f" x {self.world_size} ranks ({self.parallel or 'ddp'})" if self.world_size > 1 else "")
        per = " per rank" if self.world_size > 1 else ""
        line = (f"batch {self.batch_size} = micro-batch {self.micro_batch_size}{per} x {self.accumulation_steps} "
                f"accumulation step(s){ranks}, LR {self.lr:.4g}, warm-up {self.warmup_steps} step(s), "
                f"{self.precision}")
        return line + (" (ranked on training loss: no validation data)" if self.ranked_on_training_loss else "")

    def to_dict(self) -> dict[str, Any]:
        """results.json's ``"recommendation"``: the evidence keys first, then any kept from a newer batchfit, then
        the choice."""
        evidence = {name: getattr(self, name) for name in _EVIDENCE_KEYS}
        for name in _EVIDENCE_LISTS:
            evidence[name] = list(evidence[name])
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_CORE}
        out["reasons"], out["candidates"] = list(self.reasons), list(self.candidates)
        return {**evidence, **self.extra, **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recommendation:
        missing = [n for n in ("batch_size", "micro_batch_size", "accumulation_steps", "lr", "precision")
                   if n not in data]
        if missing:
            raise ConfigError(f"a recommendation needs {', '.join(missing)}; it has {', '.join(sorted(data))}")
        known, extra = split_fields(cls, data, rest="extra")
        known.setdefault("warmup_steps", 0)
        known.setdefault("reasons", [])
        known.setdefault("candidates", [known["batch_size"]])
        known.setdefault("tolerance", 0.0)
        for name in _EVIDENCE_LISTS:  # an older file's missing (or null) list: empty
            known[name] = list(known.get(name) or [])
        return cls(**known, extra=extra)


# the recommendation's evidence fields, in results.json's order; those that are lists
_EVIDENCE_KEYS = ("intervals", "tied", "non_inferior", "reference_batch_size", "selection", "flags", "decision_rule",
                  "decision_target", "holds_for", "long_horizon", "critical_batch", "noise_scale",
                  "precision_advice", "recipe")
_EVIDENCE_LISTS = ("intervals", "tied", "non_inferior", "flags")
_NOT_CORE = frozenset(_EVIDENCE_KEYS) | {"extra"}


def _flat(data: Mapping[str, Any]) -> dict[str, Any]:
    """results.json's dict, copied, with ``tune``'s stage results at the top level whether they came inline or
    under ``"tune"`` (an inline value wins)."""
    out = dict(data)
    nested = out.get("tune")
    if isinstance(nested, Mapping):
        for key, value in nested.items():
            if out.get(key) is None:
                out[key] = value
    return out


def _sweep_of(data: Mapping[str, Any]) -> SweepResult:
    """A results.json dict's :class:`SweepResult` (a dict without a workload name is read as workload ``None``)."""
    return SweepResult.from_dict({**data, "workload": data.get("workload")})


def _mapping(value: Any) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


_STAGE_KEYS = ("find", "noise", "step_time", "train_budget")  # tune's stage results Measurements reads typed


def _stage_type(key: str) -> tuple[type, bool]:
    """The type of tune's stage result ``key`` and whether a key its dict lacks is read as ``None`` (the finder's
    and the noise probe's ``from_dict`` need every field; the others read their own defaults)."""
    if key == "find":
        from batchfit.finder import FindResult

        return FindResult, True
    if key == "noise":
        from batchfit.noise import NoiseResult

        return NoiseResult, True
    if key == "step_time":
        from batchfit.steptime import StepTimeCalibration

        return StepTimeCalibration, False
    from batchfit.cost import TrainBudgetPlan

    return TrainBudgetPlan, False


def _stage(key: str, value: Any) -> Any:
    """tune's stage result ``key`` (``find``, ``noise``, ``step_time`` or ``train_budget``) typed: as it is when it
    is typed already; ``None`` for no result (``None``, an empty dict or not a dict, as the dict code read them);
    else its type's ``from_dict``, every other key kept in its ``extras``. A key an older results.json lacks reads as
    ``None``, as ``.get`` read it (not the type's default: a finder result without ``margin`` names no margin)."""
    cls, absent_none = _stage_type(key)
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping) or not value:
        return None
    data = {**{f.name: None for f in fields(cls) if f.name != "extras"}, **value} if absent_none else dict(value)
    try:
        return cls.from_dict(data)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"results: {key} is not what batchfit writes there ({' '.join(str(exc).split())[:120]})"
                          ) from exc


@dataclass(frozen=True)
class Measurements:
    """What the recommendation and the report read, typed: the sweep's :class:`batchfit.study.SweepResult` (its
    :class:`batchfit.study.TrialSummary` trials) and, beside it, what ``tune`` measured — the finder's result, the
    noise probe's, the LR check (:class:`batchfit.decide.LRCheck`), the precision check
    (:class:`batchfit.decide.PrecisionCheck`), the step-time calibration and the train budget.

    :meth:`of` is the one entry point: a ``SweepResult`` (``load_results``), ``tune``'s ``TuneResult`` or their
    dict form (results.json) is read once, here. ``to_dict()`` is the results.json form it was read from, unchanged
    (JSON output keeps every key it had)."""

    sweep: SweepResult
    metric: Metric
    find: FindResult | None = None
    noise: NoiseResult | None = None
    lr_check: LRCheck | None = None
    precision_check: PrecisionCheck = field(default_factory=PrecisionCheck)
    step_time: StepTimeCalibration | None = None
    train_budget: TrainBudgetPlan | None = None  # tune's plan: the train budget's samples, the trials', the cap
    framework: str | None = None
    batch_form: dict[str, Any] | None = None
    tolerance: float | None = None  # the margin stored with the results (tune's), None: not stored
    world_size: int = 1
    parallel: str | None = None
    source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def trials(self) -> tuple[TrialSummary, ...]:
        return self.sweep.trials

    def to_dict(self) -> dict[str, Any]:
        """The results.json form (a copy of what :meth:`of` read)."""
        return dict(self.source)

    @classmethod
    def of(cls, results: Any) -> Measurements:
        """``results`` typed: a ``Measurements`` as it is, a ``SweepResult``, ``tune``'s ``TuneResult`` (read by
        attribute: it lives a layer above) or their dict form (results.json; ``tune``'s stages inline or under
        ``"tune"``)."""
        if isinstance(results, Measurements):
            return results
        if isinstance(results, SweepResult):
            return cls._read(results, _flat(results.to_dict()))
        if hasattr(results, "sweep") and hasattr(results, "lr_check"):  # batchfit.tuning.TuneResult
            return cls._of_tune(results)
        if isinstance(results, Mapping):
            data = _flat(results)
            return cls._read(_sweep_of(data), data)
        raise ConfigError(f"results must be a SweepResult, a TuneResult or their dict form (results.json), got "
                          f"{type(results).__name__}")

    @classmethod
    def _read(cls, sweep: SweepResult, data: dict[str, Any], stages: Mapping[str, Any] | None = None
              ) -> Measurements:
        """``stages``: tune's stage results (``find``, ``noise``, ``step_time``, ``train_budget``) to read instead
        of ``data``'s, typed or dicts; each is read here, once (:func:`_stage`)."""
        name = data.get("primary_metric") or "val_loss"
        staged = {k: _stage(k, (data if stages is None else stages).get(k)) for k in _STAGE_KEYS}
        check = data.get("precision_check")
        if not isinstance(check, PrecisionCheck):
            check = PrecisionCheck.from_dict(check if isinstance(check, Mapping) else {})
        return cls(
            sweep=sweep,
            metric=Metric(str(name), bool(data.get("higher_is_better", name not in ("val_loss", "train_loss")))),
            lr_check=LRCheck.of(_mapping(data.get("lr_calibration"))), precision_check=check, **staged,
            framework=data.get("framework"), batch_form=_mapping(data.get("batch_form")),
            tolerance=_number(data.get("tolerance")), world_size=int(data.get("world_size") or 1),
            parallel=data.get("parallel"), source=data)

    @classmethod
    def _of_tune(cls, tuned: Any) -> Measurements:
        """A ``TuneResult``: its sweep and its stage results (typed as they are, or dicts read once); its
        ``to_dict()`` for the JSON."""
        sweep = tuned.sweep if isinstance(tuned.sweep, SweepResult) else _sweep_of(_flat(tuned.sweep))
        base = cls._read(sweep, _flat(tuned.to_dict()), {k: getattr(tuned, k) for k in _STAGE_KEYS})
        return replace(base, lr_check=LRCheck.of(tuned.lr_check),
                       precision_check=tuned.precision_check or PrecisionCheck(),
                       framework=tuned.framework, batch_form=_mapping(tuned.batch_form),
                       tolerance=_number(tuned.tolerance) if tuned.tolerance is not None else base.tolerance)


def metric_of(results: Any) -> Metric:
    """The metric the sweep ranked on (``train_loss`` when the workload has no validation data). ``results``:
    :class:`Measurements`, a ``SweepResult`` or the results.json dict (only its two metric keys are read)."""
    if isinstance(results, Measurements):
        return results.metric
    if isinstance(results, SweepResult):
        return results.metric
    name = results.get("primary_metric") or "val_loss"
    return Metric(str(name), bool(results.get("higher_is_better", name not in ("val_loss", "train_loss"))))


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}"


def within_tolerance(value: float, best: float, tolerance: float, higher_is_better: bool) -> bool:
    """Is ``value`` within a relative ``tolerance`` of ``best``?"""
    slack = tolerance * abs(best)
    return value >= best - slack if higher_is_better else value <= best + slack


def _micro_batch(batch: int, trained: int | None, find: FindResult | None) -> tuple[int, int, str]:
    """``trained``: the micro-batch the sweep trained ``batch`` with (used without a finder result)."""
    if find is None or not find.recommended_batch_size:
        micro = int(trained or batch)
        acc = math.ceil(batch / micro)
        return micro, acc, (
            f"Micro-batch {micro} x {acc} accumulation step(s): no finder result was available, so this is the "
            f"micro-batch the sweep trained batch {batch} with."
        )
    fits = int(find.recommended_batch_size)
    knee = find.throughput_knee_batch_size
    margin = find.margin
    margin_txt = f" with {margin:.0%} headroom" if isinstance(margin, (int, float)) else " with the safety margin"
    if knee and int(knee) <= fits:
        cap = int(knee)
        why = (f"the finder's throughput knee is {cap} (the smallest batch within 5 % of the best measured "
               f"samples/s) and memory is plentiful (up to {fits} fits{margin_txt})")
    else:
        cap = fits
        why = f"the largest micro-batch that fits in memory{margin_txt} is {fits}"
    if batch <= cap:
        return batch, 1, f"Micro-batch {batch} x 1 accumulation step: {why}, so the whole batch runs in one pass."
    acc = math.ceil(batch / cap)
    micro = math.ceil(batch / acc)
    acc = math.ceil(batch / micro)
    return micro, acc, (
        f"Micro-batch {micro} x {acc} accumulation steps = effective batch {batch}: {why}, so gradient "
        "accumulation makes up the rest."
    )


def _loss_ok(base: PrecisionRun, low: PrecisionRun) -> bool:
    loss_base, loss_low = finite_or_none(base.train_loss), finite_or_none(low.train_loss)
    return (loss_base is not None and loss_low is not None
            and loss_low <= loss_base * (1 + _PRECISION_LOSS_TOLERANCE) + 1e-12)


def _precision(measured_: Measurements, batch: int, find: FindResult | None
               ) -> tuple[str, str, dict[str, Any] | None]:
    """The precision and its reason: :func:`batchfit.decide.advise_precision` on the check's repeated, interleaved
    step timings (a speed-up must exclude 1) and on memory only where it binds."""
    measured = measured_.sweep.precision or "fp32"
    check = measured_.precision_check
    low_name = "bf16"
    base, low = check.fp32, check.run(low_name)
    if base is None or low is None:
        return measured, (
            f"Precision {measured}: only {measured} was measured"
            + (f" ({check.note})" if check.note else "")
            + "; bf16 is not recommended without a measurement showing it saves time or memory here."
        ), None
    if not (low.ok and base.ok):
        return measured, (
            f"Precision {measured}: the bf16 check run did not finish cleanly ({low.status or None}), so keep "
            f"{measured}."
        ), None
    times_base, times_low = base.timings(), low.timings()
    if not (times_base and times_low):  # an older check: one throughput reading per precision
        sp_base, sp_low = finite_or_none(base.samples_per_s), finite_or_none(low.samples_per_s)
        if sp_base and sp_low:
            times_base, times_low = [1.0 / sp_base], [1.0 / sp_low]
    mem_base, mem_low = finite_or_none(base.peak_memory_bytes), finite_or_none(low.peak_memory_bytes)
    fits = (find.recommended_batch_size or find.max_batch_size) if find is not None else None
    advice = advise_precision(
        times_base, times_low, low=low_name, fp32_max_micro_batch=int(fits) if fits else None, effective_batch=batch,
        knee=find.throughput_knee_batch_size if find is not None else None,
        memory_ratio=mem_low / mem_base if mem_base and mem_low else None, loss_ok=_loss_ok(base, low))
    n = min(len(times_base), len(times_low))
    timing = (f"{n} interleaved timing(s) per precision" if n > 1 else
              "one timing per precision, so no speed-up can be shown beyond the noise")
    loss = f"train loss {_fmt(finite_or_none(low.train_loss))} vs {_fmt(finite_or_none(base.train_loss))}"
    return advice.precision, f"Precision {advice.precision}: {advice.reason} ({timing}; {loss}).", advice.to_dict()


def _metric_label(metric: Metric) -> str:
    return "training loss" if metric.name == "train_loss" else metric.name


DECISION_RULE = (
    "Every batch size's {metric} (a trial's: the mean of its last 3 evaluations) is read from one quadratic curve in "
    "log2(batch) fitted over every seed with seed effects (per-batch means on paired seeds where the curve does not "
    "fit); the curve's best batch size is the reference, and each other one's difference from it gets simultaneous "
    "one-sided 95 % bounds (max-t over all comparisons, Dunnett/Hsu; the level split over racing's rounds); it is "
    "non-inferior when its lower bound lies within the tolerance of the reference. Among the reference and the "
    "non-inferior ones, the batch sizes whose time to target (steps from the S(B) fit over every batch size and seed "
    "x seconds per step from interleaved timing rounds) overlaps the least estimate's interval are equal on time "
    "within the noise, and the largest of them is chosen. Without non-inferiority evidence the reference is "
    "chosen: less data never picks a larger batch. The target is the sweep's fraction of the best "
    "configuration's seed-mean {metric}, crossed on each trial's raw curve (interpolated), and a batch size must "
    "reach it in every seed."
)


def decision_trials(results: Any) -> list[TrialSummary]:
    """Every trial (all LRs and seeds) the decision pools: the sweep's, else (none finished) its best per batch."""
    measured = Measurements.of(results)
    rows = list(measured.sweep.trials)
    if not any(t.status == "ok" for t in rows):
        rows = list(measured.sweep.best_per_batch)
    return rows


def critical_interval(results: Any, *, seed: int = 0) -> CriticalBatchInterval | None:
    """B_crit with its bootstrap interval (:func:`batchfit.decide.critical_from_trials`, the fit the decision
    uses). ``results``: :class:`Measurements` or what :meth:`Measurements.of` reads."""
    return critical_from_trials(list(Measurements.of(results).sweep.trials), seed=seed)


def _span(sizes: Sequence[int], tried: Sequence[int]) -> str:
    """``16-512`` when the sizes are every tried size in that range, else ``16, 64, 512``."""
    sizes = sorted(sizes)
    inside = [b for b in tried if sizes[0] <= b <= sizes[-1]]
    if len(sizes) > 2 and list(inside) == sizes:
        return f"{sizes[0]}\u2013{sizes[-1]}"
    return ", ".join(map(str, sizes))


def _ratio(slow: Interval, fast: Interval) -> Interval:
    """``slow / fast`` for positive quantities; relative half-widths add in quadrature (log-scale delta method)."""
    est = slow.estimate / fast.estimate
    if not (slow.known and fast.known) or slow.estimate <= 0 or fast.estimate <= 0:
        return Interval(est, None, None, slow.level, "ratio", min(slow.n, fast.n))
    r = math.hypot((slow.high - slow.low) / (2 * slow.estimate),  # type: ignore[operator]
                   (fast.high - fast.low) / (2 * fast.estimate))  # type: ignore[operator]
    return Interval(est, est * math.exp(-r), est * math.exp(r), slow.level, "ratio", min(slow.n, fast.n))


def step_time_intervals(results: Measurements | Mapping[str, Any]) -> dict[int, Interval] | None:
    """tune's step-time calibration (:mod:`batchfit.steptime`) as batch size -> seconds per step, if it ran
    (``results``: :class:`Measurements`, or a dict with its ``"step_time"``, read as :meth:`Measurements.of` reads
    it)."""
    cal = results.step_time if isinstance(results, Measurements) else _stage("step_time", results.get("step_time"))
    if cal is None or not cal.seconds:
        return None
    return cal.intervals() or None


def decide_results(results: Any, tolerance: float, metric: Metric | None = None, *,
                   crit: CriticalBatchInterval | None = None) -> Decision | None:
    """:func:`batchfit.decide.decide` on the results with everything it takes from them (trials, B_crit, the LR
    check, tune's step-time calibration, the target): the one call the recommendation and tune's racing share, so
    racing stops on the decision the recommendation then makes. ``results``: :class:`Measurements` or what
    :meth:`Measurements.of` reads. ``crit``: :func:`critical_interval` of ``results`` when the caller already has it
    (``None``: :func:`batchfit.decide.decide` fits it, at its own target, from the same trials)."""
    measured = Measurements.of(results)
    return decide(decision_trials(measured), metric or measured.metric, b_crit=crit,
                  lr_calibration=measured.lr_check, tolerance=tolerance,
                  step_time=step_time_intervals(measured), target=measured.sweep.target)


def _budget_text(budget: Any) -> str | None:
    if isinstance(budget, Mapping) and budget.get("kind") and budget.get("value") is not None:
        v = budget["value"]
        return f"{budget['kind']}:{v:g}" if isinstance(v, (int, float)) else f"{budget['kind']}:{v}"
    return str(budget) if isinstance(budget, str) and budget else None


def holds_for(results: Measurements, decision: Decision, metric: Metric) -> dict[str, Any]:
    """What the answer is for: the budget every candidate trained and the target its time was measured to. The
    critical batch grows with both (McCandlish et al. 2018: B_crit rises as the loss falls; Zhang et al. 2024: with
    the data seen), so a longer run or a stricter target can move the best batch up; the sentence says so."""
    budget = _budget_text(results.sweep.budget)
    label = _metric_label(metric)
    tgt = results.sweep.target if isinstance(results.sweep.target, Mapping) else {}
    target = decision.target if decision.target is not None else finite_or_none(tgt.get("value"))
    frac = tgt.get("fraction") if isinstance(tgt, Mapping) else None
    parts = []
    if budget:
        parts.append(f"a budget of {budget} per run")
    if target is not None:
        parts.append(f"the target {label} {_fmt(target)}" + (f" ({frac:.0%} of the best configuration's seed mean)"
                                                            if isinstance(frac, (int, float)) else ""))
    text = ("It holds for " + " and ".join(parts) + ": the best batch grows with the budget and the target (the "
            "critical batch rises as training goes on), so a longer run or a stricter target may favour a larger "
            "batch." if parts else "")
    return {"budget": budget, "target": target, "target_fraction": frac, "metric": metric.name, "text": text}


def _long_horizon_move(decision: Decision, longer: Any) -> int | None:
    """The batch size to train the whole budget with when the extrapolation allows a faster one than the short
    choice: among the batch sizes tried below the lower end of ``B_max(T)``, the least time per sample, taken only
    when its interval lies below the short choice's (a timing difference inside its noise decides nothing). None
    when the extrapolation offers no batch (``longer.batch``: none fits, or it is not acted on, e.g. far)."""
    if longer.batch is None:
        return None

    def per_sample(b: int) -> Interval | None:
        iv = decision.evidence[b].seconds_per_step
        return iv.scaled(1.0 / b) if iv is not None and iv.known else None

    short = decision.batch_size
    ok = [b for b in sorted(decision.evidence) if b <= longer.b_max.low and per_sample(b) is not None]
    if not ok or per_sample(short) is None:
        return None
    best = min(ok, key=lambda b: (per_sample(b).estimate, -b))  # type: ignore[union-attr]
    if best == short or not per_sample(best).high < per_sample(short).low:  # type: ignore[union-attr,operator]
        return None
    return best


def _plan_samples(results: Measurements) -> tuple[Any, Any]:
    """``(samples of one run at the train budget, samples each trial measured)`` from tune's plan (``None`` each
    without one; as stored: the callers check that they are numbers)."""
    plan = results.train_budget
    return (plan.samples, plan.measurement_samples) if plan is not None else (None, None)


def long_horizon_of(results: Measurements, decision: Decision, metric: Metric) -> Any:
    """:func:`batchfit.horizon.long_horizon` when the trials were measured short of the train budget (``None``
    otherwise): the extrapolation of the trade-off to the whole run."""
    total, measured = _plan_samples(results)
    if not (isinstance(total, (int, float)) and isinstance(measured, (int, float)) and measured < 0.99 * total):
        return None
    from batchfit.horizon import long_horizon

    ref = decision.evidence[decision.reference]
    trials = [t for e in decision.evidence.values() for t in e.trials]
    delta = decision.tolerance * abs(ref.quality.estimate)
    return long_horizon(trials, metric, reference_batch=decision.reference, reference_multiplier=ref.lr_multiplier,
                        train_samples=int(total), tolerance=delta, candidates=sorted(decision.evidence))


NOTHING_TRAINED_DROP = 0.05  # a loss that fell less than this (relative) from the first evaluation did not train


def _nothing_trained(decision: Decision) -> str | None:
    """``"budget too short to tell batch sizes apart: ..."`` when no candidate's loss (validation, else training;
    seed mean) fell more than :data:`NOTHING_TRAINED_DROP` from its first evaluation to its last: nothing trained,
    so every quality compared is the starting point's noise (examples/text_dict at 6 % of its run: losses
    0.719 -> 0.693 = ln 2, accuracy 0.50-0.55, on a binary task)."""
    val, train = Metric("val_loss", False), Metric("train_loss", False)
    drops: dict[int, list[float]] = {}  # per batch size: each seed's relative fall
    for b, ev in decision.evidence.items():
        for t in ev.trials:
            loss = val if any(val.of_record(r) is not None for r in t.history) else train
            vals = [v for r in t.history if (v := loss.of_record(r)) is not None]
            if len(vals) >= 2 and vals[0] > 0:
                drops.setdefault(b, []).append((vals[0] - vals[-1]) / vals[0])
    mean = {b: sum(d) / len(d) for b, d in drops.items()}
    if not mean or max(mean.values()) >= NOTHING_TRAINED_DROP:
        return None
    best = max(mean, key=lambda b: mean[b])
    seeds = (f" over {len(drops[best])} seeds, {min(drops[best]):.1%} to {max(drops[best]):.1%}"
             if len(drops[best]) > 1 else "")
    return (f"budget too short to tell batch sizes apart: no candidate's loss fell more than "
            f"{NOTHING_TRAINED_DROP:.0%} from its first evaluation (the most: batch {best}, {mean[best]:.1%}{seeds}), "
            "so little or nothing trained and the differences may all be the starting point's noise")


LONGER_HORIZON = 4.0  # the next horizon a budget that could not tell the candidates apart suggests, x the last


def _longer_horizon_hint(cost: Any, measured: Any, total: Any) -> str:
    """``"; measuring each candidate on N samples (xK) needs about --max-cost C"``: the budget to try next when the
    measured horizon could not tell the candidates apart, :data:`LONGER_HORIZON` x it (at most the train budget).
    tune sizes every stage's share in proportion to the cap, so the horizon per candidate grows with it: the cap
    that gives K x the horizon is about K x this one (an estimate, stated as one). Without a cap (``--budget``
    given), the per-trial budget itself."""
    if not isinstance(measured, (int, float)) or measured <= 0:
        return ""
    target = int(LONGER_HORIZON * measured)
    if isinstance(total, (int, float)) and total > 0:
        target = min(target, int(total))
    k = target / measured
    if k <= 1.0:
        return ""
    if isinstance(cost.max_cost, (int, float)) and cost.max_cost > 0:
        return (f"; measuring each candidate on {target:,} samples (x{k:.3g} this horizon) needs about --max-cost "
                f"{cost.max_cost * k:.2g} (cost grows with the horizon per candidate; whether the model trains by then "
                "is not measured: on examples/text_dict it did not, at the rule's LR)")
    return f"; measure each candidate on a longer horizon, e.g. --budget samples:{target}"


def budget_flags(results: Measurements, decision: Decision, untrained: str | None = None) -> list[str]:
    """What the budgets say about the answer (issue 18): measured short of the train budget, an equal-steps
    comparison, nothing trained (``untrained``: :func:`_nothing_trained`'s finding, computed once by the caller),
    too short a budget to fit S(B), a cost past the cap."""
    flags: list[str] = []
    total, measured = _plan_samples(results)
    short = isinstance(total, (int, float)) and isinstance(measured, (int, float)) and measured < 0.99 * total
    if short:
        train = results.train_budget.budget if results.train_budget is not None else None
        flags.append(f"short horizon: each candidate was measured on {measured:,} samples, {measured / total:.0%} of "
                     f"the train budget {train}; short measurements favour small batches (the critical "
                     "batch grows as training goes on), so the best batch for the whole run may be larger")
    budget = results.sweep.budget
    trials = [t for t in results.trials if t.status == "ok"]
    if isinstance(budget, Mapping) and budget.get("kind") == "steps" and trials:
        lo, hi = min(t.batch_size for t in trials), max(t.batch_size for t in trials)
        if hi > lo:
            flags.append(f"equal-steps budget: batch {hi} trained {hi // lo}x the samples of batch {lo}, so part of "
                         "any quality difference is a data difference; compare at equal samples (epochs:E or "
                         "samples:N)")
    from batchfit.cost import cost_of

    cost = cost_of(results.to_dict())  # batchfit.cost reads the results.json form
    if untrained is not None:
        flags.append(untrained + _longer_horizon_hint(cost, measured, total))
    tied, tried = set(decision.choice.tied), set(decision.evidence)
    if untrained is None and short and len(tried) >= 3 and tied >= tried:
        flags.append(f"every batch size tried ({min(tried)}-{max(tried)}) is within the tolerance of the best at "
                     f"{measured:,} samples, so this horizon cannot tell them apart and the choice among them is "
                     "by speed alone; they may separate later in the run" + _longer_horizon_hint(cost, measured, total))
    reached = {t.batch_size for e in decision.evidence.values() for t in e.trials
               if finite_or_none(t.steps_to_target) is not None}
    if len(decision.evidence) >= 3 and len(reached) < 3 and isinstance(measured, (int, float)):
        flags.append(f"budget too short: only {len(reached)} batch size(s) reached the target, too few to fit "
                     f"S(B); a per-trial budget of about samples:{int(4 * measured)} would show the trade-off")
    if cost.within_cap is False:
        flags.append(f"over the cost cap: spent {cost.runs:.2f} runs of the train budget, cap {cost.max_cost:g}")
    return flags


def micro_batch_for(batch: int, find: FindResult | Mapping[str, Any] | None, limit: int | None = None) -> int:
    """The micro-batch the recommendation would give effective batch ``batch`` (the finder's knee or largest
    fitting micro-batch; without a finder result, ``min(batch, limit)``). ``find``: the finder's result or its dict
    form."""
    return _micro_batch(batch, min(batch, limit or batch), _stage("find", find))[0]


def _best_trial(trials: Sequence[TrialSummary], metric: Metric) -> TrialSummary:
    """The trial (seed) of one batch size with the best quality: the one whose LR and settings are recommended."""
    return max(trials, key=lambda t: metric.sort_key(quality_of_trial(t, metric)))


def _pick_batch(results: Measurements, metric: Metric, tolerance: float,
                crit: CriticalBatchInterval | None) -> tuple[Decision, TrialSummary, str]:
    """The batch, by :func:`batchfit.decide.decide`: ties on quality broken on fitted time to target."""
    decision = decide_results(results, tolerance, metric, crit=crit)
    if decision is None:
        what = "training-loss" if metric.name == "train_loss" else "validation"
        raise ConfigError(
            f"no finished trial with a {what} result to recommend from; run or resume the sweep "
            "(batchfit sweep / batchfit tune) until at least one trial finishes"
        )
    label = _metric_label(metric)
    batch, ev = decision.batch_size, decision.evidence
    chosen = ev[batch]
    pick = _best_trial(chosen.trials, metric)
    tried = sorted(ev)
    tied = sorted(decision.choice.tied)
    seeds = chosen.seeds
    seeds_txt = f"{seeds} seeds" if seeds > 1 else "one seed"
    q = chosen.quality
    ref = decision.reference
    tol = f"{decision.tolerance:.2%}"
    undecided = [] if decision.selection is None else sorted(decision.selection.undecided)
    if len(tied) == 1:
        why = f"Effective batch {batch}: the best {label} estimate, {q} ({seeds_txt})"
        if len(tried) > 1:
            why += f"; no other batch size was shown non-inferior to it within {tol}"
            if undecided:
                why += (f" ({_span(undecided, tried)} undecided at this number of seeds: the data cannot place them "
                        "yet, so they are not chosen)")
            worse = [b for b in tried if b != batch and b not in undecided]
            if worse:
                why += f"; {_span(worse, tried)} worse beyond the tolerance"
        return decision, pick, why + "."
    head = (f"Effective batch {batch}: batch sizes {_span(tied, tried)} are non-inferior to batch {ref} (the best "
            f"{label}, {ev[ref].quality}): on the seeds they share, each one's 95 % lower bound on its difference lies "
            f"within {tol} of it")
    timed = {b: ev[b].time_to_target for b in tied if ev[b].time_to_target is not None}
    if batch not in timed:
        return decision, pick, head + (f"; none of them reached the target within its budget, so the best {label} "
                                       f"estimate decides: {batch}." if not timed else
                                       f"; none of them reached the target within its budget (only other batch "
                                       f"sizes did), so the stated tie-break decides: {batch}.")
    missed = sorted(b for b in tied if b not in timed)
    slowest = max(timed, key=lambda b: timed[b].estimate)  # type: ignore[union-attr]
    ratio = _ratio(timed[slowest], timed[batch])  # type: ignore[arg-type]
    ratio_txt = (f"{ratio.estimate:.2g}x faster than {slowest}" + (
        f" (interval {ratio.low:.2g}-{ratio.high:.2g})" if ratio.known else " (interval unknown: one seed)")
        if slowest != batch else "the only non-inferior batch size that reached the target")
    details = decision.choice.details or {}
    time_tied = details.get("time_tied") or []
    if len(time_tied) > 1:
        ratio_txt += (f"; {_span([b for b in time_tied if b != batch], tried)} are equal to it on time within the "
                      "noise (a difference inside the timing noise decides nothing: the largest of them is taken)")
    if missed and slowest != batch:
        ratio_txt += "; " + ", ".join(f"{b} ({ev[b].seeds_reached} of {ev[b].seeds} seeds)" if ev[b].seeds_reached
                                      else str(b) for b in missed) + " did not reach the target in every seed " \
                                                                     "within the budget"
    t = timed[batch]
    goal = "" if decision.target is None else f" ({label} {_fmt(decision.target)})"
    how = f"{t.estimate:.3g} s to the target{goal}" + (f" [{t.low:.3g}, {t.high:.3g}]" if t.known else "")  # type: ignore
    verdict = ("its time advantage is beyond the noise" if decision.choice.cost_separated else
               "its time advantage over some non-inferior sizes is inside the noise: the stated rule (the largest of "
               "those equal on time) decides, not a measured win")
    return decision, pick, (f"{head}; chosen on time to target: {batch}, {ratio_txt}; {how}, {verdict}.")


# said wherever the winning trial's LR rule was outside its range: its betas are not the rule's values
OUTSIDE_RANGE = "outside the rule's range: the betas are part of the recipe"


def _rule_range(pick: TrialSummary) -> tuple[bool, list[str]]:
    """Whether the winning trial's LR rule was outside its range, and the notes saying which value and why.

    From the trial's recorded ``lr_scaling``; a trial recorded before it (adam-sqrt then clipped a negative beta1
    to 0) counts as outside when it trained adam-sqrt with beta1 0."""
    scaling = pick.lr_scaling
    if isinstance(scaling, Mapping):
        return bool(scaling.get("outside_range")), [str(n) for n in scaling.get("notes") or []]
    opt = pick.optimizer
    betas = opt.get("betas") if isinstance(opt, Mapping) else None
    if pick.lr_rule == "adam-sqrt" and isinstance(betas, (list, tuple)) and betas and betas[0] == 0:
        return True, ["beta1 0: this trial was scaled before batchfit held beta1 inside the rule's range, so its "
                      "beta1 is the rule's negative value clipped to 0"]
    return False, []


def _lr_reason(results: Measurements, pick: TrialSummary, metric: Metric) -> tuple[float, str]:
    batch, lr = pick.batch_size, float(pick.lr)  # type: ignore[arg-type]  # a finished trial has its LR
    mult = pick.lr_multiplier
    n_lrs = len({t.lr for t in results.trials if t.batch_size == batch}) or 1
    rule = pick.lr_rule or results.sweep.lr_rule or "auto"
    mult_txt = "" if mult in (None, 1, 1.0) else f" x{mult:g}"
    cal = results.lr_check
    cal_txt = ""
    if cal is not None and cal.moved:
        cal_txt = (f"; the base LR was first moved from {cal.base_lr:.3g} to {cal.lr:.3g} by the LR check "
                   f"(runs at batch {cal.batch_size}, where it scored better on {cal.metric or metric.name})")
    if cal is not None and cal.lr_interval and cal.lr:
        # the check's interval is in the base LR's terms; at this batch it moves with the rule, as the LR did
        scale = lr / (cal.lr * float(mult or 1.0))
        low, high = (x * scale for x in cal.lr_interval)
        sides = " and ".join(f"at the {end}" for end in cal.open_ends)
        cal_txt += (f"; the LR check puts the whole run's best LR at this batch in [{low:.3g}, {high:.3g}]"
                    + (f", open {sides} (the LRs tied with its best reached the edge of those it tried)"
                       if sides else ""))
    outside = f"; {OUTSIDE_RANGE}" if _rule_range(pick)[0] else ""
    return lr, (
        f"LR {lr:.4g}: the {rule}-rule LR for batch {batch}{mult_txt}"
        + (f", the best of {n_lrs} learning rates tried at this batch" if n_lrs > 1 else "")
        + f" ({_metric_label(metric)} {_fmt(metric.of_trial(pick))}){cal_txt}{outside}."
    )


def _warmup_reason(results: Measurements, pick: TrialSummary, lr: float) -> tuple[int, str]:
    warmup_steps = _warmup_steps(results, pick)
    batch = pick.batch_size
    diverged_higher = [t for t in results.trials
                       if t.batch_size == batch and t.status == "diverged" and float(t.lr or 0) > lr]
    own = (results.batch_form or {}).get("schedule_warmup")
    if isinstance(own, (int, float)) and own > 0 and not warmup_steps:  # the user's schedule ramps up itself
        text = (f"Warm-up: your lr_schedule ({pick.lr_schedule or 'its own'}) ramps the LR up over its first "
                f"{own:.0%} of the run, and batchfit added none on top ({pick.steps} steps in all, trained "
                "stably)")
    else:
        text = (f"Warm-up {warmup_steps} step(s): the winning trial trained stably with it ({pick.steps} "
                "steps in all)")
    if diverged_higher:
        text += f"; {len(diverged_higher)} larger LR(s) at this batch diverged, so do not raise the LR"
    return warmup_steps, text + "."


def _context_reason(results: Measurements, batch: int, boot: CriticalBatchInterval | None,
                    noise: Mapping[str, Any] | None = None) -> str | None:
    """B_crit, and where the batch lies against it (or, without B_crit, against B_simple at the decision's target
    loss, ``noise`` from :func:`noise_scale_summary`: never the probe's value at initialisation)."""
    crit = results.sweep.critical_batch_size or {}
    b_crit = finite_or_none(crit.get("b_crit"))
    at = (noise or {}).get("at_loss") or {}
    b_simple = finite_or_none((at.get("b_simple") or {}).get("estimate"))
    context = []
    if b_crit is not None:
        r2 = finite_or_none(crit.get("r2"))
        iv = ""
        if boot is not None and boot.b_crit.known:
            iv = f", 95 % interval {boot.b_crit.low:.3g}-{boot.b_crit.high:.3g}"
        if boot is not None:
            iv += f", supported by batch sizes {boot.support[0]}-{boot.support[1]}" + (
                "; extrapolated beyond them" if boot.extrapolated else "")
        context.append(f"the fitted critical batch B_crit is {b_crit:.3g}" + (f" (fit R^2 {r2:.2f}{iv})"
                                                                              if r2 is not None else
                                                                              (f" ({iv[2:]})" if iv else "")))
    elif b_simple is not None:
        context.append(f"B_simple at the target's training loss ({_fmt(at.get('train_loss'))}) is {b_simple:.3g}")
    if not context:
        return None
    ref = b_crit if b_crit is not None else b_simple
    side = "below" if batch < ref else "at or above"  # type: ignore[operator]
    return ("Context: " + " and ".join(context) + f"; batch {batch} is {side} "
            + ("B_crit" if b_crit is not None else "B_simple")
            + " (above it, doubling the batch saves few steps; well below it, steps are noisy and cheap).")


def _center(values: Sequence[float]) -> float:
    """The geometric mean of positive values (losses over seeds), else the mean."""
    if all(v > 0 for v in values):
        return math.exp(sum(math.log(v) for v in values) / len(values))
    return sum(values) / len(values)


def _loss_at_step(trial: TrialSummary, step: Any) -> float | None:
    """The trial's training loss at ``step`` (steps to target are interpolated between evaluations): linear between
    the evaluation records around it; the first record's at or before it."""
    s = finite_or_none(step)
    pts = [(x, v) for r in trial.history or [] if isinstance(r, Mapping)
           if (x := finite_or_none(r.get("step"))) is not None
           and (v := finite_or_none(r.get("train_loss"))) is not None]
    if s is None or not pts:
        return None
    prev = None
    for x, v in pts:
        if x >= s:
            if prev is None or x == prev[0]:
                return v
            return prev[1] + (v - prev[1]) * (s - prev[0]) / (x - prev[0])
        prev = (x, v)
    return None  # past the last record: not recorded


def _final_train_loss(trial: TrialSummary) -> float | None:
    v = finite_or_none(trial.final_train_loss)
    if v is not None:
        return v
    hist = [r for r in trial.history or [] if isinstance(r, Mapping)]
    return finite_or_none(hist[-1].get("train_loss")) if hist else None


def target_train_loss(decision: Decision) -> tuple[float | None, str, str]:
    """The training loss at the decision's target: ``(loss, source, words)``.

    ``source`` ``"target"``: each seed of the chosen configuration's training loss at the step where it first meets
    the decision's target (the step its time to target is counted to; the loss interpolated between the evaluation
    records around it), their geometric mean over the seeds that reached it. ``"end_of_run"``: no seed reached it;
    the chosen configuration's training loss at the end of its run (its last evaluation), the geometric mean over its
    seeds. ``None``: neither recorded.
    """
    e = decision.evidence[decision.batch_size]
    label = _metric_label(decision.metric)
    goal = "" if decision.target is None else f" of {label} {_fmt(decision.target)}"
    at = [v for t in e.trials if (s := t.steps_to_target) is not None
          and (v := _loss_at_step(t, s)) is not None]
    if at:
        seeds = f"{len(at)} of {len(e.trials)} seeds, geometric mean" if len(e.trials) > 1 else "one seed"
        return _center(at), "target", (f"the training loss where the chosen configuration (batch "
                                       f"{decision.batch_size}) meets the decision's target{goal} ({seeds})")
    ends = [v for t in e.trials if (v := _final_train_loss(t)) is not None]
    if ends:
        return _center(ends), "end_of_run", (f"the chosen configuration's (batch {decision.batch_size}) training loss "
                                             f"at the end of its run (it did not meet the decision's target{goal}, "
                                             "so the loss there is not recorded)")
    return None, "", ""


def noise_scale_summary(results: Measurements, decision: Decision) -> dict[str, Any]:
    """B_simple against the training loss, pooled over every trial's evaluation records
    (:func:`batchfit.noise.b_simple_against_loss`), and at the decision's target loss
    (:func:`batchfit.noise.b_simple_at_loss`, :func:`target_train_loss`), with the chosen batch's ratio to it
    (:func:`batchfit.stats.quotient_interval`); the noise probe's value is kept apart as ``at_initialisation``."""
    from batchfit import noise as nz
    from batchfit.stats import quotient_interval

    records = nz.noise_records(results.trials)
    loss, source, words = target_train_loss(decision)
    at = nz.b_simple_at_loss(records, loss) if loss is not None else None
    ratio = quotient_interval(float(decision.batch_size), at.b_simple) if at is not None else None
    probe = results.noise
    init = None
    if probe is not None and finite_or_none(probe.b_simple) is not None:
        ci = [finite_or_none(x) for x in probe.b_simple_ci]  # its JSON form: an unbounded end is None
        init = {"b_simple": float(probe.b_simple), "b_simple_ci": ci if ci != [None, None] else None,
                "batch_size": probe.batch_size, "train_steps": probe.train_steps or 0}
    return {
        "train_loss": loss, "loss_source": source or None, "loss_words": words or None,
        "at_loss": at.to_dict() if at is not None else None,
        "noise_ratio": ratio.to_dict() if ratio is not None else None,
        "against_loss": [p.to_dict() for p in nz.b_simple_against_loss(records)],
        "records": len(records), "trials": len({r.trial for r in records}),
        "at_initialisation": init,
    }


def _iv_words(iv: Mapping[str, Any], fmt: str = ".3g") -> str:
    """A pooled B_simple in words; its JSON form writes an unbounded end or estimate as ``None`` (an unknown
    interval has both ends ``None``)."""
    est = finite_or_none(iv.get("estimate"))
    if est is None:
        return "unbounded (the |G|^2 estimate is <= 0: the gradient signal is below the noise)"
    low, high = iv.get("low"), iv.get("high")
    if low is None:
        return f"{est:{fmt}} (no interval: fewer than 3 trials near that loss)"
    return f"{est:{fmt}} [{format(low, fmt)}, {'inf' if high is None else format(high, fmt)}]"


def _noise_reason(noise: Mapping[str, Any], batch: int) -> str | None:
    """The recommendation's B_simple sentence: the pooled value at the stated training loss, the chosen batch's
    ratio to it, how it moves with the loss, and the probe's value labelled as measured at initialisation."""
    parts = []
    at = noise.get("at_loss")
    if at:
        iv = at["b_simple"]
        lo, hi = at["band"]
        ratio = noise.get("noise_ratio")
        ratio_txt = ""
        if ratio:
            r_iv = (f" [{ratio['low']:.2g}, {ratio['high']:.2g}]" if ratio.get("low") is not None
                    else " (no interval)")
            ratio_txt = f"; batch {batch} is {ratio['estimate']:.2g}x{r_iv} of it"
        parts.append(
            f"Gradient noise scale: B_simple {_iv_words(iv)} at training loss {_fmt(noise['train_loss'])}, "
            f"{noise['loss_words']}; pooled over the {at['records']} evaluation records of {at['trials']} trial(s) "
            f"with training loss {_fmt(lo, 3)}-{_fmt(hi, 3)} (tr(Sigma) and |G|^2 summed over their steps, then "
            f"divided; 95 % bootstrap over trials){ratio_txt}")
        curve = [p for p in noise.get("against_loss") or [] if finite_or_none(p["b_simple"].get("estimate"))]
        if len(curve) > 1:
            parts.append("against the training loss it reads " + ", ".join(
                f"{p['b_simple']['estimate']:.3g} at loss {_fmt(p['train_loss'], 3)}" for p in curve))
    elif noise.get("records"):
        parts.append("Gradient noise scale: too few evaluation records near the target's training loss "
                     f"({_fmt(noise.get('train_loss'))}) to pool B_simple there")
    init = noise.get("at_initialisation")
    if init:
        ci = init.get("b_simple_ci")
        ci_txt = (f" [{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}]" if isinstance(ci, (list, tuple)) and len(ci) == 2
                  and all(isinstance(x, (int, float)) for x in ci) else "")
        when = ("B_simple at initialisation" if not init.get("train_steps") else
                f"B_simple after {init['train_steps']} training steps")
        at_batch = f" (batch {init['batch_size']})" if init.get("batch_size") else ""
        what = ("measured before the loss fell, it is a floor of the noise scale later in training, not the "
                "critical batch" if not init.get("train_steps") else
                "measured at one point early in training, not at the target's loss, so not the critical batch")
        parts.append(f"the noise probe's {when} is {init['b_simple']:.3g}{ci_txt}{at_batch}: {what}")
    if not parts:
        return None
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------------------------------------------------------
# The recipe: every optimizer setting the winning trial used, and snippets to paste


_OPTIMIZER_KEYS = ("betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "amsgrad", "alpha",
                   "centered", "maximize", "lr_decay", "initial_accumulator_value", "rho", "decoupled_weight_decay")


def _py(value: Any) -> str:
    if isinstance(value, list):
        return "(" + ", ".join(_py(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def _pytorch_snippet(r: Mapping[str, Any]) -> str:
    opt = r.get("optimizer") or {}
    cls = opt.get("class") or "SGD"
    module = str(opt.get("module") or "torch.optim")
    qual = f"torch.optim.{cls}" if module.startswith("torch.optim") else f"{module}.{cls}"
    args = "".join(f", {k}={_py(opt[k])}" for k in _OPTIMIZER_KEYS if k in opt)
    make = (f"{qual}(model.parameters(), lr={r['lr']:.6g}{args})" if opt else
            f"make_optimizer(model.parameters(), lr={r['lr']:.6g})  # the workload's optimizer (not recorded)")
    world = int(r.get("world_size") or 1)
    lines = [
        "import torch",
        *([f"# {OUTSIDE_RANGE} (the {r.get('lr_rule')} rule does not give them at this batch)"]
          if r.get("outside_rule_range") else []),
        *(_ranks_preamble(r) if world > 1 else []),
        f"optimizer = {make}",
        f"loader = torch.utils.data.DataLoader(train_set, batch_size={r['micro_batch_size']}, shuffle=True, "
        "drop_last=True)" if world == 1 else
        f"loader = torch.utils.data.DataLoader(train_set, batch_size={r['micro_batch_size']}, drop_last=True, "
        "sampler=torch.utils.data.distributed.DistributedSampler(train_set, shuffle=True, drop_last=True))",
        f"accumulation = {r['accumulation_steps']}  # effective batch {r['batch_size']} = "
        f"{r['micro_batch_size']} x {r['accumulation_steps']}" + (f" x {world} ranks" if world > 1 else ""),
    ]
    if r.get("warmup_steps"):
        lines.append(f"scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / "
                     f"{r['warmup_steps']}))  # linear warm-up; multiply your own schedule on top")
    if r.get("lr_schedule"):
        stepped = "" if "stepped" in str(r["lr_schedule"]) else " after every optimizer step"  # Lightning: own
        lines.append(f"# the winning trial also stepped the workload's schedule ({r['lr_schedule']}){stepped}")
    form = r.get("batch_form") or {}
    if form.get("collate_fn"):  # the project's own collate, as the DataLoader above must get it
        lines[lines.index(next(x for x in lines if x.startswith("loader = ")))] = (
            f"loader = torch.utils.data.DataLoader(train_set, batch_size={r['micro_batch_size']}, shuffle=True, "
            f"drop_last=True, collate_fn=collate_fn)  # your {form['collate_fn']}")
    if form.get("mapping"):  # dict batches: the keyword forward, the loss from the output or the labels key
        lines += ["for i, batch in enumerate(loader):"]
        key = form.get("targets_key") or "labels"
        body = ("loss = model(**batch).loss / accumulation" if form.get("loss_from_output") else
                f"loss = loss_fn(model(**batch), batch[{key!r}]) / accumulation")
        device = "batch[next(iter(batch))].device.type"
    else:
        lines += ["for i, (x, y) in enumerate(loader):"]
        body = "loss = loss_fn(model(x), y) / accumulation"
        device = "x.device.type"
    if r.get("precision") == "bf16":
        lines += [f"    with torch.autocast(device_type={device}, dtype=torch.bfloat16):", f"        {body}"]
    else:
        lines.append(f"    {body}")
    lines += ["    loss.backward()", "    if (i + 1) % accumulation == 0:"]
    if r.get("grad_clip"):
        lines.append(f"        torch.nn.utils.clip_grad_norm_(model.parameters(), {r['grad_clip']:g})")
    lines.append("        optimizer.step()")
    if r.get("warmup_steps"):
        lines.append("        scheduler.step()")
    lines.append("        optimizer.zero_grad()")
    return "\n".join(lines)


def _ranks_preamble(r: Mapping[str, Any]) -> list[str]:
    """The lines a torchrun job adds: the launch, the process group and the wrapper the sweep trained with."""
    world = int(r["world_size"])
    lines = [f"# launch: torchrun --nproc-per-node {world} train.py (or --nnodes N x --nproc-per-node G = {world})",
             "torch.distributed.init_process_group()"]
    if r.get("parallel") == "fsdp":
        lines += ["from torch.distributed.fsdp import fully_shard",
                  "for block in blocks: fully_shard(block)  # each repeated block, then the root",
                  "fully_shard(model)  # micro-steps before the last: model.set_requires_gradient_sync(False)"]
    else:
        lines += ["model = torch.nn.parallel.DistributedDataParallel(model)  # micro-steps before the last: "
                  "with model.no_sync()"]
    return lines


def _hf_snippet(r: Mapping[str, Any]) -> str:
    """``TrainingArguments`` for a Trainer project: per-device batch, accumulation, LR, Adam's betas and epsilon,
    weight decay, warm-up, clipping, precision."""
    opt = r.get("optimizer") or {}
    args = [f"per_device_train_batch_size={r['micro_batch_size']}",
            f"gradient_accumulation_steps={r['accumulation_steps']}", f"learning_rate={r['lr']:.6g}"]
    betas = opt.get("betas")
    if isinstance(betas, list) and len(betas) == 2:
        args += [f"adam_beta1={betas[0]:.6g}", f"adam_beta2={betas[1]:.6g}"]
    if opt.get("eps") is not None:
        args.append(f"adam_epsilon={opt['eps']:.6g}")
    if opt.get("weight_decay") is not None:
        args.append(f"weight_decay={opt['weight_decay']:.6g}")
    if r.get("warmup_steps"):
        args.append(f"warmup_steps={r['warmup_steps']}")
    if r.get("grad_clip"):
        args.append(f"max_grad_norm={r['grad_clip']:g}")
    if r.get("precision") == "bf16":
        args.append("bf16=True")
    return "\n".join([
        "from transformers import TrainingArguments",
        *([f"# {OUTSIDE_RANGE}"] if r.get("outside_rule_range") else []),
        "args = TrainingArguments(",
        *(f"    {a}," for a in args),
        "    output_dir=...,  # and your other arguments",
        ")",
        f"# effective batch {r['batch_size']} = {r['micro_batch_size']} per device x {r['accumulation_steps']} "
        "accumulation x the number of devices (1 here)",
    ])


def _lightning_snippet(r: Mapping[str, Any]) -> str:
    opt = r.get("optimizer") or {}
    cls = opt.get("class") or "SGD"
    args = "".join(f", {k}={_py(opt[k])}" for k in _OPTIMIZER_KEYS if k in opt)
    clip = f", gradient_clip_val={r['grad_clip']:g}" if r.get("grad_clip") else ""
    prec = ', precision="bf16-mixed"' if r.get("precision") == "bf16" else ""
    return "\n".join([
        "def configure_optimizers(self):  # in your LightningModule",
        f"    return torch.optim.{cls}(self.parameters(), lr={r['lr']:.6g}{args})",
        f"train_loader = DataLoader(train_set, batch_size={r['micro_batch_size']}, shuffle=True, drop_last=True)",
        f"trainer = L.Trainer(accumulate_grad_batches={r['accumulation_steps']}{clip}{prec})",
        *([f"# warm-up: scale the LR by min(1, (step + 1) / {r['warmup_steps']}) over the first steps"]
          if r.get("warmup_steps") else []),
    ])


def _keras_snippet(r: Mapping[str, Any]) -> str:
    opt = r.get("optimizer") or {}
    cls = opt.get("class") or "SGD"
    names = {"eps": "epsilon", "weight_decay": "weight_decay", "momentum": "momentum", "nesterov": "nesterov",
             "amsgrad": "amsgrad"}
    args = [f"learning_rate={r['lr']:.6g}"]
    betas = opt.get("betas")
    if isinstance(betas, list) and len(betas) == 2:
        args += [f"beta_1={betas[0]:.6g}", f"beta_2={betas[1]:.6g}"]
    args += [f"{names[k]}={_py(opt[k])}" for k in names if opt.get(k) not in (None, 0, 0.0, False)]
    if r.get("grad_clip"):
        args.append(f"global_clipnorm={r['grad_clip']:g}")
    keras_cls = {"AdamW": "AdamW", "Adam": "Adam", "SGD": "SGD", "RMSprop": "RMSprop"}.get(cls, cls)
    return "\n".join([
        *(['keras.mixed_precision.set_global_policy("mixed_bfloat16")'] if r.get("precision") == "bf16" else []),
        f"model.compile(optimizer=keras.optimizers.{keras_cls}({', '.join(args)}), loss=loss, metrics=metrics)",
        f"model.fit(x, y, batch_size={r['batch_size']}, ...)  # effective batch {r['batch_size']}",
        *([f"# warm-up: {r['warmup_steps']} linear warm-up steps (a LearningRateSchedule)"]
          if r.get("warmup_steps") else []),
    ])


def recipe(pick: TrialSummary, *, batch: int, micro: int, acc: int, lr: float, warmup_steps: int,
           precision: str, framework: str | None = None, batch_form: Mapping[str, Any] | None = None,
           world_size: int = 1, parallel: str | None = None) -> dict[str, Any]:
    """Everything needed to reproduce the winning trial ``pick``: batch, accumulation, LR, every optimizer setting
    it used (read from its optimizer's param group), warm-up, schedule, clipping, precision; plus paste-ready
    snippets (PyTorch always; Lightning or Keras when the workload came from them)."""
    opt = pick.optimizer if isinstance(pick.optimizer, Mapping) else None
    out: dict[str, Any] = {
        "batch_size": batch, "micro_batch_size": micro, "accumulation_steps": acc, "lr": lr,
        "warmup_steps": warmup_steps, "precision": precision, "lr_rule": pick.lr_rule,
        "lr_schedule": pick.lr_schedule, "grad_clip": pick.grad_clip,
        "optimizer": dict(opt) if opt else None, "seed": pick.seed,
    }
    if world_size > 1:  # micro_batch_size is one rank's
        out.update(world_size=world_size, parallel=parallel or "ddp")
    outside, notes = _rule_range(pick)
    if isinstance(pick.lr_scaling, Mapping):
        out["lr_scaling"] = dict(pick.lr_scaling)
    if outside:
        out["outside_rule_range"] = True
        out["rule_notes"] = notes
    if opt is None:
        out["note"] = ("this study did not record the optimizer's settings (made before batchfit recorded them); "
                       "the optimizer is the workload's own, with the LR above")
    if isinstance(batch_form, Mapping):
        out["batch_form"] = dict(batch_form)
    out["snippets"] = _snippets(out, framework)
    return out


def _snippets(r: Mapping[str, Any], framework: str | None) -> dict[str, str]:
    """Paste-ready code for a recipe: PyTorch always, the project's framework beside it."""
    snippets = {"pytorch": _pytorch_snippet(r)}
    if framework == "lightning":
        snippets["lightning"] = _lightning_snippet(r)
    elif framework == "keras":
        snippets["keras"] = _keras_snippet(r)
    elif framework == "hf":
        snippets["hf"] = _hf_snippet(r)
    return snippets


_PRECISION_REASON = 4  # reasons: batch, micro-batch, LR, warm-up, precision, then the optional ones


def with_precision_check(rec: Recommendation, results: Any) -> Recommendation:
    """``rec`` with its precision decided from the precision check in ``results`` (``tune`` measures it on the
    recommended configuration, so it comes after the batch is chosen): the precision, its reason, the advice and the
    recipe's snippets change; the decision and everything else are ``rec``'s, not decided again. ``results``:
    :class:`Measurements` or what :meth:`Measurements.of` reads."""
    measured = Measurements.of(results)
    precision, why, advice = _precision(measured, rec.batch_size, measured.find)
    reasons = list(rec.reasons)
    if len(reasons) > _PRECISION_REASON:
        reasons[_PRECISION_REASON] = why
    recipe_ = None
    if rec.recipe is not None:
        recipe_ = {**rec.recipe, "precision": precision}
        recipe_["snippets"] = _snippets(recipe_, measured.framework)
    return replace(rec, precision=precision, reasons=reasons, precision_advice=advice, recipe=recipe_)


def _recipe_reason(r: Mapping[str, Any]) -> str:
    opt = r.get("optimizer")
    if not opt:
        return f"Recipe: {r['note']}."
    settings = ", ".join(f"{k} {_py(opt[k])}" for k in _OPTIMIZER_KEYS if k in opt)
    extra = [f"grad clip {r['grad_clip']:g}"] if r.get("grad_clip") else []
    if r.get("lr_schedule"):
        extra.append(f"schedule {r['lr_schedule']}")
    outside = ""
    if r.get("outside_rule_range"):
        notes = "; ".join(r.get("rule_notes") or [])
        outside = f"; {OUTSIDE_RANGE}" + (f" ({notes})" if notes else "")
    return (f"Recipe: {opt.get('class')} at LR {r['lr']:.4g}" + (f" with {settings}" if settings else "")
            + (", " + ", ".join(extra) if extra else "") + f", warm-up {r['warmup_steps']} step(s), as the winning "
            f"trial ran them (its optimizer's param group){outside}; snippets in results.json and the report.")


def recommend(
    results: Any,
    find: FindResult | Mapping[str, Any] | None = None,
    *,
    tolerance: float | None = None,
) -> Recommendation:
    """Turn measured results into a training recommendation with reasons.

    Args:
        results: ``load_results(store)`` (a ``SweepResult``), ``tune``'s ``TuneResult``, :class:`Measurements`,
            or their dict form (results.json), read typed once by :meth:`Measurements.of`. The finder's result, the
            LR check and the precision check are read from it when ``tune`` stored them.
        find: the finder's result (:class:`batchfit.finder.FindResult` or its dict form); default: the one in
            ``results``.
        tolerance: the non-inferiority margin, relative to the reference's quality: a batch size is non-inferior
            when its simultaneous 95 % lower bound on the difference from the reference lies above
            ``-tolerance x |reference|`` (:data:`DECISION_RULE`). Default: the one stored with the results (``tune``
            stores its own), else :data:`DEFAULT_TOLERANCE`.

    Ranks on the sweep's primary metric; a workload without validation data is ranked on its training loss, and the
    first reason says so. New keys (old ones kept): ``intervals`` (per-batch evidence), ``tied``, ``flags``,
    ``decision_rule``, ``critical_batch``, ``precision_advice`` and ``recipe``.

    >>> rec = recommend(load_results("runs/x/batchfit.db"))  # doctest: +SKIP
    >>> rec.batch_size, rec.lr  # doctest: +SKIP
    """
    data = Measurements.of(results)
    if tolerance is None:
        tolerance = data.tolerance if data.tolerance is not None else DEFAULT_TOLERANCE
    checks.fraction("tolerance", tolerance, low_open=False, hint="write e.g. 0.01 for 1 %")
    finder = data.find if find is None else _stage("find", find)  # an empty dict given: no finder result
    metric = data.metric
    decision, pick, why_batch = _pick_batch(data, metric, tolerance, None)
    crit = decision.critical  # the decision's S(B) fit: the flags, the context and the JSON read this one
    longer = long_horizon_of(data, decision, metric)
    untrained = _nothing_trained(decision)
    if untrained is not None and decision.batch_size > min(decision.choice.tied, default=decision.batch_size):
        # every tie is the starting point's noise: breaking it toward the faster batch would turn noise into a
        # larger batch, so the smallest of the tied ones is kept (less evidence never picks a larger batch)
        small = min(decision.choice.tied)
        pick = _best_trial(decision.evidence[small].trials, metric)
        why_batch += (f" Nothing trained in the measured horizon (no loss fell {NOTHING_TRAINED_DROP:.0%}), so the "
                      f"tie is not broken toward the faster batch {decision.batch_size}: the smallest tied batch, "
                      f"{small}, is kept (a longer horizon can tell them apart).")
    if longer is not None:
        why_batch += " " + longer.reason.rstrip(".") + "."
        moved = _long_horizon_move(decision, longer) if untrained is None else None
        if moved is not None:  # behind at h is the bias being corrected, so its short-horizon verdict does not bar it
            ev = decision.evidence[moved]
            pick = _best_trial(ev.trials, metric)
            why_batch += (f" For the whole train budget the answer moves from the short-horizon choice "
                          f"{decision.batch_size} to {moved}: within the tolerance below the lower end of that range, "
                          "and faster per sample beyond the timing noise.")
    if metric.name == "train_loss":
        why_batch += (" The workload has no validation data, so the batch sizes were ranked on the training loss: "
                      "it says how fast each one trains, not how well it generalizes.")
    batch = pick.batch_size
    world, parallel = data.world_size, data.parallel
    micro, acc, why_micro = _micro_batch(batch // world, pick.micro_batch_size, finder)  # one rank's share
    if world > 1:
        why_micro = (f"Under torchrun with {world} ranks ({parallel or 'ddp'}): effective batch {batch} = micro-batch "
                     f"{micro} per rank x {acc} accumulation step(s) x {world} ranks; a different world size keeps "
                     f"the effective batch and the LR when the accumulation makes up the difference. "
                     + why_micro.replace("effective batch", "each rank's share"))
    lr, why_lr = _lr_reason(data, pick, metric)
    warmup_steps, why_warmup = _warmup_reason(data, pick, lr)
    precision, why_precision, advice = _precision(data, batch, finder)
    holds = holds_for(data, decision, metric)
    why_batch += " " + holds["text"]
    reasons = [why_batch, why_micro, why_lr, why_warmup, why_precision]
    noise = noise_scale_summary(data, decision)
    context = _context_reason(data, batch, crit, noise)
    if context:
        reasons.append(context)
    why_noise = _noise_reason(noise, batch)
    if why_noise:
        reasons.append(why_noise)
    rec_recipe = recipe(pick, batch=batch, micro=micro, acc=acc, lr=lr, warmup_steps=warmup_steps,
                        precision=precision, framework=data.framework, batch_form=data.batch_form,
                        world_size=world, parallel=parallel)
    reasons.append(_recipe_reason(rec_recipe))
    return Recommendation(
        batch_size=batch, micro_batch_size=micro, accumulation_steps=acc, lr=lr, warmup_steps=warmup_steps,
        precision=precision, reasons=reasons, candidates=sorted(int(b) for b in decision.choice.tied),
        tolerance=float(tolerance), metric=metric.name, higher_is_better=metric.higher_is_better,
        world_size=world, parallel=parallel if world > 1 else None,
        intervals=[decision.evidence[b].to_dict() for b in sorted(decision.evidence)],
        tied=sorted(int(b) for b in decision.choice.tied),
        non_inferior=sorted(int(b) for b in decision.choice.tied),
        reference_batch_size=decision.reference,
        selection=decision.selection.to_dict() if decision.selection is not None else None,
        flags=list(decision.flags) + budget_flags(data, decision, untrained) + (list(longer.flags) if longer else []),
        decision_rule=DECISION_RULE.format(metric=_metric_label(metric)),
        decision_target=decision.target,
        holds_for=holds,
        long_horizon=longer.to_dict() if longer is not None else None,
        critical_batch=crit.to_dict() if crit is not None else None,
        noise_scale=noise,
        precision_advice=advice,
        recipe=rec_recipe,
    )


def _warmup_steps(results: Measurements, trial: TrialSummary) -> int:
    if isinstance(trial.warmup_steps, int):
        return int(trial.warmup_steps)
    warmup = results.sweep.warmup or 0
    if not warmup:
        return 0
    from batchfit.engine import resolve_warmup

    return resolve_warmup(warmup, int(trial.steps or 1))
