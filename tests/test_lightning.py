"""The Lightning callback: batchfit's finder sizes the batch at fit start; the effective batch is kept."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from batchfit.errors import ConfigError  # noqa: E402
from batchfit.finder import find_batch_size  # noqa: E402
from batchfit.integrations.lightning import (  # noqa: E402
    BatchfitBatchSize,
    lightning_workload,
    plan_accumulation,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Net(L.LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 3))
        self.automatic_optimization = not manual
        self.batch_sizes_seen: list[int] = []

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        self.batch_sizes_seen.append(len(x))
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Data(L.LightningDataModule):
    def __init__(self, batch_size: int = 64, n: int = 256) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 8, generator=g)
        self.ds = torch.utils.data.TensorDataset(x, (x @ torch.randn(8, 3, generator=g)).argmax(1))

    def train_dataloader(self):  # noqa: ANN201
        return torch.utils.data.DataLoader(self.ds, batch_size=self.batch_size, shuffle=True)


def _trainer(*callbacks: object, **kwargs: object) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kwargs)


class _Weights(L.Callback):
    """Runs after batchfit's callback in on_fit_start: the weights the fit starts from."""

    def on_fit_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
        self.start = [p.detach().clone() for p in pl_module.parameters()]
        pl_module.batch_sizes_seen.clear()  # forget the finder's probes: from here on it is the fit itself


def test_callback_sizes_batch_keeps_effective_batch_and_logs_noise_scale() -> None:
    torch.manual_seed(0)
    model, data = Net(), Data(batch_size=64)
    initial = [p.detach().clone() for p in model.parameters()]
    # a budget in which about 24 samples fit (from the memory model batchfit fits at a generous budget)
    probe = find_batch_size(lightning_workload(model, data.train_dataloader()), memory_budget="64MiB",
                            throughput=False, max_batch_size=64)
    mm = probe.memory_model
    budget = int(mm["fixed_bytes"] + 24 * mm["per_sample_bytes"])
    cb, weights = BatchfitBatchSize(memory_budget=budget, log_noise_scale=True), _Weights()
    trainer = _trainer(cb, weights)
    trainer.fit(model, datamodule=data)

    micro, accumulation = cb.chosen["batch_size"], cb.chosen["accumulate_grad_batches"]
    assert cb.result.max_batch_size < 64 and micro <= cb.result.recommended_batch_size
    assert accumulation >= 2 and micro * accumulation == 64  # the effective batch is kept
    assert data.batch_size == micro and trainer.accumulate_grad_batches == accumulation
    assert set(model.batch_sizes_seen) == {micro} | ({256 % micro} - {0})  # the dataloader uses it
    assert trainer.global_step == math.ceil(256 / micro / accumulation)
    for a, b in zip(initial, weights.start, strict=True):  # the finder left the weights as they were
        assert torch.equal(a, b)
    # B_simple was logged from the accumulated micro-batches
    assert cb._noise is None and math.isfinite(float(trainer.callback_metrics["batchfit/b_simple"]))
    assert float(trainer.callback_metrics["batchfit/b_simple"]) > 0


def test_plenty_of_memory_and_not_keeping_the_batch() -> None:
    model, data = Net(), Data(batch_size=16)
    cb = BatchfitBatchSize(memory_budget="64MiB", keep_effective_batch=False, max_batch_size=128)
    trainer = _trainer(cb, accumulate_grad_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
    assert cb.result.max_batch_size == 128 and data.batch_size == cb.result.recommended_batch_size
    assert trainer.accumulate_grad_batches == 1


def test_plan_accumulation() -> None:
    assert plan_accumulation(64, 24) == (16, 4)
    assert plan_accumulation(64, 64) == (64, 1)
    assert plan_accumulation(64, 1000) == (64, 1)
    assert plan_accumulation(97, 50) == (49, 2)  # prime: the fewest steps, batch rounded up by < accumulation
    micro, acc = plan_accumulation(100, 7)
    assert micro <= 7 and micro * acc >= 100


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="'recommended' or 'knee'"):
        BatchfitBatchSize(use="largest")

    class NoBatchAttr(L.LightningDataModule):
        def train_dataloader(self):  # noqa: ANN201
            return Data().train_dataloader()

    with pytest.raises(ConfigError, match="no 'batch_size' attribute"):
        _trainer(BatchfitBatchSize()).fit(Net(), datamodule=NoBatchAttr())
    with pytest.raises(ConfigError, match="manually"):
        lightning_workload(Net(manual=True), Data().train_dataloader())
