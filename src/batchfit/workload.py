"""A workload: everything batchfit needs to train the user's model at any batch size.

A :class:`Workload` bundles a model factory (a fresh model per trial), an optimizer factory taking
``(params, lr)``, the loss (a mean over the batch), map-style train and validation datasets whose items are
``(input, target)`` pairs, metrics, and the reference point ``(base_batch_size, base_lr)`` at which the user's
learning rate was tuned. User workloads are loaded from ``path/to/file.py:factory`` or ``package.module:factory``;
built-in demos from ``demo:NAME``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchfit.errors import ConfigError, DataError, WorkloadError

ModelFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], "torch.Tensor | float"]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of class scores ``(B, C)`` (or ``(B, T, C)``) against integer targets."""
    return (outputs.argmax(dim=-1) == targets).float().mean()


@dataclass
class Workload:
    """The user's training setup, in a form batchfit can re-run at any batch size.

    Args:
        name: a label used in reports.
        model_fn: returns a *fresh* model each call (every trial starts from the same seeded initialisation).
        optimizer_fn: ``(params, lr) -> optimizer``.
        loss_fn: ``(outputs, targets) -> scalar`` mean over the batch.
        train_data: map-style dataset of ``(input, target)`` pairs.
        val_data: map-style validation dataset, or ``None``.
        metrics: name -> ``(outputs, targets) -> batch mean``; the first one is the primary metric.
        base_batch_size: the batch size the user's learning rate was tuned at.
        base_lr: that learning rate.
        higher_is_better: whether a larger primary metric is better (accuracy: yes, perplexity: no).
        sample_batch: optional ``b -> (input, target)`` giving the worst-case (largest/longest) batch of size b,
            used by memory probes.
        collate_fn: optional collate function for non-tensor datasets.
    """

    name: str
    model_fn: ModelFactory
    optimizer_fn: OptimizerFactory
    loss_fn: LossFn
    train_data: torch.utils.data.Dataset
    val_data: torch.utils.data.Dataset | None = None
    metrics: Mapping[str, MetricFn] = field(default_factory=dict)
    base_batch_size: int = 32
    base_lr: float = 1e-3
    higher_is_better: bool = True
    sample_batch: Callable[[int], tuple[Any, Any]] | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    description: str = ""

    @property
    def primary_metric(self) -> str:
        """The metric used to rank trials: the first metric, or ``val_loss`` when there is none."""
        return next(iter(self.metrics), "val_loss")

    @property
    def metric_higher_is_better(self) -> bool:
        return self.higher_is_better if self.metrics else False

    @property
    def num_train(self) -> int:
        return len(self.train_data)  # type: ignore[arg-type]

    def validate(self) -> None:
        """Check the fields batchfit relies on; raise a one-line :class:`WorkloadError` naming what is wrong."""
        for attr in ("model_fn", "optimizer_fn", "loss_fn"):
            if not callable(getattr(self, attr)):
                raise WorkloadError(f"workload {self.name!r}: {attr} must be callable")
        try:
            n = len(self.train_data)  # type: ignore[arg-type]
        except TypeError as exc:
            raise WorkloadError(
                f"workload {self.name!r}: train_data must be a map-style dataset with len(); got "
                f"{type(self.train_data).__name__}"
            ) from exc
        if n == 0:
            raise DataError(f"workload {self.name!r}: train_data is empty; give it at least one sample")
        if self.val_data is not None and len(self.val_data) == 0:  # type: ignore[arg-type]
            raise DataError(f"workload {self.name!r}: val_data is empty; pass None or give it samples")
        if not isinstance(self.base_batch_size, int) or self.base_batch_size < 1:
            raise WorkloadError(
                f"workload {self.name!r}: base_batch_size must be a positive integer, got {self.base_batch_size!r}"
            )
        if not (isinstance(self.base_lr, (int, float)) and math.isfinite(self.base_lr) and self.base_lr > 0):
            raise WorkloadError(f"workload {self.name!r}: base_lr must be a positive number, got {self.base_lr!r}")
        for metric_name, fn in self.metrics.items():
            if not callable(fn):
                raise WorkloadError(f"workload {self.name!r}: metric {metric_name!r} is not callable")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _call_factory(factory: Callable[..., Any], kwargs: Mapping[str, Any], spec: str) -> Workload:
    try:
        sig = inspect.signature(factory)
        accepted = {
            k: v
            for k, v in kwargs.items()
            if k in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        }
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ConfigError(
                f"workload {spec!r} does not take option(s) {', '.join(unknown)}; "
                f"it accepts: {', '.join(sig.parameters) or 'none'}"
            )
    except (TypeError, ValueError) as exc:  # builtins without signatures
        if isinstance(exc, ConfigError):
            raise
        accepted = dict(kwargs)
    try:
        workload = factory(**accepted)
    except ConfigError:
        raise
    except Exception as exc:
        raise WorkloadError(
            f"workload factory {spec!r} raised {type(exc).__name__}: {exc}; fix the factory (run with --debug "
            "for the traceback)"
        ) from exc
    if not isinstance(workload, Workload):
        raise WorkloadError(
            f"workload factory {spec!r} returned {type(workload).__name__}, not a batchfit.Workload"
        )
    workload.validate()
    return workload


def load_workload(spec: str | Workload, **options: Any) -> Workload:
    """Load a workload from ``demo:NAME``, ``path/to/file.py:factory`` or ``package.module:factory``.

    Keyword options are passed to the factory (e.g. ``num_samples=4000`` for ``demo:mnist1d``).

    >>> wl = load_workload("demo:digits-mlp")
    >>> wl.base_batch_size
    32
    """
    if isinstance(spec, Workload):
        spec.validate()
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("workload spec is empty; use demo:NAME, path/to/file.py:factory or package.module:factory")
    spec = spec.strip()
    if spec.startswith("demo:"):
        from batchfit import demos

        name = spec[len("demo:") :]
        factory = demos.DEMOS.get(name)
        if factory is None:
            raise ConfigError(f"unknown demo {name!r}; choose one of: {', '.join(sorted(demos.DEMOS))}")
        return _call_factory(factory, options, spec)
    if ":" not in spec:
        raise ConfigError(
            f"workload spec {spec!r} has no ':factory' part; use path/to/file.py:factory or package.module:factory"
        )
    target, _, attr = spec.rpartition(":")
    if not attr.isidentifier():
        raise ConfigError(f"workload spec {spec!r}: {attr!r} is not a valid factory name")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"workload file {str(path)!r} does not exist; check the path in {spec!r}")
        mod_name = f"batchfit_user_{abs(hash(str(path.resolve())))}"
        try:
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"cannot import {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise WorkloadError(
                f"importing workload file {str(path)!r} failed with {type(exc).__name__}: {exc}"
            ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"workload module {target!r} was not found ({exc}); check the spelling or your PYTHONPATH"
            ) from exc
        except Exception as exc:
            raise WorkloadError(
                f"importing workload module {target!r} failed with {type(exc).__name__}: {exc}"
            ) from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"workload {target!r} has no attribute {attr!r}; name a function that returns a Workload")
    if isinstance(factory, Workload):
        factory.validate()
        return factory
    if not callable(factory):
        raise WorkloadError(f"workload {spec!r}: {attr!r} is not callable")
    return _call_factory(factory, options, spec)


def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings from the CLI (``--workload-option num_samples=4000``) into typed values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"workload option {item!r} is not key=value; write e.g. num_samples=4000")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        out[key.strip()] = value
    return out
