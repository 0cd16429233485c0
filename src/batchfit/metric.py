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

__all__ = ["LOSS_NAMES", "Metric", "finite_or_none"]

LOSS_NAMES = ("val_loss", "train_loss")


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

    def of_trial(self, trial: Mapping[str, Any]) -> float | None:
        """A trial summary's best value (``best_val_metrics`` / ``best_val_loss`` / ``best_train_loss``)."""
        if self.name == "val_loss":
            return finite_or_none(trial.get("best_val_loss"))
        if self.name == "train_loss":
            v = finite_or_none(trial.get("best_train_loss"))
            return v if v is not None else finite_or_none(trial.get("final_train_loss"))
        return finite_or_none((trial.get("best_val_metrics") or {}).get(self.name))

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
