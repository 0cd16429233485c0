"""A workload: everything batchfit needs to train the user's model at any batch size.

A :class:`Workload` bundles a model factory (a fresh model per trial), an optimizer factory taking
``(params, lr)``, the loss (a mean over the batch, or read from the model's output), train and validation data
(map-style datasets, DataLoaders or IterableDatasets with a declared size; batches of any structure), how the model
is called on a batch, metrics, the user's LR schedule, gradient clipping and accumulation, and the reference point
``(base_batch_size, base_lr)`` at which the user's learning rate was tuned. User workloads are loaded from
``path/to/file.py:factory`` or ``package.module:factory``, built-in demos from ``demo:NAME``, by
:func:`batchfit.loading.load_workload` (``batchfit.load_workload``).

How one batch runs is :func:`batchfit.step.run_batch` (the same in train, find, noise, sweep and tune).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from batchfit import checks
from batchfit.errors import ConfigError, DataError, WorkloadError
from batchfit.metric import accuracy  # re-exported: `from batchfit.workload import accuracy` keeps working

__all__ = [
    "ForwardFn",
    "LRScheduleFactory",
    "LossFn",
    "MetricFn",
    "ModelFactory",
    "OptimizerFactory",
    "TargetsFn",
    "Workload",
    "accuracy",
]

ModelFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], "torch.Tensor | float"]
ForwardFn = Callable[[nn.Module, Any], Any]
TargetsFn = Callable[[Any], Any]
LRScheduleFactory = Callable[[torch.optim.Optimizer, int], Any]


@dataclass
class Workload:
    """The user's training setup, in a form batchfit can re-run at any batch size.

    Args:
        name: a label used in reports.
        model_fn: returns a *fresh* model each call (every trial starts from the same seeded initialisation).
        optimizer_fn: ``(params, lr) -> optimizer``.
        loss_fn: ``(outputs, targets) -> scalar`` mean over the batch, or ``"output"``: the model's output carries
            the loss (``outputs.loss`` or ``outputs["loss"]``, Hugging Face style).
        train_data: a map-style dataset, a ``DataLoader`` (re-created at each batch size, keeping its workers,
            collate function, pinning and sampler kind) or an ``IterableDataset`` with a declared size.
        val_data: the same for validation, or ``None`` (trials are then ranked on the training loss).
        metrics: name -> ``(outputs, targets) -> batch mean``; the first one is the primary metric.
        base_batch_size: the batch size the user's learning rate was tuned at.
        base_lr: that learning rate.
        higher_is_better: whether a larger primary metric is better (accuracy: yes, perplexity: no).
        sample_batch: optional ``b -> batch`` giving the worst-case (largest/longest) batch of size b, used by
            memory probes.
        collate_fn: optional collate function for datasets whose items are not plain tensors.
        forward: how the model is called on a (device) batch. ``None``: ``model(batch[0])`` for
            ``(input, target)`` pairs, ``model(**batch)`` for mappings; a sequence of keys:
            ``model(**{k: batch[k] for k in keys})``; a function ``forward(model, batch) -> outputs``.
        targets: what the loss and metrics compare against. ``None``: ``batch[1]`` for pairs,
            ``batch.get("labels")`` for mappings; a key: ``batch[key]``; a function ``targets(batch)``.
        lr_schedule: ``(optimizer, total_steps) -> scheduler`` (anything with ``.step()``), stepped after every
            optimizer step; batchfit's warm-up multiplies on top of it.
        grad_clip: clip the global gradient norm to this value (``train(grad_clip=)`` overrides it).
        micro_batch_size: the user's accumulation setting: samples per forward/backward when no micro-batch size
            is asked for (capped at the batch).
        train_samples / val_samples: samples per epoch of an IterableDataset without ``len()``.
        shard: the units ``parallel="fsdp"`` shards one at a time (FSDP2): class names such as
            ``("TransformerBlock",)`` or a function ``module -> bool``; default: every module holding >= 5 % of
            the parameters (:func:`batchfit.sharding.shard_units`).
    """

    name: str
    model_fn: ModelFactory
    optimizer_fn: OptimizerFactory
    loss_fn: LossFn | str
    train_data: Any
    val_data: Any = None
    metrics: Mapping[str, MetricFn] = field(default_factory=dict)
    base_batch_size: int = 32
    base_lr: float = 1e-3
    higher_is_better: bool = True
    sample_batch: Callable[[int], Any] | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    description: str = ""
    forward: ForwardFn | Sequence[str] | None = None
    targets: TargetsFn | str | None = None
    lr_schedule: LRScheduleFactory | None = None
    grad_clip: float | None = None
    micro_batch_size: int | None = None
    train_samples: int | None = None
    val_samples: int | None = None
    shard: Sequence[str] | Callable[[nn.Module], bool] | None = None

    @property
    def primary_metric(self) -> str:
        """The metric used to rank trials: the first metric, or ``val_loss`` when there is none."""
        return next(iter(self.metrics), "val_loss")

    @property
    def metric_higher_is_better(self) -> bool:
        return self.higher_is_better if self.metrics else False

    @property
    def num_train(self) -> int:
        """Samples in one training epoch (a DataLoader's sampler, an IterableDataset's declared size)."""
        from batchfit.data import train_source

        return train_source(self).num_samples

    @property
    def num_val(self) -> int | None:
        from batchfit.data import val_source

        source = val_source(self)
        return None if source is None else source.num_samples

    def validate(self) -> None:
        """Check the fields batchfit relies on; raise a one-line :class:`WorkloadError` naming what is wrong."""
        for attr in ("model_fn", "optimizer_fn"):
            if not callable(getattr(self, attr)):
                raise WorkloadError(f"workload {self.name!r}: {attr} must be callable")
        if not (callable(self.loss_fn) or self.loss_fn == "output"):
            raise WorkloadError(f"workload {self.name!r}: loss_fn must be callable (outputs, targets) -> loss, or "
                                f"'output' to read the loss from the model's output; got {self.loss_fn!r}")
        self._validate_contract()
        n = self._samples("train_data")
        if n == 0:
            raise DataError(f"workload {self.name!r}: train_data is empty; give it at least one sample")
        if self.val_data is not None and self._samples("val_data") == 0:
            raise DataError(f"workload {self.name!r}: val_data is empty; pass None or give it samples")
        try:
            checks.positive_int("base_batch_size", self.base_batch_size)
            checks.positive_number("base_lr", self.base_lr)
        except ConfigError as exc:
            raise WorkloadError(f"workload {self.name!r}: {exc}") from None
        for metric_name, fn in self.metrics.items():
            if not callable(fn):
                raise WorkloadError(f"workload {self.name!r}: metric {metric_name!r} is not callable")

    def _samples(self, attr: str) -> int:
        from batchfit import data

        given = getattr(self, attr)
        cls = given if isinstance(given, type) else type(given)
        if any(c.__name__ == "LightningDataModule" for c in cls.__mro__):  # issue 23.5: the fix, not the symptom
            raise WorkloadError(
                f"workload {self.name!r}: {attr} is the LightningDataModule {cls.__name__}, not a dataset; pass an "
                f"instance as datamodule=: batchfit.integrations.lightning.lightning_workload(module, "
                f"datamodule={cls.__name__}(...))"
            )
        try:
            source = data.train_source(self) if attr == "train_data" else data.val_source(self)
            return 0 if source is None else source.num_samples
        except WorkloadError as exc:  # DataError stays a DataError
            raise type(exc)(f"workload {self.name!r}: {attr}: {exc}") from exc
        except (ValueError, OverflowError) as exc:  # len() of a __len__ that returns -1 or 10**30
            raise DataError(
                f"workload {self.name!r}: {attr}: len() failed ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                "make its __len__ return the number of samples, an integer >= 0"
            ) from exc
        except TypeError as exc:
            raise WorkloadError(
                f"workload {self.name!r}: {attr} must be a dataset with len(), a DataLoader or an IterableDataset "
                f"with a declared size; got {type(getattr(self, attr)).__name__}"
            ) from exc

    def _validate_contract(self) -> None:
        """The common-contract fields: forward, targets, lr_schedule, grad_clip, micro_batch_size."""
        fwd = self.forward
        if fwd is not None and not callable(fwd):
            if isinstance(fwd, str):
                self.forward = fwd = (fwd,)
            if not (isinstance(fwd, Sequence) and fwd and all(isinstance(k, str) for k in fwd)):
                raise WorkloadError(
                    f"workload {self.name!r}: forward must be None, a sequence of batch keys passed as keyword "
                    f"arguments, or a function (model, batch) -> outputs; got {fwd!r}"
                )
            self.forward = tuple(fwd)
        if self.targets is not None and not (callable(self.targets) or isinstance(self.targets, str)):
            raise WorkloadError(f"workload {self.name!r}: targets must be None, a batch key or a function "
                                f"batch -> targets; got {self.targets!r}")
        if self.lr_schedule is not None and not callable(self.lr_schedule):
            raise WorkloadError(f"workload {self.name!r}: lr_schedule must be a function (optimizer, total_steps) "
                                f"-> scheduler; got {type(self.lr_schedule).__name__}")
        try:
            checks.positive_number("grad_clip", self.grad_clip, allow_none=True)
            checks.positive_int("micro_batch_size", self.micro_batch_size, allow_none=True)
            checks.positive_int("train_samples", self.train_samples, allow_none=True)
            checks.positive_int("val_samples", self.val_samples, allow_none=True)
        except ConfigError as exc:
            raise WorkloadError(f"workload {self.name!r}: {exc}") from None
