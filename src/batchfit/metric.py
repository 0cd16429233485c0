"""The one way to read "the metric value of a record".

A :class:`Metric` names the quantity trials are ranked on (the workload's first metric, or ``val_loss`` when the
workload has no metric, or ``train_loss`` when it has no validation data), its direction, and how to read it
from an evaluation record (``{"train_loss", "val_loss", "val_metrics": {...}}``) or a trial summary
(``{"best_val_metrics", "best_val_loss", "final_train_loss", ...}``). Every module that ranks, plots or reports a
metric uses it, so they cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FINAL_EVALS", "FINAL_WINDOW", "LOSS_NAMES", "Metric", "accuracy", "best_config_mean", "crossing",
           "final_quality", "finite_or_none"]

LOSS_NAMES = ("val_loss", "train_loss")
FINAL_EVALS = 3  # a trial's quality: the mean of its last evaluations
FINAL_WINDOW = 3 / 16  # ... those in the last 3/16 of its samples: the last 3 of a sweep trial's 16 evaluations


def accuracy(outputs: Any, targets: Any) -> Any:
    """Top-1 accuracy of class scores ``(B, C)`` (or ``(B, T, C)``) against integer targets: a 0-d tensor, the
    batch mean (a workload metric, ``Workload(metrics={"accuracy": accuracy})``)."""
    return (outputs.argmax(dim=-1) == targets).float().mean()


def finite_or_none(v: Any) -> float | None:
    """``float(v)`` for a finite real number, else ``None`` (bools, strings, NaN and inf are not values)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class Metric:
    """What trials are ranked on. ``higher_is_better`` is False for losses."""

    name: str
    higher_is_better: bool

    @classmethod
    def for_workload(cls, workload: Any) -> Metric:
        """The workload's primary metric; ``val_loss`` without metrics; ``train_loss`` without validation data."""
        if getattr(workload, "val_data", None) is None and not _has_val_loader(workload):
            return cls("train_loss", False)
        metrics = getattr(workload, "metrics", None) or {}
        if metrics:
            return cls(next(iter(metrics)), bool(getattr(workload, "higher_is_better", True)))
        return cls("val_loss", False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Metric:
        return cls(str(d["name"]), bool(d["higher_is_better"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "higher_is_better": self.higher_is_better}

    @property
    def is_loss(self) -> bool:
        return self.name in LOSS_NAMES

    @property
    def on_validation(self) -> bool:
        return self.name != "train_loss"

    def of_record(self, record: Mapping[str, Any]) -> float | None:
        """The value in one evaluation record (engine history entry)."""
        if self.is_loss:
            return finite_or_none(record.get(self.name))
        return finite_or_none((record.get("val_metrics") or {}).get(self.name))

    def of_trial(self, trial: Any) -> float | None:
        """A trial summary's best value (``best_val_metrics`` / ``best_val_loss`` / ``best_train_loss``): a
        :class:`batchfit.study.TrialSummary`, read by attribute, or its dict form."""
        if self.name == "val_loss":
            return finite_or_none(_field(trial, "best_val_loss"))
        if self.name == "train_loss":
            v = finite_or_none(_field(trial, "best_train_loss"))
            return v if v is not None else finite_or_none(_field(trial, "final_train_loss"))
        return finite_or_none((_field(trial, "best_val_metrics") or {}).get(self.name))

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def best(self, values: list[float]) -> float:
        return max(values) if self.higher_is_better else min(values)

    def reaches(self, value: float | None, target: float) -> bool:
        """True when ``value`` is at least as good as ``target``."""
        if value is None:
            return False
        return value >= target if self.higher_is_better else value <= target

    def sort_key(self, value: float | None) -> tuple[int, float]:
        """Ascending sort key: best first, missing values last."""
        if value is None:
            return (1, 0.0)
        return (0, -value if self.higher_is_better else value)


def _has_val_loader(workload: Any) -> bool:
    return getattr(workload, "val_loader", None) is not None


# ---------------------------------------------------------------------------------------------------------------
# The one quality of a run and the one crossing of a target (the sweep's B_crit and the decision both read these)


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def final_quality(history: Any, metric: Metric, k: int = FINAL_EVALS, window: float = FINAL_WINDOW) -> float | None:
    """A run's quality: the mean of ``metric`` over its last ``k`` evaluations (fewer: all of them), of those in
    the last ``window`` (default :data:`FINAL_WINDOW`) of its samples (the last evaluation always; records without
    ``samples``: the last ``k``).

    Not the best evaluation, nor the best of a moving average: a maximum over many noisy evaluations is biased up,
    and more so for the runs with more evaluations (the small batches), so it favours whoever was evaluated most.
    The last evaluations are what the user keeps at the end of the run. And one window in samples for every run:
    over an epochs budget the sweep evaluates every batch size at one *step* cadence, so without it the last ``k``
    evaluations reach back over different shares of the run at different batch sizes (demo:tiny-lm's one epoch:
    half of it at batch 8, the last evaluation only at batch 32), and their mean is biased against whichever is
    evaluated over the wider window. A sweep trial's default 16 evaluations at equal shares keep all ``k``."""
    recs = [(r, v) for r in history or [] if isinstance(r, Mapping) and (v := metric.of_record(r)) is not None]
    if not recs:
        return None
    tail = recs[-k:]
    end = finite_or_none(tail[-1][0].get("samples"))
    if end is not None and end > 0:
        tail = [(r, v) for r, v in tail if (s := finite_or_none(r.get("samples"))) is not None
                and s >= (1.0 - window) * end] or tail[-1:]
    return float(sum(v for _, v in tail) / len(tail))


def crossing(history: Any, metric: Metric, value: float, field: str = "step") -> float | None:
    """Where the run's raw evaluation curve first reaches ``value``, linearly interpolated between the last
    evaluation short of it and the first at or past it (in ``field``: ``step``, ``epoch``, ``samples`` or
    ``train_seconds``); the first evaluation's own position when it already reaches it; ``None`` when it never does.

    Interpolating removes the evaluation grid's rounding (a run evaluated every 40 steps otherwise reaches a target
    "at step 80" whether it crossed at 41 or at 79), and reading the raw curve dates the crossing where it
    happened (a moving average dates it at its window's last evaluation, up to a window late)."""
    slack = -1e-12 if metric.higher_is_better else 1e-12
    prev: tuple[float, float] | None = None
    for rec in history or []:
        if not isinstance(rec, Mapping):
            continue
        v, x = metric.of_record(rec), finite_or_none(rec.get(field))
        if v is None or x is None:
            continue
        if metric.reaches(v, value + slack):
            if prev is None or v == prev[1]:
                return x
            frac = min(1.0, max(0.0, (value - prev[1]) / (v - prev[1])))
            return prev[0] + frac * (x - prev[0])
        prev = (x, v)
    return None


def best_config_mean(trials: Any, metric: Metric) -> float | None:
    """The best configuration's (batch size, LR multiplier) seed-mean :func:`final_quality` over the finished
    (``ok``) trials: what a fractional target is a fraction of, for the sweep's B_crit and the decision alike."""
    groups: dict[tuple[Any, Any], list[float]] = {}
    for t in trials or []:
        if _field(t, "status") != "ok":
            continue
        q = final_quality(_field(t, "history"), metric)
        if q is None:
            continue
        key = (_field(t, "batch_size"), float(_field(t, "lr_multiplier") or 1.0))
        groups.setdefault(key, []).append(q)
    if not groups:
        return None
    return metric.best([sum(v) / len(v) for v in groups.values()])
