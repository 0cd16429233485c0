from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit.demos import ArrayDataset
from batchfit.engine import TrainResult, evaluate, train
from batchfit.errors import ConfigError, DataError, WorkloadError
from conftest import make_tiny_workload


class GradCapture:
    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, state) -> None:  # noqa: ANN001
        self.grads.append([p.grad.detach().clone() for p in state.model.parameters()])

    def on_step_end(self, state) -> None:  # noqa: ANN001
        self.lrs.append(state.optimizer.param_groups[0]["lr"])


def _first_step_grads(wl, batch_size: int, micro: int, drop_last: bool = True) -> list[torch.Tensor]:
    cap = GradCapture()
    train(wl, batch_size=batch_size, micro_batch_size=micro, steps=1, seed=3, callbacks=[cap], drop_last=drop_last)
    return cap.grads[0]


def _rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = math.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b)))
    den = math.sqrt(sum(float((y**2).sum()) for y in b))
    return num / den


@pytest.mark.parametrize("micro", [1, 3, 5, 10])  # 3 -> 3+3+3+1 and 4 -> uneven: the last micro-batch is smaller
def test_accumulated_gradient_equals_big_batch_float64(micro: int) -> None:
    wl = make_tiny_workload(dtype=torch.float64)
    big = _first_step_grads(wl, 10, 10)
    acc = _first_step_grads(wl, 10, micro)
    assert _rel_diff(acc, big) <= 1e-6


def test_accumulated_gradient_equals_big_batch_float32_uneven() -> None:
    wl = make_tiny_workload(dtype=torch.float32)
    big = _first_step_grads(wl, 22, 22)
    acc = _first_step_grads(wl, 22, 4)  # 4+4+4+4+4+2
    assert _rel_diff(acc, big) <= 1e-5


def test_uneven_last_batch_without_drop_last_is_exact() -> None:
    # 96 samples, batch 40: the third batch has 16 samples; accumulation must weight it by its own size.
    wl = make_tiny_workload(dtype=torch.float64)
    cap_big, cap_acc = GradCapture(), GradCapture()
    train(wl, batch_size=40, steps=3, seed=1, drop_last=False, callbacks=[cap_big])
    train(wl, batch_size=40, micro_batch_size=7, steps=3, seed=1, drop_last=False, callbacks=[cap_acc])
    for a, b in zip(cap_acc.grads, cap_big.grads):
        assert _rel_diff(a, b) <= 1e-6


def test_accumulation_trains_like_big_batch() -> None:
    wl = make_tiny_workload(dtype=torch.float64)
    r1 = train(wl, batch_size=16, epochs=2, seed=0)
    r2 = train(wl, batch_size=16, micro_batch_size=5, epochs=2, seed=0)
    assert r2.accumulation_steps == 4
    assert r1.history[-1]["val_loss"] == pytest.approx(r2.history[-1]["val_loss"], rel=1e-9)


def test_same_seed_same_result_different_seed_differs(tiny_workload) -> None:
    a = train(tiny_workload, batch_size=8, epochs=2, seed=5)
    b = train(tiny_workload, batch_size=8, epochs=2, seed=5)
    c = train(tiny_workload, batch_size=8, epochs=2, seed=6)
    losses = lambda r: [(h["train_loss"], h["val_loss"]) for h in r.history]  # noqa: E731
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)


def test_regimes_sgd_minibatch_fullbatch(tiny_workload) -> None:
    n = tiny_workload.num_train
    r1 = train(tiny_workload, batch_size=1, epochs=1, lr_rule="none")
    assert r1.steps == n
    rm = train(tiny_workload, batch_size=32, epochs=2)
    assert rm.steps == 2 * (n // 32)
    rf = train(tiny_workload, batch_size=n, epochs=3)
    assert rf.steps == 3 and rf.epochs == 3
    for r in (r1, rm, rf):
        assert not r.diverged
        assert all(math.isfinite(h["val_loss"]) for h in r.history)


def test_drop_last_policy(tiny_workload) -> None:
    r = train(tiny_workload, batch_size=40, epochs=1, drop_last=True)
    assert r.steps == 2 and r.samples == 80
    r = train(tiny_workload, batch_size=40, epochs=1, drop_last=False)
    assert r.steps == 3 and r.samples == 96
    with pytest.raises(ConfigError, match="larger than the training set"):
        train(tiny_workload, batch_size=97, epochs=1, drop_last=True)


def test_steps_budget_and_eval_every(tiny_workload) -> None:
    r = train(tiny_workload, batch_size=8, steps=30, eval_every=5)
    assert r.steps == 30
    assert [h["step"] for h in r.history] == [5, 10, 12, 15, 20, 24, 25, 30]
    assert r.history[-1]["epoch"] == pytest.approx(30 / 12, abs=1e-3)


def test_lr_rules_applied_and_warmup_schedule() -> None:
    wl = make_tiny_workload(lr=0.1, base_batch_size=16)
    assert train(wl, batch_size=64, steps=1).lr == pytest.approx(0.4)  # SGD -> linear
    assert train(wl, batch_size=64, steps=1, lr_rule="sqrt").lr == pytest.approx(0.2)
    assert train(wl, batch_size=64, steps=1, lr=0.05).lr_rule == "fixed"
    wa = make_tiny_workload(lr=1e-3, base_batch_size=16, optimizer="adam")
    r = train(wa, batch_size=64, steps=1)
    assert r.lr_rule == "adam-sqrt" and r.lr == pytest.approx(2e-3)
    cap = GradCapture()
    r = train(wl, batch_size=16, steps=6, warmup=4, callbacks=[cap])
    assert r.warmup_steps == 4
    assert cap.lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert train(wl, batch_size=16, steps=10, warmup=0.3).warmup_steps == 3


def test_divergence_is_flagged_not_raised() -> None:
    wl = make_tiny_workload(lr=50.0)
    wl.model_fn = lambda: nn.Linear(8, 3)
    wl.loss_fn = lambda out, y: ((out - F.one_hot(y, 3).float()) ** 2).mean()  # SGD on MSE blows up at this LR
    wl.metrics = {}
    r = train(wl, batch_size=8, epochs=3)
    assert r.diverged and r.diverged_at_step is not None
    assert r.steps < 3 * 12


def test_generalization_gap_and_throughput(tiny_workload) -> None:
    r = train(tiny_workload, batch_size=16, epochs=2)
    for h in r.history:
        assert h["generalization_gap"] == pytest.approx(h["val_loss"] - h["train_eval_loss"])
        assert h["samples_per_s"] > 0
    assert r.peak_memory_bytes and r.peak_memory_bytes > 0
    assert r.samples_per_s > 0
    d = r.to_dict()
    for key in ("workload", "batch_size", "micro_batch_size", "accumulation_steps", "lr", "lr_rule", "precision",
                "history", "peak_memory_bytes", "diverged", "seconds"):
        assert key in d


def test_train_result_round_trips_through_its_json_form(tiny_workload) -> None:
    r = train(tiny_workload, batch_size=16, epochs=2, warmup=2)
    d = r.to_dict()
    assert r.extras and set(r.extras) <= set(d)  # what the run added (train_eval_samples, ...) is in the JSON
    again = TrainResult.from_dict(json.loads(json.dumps(d)))
    assert again == r and again.to_dict() == d and list(again.to_dict()) == list(d)
    assert again.final == r.final and again.history is not d["history"]
    newer = dict(d, from_a_newer_batchfit=[1, 2])  # an unknown key survives, in extras
    assert TrainResult.from_dict(newer).to_dict() == newer
    with pytest.raises(ConfigError, match="needs batch_size"):
        TrainResult.from_dict({k: v for k, v in d.items() if k != "batch_size"})


def test_bf16_on_cpu_trains(tiny_workload) -> None:
    r = train(tiny_workload, batch_size=16, epochs=1, precision="bf16")
    assert not r.diverged and r.precision == "bf16"


def test_bad_arguments(tiny_workload) -> None:
    with pytest.raises(ConfigError, match="fp16"):
        train(tiny_workload, precision="fp16")
    with pytest.raises(ConfigError, match="unknown precision"):
        train(tiny_workload, precision="fp8")
    with pytest.raises(ConfigError, match="positive integer"):
        train(tiny_workload, batch_size=0)
    with pytest.raises(ConfigError, match="positive integer"):
        train(tiny_workload, batch_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="micro_batch_size 9 is larger than batch_size 8"):
        train(tiny_workload, batch_size=8, micro_batch_size=9)
    with pytest.raises(ConfigError, match="unknown lr_rule"):
        train(tiny_workload, lr_rule="cubic")
    with pytest.raises(ConfigError, match="either epochs or steps"):
        train(tiny_workload, epochs=1, steps=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the request is valid here")
def test_cuda_without_cuda_is_a_config_error(tiny_workload) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(tiny_workload, device="cuda")


def test_non_scalar_loss_is_a_workload_error(tiny_workload) -> None:
    tiny_workload.loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="none")
    with pytest.raises(WorkloadError, match="scalar"):
        train(tiny_workload, steps=1)


def test_nan_data_is_a_data_error() -> None:
    wl = make_tiny_workload()
    x, y = wl.train_data.tensors
    x = x.clone()
    x[7, 2] = float("nan")
    wl.train_data = ArrayDataset(x, y)
    with pytest.raises(DataError, match="NaN"):
        train(wl, steps=1)


def test_nan_in_generic_dataset_caught_at_first_bad_batch() -> None:
    wl = make_tiny_workload()
    x, y = wl.train_data.tensors
    x = x.clone()
    x[:, 0] = float("nan")

    class ListDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int):  # noqa: ANN204
            return x[i], y[i]

    wl.train_data = ListDataset()
    with pytest.raises(DataError, match="NaN"):
        train(wl, steps=1)


def test_factory_errors_are_workload_errors(tiny_workload) -> None:
    tiny_workload.model_fn = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(WorkloadError, match="model_fn raised RuntimeError: boom"):
        train(tiny_workload, steps=1)


class _EvalOOMModel(nn.Module):
    """Raises an OOM in evaluation for batches above 8 samples (training batches never exceed 8 here)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)
        self.eval_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.eval_sizes.append(len(x))
            if len(x) > 8:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.lin(x)


def test_eval_oom_shrinks_only_the_eval_batch(tiny_workload) -> None:
    model = _EvalOOMModel()
    tiny_workload.model_fn = lambda: model
    r = train(tiny_workload, batch_size=8, epochs=1, eval_batch_size=32)
    assert r.batch_size == 8 and r.micro_batch_size == 8 and not r.diverged
    assert model.eval_sizes[:3] == [32, 16, 8]
    loss, metrics, used = evaluate(tiny_workload, model, tiny_workload.val_data, batch_size=32,
                                   device=torch.device("cpu"))
    assert used == 8 and math.isfinite(loss)


# ---------------------------------------------------------------------------------------------------------------
# Issue 19.5: the generalization gap is val loss minus the training loss on a fixed subset, in eval mode


class _Snapshots:
    """Keeps a copy of the model at every evaluation, with the record the engine wrote."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict, dict]] = []

    def on_evaluate(self, state, record) -> None:  # noqa: ANN001
        self.seen.append(({k: v.detach().clone() for k, v in state.model.state_dict().items()}, dict(record)))


def _dropout_workload():  # noqa: ANN202
    wl = make_tiny_workload(n=96, n_val=40)
    wl.model_fn = lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.6), nn.Linear(32, 3))
    return wl


def test_the_gap_is_val_loss_minus_the_eval_mode_loss_on_a_fixed_training_subset() -> None:
    """Each record's train_eval_loss is the model of that evaluation, in eval mode, on the first min(num_val,
    num_train, 1024) training samples (the same ones every time); the gap is val_loss minus it. With dropout the
    running (train-mode) loss differs from it, and is kept under train_loss."""
    wl = _dropout_workload()
    snaps = _Snapshots()
    r = train(wl, batch_size=8, epochs=2, eval_every=5, seed=1, callbacks=[snaps])
    assert r.to_dict()["train_eval_samples"] == 40  # min(40 val, 96 train, 1024)
    x, y = wl.train_data.tensors
    xv, yv = wl.val_data.tensors
    model = wl.model_fn()
    assert len(snaps.seen) >= 4
    for weights, rec in snaps.seen:
        model.load_state_dict(weights)
        model.eval()
        with torch.no_grad():
            fit = float(F.cross_entropy(model(x[:40]), y[:40]))
            val = float(F.cross_entropy(model(xv), yv))
            acc = float((model(x[:40]).argmax(1) == y[:40]).float().mean())
        assert rec["train_eval_loss"] == pytest.approx(fit, rel=1e-5)
        assert rec["train_eval_metrics"]["accuracy"] == pytest.approx(acc)
        assert rec["val_loss"] == pytest.approx(val, rel=1e-5)
        assert rec["generalization_gap"] == pytest.approx(rec["val_loss"] - rec["train_eval_loss"])
        assert abs(rec["train_loss"] - rec["train_eval_loss"]) > 1e-3  # dropout + a lagging model: not the same
    assert [h["train_eval_loss"] for h in r.history] == [rec["train_eval_loss"] for _, rec in snaps.seen]


def test_the_training_subset_changes_nothing_in_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """The subset is read before the run is seeded, and evaluated in eval mode under no_grad: the trained weights
    equal those of a run that reads nothing for it (even with a sampler that draws from torch's global generator,
    and dropout drawing from it during training), and do not depend on the evaluations."""
    from batchfit import engine

    def workload():  # noqa: ANN202
        wl = _dropout_workload()
        x, y = wl.train_data.tensors
        wl.train_data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8,
                                                    sampler=torch.utils.data.SubsetRandomSampler(range(80)))
        return wl

    a, b, c = _Snapshots(), _Snapshots(), _Snapshots()
    train(workload(), batch_size=8, steps=12, eval_every=4, seed=2, callbacks=[a])
    wl_noval = workload()
    wl_noval.val_data = None
    r = train(wl_noval, batch_size=8, steps=12, eval_every=6, seed=2, callbacks=[b])
    assert r.to_dict()["train_eval_samples"] == 80  # min(512 without validation data, 80 in the split, 1024)
    assert b.seen[-1][1]["train_eval_loss"] is not None and b.seen[-1][1]["generalization_gap"] is None
    x, y = workload().train_data.dataset.tensors
    monkeypatch.setattr(engine, "train_eval_subset", lambda wl, bs=256: engine._HeldBatches([(x[:2], y[:2])]))
    train(workload(), batch_size=8, steps=12, eval_every=4, seed=2, callbacks=[c])
    for k, v in a.seen[-1][0].items():
        assert torch.equal(v, b.seen[-1][0][k]), k
        assert torch.equal(v, c.seen[-1][0][k]), k


def test_the_training_subset_is_the_same_samples_for_a_shuffling_sampler() -> None:
    """A DataLoader whose sampler draws from torch's global generator (a SubsetRandomSampler defining the training
    split) gives the same subset every run, inside the split, and leaves the global generator as it was."""
    from batchfit.engine import train_eval_subset

    wl = make_tiny_workload(n=96, n_val=16)
    x, y = wl.train_data.tensors
    ds = torch.utils.data.TensorDataset(x, y)
    split = list(range(10, 90))
    wl.train_data = torch.utils.data.DataLoader(ds, batch_size=8,
                                                sampler=torch.utils.data.SubsetRandomSampler(split))
    torch.manual_seed(123)
    first = train_eval_subset(wl, batch_size=6)
    state = torch.get_rng_state()
    torch.manual_seed(999)
    second = train_eval_subset(wl, batch_size=6)
    torch.manual_seed(999)
    third = train_eval_subset(wl, batch_size=6)  # the global generator state does not matter
    torch.manual_seed(123)
    train_eval_subset(wl, batch_size=6)
    assert torch.equal(torch.get_rng_state(), state)  # untouched
    xs = torch.cat([b[0] for b in first.batches])
    assert first.num_samples == 16 and len(xs) == 16
    assert torch.equal(xs, torch.cat([b[0] for b in second.batches]))
    assert torch.equal(xs, torch.cat([b[0] for b in third.batches]))
    rows = [int((x == row).all(dim=1).nonzero()[0]) for row in xs]
    assert all(10 <= i < 90 for i in rows) and len(set(rows)) == 16
    # after an evaluation OOM halves the batch, the same samples in the same order
    assert torch.equal(torch.cat([b[0] for b, _ in first.epoch(4, generator=torch.Generator(), drop_last=False)]),
                       xs)
