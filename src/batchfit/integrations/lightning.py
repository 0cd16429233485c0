"""Lightning -> batchfit: a workload from a LightningModule and its data; a callback sizing the batch at ``fit``.

A workload (``batchfit tune`` / ``find`` / ``sweep`` / ``train`` on it; see :func:`lightning_workload`)::

    from batchfit.integrations.lightning import lightning_workload

    def make():       # batchfit tune -w lit_workload.py:make
        return lightning_workload(LitClassifier, datamodule=MyData(), trainer=L.Trainer(gradient_clip_val=1.0))

The callback::

    from batchfit.integrations.lightning import BatchfitBatchSize

    trainer = L.Trainer(callbacks=[BatchfitBatchSize(memory_budget="2GiB", log_noise_scale=True)],
                        accumulate_grad_batches=1)
    trainer.fit(model, datamodule=dm)      # dm.batch_size (or model.batch_size / hparams.batch_size) is set

What it does, in ``on_fit_start`` (before the first training batch is loaded):

1. Builds a batchfit :class:`~batchfit.Workload` from the LightningModule and the training data
   (:func:`lightning_workload` on a copy of the module): the module's own ``training_step`` computes the loss (so
   whatever the module does in it is what gets measured), its ``configure_optimizers()`` gives the optimizer, the
   train dataloader (re-created at each size) the batches, the Trainer's ``gradient_clip_val`` the clipping. Only
   automatic optimization is supported.
2. Runs :func:`batchfit.find_batch_size` on the module's device and precision: a few real probes, a fitted memory
   model, a verified largest batch and a recommended one with ``margin`` of headroom (or the throughput knee with
   ``use="knee"``). The module's weights, optimizer and RNG states are left exactly as they were.
3. Keeps the effective batch (``batch_size x accumulate_grad_batches``) the user configured: the micro-batch becomes
   the largest size <= the recommendation that, with ``accumulate_grad_batches = ceil(effective / micro)``, gives back
   the same effective batch, so the learning rate needs no change. With ``keep_effective_batch=False`` the
   recommendation is used as is with no accumulation (then re-tune or re-scale the LR yourself).
4. With ``log_noise_scale=True``, logs ``batchfit/b_simple`` during ``fit``: the gradient noise scale B_simple
   (McCandlish et al. 2018) from the micro-batches of each accumulated step (batchfit's unbiased estimator and
   bias-corrected moving averages; needs ``accumulate_grad_batches >= 2``).

The result is in :attr:`BatchfitBatchSize.result` (the finder's full result) and :attr:`chosen`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from batchfit.data import batch_size_of, declared_samples
from batchfit.errors import ConfigError, WorkloadError
from batchfit.integrations.common import plan_accumulation
from batchfit.workload import Workload

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr
except ImportError:  # pragma: no cover - exercised only without the extra
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
        from pytorch_lightning.utilities.parsing import (  # type: ignore[no-redef]
            lightning_getattr,
            lightning_hasattr,
            lightning_setattr,
        )
    except ImportError as exc:
        raise ImportError("Lightning is not installed; run: pip install 'batchfit[lightning]'") from exc

__all__ = ["BatchfitBatchSchedule", "BatchfitBatchSize", "lightning_workload", "plan_accumulation"]

_PRECISIONS = {"bf16-mixed": "bf16", "bf16": "bf16", "bf16-true": "bf16", "16-mixed": "fp16", "16": "fp16"}
_LOWER_IS_BETTER = ("loss", "err", "perplexity", "ppl", "mae", "mse", "rmse", "nll", "cer", "wer")


# ---------------------------------------------------------------------------------------------------------------
# Running the module's own steps outside Lightning's loop


class _Outputs:
    """What one Lightning step gives batchfit: the loss and the values the step logged with ``self.log``."""

    def __init__(self, loss: torch.Tensor, logged: dict[str, Any]) -> None:
        self.loss = loss
        self.logged = logged


def _value(v: Any) -> Any:
    if hasattr(v, "compute") and hasattr(v, "reset"):  # a torchmetrics Metric: this batch's value
        out = v.compute()
        v.reset()
        return out
    return v.detach() if isinstance(v, torch.Tensor) else v


@contextlib.contextmanager
def _detached(module: Any) -> Iterator[dict[str, Any]]:
    """Run a hook of ``module`` outside a Trainer: no trainer reference, ``self.log`` / ``log_dict`` captured."""
    logged: dict[str, Any] = {}

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        logged[name] = _value(value)

    def log_dict(values: Any, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(values).items():
            logged[k] = _value(v)

    trainer = module.__dict__.get("_trainer")
    module._trainer = None
    module.__dict__["log"], module.__dict__["log_dict"] = log, log_dict
    try:
        yield logged
    finally:
        del module.__dict__["log"], module.__dict__["log_dict"]
        module._trainer = trainer


def _loss_of(out: Any, hook: str) -> torch.Tensor | None:
    if isinstance(out, Mapping):
        out = out.get("loss")
    if out is None:
        return None
    if not isinstance(out, torch.Tensor):
        raise WorkloadError(f"{hook} must return the loss (a tensor, or a dict with 'loss'), got {type(out).__name__}")
    return out


def _loss_key(logged: Mapping[str, Any]) -> str | None:
    return next((k for k in logged if "loss" in k.lower()), None)


def _run_step(module: Any, batch: Any) -> _Outputs:
    """The workload's ``forward``: ``training_step`` in training, ``validation_step`` in evaluation.

    In evaluation the loss is the first value the validation step logs with "loss" in its name, else what it
    returns, else the training step's loss on the batch (no gradient is taken in evaluation)."""
    if module.training:
        module.__dict__["_batchfit_samples"] = module.__dict__.get("_batchfit_samples", 0) + batch_size_of(batch)
        with _detached(module) as logged:
            loss = _loss_of(module.training_step(batch, 0), "training_step")
        if loss is None:
            raise WorkloadError("training_step returned None (a skipped batch); batchfit needs the loss of every "
                                "batch to measure it")
        return _Outputs(loss, logged)
    with _detached(module) as logged:
        returned = _loss_of(module.validation_step(batch, 0), "validation_step")
    key = _loss_key(logged)
    loss = logged[key] if key is not None else returned
    if loss is None:
        with _detached(module):
            loss = _loss_of(module.training_step(batch, 0), "training_step")
    return _Outputs(torch.as_tensor(loss, dtype=torch.float32), logged)


def _logged_metric(key: str) -> Callable[[Any, Any], Any]:
    def metric(outputs: _Outputs, _targets: Any) -> Any:
        if key not in outputs.logged:
            raise WorkloadError(f"validation_step did not log {key!r} for this batch; log it for every batch")
        return outputs.logged[key]

    metric.__name__ = key
    return metric


# ---------------------------------------------------------------------------------------------------------------
# configure_optimizers: the optimizer (LR rescaled) and its scheduler


def _split_optimizers(cfg: Any) -> tuple[torch.optim.Optimizer, dict[str, Any] | None]:
    """``(optimizer, scheduler config)`` from any form ``configure_optimizers`` may return."""
    scheduler: Any = None
    if isinstance(cfg, (list, tuple)) and len(cfg) == 2 and all(isinstance(c, (list, tuple)) for c in cfg):
        cfg, schedulers = cfg  # ([optimizers], [schedulers])
        scheduler = schedulers[0] if schedulers else None
    if isinstance(cfg, (list, tuple)):
        if len(cfg) != 1:
            raise ConfigError(f"configure_optimizers returned {len(cfg)} optimizers; batchfit measures modules with "
                              "one optimizer (automatic optimization)")
        cfg = cfg[0]
    if isinstance(cfg, Mapping):
        scheduler = cfg.get("lr_scheduler", scheduler)
        cfg = cfg.get("optimizer")
    if not isinstance(cfg, torch.optim.Optimizer):
        raise WorkloadError("configure_optimizers must return an optimizer (alone, in a list, or in a dict with "
                            f"'optimizer'); got {type(cfg).__name__}")
    if scheduler is None:
        return cfg, None
    sched = dict(scheduler) if isinstance(scheduler, Mapping) else {"scheduler": scheduler}
    sched.setdefault("interval", "epoch")
    sched.setdefault("frequency", 1)
    return cfg, sched


def _rescale(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> None:
    """Multiply every LR the optimizer and a torch scheduler hold by ``factor`` (batchfit's LR rule)."""
    for g in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):  # max/min: OneCycleLR keeps them in the groups
            if isinstance(g.get(key), (int, float)):
                g[key] *= factor
    for attr in ("base_lrs", "max_lrs", "_last_lr"):  # LRScheduler, CyclicLR
        values = getattr(scheduler, attr, None)
        if isinstance(values, list):
            setattr(scheduler, attr, [v * factor for v in values])


class _SchedulerStep:
    """Steps the module's scheduler as Lightning would: every ``frequency`` optimizer steps (interval "step") or
    epochs (interval "epoch": one epoch = the training samples of one pass, counted through ``training_step``).
    :attr:`batchfit_name` says which, for the results and the report (issue 23.7: not "after every optimizer
    step" when it steps per epoch)."""

    def __init__(self, config: Mapping[str, Any], module: Any, epoch_samples: int) -> None:
        self.scheduler = config["scheduler"]
        self.interval = config["interval"]
        self.frequency = max(1, int(config["frequency"]))
        self.module = module
        self.epoch_samples = epoch_samples
        self.count = 0
        unit = "optimizer step" if self.interval == "step" else "epoch"
        every = f"every {unit}" if self.frequency == 1 else f"every {self.frequency} {unit}s"
        self.batchfit_name = (f"{type(self.scheduler).__name__}, stepped {every} (Lightning interval "
                              f"{self.interval!r}, frequency {self.frequency})")

    def step(self) -> None:
        if self.interval == "step":
            self.count += 1
            if self.count % self.frequency == 0:
                self.scheduler.step()
            return
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        epochs = self.module.__dict__.get("_batchfit_samples", 0) * world // self.epoch_samples
        while self.count < epochs:
            self.count += 1
            if self.count % self.frequency == 0:
                self.scheduler.step()


_NOT_REPRODUCIBLE = (
    "lightning_workload got {name} as a module instance, built before batchfit seeds anything: every trial starts "
    "from its weights as they are now, so seed/--seed neither reproduces them in a new process nor varies them "
    "between seeds; pass a factory (the class, or a function returning a fresh module) to make runs reproducible")


def _check_data_arguments(train_dataloader: Any, val_dataloader: Any, datamodule: Any) -> None:
    """Issue 23.5: a DataModule class given as ``datamodule=``, or a DataModule given as the data loader, is one line
    that says to pass an instance as ``datamodule=``."""
    if isinstance(datamodule, type):
        raise ConfigError(f"datamodule={datamodule.__name__} is the class; pass an instance as datamodule=: "
                          f"datamodule={datamodule.__name__}(...)")
    for what, value in (("train_dataloader", train_dataloader), ("val_dataloader", val_dataloader)):
        cls = value if isinstance(value, type) else type(value)
        if issubclass(cls, pl.LightningDataModule):
            raise ConfigError(f"{what} got the LightningDataModule {cls.__name__}; pass an instance as datamodule=: "
                              f"lightning_workload(module, datamodule={cls.__name__}(...))")


def _call_before_optimizer_step(module: Any, optimizer: torch.optim.Optimizer) -> None:
    """Issue 23.7: the module's ``on_before_optimizer_step(optimizer)`` runs before every optimizer step, as in
    Lightning (with gradients unscaled; batchfit's norm clipping has already run, where Lightning clips after the
    hook), its ``self.log`` calls captured."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("on_before_optimizer_step", module):
        return
    ref = weakref.ref(module)

    def hook(opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        owner = ref()
        if owner is not None:
            with _detached(owner):
                owner.on_before_optimizer_step(opt)

    optimizer.register_step_pre_hook(hook)


class _Modules:
    """The modules built for trials, so the optimizer factory (given only parameters) finds their module."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory
        self.live: weakref.WeakSet[Any] = weakref.WeakSet()
        self.schedulers: weakref.WeakKeyDictionary[Any, tuple[dict[str, Any], Any]] = weakref.WeakKeyDictionary()

    def new(self) -> Any:
        module = self.factory()
        if not isinstance(module, nn.Module) or not hasattr(module, "training_step"):
            raise WorkloadError(f"the module factory must return a LightningModule, got {type(module).__name__}")
        if not getattr(module, "automatic_optimization", True):
            raise ConfigError("batchfit measures automatic optimization only; this module optimizes manually")
        self.live.add(module)
        return module

    def owner(self, params: list[Any]) -> Any:
        first = id(params[0]) if params else None
        for module in list(self.live):
            if any(id(p) == first for p in module.parameters()):
                return module
        raise WorkloadError("optimizer_fn got parameters of a model batchfit did not build from the module factory")

    def configure(self, module: Any) -> tuple[torch.optim.Optimizer, dict[str, Any] | None]:
        with _detached(module):
            return _split_optimizers(module.configure_optimizers())


def _base_lr(optimizer: torch.optim.Optimizer) -> float:
    g = optimizer.param_groups[0]
    return float(g.get("initial_lr", g["lr"]))  # a scheduler may already have changed "lr" (e.g. warm-up at 0)


# ---------------------------------------------------------------------------------------------------------------
# The workload


def _detached_copy(module: Any) -> Any:
    trainer = module.__dict__.get("_trainer")
    module._trainer = None
    try:
        return copy.deepcopy(module)
    finally:
        module._trainer = trainer


def _first_loader(loaders: Any, what: str) -> Any:
    if isinstance(loaders, (list, tuple)):
        if len(loaders) > 1:
            warnings.warn(f"batchfit: {what} returned {len(loaders)} loaders; only the first is used", stacklevel=3)
        return loaders[0] if loaders else None
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    return loaders


def _loaders(module: Any, train_dataloader: Any, val_dataloader: Any, datamodule: Any) -> tuple[Any, Any]:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("fit")
        holder = datamodule
    else:
        holder = module
    if train_dataloader is None:
        if not is_overridden("train_dataloader", holder):
            raise ConfigError("no training data: pass a DataModule (datamodule=) or a train dataloader")
        with _detached(holder) if isinstance(holder, nn.Module) else contextlib.nullcontext():
            train_dataloader = _first_loader(holder.train_dataloader(), "train_dataloader")
    if val_dataloader is None and is_overridden("val_dataloader", holder):
        with _detached(holder) if isinstance(holder, nn.Module) else contextlib.nullcontext():
            val_dataloader = _first_loader(holder.val_dataloader(), "val_dataloader")
    return train_dataloader, val_dataloader


def _clip(trainer: Any, gradient_clip_val: float | None) -> float | None:
    if gradient_clip_val is None and trainer is not None:
        gradient_clip_val = getattr(trainer, "gradient_clip_val", None)
        algorithm = getattr(trainer, "gradient_clip_algorithm", None)
        if gradient_clip_val and str(algorithm or "norm").lower().endswith("value"):
            raise ConfigError("the Trainer clips gradients by value; batchfit clips the global norm "
                              "(gradient_clip_algorithm='norm')")
    return float(gradient_clip_val) if gradient_clip_val else None


def _metrics(modules: _Modules, val_loader: Any, monitor: str | None) -> tuple[dict[str, Any], str | None]:
    """The values ``validation_step`` logs (one call on a fresh module), the monitored one first."""
    if val_loader is None:
        return {}, None
    module = modules.new()
    module.eval()
    with torch.no_grad():
        logged = _run_step(module, next(iter(val_loader))).logged
    loss_key = _loss_key(logged)
    names = [k for k in logged if k != loss_key]
    if monitor is not None:
        if monitor not in logged:
            raise ConfigError(f"monitor {monitor!r} is not logged by validation_step; it logs: {sorted(logged)}")
        names = [monitor] + [k for k in names if k != monitor]
    return {k: _logged_metric(k) for k in names}, (names[0] if names else None)


def lightning_workload(module: Any, train_dataloader: Any = None, *, datamodule: Any = None,
                       val_dataloader: Any = None, trainer: Any = None, gradient_clip_val: float | None = None,
                       accumulate_grad_batches: int | None = None, monitor: str | None = None,
                       higher_is_better: bool | None = None, name: str | None = None) -> Workload:
    """A batchfit :class:`Workload` running a LightningModule's own steps on its data.

    Args:
        module: a zero-argument factory returning a *fresh* LightningModule (called once per trial), or a module
            instance (each trial then trains a copy of it as it is now; the instance itself is never changed). An
            instance was built before batchfit seeds anything, so ``seed`` cannot reproduce or vary its weights: it
            warns, and the workload's ``description`` (stored with the sweep's results) says so; pass a factory.
        train_dataloader, val_dataloader: the data as DataLoaders (re-created by batchfit at each batch size,
            keeping workers, collate function and sampler kind); or give ``datamodule`` (its ``prepare_data`` and
            ``setup("fit")`` are called once; ``val_dataloader`` is used when it defines one), or neither and the
            module's own ``train_dataloader`` / ``val_dataloader`` are used.
        trainer: a ``Trainer`` whose ``gradient_clip_val`` (norm clipping) and ``accumulate_grad_batches`` the
            workload takes on (or pass those two directly).
        monitor: the logged validation value trials are ranked on (default: the first one validation_step logs
            without "loss" in its name; ``val_loss`` when it logs only a loss).
        higher_is_better: the monitored value's direction (default: lower for names like loss, err, mse, ppl).

    What runs: ``training_step`` gives the loss (``forward`` is a function running it; ``self.log`` there is
    ignored); in evaluation ``validation_step`` runs and what it logs become the metrics (the logged loss is the
    validation loss). ``configure_optimizers`` gives the optimizer and scheduler of each trial; every LR they hold
    is rescaled by batchfit's rule (factor = scaled LR / the module's LR), and the scheduler is stepped per its
    ``interval`` and ``frequency`` (the results name it so: "StepLR, stepped every epoch ..."). The module's
    ``on_before_optimizer_step`` runs before every optimizer step (after batchfit's norm clipping). The base batch
    is the train loader's ``batch_size`` x accumulation.
    """
    factory: Callable[[], Any]
    _check_data_arguments(train_dataloader, val_dataloader, datamodule)
    description = ""
    if isinstance(module, nn.Module):
        template = _detached_copy(module)
        template = template.cpu()  # the trials' copies go to batchfit's device; the instance stays where it is
        factory = lambda: copy.deepcopy(template)  # noqa: E731 - each trial starts from the instance's weights
        label = type(module).__name__
        description = _NOT_REPRODUCIBLE.format(name=label)
        warnings.warn(f"batchfit: {description}", UserWarning, stacklevel=2)
    elif callable(module):
        factory, label = module, getattr(module, "__name__", type(module).__name__)
    else:
        raise ConfigError(f"module must be a LightningModule or a factory returning one, got {type(module).__name__}")
    modules = _Modules(factory)
    probe = modules.new()
    train_loader, val_loader = _loaders(probe, train_dataloader, val_dataloader, datamodule)
    if train_loader is None:
        raise ConfigError("the training dataloader is None; give batchfit training data")
    base_opt, base_sched = modules.configure(probe)
    base_lr = _base_lr(base_opt)
    del base_opt, probe
    epoch_samples = declared_samples(train_loader) or 1

    def optimizer_fn(params: Any, lr: float) -> torch.optim.Optimizer:
        owner = modules.owner(list(params))
        optimizer, sched = modules.configure(owner)
        _rescale(optimizer, None if sched is None else sched["scheduler"], lr / base_lr)
        owner.__dict__["_batchfit_samples"] = 0
        if sched is not None:
            modules.schedulers[optimizer] = (sched, owner)
        _call_before_optimizer_step(owner, optimizer)
        return optimizer

    def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        sched, owner = modules.schedulers[optimizer]
        if isinstance(sched["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau):
            warnings.warn("batchfit: ReduceLROnPlateau needs the monitored value at each step; trials run "
                          "without it (constant LR)", stacklevel=2)
            return _NoSchedule()
        return _SchedulerStep(sched, owner, epoch_samples)

    metrics, primary = _metrics(modules, val_loader, monitor)
    accumulation = accumulate_grad_batches or int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    micro = int(getattr(train_loader, "batch_size", None) or 1)
    if higher_is_better is None:
        higher_is_better = not any(w in (primary or "loss").lower() for w in _LOWER_IS_BETTER)
    return Workload(
        name=name or label,
        description=description,
        model_fn=modules.new,
        optimizer_fn=optimizer_fn,
        loss_fn="output",
        forward=_run_step,
        targets=lambda batch: None,
        train_data=train_loader,
        val_data=val_loader,
        metrics=metrics,
        higher_is_better=higher_is_better,
        base_batch_size=micro * accumulation,
        base_lr=base_lr,
        micro_batch_size=micro if accumulation > 1 else None,
        grad_clip=_clip(trainer, gradient_clip_val),
        lr_schedule=lr_schedule if base_sched is not None else None,
    )


class _NoSchedule:
    def step(self) -> None:
        return None


class BatchfitBatchSize(Callback):
    """Set the batch size with batchfit's finder when ``fit`` starts; keep the effective batch by accumulation.

    Args:
        memory_budget: e.g. ``"2GiB"``: size for this budget instead of all free memory (enforced on the CPU by
            counting tensor bytes, on CUDA with ``set_per_process_memory_fraction``).
        margin: headroom for the recommended size (default 5 %).
        batch_size_cap: never try larger (``max_batch_size`` is its old name).
        use: ``"recommended"`` (largest with margin) or ``"knee"`` (smallest batch within 5 % of the best measured
            throughput; times a few extra sizes).
        keep_effective_batch: keep ``batch_size x accumulate_grad_batches`` (default) or use the found size alone.
        batch_arg_name: the attribute holding the batch size (model, ``hparams`` or datamodule), as in Lightning.
        log_noise_scale: log ``batchfit/b_simple`` during fit (needs >= 2 accumulated micro-batches).
        seed: the finder's seed.
    """

    def __init__(self, *, memory_budget: int | str | None = None, margin: float = 0.05,
                 batch_size_cap: int | None = None, max_batch_size: int | None = None, use: str = "recommended",
                 keep_effective_batch: bool = True,
                 batch_arg_name: str = "batch_size", log_noise_scale: bool = False, noise_beta: float = 0.95,
                 seed: int = 0) -> None:
        if use not in ("recommended", "knee"):
            raise ConfigError(f"use must be 'recommended' or 'knee', got {use!r}")
        self.memory_budget = memory_budget
        self.margin = margin
        self.batch_size_cap = batch_size_cap if batch_size_cap is not None else max_batch_size
        self.use = use
        self.keep_effective_batch = keep_effective_batch
        self.batch_arg_name = batch_arg_name
        self.log_noise_scale = log_noise_scale
        self.noise_beta = noise_beta
        self.seed = seed
        self.result: Any = None
        self.chosen: dict[str, int] | None = None
        self._noise: _NoiseLogger | None = None

    # -- sizing ---------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from batchfit.finder import find_batch_size

        if not lightning_hasattr(pl_module, self.batch_arg_name):
            raise ConfigError(
                f"no {self.batch_arg_name!r} attribute on the model, its hparams or the datamodule; add one (the "
                "dataloader must read it) or pass batch_arg_name="
            )
        batch = int(lightning_getattr(pl_module, self.batch_arg_name))
        effective = batch * int(trainer.accumulate_grad_batches)
        dataloader = self._train_dataloader(trainer, pl_module)
        with warnings.catch_warnings():  # the finder alone: the instance's weights need no seed
            warnings.filterwarnings("ignore", message=r"batchfit: lightning_workload got .* as a module instance",
                                    category=UserWarning)
            workload = lightning_workload(pl_module, dataloader, gradient_clip_val=_clip(trainer, None))
        device = pl_module.device
        precision = _PRECISIONS.get(str(trainer.precision), "fp32")
        self.result = find_batch_size(
            workload, device=device, precision=precision, memory_budget=self.memory_budget,
            batch_size_cap=self.batch_size_cap, margin=self.margin, throughput=self.use == "knee", seed=self.seed,
        )
        found = self.result.recommended_batch_size
        if self.use == "knee" and self.result.throughput_knee_batch_size:
            found = min(found, self.result.throughput_knee_batch_size)
        if self.keep_effective_batch:
            micro, accumulation = plan_accumulation(effective, found)
        else:
            micro, accumulation = found, 1
        lightning_setattr(pl_module, self.batch_arg_name, micro)
        trainer.accumulate_grad_batches = accumulation
        loop = trainer.fit_loop
        if getattr(loop, "_combined_loader", None) is not None:  # already built: rebuild with the new batch size
            loop._combined_loader = None
            loop.setup_data()
        self.chosen = {"batch_size": micro, "accumulate_grad_batches": accumulation,
                       "effective_batch_size": micro * accumulation, "previous_batch_size": batch,
                       "max_batch_size": self.result.max_batch_size,
                       "recommended_batch_size": self.result.recommended_batch_size}
        pl.utilities.rank_zero.rank_zero_info(
            f"batchfit: batch {micro} x accumulate {accumulation} = {micro * accumulation} (was {batch} x "
            f"{effective // batch}); largest that fits {self.result.max_batch_size}, recommended "
            f"{self.result.recommended_batch_size} ({self.result.real_trials} real trials)"
        )

    @staticmethod
    def _train_dataloader(trainer: Any, pl_module: Any) -> Any:
        dm = getattr(trainer, "datamodule", None)
        if dm is not None:
            return dm.train_dataloader()
        source = getattr(trainer.fit_loop, "_data_source", None)
        if source is not None and source.is_defined():
            return source.dataloader()
        return pl_module.train_dataloader()

    # -- B_simple during fit --------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not self.log_noise_scale:
            return
        if trainer.accumulate_grad_batches < 2:
            warnings.warn(
                "batchfit: B_simple needs >= 2 accumulated micro-batches per step; accumulate_grad_batches is "
                f"{trainer.accumulate_grad_batches}, so the noise scale is not logged",
                stacklevel=2,
            )
            return
        dataloader = self._train_dataloader(trainer, pl_module)
        self._noise = _NoiseLogger(pl_module, len(dataloader.dataset), self.noise_beta)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._noise is not None:
            self._noise.start_micro(batch)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._noise is not None:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            value = self._noise.end_step(scaler)
            if value is not None:
                pl_module.log("batchfit/b_simple", value, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._noise is not None:
            self._noise.end_micro()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._noise is not None:
            self._noise.close()
            self._noise = None


class BatchfitBatchSchedule(Callback):
    """Follow a batch-size schedule (issue 14; ``"0:32,500:64"``, phases, or ``derive_schedule``'s output) in Lightning.

    The loader's batch stays the micro-batch; the effective batch is changed through ``accumulate_grad_batches``
    (batch / micro-batch, which must divide), and at each change by ``k`` the optimizers move by
    :func:`batchfit.schedule.transfer` (LR rule, ``beta2``, ``weight_decay_timescale``; the schedulers' base LRs
    follow). Lightning changes accumulation only between epochs (as its own GradientAccumulationScheduler does), so a
    change takes effect at the first epoch that starts at or after its step. ``applied`` records the schedule as it
    ran, as ``train --json``'s ``batch_schedule``.
    """

    def __init__(self, batch_schedule: Any, *, lr_rule: str = "auto", beta2: str | None = None,
                 weight_decay_timescale: bool = False, batch_arg_name: str = "batch_size") -> None:
        from batchfit.schedule import ScheduleState, parse_schedule

        self.state = ScheduleState(parse_schedule(batch_schedule))
        self.lr_rule, self.beta2, self.weight_decay_timescale = lr_rule, beta2, weight_decay_timescale
        self.batch_arg_name = batch_arg_name
        self.current: int | None = None
        self.applied: list[dict[str, Any]] = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        from batchfit.schedule import transfer

        micro = int(lightning_getattr(pl_module, self.batch_arg_name)) if lightning_hasattr(
            pl_module, self.batch_arg_name) else int(getattr(trainer.train_dataloader, "batch_size", 0) or 0)
        batch = self.state.phase_at(trainer.global_step).batch_size
        if micro <= 0 or batch % micro:
            raise ConfigError(f"batch_schedule batch {batch} is not a multiple of the loader's batch {micro}; give "
                              "batches that the micro-batch divides")
        if batch == self.current:
            return
        if self.current is not None:
            for opt in trainer.optimizers:
                moved = transfer(opt, batch / self.current, lr_rule=self.lr_rule, beta2=self.beta2,
                                 weight_decay_timescale=self.weight_decay_timescale)
                for cfg in trainer.lr_scheduler_configs:
                    base = getattr(cfg.scheduler, "base_lrs", None)
                    if getattr(cfg.scheduler, "optimizer", None) is opt and isinstance(base, list):
                        cfg.scheduler.base_lrs = [lr * moved["lr_factor"] for lr in base]
        trainer.accumulate_grad_batches = batch // micro
        self.current = batch
        g = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
        self.applied.append({"step": int(trainer.global_step), "batch_size": batch, "micro_batch_size": micro,
                             "accumulation_steps": batch // micro, "lr": g.get("lr")})


class _NoiseLogger:
    """Per-micro-batch gradient norms inside Lightning's accumulation, fed to batchfit's one estimator
    (:class:`batchfit.noise.RunningNoiseScale`: :func:`batchfit.stats.unbiased_estimates` per step and two
    bias-corrected moving averages divided last), the same object ``NoiseCallback`` uses in batchfit's own loop.

    A leaf's tensor hook sees each backward's gradient before it is added to ``.grad``: with Lightning's loss
    normalisation that is ``g_i / k`` for micro-batch i, i.e. ``(b_i / B) g_i`` for equal micro-batches, the
    quantity the estimator's "small" sum takes. Lightning runs the last micro-batch's backward inside
    ``optimizer.step(closure)``, so the step's micro-batches are closed in ``on_before_optimizer_step``;
    ``on_train_batch_end`` closes only the ones before it. Values are read once per optimizer step (one sync).
    """

    def __init__(self, module: nn.Module, population: int, beta: float) -> None:
        from batchfit import noise

        self.params = [p for p in module.parameters() if p.requires_grad]
        self.handles = [p.register_hook(self._hook) for p in self.params]
        self.population = population
        self.beta = beta
        self.running = noise.RunningNoiseScale(beta)  # the |G|^2 and tr(Sigma) estimates' moving averages
        self._sq: list[torch.Tensor] = []  # this micro-batch's per-parameter squared norms
        self._micro: list[tuple[torch.Tensor, int]] = []  # (squared norm, samples) per closed micro-batch
        self.samples = 0
        self.open = False
        self.values: list[float] = []

    def _hook(self, grad: torch.Tensor) -> None:
        g = grad.detach()
        self._sq.append(torch.linalg.vector_norm(g, dtype=torch.float32).double().square())

    def start_micro(self, batch: Any) -> None:
        leaves = [t for t in torch.utils._pytree.tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.ndim]
        self.samples = int(leaves[0].shape[0]) if leaves else 1
        self.open = True

    def end_micro(self) -> None:
        if self.open and self._sq:
            self._micro.append((torch.stack(self._sq).sum(), self.samples))
        self._sq, self.open = [], False

    def end_step(self, scaler: Any) -> float | None:
        self.end_micro()
        micro, self._micro = self._micro, []
        grads = [p.grad.detach() for p in self.params if p.grad is not None]
        k, batch = len(micro), sum(b for _, b in micro)
        if k < 2 or not grads:
            return None
        # small = sum_i (b_i/B) |g_i|^2 = B sum_i n_i / b_i with n_i = |(b_i/B) g_i|^2, what the hooks saw
        small = float(torch.stack([n * (batch / b) for n, b in micro]).sum())
        big = float(torch.stack([torch.linalg.vector_norm(g.float()).double().square() for g in grads]).sum())
        if scaler is not None and scaler.is_enabled():
            small /= float(scaler.get_scale()) ** 2  # the hooks saw fp16-scaled gradients; .grad is unscaled here
        if not (math.isfinite(small) and math.isfinite(big)):
            return None
        self.running.add_step(small, big, k, batch, self.population)
        value = self.running.b_simple
        if value is None:
            return None  # no signal above the noise yet
        self.values.append(value)
        return value

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
