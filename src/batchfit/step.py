"""The one training step: what ``train``, the finder's memory trials and the noise probe all run.

One optimizer step reads, in order::

    LR for this step (warm-up x the user's schedule)            TrainStep.begin (LRSchedule.begin_step)
    for each micro-batch of this rank's batch:                  TrainStep.forward_backward
        forward under autocast, loss x (share of the global batch's samples), (fp16: scaled) backward,
        DDP all-reduce only in the last micro-batch's backward (no_sync before; FSDP2: reduce-scatter, with
        set_requires_gradient_sync), per-micro-batch hooks
    unscale (fp16) -> before-step hooks (gradients unscaled, not clipped: the noise meter reads them here)
    -> clip (grad_clip) -> optimizer step -> the user's scheduler step -> zero grads    TrainStep.optimizer_step

Weighting each micro-batch loss by ``samples / global batch samples`` (x world size, because DDP then averages over
ranks) makes the accumulated gradient equal the big-batch gradient even when the last micro-batch is smaller.

:func:`run_batch` is the one way a batch is fed to the user's model (the workload contract: ``forward``,
``targets``, ``loss_fn`` or ``"output"``); errors raised by the user's code there become one-line
:class:`~batchfit.errors.WorkloadError` naming the part of the workload, while out-of-memory errors pass through
untouched so every OOM guard (:func:`batchfit.memory.try_oom`) still sees them. :class:`LossMeter` is the one place
the training loss is read (CPU: ``.item()`` per micro-batch; CUDA: accumulated on the device, synchronized every
few steps).

:func:`build_run` is the one way a run of the step is built (model, optimizer at the batch's LR, LR schedule, step):
``train``, the finder's trials and step timing (through :class:`StepRunner`), branching's reference run and branches
and the noise probe all build through it. :func:`eval_pass` is the one evaluation pass.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from batchfit import memory
from batchfit.cost import add_samples
from batchfit.data import batch_size_of, loader_failure, slice_batch, to_device, train_source
from batchfit.errors import BatchfitError, ConfigError, DataError, WorkloadError
from batchfit.runtime import seed_everything
from batchfit.scaling import apply_scaling, default_rule, optimizer_settings, timescale_weight_decay

__all__ = [
    "PRECISIONS",
    "LRSchedule",
    "LossMeter",
    "MicroBatch",
    "ModelKeeper",
    "StepRun",
    "StepRunner",
    "TrainStep",
    "accumulation_count",
    "autocast",
    "batch_has_nonfinite",
    "build_model",
    "build_optimizer",
    "build_run",
    "call_forward",
    "check_precision",
    "eval_pass",
    "fetching",
    "make_scaler",
    "metric_value",
    "run_batch",
    "user_call",
]

PRECISIONS = ("fp32", "bf16", "fp16")
CUDA_SYNC_EVERY = 16  # steps between reads of the CUDA loss accumulator (each read is a CPU-GPU sync point)


# ---------------------------------------------------------------------------------------------------------------
# Precision


def check_precision(precision: str, device: torch.device) -> None:
    """fp32 anywhere; bf16 on the CPU or a GPU that supports it; fp16 only on CUDA (it needs a gradient scaler)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 training needs CUDA (it uses a gradient scaler); on the CPU use precision bf16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use precision fp16 or fp32")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast region of a forward pass (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str) -> Any:
    """fp16 needs a dynamic loss scale (Micikevicius et al. 2018, "Mixed Precision Training"); others none."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" else None


# ---------------------------------------------------------------------------------------------------------------
# Calling the user's code


def user_call(part: str, fix: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call user code; any error but an OOM (or a batchfit error) becomes one line naming ``part`` and ``fix``."""
    try:
        return fn(*args, **kwargs)
    except BatchfitError:
        raise
    except Exception as exc:
        if memory.is_oom(exc):
            raise
        loader = loader_failure(exc)  # a DataLoader worker died while this ran: the data's fault, not this part's
        if loader is not None:
            raise DataError(f"the workload's data loader failed: {loader} (noticed while {part} ran; "
                            "--debug shows the traceback)") from exc
        msg = " ".join(str(exc).split())[:300]
        raise WorkloadError(f"{part} raised {type(exc).__name__}: {msg}; {fix} (--debug shows the traceback)") \
            from exc


_FORWARD_FIX = "fix the model, or set Workload.forward to say how the model is called on a batch"
_BACKWARD_FIX = "check the model for in-place changes of tensors autograd needs and for custom autograd functions"
_LOSS_FIX = ("check that the targets fit the model's outputs (shapes; class labels in [0, number of classes)) "
             "or set Workload.targets")


def _loss_fix(outputs: Any) -> str:
    """The fix a failing ``loss_fn`` is told: for a model output object holding its own loss and logits (Hugging
    Face's ``ModelOutput``, handed to ``F.cross_entropy``), ``loss_fn="output"`` first (issue 23.5)."""
    if isinstance(outputs, torch.Tensor) or not (hasattr(outputs, "logits") or hasattr(outputs, "loss")):
        return _LOSS_FIX
    return (f"the model returns a {type(outputs).__name__} (with .loss/.logits), not a tensor: set "
            "loss_fn=\"output\" to train on the loss the model computes from the batch's labels, or read "
            "outputs.logits in loss_fn; else " + _LOSS_FIX)


def _parts(batch: Any) -> str:
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {len(batch)} parts"
    return f"a {type(batch).__name__}"


def call_forward(workload: Any, model: nn.Module, batch: Any) -> Any:
    """The model's outputs on ``batch``, called as the workload says (``Workload.forward``: a function, batch keys,
    or the default: a mapping as keyword arguments, ``(inputs, targets)`` as ``model(inputs)``)."""
    spec = getattr(workload, "forward", None)
    if callable(spec):
        return user_call("the workload's forward", _FORWARD_FIX, spec, model, batch)
    if spec is not None:  # a sequence of keys: keyword arguments from a mapping batch
        if not isinstance(batch, Mapping):
            raise DataError(f"Workload.forward names keys {list(spec)} but the batch is {_parts(batch)}, not a "
                            "mapping; make the dataset/collate return dicts or give forward as a function")
        missing = [k for k in spec if k not in batch]
        if missing:
            raise DataError(f"the batch has no key(s) {missing} named in Workload.forward; it has {list(batch)}")
        return user_call("model forward", _FORWARD_FIX, model, **{k: batch[k] for k in spec})
    if isinstance(batch, Mapping):
        return user_call("model forward", _FORWARD_FIX, model, **batch)
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return user_call("model forward", _FORWARD_FIX, model, batch[0])
    raise WorkloadError(
        f"batches are {_parts(batch)}; without Workload.forward they must be (input, target) pairs or mappings "
        "of keyword arguments. Set Workload.forward (keys or a function of (model, batch)) and Workload.targets"
    )


def _targets(workload: Any, batch: Any) -> Any:
    spec = getattr(workload, "targets", None)
    if callable(spec):
        return user_call("the workload's targets", "fix Workload.targets", spec, batch)
    if isinstance(spec, str):
        if not isinstance(batch, Mapping) or spec not in batch:
            raise DataError(f"Workload.targets is {spec!r} but the batch ({_parts(batch)}) has no such key")
        return batch[spec]
    if isinstance(batch, Mapping):
        return batch.get("labels")
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[1]
    return None


def _output_loss(outputs: Any) -> Any:
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise WorkloadError(
            f"loss_fn is 'output' but the model's output ({type(outputs).__name__}) has no .loss or ['loss']; "
            "pass labels to the model (Hugging Face: a 'labels' key in the batch) or give a loss_fn"
        )
    return loss


def run_batch(workload: Any, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any, Any]:
    """Forward one (device-resident) batch the workload's way; return ``(scalar loss, outputs, targets)``.

    - the model is called with ``Workload.forward`` (default: ``model(batch[0])`` for ``(input, target)`` pairs,
      ``model(**batch)`` for mappings);
    - targets come from ``Workload.targets`` (default: ``batch[1]`` / ``batch.get("labels")``);
    - the loss is ``loss_fn(outputs, targets)``, or ``outputs.loss`` when ``loss_fn == "output"``.

    Errors in the user's model, loss or targets are one-line :class:`WorkloadError` s naming the part; an OOM passes
    through unchanged; a loss that is not a scalar is a :class:`WorkloadError`.
    """
    outputs = call_forward(workload, model, batch)
    targets = _targets(workload, batch)
    if workload.loss_fn == "output":
        loss = _output_loss(outputs)
    else:
        loss = user_call("loss_fn", _loss_fix(outputs), workload.loss_fn, outputs, targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise WorkloadError(
            f"the loss must be a scalar mean over the batch; loss_fn returned {shape}. "
            "Use reduction='mean' (or call .mean())"
        )
    return (loss if loss.dim() == 0 else loss.reshape(())), outputs, targets


def metric_value(name: str, fn: Callable[[Any, Any], Any], outputs: Any, targets: Any) -> torch.Tensor | float:
    """A metric's batch mean as a float64 tensor or a float; a raising or non-numeric metric is a WorkloadError."""
    value = user_call(f"metric {name!r}", f"fix metric {name!r} (it takes (outputs, targets), returns a number)",
                      fn, outputs, targets)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.detach().double().reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    kind = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
    raise WorkloadError(f"metric {name!r} returned {kind}; a metric must return the batch mean as a number "
                        "or a one-element tensor")


def build_model(workload: Any) -> nn.Module:
    """A fresh model from the workload's factory; a failing or wrong factory is a one-line workload error."""
    try:
        model = workload.model_fn()
    except BatchfitError:
        raise
    except Exception as exc:
        raise WorkloadError(f"model_fn raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise WorkloadError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}")
    return model


def build_optimizer(workload: Any, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """The workload's optimizer over ``model``'s parameters at ``lr`` (default ``base_lr``), checked."""
    if not any(p.requires_grad for p in model.parameters()):
        raise WorkloadError("the model has no trainable parameters (every parameter has requires_grad=False); "
                            "unfreeze at least one layer")
    optimizer = user_call("optimizer_fn", "fix Workload.optimizer_fn (it takes (params, lr))", workload.optimizer_fn,
                          model.parameters(), workload.base_lr if lr is None else lr)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise WorkloadError(f"optimizer_fn must return a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                            "return e.g. torch.optim.SGD(params, lr=lr)")
    return optimizer


def fetching(batches: Iterable[Any], part: str) -> Iterator[Any]:
    """Iterate a data source; an error raised while reading the user's data is a one-line DataError naming ``part``
    (e.g. a dataset whose ``__len__`` is larger than the items it holds), an OOM passes through."""
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except BatchfitError:
            raise
        except Exception as exc:
            if memory.is_oom(exc):
                raise
            loader = loader_failure(exc)  # a worker's own error (its last traceback line), or a dead worker
            if loader is not None:
                raise DataError(f"reading a batch of {part}: {loader} (--debug shows the traceback)") from exc
            msg = " ".join(str(exc).split())[:300]
            raise DataError(f"reading a batch of {part} raised {type(exc).__name__}: {msg}; check the dataset "
                            "(does len() match the items it holds?) and its collate_fn") from exc
        yield item
        del item  # not alive while the next one is read


def batch_has_nonfinite(batch: Any) -> bool:
    """True when a floating-point tensor in the batch holds NaN or Inf."""
    leaves = torch.utils._pytree.tree_flatten(batch)[0]
    return any(
        isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in leaves
    )


# ---------------------------------------------------------------------------------------------------------------
# Learning rate: warm-up x the user's schedule


ABSOLUTE_CHECK_STEPS = 5  # scheduler steps compared at two optimizer LRs


def schedule_lrs(factory: Any, total_steps: int, steps: int, *, lr: float = 1.0,
                 optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """The first group's LR at the start and after each of ``steps`` scheduler steps of ``factory(optimizer,
    total_steps)``, built on ``optimizer`` (default: a throwaway SGD with momentum over one dummy parameter at
    ``lr``, so schedules that cycle momentum build too). Nothing is trained; whatever the factory or its steps
    raise propagates (the callers decide what a failure means)."""
    opt = optimizer if optimizer is not None else torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr,
                                                                  momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": nothing is trained here
        sched = factory(opt, total_steps)
        lrs = [opt.param_groups[0]["lr"]]
        for _ in range(steps):
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
    return lrs


def absolute_schedule(factory: Any, lr: float, total_steps: int) -> str | None:
    """Whether ``factory(optimizer, total_steps)`` ignores the optimizer's LR (issue 23.1: ``OneCycleLR(opt,
    max_lr=3e-4, ...)`` trains at its own peak whatever LR the rule gives the batch size). The schedule is built on
    two throwaway optimizers (SGD with momentum over one dummy parameter) at ``lr`` and ``2 lr`` and stepped
    :data:`ABSOLUTE_CHECK_STEPS` times: a relative schedule keeps the 2x at every step; ``None`` when it does (or
    when the probe itself cannot run: nothing is claimed), else what was seen."""
    if not (isinstance(lr, (int, float)) and lr > 0):
        return None
    total = max(1, int(total_steps))
    try:
        steps = min(ABSOLUTE_CHECK_STEPS, total - 1)
        one, two = (schedule_lrs(factory, total, steps, lr=base) for base in (lr, 2 * lr))
    except Exception:  # noqa: BLE001 - the probe, not the user's run: the real schedule was built and is used
        return None
    if all(abs(b - 2 * a) <= 1e-9 * max(abs(b), 1e-30) for a, b in zip(one, two)):
        return None
    if all(abs(b - a) <= 1e-12 + 1e-9 * abs(a) for a, b in zip(one, two)):
        return f"its LR is {one[0]:.4g} at the first step whether the optimizer's LR is {lr:.4g} or {2 * lr:.4g}"
    return None  # neither proportional nor fixed: a mixed schedule, left as it is


class LRSchedule:
    """The LR of every step: the user's schedule (``Workload.lr_schedule``) times a linear warm-up.

    :meth:`begin_step` sets each group's LR at the *top* of a step (so every hook of that step sees the LR the step
    uses); :meth:`end_step` runs after the optimizer step: the user's scheduler is stepped on its own LR values (the
    warm-up factor is taken out first, so a chainable scheduler never compounds it), then the groups show the LR the
    step used until the next :meth:`begin_step`. Warm-up: step ``i`` (from 0) uses ``min(1, (i + 1) / warmup)`` of
    the scheduled LR (Goyal et al. 2017, gradual warm-up).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup_steps: int = 0, scheduler: Any = None) -> None:
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.scheduler = scheduler
        self._scheduled = [g["lr"] for g in optimizer.param_groups]
        self._used = list(self._scheduled)

    @classmethod
    def for_workload(cls, workload: Any, optimizer: torch.optim.Optimizer, *, total_steps: int,
                     warmup_steps: int = 0) -> LRSchedule:
        """Build the workload's ``lr_schedule(optimizer, total_steps)`` (if any) on the already scaled optimizer."""
        factory = getattr(workload, "lr_schedule", None)
        scheduler = None
        if factory is not None:
            lr = optimizer.param_groups[0]["lr"]
            scheduler = user_call("lr_schedule", "fix Workload.lr_schedule (it takes (optimizer, total_steps))",
                                  factory, optimizer, total_steps)
            if not callable(getattr(scheduler, "step", None)):
                raise WorkloadError(f"lr_schedule must return a scheduler with .step(), got "
                                    f"{type(scheduler).__name__}")
            absolute = absolute_schedule(factory, lr, total_steps)
            if absolute is not None:
                raise WorkloadError(
                    f"lr_schedule sets absolute learning rates ({type(scheduler).__name__}: {absolute}), so the LR "
                    f"batchfit gives this batch size ({lr:.4g}) never runs; build it relative to the optimizer's LR, "
                    "e.g. OneCycleLR(opt, max_lr=[g['lr'] for g in opt.param_groups], total_steps=n) or a LambdaLR "
                    "factor (docs/integrations.md, \"Your own LR schedule\")")
        return cls(optimizer, warmup_steps=warmup_steps, scheduler=scheduler)

    def factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0

    def begin_step(self, step: int) -> float:
        """Set the LR of step ``step`` (0-based); returns the first group's."""
        f = self.factor(step)
        self._used = [lr * f for lr in self._scheduled]
        for g, lr in zip(self.optimizer.param_groups, self._used):
            g["lr"] = lr
        return self._used[0]

    def end_step(self) -> None:
        if self.scheduler is None:
            return
        for g, lr in zip(self.optimizer.param_groups, self._scheduled):
            g["lr"] = lr
        user_call("the lr_schedule's scheduler.step()", "fix Workload.lr_schedule", self.scheduler.step)
        self._scheduled = [g["lr"] for g in self.optimizer.param_groups]
        for g, lr in zip(self.optimizer.param_groups, self._used):
            g["lr"] = lr

    def rescale(self, factor: float) -> None:
        """Multiply the scheduled LR (and the user's scheduler's base LRs) by ``factor``: a batch-size schedule's
        change point (:func:`batchfit.schedule.transfer`). The next :meth:`begin_step` applies it."""
        self._scheduled = [lr * factor for lr in self._scheduled]
        self._used = [lr * factor for lr in self._used]
        base = getattr(self.scheduler, "base_lrs", None)
        if isinstance(base, list):  # closed-form schedulers (LambdaLR, ...) compute from base_lrs
            self.scheduler.base_lrs = [lr * factor for lr in base]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the LR exactly (the user's scheduler's own state included)."""
        out: dict[str, Any] = {"scheduled": list(self._scheduled), "used": list(self._used)}
        if self.scheduler is not None and callable(getattr(self.scheduler, "state_dict", None)):
            out["scheduler"] = self.scheduler.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._scheduled = list(state["scheduled"])
        self._used = list(state["used"])
        if "scheduler" in state and callable(getattr(self.scheduler, "load_state_dict", None)):
            self.scheduler.load_state_dict(state["scheduler"])

    @property
    def name(self) -> str | None:
        if self.scheduler is None:
            return None  # an integration's wrapper may say how it steps (Lightning: per epoch or per step)
        return getattr(self.scheduler, "batchfit_name", None) or type(self.scheduler).__name__


# ---------------------------------------------------------------------------------------------------------------
# Reading the training loss


class LossMeter:
    """The training loss, sample-weighted, read the cheap way for the device.

    CPU: ``.item()`` per micro-batch costs nothing extra, and a non-finite loss is caught at once (a batch with NaN
    inputs is a :class:`DataError`). CUDA: the loss is summed on the device and read only every ``sync_every``
    steps (and at the end), because every read is a CPU-GPU synchronization.
    """

    def __init__(self, device: torch.device, sync_every: int = CUDA_SYNC_EVERY) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.sync_every = sync_every if self.on_cuda else 1
        self._sum = torch.zeros((), dtype=torch.float64, device=device)
        self._bad = torch.zeros((), dtype=torch.bool, device=device)
        self._cpu_sum = 0.0
        self._cpu_bad = False
        self.count = 0

    def add(self, loss: torch.Tensor, samples: int, batch: Any = None) -> None:
        """One micro-batch's mean loss over ``samples`` samples."""
        if self.on_cuda:
            self._sum += loss.detach().double() * samples
            self._bad |= ~torch.isfinite(loss.detach())
        else:
            value = loss.item()
            if not math.isfinite(value):
                if batch is not None and batch_has_nonfinite(batch):
                    raise DataError("a training batch contains NaN or Inf inputs; clean the data first")
                self._cpu_bad = True
            self._cpu_sum += value * samples
        self.count += samples

    def check_due(self, step: int, last: bool = False) -> bool:
        """Whether step ``step`` (1-based, just finished) reads the device (CUDA: synchronizes it)."""
        due = last or step % self.sync_every == 0
        if due and self.on_cuda:
            torch.cuda.synchronize(self.device)
        return due

    def nonfinite(self) -> bool:
        """A non-finite loss since the last :meth:`take` (a sync point on CUDA: call it when a check is due)."""
        return self._cpu_bad or (self.on_cuda and bool(self._bad))

    def take(self) -> tuple[float, int]:
        """(sum of loss x samples, samples) since the last call, then reset."""
        total = self._cpu_sum + (float(self._sum) if self.on_cuda else 0.0)
        count = self.count
        self._sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._cpu_sum, self.count = 0.0, 0
        return total, count


# ---------------------------------------------------------------------------------------------------------------
# The step


@dataclass
class MicroBatch:
    """What a per-micro-batch hook sees, right after that micro-batch's backward."""

    index: int  # 0-based within the step
    count: int  # micro-batches in this step
    samples: int  # samples in this micro-batch
    batch_samples: int  # samples in this rank's batch
    loss: torch.Tensor  # its (detached, unweighted) mean loss

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


MicroHook = Callable[[MicroBatch], None]
StepHook = Callable[["TrainStep"], None]


class TrainStep:
    """One optimizer step over one rank-local batch, split into micro-batches.

    Args:
        workload: supplies ``forward`` / ``targets`` / ``loss_fn`` (see :func:`run_batch`).
        model, optimizer: what is trained (a DDP-wrapped model when ``world_size > 1``).
        device, precision: where and how the forward runs; fp16 uses ``scaler`` (default: a fresh GradScaler).
        micro_batch_size: samples per forward/backward (``None``: the whole batch at once).
        grad_clip: clip the global gradient norm to this (after the before-step hooks, before the step).
        schedule: an :class:`LRSchedule` whose :meth:`LRSchedule.end_step` runs after each optimizer step.
        world_size: data-parallel ranks; the loss weight is this rank's share of the *global* batch x world size.
        on_micro / before_step: hooks (gradients after each micro-batch; unscaled, unclipped before the step).
        losses: a :class:`LossMeter` fed every micro-batch's loss (``None``: the loss is not read at all).

    The finder wraps calls in its memory meter; the noise probe calls :meth:`forward_backward` with its meter in
    ``on_micro``; ``train`` calls the whole step (``step(batch, global_count)``).
    """

    def __init__(self, workload: Any, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 device: torch.device, precision: str = "fp32", micro_batch_size: int | None = None,
                 grad_clip: float | None = None, scaler: Any = "auto", schedule: LRSchedule | None = None,
                 world_size: int = 1, on_micro: Sequence[MicroHook] = (), before_step: Sequence[StepHook] = (),
                 losses: LossMeter | None = None) -> None:
        self.workload = workload
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.precision = precision
        self.micro_batch_size = micro_batch_size
        self.grad_clip = grad_clip
        self.scaler = make_scaler(precision) if scaler == "auto" else scaler
        self.schedule = schedule
        self.world_size = world_size
        self.on_micro = list(on_micro)
        self.before_step = list(before_step)
        self.losses = losses
        self._ddp = world_size > 1 and callable(getattr(model, "no_sync", None))
        # FSDP2: gradients are reduce-scattered only on the last micro-batch (set_requires_gradient_sync); with
        # sync_every_micro (the noise meter under sharding) after every micro-batch
        self._fsdp = callable(getattr(model, "set_requires_gradient_sync", None))
        self.sync_every_micro = False
        self.guard: Any = None  # a batchfit.sharding.CollectiveGuard: checked before clipping (a collective)
        self.index = 0  # optimizer steps taken: the 0-based index of the next step (its warm-up and schedule)
        self.lr: float | None = None  # the first group's LR of the step in progress (or the last one taken)
        self._begun: int | None = None  # the index whose LR :meth:`begin` has set

    def begin(self) -> float | None:
        """Set the LR of the next step (step :attr:`index`: warm-up x the user's schedule, by the
        :class:`LRSchedule`) and return it. :meth:`__call__` does it first unless the caller already has (``train``
        does, so every callback of the step sees its LR); without a schedule the LR is the optimizer's as it is."""
        if self.schedule is not None:
            self.lr = self.schedule.begin_step(self.index)
        elif self.optimizer is not None:
            self.lr = float(self.optimizer.param_groups[0]["lr"])
        self._begun = self.index
        return self.lr

    def forward_backward(self, batch: Any, global_count: int | None = None) -> int:
        """Forward and weighted backward over the micro-batches of ``batch`` (a host or device batch).

        ``global_count`` is the number of samples in the global batch (all ranks); default: this batch x world.
        Returns this rank's samples.
        """
        n = batch_size_of(batch)
        total = global_count if global_count is not None else n * self.world_size
        micro = min(self.micro_batch_size or n, n)
        count = math.ceil(n / micro)
        for i in range(count):
            start = i * micro
            m = min(micro, n - start)
            part = batch if count == 1 else slice_batch(batch, start, start + m, n)
            part = to_device(part, self.device)
            # DDP: gradients are all-reduced once per step, in the last micro-batch's backward
            sync = contextlib.nullcontext() if not self._ddp or i == count - 1 else self.model.no_sync()
            if self._fsdp:
                self.model.set_requires_gradient_sync(i == count - 1 or self.sync_every_micro)
            with sync:
                with autocast(self.precision, self.device):
                    loss, _, _ = run_batch(self.workload, self.model, part)
                if not loss.requires_grad:
                    raise WorkloadError("the loss does not depend on any trainable parameter (it has no gradient); "
                                        "check the model's forward and loss_fn")
                weight = m * self.world_size / total  # the share of the *global* batch (DDP averages over ranks)
                scaled = loss * weight if weight != 1.0 else loss
                user_call("backward through the model", _BACKWARD_FIX,
                          (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward)
            loss = loss.detach()
            if self.losses is not None:
                self.losses.add(loss, m, part)
            if self.on_micro:
                info = MicroBatch(index=i, count=count, samples=m, batch_samples=n, loss=loss)
                for hook in self.on_micro:
                    hook(info)
            del part, scaled
        add_samples(total)  # what this measurement costs the user, in samples of their training
        return n

    def optimizer_step(self) -> None:
        """Unscale -> before-step hooks -> clip -> step -> the user's scheduler -> zero grads."""
        optimizer = self.optimizer
        if optimizer is None:
            raise ConfigError("this TrainStep has no optimizer; it can only run forward_backward")
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        for hook in self.before_step:
            hook(self)
        if self.grad_clip is not None:
            if self.guard is not None:  # sharded: the norm is an all-reduce
                self.guard.check()
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        if self.schedule is not None:
            self.schedule.end_step()
        optimizer.zero_grad(set_to_none=True)
        self.index += 1

    def __call__(self, batch: Any, global_count: int | None = None) -> int:
        """The whole step: :meth:`begin` (the LR set at its top), :meth:`forward_backward`, then
        :meth:`optimizer_step`; returns this rank's samples."""
        if self._begun != self.index:
            self.begin()
        n = self.forward_backward(batch, global_count)
        self.optimizer_step()
        return n


# ---------------------------------------------------------------------------------------------------------------
# One run: the model, its optimizer at the batch's LR, the LR schedule and the step (train, the finder's trials,
# step timing, branching's reference run and branches, the noise probe)


@dataclass
class StepRun:
    """What :func:`build_run` built. ``optimizer`` and ``schedule`` are ``None`` for a run of gradients only (the
    noise probe); ``lr`` is the peak LR (after the rule, before warm-up and the user's schedule); ``lr_rule`` and
    ``lr_scaling`` say what the rule did (``None`` / empty when the LR was not scaled); ``optimizer_settings`` are
    the optimizer's settings before the user's schedule moved any (OneCycleLR's momentum)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    schedule: LRSchedule | None
    step: TrainStep
    lr: float | None = None
    lr_rule: str | None = None
    lr_scaling: dict[str, Any] = field(default_factory=dict)
    optimizer_settings: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """A copy of what :func:`build_run` (``state=``) needs to continue this run from its next step: model,
        optimizer, LR schedule, loss scale, step index."""
        return copy.deepcopy({
            "model": self.model.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "scaler": None if self.step.scaler is None else self.step.scaler.state_dict(),
            "step": self.step.index,
        })


def _scale_to_batch(optimizer: torch.optim.Optimizer, workload: Any, batch: int, lr: float | None, *, lr_rule: str,
                    weight_decay_rule: str, base_lr: float, base_batch: int) -> tuple[str, dict[str, Any], float]:
    """Put the optimizer at the peak LR of ``batch``: a fixed ``lr``, or the rule applied from ``(base_lr,
    base_batch)`` (and the weight decay by ``weight_decay_rule``). Returns the rule, what it did (``train``'s
    ``lr_scaling``: the scaled values, and ``outside_range`` with ``notes`` when the rule was asked outside its
    range) and the factor the LR moved by."""
    if lr is not None:
        factor = lr / optimizer.param_groups[0]["lr"]
        k = batch / base_batch
        for g in optimizer.param_groups:
            g["lr"] *= factor
            if weight_decay_rule == "timescale" and g.get("weight_decay"):
                g["weight_decay"] = timescale_weight_decay(g["weight_decay"], k, factor)
        wd = optimizer.param_groups[0].get("weight_decay")
        return "fixed", {"rule": "fixed", "k": k, "lr": float(lr), "weight_decay_rule": weight_decay_rule,
                         "weight_decay": None if wd is None else float(wd), "outside_range": False,
                         "notes": []}, factor
    rule = default_rule(optimizer) if lr_rule == "auto" else lr_rule
    scaled = apply_scaling(optimizer, base_lr, base_batch, batch, rule, weight_decay_rule=weight_decay_rule)
    return rule, scaled.to_dict(), scaled.lr / base_lr


def build_run(workload: Any, batch: int | None = None, lr: float | None = None, precision: str = "fp32", *,
              device: torch.device, seed: int | None = None, model: nn.Module | None = None,
              optimizer: torch.optim.Optimizer | bool = True, lr_rule: str = "auto", weight_decay_rule: str = "keep",
              base_batch: int | None = None, state: Mapping[str, Any] | None = None, total_steps: int = 1,
              warmup_steps: int = 0, micro_batch_size: int | None = None, grad_clip: float | str | None = "workload",
              scaler: Any = "auto", world_size: int = 1, wrap: Callable[[nn.Module], nn.Module] | None = None,
              losses: LossMeter | None = None, on_micro: Sequence[MicroHook] = (),
              before_step: Sequence[StepHook] = ()) -> StepRun:
    """The one way a run of the step is built: model -> optimizer at the LR of ``batch`` -> LR schedule -> step.

    - **model**: ``model`` as it is (put in train mode), else seeded by ``seed`` (when given), built by
      ``model_fn``, moved to ``device`` in train mode; ``wrap`` (DDP, FSDP2) wraps it either way.
    - **optimizer**: ``True`` builds the workload's (at ``base_lr``) and, for a ``batch``, puts it at that batch's
      peak LR: a fixed ``lr``, or ``lr_rule`` from ``(base_lr, base_batch_size)`` (``base_batch`` overrides the
      batch the LR is for); an optimizer object is used as it is; ``False``: none (gradients only, no schedule).
    - **state** (:meth:`StepRun.state_dict`, e.g. a checkpoint of a reference run): loaded into the model, the
      optimizer, the schedule and the loss scale; the rule then scales from the loaded LR at ``base_batch`` (the
      schedule moves by the same factor, as at a batch-size change) and the step continues at the loaded index.
    - **schedule**: :meth:`LRSchedule.for_workload` (``warmup_steps`` x the workload's ``lr_schedule`` over
      ``total_steps``); the step sets each step's LR itself (:meth:`TrainStep.begin`).
    - **step**: :class:`TrainStep` with ``precision`` (fp16: ``scaler``), ``micro_batch_size``, ``grad_clip``
      (default: the workload's), ``world_size``, ``losses`` and the hooks.

    The caller checks its arguments first (``plan_train``, ``check_precision``); this builds.
    """
    if model is None:
        if seed is not None:
            seed_everything(seed)
        model = build_model(workload)
        model.to(device)
    model.train()
    if wrap is not None:
        model = wrap(model)
    if state is not None and state.get("model") is not None:
        model.load_state_dict(state["model"])
    opt = build_optimizer(workload, model) if optimizer is True else None if optimizer is False else optimizer
    run = StepRun(model, opt, None, None)  # type: ignore[arg-type]
    factor = None
    if opt is not None:
        if optimizer is True:
            from_lr = workload.base_lr
            if state is not None and state.get("optimizer") is not None:
                opt.load_state_dict(state["optimizer"])
                from_lr = opt.param_groups[0]["lr"]
            if batch is not None:
                run.lr_rule, run.lr_scaling, factor = _scale_to_batch(
                    opt, workload, batch, lr, lr_rule=lr_rule, weight_decay_rule=weight_decay_rule,
                    base_lr=from_lr, base_batch=workload.base_batch_size if base_batch is None else base_batch)
        run.lr = opt.param_groups[0]["lr"]
        run.optimizer_settings = optimizer_settings(opt)  # before the user's schedule moves momentum or betas
        run.schedule = LRSchedule.for_workload(workload, opt, total_steps=total_steps, warmup_steps=warmup_steps)
        if state is not None and state.get("schedule") is not None:
            run.schedule.load_state_dict(state["schedule"])
            if factor is not None:
                run.schedule.rescale(factor)
    run.step = TrainStep(workload, model, opt, device=device, precision=precision, micro_batch_size=micro_batch_size,
                         grad_clip=getattr(workload, "grad_clip", None) if grad_clip == "workload" else grad_clip,
                         scaler=scaler, schedule=run.schedule, world_size=world_size, on_micro=on_micro,
                         before_step=before_step, losses=losses)  # type: ignore[arg-type]
    if state is not None:
        run.step.index = int(state.get("step") or 0)
        if run.step.scaler is not None and state.get("scaler") is not None:
            run.step.scaler.load_state_dict(state["scaler"])
    return run


# ---------------------------------------------------------------------------------------------------------------
# The one evaluation pass


@torch.no_grad()
def eval_pass(workload: Any, model: nn.Module, batches: Iterable[Any], *, device: torch.device,
              precision: str = "fp32", metrics: bool = True) -> tuple[float, dict[str, float]]:
    """The model in eval mode (its mode restored after) over ``batches`` (host or device batches, read one at a
    time): each forwarded the workload's way (:func:`run_batch`) under the precision's autocast, then every metric
    (with ``metrics``), then freed before the next is read. Returns the sample-weighted mean loss and metrics.

    ``engine.evaluate`` (validation data, the fixed training subset), the finder's evaluation sizing and
    branching's loss on its fixed batch all run this pass.
    """
    was_training = model.training
    model.eval()
    try:
        loss_sum: Any = torch.zeros((), dtype=torch.float64, device=device)
        sums: dict[str, Any] = {k: 0.0 for k in workload.metrics} if metrics else {}
        total = 0
        for batch in batches:
            batch = to_device(batch, device)
            m = batch_size_of(batch)
            with autocast(precision, device):
                loss, outputs, targets = run_batch(workload, model, batch)
            loss_sum += loss.double() * m
            for k in sums:
                sums[k] = sums[k] + metric_value(k, workload.metrics[k], outputs, targets) * m
            total += m
            del batch, loss, outputs, targets
        total = max(1, total)
        return float(loss_sum) / total, {k: float(v) / total for k, v in sums.items()}
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------
# Trials of the step at a size (the finder's memory trials, step timing): the model built once, reset between
# trials, handed back as it came; real training steps on worst-case batches


def _param_bytes(model: nn.Module) -> int:
    # a sharded (FSDP2) parameter counts this rank's shard: its gradient is a shard too
    return sum(getattr(p, "_local_tensor", p).numel() * p.element_size() for p in model.parameters()
               if p.requires_grad)


class ModelKeeper:
    """The model built once: every trial starts from its initial weights with a fresh optimizer, and :meth:`close`
    hands the object back as ``model_fn`` gave it (device, weights, buffers, each parameter's ``.grad``, training
    flag) — a ``model_fn`` may return the caller's own model object."""

    def __init__(self, workload: Any, device: torch.device, seed: int) -> None:
        self.workload, self.device, self.seed = workload, device, seed
        self.model: nn.Module | None = None
        self._state: dict[str, torch.Tensor] = {}
        self._grads: list[torch.Tensor | None] = []
        self._origin = torch.device("cpu")
        self._training = True

    def _seed(self) -> None:
        torch.random.default_generator.manual_seed(self.seed)  # CPU generator only: CUDA seeds stay untouched
        if self.device.type == "cuda":
            torch.cuda.manual_seed(self.seed)

    def get(self) -> nn.Module:
        """The model on the device, in train mode, at its initial weights (built on the first call)."""
        if self.model is None:
            self._seed()
            model = build_model(self.workload)
            tensors = list(model.parameters()) + list(model.buffers())
            self._origin = tensors[0].device if tensors else torch.device("cpu")
            self._training = model.training
            self._state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict(keep_vars=True).items()}
            # the caller's gradients: kept as they are on the CPU (same objects), copied to the CPU from a GPU so
            # that they do not take device memory from the trials
            self._grads = [None if p.grad is None else p.grad if p.grad.device.type == "cpu"
                           else p.grad.detach().to("cpu", copy=True) for p in model.parameters()]
            model.zero_grad(set_to_none=True)
            model.to(self.device)
            self.model = model
        self.model.train()
        return self.model

    def optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
        """A fresh optimizer for one trial and a copy of its initial state (an ``optimizer_fn`` may hand back one
        object every time)."""
        self._seed()
        optimizer = build_optimizer(self.workload, model)
        return optimizer, copy.deepcopy(optimizer.state_dict())

    def reset(self, model: nn.Module, optimizer: torch.optim.Optimizer, opt_state: dict[str, Any]) -> None:
        """Back to the initial weights (in place, on the device) and the optimizer's initial state."""
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.load_state_dict(self._state)
        optimizer.load_state_dict(opt_state)

    def close(self) -> None:
        """Hand the model back as it came: its device, weights, gradients and training flag."""
        if self.model is None:
            return
        model, self.model = self.model, None
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.to(self._origin)
            model.load_state_dict(self._state)
            for p, g in zip(model.parameters(), self._grads):
                p.grad = None if g is None else g if g.device == p.device else g.to(p.device)
        model.train(self._training)
        self._state, self._grads = {}, []
        del model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Real training steps at a size: the step train runs


class StepRunner:
    """Runs ``train``'s step (:class:`batchfit.step.TrainStep`) on worst-case batches of a micro-batch size.

    A workload that accumulates (its ``micro_batch_size`` m below its ``base_batch_size`` B) keeps its accumulation
    count k = ceil(B / m): a trial at micro-batch b runs steps of k micro-batches of b, on a batch of k x b samples,
    exactly as ``train(batch_size=k*b, micro_batch_size=b)`` runs them (the whole batch is held during the step,
    so even the peak's input bytes match; tests/test_finder.py checks the peaks are equal). The workload's gradient
    clipping and LR schedule run as in training; the batch is handed to the step as training hands it (on the
    host: the step moves each micro-batch to the device).
    """

    def __init__(self, workload: Any, device: torch.device, precision: str) -> None:
        self.workload, self.device, self.precision = workload, device, precision
        self.source = train_source(workload)
        self.micro_batches = accumulation_count(workload)
        self.grad_clip: float | None = getattr(workload, "grad_clip", None)
        self.lr_schedule = getattr(workload, "lr_schedule", None)
        self.guard: Any = None  # sharded trials: a batchfit.sharding.CollectiveGuard every step checks with

    def regime(self) -> dict[str, Any]:
        """What every trial's step ran (the report states the regime that was measured)."""
        return {"micro_batches_per_step": self.micro_batches, "grad_clip": self.grad_clip,
                "lr_schedule": self.lr_schedule is not None}

    def batch(self, b: int) -> Any:
        """The worst-case batch for one step at micro-batch ``b`` (all its micro-batches), on the host."""
        return self.source.sample(b * self.micro_batches)

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, b: int, total_steps: int,
             before_step: Any = ()) -> TrainStep:
        """The step of one trial (:func:`build_run` on the kept model and the trial's optimizer, at its LR)."""
        step = build_run(self.workload, precision=self.precision, device=self.device, model=model,
                         optimizer=optimizer, total_steps=total_steps, micro_batch_size=b, grad_clip=self.grad_clip,
                         scaler=scaler, before_step=before_step).step
        step.guard = self.guard
        return step

    def run(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, b: int, steps: int,
            meter: memory.PeakMeter | None = None, step: TrainStep | None = None) -> dict[str, Any]:
        """``steps`` optimizer steps at micro-batch ``b``; with a ``meter``, the peaks of each part of every step
        after the first (when the optimizer state exists): forward/backward, then (from the step's before-step
        hook on) clipping, the optimizer step and zeroing. ``step`` continues a step object already built (at its
        own next step: it counts the steps it took) instead of building one for these steps."""
        parts = {"forward_backward": 0, "optimizer": 0}
        static = 0
        measuring = False

        def split(_step: TrainStep) -> None:
            if measuring and meter is not None:
                parts["forward_backward"] = max(parts["forward_backward"], meter.peak())
                meter.reset()

        if step is None:
            step = self.step(model, optimizer, scaler, b, steps, before_step=[split])
        for s in range(steps):
            measuring = meter is not None and s >= 1
            batch = self.batch(b)
            if measuring:
                static = max(static, meter.live() + _param_bytes(model))  # type: ignore[union-attr]
                meter.reset()  # type: ignore[union-attr]
            step(batch)
            del batch
            if measuring:
                parts["optimizer"] = max(parts["optimizer"], meter.peak())  # type: ignore[union-attr]
        return {"parts": parts, "static_bytes": static}


def accumulation_count(workload: Any) -> int:
    """The workload's accumulation count: ``ceil(base_batch_size / micro_batch_size)`` (1 without one)."""
    micro = getattr(workload, "micro_batch_size", None)
    return 1 if micro is None else max(1, math.ceil(workload.base_batch_size / micro))
