"""``sweep()``: validate, open the study, lay out the grid, then claim and train trials until none is left.

One sweep is one Optuna study. Each grid point ``(batch size, LR multiplier)`` is enqueued as a trial with fixed
parameters (a grid, not a sampler), so every configuration runs once even when several worker processes share the
study. Resume: the same call opens the same study (its name is a digest of everything that changes a result,
:mod:`batchfit.study.identity`); completed trials are not re-run, failed ones are kept unless ``retry_failed`` (then
each is retried once per call: a failure that persists ends the call, recorded), and a trial left RUNNING by a dead
worker is failed and re-run from the start (at once when its pid is gone on this machine, otherwise when its
heartbeat goes stale).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from batchfit import checks
from batchfit._io import to_jsonable
from batchfit._version import __version__
from batchfit.errors import BatchfitError, ConfigError
from batchfit.loading import load_workload
from batchfit.metric import Metric
from batchfit.progress import ProgressFn
from batchfit.scaling import RULE_CHOICES, WEIGHT_DECAY_RULES
from batchfit.study import keys as K
from batchfit.study import store
from batchfit.study.identity import default_study_name, identity_differences, study_identity, workload_fingerprint
from batchfit.study.inputs import (
    DEFAULT_BUDGET,
    Budget,
    GridPoint,
    default_batch_sizes,
    lr_multipliers,
    lr_multipliers_by_batch,
    make_grid,
    parse_batch_sizes,
    parse_budget,
    parse_target,
)
from batchfit.study.integrity import check_study
from batchfit.study.results import SweepResult, build_results
from batchfit.study.trial import SweepPlan, run_trial, sweep_event
from batchfit.workload import Workload

__all__ = ["MAX_SEEDS", "sweep"]

MAX_SEEDS = 64  # replicate seeds per configuration


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """The validated arguments of one ``sweep()`` call."""

    workload: Workload
    device: str
    precision: str
    budget: Budget
    target: dict[str, Any]
    multipliers: list[float]
    metric: Metric
    batch_sizes: list[int] | None
    identity: dict[str, Any]
    rule: str = "linear"  # lr_rule with auto resolved by the optimizer family
    betas: tuple[float, float] | None = None  # the base optimizer's betas (Adam family)
    parallel: str = "ddp"  # under torchrun: how the ranks hold the model


def _validate(workload: Workload | str, *, batch_sizes: Any, budget: Any, lr_rule: str, lr_search: int,
              warmup: Any, target: Any, micro_batch_limit: Any, device: str, precision: str, seed: Any,
              eval_every: Any, weight_decay_rule: str = "keep", parallel: str = "ddp",
              sharpness: bool = False) -> _Inputs:
    from batchfit import distributed, sharding
    from batchfit.engine import check_precision, check_warmup, resolve_warmup
    from batchfit.runtime import resolve_device

    wl = load_workload(workload)
    dev = resolve_device(device)
    sharding.check_parallel(parallel, precision)
    world = distributed.world_size()
    if world > 1 and sharpness:
        raise ConfigError("sharpness is not measured under torchrun (the Hessian probe runs in one process); run "
                          "the sweep without --sharpness, or in one process")
    check_precision(precision, dev)
    bud = parse_budget(budget)
    tgt = parse_target(target)
    mults = lr_multipliers(lr_search)
    checks.one_of("lr_rule", lr_rule, RULE_CHOICES)
    checks.one_of("weight_decay_rule", weight_decay_rule, WEIGHT_DECAY_RULES)
    resolve_warmup(warmup, 1000)  # validates the value
    checks.positive_int("micro_batch_limit", micro_batch_limit, allow_none=True)
    checks.positive_int("eval_every", eval_every, allow_none=True)
    checks.seed(seed)
    if bud.kind == "epochs" and bud.value * wl.num_train < 1:
        raise ConfigError(f"budget {bud} is less than one sample; give more epochs")
    check_warmup(warmup, bud.steps_for(1, wl.num_train), "the longest trial this budget gives")
    asked = None if batch_sizes is None else parse_batch_sizes(batch_sizes)
    too_big = [b for b in asked or [] if b > wl.num_train]
    uneven = [b for b in asked or [] if b % world]
    if uneven:
        raise ConfigError(f"batch size(s) {', '.join(map(str, uneven))} do not split evenly over {world} ranks; give "
                          f"multiples of {world}")
    if too_big:
        raise ConfigError(
            f"batch size(s) {', '.join(map(str, too_big))} exceed the training set ({wl.num_train} samples); "
            f"use batch sizes <= {wl.num_train}"
        )
    fingerprint = workload_fingerprint(wl)
    if lr_rule == "adam-sqrt" and not fingerprint.adam_family:
        raise ConfigError(
            f"LR rule 'adam-sqrt' needs an Adam-family optimizer; the workload uses "
            f"{fingerprint.optimizer['class'].rsplit('.', 1)[-1]}. Use the linear or sqrt rule"
        )
    metric = Metric.for_workload(wl)
    identity = study_identity(wl, fingerprint, device=dev.type, precision=precision, budget=bud, lr_rule=lr_rule,
                              warmup=warmup, seed=seed, metric=metric, weight_decay_rule=weight_decay_rule,
                              world_size=world, parallel=parallel)
    rule = lr_rule if lr_rule != "auto" else ("adam-sqrt" if fingerprint.adam_family else "linear")
    betas = fingerprint.optimizer.get("defaults", {}).get("betas") if fingerprint.adam_family else None
    return _Inputs(wl, str(dev), precision, bud, tgt, mults, metric, asked, identity, rule,
                   None if betas is None else (float(betas[0]), float(betas[1])), parallel)


def _open_study(inputs: _Inputs, url: Any, study_name: str | None, seed: int) -> tuple[Any, dict[str, Any] | None]:
    optuna = store.optuna_module()
    name = study_name or default_study_name(inputs.identity)
    try:
        study = optuna.create_study(
            storage=store.open_storage(url), study_name=name, load_if_exists=True,
            direction="maximize" if inputs.metric.higher_is_better else "minimize",
            sampler=optuna.samplers.RandomSampler(seed=seed),
        )
    except BatchfitError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot open study {name!r} in {store.mask_url(url)!r}: {type(exc).__name__}: {exc}") \
            from exc
    check_study(study, repr(store.mask_url(url)))  # damaged attributes: one line here, not a TypeError mid-sweep
    stored = study.user_attrs.get(K.STUDY_CONFIG)
    if stored is not None:
        diff = identity_differences(stored, inputs.identity)
        if diff:
            shown = ", ".join(f"{k}={stored.get(k)!r}" for k in diff)[:400]
            raise ConfigError(f"study {name!r} was made with different settings ({shown}); give another study name, "
                              "or the same settings to resume it")
    return study, stored


def _memory_limit(workload: Workload, device: str, precision: str, seed: int,
                  parallel: str = "ddp") -> tuple[int | None, str]:
    """The largest micro-batch that fits (one rank's, under torchrun), from the finder when it is installed;
    ``(None, why)`` otherwise."""
    from batchfit import distributed

    try:
        from batchfit.finder import find_batch_size
    except ImportError:
        return None, "no finder available: every candidate runs without accumulation"
    try:
        found = distributed.everywhere(find_batch_size, workload, device=device, precision=precision, seed=seed,
                                       throughput=False, parallel=parallel)
    except BatchfitError as exc:
        return None, f"the finder failed ({exc}); every candidate runs without accumulation"
    data = found.to_dict() if hasattr(found, "to_dict") else dict(found)
    limit = data.get("max_batch_size")
    return (int(limit), "finder") if isinstance(limit, int) and limit > 0 else (None, "finder found no limit")


def _as_progress(progress: Any) -> ProgressFn | None:
    """The sweep's progress function: one :class:`~batchfit.progress.ProgressEvent` a call. A callable that
    needs two arguments (the ``(event, info)`` form before ProgressEvent) is refused before any work."""
    if progress is None:
        return None
    if not callable(progress):
        raise ConfigError(f"progress must be a function taking one ProgressEvent, got {type(progress).__name__}")
    try:
        params = [p for p in inspect.signature(progress).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return progress  # type: ignore[no-any-return]
    if len(params) > 1:
        raise ConfigError("progress takes one batchfit.progress.ProgressEvent (its stage, kind, message and data; "
                          "the sweep's event name is event.data['event']); the two-argument (event, info) form is "
                          "gone")
    return progress  # type: ignore[no-any-return]


def _work(study: Any, url: Any, grid: Sequence[GridPoint], plan: SweepPlan, retry_failed: bool) -> SweepResult:
    """Recover dead workers' trials, enqueue what is missing, claim, train; repeat until the queue is empty."""
    masked = store.mask_url(url)
    run_id = plan.run_id
    with store.store_lock(url):
        store.recover_stale(study)
        store.enqueue_missing(study, grid, retry_failed, run_id)
    pending = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name == "WAITING")
    failed_kept = 0 if retry_failed else store.count_failed_kept(study, grid)
    done = len(grid) - pending
    note = (f"; {failed_kept} failed trial(s) kept; rerun with --retry-failed (retry_failed=True) to run them again"
            if failed_kept else "")
    cfg = study.user_attrs[K.STUDY_CONFIG]
    sweep_event(plan.progress, "start", "start", f"{done} of {len(grid)} trial(s) already done{note}",
                completed=done, total=len(grid), pending=pending, failed_kept=failed_kept,
                study_name=study.study_name, storage=masked, batch_sizes=cfg["batch_sizes"],
                lr_multipliers=cfg["lr_multipliers"], lr_multipliers_by_batch=cfg.get("lr_multipliers_by_batch"),
                micro_batch_size=plan.micro_batch_limit,
                micro_batch_limit=plan.micro_batch_limit, budget=plan.budget.to_dict())
    index = done
    while True:
        with store.store_lock(url):
            store.recover_stale(study)
            store.enqueue_missing(study, grid, retry_failed, run_id)
            trial = store.claim(study, retry_failed, run_id)
        if trial is None:
            break
        index += 1
        outcome = run_trial(study, trial, plan, index)
        if plan.progress is not None:
            sweep_event(plan.progress, "update", "trial_end",
                        f"batch {outcome['batch_size']}: {outcome.get('status')}", completed=index,
                        total=len(grid), data=outcome, results=build_results(study, masked))
    results = build_results(study, masked)
    counts = ", ".join(f"{v} {k}" for k, v in results.counts.items() if v)
    sweep_event(plan.progress, "end", "done", f"{results.status}: {counts or 'no trials'}", completed=index,
                total=len(grid), results=results)
    return results


def sweep(
    workload: Workload | str,
    *,
    batch_sizes: Sequence[int] | str | None = None,
    budget: str | Budget = DEFAULT_BUDGET,
    lr_rule: str = "auto",
    lr_search: int = 1,
    warmup: int | float = 0,
    target: float | str = 0.97,
    weight_decay_rule: str = "keep",
    storage: str | None = None,
    study_name: str | None = None,
    micro_batch_limit: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    measure_noise: bool = True,
    sharpness: bool = False,
    eval_every: int | None = None,
    callbacks: Sequence[Any] = (),
    progress: ProgressFn | Callable[[str, dict[str, Any]], None] | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    retry_failed: bool = False,
    extremes: bool = True,
    micro_batch_size: int | None = None,
    seeds: int = 1,
    replicates: Mapping[int, int] | None = None,
    run_id: str | None = None,
    parallel: str = "ddp",
) -> SweepResult:
    """Train each candidate batch size (x ``lr_search`` learning rates) on an equal budget; persist and resume.

    Args:
        batch_sizes: effective batch sizes (default: :func:`default_batch_sizes`; on resume, the study's own).
        budget: ``epochs:E``, ``steps:S`` or ``samples:N``, the same for every trial.
        lr_rule: how the workload's base LR scales with the batch (``auto`` by optimizer family).
        lr_search: LRs tried per batch size around the scaled one (:func:`lr_multipliers`, at most 16). A batch
            size where the adam-sqrt rule is outside its range gets at least 3 (x1/2, x1, x2;
            :func:`lr_multipliers_by_batch`): its betas are batchfit's choice there, so its LR is searched.
        weight_decay_rule: ``keep`` (default) or ``timescale``: each batch's weight decay keeps the AdamW timescale
            ``B / (lr x weight_decay)`` of the base batch (:mod:`batchfit.scaling`).
        warmup: linear warm-up steps (>= 1) or fraction of each trial (< 1).
        target: fraction of the best metric any trial reached (``0.97``) or ``"abs:VALUE"``.
        storage: any Optuna storage URL (default ``sqlite:///<out_dir>/batchfit.db``).
        study_name: default ``sweep-<workload>-<digest of everything that changes a result>``, so the same call
            resumes the same study and a changed model or setting starts another.
        micro_batch_limit: the largest micro-batch that fits (the memory limit); bigger batches accumulate.
            Default: from the finder when available, else no limit. ``micro_batch_size`` is its former name.
        measure_noise: B_simple over training (:class:`batchfit.noise.NoiseCallback`); a batch that would run as
            one micro-batch is split in two for it (which costs some throughput; ``False`` to measure clean speed).
        sharpness: top Hessian eigenvalue of each final model (:mod:`batchfit.sharpness`).
        eval_every: evaluation interval in steps (default ~16 evaluations per trial).
        callbacks: extra engine callbacks for every trial.
        progress: called with a :class:`~batchfit.progress.ProgressEvent` (stage ``sweep``) per thing that
            happened; ``event.data["event"]`` names it: ``start`` (kind start), ``trial_start`` and ``step``
            (update), ``eval`` (record), ``trial_end`` (update; ``data["results"]`` is the result so far), ``done``
            (end).
        extra_attrs: tune-level results to store in the study's namespace (see :func:`store.write_namespace`).
        retry_failed: also re-run trials that failed with an error, once per call (interrupted ones are always
            re-run): a failure that persists ends the call with the failure recorded, never a loop.
        extremes: add B = 1 and full batch to the default candidates on small data sets.
        seeds: replicate seeds per configuration (``seed``, ``seed + 1``, ...), each one trial in the study, so a
            resumed sweep keeps and re-uses every seed; more seeds later add trials to the same study.
        replicates: ``{batch size: seeds}`` for some batch sizes only (racing, as ``tune`` does it).
        run_id: names the invocation for ``retry_failed`` (default: a new one per call): a trial that failed under
            the same ``run_id`` is not retried again, so ``tune`` gives all its sweep calls one id and retries each
            failed trial once per tune.

    Returns the :class:`SweepResult` (:func:`load_results` rebuilds it from the store alone). Its ``status`` is
    ``failed`` when every trial failed (:meth:`SweepResult.raise_for_status` raises then).
    """
    kwargs = {k: v for k, v in locals().items() if k != "workload"}  # every argument below, as given
    from batchfit import distributed

    return distributed.run_led(_sweep, workload, kwargs, load_workload)  # type: ignore[no-any-return]


def _sweep(workload: Workload | str, *, batch_sizes: Any, budget: Any, lr_rule: str, lr_search: int, warmup: Any,
           target: Any, weight_decay_rule: str, storage: Any, study_name: str | None, micro_batch_limit: int | None,
           device: str, precision: str, seed: int, measure_noise: bool, sharpness: bool, eval_every: int | None,
           callbacks: Sequence[Any], progress: Any, extra_attrs: Mapping[str, Any] | None, out_dir: Any,
           retry_failed: bool, extremes: bool, micro_batch_size: int | None, seeds: int,
           replicates: Mapping[int, int] | None, run_id: str | None, parallel: str) -> SweepResult:
    from batchfit import distributed

    if micro_batch_size is not None:
        if micro_batch_limit is not None and micro_batch_limit != micro_batch_size:
            raise ConfigError("give micro_batch_limit or its former name micro_batch_size, not both")
        micro_batch_limit = micro_batch_size
    if run_id is not None and (not isinstance(run_id, str) or not run_id.strip()):
        raise ConfigError(f"run_id must be a non-empty string, got {run_id!r}")
    checks.positive_int("seeds", seeds, maximum=MAX_SEEDS)
    for n in (replicates or {}).values():
        checks.positive_int("replicates", n, maximum=MAX_SEEDS)
    checks.seed_range(seed, max([seeds, *(replicates or {}).values()]))  # the last replicate seed too, up front
    progress = _as_progress(progress)
    inputs = _validate(workload, batch_sizes=batch_sizes, budget=budget, lr_rule=lr_rule, lr_search=lr_search,
                       warmup=warmup, target=target, micro_batch_limit=micro_batch_limit, device=device,
                       precision=precision, seed=seed, eval_every=eval_every, weight_decay_rule=weight_decay_rule,
                       parallel=parallel, sharpness=sharpness)
    distributed.lead_workload(inputs.workload)
    url = storage if storage is not None else store.default_storage(out_dir)
    url = store.normalize_url(url) if isinstance(url, str) else url  # or an Optuna storage object
    study, stored = _open_study(inputs, url, study_name, seed)
    limit, source = micro_batch_limit, "given"
    if limit is None and stored is not None:  # resume with the memory limit the study started with
        limit, source = stored.get("micro_batch_size"), stored.get("micro_batch_source", "stored")
    elif limit is None:
        limit, source = _memory_limit(inputs.workload, inputs.device, precision, seed, inputs.parallel)
    if inputs.batch_sizes is not None:
        sizes = inputs.batch_sizes
    elif stored is not None and stored.get("batch_sizes"):
        sizes = list(stored["batch_sizes"])
    else:
        sizes = default_batch_sizes(inputs.workload.num_train, limit, inputs.workload.base_batch_size,
                                    extremes=extremes)
        world = distributed.world_size()
        sizes = [b for b in sizes if b % world == 0] if world > 1 else sizes  # every rank gets an equal share
    by_batch = lr_multipliers_by_batch(sizes, lr_search, rule=inputs.rule,
                                       base_batch_size=inputs.workload.base_batch_size, betas=inputs.betas)
    grid = make_grid(sizes, inputs.multipliers, seeds=seeds, base_seed=seed, replicates=replicates,
                     by_batch=by_batch)
    config = dict(inputs.identity, batch_sizes=sizes, lr_multipliers=inputs.multipliers, micro_batch_size=limit,
                  micro_batch_source=source, measure_noise=bool(measure_noise), sharpness=bool(sharpness),
                  eval_every=eval_every, batchfit_version=__version__)
    if by_batch:  # the batch sizes outside the LR rule's range, with their own (wider) LR search
        config["lr_multipliers_by_batch"] = {str(b): m for b, m in sorted(by_batch.items())}
    study.set_user_attr(K.STUDY_CONFIG, to_jsonable(config))
    study.set_user_attr(K.STUDY_TARGET, inputs.target)
    for key, value in (extra_attrs or {}).items():
        store.write_namespace(study, str(key), value)
    plan = SweepPlan(workload=inputs.workload, metric=inputs.metric, budget=inputs.budget, micro_batch_limit=limit,
                     measure_noise=bool(measure_noise), sharpness=bool(sharpness), eval_every=eval_every, seed=seed,
                     lr_rule=lr_rule, warmup=warmup, precision=precision, device=inputs.device, total=len(grid),
                     callbacks=tuple(callbacks), progress=progress,
                     weight_decay_rule=weight_decay_rule, run_id=run_id or store.new_run_id(),
                     parallel=inputs.parallel)
    return _work(study, url, grid, plan, retry_failed)
