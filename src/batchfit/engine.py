"""The training engine: one loop for every regime (B = 1, mini-batch, full batch).

``train`` = a frozen :class:`TrainPlan` (every argument checked up front) -> setup (model, optimizer, LR rule,
schedule, the one step) -> the loop, which reads top to bottom::

    for each batch of the stream (epochs; under torchrun this rank's shard of each global batch):
        set the LR of this step        warm-up x the user's schedule (batchfit.step.TrainStep.begin)
        the step                       batchfit.step.TrainStep: weighted micro-batches -> unscale -> hooks -> clip
                                       -> optimizer step -> the user's scheduler -> zero grads
        read the loss                  batchfit.step.LossMeter (CPU every step, CUDA every 16 steps)
        stop on a non-finite loss; evaluate every ``eval_every`` steps and at each epoch's end

The effective batch is micro-batch x accumulation steps x world size; each micro-batch loss is weighted by its
share of the global batch's samples, so accumulated gradients equal the big-batch gradient even when the last
micro-batch is smaller.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn

from batchfit import checks, data, distributed, memory, sharding
from batchfit import schedule as batch_schedules
from batchfit._io import check_output_path, split_fields, write_torch
from batchfit.branching import BranchingResult, local_critical_batch
from batchfit.errors import ConfigError, DataError
from batchfit.loading import load_workload
from batchfit.progress import ProgressFn, emit
from batchfit.runtime import resolve_device, seed_everything
from batchfit.scaling import (
    RULE_CHOICES,
    WEIGHT_DECAY_RULES,
    default_rule,
)
from batchfit.step import (
    PRECISIONS,
    LossMeter,
    LRSchedule,
    MicroBatch,
    TrainStep,
    build_run,
    check_precision,
    eval_pass,
    fetching,
)
from batchfit.workload import Workload

__all__ = [
    "PRECISIONS",
    "TRAIN_EVAL_SAMPLES",
    "Callback",
    "TrainPlan",
    "TrainResult",
    "TrainState",
    "auto_schedule",
    "check_finite_data",
    "check_precision",
    "check_warmup",
    "evaluate",
    "plan_batches",
    "plan_train",
    "resolve_device",
    "resolve_warmup",
    "seed_everything",
    "shared_warmup",
    "train",
    "train_eval_subset",
]


# ---------------------------------------------------------------------------------------------------------------
# Small helpers (the device and the seeds are batchfit.runtime's; resolve_device and seed_everything stay importable
# from here)


def check_finite_data(dataset: Any, name: str) -> None:
    """Scan tensor-backed datasets for NaN/Inf up front (cheap for in-memory tensors; outside any memory budget)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is None and hasattr(dataset, "inputs"):
        tensors = (dataset.inputs,)
    for t in tensors or ():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t.reshape(len(t), -1))).any(dim=1).nonzero().flatten()[:5].tolist()
            raise DataError(
                f"{name} contains NaN or Inf values (first bad samples: {bad}); clean or impute the data first"
            )


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def _eval_pass(workload: Workload, model: nn.Module, source: Any, bs: int, device: torch.device,
               precision: str) -> tuple[float, dict[str, float]]:
    """One unshuffled pass over ``source`` at batch ``bs`` through the one evaluation pass
    (:func:`batchfit.step.eval_pass`)."""
    batches = source.epoch(bs, generator=torch.Generator().manual_seed(0), drop_last=False, shuffle=False)
    return eval_pass(workload, model, (batch for batch, _ in fetching(batches, "val_data")), device=device,
                     precision=precision)


def _budgeted_eval(workload: Workload, model: nn.Module, source: Any, bs: int, device: torch.device, precision: str,
                   budget: int | None, hold: Any) -> tuple[float, dict[str, float]]:
    if budget is None or device.type != "cpu":
        return _eval_pass(workload, model, source, bs, device, precision)
    with memory.PeakMeter(device, budget, track=[list(model.parameters()), list(model.buffers()), hold]):
        return _eval_pass(workload, model, source, bs, device, precision)


TRAIN_EVAL_SAMPLES = 1024
"""The most training samples ``train_eval_loss`` is measured on (see :func:`train_eval_subset`)."""


class _HeldBatches:
    """A :class:`batchfit.data.BatchSource` over collated batches held in memory (the fixed training subset):
    every epoch yields them in their order, cut to ``batch_size`` when a smaller one is asked for (an evaluation
    out-of-memory error halves the evaluation batch)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches
        self.num_samples = sum(data.batch_size_of(b) for b in batches)

    def epoch(self, batch_size: int, *, generator: torch.Generator, drop_last: bool, rank: int = 0,
              world_size: int = 1, shuffle: bool = True) -> Iterator[tuple[Any, int]]:
        for batch in self.batches:
            n = data.batch_size_of(batch)
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                yield (batch if stop - start == n else data.slice_batch(batch, start, stop, n)), stop - start

    def sample(self, batch_size: int) -> Any:
        return self.batches[0]


def train_eval_subset(workload: Workload, batch_size: int = 256) -> _HeldBatches:
    """The fixed training subset ``train_eval_loss`` is measured on: the first ``k`` samples of the training data in
    its unshuffled order, ``k = min(validation samples (512 without validation data), training samples,``
    :data:`TRAIN_EVAL_SAMPLES` ``)``, collated into batches of ``batch_size`` and held on the CPU.

    The same samples for every evaluation of a run and for every run of the workload (a sampler that draws its
    order from torch's global generator draws it under seed 0; the global generator is left as it was). A
    DataLoader with the default or a sequential sampler is read in this process (no worker start-up); one with
    another sampler (e.g. a subset sampler defining the training split) through its own order.
    """
    val = data.val_source(workload)
    source = data.train_source(workload)
    k = max(1, min(val.num_samples if val is not None else 512, source.num_samples, TRAIN_EVAL_SAMPLES))
    if isinstance(source, data.LoaderSource) and source.kind != "custom":  # the first k items of the dataset
        source = data.IndexSource(source.dataset, collate_fn=source.collate)
    bs = max(1, min(batch_size, k))
    batches: list[Any] = []
    seen = 0
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        epoch = source.epoch(bs, generator=torch.Generator().manual_seed(0), drop_last=False, shuffle=False)
        fetched = fetching(epoch, "train_data")
        try:
            for batch, _ in fetched:
                m = data.batch_size_of(batch)
                if m > k - seen:
                    batch, m = data.slice_batch(batch, 0, k - seen, m), k - seen
                batches.append(batch)
                seen += m
                if seen >= k:
                    break
        finally:
            for it in (fetched, epoch, source):
                close = getattr(it, "close", None)
                if callable(close):
                    close()
    if not batches:
        raise DataError("train_data yielded no batch for the training-loss evaluation; check its length against "
                        "the samples it yields")
    return _HeldBatches(batches)


@torch.no_grad()
def evaluate(
    workload: Workload,
    model: nn.Module,
    dataset: Any = None,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    memory_budget: int | None = None,
    hold: Any = (),
) -> tuple[float, dict[str, float], int]:
    """Mean loss and metrics over ``dataset`` (default: the validation data), sample-weighted.

    Returns ``(loss, metrics, evaluation batch size used)``. An out-of-memory error halves the *evaluation* batch
    and retries (:func:`batchfit.memory.try_oom`; under FSDP2 on every rank together); it never touches the
    training batch. On the CPU,
    ``memory_budget`` (bytes) meters each attempt over the model's tensors and ``hold`` (e.g. optimizer state).
    """
    if dataset is None or dataset is workload.val_data:
        source = data.val_source(workload)
        if source is None:
            raise ConfigError("evaluate needs a dataset: the workload has no val_data")
    else:
        source = data.source_for(dataset, collate_fn=workload.collate_fn)
    was_training = model.training
    model.eval()
    bs = max(1, min(batch_size, source.num_samples))
    # FSDP2 under torchrun: every unit's forward all-gathers, so an out-of-memory on one rank is a decision all ranks
    # take together (sharding.CollectiveGuard: one flag all-reduce before each unit's forward and at the end)
    guard = sharding.CollectiveGuard(model) if distributed.world_size() > 1 and sharding.is_fsdp(model) else None

    def attempt_at(b: int) -> tuple[float, dict[str, float]]:
        if guard is None:
            return _budgeted_eval(workload, model, source, b, device, precision, memory_budget, hold)
        guard.active = True
        try:
            out = _budgeted_eval(workload, model, source, b, device, precision, memory_budget, hold)
            guard.finish()
            return out
        finally:
            guard.active = False

    try:
        while True:
            attempt = memory.try_oom(lambda b=bs: attempt_at(b))
            if attempt.ok:
                loss, metrics = attempt.value  # type: ignore[misc]
                return loss, metrics, bs
            if guard is not None:  # this rank's own OOM answers the check the others wait in; then all halve
                guard.after_oom(attempt.oom)
                sharding.reshard(model)
            if bs == 1:
                raise attempt.oom  # type: ignore[misc]
            bs = max(1, bs // 2)
    finally:
        if guard is not None:
            guard.close()
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------
# Callbacks


class Callback(Protocol):
    """Hooks the engine calls; implement any subset (missing methods are skipped)."""

    def on_train_start(self, state: TrainState) -> None: ...
    def on_micro_batch_end(self, state: TrainState) -> None: ...
    def on_before_optimizer_step(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_evaluate(self, state: TrainState, record: dict[str, Any]) -> None: ...
    def on_train_end(self, state: TrainState, result: TrainResult) -> None: ...


@dataclass
class TrainState:
    """What callbacks see. ``lr`` is the LR of the step being taken (set at its top, warm-up included); gradients
    in ``on_before_optimizer_step`` are unscaled and not yet clipped. ``batch_size`` is the *effective* batch (all
    ranks); ``batch_size_per_rank`` and ``micro_batch_size`` are this rank's."""

    workload: Workload
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    total_steps: int
    steps_per_epoch: int
    scaler: Any = None
    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    micro_index: int = 0
    micro_samples: int = 0
    batch_samples: int = 0
    micro_loss: torch.Tensor | None = None
    last_loss: float | None = None
    lr: float = 0.0
    batch_size_per_rank: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    train_step: Any = field(default=None, repr=False)  # the TrainStep (a callback may ask it to sync every micro)


def _hooks(callbacks: Sequence[Any], name: str) -> list[Any]:
    return [getattr(cb, name) for cb in callbacks if getattr(cb, name, None) is not None]


def _call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    for fn in _hooks(callbacks, hook):
        fn(*args)


# ---------------------------------------------------------------------------------------------------------------
# Result


@dataclass
class TrainResult:
    """Everything one training run measured; ``to_dict()`` is the JSON the CLI writes.

    ``batch_size`` (= ``effective_batch_size``) is the samples per optimizer step over all ranks;
    ``batch_size_per_rank`` and ``micro_batch_size`` are per rank. ``lr`` is the peak LR (after the scaling rule,
    before warm-up and the user's schedule).
    """

    workload: str
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    lr: float
    lr_rule: str
    warmup_steps: int
    precision: str
    device: str
    seed: int
    drop_last: bool
    steps: int = 0
    epochs: float = 0.0
    samples: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    samples_per_s: float | None = None
    diverged: bool = False
    diverged_at_step: int | None = None
    seconds: float = 0.0
    train_seconds: float = 0.0
    effective_batch_size: int = 0
    batch_size_per_rank: int = 0
    requested_batch_size: int = 0
    grad_clip: float | None = None
    lr_schedule: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extras = d.pop("extras")
        d.update(extras)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainResult:
        """The inverse of :meth:`to_dict`: the fields from their keys, every other key (what a run adds, such as
        ``train_eval_samples``, or a newer batchfit writes) back in ``extras``."""
        missing = [f.name for f in fields(cls) if f.name != "extras" and f.name not in data
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ConfigError(f"a training result needs {', '.join(missing)}; it has {', '.join(sorted(data))}")
        known, extras = split_fields(cls, data)
        known["history"] = [dict(h) for h in known.get("history") or []]
        return cls(**known, extras=extras)


# ---------------------------------------------------------------------------------------------------------------
# The plan: every argument checked before any work


def plan_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps per epoch."""
    if drop_last:
        if batch_size > n:
            raise ConfigError(
                f"batch_size {batch_size} is larger than the training set ({n} samples) and incomplete batches are "
                f"dropped; use a batch size <= {n}, or keep the last, smaller batch with drop_last=False"
            )
        return n // batch_size
    return math.ceil(n / batch_size)


# a warm-up longer than the run it is given to is refused (the LR would never reach its peak, and a typo such as
# 1e308 would be accepted), except inside batchfit's own runs that share one warm-up across runs of different
# lengths (sweep trials at every batch size, the precision check): see shared_warmup()
_WARMUP_WITHIN_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("batchfit_warmup_within_run", default=True)


def _step_count(value: float) -> str:
    """A step count for a message: digits while readable, else ``1e+308``."""
    return str(int(value)) if abs(value) < 1e15 else f"{float(value):.4g}"


def check_warmup(warmup: Any, longest: int, what: str = "the run") -> None:
    """A warm-up in steps (>= 1) must not be longer than ``longest`` steps (``what`` says whose length that is);
    a fraction (< 1) always fits. Checked before any work by :func:`train`, and by the sweep and tune for their
    longest trial."""
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not math.isfinite(warmup) or warmup < 1:
        return
    if warmup > longest:
        raise ConfigError(f"warmup must be at most {longest} steps ({what} is {longest} steps long), got "
                          f"{_step_count(warmup)}; give fewer steps, or a fraction below 1 (e.g. 0.1)")


@contextlib.contextmanager
def shared_warmup() -> Iterator[None]:
    """Inside: a warm-up longer than the run is allowed (one warm-up shared by runs of different lengths, such as
    a sweep's trials at every batch size; the LR of a shorter run then stops below its peak)."""
    token = _WARMUP_WITHIN_RUN.set(False)
    try:
        yield
    finally:
        _WARMUP_WITHIN_RUN.reset(token)


def resolve_warmup(warmup: int | float | None, total_steps: int) -> int:
    """``warmup`` >= 1 is a step count; 0 < warmup < 1 is a fraction of training."""
    if warmup is None:
        return 0
    warmup = checks.warmup("warmup", warmup)
    if isinstance(warmup, float):  # a fraction of training
        return max(1, round(warmup * total_steps))
    return warmup


@dataclass(frozen=True)
class TrainPlan:
    """One training run, decided and validated before anything is built."""

    workload: Workload
    device: torch.device
    precision: str
    batch_size_per_rank: int
    micro_batch_size: int
    world_size: int
    lr: float | None
    lr_rule: str
    warmup_steps: int
    total_steps: int
    steps_per_epoch: int
    num_samples: int
    seed: int
    drop_last: bool
    eval_batch_size: int
    eval_every: int | None
    grad_clip: float | None
    memory_budget: int | None
    requested_batch_size: int
    phases: tuple[batch_schedules.Phase, ...] = ()  # a batch-size schedule (per-rank batches); () = fixed batch
    micro_batch_limit: int | None = None
    beta2: str | None = None
    weight_decay_timescale: bool = False
    weight_decay_rule: str = "keep"  # keep | timescale: the weight decay from the base batch to this one
    checkpoint: str | None = None
    checkpoint_every: int | None = None
    resume_from: str | None = None
    parallel: str = "ddp"  # ddp | fsdp: how the ranks hold the model (fsdp: FSDP2 shards, batchfit.sharding)

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size_per_rank * self.world_size

    @property
    def accumulation_steps(self) -> int:
        return math.ceil(self.batch_size_per_rank / self.micro_batch_size)


def _fit_batch(n: int, per_rank: int, world_size: int, drop_last: bool) -> int:
    """The per-rank batch that runs: a global batch larger than the data set is an error with ``drop_last``, else
    the full batch (with a warning), reported as what ran (never the impossible size that was asked for)."""
    if per_rank * world_size <= n or drop_last:
        return per_rank
    fitted = max(1, n // world_size)
    warnings.warn(
        f"batch_size {per_rank * world_size} is larger than the training set ({n} samples); training with the "
        f"full batch of {fitted * world_size} instead",
        UserWarning,
        stacklevel=3,
    )
    return fitted


def plan_train(workload: Workload | str, *, batch_size: int | None = None, micro_batch_size: int | None = None,
               lr: float | None = None, lr_rule: str = "auto", warmup: int | float = 0, epochs: int | None = None,
               steps: int | None = None, precision: str = "fp32", device: str | torch.device | None = "cpu",
               seed: int = 0, drop_last: bool = True, eval_batch_size: int | None = None,
               eval_every: int | None = None, grad_clip: float | None = None, world_size: int = 1,
               memory_budget: int | str | None = None, batch_schedule: Any = None,
               micro_batch_limit: int | None = None, beta2: str | None = None, weight_decay_timescale: bool = False,
               checkpoint: str | os.PathLike | None = None, checkpoint_every: int | None = None,
               resume_from: str | os.PathLike | None = None, weight_decay_rule: str = "keep",
               parallel: str = "ddp") -> TrainPlan:
    """Check every argument of :func:`train` and decide the run (arguments as :func:`train`'s)."""
    workload = load_workload(workload)
    dev = resolve_device(device)
    check_precision(precision, dev)
    phases = tuple(batch_schedules.parse_schedule(batch_schedule)) if batch_schedule is not None else ()
    if phases and batch_size is not None and batch_size != phases[0].batch_size:
        raise ConfigError(f"batch_size {batch_size} differs from the schedule's first batch {phases[0].batch_size}; "
                          "give one of them")
    if phases:
        batch_size = phases[0].batch_size
    checks.positive_int("micro_batch_limit", micro_batch_limit, allow_none=True)
    if beta2 is not None:
        checks.one_of("beta2", beta2, batch_schedules.BETA2_RULES)
    checks.positive_int("checkpoint_every", checkpoint_every, allow_none=True)
    if checkpoint_every is not None and checkpoint is None:
        raise ConfigError("checkpoint_every needs checkpoint= (the file to write)")
    if resume_from is not None and not os.path.isfile(resume_from):
        raise ConfigError(f"resume_from {str(resume_from)!r} is not a file; give a checkpoint written by "
                          "train(checkpoint=...)")
    if checkpoint is not None:  # before any work: a path that cannot be written fails here, not after training
        check_output_path("checkpoint", checkpoint)
    requested = checks.positive_int("batch_size", workload.base_batch_size if batch_size is None else batch_size)
    world_size = checks.positive_int("world_size", world_size)
    checks.positive_int("micro_batch_size", micro_batch_size, allow_none=True)
    if micro_batch_size is not None and micro_batch_size > requested and not phases:  # a schedule: it is a limit
        raise ConfigError(f"micro_batch_size {micro_batch_size} is larger than batch_size {requested}; the "
                          "micro-batch must be <= the batch")
    checks.one_of("lr_rule", lr_rule, RULE_CHOICES)
    checks.one_of("weight_decay_rule", weight_decay_rule, WEIGHT_DECAY_RULES)
    checks.positive_number("lr", lr, allow_none=True)
    if epochs is not None and steps is not None:
        raise ConfigError("give either epochs or steps as the budget, not both")
    checks.positive_int("epochs", epochs, allow_none=True)
    checks.positive_int("steps", steps, allow_none=True)
    checks.positive_int("eval_every", eval_every, allow_none=True)
    checks.positive_int("eval_batch_size", eval_batch_size, allow_none=True)
    grad_clip = checks.positive_number("grad_clip", workload.grad_clip if grad_clip is None else grad_clip,
                                       allow_none=True)
    seed = checks.seed(seed)
    checks.boolean("drop_last", drop_last)
    budget = memory.parse_bytes(memory_budget)
    sharding.check_parallel(parallel, precision)
    if parallel == "fsdp" and world_size > 1 and (checkpoint is not None or resume_from is not None):
        raise ConfigError("checkpoint / resume_from are not supported with parallel='fsdp' yet (the state is "
                          "sharded over the ranks); train without them or with parallel='ddp'")
    if world_size > 1:  # data parallel: this process is one of world_size ranks (torchrun)
        distributed.check_world(world_size)
    n = data.train_source(workload).num_samples
    if n < world_size:
        raise ConfigError(f"the training set has {n} samples, fewer than the {world_size} ranks; every rank needs one")
    for ph in phases:  # the schedule's own words, before its first batch is checked as batch_size
        if ph.batch_size * world_size > n:
            raise ConfigError(f"batch_schedule: batch {ph.batch_size * world_size} at step {ph.step} is larger "
                              f"than the training set ({n} samples); cap the schedule at {n // world_size}")
    per_rank = _fit_batch(n, requested, world_size, drop_last)
    micro = micro_batch_size if micro_batch_size is not None else (workload.micro_batch_size or per_rank)
    micro = min(micro, per_rank)
    steps_per_epoch = plan_batches(n, per_rank * world_size, drop_last)
    if world_size > 1 and not drop_last and 0 < n % (per_rank * world_size) < world_size:
        steps_per_epoch -= 1  # a last global batch smaller than the world is skipped (it would leave a rank empty)
    total_steps = steps if steps is not None else (epochs or 1) * steps_per_epoch
    if phases:
        # the micro-batch of each phase: the memory limit (the finder's), else the asked-for micro-batch
        micro_batch_limit = micro_batch_limit or micro_batch_size or workload.micro_batch_size
        micro = batch_schedules.plan_micro(per_rank, micro_batch_limit)[0]
        if steps is None:  # epochs x N samples, rounded down to whole steps of the schedule
            state = batch_schedules.ScheduleState(phases)
            sample_budget, total_steps = (epochs or 1) * n, 0
            while state.samples_through(total_steps + 1) * world_size <= sample_budget:
                total_steps += 1
            total_steps = max(1, total_steps)
    warmup_steps = resolve_warmup(warmup, total_steps)
    if _WARMUP_WITHIN_RUN.get():
        check_warmup(warmup, total_steps)
    return TrainPlan(
        workload=workload, device=dev, precision=precision, batch_size_per_rank=per_rank, micro_batch_size=micro,
        world_size=world_size, lr=lr, lr_rule=lr_rule, warmup_steps=warmup_steps,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch, num_samples=n, seed=seed, drop_last=drop_last,
        eval_batch_size=eval_batch_size if eval_batch_size is not None else max(micro, 256),
        eval_every=eval_every, grad_clip=grad_clip, memory_budget=budget, requested_batch_size=requested * world_size,
        phases=phases, micro_batch_limit=micro_batch_limit, beta2=beta2,
        weight_decay_timescale=bool(weight_decay_timescale), weight_decay_rule=weight_decay_rule,
        checkpoint=None if checkpoint is None else os.fspath(checkpoint), checkpoint_every=checkpoint_every,
        resume_from=None if resume_from is None else os.fspath(resume_from), parallel=parallel,
    )


# ---------------------------------------------------------------------------------------------------------------
# Setup


@dataclass
class _Run:
    """What the loop works with (built by :func:`_setup`)."""

    plan: TrainPlan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    step: TrainStep
    losses: LossMeter
    state: TrainState
    result: TrainResult
    callbacks: Sequence[Any]
    progress: ProgressFn | None
    t_start: float
    feed: _Feed | None = None
    seg_samples: int = 0
    seg_time: float = 0.0
    train_time: float = 0.0
    timed_samples: int = 0
    last_eval: int = -1
    phase_lr: float = 0.0  # the peak LR of the schedule phase in progress (the rule-transferred base)
    train_subset: _HeldBatches | None = None  # the fixed training subset of ``train_eval_loss``


def _wrap(plan: TrainPlan) -> Callable[[nn.Module], nn.Module] | None:
    """How the ranks hold the model: DDP or FSDP2 (``parallel``) under torchrun; ``None`` in one process."""
    if plan.world_size == 1:
        return None
    if plan.parallel == "ddp":
        return lambda model: distributed.wrap_ddp(model, plan.device)
    return lambda model: sharding.wrap_fsdp(model, plan.device, plan.precision, getattr(plan.workload, "shard", None))


def _setup(plan: TrainPlan, callbacks: Sequence[Any], progress: ProgressFn | None, t_start: float) -> _Run:
    """Same seed -> same initialisation and data order; the model, optimizer at the run's peak LR (a fixed ``lr``,
    or the rule applied to the effective batch), LR schedule and the one step (:func:`batchfit.step.build_run`)."""
    subset = train_eval_subset(plan.workload, plan.eval_batch_size)  # first: the seeding below is what training sees
    losses = LossMeter(plan.device)
    built = build_run(plan.workload, plan.effective_batch_size, plan.lr, plan.precision, device=plan.device,
                      seed=plan.seed, lr_rule=plan.lr_rule, weight_decay_rule=plan.weight_decay_rule,
                      total_steps=plan.total_steps, warmup_steps=plan.warmup_steps,
                      micro_batch_size=plan.micro_batch_size, grad_clip=plan.grad_clip, world_size=plan.world_size,
                      wrap=_wrap(plan), losses=losses)
    model, optimizer, schedule, step = built.model, built.optimizer, built.schedule, built.step
    assert optimizer is not None and schedule is not None and built.lr is not None and built.lr_rule is not None
    peak_lr, rule, lr_scaling, settings = built.lr, built.lr_rule, built.lr_scaling, built.optimizer_settings
    state = TrainState(
        workload=plan.workload, model=model, optimizer=optimizer, device=plan.device, precision=plan.precision,
        batch_size=plan.effective_batch_size, micro_batch_size=plan.micro_batch_size,
        accumulation_steps=plan.accumulation_steps, world_size=plan.world_size, total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch, scaler=step.scaler, lr=peak_lr,
        batch_size_per_rank=plan.batch_size_per_rank,
    )
    state.train_step = step
    state.extras["optimizer_settings"] = settings
    result = TrainResult(
        workload=plan.workload.name, batch_size=plan.effective_batch_size, micro_batch_size=plan.micro_batch_size,
        accumulation_steps=plan.accumulation_steps, world_size=plan.world_size, lr=peak_lr, lr_rule=rule,
        warmup_steps=plan.warmup_steps, precision=plan.precision, device=str(plan.device), seed=plan.seed,
        drop_last=plan.drop_last, effective_batch_size=plan.effective_batch_size,
        batch_size_per_rank=plan.batch_size_per_rank, requested_batch_size=plan.requested_batch_size,
        grad_clip=plan.grad_clip, lr_schedule=schedule.name,
    )
    result.extras["lr_scaling"] = lr_scaling
    result.extras["parallel"] = plan.parallel if plan.world_size > 1 else "none"
    run = _Run(plan, model, optimizer, schedule, step, losses, state, result, callbacks, progress, t_start)
    run.phase_lr = peak_lr
    run.train_subset = subset
    result.extras["train_eval_samples"] = subset.num_samples
    on_micro, before = _hooks(callbacks, "on_micro_batch_end"), _hooks(callbacks, "on_before_optimizer_step")
    if on_micro:
        def micro_hook(mb: MicroBatch) -> None:
            state.micro_index, state.micro_samples, state.micro_loss = mb.index, mb.samples, mb.loss
            for fn in on_micro:
                fn(state)

        step.on_micro.append(micro_hook)
    if before:
        step.before_step.append(lambda _step: [fn(state) for fn in before])
    return run


@dataclass
class _Feed:
    """Where the data stream stands (a checkpoint saves it): the pass in progress, its batch and generator state.

    A batch-size schedule's change starts a new pass (a fresh shuffle) at the new batch; the samples left in the
    interrupted pass are not seen in it. Resuming replays the pass in progress from its generator state and skips the
    batches already trained on, so a resumed run reads exactly the batches the uninterrupted run reads.
    """

    generator: torch.Generator
    batch_for: Callable[[int], int]  # the per-rank batch of step i
    steps: int = 0  # batches handed out (the next step's index)
    passes: int = 0  # passes started
    batch: int = 0  # the per-rank batch of the pass in progress
    start_state: torch.Tensor | None = None  # the generator before the pass in progress drew its order
    taken: int = 0  # batches of the pass in progress handed out
    skip: int = 0  # resuming: batches of the pass to skip

    def to_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "start_state": self.start_state, "steps": self.steps,
                "passes": self.passes, "batch": self.batch, "taken": self.taken}

    def load(self, d: dict[str, Any]) -> None:
        self.steps, self.passes, self.batch = int(d["steps"]), int(d["passes"]), int(d["batch"])
        if self.batch_for(self.steps) != self.batch:  # the pass ended at a change: the next pass starts afresh
            self.generator.set_state(d["generator"])
            self.passes += 1
        else:
            self.start_state, self.taken, self.skip = d["start_state"], int(d["taken"]), int(d["taken"])


def _stream(source: Any, plan: TrainPlan, feed: _Feed) -> Iterator[tuple[int, Any, int]]:
    """``(pass, this rank's batch, samples in the global batch)`` for ever; a ``None`` batch ends each pass.

    Every rank draws the same seeded order and reads its shard of each global batch (``batchfit.data``).
    """
    rank = distributed.rank() if plan.world_size > 1 else 0
    while True:
        epoch = feed.passes
        if feed.skip:  # resuming inside this pass: the same order again
            feed.generator.set_state(feed.start_state)  # type: ignore[arg-type]
        else:
            feed.start_state, feed.taken, feed.batch = feed.generator.get_state(), 0, feed.batch_for(feed.steps)
        batches = source.epoch(feed.batch * plan.world_size, generator=feed.generator, drop_last=plan.drop_last,
                               rank=rank, world_size=plan.world_size)
        fetched = fetching(batches, "train_data")
        empty, changed = True, False
        try:
            for batch, count in fetched:
                empty = False
                if feed.skip:
                    feed.skip -= 1
                    continue
                feed.taken += 1
                feed.steps += 1
                yield epoch, batch, count
                del batch  # not alive while the next one is read
                if feed.batch_for(feed.steps) != feed.batch:  # the schedule changes the batch: a new pass
                    changed = True
                    break
        finally:
            for it in (fetched, batches):
                close = getattr(it, "close", None)
                if callable(close):
                    close()
        if empty:
            raise DataError(f"train_data yielded no batch of {feed.batch * plan.world_size} in an epoch; check its "
                            "length against the samples it yields")
        feed.passes += 1
        if not changed:
            yield epoch, None, 0


def _held(run: _Run) -> list[Any]:
    """What training holds between steps (counted by the CPU memory meter and budget)."""
    return [list(run.model.parameters()), list(run.model.buffers()), run.optimizer.state]


def _timed_step(run: _Run, batch: Any, count: int, measure: bool) -> bool:
    """Run the step and count it; returns whether the loss is read now (CUDA: synchronized, inside the timing).

    On the CPU the measured step runs under a byte counter and stays out of the timing.
    """
    plan, state = run.plan, run.state
    state.batch_samples = data.batch_size_of(batch)
    t0 = time.perf_counter()
    budget = plan.memory_budget if plan.device.type == "cpu" else None  # CUDA: the allocator is capped instead
    if measure or budget is not None:  # what training holds: params, buffers, optimizer state, this step's batch
        with memory.PeakMeter(plan.device, budget, track=[*_held(run), batch]) as meter:
            run.step(batch, count)
        if measure:
            run.result.peak_memory_bytes = meter.peak()
        del meter
    else:
        run.step(batch, count)
    state.step += 1
    state.samples_seen += count
    due = run.losses.check_due(state.step, last=state.step == plan.total_steps)
    if not measure:
        dt = time.perf_counter() - t0
        run.train_time += dt
        run.seg_time += dt
        run.seg_samples += count
        run.timed_samples += count
    return due


# ---------------------------------------------------------------------------------------------------------------
# Evaluation records


def _record(run: _Run) -> dict[str, Any]:
    """One evaluation: the training loss since the last one, validation loss and metrics, the loss and metrics on the
    fixed training subset (eval mode, the same pass and model state as validation), throughput.

    ``train_loss`` is the running training loss (train mode, averaged over the steps since the last evaluation: a
    lagging model, and as many steps as the batch size makes); ``train_eval_loss`` is the current model on the same
    training samples every time, so ``generalization_gap = val_loss - train_eval_loss`` compares like with like
    across batch sizes."""
    plan, state, result = run.plan, run.state, run.result
    loss_sum, count = run.losses.take()
    if plan.world_size > 1:  # the mean over every rank's samples
        loss_sum, count = distributed.all_sum(loss_sum, count)
    train_loss = loss_sum / max(1, count)
    epoch = state.epoch + (state.step - state.epoch * plan.steps_per_epoch) / plan.steps_per_epoch
    if plan.phases:  # passes restart at each change of the batch: epochs are samples over the training set
        epoch = state.samples_seen / (plan.num_samples)
    record: dict[str, Any] = {
        "epoch": round(epoch, 4),
        "step": state.step,
        "samples": state.samples_seen,
        "train_loss": train_loss,
        "samples_per_s": run.seg_samples / run.seg_time if run.seg_time > 0 else None,
        "seconds": round(time.perf_counter() - run.t_start, 4),
        "train_seconds": round(run.train_time, 4),
        "val_loss": None, "val_metrics": {}, "generalization_gap": None,
        "train_eval_loss": None, "train_eval_metrics": {},
    }
    run.seg_samples, run.seg_time = 0, 0.0
    model = distributed.unwrap(run.model) if plan.world_size > 1 else run.model  # DDP: no collectives in eval
    kw = {"batch_size": plan.eval_batch_size, "device": plan.device, "memory_budget": plan.memory_budget,
          "hold": run.optimizer.state}
    has_val = plan.workload.val_data is not None
    precision = plan.precision
    while True:
        val_loss, val_metrics = evaluate(plan.workload, model, precision=precision, **kw)[:2] if has_val else (None, {})
        fit_loss, fit_metrics = (evaluate(plan.workload, model, run.train_subset, precision=precision, **kw)[:2]
                                 if run.train_subset is not None else (None, {}))
        if precision != "fp16" or all(math.isfinite(x) for x in (val_loss, fit_loss) if x is not None):
            break
        # fp16 activations can overflow in eval mode (e.g. BatchNorm running statistics early in training) while
        # training is fine: judge the model in fp32 (both passes, so the gap is of one precision) before calling
        # the run diverged.
        precision = "fp32"
        record["eval_precision"] = "fp32"
    record.update(train_eval_loss=fit_loss, train_eval_metrics=fit_metrics)
    if val_loss is None:
        return record
    record.update(val_loss=val_loss, val_metrics=val_metrics,
                  generalization_gap=val_loss - fit_loss if fit_loss is not None else None)
    if not math.isfinite(val_loss):
        result.diverged = True
        result.diverged_at_step = result.diverged_at_step or state.step
        result.extras.setdefault("diverged_reason", "non-finite validation loss")
    return record


def _evaluate(run: _Run) -> None:
    record = _record(run)
    run.result.history.append(record)
    _call(run.callbacks, "on_evaluate", run.state, record)
    emit(run.progress, "train", "record", f"step {record['step']}: train loss {record['train_loss']:.4g}",
         completed=run.state.step, total=run.plan.total_steps, record=record)


def _finish(run: _Run) -> TrainResult:
    plan, state, result = run.plan, run.state, run.result
    if plan.device.type == "cuda":
        torch.cuda.synchronize(plan.device)
        result.peak_memory_bytes = memory.cuda_peak(plan.device)
    if plan.world_size > 1 and result.peak_memory_bytes is not None:  # the largest rank's peak
        result.peak_memory_bytes = int(distributed.all_max(result.peak_memory_bytes)[0])
    result.steps, result.samples = state.step, state.samples_seen
    result.epochs = round(state.samples_seen / plan.num_samples, 4)
    result.train_seconds = run.train_time
    result.samples_per_s = run.timed_samples / run.train_time if run.train_time > 0 else None
    result.seconds = time.perf_counter() - run.t_start
    result.extras.update(state.extras)
    _call(run.callbacks, "on_train_end", state, result)
    result.extras.update(state.extras)
    status = f"diverged at step {result.diverged_at_step}" if result.diverged else "ok"
    emit(run.progress, "train", "end", f"{status}: {result.steps} steps at batch {result.batch_size}",
         completed=result.steps, total=plan.total_steps, result=result.to_dict())
    return result


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train(
    workload: Workload | str,
    *,
    batch_size: int | None = None,
    micro_batch_size: int | None = None,
    lr: float | None = None,
    lr_rule: str = "auto",
    warmup: int | float = 0,
    epochs: int | None = None,
    steps: int | None = None,
    precision: str = "fp32",
    device: str | torch.device | None = "cpu",
    seed: int = 0,
    drop_last: bool = True,
    eval_batch_size: int | None = None,
    eval_every: int | None = None,
    grad_clip: float | None = None,
    callbacks: Sequence[Any] = (),
    world_size: int = 1,
    memory_budget: int | str | None = None,
    progress: ProgressFn | None = None,
    batch_schedule: Any = None,
    branching: Any = None,
    micro_batch_limit: int | None = None,
    beta2: str | None = None,
    weight_decay_timescale: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | os.PathLike | None = None,
    weight_decay_rule: str = "keep",
    parallel: str = "ddp",
) -> TrainResult:
    """Train the workload once at one effective batch size (or a batch-size schedule) and measure it.

    Args:
        batch_size: batch per optimizer step (default: the workload's ``base_batch_size``); per rank when
            ``world_size > 1``. Larger than the training set: an error with ``drop_last``, else the full batch
            with a warning (the result reports the batch that ran and ``requested_batch_size``).
        micro_batch_size: samples per forward/backward (default: the workload's ``micro_batch_size``, else the
            batch); accumulation steps = ceil(batch / micro).
        lr: a fixed peak learning rate (skips the rule); otherwise ``lr_rule`` scales the workload's ``base_lr``.
        lr_rule: ``auto`` (linear for SGD-family, adam-sqrt for Adam-family), ``none``, ``linear``, ``sqrt``,
            ``adam-sqrt`` (:mod:`batchfit.scaling`; the result's ``lr_scaling`` says what it did, and
            ``outside_range`` when adam-sqrt's beta1 was held outside the rule's range).
        weight_decay_rule: ``keep`` (default) or ``timescale``: move ``weight_decay`` from the base batch to this
            one so the AdamW timescale ``B / (lr x weight_decay)`` stays constant (Wang & Aitchison 2024;
            Bergsma et al. 2025): ``x k / (LR factor)``, with a fixed ``lr`` the factor ``lr / base_lr``. It also
            holds the timescale at a batch schedule's changes (as ``weight_decay_timescale``).
        warmup: linear warm-up, in steps (>= 1) or as a fraction of all steps (< 1); it multiplies the workload's
            ``lr_schedule`` (stepped after every optimizer step).
        epochs / steps: the budget (default 1 epoch); evaluation runs after each epoch and at the end.
        eval_every: also evaluate every this many optimizer steps (finer steps-to-target).
        grad_clip: clip the global gradient norm (default: the workload's ``grad_clip``).
        world_size: data-parallel ranks (under ``torchrun``, see :mod:`batchfit.distributed`). ``batch_size`` and
            ``micro_batch_size`` are then *per rank*: the effective batch is batch x world size (the LR rule
            sees it); each rank reads its shard of every global batch; DDP all-reduces once per optimizer step.
        parallel: with ``world_size > 1``, ``ddp`` (every rank holds the model; DistributedDataParallel) or
            ``fsdp`` (FSDP2: parameters, gradients and optimizer state sharded over the ranks, units from
            ``Workload.shard``; bf16 through ``MixedPrecisionPolicy``; gradients reduce-scattered on the last
            micro-batch only). The losses equal a single process's at the same global batch.
        memory_budget: bytes or e.g. ``"512MiB"``: train inside this budget, as ``find_batch_size`` measures it
            (CPU: live tensor bytes created by training counted, an allocation beyond the budget raises an OOM;
            CUDA: the allocator is capped). The data set itself and the up-front NaN scan are not charged. An
            evaluation OOM only halves the evaluation batch.
        progress: called with :class:`batchfit.progress.ProgressEvent` s (stage ``train``: start, one update
            per step, a record per evaluation, end).
        batch_schedule: the batch over training (:mod:`batchfit.schedule`): ``"0:32,500:64"``, phases, or
            ``"auto"``: derived from ``branching`` (a :class:`batchfit.branching.BranchingResult`), measured first
            when none is given. Batches are per rank, like ``batch_size``. At each change by ``k`` the optimizer
            moves by :func:`batchfit.schedule.transfer` (the LR rule, ``beta2``, ``weight_decay_timescale``); the
            warm-up and the user's schedule multiply on top. With ``epochs`` the budget is epochs x N samples.
        micro_batch_limit: the largest micro-batch (the finder's memory limit): each phase trains with
            ``plan_micro(batch, limit)`` micro-batches x accumulation (default: ``micro_batch_size``).
        checkpoint / checkpoint_every: write a resumable checkpoint (model, optimizer, LR schedule, RNG, data
            position, schedule position, history) every this many steps and at the end.
        resume_from: continue a run from its checkpoint (same arguments): the result equals the uninterrupted run.

    Returns a :class:`TrainResult`; a non-finite loss stops the run and sets ``diverged``.

    >>> r = train("demo:digits-mlp", batch_size=64, epochs=1)
    >>> r.accumulation_steps, r.diverged
    (1, False)
    """
    t_start = time.perf_counter()
    kw: dict[str, Any] = dict(micro_batch_size=micro_batch_size, lr=lr, lr_rule=lr_rule, warmup=warmup,
                              epochs=epochs, steps=steps, precision=precision, device=device, seed=seed,
                              drop_last=drop_last, eval_batch_size=eval_batch_size, eval_every=eval_every,
                              grad_clip=grad_clip, world_size=world_size, memory_budget=memory_budget,
                              weight_decay_rule=weight_decay_rule, parallel=parallel)
    measured = None
    auto = isinstance(batch_schedule, str) and batch_schedule.strip() == "auto"
    if branching is not None:
        branching = _as_branching(branching)
        if not auto:
            raise ConfigError("branching is only used with batch_schedule='auto' (it derives the schedule); drop "
                              "branching, or set batch_schedule='auto'")
    if auto:
        batch_schedule, measured = auto_schedule(workload, batch_size=batch_size, branching=branching, **kw)
    plan = plan_train(workload, batch_size=batch_size, batch_schedule=batch_schedule,
                      micro_batch_limit=micro_batch_limit, beta2=beta2, weight_decay_timescale=weight_decay_timescale,
                      checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume_from=resume_from, **kw)
    if measured is not None:
        callbacks = [*callbacks, _Extra("branching", measured.to_dict())]
    check_finite_data(plan.workload.train_data, "the training data")  # outside the budget: not what training holds
    if plan.workload.val_data is not None:
        check_finite_data(plan.workload.val_data, "the validation data")
    # The budget meters what training holds, as the finder measures it. CPU: each step (and each evaluation) runs
    # under a byte counter over the parameters, buffers, optimizer state and its batch; CUDA: the allocator is capped
    # for the run. Neither charges the data set or the NaN scan above.
    cuda_budget = plan.memory_budget if plan.device.type == "cuda" else None
    with memory.enforce_budget(cuda_budget, plan.device):
        return _train(plan, callbacks, progress, t_start)


@contextlib.contextmanager
def _workers_closed(source: Any) -> Iterator[None]:
    """The training source's kept DataLoader workers end with the run, also when it fails (a dead worker left
    registered with torch would be reported again, wrongly, in this process's next run)."""
    try:
        yield
    finally:
        close = getattr(source, "close", None)
        if callable(close):
            close()


def _train(plan: TrainPlan, callbacks: Sequence[Any], progress: ProgressFn | None, t_start: float) -> TrainResult:
    run = _setup(plan, callbacks, progress, t_start)
    state, result, losses = run.state, run.result, run.losses
    if plan.device.type == "cuda":
        memory.reset_cuda_peak(plan.device)
    measure_step = 1 if plan.total_steps > 1 else 0  # optimizer state exists only after the first step
    phases = batch_schedules.ScheduleState(plan.phases) if plan.phases else None
    run.feed = _Feed(torch.Generator().manual_seed(plan.seed),
                     (lambda i: phases.phase_at(i).batch_size) if phases else (lambda i: plan.batch_size_per_rank))
    if plan.resume_from is not None:
        _resume(run)
    _call(callbacks, "on_train_start", state)
    on_step_end = _hooks(callbacks, "on_step_end")
    emit(progress, "train", "start",
         f"effective batch {plan.effective_batch_size} = micro-batch {plan.micro_batch_size} x accumulation "
         f"{plan.accumulation_steps} x world {plan.world_size}", completed=state.step, total=plan.total_steps)
    source = data.train_source(plan.workload)
    stream = _stream(source, plan, run.feed)
    with _workers_closed(source), contextlib.closing(stream):  # a data loader's workers end with the loop
        for epoch, batch, count in stream:
            if batch is None:  # -- an epoch ended: evaluate (unless this step already was) ---------------------------
                state.epoch = epoch + 1
                if run.last_eval != state.step:
                    _evaluate(run)
                    run.last_eval = state.step
                if state.step >= plan.total_steps:
                    break
                continue
            if state.step >= plan.total_steps:  # a source that yields more batches than its epoch should have
                break
            # -- the step, at the LR set at its top (a schedule's change point first moves the optimizer) ---------
            entry = _enter_phase(run, phases) if phases else None
            state.lr = run.step.begin()  # (the step sets it; here first, so every callback of the step sees it)
            if entry is not None:
                entry["lr"] = state.lr
                result.extras.setdefault("batch_schedule", []).append(entry)
            due = _timed_step(run, batch, count, measure=plan.device.type == "cpu" and state.step == measure_step)
            del batch
            # -- the loss: read per step on the CPU, every few steps on CUDA (a sync point) ------------------------
            diverged = due and losses.nonfinite()
            if plan.world_size > 1 and due:
                diverged = distributed.any_flag(diverged)[0]  # all ranks stop at the same step
            if diverged:
                result.diverged, result.diverged_at_step = True, state.step
                result.extras["diverged_reason"] = "non-finite training loss"
                break
            for fn in on_step_end:
                fn(state)
            emit(progress, "train", "update", completed=state.step, total=plan.total_steps)
            # -- evaluation (an epoch's end evaluates when the epoch closes) ------------------------------------------
            epoch_end = not phases and state.step % plan.steps_per_epoch == 0
            if plan.eval_every and state.step % plan.eval_every == 0 and not epoch_end:
                _evaluate(run)
                run.last_eval = state.step
            if plan.checkpoint_every and state.step % plan.checkpoint_every == 0:
                _save_checkpoint(run)
            if state.step >= plan.total_steps and not epoch_end:
                break
    if run.last_eval != state.step and not result.diverged:
        _evaluate(run)
    if plan.checkpoint is not None:
        _save_checkpoint(run)
    return _finish(run)


# ---------------------------------------------------------------------------------------------------------------
# Batch-size schedules and checkpoints


class _Extra:
    """A callback that adds one key to the result (e.g. the branching measurement behind an ``auto`` schedule)."""

    def __init__(self, key: str, value: Any) -> None:
        self.key, self.value = key, value

    def on_train_end(self, state: TrainState, result: TrainResult) -> None:
        result.extras[self.key] = self.value


def _as_branching(branching: Any) -> Any:
    """A :class:`~batchfit.branching.BranchingResult` from itself or its dict (``to_dict()``); a
    :class:`ConfigError` for anything else."""
    if isinstance(branching, BranchingResult):
        return branching
    if isinstance(branching, Mapping):
        try:
            return BranchingResult.from_dict(dict(branching))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else " ".join(str(exc).split())[:120]
            raise ConfigError(f"branching is not a branching measurement ({what}); pass the BranchingResult of "
                              "batchfit.branching.local_critical_batch or its to_dict()") from None
    shown = repr(branching) if len(repr(branching)) <= 60 else repr(branching)[:57] + "..."
    raise ConfigError(f"branching must be a BranchingResult (batchfit.branching.local_critical_batch) or its "
                      f"to_dict(), got {type(branching).__name__} {shown}")


def auto_schedule(workload: Workload | str, *, batch_size: int | None = None, branching: Any = None,
                  max_batch_size: int | None = None, **train_kwargs: Any) -> tuple[list[Any], Any]:
    """The batch-size warm-up derived from the measured local critical batch (:mod:`batchfit.branching`).

    ``branching``: a :class:`~batchfit.branching.BranchingResult` (or its dict); when ``None`` it is measured
    first, with the run's own budget as the reference run (checkpoints at 0, 10, 25 and 50 % of it; the rest of the
    reference run is not trained). Returns ``(phases, the branching result)``.
    """
    plan = plan_train(workload, batch_size=batch_size, **train_kwargs)
    b0 = plan.batch_size_per_rank
    cap = plan.num_samples // plan.world_size
    if max_batch_size is not None:
        cap = min(cap, checks.positive_int("max_batch_size", max_batch_size))
    if branching is None:
        factors = [f for f in (1, 2, 4, 8, 16, 32) if b0 * f <= cap]
        branching = local_critical_batch(plan.workload, batch_size=b0, factors=factors,
                                         checkpoints=(0.0, 0.1, 0.25, 0.5), reference_steps=plan.total_steps,
                                         device=plan.device, seed=plan.seed, finish_reference=False,
                                         precision=plan.precision, warmup=plan.warmup_steps)
    else:
        branching = _as_branching(branching)
    if branching.base_batch_size != b0:
        raise ConfigError(f"the branching measurement was made at batch {branching.base_batch_size}, the run starts "
                          f"at {b0}; measure at the run's batch")
    phases = batch_schedules.derive_schedule(branching.points, base_batch_size=b0,
                                             total_samples=plan.total_steps * b0, max_batch_size=cap)
    return phases, branching


def _enter_phase(run: _Run, phases: batch_schedules.ScheduleState) -> dict[str, Any] | None:
    """At a change point move the optimizer (LR rule, beta2, AdamW timescale) and the micro-batch plan; returns
    the ``batch_schedule`` entry of a phase entered at this step (``None`` inside a phase)."""
    plan, state, step = run.plan, run.state, run.step
    if state.step == 0:
        return _phase_entry(run, phases.phases[0])
    change = phases.change_at(state.step)
    if change is None:
        return None
    old, new = change
    k = new.batch_size / old.batch_size
    rule = default_rule(run.optimizer) if plan.lr_rule == "auto" else plan.lr_rule
    moved = batch_schedules.transfer(run.optimizer, k, lr_rule=rule, beta2=plan.beta2,
                                     weight_decay_timescale=plan.weight_decay_timescale
                                     or plan.weight_decay_rule == "timescale")
    run.schedule.rescale(moved["lr_factor"])
    run.phase_lr *= moved["lr_factor"]
    micro, acc = batch_schedules.plan_micro(new.batch_size, plan.micro_batch_limit)
    step.micro_batch_size = micro
    state.batch_size_per_rank, state.batch_size = new.batch_size, new.batch_size * plan.world_size
    state.micro_batch_size, state.accumulation_steps = micro, acc
    return _phase_entry(run, new)


def _phase_entry(run: _Run, phase: batch_schedules.Phase) -> dict[str, Any]:
    micro, acc = batch_schedules.plan_micro(phase.batch_size, run.plan.micro_batch_limit)
    g = run.optimizer.param_groups[0]
    entry: dict[str, Any] = {"step": run.state.step, "batch_size": phase.batch_size * run.plan.world_size,
                             "micro_batch_size": micro, "accumulation_steps": acc, "lr": None,
                             "peak_lr": run.phase_lr}
    if "betas" in g:
        entry["beta2"] = float(g["betas"][1])
    if "weight_decay" in g:
        entry["weight_decay"] = float(g["weight_decay"])
    return entry


def _run_identity(run: _Run) -> dict[str, Any]:
    """Every argument that changes a run's result, as :func:`train`'s keywords (what a checkpoint must match to be
    resumed): the workload (name, training samples, the model's parameter names, shapes and dtypes, the optimizer's
    class and settings), the batch and its micro-batches, the LR and its rules, warm-up, the planned steps,
    evaluation, clipping, precision, seed, the batch schedule and its rules. Not in it: the device (a checkpoint may
    move between machines), the memory budget and the evaluation batch (they bound memory; the values trained are
    the same)."""
    import hashlib
    import json

    plan = run.plan
    model = distributed.unwrap(run.model) if plan.world_size > 1 else run.model
    tensors = [(name, list(t.shape), str(t.dtype).removeprefix("torch."))
               for name, t in [*model.named_parameters(), *model.named_buffers()]]
    digest = hashlib.sha1(json.dumps(tensors).encode()).hexdigest()[:12]
    params = sum(int(p.numel()) for p in model.parameters())
    opt = run.optimizer
    settings = {k: v for k, v in sorted(getattr(opt, "defaults", {}).items()) if k != "lr"}
    settings_text = ", ".join(f"{k}={v}" for k, v in settings.items() if isinstance(v, (int, float, str, bool, tuple)))
    return {
        "workload": plan.workload.name,
        "training samples": plan.num_samples,
        "model": f"{params} parameters in {len(tensors)} tensors (digest {digest})",
        "optimizer": f"{type(opt).__name__}({settings_text})",
        "batch_size": plan.effective_batch_size,
        "micro_batch_size": plan.micro_batch_size,
        "world_size": plan.world_size,
        "drop_last": plan.drop_last,
        "lr": plan.lr,
        "lr_rule": plan.lr_rule,
        "weight_decay_rule": plan.weight_decay_rule,
        "warmup": plan.warmup_steps,
        "steps": plan.total_steps,
        "eval_every": plan.eval_every,
        "grad_clip": plan.grad_clip,
        "precision": plan.precision,
        "seed": plan.seed,
        "batch_schedule": ",".join(f"{p.step}:{p.batch_size * plan.world_size}" for p in plan.phases) or None,
        "micro_batch_limit": plan.micro_batch_limit if plan.phases else None,
        "beta2": plan.beta2 if plan.phases else None,
        "weight_decay_timescale": plan.weight_decay_timescale,
    }


def _save_checkpoint(run: _Run) -> None:
    """Everything the loop needs to continue exactly, written by the one output writer (:func:`batchfit._io.
    write_torch`: atomic for a file, through a symbolic link to its target, in place for a FIFO or a device); rank 0
    under DDP. A write that fails (a full disk, a device that refuses) is one line naming the checkpoint."""
    plan, state = run.plan, run.state
    if plan.checkpoint is None or (plan.world_size > 1 and distributed.rank() != 0):
        return
    model = distributed.unwrap(run.model) if plan.world_size > 1 else run.model
    ckpt = {
        "format": 1, "workload": plan.workload.name, "total_steps": plan.total_steps,
        "phases": [p.to_dict() for p in plan.phases], "identity": _run_identity(run), "model": model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "lr_schedule": run.schedule.state_dict(),
        "scaler": run.step.scaler.state_dict() if run.step.scaler is not None else None,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if plan.device.type == "cuda" else None,
        "data": run.feed.to_dict() if run.feed is not None else None,
        "state": {"step": state.step, "epoch": state.epoch, "samples_seen": state.samples_seen,
                  "micro_batch_size": state.micro_batch_size, "accumulation_steps": state.accumulation_steps,
                  "batch_size": state.batch_size, "batch_size_per_rank": state.batch_size_per_rank,
                  "step_micro": run.step.micro_batch_size, "phase_lr": run.phase_lr, "last_eval": run.last_eval},
        "losses": {"cpu_sum": run.losses._cpu_sum, "count": run.losses.count, "sum": run.losses._sum.cpu()},
        "history": list(run.result.history), "batch_schedule": list(run.result.extras.get("batch_schedule", [])),
    }
    try:
        write_torch(plan.checkpoint, ckpt)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        why = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:200]
        raise ConfigError(f"checkpoint cannot be written to {plan.checkpoint!r} at step {state.step} ({why}); free "
                          "space or choose another checkpoint path") from exc


def _identity_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name=checkpointed (this run: name=now)`` for each differing entry (keys this run does not know are
    skipped)."""
    out = []
    for key, now in current.items():
        if key not in stored or stored[key] == now:
            continue
        was = stored[key]
        out.append(f"{key}={was!r} (this run: {key}={now!r})" if key in _KEYWORD_ENTRIES
                   else f"{key} {was} (this run: {now})")
    return out


# identity entries that are train() keywords (the CLI shows them as its flags); the others describe the workload
_KEYWORD_ENTRIES = frozenset({
    "batch_size", "micro_batch_size", "world_size", "drop_last", "lr", "lr_rule", "weight_decay_rule", "warmup",
    "steps", "eval_every", "grad_clip", "precision", "seed", "batch_schedule", "micro_batch_limit", "beta2",
    "weight_decay_timescale",
})


def _resume(run: _Run) -> None:
    """Load :func:`_save_checkpoint`'s file into a freshly set-up run; the run's arguments must be the checkpoint's
    (:func:`_run_identity`; a longer budget is another run too: the warm-up and the LR schedule are laid out over the
    planned steps)."""
    plan, state = run.plan, run.state
    try:
        ckpt = torch.load(plan.resume_from, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise ConfigError(f"resume_from {plan.resume_from!r} is not a batchfit checkpoint ({exc}); give a file "
                          "written by train(checkpoint=...)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != 1:
        raise ConfigError(f"resume_from {plan.resume_from!r} is not a batchfit checkpoint")
    stored = ckpt.get("identity")
    if isinstance(stored, dict):
        differ = _identity_mismatch(stored, _run_identity(run))
        if differ:
            raise ConfigError(f"the checkpoint {plan.resume_from!r} is of another run; it was written with "
                              f"{'; '.join(differ)}; resume with the checkpointed values (a checkpoint continues "
                              "one run, bit for bit), or start a new run without resume_from")
    same = (ckpt["workload"] == plan.workload.name and ckpt["total_steps"] == plan.total_steps
            and ckpt["phases"] == [p.to_dict() for p in plan.phases])
    if not same:
        raise ConfigError(f"the checkpoint {plan.resume_from!r} is of another run (workload {ckpt['workload']}, "
                          f"{ckpt['total_steps']} steps, schedule {ckpt['phases']}); resume with the same arguments")
    model = distributed.unwrap(run.model) if plan.world_size > 1 else run.model
    model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.schedule.load_state_dict(ckpt["lr_schedule"])
    if run.step.scaler is not None and ckpt["scaler"] is not None:
        run.step.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] is not None and plan.device.type == "cuda":
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    if run.feed is not None and ckpt["data"] is not None:
        run.feed.load(ckpt["data"])
    st = ckpt["state"]
    state.step, state.epoch, state.samples_seen = st["step"], st["epoch"], st["samples_seen"]
    run.step.index = state.step  # the step's next LR is that of the step the run continues at
    state.micro_batch_size, state.accumulation_steps = st["micro_batch_size"], st["accumulation_steps"]
    state.batch_size, state.batch_size_per_rank = st["batch_size"], st["batch_size_per_rank"]
    run.step.micro_batch_size, run.phase_lr, run.last_eval = st["step_micro"], st["phase_lr"], st["last_eval"]
    run.losses._cpu_sum, run.losses.count = ckpt["losses"]["cpu_sum"], ckpt["losses"]["count"]
    run.losses._sum = ckpt["losses"]["sum"].to(plan.device)
    run.result.history.extend(ckpt["history"])
    if ckpt["batch_schedule"]:
        run.result.extras["batch_schedule"] = list(ckpt["batch_schedule"])
    run.result.extras["resumed_at_step"] = state.step
