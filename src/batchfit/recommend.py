"""The recommendation: which effective batch, micro-batch, accumulation, LR, warm-up and precision to train with.

A pure function of measurements — the sweep's results dict and (optionally) the finder's dict — so the same
numbers always give the same advice, and every choice carries a one-sentence reason that quotes what was measured:

1. **Effective batch.** Among the batch sizes whose best validation metric is within ``tolerance`` (relative) of
   the best any batch size reached, the one that reached the target in the least training time (samples to the
   target / the trial's measured samples per second). Equal-epoch
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
from typing import Any

from batchfit.errors import ConfigError

# bf16 must beat fp32 by this much to be worth its reduced mantissa.
_PRECISION_SPEEDUP = 1.05
_PRECISION_MEMORY_SAVING = 0.9
_PRECISION_LOSS_TOLERANCE = 0.05


def quality(trial: Mapping[str, Any], primary_metric: str) -> float | None:
    """A trial's best validation value of the primary metric (``val_loss`` when the workload has no metric)."""
    metrics = trial.get("best_val_metrics") or {}
    value = metrics.get(primary_metric)
    if value is None and primary_metric == "val_loss":
        value = trial.get("best_val_loss")
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}"


def _best_per_batch(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The best-LR finished trial per batch size: the sweep's ``best_per_batch``, or derived from ``trials``."""
    primary = results.get("primary_metric", "val_loss")
    higher = bool(results.get("higher_is_better", primary != "val_loss"))
    rows = [t for t in results.get("best_per_batch") or [] if t.get("status") == "ok"]
    if rows:
        return sorted(rows, key=lambda t: t["batch_size"])
    best: dict[int, dict[str, Any]] = {}
    for t in results.get("trials") or []:
        q = quality(t, primary)
        if t.get("status") != "ok" or q is None:
            continue
        cur = best.get(t["batch_size"])
        if cur is None or (q > quality(cur, primary) if higher else q < quality(cur, primary)):  # type: ignore[operator]
            best[t["batch_size"]] = t
    return [best[b] for b in sorted(best)]


def _has_rate(trial: Mapping[str, Any]) -> bool:
    samples, sps = trial.get("samples_to_target"), trial.get("samples_per_s")
    return isinstance(samples, (int, float)) and isinstance(sps, (int, float)) and sps > 0


def time_to_target(trial: Mapping[str, Any]) -> float | None:
    """Training seconds to the target: samples to the target / the trial's measured samples/s.

    The trial's average throughput over all of its steps is steadier than the wall clock read at the moment the
    target was reached (one slow interval on a shared machine would otherwise decide the ranking); without a
    throughput, the recorded ``seconds_to_target``.
    """
    if _has_rate(trial):
        return float(trial["samples_to_target"]) / float(trial["samples_per_s"])
    value = trial.get("seconds_to_target")
    return float(value) if isinstance(value, (int, float)) else None


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


def recommend(
    results: Mapping[str, Any],
    find: Mapping[str, Any] | None = None,
    *,
    tolerance: float = 0.01,
) -> dict[str, Any]:
    """Turn a sweep's results (and the finder's result) into a training recommendation with reasons.

    Args:
        results: the sweep's results dict (``batchfit.study.sweep`` / ``load_results``).
        find: the finder's dict (``FindResult.to_dict()``); default ``results["find"]``.
        tolerance: relative validation-quality tolerance, e.g. 0.01 = within 1 % of the best.

    Returns ``{"batch_size", "micro_batch_size", "accumulation_steps", "lr", "warmup_steps", "precision",
    "reasons": [...]}`` plus ``"candidates"`` (the batch sizes within tolerance).
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise ConfigError(f"tolerance must be a fraction in [0, 1), e.g. 0.01 for 1 %, got {tolerance!r}")
    if find is None:
        find = results.get("find")
    primary = results.get("primary_metric", "val_loss")
    higher = bool(results.get("higher_is_better", primary != "val_loss"))
    rows = [t for t in _best_per_batch(results) if quality(t, primary) is not None]
    if not rows:
        raise ConfigError(
            "no finished trial with a validation result to recommend from; run or resume the sweep "
            "(batchfit sweep / batchfit tune) until at least one trial finishes"
        )
    best_row = (max if higher else min)(rows, key=lambda t: quality(t, primary))  # type: ignore[arg-type,return-value]
    best_q = quality(best_row, primary)
    assert best_q is not None
    close = [t for t in rows if within_tolerance(quality(t, primary), best_q, tolerance, higher)]  # type: ignore[arg-type]
    timed = [t for t in close if time_to_target(t) is not None]
    reasons: list[str] = []
    if timed:
        pick = min(timed, key=lambda t: (time_to_target(t), -(quality(t, primary) or 0) if higher
                                         else quality(t, primary)))
        others = [f"{t['batch_size']}: {time_to_target(t):.3g} s" for t in timed if t is not pick]
        sps = pick.get("samples_per_s")
        how = (f"{pick.get('samples_to_target')} samples at its measured {sps:.0f} samples/s"
               if _has_rate(pick) else "measured wall-clock training time")
        reasons.append(
            f"Effective batch {pick['batch_size']}: it reached the target {primary} in "
            f"{time_to_target(pick):.3g} s of training ({pick.get('steps_to_target')} steps; {how}), the fastest of "
            f"the {len(close)} batch size(s) whose best {primary} is within {tolerance:.0%} of the best measured "
            f"({_fmt(best_q)} at batch {best_row['batch_size']}); this one reached {_fmt(quality(pick, primary))}"
            + (f" (others: {', '.join(others)})." if others else ".")
        )
    else:
        pick = best_row
        reasons.append(
            f"Effective batch {pick['batch_size']}: it had the best {primary} ({_fmt(best_q)}); no batch size "
            "within tolerance recorded a time to the target, so time-to-target could not rank them."
        )
    batch = int(pick["batch_size"])

    micro, acc, why_micro = _micro_batch(batch, pick, find)
    reasons.append(why_micro)

    lr = float(pick["lr"])
    mult = pick.get("lr_multiplier")
    n_lrs = len({t.get("lr") for t in results.get("trials") or [] if t.get("batch_size") == batch}) or 1
    rule = pick.get("lr_rule") or results.get("lr_rule", "auto")
    mult_txt = "" if mult in (None, 1, 1.0) else f" x{mult:g}"
    cal = results.get("lr_calibration") or {}
    cal_txt = ""
    if cal.get("best_multiplier") not in (None, 1, 1.0):
        cal_txt = (f"; the base LR was first moved from {cal['base_lr']:.3g} to {cal['lr']:.3g} at batch "
                   f"{cal['batch_size']}, where it scored better on {cal.get('metric', primary)}")
    reasons.append(
        f"LR {lr:.4g}: the {rule}-rule LR for batch {batch}{mult_txt}"
        + (f", the best of {n_lrs} learning rates tried at this batch" if n_lrs > 1 else "")
        + f" ({primary} {_fmt(quality(pick, primary))}){cal_txt}."
    )

    warmup_steps = _warmup_steps(results, pick)
    diverged_higher = [
        t for t in results.get("trials") or []
        if t.get("batch_size") == batch and t.get("status") == "diverged" and float(t.get("lr") or 0) > lr
    ]
    warm_txt = (
        f"Warm-up {warmup_steps} step(s): the winning trial trained stably with it"
        f" ({pick.get('steps')} steps in all)"
    )
    if diverged_higher:
        warm_txt += f"; {len(diverged_higher)} larger LR(s) at this batch diverged, so do not raise the LR"
    reasons.append(warm_txt + ".")

    precision, why_precision = _precision(results)
    reasons.append(why_precision)

    crit = results.get("critical_batch_size") or {}
    b_simple = results.get("b_simple")
    context = []
    if crit.get("b_crit") is not None:
        r2 = crit.get("r2")
        context.append(f"the fitted critical batch B_crit is {crit['b_crit']:.3g}"
                       + (f" (fit R^2 {r2:.2f})" if isinstance(r2, (int, float)) else ""))
    if isinstance(b_simple, (int, float)):
        context.append(f"the measured gradient noise scale B_simple is {b_simple:.3g}")
    if context:
        ref = crit.get("b_crit") if crit.get("b_crit") is not None else b_simple
        side = "below" if batch < ref else "at or above"
        reasons.append(
            "Context: " + " and ".join(context) + f"; batch {batch} is {side} "
            + ("B_crit" if crit.get("b_crit") is not None else "B_simple")
            + " (above it, doubling the batch saves few steps; well below it, steps are noisy and cheap)."
        )
    return {
        "batch_size": batch,
        "micro_batch_size": micro,
        "accumulation_steps": acc,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "precision": precision,
        "reasons": reasons,
        "candidates": [int(t["batch_size"]) for t in close],
        "tolerance": tolerance,
    }


def _warmup_steps(results: Mapping[str, Any], trial: Mapping[str, Any]) -> int:
    if isinstance(trial.get("warmup_steps"), int):
        return int(trial["warmup_steps"])
    warmup = results.get("warmup") or 0
    if not warmup:
        return 0
    from batchfit.engine import resolve_warmup

    return resolve_warmup(warmup, int(trial.get("steps") or 1))
