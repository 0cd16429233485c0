"""Hugging Face Transformers -> batchfit: a workload from ``model_init`` and datasets, and a Trainer callback.

::

    from batchfit.integrations.hf import BatchfitCallback, hf_workload

    # 1. measure and recommend (batchfit tune / find / sweep on it): a fresh model per trial
    def make():
        return hf_workload(model_init, train_ds, eval_ds, collator, args=training_args)

    # 2. size the batch when Trainer.train() starts, keeping the effective batch
    trainer = Trainer(model_init=model_init, args=training_args, train_dataset=train_ds, data_collator=collator,
                      callbacks=[BatchfitCallback(memory_budget="20GiB")])
    trainer.train()

What the workload takes from ``TrainingArguments`` (the regime the user trains in): ``learning_rate`` (the base LR),
``per_device_train_batch_size`` x ``gradient_accumulation_steps`` (the base batch; the per-device size is the
micro-batch), the optimizer Trainer would build (``optim``, ``weight_decay`` on all but biases and norm weights,
Adam betas and epsilon), ``max_grad_norm`` (clipping), ``lr_scheduler_type`` with its warm-up (``warmup_steps``,
an int or a ratio) over the trial's steps, ``bf16``/``fp16`` (the precision the callback sizes at) and
``remove_unused_columns`` (item keys the model's ``forward`` does not take are dropped before collation, as Trainer
does). The loss is read from the model's output (``loss_fn="output"``: the collator's ``labels`` make the model
return ``.loss``). Metrics are batch means of ``(outputs, labels)``, e.g. :func:`logits_accuracy`.

Needs ``pip install 'batchfit[hf]'``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import re
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from batchfit.errors import ConfigError, WorkloadError
from batchfit.integrations.common import plan_accumulation
from batchfit.workload import Workload

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("Hugging Face Transformers is not installed; run: pip install 'batchfit[hf]'") from exc

__all__ = ["BatchfitCallback", "hf_workload", "logits_accuracy", "trainer_workload"]

logger = logging.getLogger(__name__)
_LABEL_KEYS = ("label", "label_ids", "labels")  # collators turn label / label_ids into labels


def logits_accuracy(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of ``outputs.logits`` against ``labels``, ignoring positions labelled -100 (HF's ignore index).

    Works for sequence classification (``(B, C)`` logits) and token-level tasks (``(B, T, C)``).
    """
    logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
    keep = labels != -100
    hits = (logits.argmax(dim=-1) == labels) & keep
    return hits.sum().double() / keep.sum().clamp(min=1).double()


def _call_init(model_init: Callable[..., Any]) -> nn.Module:
    """``model_init()`` (Trainer also accepts one taking a hyper-parameter trial: it gets ``None``)."""
    try:
        takes_trial = len(inspect.signature(model_init).parameters) == 1
    except (TypeError, ValueError):
        takes_trial = False
    model = model_init(None) if takes_trial else model_init()
    if not isinstance(model, nn.Module):
        raise WorkloadError(f"model_init must return a torch model, got {type(model).__name__}")
    return model


def _forward_names(model: nn.Module) -> set[str]:
    """The arguments ``model.forward`` names (as Trainer, columns matching none of them are dropped even when
    ``forward`` also takes ``**kwargs``)."""
    params = inspect.signature(model.forward).parameters.values()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _keep_columns(collator: Callable[[list[Any]], Any], names: set[str]) -> Callable[[list[Any]], Any]:
    """Drop item keys the model does not take before collating (Trainer's ``remove_unused_columns``)."""
    keep = names | set(_LABEL_KEYS)

    def collate(items: list[Any]) -> Any:
        if items and isinstance(items[0], Mapping):
            items = [{k: v for k, v in item.items() if k in keep} for item in items]
        return collator(items)

    return collate


def _filtered_forward(names: set[str] | None) -> Callable[[nn.Module, Any], Any]:
    def forward(model: nn.Module, batch: Any) -> Any:
        if not isinstance(batch, Mapping):
            raise WorkloadError(f"batches must be mappings of model arguments, got {type(batch).__name__}; "
                                "use a data collator that returns a dict (e.g. DataCollatorWithPadding)")
        if names is None:
            return model(**batch)
        return model(**{k: v for k, v in batch.items() if k in names})

    return forward


class _Models:
    """The models built for trials, so the optimizer factory (given only parameters) finds their names."""

    def __init__(self, factory: Callable[[], nn.Module]) -> None:
        self.factory = factory
        self.live: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def new(self) -> nn.Module:
        model = self.factory()
        self.live.add(model)
        return model

    def owner(self, params: list[Any]) -> nn.Module:
        first = id(params[0]) if params else None
        for model in list(self.live):
            if any(id(p) == first for p in model.parameters()):
                return model
        raise WorkloadError("optimizer_fn got parameters of a model batchfit did not build from model_init")


def _decay_names(model: nn.Module) -> set[str]:
    """Parameters Trainer applies weight decay to: all but biases, LayerNorm weights and ``*norm*`` parameters."""
    pattern = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)", re.IGNORECASE)
    skip = {f"{m}.{n}" if m else n for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
            for n, _ in mod.named_parameters(recurse=False)}
    return {n for n, _ in model.named_parameters() if n not in skip and not pattern.search(n)}


def _trainer_optimizer(args: Any, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``Trainer.create_optimizer`` builds for ``args``, at ``lr``."""
    try:
        cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    except TypeError:  # transformers < 4.42 takes the arguments only
        cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args)
    kwargs = dict(kwargs, lr=lr)
    if kwargs.get("fused") and not any(p.is_cuda for p in model.parameters()) and not hasattr(torch, "_fused_adamw_"):
        kwargs.pop("fused")
    decay = _decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return cls([g for g in groups if g["params"]], **kwargs)


def _scheduler(args: Any) -> Callable[[torch.optim.Optimizer, int], Any]:
    def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        return transformers.get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(total_steps),
            num_training_steps=total_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )

    return lr_schedule


def hf_workload(model_init: Callable[..., nn.Module], train_dataset: Any, eval_dataset: Any = None,
                data_collator: Callable[[list[Any]], Any] | None = None, *, args: Any = None,
                optimizer_fn: Callable[[Any, float], torch.optim.Optimizer] | None = None,
                metrics: Mapping[str, Callable[[Any, Any], Any]] | None = None, higher_is_better: bool = True,
                name: str | None = None) -> Workload:
    """A batchfit :class:`Workload` for a Hugging Face model (see the module docstring for what is taken from
    ``args``).

    Args:
        model_init: returns a fresh model (``from_config`` or ``from_pretrained``), called once per trial.
        train_dataset, eval_dataset: map-style datasets of dict items (``datasets.Dataset`` or torch datasets),
            DataLoaders or IterableDatasets with a declared size.
        data_collator: e.g. ``DataCollatorWithPadding(tokenizer)`` (default: ``default_data_collator``).
        args: ``TrainingArguments`` (default: Trainer's defaults with ``output_dir="batchfit-hf"``).
        optimizer_fn: ``(params, lr) -> optimizer`` instead of the one Trainer would build from ``args``.
        metrics: name -> ``(outputs, labels) -> batch mean`` (e.g. ``{"accuracy": logits_accuracy}``); without
            metrics trials are ranked on the validation loss.
    """
    if args is None:
        args = transformers.TrainingArguments(output_dir="batchfit-hf", report_to=[])
    if not callable(model_init):
        raise ConfigError(f"model_init must be a function returning a model, got {type(model_init).__name__}")
    models = _Models(functools.partial(_call_init, model_init))
    probe = models.new()
    names = _forward_names(probe) if args.remove_unused_columns else None
    del probe
    collator = data_collator or transformers.default_data_collator
    if names is not None:
        collator = _keep_columns(collator, names)

    def trainer_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        return _trainer_optimizer(args, models.owner(list(params)), lr)

    micro = int(args.per_device_train_batch_size)
    accumulation = int(args.gradient_accumulation_steps)
    return Workload(
        name=name or getattr(model_init, "__name__", "hf-model"),
        model_fn=models.new,
        optimizer_fn=optimizer_fn or trainer_optimizer,
        loss_fn="output",
        forward=_filtered_forward(names),
        train_data=train_dataset,
        val_data=eval_dataset,
        collate_fn=collator,
        metrics=dict(metrics or {}),
        higher_is_better=higher_is_better,
        base_batch_size=micro * accumulation,
        base_lr=float(args.learning_rate),
        micro_batch_size=micro if accumulation > 1 else None,
        grad_clip=float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None,
        lr_schedule=_scheduler(args),
    )


def trainer_workload(trainer: Any, **kwargs: Any) -> Workload:
    """The workload of a ``Trainer`` as built: its ``model_init`` (or a copy of its model per trial), datasets,
    collator and arguments. Keyword arguments go to :func:`hf_workload` (e.g. ``metrics=``)."""
    if trainer.train_dataset is None:
        raise ConfigError("the Trainer has no train_dataset; batchfit needs training data")
    if trainer.model_init is not None:
        model_init = trainer.model_init
    else:
        template = copy.deepcopy(trainer.model).cpu()  # each trial trains a copy; the Trainer's model is untouched
        model_init = functools.partial(copy.deepcopy, template)
    kwargs.setdefault("name", type(trainer.model).__name__)
    return hf_workload(model_init, trainer.train_dataset, trainer.eval_dataset, trainer.data_collator,
                       args=trainer.args, **kwargs)


def _precision(args: Any) -> str:
    return "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"


class BatchfitCallback(TrainerCallback):
    """Size the per-device batch with batchfit's finder when ``Trainer.train()`` starts; keep the effective batch.

    Add it to ``Trainer(callbacks=[...])`` (or call :meth:`attach` for a Trainer that exists). When training
    starts, before the Trainer builds its train dataloader, it builds :func:`trainer_workload`, runs
    :func:`batchfit.find_batch_size` at the Trainer's device and precision, then sets
    ``per_device_train_batch_size`` to the largest micro-batch <= the recommendation whose
    ``gradient_accumulation_steps`` give back the effective batch the arguments asked for (so the LR needs no
    change; :func:`~batchfit.integrations.common.plan_accumulation`). With ``log_noise_scale`` it measures the
    gradient noise scale B_simple (McCandlish et al. 2018) at the effective batch with batchfit's probe and logs
    ``batchfit/b_simple`` when training begins. Results: :attr:`result` (the finder's), :attr:`noise`,
    :attr:`chosen`.

    The finder trains copies of the model; while it runs, the Trainer's own model also occupies memory, so on a
    GPU the size found is conservative by about one copy of the weights.
    """

    def __init__(self, *, memory_budget: int | str | None = None, margin: float = 0.05,
                 keep_effective_batch: bool = True, log_noise_scale: bool = True, noise_steps: int = 20,
                 seed: int = 0) -> None:
        self.memory_budget = memory_budget
        self.margin = margin
        self.keep_effective_batch = keep_effective_batch
        self.log_noise_scale = log_noise_scale
        self.noise_steps = noise_steps
        self.seed = seed
        self.trainer: Any = None
        self.result: Any = None
        self.noise: Any = None
        self.chosen: dict[str, int] | None = None

    def attach(self, trainer: Any) -> BatchfitCallback:
        """Hook into ``trainer``: the sizing runs when ``train()`` asks for its dataloader (at train start)."""
        if self.trainer is trainer:
            return self
        self.trainer = trainer
        original = trainer.get_train_dataloader

        @functools.wraps(original)
        def get_train_dataloader(*a: Any, **kw: Any) -> Any:
            if self.chosen is None:
                self.size(trainer)
            return original(*a, **kw)

        trainer.get_train_dataloader = get_train_dataloader
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = _calling_trainer()
        if trainer is not None:
            self.attach(trainer)

    def size(self, trainer: Any) -> dict[str, int]:
        """Run the finder (and the noise probe) and set the Trainer's batch size and accumulation."""
        from batchfit.finder import find_batch_size
        from batchfit.noise import noise_scale

        args = trainer.args
        workload = trainer_workload(trainer)
        workload.micro_batch_size = None  # the finder sizes the micro-batch itself
        device = next(trainer.model.parameters()).device if trainer.model is not None else args.device
        precision = _precision(args)
        micro_was, accumulation_was = args.per_device_train_batch_size, args.gradient_accumulation_steps
        effective = micro_was * accumulation_was
        self.result = find_batch_size(workload, device=device, precision=precision,
                                      memory_budget=self.memory_budget, margin=self.margin, throughput=False,
                                      seed=self.seed)
        found = self.result.recommended_batch_size
        micro, accumulation = plan_accumulation(effective, found) if self.keep_effective_batch else (found, 1)
        args.per_device_train_batch_size = micro
        args.gradient_accumulation_steps = accumulation
        trainer._train_batch_size = args.train_batch_size  # what Trainer read from the arguments at __init__
        if self.log_noise_scale and micro * accumulation >= 2:
            self.noise = noise_scale(workload, batch_size=micro * accumulation, steps=self.noise_steps,
                                     device=device, precision=precision, seed=self.seed)
        self.chosen = {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation,
                       "effective_batch_size": micro * accumulation, "previous_batch_size": micro_was,
                       "max_batch_size": self.result.max_batch_size,
                       "recommended_batch_size": self.result.recommended_batch_size}
        logger.warning("batchfit: per-device batch %d x accumulation %d = %d (was %d x %d); largest that fits %d",
                       micro, accumulation, micro * accumulation, micro_was, accumulation_was,
                       self.result.max_batch_size)
        return self.chosen

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Log what batchfit measured into the Trainer's ``log_history`` (and its loggers), where Trainer users
        look: the batch it chose and the largest that fits, and B_simple with its 95 % interval (a bound that is
        not finite is left out, never logged as inf)."""
        if self.trainer is None or self.chosen is None:
            return
        logs: dict[str, float] = {f"batchfit/{k}": float(v) for k, v in self.chosen.items() if v is not None}
        if self.noise is not None:
            value = getattr(self.noise, "b_simple", None)
            low, high = getattr(self.noise, "b_simple_ci", (None, None)) or (None, None)
            for key, v in (("b_simple", value), ("b_simple_low", low), ("b_simple_high", high)):
                if isinstance(v, (int, float)) and math.isfinite(v):
                    logs[f"batchfit/{key}"] = float(v)
            logs["batchfit/b_simple_steps"] = float(getattr(self.noise, "steps", 0) or 0)
        self.trainer.log(logs)


def _calling_trainer() -> Any:
    """The Trainer whose ``__init__`` is announcing ``on_init_end`` (found on the call stack: the callback API
    hands callbacks the model and arguments, not the Trainer, and the sizing must run before its dataloader)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, transformers.Trainer):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame
