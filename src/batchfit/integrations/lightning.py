"""Lightning -> batchfit: size the batch with batchfit's finder when ``fit`` starts, keep the effective batch.

::

    from batchfit.integrations.lightning import BatchfitBatchSize

    trainer = L.Trainer(callbacks=[BatchfitBatchSize(memory_budget="2GiB", log_noise_scale=True)],
                        accumulate_grad_batches=1)
    trainer.fit(model, datamodule=dm)      # dm.batch_size (or model.batch_size / hparams.batch_size) is set

What it does, in ``on_fit_start`` (before the first training batch is loaded):

1. Builds a batchfit :class:`~batchfit.Workload` from the LightningModule and the training data: the model's own
   ``training_step`` computes the loss (so whatever the module does in it is what gets measured), its
   ``configure_optimizers()`` gives the optimizer, and the train dataloader's dataset and ``collate_fn`` give the
   batches. Only automatic optimization is supported.
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

import math
import warnings
from typing import Any

import torch
from torch import nn

from batchfit.errors import ConfigError, WorkloadError
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

_PRECISIONS = {"bf16-mixed": "bf16", "bf16": "bf16", "bf16-true": "bf16", "16-mixed": "fp16", "16": "fp16"}


class _TrainingStep(nn.Module):
    """Calls the LightningModule's ``training_step`` on a whole batch; its output *is* the loss."""

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any) -> torch.Tensor:
        trainer = self.module._trainer
        self.module._trainer = None  # self.log() inside training_step becomes a no-op outside Lightning's loop
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*self.log.*")
                out = self.module.training_step(batch, 0)
        finally:
            self.module._trainer = trainer
        if isinstance(out, dict):
            out = out.get("loss")
        if not isinstance(out, torch.Tensor):
            raise WorkloadError(
                "training_step must return the loss (a tensor, or a dict with 'loss') for batchfit to size the batch"
            )
        return out


class _Pairs(torch.utils.data.Dataset):
    """Items as ``(whole item, 0)``: the engine's (input, target) split hands the whole batch to training_step."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.dataset[i], 0


def lightning_workload(module: Any, dataloader: Any, *, name: str | None = None) -> Workload:
    """A batchfit :class:`Workload` that trains ``module`` (a LightningModule) on ``dataloader``'s dataset.

    ``model_fn`` hands back the *same* module (the finder restores its weights after every trial).
    """
    if not getattr(module, "automatic_optimization", True):
        raise ConfigError("batchfit sizes the batch for automatic optimization only; this module optimizes manually")
    dataset = getattr(dataloader, "dataset", None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise ConfigError("the training dataloader must wrap a map-style dataset (with __len__) for batchfit")
    collate = getattr(dataloader, "collate_fn", None) or torch.utils.data.default_collate

    def collate_pairs(items: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        return collate([item for item, _ in items]), torch.zeros(len(items))

    def optimizer_fn(params: Any, lr: float) -> torch.optim.Optimizer:
        opt = module.configure_optimizers()
        if isinstance(opt, dict):
            opt = opt["optimizer"]
        if isinstance(opt, (list, tuple)):
            opt = opt[0]
            if isinstance(opt, (list, tuple)):
                opt = opt[0]
            if isinstance(opt, dict):
                opt = opt["optimizer"]
        if not isinstance(opt, torch.optim.Optimizer):
            raise WorkloadError("configure_optimizers must return an optimizer (alone, first in a list, or in a dict)")
        return opt

    base_opt = optimizer_fn(module.parameters(), 0.0)
    base_lr = float(base_opt.param_groups[0]["lr"])
    del base_opt
    base_batch = int(getattr(dataloader, "batch_size", None) or 1)
    return Workload(
        name=name or type(module).__name__,
        model_fn=lambda: _TrainingStep(module),
        optimizer_fn=optimizer_fn,
        loss_fn=lambda loss, _targets: loss,
        train_data=_Pairs(dataset),
        collate_fn=collate_pairs,
        base_batch_size=base_batch,
        base_lr=base_lr,
    )


def plan_accumulation(effective: int, recommended: int) -> tuple[int, int]:
    """``(micro, accumulation)`` with micro <= recommended and micro x accumulation == effective when a divisor of
    the effective batch is near; otherwise the fewest accumulation steps (micro x accumulation then exceeds the
    effective batch by less than ``accumulation``).

    >>> plan_accumulation(256, 100)
    (64, 4)
    >>> plan_accumulation(32, 100)
    (32, 1)
    >>> plan_accumulation(97, 50)
    (49, 2)
    """
    fewest = max(1, math.ceil(effective / max(1, recommended)))
    for accumulation in range(fewest, 2 * fewest + 1):  # an exact split keeps the batch exactly
        if effective % accumulation == 0:
            return effective // accumulation, accumulation
    return math.ceil(effective / fewest), fewest


class BatchfitBatchSize(Callback):
    """Set the batch size with batchfit's finder when ``fit`` starts; keep the effective batch by accumulation.

    Args:
        memory_budget: e.g. ``"2GiB"``: size for this budget instead of all free memory (enforced on the CPU by
            counting tensor bytes, on CUDA with ``set_per_process_memory_fraction``).
        margin: headroom for the recommended size (default 5 %).
        max_batch_size: never try larger.
        use: ``"recommended"`` (largest with margin) or ``"knee"`` (smallest batch within 5 % of the best measured
            throughput; times a few extra sizes).
        keep_effective_batch: keep ``batch_size x accumulate_grad_batches`` (default) or use the found size alone.
        batch_arg_name: the attribute holding the batch size (model, ``hparams`` or datamodule), as in Lightning.
        log_noise_scale: log ``batchfit/b_simple`` during fit (needs >= 2 accumulated micro-batches).
        seed: the finder's seed.
    """

    def __init__(self, *, memory_budget: int | str | None = None, margin: float = 0.05,
                 max_batch_size: int | None = None, use: str = "recommended", keep_effective_batch: bool = True,
                 batch_arg_name: str = "batch_size", log_noise_scale: bool = False, noise_beta: float = 0.95,
                 seed: int = 0) -> None:
        if use not in ("recommended", "knee"):
            raise ConfigError(f"use must be 'recommended' or 'knee', got {use!r}")
        self.memory_budget = memory_budget
        self.margin = margin
        self.max_batch_size = max_batch_size
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
        workload = lightning_workload(pl_module, dataloader)
        device = pl_module.device
        precision = _PRECISIONS.get(str(trainer.precision), "fp32")
        self.result = find_batch_size(
            workload, device=device, precision=precision, memory_budget=self.memory_budget,
            max_batch_size=self.max_batch_size, margin=self.margin, throughput=self.use == "knee", seed=self.seed,
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


class _NoiseLogger:
    """Per-micro-batch gradient norms inside Lightning's accumulation, fed to batchfit's unbiased estimator
    (:func:`batchfit.noise.unbiased_estimates`) and two bias-corrected moving averages, as ``NoiseCallback`` does
    for batchfit's own loop.

    A leaf's tensor hook sees each backward's gradient before it is added to ``.grad``: with Lightning's loss
    normalisation that is ``g_i / k`` for micro-batch i, i.e. ``(b_i / B) g_i`` for equal micro-batches, the
    quantity the estimator's "small" sum takes. Lightning runs the last micro-batch's backward inside
    ``optimizer.step(closure)``, so the step's micro-batches are closed in ``on_before_optimizer_step``;
    ``on_train_batch_end`` closes only the ones before it. Values are read once per optimizer step (one sync).
    """

    def __init__(self, module: nn.Module, population: int, beta: float) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.handles = [p.register_hook(self._hook) for p in self.params]
        self.population = population
        self.beta = beta
        self.g2 = self.tr = 0.0  # moving averages of the |G|^2 and tr(Sigma) estimates
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
        from batchfit.noise import unbiased_estimates

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
        g2, tr = unbiased_estimates(small, big, k, batch, self.population)
        b = self.beta
        self.g2, self.tr = b * self.g2 + (1 - b) * g2, b * self.tr + (1 - b) * tr
        if not self.g2 > 0:
            return None  # no signal above the noise yet
        value = self.tr / self.g2  # the bias corrections (1 - beta^t) cancel in the ratio
        self.values.append(value)
        return value

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
