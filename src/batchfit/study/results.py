"""The sweep's results, typed: one :class:`TrialSummary` per grid point and the :class:`SweepResult`.

Both are rebuilt from the store alone (:func:`load_results`, what ``batchfit report STORE`` uses), so a resumed
or merged sweep gives the same numbers as an uninterrupted one. ``to_dict()`` gives the results.json structure
(keys are added over versions, never renamed); ``from_dict()`` reads it back, keeping keys it does not know.

Steps-to-target is computed here, after the sweep, because the target depends on the finished trials: a fraction
of the best configuration's seed-mean final quality (:func:`batchfit.metric.best_config_mean`), reached where each
trial's raw evaluation curve first crosses it, interpolated (:func:`batchfit.metric.crossing`; Shallue et al. 2019,
steps to a validation goal with the LR retuned per batch size). The critical batch is the fit
``S(B) = S_min (1 + B_crit / B)`` of :mod:`batchfit.critical` (McCandlish et al. 2018) over each (batch size,
seed)'s best-LR steps pooled by their geometric mean: the estimator of
:func:`batchfit.stats.critical_batch_interval`, so the B_crit printed is the one the decision uses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchfit.critical import fit_critical_batch, pooled_points, seed_points
from batchfit.errors import ConfigError, SweepFailedError, WorkloadError
from batchfit.metric import Metric, best_config_mean, crossing
from batchfit.study import keys as K
from batchfit.study.inputs import parse_target
from batchfit.study.integrity import check_sqlite_schema, check_study, not_json, sqlite_file
from batchfit.study.store import mask_url, normalize_url, open_study, optuna_module, read_namespace

__all__ = [
    "USER_ERROR_KINDS",
    "SweepFailedError",
    "SweepResult",
    "TrialSummary",
    "build_results",
    "load_results",
    "summarize_trial",
]

USER_ERROR_KINDS = ("workload", "memory", "config")
_STATUS_ORDER = {K.STATUS_OK: 0, K.STATUS_DIVERGED: 1, K.STATUS_RUNNING: 2, K.STATUS_FAILED: 3}
_TOP_TUNE_KEYS = ("find", "noise")  # always present in results.json (None when not measured)


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrialSummary:
    """One grid point's outcome: its configuration, status, quality, speed, memory, steps to the target, B_simple.

    The ``best_*`` values are over the trial's evaluations; ``best_metric`` is the ranking metric's best
    (:class:`batchfit.metric.Metric`; ``train_loss`` for a workload without validation data).
    """

    trial_number: int | None = None
    batch_size: int
    micro_batch_size: int | None = None
    accumulation_steps: int | None = None
    lr: float | None = None
    lr_multiplier: float = 1.0
    lr_rule: str | None = None
    warmup_steps: int | None = None
    status: str
    error: str | None = None
    best_val_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    final_val_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    best_val_loss: float | None = None
    final_val_loss: float | None = None
    best_metric: float | None = None
    generalization_gap: float | None = None
    samples_per_s: float | None = None
    peak_memory_bytes: int | None = None
    steps_to_target: float | None = None  # interpolated between evaluations
    epochs_to_target: float | None = None
    seconds_to_target: float | None = None
    samples_to_target: float | None = None
    b_simple: float | None = None  # the median of the trial's running B_simple: not at a stated training loss
    b_simple_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    noise_split: bool | None = None
    noise_method: str | None = None  # accumulation | extra-halves | None: how the trial measured B_simple
    noise_samples: int | None = None  # samples the extra-halves passes trained on (forward/backward, no step)
    sharpness: float | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    steps: int | None = None
    planned_steps: int | None = None
    epochs: float | None = None
    samples: int | None = None
    seconds: float | None = None
    diverged_at_step: int | None = None
    # added in the typed results (new keys; the ones above are the original results.json)
    best_train_loss: float | None = None
    final_train_loss: float | None = None
    error_kind: str | None = None
    seed: int | None = None  # the replicate seed this trial trained with
    optimizer: dict[str, Any] | None = None  # the optimizer's class and param-group settings as it trained
    grad_clip: float | None = None
    lr_schedule: str | None = None
    lr_scaling: dict[str, Any] | None = None  # what the LR rule did (batchfit.scaling), outside_range included
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # keys this version does not know

    @property
    def finished(self) -> bool:
        return self.status in (K.STATUS_OK, K.STATUS_DIVERGED)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "trial") -> TrialSummary:
        """Read a trial of results.json; a malformed one is a one-line :class:`ConfigError` naming it and the key."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where} is not an object (got {type(d).__name__})")
        b = d.get("batch_size")
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"{where}: 'batch_size' must be a positive integer, got {b!r}")
        if not _nonempty_str(d.get("status")):
            raise ConfigError(f"{where} (batch {b}): 'status' must be a string, got {d.get('status')!r}")
        for key in ("history", "b_simple_history"):
            if d.get(key) is not None and not isinstance(d.get(key), list):
                raise ConfigError(f"{where} (batch {b}): {key!r} must be a list, got {type(d.get(key)).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepResult:
    """A sweep's results: the settings, every trial, the best LR per batch size, the target, B_crit, B_simple,
    and the tune-level results stored in the study's namespace (``tune``: find, noise, LR check, precision).

    Read by attribute (``result.trials``, ``result.counts``, ``result.find``); :meth:`to_dict` is its results.json
    form.
    """

    workload: str
    device: str | None = None
    precision: str | None = None
    budget: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr_rule: str | None = None
    warmup: Any = None
    seed: int | None = None
    target: dict[str, Any] = dataclasses.field(default_factory=dict)
    primary_metric: str = "val_loss"
    higher_is_better: bool = False
    study_name: str | None = None
    storage: str | None = None
    batch_sizes: list[int] | None = None
    lr_multipliers: list[float] | None = None
    micro_batch_limit: int | None = None  # the largest micro-batch that fits (results.json: micro_batch_size)
    micro_batch_source: str | None = None
    num_train: int | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    trials: tuple[TrialSummary, ...] = ()
    best_per_batch: tuple[TrialSummary, ...] = ()
    critical_batch_size: dict[str, Any] | None = None
    critical_batch_size_reason: str | None = None
    # the median over batch sizes of each best trial's median B_simple: kept for old readers, but not at any stated
    # training loss (B_simple grows as the loss falls); the report and the recommendation pool every trial's records
    # against the training loss instead (batchfit.noise.b_simple_against_loss)
    b_simple: float | None = None
    tune: dict[str, Any] = dataclasses.field(default_factory=dict)
    tolerance: float | None = None  # the non-inferiority margin tune decided with (its stages.json); None: not known
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- derived ---------------------------------------------------------------------------------------------
    @property
    def metric(self) -> Metric:
        return Metric(self.primary_metric, bool(self.higher_is_better))

    @property
    def find(self) -> Any:
        return self.tune.get("find")

    @property
    def noise(self) -> Any:
        return self.tune.get("noise")

    @property
    def status(self) -> str:
        """``complete`` (every grid point settled, at least one trained to the end), ``running`` (some queued or
        running), ``failed`` (every trial failed: nothing to rank) or ``empty`` (no trial)."""
        if not self.trials:
            return "empty"
        if self.counts.get("waiting") or any(t.status == K.STATUS_RUNNING for t in self.trials):
            return "running"
        if not any(t.finished for t in self.trials):
            return "failed"
        return "complete"

    def failures(self) -> list[TrialSummary]:
        return [t for t in self.trials if t.status == K.STATUS_FAILED]

    def raise_for_status(self) -> None:
        """Raise when every trial failed: :class:`WorkloadError` naming the first error when the failures were the
        user's (workload code or data, memory, a setting), :class:`SweepFailedError` otherwise."""
        if self.status != "failed":
            return
        failed = self.failures()
        first = min(failed, key=lambda t: (t.trial_number is None, t.trial_number or 0)) if failed else None
        what = (f"batch {first.batch_size}, LR x{first.lr_multiplier:g}: {first.error}" if first else "no error")
        message = (f"every trial of the sweep failed ({len(failed)} of {len(self.trials)}); the first: {what}. Fix "
                   "the workload and rerun with --retry-failed (retry_failed=True)")
        if all((t.error_kind or "workload") in USER_ERROR_KINDS for t in failed):
            raise WorkloadError(message)
        raise SweepFailedError(message)

    # -- the results.json form ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self._dict

    @functools.cached_property
    def _dict(self) -> dict[str, Any]:
        trials = [t.to_dict() for t in self.trials]
        by_id = {id(t): d for t, d in zip(self.trials, trials)}  # best_per_batch shares the trials' dicts
        out: dict[str, Any] = {
            "workload": self.workload, "device": self.device, "precision": self.precision, "budget": self.budget,
            "lr_rule": self.lr_rule, "warmup": self.warmup, "seed": self.seed, "target": self.target,
            "primary_metric": self.primary_metric, "higher_is_better": self.higher_is_better,
            "study_name": self.study_name, "storage": self.storage, "batch_sizes": self.batch_sizes,
            "lr_multipliers": self.lr_multipliers, "micro_batch_size": self.micro_batch_limit,
            "micro_batch_source": self.micro_batch_source, "num_train": self.num_train, "counts": self.counts,
            "trials": trials,
            "best_per_batch": [by_id.get(id(t)) or t.to_dict() for t in self.best_per_batch],
            "critical_batch_size": self.critical_batch_size,
            "critical_batch_size_reason": self.critical_batch_size_reason, "b_simple": self.b_simple,
        }
        for key in _TOP_TUNE_KEYS:
            out[key] = self.tune.get(key)
        for key, value in self.tune.items():
            out.setdefault(key, value)
        out["micro_batch_limit"] = self.micro_batch_limit
        out["status"] = self.status
        if self.tolerance is not None:
            out["tolerance"] = self.tolerance
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepResult:
        """Read a results.json (a sweep's, or tune's with its extra keys, which are kept in ``extra``)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"sweep results must be an object, got {type(d).__name__}")
        raw = d.get("trials")
        if not isinstance(raw, list):
            raise ConfigError("sweep results have no 'trials' list; give a results.json written by batchfit")
        trials = tuple(TrialSummary.from_dict(t, f"trial {i}") for i, t in enumerate(raw))
        best = []
        for i, t in enumerate(d.get("best_per_batch") or []):
            same = next((s for s, r in zip(trials, raw) if r == t), None)
            best.append(same or TrialSummary.from_dict(t, f"best_per_batch {i}"))
        fields = {f.name for f in dataclasses.fields(cls)} - {"trials", "best_per_batch", "tune", "extra",
                                                             "micro_batch_limit"}
        tune_keys = set(_TOP_TUNE_KEYS) | set(K.LEGACY_TUNE_ATTRS)
        derived = {"trials", "best_per_batch", "micro_batch_size", "micro_batch_limit", "status"}
        return cls(
            **{k: v for k, v in d.items() if k in fields},
            micro_batch_limit=d.get("micro_batch_size", d.get("micro_batch_limit")),
            trials=trials, best_per_batch=tuple(best),
            tune={k: d[k] for k in tune_keys if d.get(k) is not None},
            extra={k: v for k, v in d.items() if k not in fields and k not in tune_keys and k not in derived},
        )


# ---------------------------------------------------------------------------------------------------------------
# Rebuilding the results from the store


def _status_of(t: Any) -> str:
    TrialState = optuna_module().trial.TrialState
    stored = t.user_attrs.get(K.TRIAL_STATUS)
    if t.state == TrialState.COMPLETE:
        return stored if stored in (K.STATUS_OK, K.STATUS_DIVERGED) else K.STATUS_OK
    if t.state == TrialState.RUNNING:
        return K.STATUS_RUNNING
    return K.STATUS_FAILED


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def summarize_trial(t: Any, metric: Metric, default_seed: int | None = None) -> TrialSummary:
    """One stored trial -> its summary (without the target-dependent fields). ``default_seed``: the sweep's seed,
    for trials stored before the seed was recorded per trial."""
    attrs = t.user_attrs
    cfg, plan, res = attrs[K.TRIAL_CONFIG], attrs.get(K.TRIAL_PLAN) or {}, attrs.get(K.TRIAL_RESULT) or {}
    history = [attrs[k] for k in sorted(k for k in attrs if k.startswith(K.EVAL_PREFIX))]
    status = _status_of(t)
    error = attrs.get(K.TRIAL_ERROR)
    if status == K.STATUS_FAILED and not error:
        error = "interrupted: the worker stopped before the trial finished; re-run to retry"
    scored = [(v, r) for r in history if (v := metric.of_record(r)) is not None]
    best_rec = (max if metric.higher_is_better else min)(scored, key=lambda p: p[0])[1] if scored else None
    final = history[-1] if history else {}
    bs_hist = res.get("b_simple_history") or [r for r in history if "b_simple" in r]
    # the EMA |G|^2 and tr(Sigma) (and the record's train_loss) are kept: older trials, whose evaluation records
    # carry no noise_window, are pooled against the training loss from them (batchfit.noise.noise_records)
    bs_hist = [{"step": h.get("step"), "epoch": h.get("epoch"), "b_simple": h.get("b_simple"),
                **{k: h[k] for k in ("grad_norm_sq", "trace_cov", "train_loss") if h.get(k) is not None}}
               for h in bs_hist]
    bs_vals = _finite([h["b_simple"] for h in bs_hist])
    train_losses = _finite([r.get("train_loss") for r in history])
    val_losses = _finite([r.get("val_loss") for r in history])
    sharp = res.get("sharpness")
    return TrialSummary(
        trial_number=t.number, batch_size=int(cfg["batch_size"]),
        micro_batch_size=res.get("micro_batch_size") or plan.get("micro_batch_size"),
        accumulation_steps=res.get("accumulation_steps") or plan.get("accumulation_steps"),
        lr=res.get("lr") if res.get("lr") is not None else plan.get("lr"),
        lr_multiplier=float(cfg["lr_multiplier"]), lr_rule=res.get("lr_rule"),
        warmup_steps=res.get("warmup_steps", plan.get("warmup_steps")), status=status, error=error,
        best_val_metrics=dict(best_rec.get("val_metrics") or {}) if best_rec else {},
        final_val_metrics=dict(final.get("val_metrics") or {}),
        best_val_loss=min(val_losses) if val_losses else None, final_val_loss=final.get("val_loss"),
        best_metric=metric.of_record(best_rec) if best_rec else None,
        generalization_gap=final.get("generalization_gap"), samples_per_s=res.get("samples_per_s"),
        peak_memory_bytes=res.get("peak_memory_bytes"),
        b_simple=statistics.median(bs_vals) if bs_vals else None, b_simple_history=bs_hist,
        noise_split=plan.get("noise_split"), noise_method=res.get("noise_method", plan.get("noise_method")),
        noise_samples=res.get("noise_samples"),
        sharpness=sharp.get("top_eigenvalue") if isinstance(sharp, Mapping) else sharp, history=history,
        steps=res.get("steps", final.get("step")), planned_steps=plan.get("steps"),
        epochs=res.get("epochs", final.get("epoch")), samples=res.get("samples", final.get("samples")),
        seconds=res.get("seconds", final.get("seconds")), diverged_at_step=res.get("diverged_at_step"),
        best_train_loss=min(train_losses) if train_losses else None, final_train_loss=final.get("train_loss"),
        error_kind=attrs.get(K.TRIAL_ERROR_KIND) if status == K.STATUS_FAILED else None,
        seed=next((v for v in (cfg.get("seed"), plan.get("seed"), res.get("seed")) if v is not None), default_seed),
        optimizer=plan.get("optimizer"), grad_clip=res.get("grad_clip"), lr_schedule=res.get("lr_schedule"),
        lr_scaling=res.get("lr_scaling"),
    )


def _to_target(t: TrialSummary, metric: Metric, value: float | None) -> TrialSummary:
    """The summary with where its raw evaluation curve first reaches ``value`` (steps, epochs, seconds, samples),
    interpolated between evaluations (:func:`batchfit.metric.crossing`)."""
    if value is None:
        return t
    step = crossing(t.history, metric, value, "step")
    if step is None:
        return t
    return dataclasses.replace(t, steps_to_target=step, epochs_to_target=crossing(t.history, metric, value, "epoch"),
                               seconds_to_target=crossing(t.history, metric, value, "train_seconds"),
                               samples_to_target=crossing(t.history, metric, value, "samples"))


def _rank(t: TrialSummary, metric: Metric) -> tuple[int, float]:
    q = t.best_metric
    score = -math.inf if q is None else (q if metric.higher_is_better else -q)
    return (-_STATUS_ORDER.get(t.status, 4), score)


def _target(spec: Mapping[str, Any], trials: Sequence[TrialSummary], metric: Metric) -> dict[str, Any]:
    """The sweep's one target: a fraction of the best configuration's seed-mean final quality
    (:func:`batchfit.metric.best_config_mean`), the same target the decision times every batch size to."""
    best = best_config_mean(trials, metric)
    label = metric.name if metric.is_loss else f"validation {metric.name}"
    higher = metric.higher_is_better
    if spec["kind"] == "absolute":
        value: float | None = spec["value"]
        definition = f"{label} {'>=' if higher else '<='} {spec['value']:g} (absolute)"
    elif best is None:
        value, definition = None, f"{spec['value']:.0%} of the best {label}: no finished trial yet"
    else:
        value = best * spec["value"] if higher else best / spec["value"]
        definition = (f"{label} >= {value:.4g} = {spec['value']:.0%} of the best configuration's seed-mean final "
                      f"{metric.name} ({best:.4g})" if higher else
                      f"{label} <= {value:.4g} = the best configuration's seed-mean final {metric.name} "
                      f"({best:.4g}) / {spec['value']:g}")
    return {"kind": spec["kind"], "fraction": spec["value"] if spec["kind"] == "fraction" else None,
            "value": value, "best": best, "metric": metric.name, "higher_is_better": higher,
            "definition": definition}


def _chosen_trials(study: Any) -> list[Any]:
    """Per grid point, the trial that speaks for it: complete over running over failed, then the latest."""
    TrialState = optuna_module().trial.TrialState
    rank = {TrialState.COMPLETE: 3, TrialState.RUNNING: 2, TrialState.FAIL: 1}
    chosen: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        cfg = t.user_attrs.get(K.TRIAL_CONFIG)
        if not cfg or t.state not in rank or t.user_attrs.get(K.TRIAL_DUPLICATE_OF) is not None:
            continue
        cur = chosen.get(cfg["key"])
        if cur is None or (rank[t.state], t.number) > (rank[cur.state], cur.number):
            chosen[cfg["key"]] = t
    return list(chosen.values())


def build_results(study: Any, storage_url: str, target: Any = None) -> SweepResult:
    """The :class:`SweepResult` of a study, from the store alone."""
    TrialState = optuna_module().trial.TrialState
    attrs = study.user_attrs
    cfg = attrs.get(K.STUDY_CONFIG)
    if not cfg:
        raise ConfigError(f"study {study.study_name!r} is not a batchfit sweep (it has no batchfit config)")
    metric = Metric(cfg["primary_metric"], bool(cfg["higher_is_better"]))
    trials = sorted((summarize_trial(t, metric, cfg.get("seed")) for t in _chosen_trials(study)),
                    key=lambda s: (s.batch_size, s.lr_multiplier, s.seed or 0))
    tgt = _target(parse_target(target if target is not None else (attrs.get(K.STUDY_TARGET) or 0.97)), trials,
                  metric)
    trials = [_to_target(t, metric, tgt["value"]) for t in trials]
    sizes = sorted({t.batch_size for t in trials})
    best_per_batch = [max((t for t in trials if t.batch_size == b), key=lambda t: _rank(t, metric)) for b in sizes]
    points = pooled_points(seed_points(trials))  # the estimator of stats.critical_batch_interval
    crit, reason = (None, "no target yet: no trial has finished") if tgt["value"] is None else \
        fit_critical_batch(points)
    bs_values = [t.b_simple for t in best_per_batch if t.status == K.STATUS_OK and t.b_simple is not None]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    counts["waiting"] = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                            if t.user_attrs.get(K.TRIAL_CONFIG))
    return SweepResult(
        workload=cfg["workload"], device=cfg["device"], precision=cfg["precision"], budget=cfg["budget"],
        lr_rule=cfg["lr_rule"], warmup=cfg.get("warmup"), seed=cfg.get("seed"), target=tgt,
        primary_metric=metric.name, higher_is_better=metric.higher_is_better, study_name=study.study_name,
        storage=storage_url, batch_sizes=cfg.get("batch_sizes"), lr_multipliers=cfg.get("lr_multipliers"),
        micro_batch_limit=cfg.get("micro_batch_size"), micro_batch_source=cfg.get("micro_batch_source"),
        num_train=cfg.get("num_train"), counts=counts, trials=tuple(trials), best_per_batch=tuple(best_per_batch),
        critical_batch_size=crit, critical_batch_size_reason=reason,
        b_simple=statistics.median(bs_values) if bs_values else None, tune=read_namespace(study),
        extra={k: cfg[k] for k in ("num_val", "lr_multipliers_by_batch", "weight_decay_rule", "world_size",
                                   "parallel") if cfg.get(k) is not None},
    )


STAGES_FILE = "stages.json"  # tune's stage results and tolerance, in its out_dir beside the store


def load_results(storage: str | Any, study_name: str | None = None, *, target: float | str | None = None,
                 out_dir: str | Path | None = None) -> SweepResult:
    """Rebuild a sweep's :class:`SweepResult`: its trials from the store, and tune's stages (find, noise, LR
    check, step time, precision check, the train budget) and tolerance from ``tune``'s out_dir.

    ``storage``: an Optuna storage URL, or ``tune``'s (or ``sweep``'s) out_dir, whose ``batchfit.db`` holds the
    trials and whose :data:`STAGES_FILE` holds tune's stages (a SQLite store's own folder is looked in too).
    ``out_dir``: where the stages are when the trials are in another store (``tune(storage="postgresql://...")``).
    A study written by an older batchfit kept tune's stages in its namespace; they are read from there when there
    is no stages file. ``study_name`` may be left out when the store holds one study. ``target`` recomputes
    steps-to-target for another target than the one stored.
    """
    if isinstance(storage, (str, Path)) and "://" not in str(storage) and Path(storage).is_dir():
        folder = Path(storage)
        out_dir = folder if out_dir is None else out_dir
        if not (folder / "batchfit.db").is_file():
            raise ConfigError(f"{str(folder)!r} holds no batchfit.db; give the store's URL, with "
                              f"out_dir={str(folder)!r} for tune's stages")
        storage = f"sqlite:///{(folder / 'batchfit.db').resolve()}"
    if out_dir is None and isinstance(storage, str):  # tune's default store: its stages file is beside it
        file = sqlite_file(normalize_url(storage))
        if file is not None and (file.parent / STAGES_FILE).is_file():
            out_dir = file.parent
    result = _load_store(storage, study_name, target)
    if out_dir is None:
        return result
    stages, tolerance = read_stages(Path(out_dir))
    if not stages and tolerance is None:
        return result
    return dataclasses.replace(result, tune={**result.tune, **stages}, tolerance=tolerance)


def read_stages(out_dir: Path) -> tuple[dict[str, Any], float | None]:
    """``(tune's stages, its tolerance)`` from ``out_dir``'s :data:`STAGES_FILE` (empty and None without one)."""
    path = out_dir / STAGES_FILE
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r} is not readable JSON ({exc}); delete it and run tune again") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
        raise ConfigError(f"{str(path)!r} is not a stages file written by tune; delete it and run tune again")
    tol = data.get("tolerance")
    tol = float(tol) if isinstance(tol, (int, float)) and not isinstance(tol, bool) else None
    return {k: v for k, v in (data.get("stages") or {}).items() if v is not None}, tol


def _load_store(storage: str | Any, study_name: str | None, target: float | str | None) -> SweepResult:
    url = mask_url(storage if isinstance(storage, str) else type(storage).__name__)
    if isinstance(storage, str):  # read-only first: opening with Optuna would re-create a dropped table
        file = sqlite_file(normalize_url(storage))
        if file is not None and file.is_file():
            check_sqlite_schema(file, repr(url))
    try:
        study = open_study(storage, study_name)
    except json.JSONDecodeError as exc:  # a study attribute that is not JSON: Optuna decodes them all on opening
        raise not_json(repr(url), exc) from None
    check_study(study, repr(url))
    return build_results(study, url, target)
