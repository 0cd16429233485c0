"""One base error, a few specific ones, and the warning categories.

Every error batchfit raises for bad input is a :class:`BatchfitError`; its message is one line that says what was
wrong and what to do. The CLI prints it and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

__all__ = [
    "BatchfitError",
    "ConfigError",
    "DataError",
    "LeaderStoppedError",
    "NoisyEstimateWarning",
    "SweepFailedError",
    "WorkloadError",
]


class BatchfitError(Exception):
    """Base class of every error batchfit raises on purpose."""


class ConfigError(BatchfitError, ValueError):
    """An argument or option has a value batchfit cannot use."""


class WorkloadError(BatchfitError):
    """The workload could not be loaded or does not behave as a workload must."""


class DataError(WorkloadError):
    """The workload's data is unusable (empty, non-finite, wrong shape)."""


class LeaderStoppedError(BatchfitError):
    """Under torchrun, ``tune`` and ``sweep`` decide on rank 0 and the other ranks follow
    (:func:`batchfit.distributed.follow`); when rank 0 stops on an error, every follower raises this, carrying rank
    0's one line and exit code. The CLI exits with that code and prints nothing more (rank 0 has said it)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class SweepFailedError(RuntimeError):
    """Every trial of a sweep failed on something that is not the user's workload (a batchfit bug). Not a
    :class:`BatchfitError`: nothing the user gave was wrong, so the CLI shows it as the bug it is."""


class NoisyEstimateWarning(UserWarning):
    """A measured quantity's confidence interval is too wide to trust."""
