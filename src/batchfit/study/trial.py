"""One trial: train one grid point with :func:`batchfit.engine.train` and record it into the store as it runs.

Every evaluation record is written to the trial (user attribute + Optuna intermediate value) the moment the
engine produces it, so an interrupted sweep keeps everything it measured. The outcome is told to the study:
complete (status ``ok`` or ``diverged``), or failed with a one-line error and its kind (the user's workload, memory,
a bad setting, or batchfit's own bug).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import sysconfig
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchfit._io import to_jsonable
from batchfit.errors import BatchfitError, ConfigError, WorkloadError
from batchfit.metric import Metric
from batchfit.progress import ProgressEvent, ProgressFn
from batchfit.scaling import optimizer_settings
from batchfit.study import keys as K
from batchfit.study.inputs import EVALS_PER_TRIAL, Budget, GridPoint
from batchfit.study.store import Heartbeat, optuna_module, worker_identity
from batchfit.workload import Workload

__all__ = [
    "ERROR_KINDS",
    "STAGE",
    "SweepPlan",
    "classify_failure",
    "noise_layout",
    "rank_share",
    "run_trial",
    "sweep_event",
    "train_everywhere",
    "train_job",
    "trial_train",
]

STAGE = "sweep"  # the progress stage of every sweep event
ERROR_KINDS = ("workload", "memory", "config", "internal")


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """Everything a trial needs, fixed before the first trial runs (validated by :func:`batchfit.study.sweep`)."""

    workload: Workload
    metric: Metric
    budget: Budget
    micro_batch_limit: int | None  # the largest micro-batch that fits; bigger batches accumulate
    measure_noise: bool
    sharpness: bool
    eval_every: int | None
    seed: int
    lr_rule: str
    warmup: int | float
    precision: str
    device: str
    total: int  # grid points in this sweep
    callbacks: tuple[Any, ...] = ()
    progress: ProgressFn | None = None
    weight_decay_rule: str = "keep"  # keep | timescale (batchfit.scaling)
    parallel: str = "ddp"  # under torchrun: ddp | fsdp (batchfit.sharding)
    run_id: str | None = None  # this invocation (store.new_run_id): recorded on each trial it runs


# ---------------------------------------------------------------------------------------------------------------
# Progress: one ProgressEvent per thing that happened; data["event"] names it (start, trial_start, step, eval,
# trial_end, done)


def sweep_event(progress: ProgressFn | None, kind: str, event: str, message: str = "", *,
                completed: int | None = None, total: int | None = None, data: Mapping[str, Any] | None = None,
                **more: Any) -> None:
    """Send one sweep :class:`ProgressEvent`; ``data`` and ``more`` become its data, with ``event`` naming it."""
    if progress is not None:
        progress(ProgressEvent(stage=STAGE, kind=kind, message=message, completed=completed, total=total,
                               data={"event": event, **(data or {}), **more}))


class _Recorder:
    """Engine callback: every evaluation record goes into the store (user attr + intermediate value) at once."""

    def __init__(self, trial: Any, plan: SweepPlan, info: dict[str, Any]) -> None:
        self.trial, self.plan, self.info = trial, plan, info
        self.count = 0

    def on_train_start(self, state: Any) -> None:
        # the peak LR and the optimizer's own settings, as set for this batch size before the user's schedule ran
        # (OneCycleLR starts at max_lr / 25 and moves momentum/beta1 itself: neither is advice)
        self.info.update(lr=state.lr or state.optimizer.param_groups[0]["lr"], micro_batch_size=state.micro_batch_size,
                         accumulation_steps=state.accumulation_steps, total_steps=state.total_steps,
                         optimizer=state.extras.get("optimizer_settings") or optimizer_settings(state.optimizer))
        self.trial.set_user_attr(K.TRIAL_PLAN, to_jsonable(dict(self.info)))
        sweep_event(self.plan.progress, "update", "trial_start",
                    f"batch {self.info['batch_size']} ({state.micro_batch_size} x {state.accumulation_steps}), "
                    f"lr {self.info['lr']:.3g}", completed=self.info["index"] - 1, total=self.plan.total,
                    data=self.info)

    def on_step_end(self, state: Any) -> None:
        sweep_event(self.plan.progress, "update", "step", completed=state.step, total=state.total_steps,
                    index=self.info["index"], step=state.step, total_steps=state.total_steps)

    def on_evaluate(self, state: Any, record: dict[str, Any]) -> None:
        rec = to_jsonable(record)
        self.trial.set_user_attr(f"{K.EVAL_PREFIX}{self.count:05d}", rec)
        value = self.plan.metric.of_record(rec)
        if value is not None:
            with contextlib.suppress(Exception):
                self.trial.report(value, int(record.get("step", self.count)))
        self.count += 1
        sweep_event(self.plan.progress, "record", "eval", index=self.info["index"], record=rec, metric=value)


# ---------------------------------------------------------------------------------------------------------------
# Failures: whose fault, in one line


def _library_dirs() -> tuple[str, ...]:
    import torch

    stdlib = sysconfig.get_paths().get("stdlib") or str(Path(sys.executable).parent)
    package = Path(__file__).resolve().parent.parent  # src/batchfit (this file is src/batchfit/study/trial.py)
    return (str(package), str(Path(torch.__file__).resolve().parent),
            str(Path(stdlib).resolve()))


def _raised_in_user_code(exc: BaseException) -> bool:
    """True when a frame of the traceback lies outside batchfit, torch and the standard library: the failure
    passed through the user's model, loss, metric or data (a Hugging Face model in site-packages counts too)."""
    batchfit_dir, torch_dir, stdlib_dir = _library_dirs()
    for frame in traceback.extract_tb(exc.__traceback__):
        if not frame.filename or frame.filename.startswith("<"):
            continue
        path = str(Path(frame.filename).resolve())
        if path.startswith((batchfit_dir, torch_dir)):
            continue
        if path.startswith(stdlib_dir) and "site-packages" not in path and "dist-packages" not in path:
            continue
        return True
    return False


def classify_failure(exc: BaseException, micro_batch_size: int) -> tuple[str, str]:
    """``(kind, one-line message)`` of a trial that raised; kind is one of :data:`ERROR_KINDS`."""
    from batchfit import memory

    message = " ".join(str(exc).split())[:500] or type(exc).__name__
    if memory.is_oom(exc):
        return "memory", (f"out of memory at micro-batch {micro_batch_size}: {message}; give a smaller "
                          "micro_batch_limit (--micro-batch-size)")
    if isinstance(exc, ConfigError):
        return "config", message
    if isinstance(exc, (WorkloadError, BatchfitError)):
        return "workload", message
    from batchfit.data import loader_failure

    loader = loader_failure(exc)  # a DataLoader worker died while batchfit's own code ran: the data's fault
    if loader is not None:
        return "workload", f"the workload's data loader failed: {loader}"
    kind = "workload" if _raised_in_user_code(exc) else "internal"
    return kind, f"{type(exc).__name__}: {message}"


# ---------------------------------------------------------------------------------------------------------------
# Running one trial


def _with_lr_multiplier(workload: Workload, multiplier: float) -> Workload:
    """The same workload whose optimizer starts at ``base_lr x multiplier``; the rule then scales both alike."""
    if multiplier == 1.0:
        return workload
    make = workload.optimizer_fn

    def optimizer_fn(params: Any, lr: float) -> Any:
        return make(params, lr * multiplier)

    return dataclasses.replace(workload, optimizer_fn=optimizer_fn)


def _noise_callback() -> Any | None:
    try:
        from batchfit.noise import NoiseCallback
    except ImportError:  # the noise module is optional for the sweep
        return None
    return NoiseCallback()


def noise_layout(measure_noise: bool, batch: int, micro: int) -> dict[str, Any]:
    """How a trial measures B_simple, given its layout: always the layout the recommendation would give
    (``min(batch, micro_batch_limit)`` x ``ceil(batch / micro)``; under torchrun ``micro`` is one rank's, and
    every rank's micro-batches are the small batches), never changed for a measurement.

    B_simple (:class:`batchfit.noise.NoiseCallback`) comes from the trial's own micro-batches when it accumulates
    (``noise_method: "accumulation"``, every step). A trial that runs as one micro-batch is not split (that would
    change what is measured: BatchNorm statistics over half the batch, the throughput and memory of a smaller
    micro-batch); it is measured on every ``noise_every``-th step (:data:`batchfit.noise.HALVES_EVERY`) by an
    extra forward/backward over the two halves of that step's batch, after the step and outside its timing, with
    the parameters, buffers, gradients and random number generators put back, so the trial trains bit-for-bit as
    without it (``noise_method: "extra-halves"``; :meth:`batchfit.noise.NoiseCallback.watch`). ``noise_split`` is
    always ``False``; it stays in the trial's attributes for the stores that have it. No measurement (``--no-noise``,
    B = 1): ``noise_method`` None."""
    noise: dict[str, Any] = {"noise_split": False, "noise_method": None}
    if measure_noise and batch >= 2:
        try:
            from batchfit.noise import HALVES_EVERY
        except ImportError:  # the noise module is optional for the sweep
            return noise
        if micro < batch:
            noise["noise_method"] = "accumulation"
        else:
            noise.update(noise_method="extra-halves", noise_every=HALVES_EVERY)
    return noise


def _own_callbacks(measure_noise: bool, sharpness: bool, sharpness_chunk: int, seed: int, batch: int,
                   micro: int) -> tuple[list[Any], dict[str, Any]]:
    """The callbacks a trial's training runs on every rank (B_simple, sharpness) and its noise layout."""
    callbacks: list[Any] = []
    noise = noise_layout(measure_noise, batch, micro)
    if noise["noise_method"] is not None:
        noise_cb = _noise_callback()
        if noise_cb is not None:
            callbacks.append(noise_cb)
    if sharpness:
        from batchfit.sharpness import SharpnessCallback

        callbacks.append(SharpnessCallback(chunk_size=sharpness_chunk, seed=seed))
    return callbacks, noise


def _watched(workload: Workload, callbacks: list[Any], noise: dict[str, Any]) -> Workload:
    """The workload a trial trains: for extra-halves, the noise callback's :meth:`~batchfit.noise.NoiseCallback.
    watch` of it (the same forward, which also hands the callback each measured step's batch)."""
    if noise.get("noise_method") != "extra-halves":
        return workload
    cb = next(cb for cb in callbacks if callable(getattr(cb, "watch", None)))
    return cb.watch(workload)


def run_trial(study: Any, trial: Any, plan: SweepPlan, index: int) -> dict[str, Any]:
    """Train one claimed trial; its outcome (ok / diverged / failed) is told to the study. Returns the outcome.

    If the store says the trial was finished meanwhile (a heartbeat check on another machine failed it while
    this worker was slow, or SQLite let two workers pop it), this worker abandons it and goes on.
    """
    point = GridPoint.from_attr(trial.user_attrs[K.TRIAL_CONFIG])
    try:
        return _train_trial(study, trial, plan, point, index)
    except optuna_module().exceptions.UpdateFinishedTrialError as exc:
        return {"index": index, "total": plan.total, "trial_number": trial.number, "batch_size": point.batch_size,
                "lr_multiplier": point.lr_multiplier, "status": "abandoned",
                "error": f"the store finished this trial meanwhile ({exc}); its result there stands"}


_RESULT_KEYS = (
    "lr", "lr_rule", "warmup_steps", "micro_batch_size", "accumulation_steps", "steps", "epochs", "samples",
    "seconds", "train_seconds", "samples_per_s", "peak_memory_bytes", "diverged", "diverged_at_step", "device",
    "precision", "b_simple_history", "b_simple_skipped_steps", "sharpness", "seed", "grad_clip", "lr_schedule",
    "lr_scaling", "noise_method", "noise_samples", "noise_error", "world_size", "batch_size_per_rank", "parallel",
)


def trial_train(workload: Workload, *, multiplier: float, measure_noise: bool, sharpness: bool,
                sharpness_chunk: int, callbacks: Any = (), **train_kwargs: Any) -> Any:
    """Train one grid point: the workload at the LR multiplier, with the trial's own callbacks (B_simple,
    sharpness) built here, so under torchrun every rank runs them (:func:`batchfit.distributed.everywhere`) while
    ``callbacks`` (rank 0's recorder) stay on rank 0. ``train_kwargs`` go to :func:`batchfit.engine.train`."""
    from batchfit.engine import shared_warmup, train

    batch = int(train_kwargs["batch_size"]) * int(train_kwargs.get("world_size", 1))
    micro = int(train_kwargs["micro_batch_size"])
    own, noise = _own_callbacks(measure_noise, sharpness, sharpness_chunk, train_kwargs["seed"], batch, micro)
    with shared_warmup():  # one warm-up for every batch's trial
        return train(_watched(_with_lr_multiplier(workload, multiplier), own, noise),
                     callbacks=[*own, *callbacks], **train_kwargs)


def train_job(workload: Workload, *, shared: bool = False, **train_kwargs: Any) -> Any:
    """:func:`batchfit.engine.train` as one job of :func:`batchfit.distributed.everywhere` (``shared``: inside
    :func:`~batchfit.engine.shared_warmup`, a warm-up longer than this run allowed)."""
    from batchfit.engine import shared_warmup, train

    with shared_warmup() if shared else contextlib.nullcontext():
        return train(workload, **train_kwargs)


def train_everywhere(workload: Workload, *, batch_size: int, micro_batch_size: int | None = None,
                     parallel: str = "ddp", shared_warmup: bool = False, **train_kwargs: Any) -> Any:
    """Train at the *global* batch ``batch_size`` on every rank under torchrun (each rank its share, with
    ``micro_batch_size`` one rank's micro-batch at most), or here in one process; rank 0's result."""
    from batchfit import distributed

    return distributed.everywhere(train_job, workload, shared=shared_warmup,
                                  **rank_share(batch_size, micro_batch_size, parallel), **train_kwargs)


def rank_share(batch_size: int, micro_batch_size: int | None, parallel: str = "ddp") -> dict[str, Any]:
    """:func:`batchfit.engine.train`'s batch arguments for the *global* batch ``batch_size``: under torchrun one
    rank's share, its micro-batch (``micro_batch_size`` is one rank's, at most the share), the world size and
    ``parallel``; in one process the batch and micro-batch (at most the batch) as they are."""
    from batchfit import distributed

    world = distributed.world_size()
    if batch_size % world:
        raise ConfigError(f"batch size {batch_size} does not split evenly over {world} ranks")
    per_rank = batch_size // world
    share: dict[str, Any] = {"batch_size": per_rank,
                             "micro_batch_size": None if micro_batch_size is None else min(micro_batch_size, per_rank)}
    if world > 1:
        share.update(world_size=world, parallel=parallel)
    return share


def _train_trial(study: Any, trial: Any, plan: SweepPlan, point: GridPoint, index: int) -> dict[str, Any]:
    from batchfit import distributed
    from batchfit.engine import resolve_warmup

    TrialState = optuna_module().trial.TrialState
    batch, mult = point.batch_size, point.lr_multiplier
    limit = plan.micro_batch_limit  # one rank's: the finder's limit
    share = rank_share(batch, batch if limit is None else limit, plan.parallel)
    per_rank, micro = share["batch_size"], share["micro_batch_size"]
    noise = noise_layout(plan.measure_noise, batch, micro)
    steps = plan.budget.steps_for(batch, plan.workload.num_train)
    eval_every = plan.eval_every or max(1, steps // EVALS_PER_TRIAL)
    seed = plan.seed if point.seed is None else point.seed
    info = {"index": index, "total": plan.total, "trial_number": trial.number, "batch_size": batch, "seed": seed,
            "lr_multiplier": mult, "micro_batch_size": micro, "accumulation_steps": math.ceil(per_rank / micro),
            "steps": steps, "eval_every": eval_every, **noise, "warmup_steps": resolve_warmup(plan.warmup, steps)}
    info.update({k: share[k] for k in ("world_size", "parallel") if k in share})
    trial.set_user_attr(K.TRIAL_WORKER, worker_identity())
    if plan.run_id is not None:
        trial.set_user_attr(K.TRIAL_RUN, plan.run_id)
    trial.set_user_attr(K.TRIAL_STATUS, K.STATUS_RUNNING)
    outcome: dict[str, Any] = dict(info)
    failure: BaseException | None = None
    kwargs: dict[str, Any] = dict(
        share, lr_rule=plan.lr_rule, warmup=plan.warmup, steps=steps, precision=plan.precision, device=plan.device,
        seed=seed, eval_every=eval_every, weight_decay_rule=plan.weight_decay_rule)
    with Heartbeat(study._storage, trial._trial_id):
        try:
            result = distributed.everywhere(
                trial_train, plan.workload, multiplier=mult, measure_noise=plan.measure_noise,
                sharpness=plan.sharpness, sharpness_chunk=min(plan.micro_batch_limit or 256, 256),
                callbacks=[_Recorder(trial, plan, info), *plan.callbacks], **kwargs)
        except KeyboardInterrupt:
            trial.set_user_attr(K.TRIAL_STATUS, K.STATUS_INTERRUPTED)
            trial.set_user_attr(K.TRIAL_ERROR, "interrupted by the user (Ctrl-C); re-run the same command to retry")
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as exc:  # recorded; the sweep goes on
            failure = exc
    if failure is not None:
        from batchfit import memory

        if memory.is_oom(failure):
            memory.release_memory()
        kind, error = classify_failure(failure, micro)
        trial.set_user_attr(K.TRIAL_STATUS, K.STATUS_FAILED)
        trial.set_user_attr(K.TRIAL_ERROR, error)
        trial.set_user_attr(K.TRIAL_ERROR_KIND, kind)
        study.tell(trial, state=TrialState.FAIL)
        outcome.update(status=K.STATUS_FAILED, error=error, error_kind=kind)
        if distributed.leading():  # under torchrun the other ranks may be inside the failed step: the job ends
            raise failure
        return outcome
    return _record_result(study, trial, plan, result, outcome)


def _record_result(study: Any, trial: Any, plan: SweepPlan, result: Any, outcome: dict[str, Any]) -> dict[str, Any]:
    data = result.to_dict()
    summary = {k: data.get(k) for k in _RESULT_KEYS}
    trial.set_user_attr(K.TRIAL_RESULT, to_jsonable(summary))
    status = K.STATUS_DIVERGED if result.diverged else K.STATUS_OK
    trial.set_user_attr(K.TRIAL_STATUS, status)
    if result.diverged:
        trial.set_user_attr(K.TRIAL_ERROR, f"diverged (non-finite loss) at step {result.diverged_at_step}")
    values = [v for v in (plan.metric.of_record(r) for r in data["history"]) if v is not None]
    worst = -math.inf if plan.metric.higher_is_better else math.inf
    value = plan.metric.best(values) if values else worst
    study.tell(trial, value)
    outcome.update(status=status, best=value if values else None, lr=summary["lr"])
    return outcome
