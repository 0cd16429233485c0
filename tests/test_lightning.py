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
                            throughput=False, batch_size_cap=64)
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
    cb = BatchfitBatchSize(memory_budget="64MiB", keep_effective_batch=False, batch_size_cap=128)
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


# ---------------------------------------------------------------------------------------------------------------
# The workload from a LightningModule factory and a DataModule (issue 12.4)


class Classifier(L.LightningModule):
    """A module as users write it: a scheduler in configure_optimizers, metrics logged in validation_step."""

    built = 0

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        Classifier.built += 1
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class SplitData(Data):
    def __init__(self, batch_size: int = 16, n: int = 256) -> None:
        super().__init__(batch_size, n)
        self.setups = 0

    def setup(self, stage: str) -> None:
        self.setups += 1
        self.train_ds, self.val_ds = torch.utils.data.random_split(self.ds, [192, 64],
                                                                   torch.Generator().manual_seed(0))

    def train_dataloader(self):  # noqa: ANN201
        return torch.utils.data.DataLoader(self.train_ds, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):  # noqa: ANN201
        return torch.utils.data.DataLoader(self.val_ds, batch_size=32)


def _train(wl, **kw):  # noqa: ANN001, ANN202
    from batchfit.engine import train

    return train(wl, steps=kw.pop("steps", 6), eval_every=kw.pop("eval_every", 3), **kw)


def test_workload_from_factory_and_datamodule() -> None:
    data = SplitData(batch_size=16)
    trainer = L.Trainer(gradient_clip_val=0.5, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    wl = lightning_workload(Classifier, datamodule=data, trainer=trainer)
    assert data.setups == 1 and wl.num_train == 192 and wl.num_val == 64
    assert list(wl.metrics) == ["val_acc"] and wl.higher_is_better  # what validation_step logs; val_loss is the loss
    assert wl.grad_clip == 0.5 and wl.base_batch_size == 32 and wl.micro_batch_size == 16 and wl.base_lr == 0.1
    before = Classifier.built
    a, b = wl.model_fn(), wl.model_fn()
    assert a is not b and Classifier.built == before + 2  # a fresh module per trial
    opt = wl.optimizer_fn(a.parameters(), 0.4)  # batchfit's rule asks for 4x the module's LR
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)
    sched = wl.lr_schedule(opt, 100)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # StepLR(step_size=2, gamma=0.5) on the rescaled LR

    class Keep:
        def on_train_end(self, state, result):  # noqa: ANN001, ANN202
            self.model = state.model

    keep = Keep()
    res = _train(wl, batch_size=32, callbacks=[keep])
    final = res.final
    # what validation_step logs, sample-weighted over the whole validation split, for the trained module
    x, y = (torch.stack(t) for t in zip(*(data.val_ds[i] for i in range(len(data.val_ds)))))
    with torch.no_grad():
        logits = keep.model.net(x)
    assert final["val_metrics"]["val_acc"] == pytest.approx(float((logits.argmax(1) == y).float().mean()), abs=1e-6)
    assert final["val_loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


def test_three_identical_trains_of_an_instance_give_identical_losses() -> None:
    """The bug of issue 12.4: every trial continued from the previous trial's weights (2.18 -> 1.26 -> 0.60)."""
    torch.manual_seed(0)
    module = Net()
    initial = [p.detach().clone() for p in module.parameters()]
    wl = lightning_workload(module, Data(batch_size=32).train_dataloader())
    losses = [[h["train_loss"] for h in _train(wl, batch_size=32, steps=8, eval_every=4).history] for _ in range(3)]
    assert losses[0] == losses[1] == losses[2] and losses[0][-1] < losses[0][0]
    for a, b in zip(initial, module.parameters(), strict=True):  # the user's instance is never trained
        assert torch.equal(a, b)


def test_validation_data_makes_tune_recommend(tmp_path) -> None:  # noqa: ANN001
    from batchfit.tuning import tune

    wl = lightning_workload(Classifier, datamodule=SplitData(batch_size=16))
    result = tune(wl, out_dir=tmp_path, batch_sizes=[16, 64], budget="steps:12", lr_search=1, noise=False,
                  find=False, precision_check=False, lr_calibration=False, seed=0)
    assert result.recommendation is not None


class EpochScheduled(Classifier):
    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]  # interval "epoch" by default


def test_an_epoch_interval_scheduler_steps_once_per_pass_over_the_training_samples() -> None:
    wl = lightning_workload(EpochScheduled, datamodule=SplitData(batch_size=16))  # 192 training samples
    model = wl.model_fn().train()
    opt = wl.optimizer_fn(model.parameters(), 0.2)
    sched = wl.lr_schedule(opt, 100)
    x, y = SplitData().ds.tensors
    lrs = []
    for _ in range(12):  # batches of 32: 6 optimizer steps per epoch
        wl.forward(model, (x[:32], y[:32]))
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.2] * 5 + [0.1] * 6 + [0.05])


# ---------------------------------------------------------------------------------------------------------------
# Issue 23, items 5 and 7: hints that point at the fix; a module instance, on_before_optimizer_step, the interval


def test_a_datamodule_class_or_a_datamodule_as_data_says_pass_an_instance() -> None:
    from batchfit import Workload
    from batchfit.errors import WorkloadError

    with pytest.raises(ConfigError, match=r"datamodule=SplitData is the class; pass an instance as datamodule=: "
                                          r"datamodule=SplitData\(\.\.\.\)"):
        lightning_workload(Classifier, datamodule=SplitData)
    with pytest.raises(ConfigError, match=r"train_dataloader got the LightningDataModule SplitData; pass an instance "
                                          r"as datamodule="):
        lightning_workload(Classifier, SplitData())
    wl = Workload(name="dm", model_fn=lambda: nn.Linear(8, 3), optimizer_fn=lambda p, lr: torch.optim.SGD(p, lr=lr),
                  loss_fn=F.cross_entropy, train_data=SplitData())
    with pytest.raises(WorkloadError, match=r"train_data is the LightningDataModule SplitData, not a dataset; pass "
                                            r"an instance as datamodule="):
        wl.validate()


def test_a_module_instance_is_said_not_to_be_reproducible_and_a_factory_is_not() -> None:
    with pytest.warns(UserWarning, match=r"module instance, built before batchfit seeds anything: .*pass a factory"):
        wl = lightning_workload(Classifier(), datamodule=SplitData())
    assert "seed/--seed neither reproduces" in wl.description  # in the sweep's stored config and results
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert lightning_workload(Classifier, datamodule=SplitData()).description == ""


class Hooked(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.before_step: list[float] = []

    def on_before_optimizer_step(self, optimizer):  # noqa: ANN001, ANN201
        norm = sum(float(p.grad.norm()) for p in self.parameters() if p.grad is not None)
        self.before_step.append(norm)  # gradients are there: after backward, before the step
        self.log("grad_norm", norm)  # self.log outside a Trainer is captured, not an error


def test_on_before_optimizer_step_is_called_before_every_optimizer_step() -> None:
    seen: list[Hooked] = []

    def make() -> Hooked:
        seen.append(Hooked())
        return seen[-1]

    trainer = L.Trainer(accumulate_grad_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    wl = lightning_workload(make, datamodule=SplitData(batch_size=16), trainer=trainer)
    res = _train(wl, batch_size=32, steps=5, eval_every=5)
    hooked = [m for m in seen if m.before_step]
    assert res.steps == 5 and len(hooked) == 1 and len(hooked[0].before_step) == 5  # once per step, not per micro
    assert all(n > 0 for n in hooked[0].before_step)


def test_the_scheduler_is_said_to_step_as_it_steps() -> None:
    from batchfit.recommend import _pytorch_snippet

    per_epoch = _train(lightning_workload(EpochScheduled, datamodule=SplitData(batch_size=16)), batch_size=16)
    per_step = _train(lightning_workload(Classifier, datamodule=SplitData(batch_size=16)), batch_size=16)
    assert per_epoch.lr_schedule == "StepLR, stepped every epoch (Lightning interval 'epoch', frequency 1)"
    assert per_step.lr_schedule == "StepLR, stepped every optimizer step (Lightning interval 'step', frequency 1)"
    rec = {"lr": 0.1, "batch_size": 16, "micro_batch_size": 16, "accumulation_steps": 1,
           "lr_schedule": per_epoch.lr_schedule}
    snippet = _pytorch_snippet(rec)
    assert "stepped every epoch" in snippet and "after every optimizer step" not in snippet
