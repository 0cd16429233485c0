"""The batch-size sweep, persisted in an Optuna study: train every candidate batch (and a few LRs each) on an equal
budget, record every evaluation as it happens, resume after any interruption, share the work between processes.

The package, by job:

- :mod:`~batchfit.study.inputs`: the budget, the target, the candidate batch sizes, the LR multipliers, the grid;
- :mod:`~batchfit.study.keys`: every study / trial attribute key (one place);
- :mod:`~batchfit.study.store`: opening the store, the SQLite claim lock, heartbeats, dead-worker recovery,
  claiming a trial, and the tune-level namespace (:func:`write_namespace` / :func:`read_namespace`);
- :mod:`~batchfit.study.identity`: what makes a study's results what they are (model fingerprint, settings);
- :mod:`~batchfit.study.trial`: one trial trained with :func:`batchfit.engine.train` and recorded as it runs;
- :mod:`~batchfit.study.results`: :class:`TrialSummary`, :class:`SweepResult`, :func:`load_results`;
- :mod:`~batchfit.study.runner`: :func:`sweep` itself.

References: Shallue et al. 2019 (retune the LR at every batch size for a fair comparison; steps to a validation
goal), McCandlish et al. 2018 (the critical batch and the noise scale), Goyal et al. 2017 (linear scaling and
warm-up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchfit._lazy import lazy_exports

# The names load on first use: the argument checks (``study.inputs``) must not pull in torch and Optuna through
# ``study.runner`` (``batchfit sweep --budget weeks:3`` is refused in a tenth of a second).
_EXPORTS = {
    "WorkloadFingerprint": "batchfit.study.identity",
    "default_study_name": "batchfit.study.identity",
    "workload_fingerprint": "batchfit.study.identity",
    "BUDGET_KINDS": "batchfit.study.inputs",
    "DEFAULT_BUDGET": "batchfit.study.inputs",
    "EVALS_PER_TRIAL": "batchfit.study.inputs",
    "FULL_BATCH_MAX_N": "batchfit.study.inputs",
    "MAX_ACCUMULATION": "batchfit.study.inputs",
    "MAX_LR_SEARCH": "batchfit.study.inputs",
    "SMALL_BATCH_MAX_N": "batchfit.study.inputs",
    "Budget": "batchfit.study.inputs",
    "GridPoint": "batchfit.study.inputs",
    "config_key": "batchfit.study.inputs",
    "default_batch_sizes": "batchfit.study.inputs",
    "lr_multipliers": "batchfit.study.inputs",
    "lr_multipliers_by_batch": "batchfit.study.inputs",
    "make_grid": "batchfit.study.inputs",
    "parse_batch_sizes": "batchfit.study.inputs",
    "parse_budget": "batchfit.study.inputs",
    "parse_target": "batchfit.study.inputs",
    "TUNE_NAMESPACE": "batchfit.study.keys",
    "SweepFailedError": "batchfit.study.results",
    "SweepResult": "batchfit.study.results",
    "TrialSummary": "batchfit.study.results",
    "build_results": "batchfit.study.results",
    "load_results": "batchfit.study.results",
    "sweep": "batchfit.study.runner",
    "default_storage": "batchfit.study.store",
    "mask_url": "batchfit.study.store",
    "open_storage": "batchfit.study.store",
    "open_study": "batchfit.study.store",
    "read_namespace": "batchfit.study.store",
    "write_namespace": "batchfit.study.store",
    "SweepPlan": "batchfit.study.trial",
}

__all__ = [
    "BUDGET_KINDS",
    "DEFAULT_BUDGET",
    "EVALS_PER_TRIAL",
    "FULL_BATCH_MAX_N",
    "MAX_ACCUMULATION",
    "MAX_LR_SEARCH",
    "SMALL_BATCH_MAX_N",
    "TUNE_NAMESPACE",
    "Budget",
    "GridPoint",
    "SweepFailedError",
    "SweepPlan",
    "SweepResult",
    "TrialSummary",
    "WorkloadFingerprint",
    "build_results",
    "config_key",
    "default_batch_sizes",
    "default_storage",
    "default_study_name",
    "load_results",
    "lr_multipliers",
    "lr_multipliers_by_batch",
    "make_grid",
    "mask_url",
    "open_storage",
    "open_study",
    "parse_batch_sizes",
    "parse_budget",
    "parse_target",
    "read_namespace",
    "sweep",
    "workload_fingerprint",
    "write_namespace",
]

if TYPE_CHECKING:  # pragma: no cover
    from batchfit.study.identity import WorkloadFingerprint, default_study_name, workload_fingerprint
    from batchfit.study.inputs import (
        BUDGET_KINDS,
        DEFAULT_BUDGET,
        EVALS_PER_TRIAL,
        FULL_BATCH_MAX_N,
        MAX_ACCUMULATION,
        MAX_LR_SEARCH,
        SMALL_BATCH_MAX_N,
        Budget,
        GridPoint,
        config_key,
        default_batch_sizes,
        lr_multipliers,
        lr_multipliers_by_batch,
        make_grid,
        parse_batch_sizes,
        parse_budget,
        parse_target,
    )
    from batchfit.study.keys import TUNE_NAMESPACE
    from batchfit.study.results import SweepFailedError, SweepResult, TrialSummary, build_results, load_results
    from batchfit.study.runner import sweep
    from batchfit.study.store import (
        default_storage,
        mask_url,
        open_storage,
        open_study,
        read_namespace,
        write_namespace,
    )
    from batchfit.study.trial import SweepPlan


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)
