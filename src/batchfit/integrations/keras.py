"""Keras 3 -> batchfit: a compiled Keras model (factory) and arrays become a :class:`~batchfit.Workload`.

The guides' Keras example ::

    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=64, validation_split=0.2)

becomes, in a workload file ``keras_workload.py`` ::

    from batchfit.integrations.keras import keras_workload   # first: selects Keras' torch backend
    import keras

    def build():
        model = keras.Sequential([...])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def workload():
        return keras_workload(build, x, y, batch_size=64, validation_split=0.2)

and ``batchfit train|find|noise|sweep|tune --workload keras_workload.py:workload`` run on it.

Design (why it looks like this):

- **Backend.** Keras 3 picks its backend once, when ``keras`` is first imported, from ``KERAS_BACKEND`` (or
  ``~/.keras/keras.json``). batchfit trains with PyTorch, so Keras must run on its torch backend, where a Keras
  model *is* a ``torch.nn.Module`` whose weights are torch parameters. Importing this module sets
  ``KERAS_BACKEND=torch`` unless it is already set; if Keras was imported earlier with another backend, building
  the workload fails with a one-line error that says to set ``KERAS_BACKEND=torch`` before importing keras.
- **Optimizer.** batchfit's engine owns the loop (LR scaling rules edit ``param_groups``, warm-up, accumulation,
  DDP), so the compiled Keras optimizer is *mapped* to the equivalent ``torch.optim`` optimizer with the same
  hyper-parameters (SGD with or without (Nesterov) momentum, Adam, AdamW, Adagrad, Adamax; tested to give the
  same weights as ``model.fit`` within 1e-4) rather than driven directly. RMSprop is refused: Keras divides by
  ``sqrt(v + eps)`` and torch by ``sqrt(v) + eps``, which differ visibly in training. Keras applies
  ``weight_decay`` decoupled (``w -= lr * wd * w``); Adam/AdamW map to ``torch.optim.AdamW`` for that reason.
  Keras and torch place Adam's epsilon slightly differently (inside vs outside the bias correction), which only
  matters at the scale of epsilon. ``global_clipnorm`` becomes the workload's ``grad_clip`` (the same global-norm
  clipping) and ``gradient_accumulation_steps`` its accumulation (base batch = ``batch_size`` x steps, micro-batch =
  ``batch_size``). Settings with no exact equivalent (per-variable ``clipnorm``, ``clipvalue``, EMA, Keras LR
  schedules) are refused with an error that says what to use instead.
- **Loss and metrics** are resolved by Keras itself from the compile arguments (``"accuracy"`` becomes sparse /
  categorical / binary accuracy exactly as in ``fit``); the loss includes the model's regularization losses.
  Metrics are computed per batch and averaged sample-weighted, which equals Keras' value for mean-type metrics
  (accuracy, MAE, ...); for non-decomposable metrics (AUC) it is a per-batch average.
- **Seeds.** Each trial builds a fresh model after ``keras.utils.set_random_seed(seed)`` with batchfit's trial
  seed, so every trial starts from the same initial weights, as batchfit requires.
- ``training=`` follows ``model.train()`` / ``model.eval()``, so dropout and batch norm behave as in ``fit``.
- ``validation_split`` takes the *last* fraction of the arrays before any shuffling, exactly like Keras.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from batchfit import checks
from batchfit.errors import ConfigError, DataError, WorkloadError
from batchfit.workload import Workload

# Keras reads KERAS_BACKEND once, at its first import: set it before anything imports keras.
if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "torch")

__all__ = ["KerasModule", "keras_workload"]

_UNSUPPORTED_OPTIMIZER_KEYS = {
    "clipnorm": "Keras clips each variable's norm, batchfit the global norm: compile with global_clipnorm (or use "
                "--grad-clip) instead",
    "clipvalue": "value clipping is not supported; remove it or use --grad-clip (norm clipping)",
    "use_ema": "weight EMA is not supported; remove use_ema",
    "loss_scale_factor": "batchfit handles mixed precision itself (--precision)",
}


def _keras() -> Any:
    """Import keras on its torch backend, or explain in one line what to do."""
    try:
        import keras
    except ImportError as exc:
        raise ConfigError("Keras is not installed; run: pip install 'batchfit[keras]'") from exc
    backend = keras.backend.backend()
    if backend != "torch":
        raise ConfigError(
            f"Keras is running on its {backend!r} backend, but batchfit trains with PyTorch; set "
            "KERAS_BACKEND=torch before keras is first imported (or import batchfit.integrations.keras first)"
        )
    return keras


class KerasModule(nn.Module):
    """A Keras model as a torch module: ``forward`` calls it with ``training=self.training`` on the device of its
    weights, and attaches the model's regularization losses to the output for :func:`keras_workload`'s loss."""

    def __init__(self, keras_model: Any) -> None:
        super().__init__()
        self.keras_model = keras_model

    def forward(self, x: Any) -> Any:
        keras = _keras()
        param = next(self.keras_model.parameters(), None)
        device = str(param.device) if param is not None else "cpu"
        with keras.device(device):
            out = self.keras_model(x, training=self.training)
            reg = self.keras_model.losses
        if reg and isinstance(out, torch.Tensor):
            out.batchfit_regularization_loss = torch.stack([torch.as_tensor(r).reshape(()) for r in reg]).sum()
        return out


def _as_tensor(a: Any, what: str, float_dtype: torch.dtype) -> torch.Tensor:
    try:
        t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a.detach().cpu()
    except Exception as exc:
        raise DataError(f"{what} could not be turned into an array ({type(exc).__name__}: {exc})") from exc
    if t.ndim == 0:
        raise DataError(f"{what} must have one row per sample; got a scalar")
    if t.is_floating_point():
        t = t.to(float_dtype)
    return t


def _torch_optimizer_factory(config: dict[str, Any], class_name: str) -> tuple[Callable[..., Any], float]:
    """Map a Keras optimizer's config to ``(params, lr) -> torch optimizer`` with the same hyper-parameters."""
    lr = config.get("learning_rate")
    if not isinstance(lr, (int, float)):
        raise ConfigError(
            "the Keras optimizer uses a learning-rate schedule; batchfit scales the LR and applies warm-up itself: "
            "compile with a constant learning_rate"
        )
    lr = float(f"{float(lr):.7g}")  # Keras stores it as float32: 0.001 -> 0.0010000000474974513
    for key, advice in _UNSUPPORTED_OPTIMIZER_KEYS.items():
        value = config.get(key)
        if value not in (None, False):
            raise ConfigError(f"the Keras optimizer sets {key}={value!r}; {advice}")
    wd = config.get("weight_decay") or 0.0
    eps = config.get("epsilon", 1e-7)
    name = class_name.lower()
    if name == "sgd":
        momentum, nesterov = config.get("momentum", 0.0), bool(config.get("nesterov", False))
        if wd and momentum:
            raise ConfigError(
                "Keras SGD with both momentum and weight_decay applies decoupled decay, which torch's SGD "
                "cannot reproduce; drop weight_decay or momentum"
            )

        def sgd(params: Any, lr: float) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)

        return sgd, lr
    if name in ("adam", "adamw"):
        betas = (config.get("beta_1", 0.9), config.get("beta_2", 0.999))
        amsgrad = bool(config.get("amsgrad", False))
        if wd:

            def adamw(params: Any, lr: float) -> torch.optim.Optimizer:
                return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, amsgrad=amsgrad)

            return adamw, lr

        def adam(params: Any, lr: float) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, amsgrad=amsgrad)

        return adam, lr
    if name == "rmsprop":  # Keras divides by sqrt(v + eps), torch by sqrt(v) + eps: not the same optimizer
        raise ConfigError(
            "Keras RMSprop (sqrt(v + epsilon)) has no exact torch equivalent; compile with SGD, Adam, AdamW, "
            "Adagrad or Adamax for batchfit"
        )
    if name == "adagrad":
        init = config.get("initial_accumulator_value", 0.1)

        def adagrad(params: Any, lr: float) -> torch.optim.Optimizer:
            return torch.optim.Adagrad(params, lr=lr, initial_accumulator_value=init, eps=eps, weight_decay=wd)

        return adagrad, lr
    if name == "adamax":
        betas = (config.get("beta_1", 0.9), config.get("beta_2", 0.999))

        def adamax(params: Any, lr: float) -> torch.optim.Optimizer:
            return torch.optim.Adamax(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)

        return adamax, lr
    raise ConfigError(
        f"the Keras optimizer {class_name!r} has no torch equivalent in batchfit; compile with one of: "
        "SGD, Adam, AdamW, Adagrad, Adamax"
    )


def _split_data(x: Any, y: Any, validation_split: float, validation_data: tuple[Any, Any] | None,
                floatx: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(x_train, y_train, (x_val, y_val) or None) as ``fit`` would split them."""
    xt, yt = _as_tensor(x, "x", floatx), _as_tensor(y, "y", floatx)
    if len(xt) != len(yt):
        raise DataError(f"x has {len(xt)} samples but y has {len(yt)}; they must match")
    if validation_data is not None:
        if not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
            raise ConfigError("validation_data must be a pair (x_val, y_val)")
        xv, yv = _as_tensor(validation_data[0], "x_val", floatx), _as_tensor(validation_data[1], "y_val", floatx)
        if len(xv) != len(yv):
            raise DataError(f"x_val has {len(xv)} samples but y_val has {len(yv)}; they must match")
        return xt, yt, (xv, yv)
    if validation_split:
        split_at = math.ceil(len(xt) * (1.0 - validation_split))  # as Keras does: the last fraction
        if split_at in (0, len(xt)):
            raise DataError(
                f"validation_split={validation_split} of {len(xt)} samples leaves an empty train or validation set"
            )
        return xt[:split_at], yt[:split_at], (xt[split_at:], yt[split_at:])
    return xt, yt, None


def _compiled_prototype(keras: Any, prototype: Any, build: Callable[[], Any]) -> Any:
    """The compiled model the loss, metrics and optimizer are read from (built once when given a function)."""
    if prototype is None:
        keras.utils.set_random_seed(0)
        try:
            prototype = build()
        except Exception as exc:
            raise WorkloadError(f"the Keras model function raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(prototype, keras.Model):
        raise WorkloadError(f"the model function must return a keras.Model, got {type(prototype).__name__}")
    if not getattr(prototype, "compiled", False) or prototype.optimizer is None:
        raise WorkloadError("the Keras model is not compiled; call model.compile(optimizer=..., loss=...) in it")
    if prototype.loss is None or isinstance(prototype.loss, (dict, list, tuple)):
        raise WorkloadError(
            "batchfit supports a single-output Keras model compiled with one loss; got loss="
            f"{prototype.loss!r}"
        )
    return prototype


def _loss_and_metrics(keras: Any, prototype: Any, x_tr: torch.Tensor, y_tr: torch.Tensor
                      ) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dict[str, Any], list[Any]]:
    """The compiled loss and metrics as torch callables ``(outputs, targets)``, resolved the way Keras does."""
    from keras.src.trainers import compile_utils  # Keras' own resolution of "accuracy" / "crossentropy"

    with torch.no_grad(), keras.device("cpu"):
        probe = KerasModule(prototype)
        probe.to("cpu")
        y_pred = probe(x_tr[:2])
    y_true = y_tr[:2]
    if not isinstance(y_pred, torch.Tensor):
        raise WorkloadError("the Keras model must return one tensor (single output) for batchfit")
    loss_obj = compile_utils.get_loss(prototype.loss, y_true, y_pred)
    metric_ids = (prototype.get_compile_config() or {}).get("metrics") or []
    if isinstance(metric_ids, dict):
        raise WorkloadError("per-output metric dicts are not supported; compile with a list of metrics")
    if not isinstance(metric_ids, (list, tuple)):
        metric_ids = [metric_ids]
    metric_objs = [compile_utils.get_metric(keras.saving.deserialize_keras_object(m)
                                            if isinstance(m, dict) else m, y_true, y_pred) for m in metric_ids]

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with keras.device(str(outputs.device)):
            loss = loss_obj(targets, outputs)
        reg = getattr(outputs, "batchfit_regularization_loss", None)
        return loss + reg if reg is not None else loss

    def make_metric(m: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def metric(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), keras.device(str(outputs.device)):
                m.reset_state()
                m.update_state(targets, outputs)
                return torch.as_tensor(m.result()).to(outputs.device)

        return metric

    return loss_fn, {m.name: make_metric(m) for m in metric_objs}, metric_objs


def keras_workload(
    model: Callable[[], Any] | Any,
    x: Any,
    y: Any,
    *,
    batch_size: int = 32,
    validation_split: float = 0.0,
    validation_data: tuple[Any, Any] | None = None,
    name: str = "keras",
    higher_is_better: bool | None = None,
) -> Workload:
    """Turn a compiled Keras 3 model and ``(x, y)`` arrays into a batchfit :class:`Workload`.

    Args:
        model: a function returning a freshly built, *compiled* Keras model (preferred), or a compiled model,
            which is cloned with fresh weights for every trial (``keras.models.clone_model``).
        x, y: the arrays you would pass to ``model.fit`` (NumPy arrays or torch tensors, one row per sample).
        batch_size: the batch size your learning rate was tuned at (the ``batch_size`` of your ``fit`` call).
        validation_split: like ``fit``: the last fraction of ``x``/``y`` is held out for validation.
        validation_data: ``(x_val, y_val)`` instead of ``validation_split``.
        higher_is_better: whether the first compiled metric is better when larger (default: True for accuracy
            and AUC-like metrics, False for error metrics such as MAE/MSE).

    The loss, metrics, optimizer and learning rate come from ``model.compile(...)``; see the module docstring
    for how the optimizer is mapped to torch.
    """
    keras = _keras()
    checks.positive_int("batch_size", batch_size)
    checks.fraction("validation_split", validation_split, low_open=False)
    if validation_split and validation_data is not None:
        raise ConfigError("give either validation_split or validation_data, not both")

    if isinstance(model, keras.Model):
        given = model

        def build() -> Any:
            return keras.models.clone_model(given)
        prototype = given
    elif callable(model):
        build, prototype = model, None
    else:
        raise WorkloadError(
            f"model must be a compiled keras.Model or a function returning one, got {type(model).__name__}"
        )

    x_tr, y_tr, val = _split_data(x, y, validation_split, validation_data, getattr(torch, keras.config.floatx()))
    prototype = _compiled_prototype(keras, prototype, build)
    opt_factory, base_lr = _torch_optimizer_factory(prototype.optimizer.get_config(),
                                                    type(prototype.optimizer).__name__)
    loss_fn, metrics, metric_objs = _loss_and_metrics(keras, prototype, x_tr, y_tr)
    if higher_is_better is None:
        first = metric_objs[0].name.lower() if metric_objs else ""
        higher_is_better = not any(s in first for s in ("error", "mae", "mse", "loss", "hinge", "divergence"))

    def model_fn() -> nn.Module:
        keras.utils.set_random_seed(int(torch.initial_seed() % 2**32))  # same init for the same trial seed
        km = build()
        if not isinstance(km, keras.Model):
            raise WorkloadError(f"the model function must return a keras.Model, got {type(km).__name__}")
        module = KerasModule(km)
        if not km.built or next(km.parameters(), None) is None:  # subclassed models build on first call
            with torch.no_grad():
                module.eval()(x_tr[:1])
            module.train()
        return module

    from batchfit.demos import ArrayDataset

    opt_config = prototype.optimizer.get_config()
    clip = opt_config.get("global_clipnorm")
    accumulation = int(opt_config.get("gradient_accumulation_steps") or 1)
    return Workload(
        name=name,
        model_fn=model_fn,
        optimizer_fn=opt_factory,
        loss_fn=loss_fn,
        train_data=ArrayDataset(x_tr, y_tr),
        val_data=ArrayDataset(*val) if val is not None else None,
        metrics=metrics,
        base_batch_size=batch_size * accumulation,
        base_lr=base_lr,
        micro_batch_size=batch_size if accumulation > 1 else None,
        grad_clip=float(clip) if clip else None,
        higher_is_better=higher_is_better,
        description=f"Keras model ({type(prototype.optimizer).__name__}, loss {prototype.loss!r}) via batchfit",
    )
