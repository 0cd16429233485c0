"""The recommendation: which effective batch, micro-batch, accumulation, LR, warm-up and precision to train with.

A pure function of measurements — the sweep's results and what ``tune`` measured beside them (finder, LR check,
precision check) — returning a :class:`Recommendation`, so the same numbers always give the same advice, and every
choice carries a one-sentence reason that quotes what was measured. Every metric value is read through
:class:`batchfit.metric.Metric` (a workload without validation data is ranked on its training loss).

1. **Effective batch** (:func:`batchfit.decide.decide`, docs/decisions.md): every trial of every LR and seed is
   pooled; a batch size's quality is its best LR's seed mean with a 95 % interval (one seed: the validation set's
   sampling interval). Batch sizes whose interval overlaps the best one's are *tied* (the data cannot tell them
   apart); among the tied, the least time to target — steps to target from the critical-batch fit
   ``S(B) = S_min (1 + B_crit / B)`` over every batch size and seed x seconds per step (tune's interleaved timing
   rounds, :mod:`batchfit.steptime`; else fitted over every trial) — is chosen, and the batch sizes that cannot be
   told from it on time are named (:data:`DECISION_RULE`). Time to target at a fixed quality is
   the comparison of Shallue et al. (2019) and McCandlish et al. (2018). Flags: a choice at the edge of the tried
   range, B_crit extrapolated, a quality tie, a base-LR move decided on few steps.
2. **Micro-batch and accumulation.** From the finder: its throughput knee when that fits in memory (memory is
   plentiful), else the largest batch that fits with the safety margin; accumulation makes up the effective batch.
3. **LR.** The LR the winning trial trained with (the rule-scaled LR times the best multiplier of the LR search).
4. **Warm-up.** The warm-up the winning trial used (measured stable), and a note when larger LRs diverged.
5. **Precision** (:func:`batchfit.decide.advise_precision`): a lower precision for speed only when the interval of
   its speed-up, from repeated interleaved step timings, excludes 1; for memory only when memory binds.
6. **Recipe.** Every optimizer setting the winning trial used (read from its optimizer's param group), with
   paste-ready PyTorch (and Lightning or Keras) snippets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from batchfit.decide import Decision, advise_precision, critical_from_trials, decide, quality_of_trial
from batchfit.errors import ConfigError
from batchfit.metric import Metric, finite_or_none
from batchfit.stats import CriticalBatchInterval, Interval

__all__ = [
    "DECISION_RULE",
    "TUNE_KEYS",
    "Recommendation",
    "as_results",
    "critical_interval",
    "decide_results",
    "decision_trials",
    "metric_of",
    "optimizer_settings",
    "recipe",
    "recommend",
    "within_tolerance",
]

# a lower precision's training loss may be this much (relative) above fp32's
_PRECISION_LOSS_TOLERANCE = 0.05
# what ``tune`` adds beside the sweep's own results (stored in the study under its namespace)
TUNE_KEYS = ("find", "noise", "lr_calibration", "precision_check", "step_time")


@dataclass
class Recommendation:
    """What to train with, each choice with the measured reason.

    ``to_dict()`` is the ``"recommendation"`` object of results.json; keys a newer batchfit adds (intervals, flags)
    are kept in ``extra`` on a round trip through :meth:`from_dict`, so nothing written is lost.
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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ranked_on_training_loss(self) -> bool:
        """True when the workload had no validation data and the batch sizes were ranked on the training loss."""
        return self.metric == "train_loss"

    def headline(self) -> str:
        """The one-line recommendation (what ``batchfit tune -q`` prints)."""
        line = (f"batch {self.batch_size} = micro-batch {self.micro_batch_size} x {self.accumulation_steps} "
                f"accumulation step(s), LR {self.lr:.4g}, warm-up {self.warmup_steps} step(s), {self.precision}")
        return line + (" (ranked on training loss: no validation data)" if self.ranked_on_training_loss else "")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["reasons"], out["candidates"] = list(self.reasons), list(self.candidates)
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recommendation:
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = [n for n in ("batch_size", "micro_batch_size", "accumulation_steps", "lr", "precision")
                   if n not in data]
        if missing:
            raise ConfigError(f"a recommendation needs {', '.join(missing)}; it has {', '.join(sorted(data))}")
        known = {k: v for k, v in data.items() if k in names}
        known.setdefault("warmup_steps", 0)
        known.setdefault("reasons", [])
        known.setdefault("candidates", [known["batch_size"]])
        known.setdefault("tolerance", 0.0)
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    # Read-only dict-style access (``rec["batch_size"]``) for code written when this was a dict.
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


def as_results(results: Any) -> dict[str, Any]:
    """A plain results dict from a ``SweepResult``, a ``TuneResult`` or a dict, with ``tune``'s stage results
    (find, noise, LR check, precision check) at the top level whether they came inline or under ``"tune"``."""
    data = results.to_dict() if hasattr(results, "to_dict") else dict(results)
    nested = data.get("tune")
    if isinstance(nested, Mapping):
        for key, value in nested.items():
            if data.get(key) is None:
                data[key] = value
    return data


def metric_of(results: Mapping[str, Any]) -> Metric:
    """The metric the sweep ranked on (``train_loss`` when the workload has no validation data)."""
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


def _micro_batch(batch: int, trial: Mapping[str, Any], find: Mapping[str, Any] | None) -> tuple[int, int, str]:
    if not find or not find.get("recommended_batch_size"):
        micro = int(trial.get("micro_batch_size") or batch)
        acc = math.ceil(batch / micro)
        return micro, acc, (
            f"Micro-batch {micro} x {acc} accumulation step(s): no finder result was available, so this is the "
            f"micro-batch the sweep trained batch {batch} with."
        )
    fits = int(find["recommended_batch_size"])
    knee = find.get("throughput_knee_batch_size")
    margin = find.get("margin")
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


def _loss_ok(base: Mapping[str, Any], low: Mapping[str, Any]) -> bool:
    loss_base, loss_low = finite_or_none(base.get("train_loss")), finite_or_none(low.get("train_loss"))
    return (loss_base is not None and loss_low is not None
            and loss_low <= loss_base * (1 + _PRECISION_LOSS_TOLERANCE) + 1e-12)


def _precision(results: Mapping[str, Any], batch: int, find: Mapping[str, Any] | None
               ) -> tuple[str, str, dict[str, Any] | None]:
    """The precision and its reason: :func:`batchfit.decide.advise_precision` on the check's repeated, interleaved
    step timings (a speed-up must exclude 1) and on memory only where it binds."""
    measured = results.get("precision", "fp32")
    check = results.get("precision_check") or {}
    low_name = "bf16"
    base, low = check.get("fp32"), check.get(low_name)
    if not base or not low:
        note = check.get("note")
        return measured, (
            f"Precision {measured}: only {measured} was measured"
            + (f" ({note})" if note else "")
            + "; bf16 is not recommended without a measurement showing it saves time or memory here."
        ), None
    if low.get("status") != "ok" or base.get("status") != "ok":
        return measured, (
            f"Precision {measured}: the bf16 check run did not finish cleanly ({low.get('status')}), so keep "
            f"{measured}."
        ), None
    times_base = [float(x) for x in base.get("step_seconds") or [] if finite_or_none(x)]
    times_low = [float(x) for x in low.get("step_seconds") or [] if finite_or_none(x)]
    if not (times_base and times_low):  # an older check: one throughput reading per precision
        sp_base, sp_low = finite_or_none(base.get("samples_per_s")), finite_or_none(low.get("samples_per_s"))
        if sp_base and sp_low:
            times_base, times_low = [1.0 / sp_base], [1.0 / sp_low]
    mem_base, mem_low = finite_or_none(base.get("peak_memory_bytes")), finite_or_none(low.get("peak_memory_bytes"))
    fits = (find or {}).get("recommended_batch_size") or (find or {}).get("max_batch_size")
    advice = advise_precision(
        times_base, times_low, low=low_name, fp32_max_micro_batch=int(fits) if fits else None, effective_batch=batch,
        knee=(find or {}).get("throughput_knee_batch_size"),
        memory_ratio=mem_low / mem_base if mem_base and mem_low else None, loss_ok=_loss_ok(base, low))
    n = min(len(times_base), len(times_low))
    timing = (f"{n} interleaved timing(s) per precision" if n > 1 else
              "one timing per precision, so no speed-up can be shown beyond the noise")
    loss = f"train loss {_fmt(finite_or_none(low.get('train_loss')))} vs {_fmt(finite_or_none(base.get('train_loss')))}"
    return advice.precision, f"Precision {advice.precision}: {advice.reason} ({timing}; {loss}).", advice.to_dict()


def _metric_label(metric: Metric) -> str:
    return "training loss" if metric.name == "train_loss" else metric.name


DECISION_RULE = (
    "Batch sizes whose {metric} interval (95 %: over seeds with the variance pooled over every configuration, or "
    "with one seed the validation set's sampling interval) overlaps the best one's are tied; among the tied, the "
    "least time-to-target estimate (steps from the S(B) fit over every batch size and seed x seconds per step from "
    "interleaved timing rounds) is chosen, and the batch sizes whose time interval overlaps it are reported as "
    "tied with it on time. The target is the sweep's fraction of the best tied configuration's seed-mean {metric} "
    "(reached on each trial's 3-evaluation moving average), and a batch size must reach it in every seed."
)


def decision_trials(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every finished trial (all LRs and seeds) the decision pools, each knowing the validation-set size."""
    rows = [t for t in results.get("trials") or [] if isinstance(t, Mapping)]
    if not any(t.get("status") == "ok" for t in rows):
        rows = [t for t in results.get("best_per_batch") or [] if isinstance(t, Mapping)]
    num_val = results.get("num_val")
    out = []
    for t in rows:
        t = dict(t)
        if t.get("val_samples") is None and isinstance(num_val, int) and num_val > 0:
            t["val_samples"] = num_val
        out.append(t)
    return out


def critical_interval(results: Mapping[str, Any], *, seed: int = 0) -> CriticalBatchInterval | None:
    """B_crit with its bootstrap interval (:func:`batchfit.decide.critical_from_trials`, the fit the decision
    uses)."""
    return critical_from_trials([t for t in results.get("trials") or [] if isinstance(t, Mapping)], seed=seed)


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


def step_time_intervals(results: Mapping[str, Any]) -> dict[int, Interval] | None:
    """tune's step-time calibration (:mod:`batchfit.steptime`) as batch size -> seconds per step, if it ran."""
    data = results.get("step_time")
    if not isinstance(data, Mapping) or not data.get("seconds"):
        return None
    from batchfit.steptime import StepTimeCalibration

    return StepTimeCalibration.from_dict(data).intervals() or None


def decide_results(results: Mapping[str, Any], tolerance: float, metric: Metric | None = None, *,
                   crit: CriticalBatchInterval | None = None) -> Decision | None:
    """:func:`batchfit.decide.decide` on a results dict with everything it takes from it (trials, B_crit, the LR
    check, tune's step-time calibration, the target): the one call the recommendation and tune's racing share, so
    racing stops on the decision the recommendation then makes. ``crit``: :func:`critical_interval` of
    ``results`` when the caller already has it (``None``: computed here)."""
    return decide(decision_trials(results), metric or metric_of(results),
                  b_crit=crit if crit is not None else critical_interval(results),
                  lr_calibration=results.get("lr_calibration"), margin=tolerance / 2,
                  step_time=step_time_intervals(results), target=results.get("target"))


def micro_batch_for(batch: int, find: Mapping[str, Any] | None, limit: int | None = None) -> int:
    """The micro-batch the recommendation would give effective batch ``batch`` (the finder's knee or largest
    fitting micro-batch; without a finder result, ``min(batch, limit)``)."""
    return _micro_batch(batch, {"micro_batch_size": min(batch, limit or batch)}, find)[0]


def _pick_batch(results: Mapping[str, Any], metric: Metric, tolerance: float,
                crit: CriticalBatchInterval | None) -> tuple[Decision, dict[str, Any], str]:
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
    pick = max(chosen.trials, key=lambda t: metric.sort_key(quality_of_trial(t, metric)))
    tried = sorted(ev)
    tied = sorted(decision.choice.tied)
    seeds = chosen.seeds
    seeds_txt = f"{seeds} seeds" if seeds > 1 else "one seed"
    q = chosen.quality
    if len(tied) == 1:
        why = (f"Effective batch {batch}: its {label} {q} ({seeds_txt}) is better than every other batch size "
               f"beyond the noise")
        if len(tried) > 1:
            runner = max((b for b in tried if b != batch), key=lambda b: metric.sort_key(ev[b].quality.estimate))
            why += f" (next best: batch {runner}, {ev[runner].quality})"
        return decision, pick, why + "."
    best = decision.choice.best_quality
    head = (f"Effective batch {batch}: batch sizes {_span(tied, tried)} are tied on {label} (their intervals overlap "
            f"the best, {ev[best].quality} at batch {best}; the data cannot tell them apart)")
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
        if slowest != batch else "the only tied batch size that reached the target")
    details = decision.choice.details or {}
    time_tied = details.get("time_tied") or []
    if len(time_tied) > 1:
        ratio_txt += (f"; {_span([b for b in time_tied if b != batch], tried)} cannot be told apart from it on time "
                      "(the least estimate decides among them)")
    if missed and slowest != batch:
        ratio_txt += "; " + ", ".join(f"{b} ({ev[b].seeds_reached} of {ev[b].seeds} seeds)" if ev[b].seeds_reached
                                      else str(b) for b in missed) + " did not reach the target in every seed " \
                                                                     "within the budget"
    t = timed[batch]
    goal = "" if decision.target is None else f" ({label} {_fmt(decision.target)})"
    how = f"{t.estimate:.3g} s to the target{goal}" + (f" [{t.low:.3g}, {t.high:.3g}]" if t.known else "")  # type: ignore
    verdict = ("its time advantage is beyond the noise" if decision.choice.cost_separated else
               "its time advantage over some tied sizes is inside the noise: the least estimate decides, "
               "not a measured win")
    return decision, pick, (f"{head}; chosen on time to target: {batch}, {ratio_txt}; {how}, {verdict}.")


def _lr_reason(results: Mapping[str, Any], pick: Mapping[str, Any], metric: Metric) -> tuple[float, str]:
    batch, lr = int(pick["batch_size"]), float(pick["lr"])
    mult = pick.get("lr_multiplier")
    n_lrs = len({t.get("lr") for t in results.get("trials") or [] if t.get("batch_size") == batch}) or 1
    rule = pick.get("lr_rule") or results.get("lr_rule", "auto")
    mult_txt = "" if mult in (None, 1, 1.0) else f" x{mult:g}"
    cal = results.get("lr_calibration") or {}
    cal_txt = ""
    if cal.get("best_multiplier") not in (None, 1, 1.0):
        cal_txt = (f"; the base LR was first moved from {cal['base_lr']:.3g} to {cal['lr']:.3g} at batch "
                   f"{cal['batch_size']}, where it scored better on {cal.get('metric', metric.name)}")
    return lr, (
        f"LR {lr:.4g}: the {rule}-rule LR for batch {batch}{mult_txt}"
        + (f", the best of {n_lrs} learning rates tried at this batch" if n_lrs > 1 else "")
        + f" ({_metric_label(metric)} {_fmt(metric.of_trial(pick))}){cal_txt}."
    )


def _warmup_reason(results: Mapping[str, Any], pick: Mapping[str, Any], lr: float) -> tuple[int, str]:
    warmup_steps = _warmup_steps(results, pick)
    batch = pick["batch_size"]
    diverged_higher = [
        t for t in results.get("trials") or []
        if t.get("batch_size") == batch and t.get("status") == "diverged" and float(t.get("lr") or 0) > lr
    ]
    text = (f"Warm-up {warmup_steps} step(s): the winning trial trained stably with it ({pick.get('steps')} steps "
            "in all)")
    if diverged_higher:
        text += f"; {len(diverged_higher)} larger LR(s) at this batch diverged, so do not raise the LR"
    return warmup_steps, text + "."


def _context_reason(results: Mapping[str, Any], batch: int, boot: CriticalBatchInterval | None) -> str | None:
    crit = results.get("critical_batch_size") or {}
    b_crit, b_simple = finite_or_none(crit.get("b_crit")), finite_or_none(results.get("b_simple"))
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
    if b_simple is not None:
        context.append(f"the measured gradient noise scale B_simple is {b_simple:.3g}")
    if not context:
        return None
    ref = b_crit if b_crit is not None else b_simple
    side = "below" if batch < ref else "at or above"  # type: ignore[operator]
    return ("Context: " + " and ".join(context) + f"; batch {batch} is {side} "
            + ("B_crit" if b_crit is not None else "B_simple")
            + " (above it, doubling the batch saves few steps; well below it, steps are noisy and cheap).")


# ---------------------------------------------------------------------------------------------------------------
# The recipe: every optimizer setting the winning trial used, and snippets to paste


_OPTIMIZER_KEYS = ("betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "amsgrad", "alpha",
                   "centered", "maximize", "lr_decay", "initial_accumulator_value", "rho", "decoupled_weight_decay")


def optimizer_settings(optimizer: Any) -> dict[str, Any]:
    """The class and the hyperparameters of ``optimizer``'s first param group (what a trial records as ``optimizer``;
    the LR there is the step-0 LR, after warm-up, so the recipe quotes the trial's peak ``lr`` instead)."""
    group = optimizer.param_groups[0]
    out: dict[str, Any] = {"class": type(optimizer).__name__, "module": type(optimizer).__module__}
    for key, value in group.items():
        if key == "params" or callable(value):
            continue
        if value is False or key in ("foreach", "fused", "capturable", "differentiable", "maximize"):
            continue  # off flags are every optimizer's defaults, and implementation switches are no recipe
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
            out[key] = [float(v) for v in value]
    if len(optimizer.param_groups) > 1:
        out["param_groups"] = len(optimizer.param_groups)
    return out


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
    lines = [
        "import torch",
        f"optimizer = {make}",
        f"loader = torch.utils.data.DataLoader(train_set, batch_size={r['micro_batch_size']}, shuffle=True, "
        "drop_last=True)",
        f"accumulation = {r['accumulation_steps']}  # effective batch {r['batch_size']} = "
        f"{r['micro_batch_size']} x {r['accumulation_steps']}",
    ]
    if r.get("warmup_steps"):
        lines.append(f"scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / "
                     f"{r['warmup_steps']}))  # linear warm-up; multiply your own schedule on top")
    if r.get("lr_schedule"):
        lines.append(f"# the winning trial also stepped the workload's schedule ({r['lr_schedule']}) after every "
                     "optimizer step")
    lines += ["for i, (x, y) in enumerate(loader):"]
    body = "loss = loss_fn(model(x), y) / accumulation"
    if r.get("precision") == "bf16":
        lines += ["    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):", f"        {body}"]
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


def recipe(pick: Mapping[str, Any], *, batch: int, micro: int, acc: int, lr: float, warmup_steps: int,
           precision: str, framework: str | None = None) -> dict[str, Any]:
    """Everything needed to reproduce the winning trial: batch, accumulation, LR, every optimizer setting it used
    (read from its optimizer's param group), warm-up, schedule, clipping, precision; plus paste-ready snippets
    (PyTorch always; Lightning or Keras when the workload came from them)."""
    opt = pick.get("optimizer") if isinstance(pick.get("optimizer"), Mapping) else None
    out: dict[str, Any] = {
        "batch_size": batch, "micro_batch_size": micro, "accumulation_steps": acc, "lr": lr,
        "warmup_steps": warmup_steps, "precision": precision, "lr_rule": pick.get("lr_rule"),
        "lr_schedule": pick.get("lr_schedule"), "grad_clip": pick.get("grad_clip"),
        "optimizer": dict(opt) if opt else None, "seed": pick.get("seed"),
    }
    if opt is None:
        out["note"] = ("this study did not record the optimizer's settings (made before batchfit recorded them); "
                       "the optimizer is the workload's own, with the LR above")
    snippets = {"pytorch": _pytorch_snippet(out)}
    if framework == "lightning":
        snippets["lightning"] = _lightning_snippet(out)
    elif framework == "keras":
        snippets["keras"] = _keras_snippet(out)
    out["snippets"] = snippets
    return out


def _recipe_reason(r: Mapping[str, Any]) -> str:
    opt = r.get("optimizer")
    if not opt:
        return f"Recipe: {r['note']}."
    settings = ", ".join(f"{k} {_py(opt[k])}" for k in _OPTIMIZER_KEYS if k in opt)
    extra = [f"grad clip {r['grad_clip']:g}"] if r.get("grad_clip") else []
    if r.get("lr_schedule"):
        extra.append(f"schedule {r['lr_schedule']}")
    return (f"Recipe: {opt.get('class')} at LR {r['lr']:.4g}" + (f" with {settings}" if settings else "")
            + (", " + ", ".join(extra) if extra else "") + f", warm-up {r['warmup_steps']} step(s), as the winning "
            "trial ran them (its optimizer's param group); snippets in results.json and the report.")


def recommend(
    results: Any,
    find: Mapping[str, Any] | None = None,
    *,
    tolerance: float = 0.01,
) -> Recommendation:
    """Turn measured results into a training recommendation with reasons.

    Args:
        results: ``load_results(store)`` (a ``SweepResult``), ``tune``'s ``TuneResult``, or their dict form
            (results.json). The finder's result, the LR check and the precision check are read from it when ``tune``
            stored them.
        find: the finder's dict (``FindResult.to_dict()``); default: the one in ``results``.
        tolerance: only widens ties: quality differences below this relative margin are ties even when measured
            precisely (each quality interval gets a half-width of at least ``tolerance / 2``), and a quality with
            no measured noise is compared within it. The decision itself is :data:`DECISION_RULE`.

    Ranks on the sweep's primary metric; a workload without validation data is ranked on its training loss, and the
    first reason says so. New keys (old ones kept): ``intervals`` (per-batch evidence), ``tied``, ``flags``,
    ``decision_rule``, ``critical_batch``, ``precision_advice`` and ``recipe``.

    >>> rec = recommend(load_results("runs/x/batchfit.db"))  # doctest: +SKIP
    >>> rec.batch_size, rec.lr  # doctest: +SKIP
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise ConfigError(f"tolerance must be a fraction in [0, 1), e.g. 0.01 for 1 %, got {tolerance!r}")
    data = as_results(results)
    if find is None:
        find = data.get("find")
    metric = metric_of(data)
    crit = critical_interval(data)  # B_crit with its bootstrap: the flags, the context and the JSON read this one
    decision, pick, why_batch = _pick_batch(data, metric, tolerance, crit)
    if metric.name == "train_loss":
        why_batch += (" The workload has no validation data, so the batch sizes were ranked on the training loss: "
                      "it says how fast each one trains, not how well it generalizes.")
    batch = int(pick["batch_size"])
    micro, acc, why_micro = _micro_batch(batch, pick, find)
    lr, why_lr = _lr_reason(data, pick, metric)
    warmup_steps, why_warmup = _warmup_reason(data, pick, lr)
    precision, why_precision, advice = _precision(data, batch, find)
    reasons = [why_batch, why_micro, why_lr, why_warmup, why_precision]
    context = _context_reason(data, batch, crit)
    if context:
        reasons.append(context)
    rec_recipe = recipe(pick, batch=batch, micro=micro, acc=acc, lr=lr, warmup_steps=warmup_steps,
                        precision=precision, framework=data.get("framework"))
    reasons.append(_recipe_reason(rec_recipe))
    extra = {
        "intervals": [decision.evidence[b].to_dict() for b in sorted(decision.evidence)],
        "tied": sorted(int(b) for b in decision.choice.tied),
        "flags": list(decision.flags),
        "decision_rule": DECISION_RULE.format(metric=_metric_label(metric)),
        "decision_target": decision.target,
        "critical_batch": crit.to_dict() if crit is not None else None,
        "precision_advice": advice,
        "recipe": rec_recipe,
    }
    return Recommendation(
        batch_size=batch, micro_batch_size=micro, accumulation_steps=acc, lr=lr, warmup_steps=warmup_steps,
        precision=precision, reasons=reasons, candidates=sorted(int(b) for b in decision.choice.tied),
        tolerance=float(tolerance), metric=metric.name, higher_is_better=metric.higher_is_better, extra=extra,
    )


def _warmup_steps(results: Mapping[str, Any], trial: Mapping[str, Any]) -> int:
    if isinstance(trial.get("warmup_steps"), int):
        return int(trial["warmup_steps"])
    warmup = results.get("warmup") or 0
    if not warmup:
        return 0
    from batchfit.engine import resolve_warmup

    return resolve_warmup(warmup, int(trial.get("steps") or 1))
