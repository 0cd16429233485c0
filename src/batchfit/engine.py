"""The training engine: one loop for every regime (B = 1, mini-batch, full batch).

One optimizer step reads as: scale LR -> micro-batches (forward, weighted backward) -> unscale / measure ->
clip -> step -> zero grads -> log. The effective batch is micro-batch x accumulation steps (x world size), and
each micro-batch loss is weighted by its share of the batch's samples, so accumulated gradients equal the
big-batch gradient even when the last micro-batch is smaller.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from batchfit import memory
from batchfit.errors import ConfigError, DataError, WorkloadError
from batchfit.scaling import RULE_CHOICES, apply_scaling, default_rule
from batchfit.workload import Workload, load_workload

PRECISIONS = ("fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------------------------
# Small helpers shared by the finder, noise and sweep modules


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU; a CUDA request without CUDA is a clear error."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not understood; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use cpu or cuda")
    if dev.type == "cuda":
        if dev.index is None:  # some CUDA APIs (memory fraction) need the index spelled out
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 training needs CUDA (it uses a gradient scaler); on the CPU use --precision bf16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use --precision fp16 or fp32")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value}")
    return value


class Batcher:
    """Fetch a batch of dataset items by index: vectorised ``get_batch`` when the dataset has one, else collate."""

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.dataset = dataset
        self.fast = callable(getattr(dataset, "get_batch", None))
        if not self.fast and isinstance(dataset, torch.utils.data.TensorDataset):
            self.tensors = dataset.tensors
        else:
            self.tensors = None
        self.collate = collate_fn or torch.utils.data.default_collate

    def __call__(self, indices: torch.Tensor) -> Any:
        if self.fast:
            return self.dataset.get_batch(indices)
        if self.tensors is not None:
            return tuple(t[indices] for t in self.tensors)
        return self.collate([self.dataset[int(i)] for i in indices])


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch) if not hasattr(batch, "_fields") else \
            type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise WorkloadError(
        f"dataset items must be (input, target) pairs; got a batch of type {type(batch).__name__}"
        + (f" with {len(batch)} parts" if isinstance(batch, (list, tuple)) else "")
    )


def compute_loss(workload: Workload, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any, Any]:
    """Forward one batch; return (scalar loss, outputs, targets). A non-scalar loss is a workload error."""
    inputs, targets = split_batch(batch)
    outputs = model(inputs)
    loss = workload.loss_fn(outputs, targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise WorkloadError(
            f"the loss must be a scalar mean over the batch; loss_fn returned {shape}. "
            "Use reduction='mean' (or call .mean())"
        )
    return (loss if loss.dim() == 0 else loss.reshape(())), outputs, targets


def build_model(workload: Workload) -> nn.Module:
    """A fresh model from the workload's factory; a failing or wrong factory is a one-line workload error."""
    try:
        model = workload.model_fn()
    except Exception as exc:
        raise WorkloadError(f"model_fn raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise WorkloadError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}")
    return model


def check_finite_data(dataset: Any, name: str) -> None:
    """Scan tensor-backed datasets for NaN/Inf up front (cheap for in-memory tensors)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is None and hasattr(dataset, "inputs"):
        tensors = (dataset.inputs,)
    for t in tensors or ():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t.reshape(len(t), -1))).any(dim=1).nonzero().flatten()[:5].tolist()
            raise DataError(
                f"{name} contains NaN or Inf values (first bad samples: {bad}); clean or impute the data first"
            )


def batch_has_nonfinite(batch: Any) -> bool:
    leaves = torch.utils._pytree.tree_flatten(batch)[0]
    return any(
        isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in leaves
    )


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    workload: Workload,
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[float, dict[str, float], int]:
    """Mean loss and metrics over ``dataset``, sample-weighted. Returns (loss, metrics, eval batch size used).

    An out-of-memory error halves the *evaluation* batch and retries; it never touches the training batch.
    """
    was_training = model.training
    model.eval()
    batcher = Batcher(dataset, workload.collate_fn)
    n = len(dataset)
    bs = max(1, min(batch_size, n))
    try:
        while True:
            failed = False
            try:
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                metric_sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in workload.metrics}
                for start in range(0, n, bs):
                    idx = torch.arange(start, min(n, start + bs))
                    batch = to_device(batcher(idx), device)
                    with autocast(precision, device):
                        loss, outputs, targets = compute_loss(workload, model, batch)
                    loss_sum += loss.double() * len(idx)
                    for k, fn in workload.metrics.items():
                        value = fn(outputs, targets)
                        value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
                        metric_sums[k] += value * len(idx)
                break
            except Exception as exc:
                if not memory.is_oom(exc) or bs == 1:
                    raise
                failed = True
            if failed:  # free outside the except block, then retry smaller
                memory.release_memory()
                bs = max(1, bs // 2)
        return (
            float(loss_sum) / n,
            {k: float(v) / n for k, v in metric_sums.items()},
            bs,
        )
    finally:
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
    """What callbacks see. Gradients in ``on_before_optimizer_step`` are unscaled and not yet clipped."""

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
    extras: dict[str, Any] = field(default_factory=dict)


def _call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


# ---------------------------------------------------------------------------------------------------------------
# Result


@dataclass
class TrainResult:
    """Everything one training run measured; ``to_dict()`` is the JSON the CLI writes."""

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
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extras = d.pop("extras")
        d.update(extras)
        return d


# ---------------------------------------------------------------------------------------------------------------
# The loop


def plan_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps per epoch."""
    if drop_last:
        if batch_size > n:
            raise ConfigError(
                f"batch size {batch_size} is larger than the training set ({n} samples) with drop_last; "
                f"use a batch size <= {n} or --no-drop-last"
            )
        return n // batch_size
    return math.ceil(n / batch_size)


def resolve_warmup(warmup: int | float | None, total_steps: int) -> int:
    """``warmup`` >= 1 is a step count; 0 < warmup < 1 is a fraction of training."""
    if warmup is None or warmup == 0:
        return 0
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not math.isfinite(warmup) or warmup < 0:
        raise ConfigError(f"warmup must be a step count >= 0 or a fraction in (0, 1), got {warmup!r}")
    if warmup < 1:
        return max(1, round(warmup * total_steps))
    if float(warmup) != int(warmup):
        raise ConfigError(f"warmup of {warmup} is neither a whole number of steps nor a fraction below 1")
    return int(warmup)


def _epoch_batches(n: int, batch_size: int, drop_last: bool, gen: torch.Generator) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    end = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, end, batch_size):
        yield perm[start : start + batch_size]


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
    max_seconds: float | None = None,
    memory_budget: int | str | None = None,
) -> TrainResult:
    """Train the workload once at one effective batch size and measure it.

    Args:
        batch_size: effective batch per optimizer step (default: the workload's ``base_batch_size``).
        micro_batch_size: samples per forward/backward; accumulation steps = ceil(batch / micro).
        lr: a fixed learning rate (skips the rule); otherwise ``lr_rule`` scales the workload's ``base_lr``.
        lr_rule: ``auto`` (linear for SGD-family, adam-sqrt for Adam-family), ``none``, ``linear``, ``sqrt``,
            ``adam-sqrt``.
        warmup: linear warm-up, in steps (>= 1) or as a fraction of all steps (< 1).
        epochs / steps: the budget (default 1 epoch); evaluation runs after each epoch and at the end.
        eval_every: also evaluate every this many optimizer steps (finer steps-to-target).
        max_seconds: stop (not diverged) after this much training time; the last evaluation is still made.
        world_size: data-parallel ranks (under ``torchrun``, see :mod:`batchfit.distributed`). ``batch_size`` and
            ``micro_batch_size`` are then *per rank*: the effective batch is batch x world size (the LR rule
            sees it); each rank reads its shard of every global batch; DDP all-reduces once per optimizer step.
        memory_budget: bytes or e.g. ``"512MiB"``: run the whole call inside this budget, as ``find_batch_size``
            does (CPU: live tensor bytes counted, an allocation beyond the budget raises an OOM; CUDA: the
            allocator is capped with ``set_per_process_memory_fraction``). An evaluation OOM only halves the
            evaluation batch.

    Returns a :class:`TrainResult`; a non-finite loss stops the run and sets ``diverged``.

    >>> r = train("demo:digits-mlp", batch_size=64, epochs=1)
    >>> r.accumulation_steps, r.diverged
    (1, False)
    """
    if memory_budget is not None:  # the same call again, inside the budget (model, optimizer, batches all counted)
        call = dict(locals())
        del call["memory_budget"]
        call["workload"] = load_workload(call["workload"])  # the dataset itself is not charged to the budget
        with memory.enforce_budget(memory_budget, resolve_device(device)):
            return train(**call)
    t_start = time.perf_counter()
    workload = load_workload(workload)
    dev = resolve_device(device)
    check_precision(precision, dev)
    n = workload.num_train
    batch_size = check_positive_int("batch size", workload.base_batch_size if batch_size is None else batch_size)
    world_size = check_positive_int("world size", world_size)
    local_batch = batch_size
    if micro_batch_size is None:
        micro_batch_size = local_batch
    check_positive_int("micro-batch size", micro_batch_size)
    if micro_batch_size > local_batch:
        raise ConfigError(
            f"micro-batch size {micro_batch_size} is larger than the batch size {local_batch}; "
            "the micro-batch must be <= the batch"
        )
    if lr_rule not in RULE_CHOICES:
        raise ConfigError(f"unknown LR rule {lr_rule!r}; choose one of: {', '.join(RULE_CHOICES)}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"learning rate must be a positive number, got {lr!r}")
    if epochs is not None and steps is not None:
        raise ConfigError("give either epochs or steps as the budget, not both")
    check_positive_int("epochs", epochs, allow_none=True)
    check_positive_int("steps", steps, allow_none=True)
    check_positive_int("eval_every", eval_every, allow_none=True)
    if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
        raise ConfigError(f"grad_clip must be a positive number, got {grad_clip!r}")
    if world_size > 1:  # data parallel: this process is one of world_size ranks (torchrun)
        from batchfit import distributed

        distributed.check_world(world_size)
    steps_per_epoch = plan_batches(n, local_batch * world_size, drop_last)
    total_steps = steps if steps is not None else (epochs or 1) * steps_per_epoch
    warmup_steps = resolve_warmup(warmup, total_steps)
    accumulation = math.ceil(local_batch / micro_batch_size)
    if eval_batch_size is None:
        eval_batch_size = max(micro_batch_size, 256)
    check_positive_int("eval batch size", eval_batch_size)
    check_finite_data(workload.train_data, "the training data")
    if workload.val_data is not None:
        check_finite_data(workload.val_data, "the validation data")

    # -- setup: same seed -> same initialisation, same data order -----------------------------------------------
    seed_everything(seed)
    model = build_model(workload)
    model.to(dev).train()
    if world_size > 1:
        model = distributed.wrap_ddp(model, dev)
    try:
        optimizer = workload.optimizer_fn(model.parameters(), workload.base_lr)
    except Exception as exc:
        raise WorkloadError(f"optimizer_fn raised {type(exc).__name__}: {exc}") from exc
    if lr is not None:
        factor = lr / optimizer.param_groups[0]["lr"]
        for g in optimizer.param_groups:
            g["lr"] *= factor
        rule_used = "fixed"
    else:
        rule_used = default_rule(optimizer) if lr_rule == "auto" else lr_rule
        apply_scaling(optimizer, workload.base_lr, workload.base_batch_size, batch_size * world_size, rule_used)
    peak_lrs = [g["lr"] for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    gen = torch.Generator().manual_seed(seed)
    batcher = Batcher(workload.train_data, workload.collate_fn)
    is_cuda = dev.type == "cuda"
    check_every = 1 if not is_cuda else 16  # a finiteness check is a CPU-GPU sync point; batch them on CUDA

    state = TrainState(
        workload=workload, model=model, optimizer=optimizer, device=dev, precision=precision,
        batch_size=batch_size * world_size, micro_batch_size=micro_batch_size, accumulation_steps=accumulation,
        world_size=world_size, total_steps=total_steps, steps_per_epoch=steps_per_epoch, scaler=scaler,
    )
    result = TrainResult(
        workload=workload.name, batch_size=batch_size * world_size, micro_batch_size=micro_batch_size,
        accumulation_steps=accumulation, world_size=world_size, lr=peak_lrs[0], lr_rule=rule_used,
        warmup_steps=warmup_steps, precision=precision, device=str(dev), seed=seed, drop_last=drop_last,
    )
    if is_cuda:
        memory.reset_cuda_peak(dev)
    cpu_tracker: memory.LiveBytesTracker | None = None
    measure_step = 1 if total_steps > 1 else 0  # optimizer state exists only after the first step
    _call(callbacks, "on_train_start", state)
    on_micro, on_before_step, on_step_end = (
        [getattr(cb, hook) for cb in callbacks if getattr(cb, hook, None) is not None]
        for hook in ("on_micro_batch_end", "on_before_optimizer_step", "on_step_end")
    )

    train_time = 0.0
    timed_samples = 0
    seg_samples, seg_time = 0, 0.0
    loss_acc = torch.zeros((), dtype=torch.float64, device=dev)  # sample-weighted sum since last evaluation
    loss_count = 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
    cpu_nonfinite, cpu_loss_sum = False, 0.0
    stop = False

    def do_eval(epoch_float: float) -> None:
        nonlocal loss_acc, loss_count, seg_samples, seg_time, cpu_loss_sum
        loss_sum, count = float(loss_acc) + cpu_loss_sum, loss_count
        if world_size > 1:  # the mean over every rank's samples
            loss_sum, count = distributed.all_sum(loss_sum, count)
        train_loss = loss_sum / max(1, count)
        record: dict[str, Any] = {
            "epoch": round(epoch_float, 4),
            "step": state.step,
            "samples": state.samples_seen,
            "train_loss": train_loss,
            "samples_per_s": seg_samples / seg_time if seg_time > 0 else None,
            "seconds": round(time.perf_counter() - t_start, 4),
            "train_seconds": round(train_time, 4),
        }
        if workload.val_data is not None:
            eval_model = distributed.unwrap(model) if world_size > 1 else model  # DDP: no collectives in eval
            val_loss, val_metrics, _ = evaluate(
                workload, eval_model, workload.val_data, batch_size=eval_batch_size, device=dev, precision=precision
            )
            if precision == "fp16" and not math.isfinite(val_loss):
                # fp16 activations can overflow in eval mode (e.g. BatchNorm running statistics early in training)
                # while training is fine: judge the model in fp32 before calling the run diverged.
                val_loss, val_metrics, _ = evaluate(
                    workload, eval_model, workload.val_data, batch_size=eval_batch_size, device=dev, precision="fp32"
                )
                record["eval_precision"] = "fp32"
            record["val_loss"] = val_loss
            record["val_metrics"] = val_metrics
            record["generalization_gap"] = val_loss - train_loss
            if not math.isfinite(val_loss):
                result.diverged = True
                result.diverged_at_step = result.diverged_at_step or state.step
                result.extras.setdefault("diverged_reason", "non-finite validation loss")
        else:
            record["val_loss"], record["val_metrics"], record["generalization_gap"] = None, {}, None
        result.history.append(record)
        _call(callbacks, "on_evaluate", state, record)
        loss_acc = torch.zeros((), dtype=torch.float64, device=dev)
        loss_count, cpu_loss_sum = 0, 0.0
        seg_samples, seg_time = 0, 0.0

    last_eval_step = -1
    while not stop and state.step < total_steps:
        for batch_idx in _epoch_batches(n, local_batch * world_size, drop_last, gen):
            if state.step >= total_steps:
                break
            global_count = len(batch_idx)
            if world_size > 1:  # same permutation on every rank; each reads its shard of the global batch
                if global_count < world_size:  # a last, tiny batch (no drop_last) would leave a rank nothing
                    continue
                batch_idx = distributed.shard(batch_idx)
            tracking = not is_cuda and state.step == measure_step
            if tracking:
                cpu_tracker = memory.LiveBytesTracker(device_type="cpu")
                cpu_tracker.track([list(model.parameters()), list(model.buffers()), optimizer.state])
                ctx: contextlib.AbstractContextManager = cpu_tracker
            else:
                ctx = contextlib.nullcontext()
            t0 = time.perf_counter()
            with ctx:
                # -- micro-batches: each loss weighted by its share of the batch's samples --------------------
                nb = len(batch_idx)  # this rank's samples in this step (len() of a tensor is not free)
                state.batch_samples = nb
                n_micro = math.ceil(nb / micro_batch_size)
                for mi, start in enumerate(range(0, nb, micro_batch_size)):
                    micro_idx = batch_idx if n_micro == 1 else batch_idx[start : start + micro_batch_size]
                    m = min(micro_batch_size, nb - start)
                    batch = to_device(batcher(micro_idx), dev)
                    # DDP: gradients are all-reduced once per step, in the last micro-batch's backward
                    no_sync = world_size > 1 and mi < n_micro - 1
                    with model.no_sync() if no_sync else contextlib.nullcontext():
                        with autocast(precision, dev):
                            loss, _, _ = compute_loss(workload, model, batch)
                        # the share of the *global* batch (DDP then averages over ranks, hence x world_size)
                        weight = m * world_size / global_count
                        scaled = loss * weight if weight != 1.0 else loss
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    if is_cuda:  # no sync here: accumulate on the device, check every `check_every` steps
                        loss_acc += loss.detach().double() * m
                        nonfinite |= ~torch.isfinite(loss.detach())
                    else:  # on the CPU reading the value costs nothing extra
                        value = loss.item()
                        if not math.isfinite(value):
                            if batch_has_nonfinite(batch):
                                raise DataError(
                                    f"a training batch contains NaN or Inf inputs (sample indices "
                                    f"{micro_idx[:5].tolist()}...); clean the data first"
                                )
                            cpu_nonfinite = True
                        cpu_loss_sum += value * m
                    if on_micro:
                        state.micro_index, state.micro_samples, state.micro_loss = mi, m, loss.detach()
                        for fn in on_micro:
                            fn(state)
                # -- unscale, measure, clip, step, zero ---------------------------------------------------------
                if scaler is not None:
                    scaler.unscale_(optimizer)
                for fn in on_before_step:
                    fn(state)
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                if warmup_steps:
                    frac = min(1.0, (state.step + 1) / warmup_steps)
                    for g, peak in zip(optimizer.param_groups, peak_lrs):
                        g["lr"] = peak * frac
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_count += nb
            state.step += 1
            state.samples_seen += global_count
            check_now = state.step % check_every == 0 or state.step == total_steps
            if is_cuda and check_now:
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            if tracking and cpu_tracker is not None:  # the measured step runs under the tracker: keep it out of timing
                result.peak_memory_bytes = cpu_tracker.peak
                cpu_tracker = None
            else:
                train_time += dt
                seg_time += dt
                seg_samples += global_count
                timed_samples += global_count
            diverged_now = check_now and (cpu_nonfinite or (is_cuda and bool(nonfinite)))
            time_up = max_seconds is not None and train_time >= max_seconds
            if world_size > 1 and (check_now or max_seconds is not None):  # all ranks stop at the same step
                diverged_now, time_up = distributed.any_flag(diverged_now, time_up)
            if diverged_now:
                result.diverged = True
                result.diverged_at_step = state.step
                result.extras["diverged_reason"] = "non-finite training loss"
                stop = True
                break
            for fn in on_step_end:
                fn(state)
            if eval_every and state.step % eval_every == 0 and state.step % steps_per_epoch != 0:
                do_eval(state.epoch + (state.step - state.epoch * steps_per_epoch) / steps_per_epoch)
                last_eval_step = state.step
            if time_up:
                stop = True
                break
        else:
            state.epoch += 1
            if not stop and last_eval_step != state.step:
                do_eval(float(state.epoch))
                last_eval_step = state.step
            continue
        break
    if last_eval_step != state.step and not result.diverged:
        do_eval(state.step / steps_per_epoch)
    if is_cuda:
        torch.cuda.synchronize(dev)
        result.peak_memory_bytes = memory.cuda_peak(dev)
    result.steps = state.step
    result.samples = state.samples_seen
    if world_size > 1 and result.peak_memory_bytes is not None:  # the largest rank's peak
        result.peak_memory_bytes = int(distributed.all_max(result.peak_memory_bytes)[0])
    result.epochs = round(state.samples_seen / n, 4)
    result.train_seconds = train_time
    result.samples_per_s = timed_samples / train_time if train_time > 0 else None
    result.seconds = time.perf_counter() - t_start
    result.extras.update(state.extras)
    _call(callbacks, "on_train_end", state, result)
    result.extras.update(state.extras)
    return result
