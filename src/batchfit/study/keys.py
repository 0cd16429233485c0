"""Every key batchfit reads or writes in an Optuna study, in one place.

A sweep is one Optuna study. Study-level user attributes hold the sweep's configuration and the tune-level results
(under :data:`TUNE_NAMESPACE`); each trial's user attributes hold its configuration, its plan, its evaluation
records (one attribute per record, written as it happens), its summary and its outcome. Nothing else in the study
package spells these strings.
"""

from __future__ import annotations

__all__ = [
    "EVAL_PREFIX",
    "LEGACY_TUNE_ATTRS",
    "PARAM_BATCH_SIZE",
    "PARAM_LR_MULTIPLIER",
    "STATUS_DIVERGED",
    "STATUS_FAILED",
    "STATUS_INTERRUPTED",
    "STATUS_OK",
    "STATUS_RUNNING",
    "STATUS_WAITING",
    "STUDY_CONFIG",
    "STUDY_TARGET",
    "TRIAL_CONFIG",
    "TRIAL_DUPLICATE_OF",
    "TRIAL_ERROR",
    "TRIAL_ERROR_KIND",
    "TRIAL_PLAN",
    "TRIAL_RESULT",
    "TRIAL_RUN",
    "TRIAL_STATUS",
    "TRIAL_WORKER",
    "TUNE_NAMESPACE",
]

# -- study user attributes ---------------------------------------------------------------------------------------
STUDY_CONFIG = "config"  # the sweep's identity + grid (dict); a study without it is not a batchfit sweep
STUDY_TARGET = "target"  # the steps-to-target goal, parse_target() form
TUNE_NAMESPACE = "batchfit.tune."  # tune-level results: "batchfit.tune.find", "batchfit.tune.noise", ...
# stores written before the namespace existed kept these tune results as plain study attributes
LEGACY_TUNE_ATTRS = ("find", "noise", "lr_calibration", "precision_check")

# -- trial parameters (Optuna distributions; a grid, enqueued) ---------------------------------------------------
PARAM_BATCH_SIZE = "batch_size"
PARAM_LR_MULTIPLIER = "lr_multiplier"

# -- trial user attributes ---------------------------------------------------------------------------------------
TRIAL_CONFIG = "batchfit_config"  # {"key", "batch_size", "lr_multiplier"}: which grid point this trial runs
TRIAL_PLAN = "plan"  # micro-batch, accumulation, steps, LR... as planned when training starts
TRIAL_RESULT = "result"  # the engine's summary of a finished run
TRIAL_STATUS = "status"  # one of the STATUS_* values
TRIAL_ERROR = "error"  # one line: why the trial failed or diverged
TRIAL_ERROR_KIND = "error_kind"  # "workload" (the user's code or data), "memory", "config" or "internal"
TRIAL_WORKER = "worker"  # {"host", "pid", "start"}: who runs it (dead-worker recovery)
TRIAL_RUN = "run_id"  # which invocation ran it (a sweep() call, a whole tune): a failure is retried once per run
TRIAL_DUPLICATE_OF = "duplicate_of"  # a queue duplicate that stepped aside for this trial number
EVAL_PREFIX = "eval_"  # "eval_00000", "eval_00001", ...: the evaluation records, in order

# -- trial statuses ----------------------------------------------------------------------------------------------
STATUS_WAITING = "waiting"
STATUS_RUNNING = "running"
STATUS_OK = "ok"
STATUS_DIVERGED = "diverged"
STATUS_FAILED = "failed"
STATUS_INTERRUPTED = "interrupted"
