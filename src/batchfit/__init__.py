"""batchfit: which batch size, and which learning rate with it, for *your* model on *your* hardware.

The public API is re-exported here and loaded lazily, so ``import batchfit`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchfit._lazy import lazy_exports
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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)
