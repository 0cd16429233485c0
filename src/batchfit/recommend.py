"""The recommendation: which effective batch, micro-batch, accumulation, LR, warm-up and precision to train with.

A pure function of measurements — the sweep's results and what ``tune`` measured beside them (finder, LR check,
precision check) — returning a :class:`Recommendation`, so the same numbers always give the same advice, and every
choice carries a one-sentence reason that quotes what was measured. Every metric value is read through
:class:`batchfit.metric.Metric` (a workload without validation data is ranked on its training loss).

1. **Effective batch.** Among the batch sizes whose best value of the ranked metric is within ``tolerance``
   (relative) of the best any batch size reached, the one that reached the target in the least training time
   (samples to the target / the trial's measured samples per second). Equal-epoch
   comparisons favour small batches on quality while large batches win on throughput; time-to-target at a fixed
   quality is the comparison Shallue et al. (2019) and McCandlish et al. (2018) use.
2. **Micro-batch and accumulation.** From the finder: its throughput knee when that fits in memory (memory is
   plentiful), else the largest batch that fits with the safety margin; accumulation makes up the effective batch.
3. **LR.** The LR the winning trial trained with (the rule-scaled LR times the best multiplier of the LR search).
4. **Warm-up.** The warm-up the winning trial used (measured stable), and a note when larger LRs diverged.
5. **Precision.** bf16 only when a measurement (``results["precision_check"]``) showed it saved time or memory
   without hurting the loss; otherwise the precision the sweep measured, saying that nothing else was measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from batchfit.errors import ConfigError
from batchfit.metric import Metric, finite_or_none

__all__ = ["TUNE_KEYS", "Recommendation", "as_results", "metric_of", "recommend", "time_to_target", "within_tolerance"]

# bf16 must beat fp32 by this much to be worth its reduced mantissa.
_PRECISION_SPEEDUP = 1.05
_PRECISION_MEMORY_SAVING = 0.9
_PRECISION_LOSS_TOLERANCE = 0.05
# what ``tune`` adds beside the sweep's own results (stored in the study under its namespace)
TUNE_KEYS = ("find", "noise", "lr_calibration", "precision_check")


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


def _best_per_batch(results: Mapping[str, Any], metric: Metric) -> list[dict[str, Any]]:
    """The best-LR finished trial per batch size: the sweep's ``best_per_batch``, or derived from ``trials``."""
    rows = [t for t in results.get("best_per_batch") or [] if t.get("status") == "ok"]
    if rows:
        return sorted(rows, key=lambda t: t["batch_size"])
    best: dict[int, dict[str, Any]] = {}
    for t in results.get("trials") or []:
        q = metric.of_trial(t)
        if t.get("status") != "ok" or q is None:
            continue
        cur = best.get(t["batch_size"])
        if cur is None or metric.better(q, metric.of_trial(cur)):  # type: ignore[arg-type]
            best[t["batch_size"]] = t
    return [best[b] for b in sorted(best)]


def _has_rate(trial: Mapping[str, Any]) -> bool:
    samples, sps = finite_or_none(trial.get("samples_to_target")), finite_or_none(trial.get("samples_per_s"))
    return samples is not None and sps is not None and sps > 0


def time_to_target(trial: Mapping[str, Any]) -> float | None:
    """Training seconds to the target: samples to the target / the trial's measured samples/s.

    The trial's average throughput over all of its steps is steadier than the wall clock read at the moment the
    target was reached (one slow interval on a shared machine would otherwise decide the ranking); without a
    throughput, the recorded ``seconds_to_target``.
    """
    if _has_rate(trial):
        return float(trial["samples_to_target"]) / float(trial["samples_per_s"])
    return finite_or_none(trial.get("seconds_to_target"))


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


def _precision(results: Mapping[str, Any]) -> tuple[str, str]:
    measured = results.get("precision", "fp32")
    check = results.get("precision_check") or {}
    base, bf16 = check.get("fp32"), check.get("bf16")
    if not base or not bf16:
        note = check.get("note")
        return measured, (
            f"Precision {measured}: only {measured} was measured"
            + (f" ({note})" if note else "")
            + "; bf16 is not recommended without a measurement showing it saves time or memory here."
        )
    if bf16.get("status") != "ok" or base.get("status") != "ok":
        return measured, (
            f"Precision {measured}: the bf16 check run did not finish cleanly ({bf16.get('status')}), so keep "
            f"{measured}."
        )
    sp_base, sp_bf16 = base.get("samples_per_s") or 0.0, bf16.get("samples_per_s") or 0.0
    mem_base, mem_bf16 = base.get("peak_memory_bytes"), bf16.get("peak_memory_bytes")
    speedup = sp_bf16 / sp_base if sp_base > 0 else 0.0
    mem_ratio = mem_bf16 / mem_base if mem_base and mem_bf16 else None
    loss_base, loss_bf16 = base.get("train_loss"), bf16.get("train_loss")
    loss_ok = (
        loss_base is not None and loss_bf16 is not None and math.isfinite(loss_bf16)
        and loss_bf16 <= loss_base * (1 + _PRECISION_LOSS_TOLERANCE) + 1e-12
    )
    faster = speedup >= _PRECISION_SPEEDUP
    smaller = mem_ratio is not None and mem_ratio <= _PRECISION_MEMORY_SAVING
    mem_txt = "" if mem_ratio is None else f", peak memory x{mem_ratio:.2f}"
    measured_txt = (
        f"bf16 ran at {sp_bf16:.0f} samples/s vs {sp_base:.0f} for fp32 (x{speedup:.2f}{mem_txt}), train loss "
        f"{_fmt(loss_bf16)} vs {_fmt(loss_base)}"
    )
    if (faster or smaller) and loss_ok:
        return "bf16", f"Precision bf16: {measured_txt} in the same number of steps."
    reason = "it did not save time or memory" if not (faster or smaller) else "its loss was worse"
    return "fp32", f"Precision fp32: {measured_txt}; {reason}, so keep fp32."


def _metric_label(metric: Metric) -> str:
    return "training loss" if metric.name == "train_loss" else metric.name


def _pick_batch(rows: list[dict[str, Any]], metric: Metric, tolerance: float
                ) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """The batch: the fastest to the target among those within ``tolerance`` of the best quality."""
    best_row = min(rows, key=lambda t: metric.sort_key(metric.of_trial(t)))
    best_q = metric.of_trial(best_row)
    assert best_q is not None  # rows are filtered to trials with a value
    close = [t for t in rows if within_tolerance(metric.of_trial(t), best_q, tolerance,  # type: ignore[arg-type]
                                                 metric.higher_is_better)]
    timed = [t for t in close if time_to_target(t) is not None]
    label = _metric_label(metric)
    if not timed:
        return best_row, close, (
            f"Effective batch {best_row['batch_size']}: it had the best {label} ({_fmt(best_q)}); no batch size "
            "within tolerance recorded a time to the target, so time-to-target could not rank them."
        )
    pick = min(timed, key=lambda t: (time_to_target(t), metric.sort_key(metric.of_trial(t))))
    others = [f"{t['batch_size']}: {time_to_target(t):.3g} s" for t in timed if t is not pick]
    how = (f"{pick.get('samples_to_target')} samples at its measured {float(pick['samples_per_s']):.0f} samples/s"
           if _has_rate(pick) else "measured wall-clock training time")
    reason = (
        f"Effective batch {pick['batch_size']}: it reached the target {label} in {time_to_target(pick):.3g} s of "
        f"training ({pick.get('steps_to_target')} steps; {how}), the fastest of the {len(close)} batch size(s) "
        f"whose best {label} is within {tolerance:.0%} of the best measured ({_fmt(best_q)} at batch "
        f"{best_row['batch_size']}); this one reached {_fmt(metric.of_trial(pick))}"
        + (f" (others: {', '.join(others)})." if others else ".")
    )
    return pick, close, reason


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


def _context_reason(results: Mapping[str, Any], batch: int) -> str | None:
    crit = results.get("critical_batch_size") or {}
    b_crit, b_simple = finite_or_none(crit.get("b_crit")), finite_or_none(results.get("b_simple"))
    context = []
    if b_crit is not None:
        r2 = finite_or_none(crit.get("r2"))
        context.append(f"the fitted critical batch B_crit is {b_crit:.3g}" + (f" (fit R^2 {r2:.2f})" if r2 is not None
                                                                              else ""))
    if b_simple is not None:
        context.append(f"the measured gradient noise scale B_simple is {b_simple:.3g}")
    if not context:
        return None
    ref = b_crit if b_crit is not None else b_simple
    side = "below" if batch < ref else "at or above"  # type: ignore[operator]
    return ("Context: " + " and ".join(context) + f"; batch {batch} is {side} "
            + ("B_crit" if b_crit is not None else "B_simple")
            + " (above it, doubling the batch saves few steps; well below it, steps are noisy and cheap).")


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
        tolerance: relative quality tolerance, e.g. 0.01 = within 1 % of the best.

    Ranks on the sweep's primary metric; a workload without validation data is ranked on its training loss, and the
    first reason says so.

    >>> rec = recommend(load_results("runs/x/batchfit.db"))  # doctest: +SKIP
    >>> rec.batch_size, rec.lr  # doctest: +SKIP
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise ConfigError(f"tolerance must be a fraction in [0, 1), e.g. 0.01 for 1 %, got {tolerance!r}")
    data = as_results(results)
    if find is None:
        find = data.get("find")
    metric = metric_of(data)
    rows = [t for t in _best_per_batch(data, metric) if metric.of_trial(t) is not None]
    if not rows:
        what = "training-loss" if metric.name == "train_loss" else "validation"
        raise ConfigError(
            f"no finished trial with a {what} result to recommend from; run or resume the sweep "
            "(batchfit sweep / batchfit tune) until at least one trial finishes"
        )
    pick, close, why_batch = _pick_batch(rows, metric, tolerance)
    if metric.name == "train_loss":
        why_batch += (" The workload has no validation data, so the batch sizes were ranked on the training loss: "
                      "it says how fast each one trains, not how well it generalizes.")
    batch = int(pick["batch_size"])
    micro, acc, why_micro = _micro_batch(batch, pick, find)
    lr, why_lr = _lr_reason(data, pick, metric)
    warmup_steps, why_warmup = _warmup_reason(data, pick, lr)
    precision, why_precision = _precision(data)
    reasons = [why_batch, why_micro, why_lr, why_warmup, why_precision]
    context = _context_reason(data, batch)
    if context:
        reasons.append(context)
    return Recommendation(
        batch_size=batch, micro_batch_size=micro, accumulation_steps=acc, lr=lr, warmup_steps=warmup_steps,
        precision=precision, reasons=reasons, candidates=[int(t["batch_size"]) for t in close],
        tolerance=float(tolerance), metric=metric.name, higher_is_better=metric.higher_is_better,
    )


def _warmup_steps(results: Mapping[str, Any], trial: Mapping[str, Any]) -> int:
    if isinstance(trial.get("warmup_steps"), int):
        return int(trial["warmup_steps"])
    warmup = results.get("warmup") or 0
    if not warmup:
        return 0
    from batchfit.engine import resolve_warmup

    return resolve_warmup(warmup, int(trial.get("steps") or 1))
