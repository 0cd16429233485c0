"""batchfit: which batch size, and which learning rate with it, for *your* model on *your* hardware.

The public API is re-exported here and loaded lazily, so ``import batchfit`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from batchfit._version import __version__

_EXPORTS = {
    "Workload": "batchfit.workload",
    "load_workload": "batchfit.loading",
    "train": "batchfit.engine",
    "TrainResult": "batchfit.engine",
    "scale_lr": "batchfit.scaling",
    "ScaledHyperparameters": "batchfit.scaling",
    "find_batch_size": "batchfit.finder",
    "noise_scale": "batchfit.noise",
    "sweep": "batchfit.study",
    "tune": "batchfit.tuning",
    "TuneResult": "batchfit.tuning",
    "recommend": "batchfit.recommend",
    "Recommendation": "batchfit.recommend",
    "load_results": "batchfit.study",
    "SweepResult": "batchfit.study",
    "write_report": "batchfit.report",
    "BatchfitError": "batchfit.errors",
    "ConfigError": "batchfit.errors",
    "WorkloadError": "batchfit.errors",
    "DataError": "batchfit.errors",
    "NoisyEstimateWarning": "batchfit.errors",
    "plan": "batchfit.planner",
    "PlanResult": "batchfit.planner",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from batchfit.engine import TrainResult, train
    from batchfit.errors import BatchfitError, ConfigError, DataError, NoisyEstimateWarning, WorkloadError
    from batchfit.finder import find_batch_size
    from batchfit.loading import load_workload
    from batchfit.noise import noise_scale
    from batchfit.planner import PlanResult, plan
    from batchfit.recommend import Recommendation, recommend
    from batchfit.report import write_report
    from batchfit.scaling import ScaledHyperparameters, scale_lr
    from batchfit.study import SweepResult, load_results, sweep
    from batchfit.tuning import TuneResult, tune
    from batchfit.workload import Workload


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batchfit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
