"""The one training step (batchfit.step) and the workload contract it implements, through the step and `train`."""

from __future__ import annotations

import json
import math
import os
import signal
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit import memory
from batchfit.data import source_for
from batchfit.demos import ArrayDataset
from batchfit.engine import train
from batchfit.errors import ConfigError, DataError, WorkloadError
from batchfit.loading import load_workload
from batchfit.step import LossMeter, LRSchedule, TrainStep, run_batch
from batchfit.workload import Workload, accuracy
from conftest import make_tiny_workload

CPU = torch.device("cpu")


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _one_step(wl: Workload, micro: int | None, clip: float | None, batch_size: int = 22):
    """One optimizer step of TrainStep on the first batch of a seeded epoch; (grads before clipping, params after)."""
    torch.manual_seed(0)
    model = wl.model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen: list[list[torch.Tensor]] = []
    step = TrainStep(wl, model, opt, device=CPU, micro_batch_size=micro, grad_clip=clip,
                     before_step=[lambda s: seen.append([p.grad.clone() for p in s.model.parameters()])],
                     losses=LossMeter(CPU))
    batch, count = next(source_for(wl.train_data).epoch(batch_size, generator=torch.Generator().manual_seed(1),
                                                        drop_last=True))
    step(batch, count)
    return seen[0], _params(model), step.losses.take()


# ---------------------------------------------------------------------------------------------------------------
# Accumulation and clipping


@pytest.mark.parametrize("micro", [1, 4, 5, 21])  # 22 = 5+5+5+5+2: the last micro-batch is smaller
def test_accumulation_is_exact_through_the_step_with_clipping(micro: int) -> None:
    wl = make_tiny_workload(dtype=torch.float64)
    g_big, p_big, (l_big, n_big) = _one_step(wl, None, clip=0.05)
    g_acc, p_acc, (l_acc, n_acc) = _one_step(wl, micro, clip=0.05)
    assert _max_diff(g_acc, g_big) < 1e-12  # the gradient the hooks see (before clipping)
    assert _max_diff(p_acc, p_big) < 1e-12  # the clipped update
    assert n_acc == n_big == 22 and l_acc == pytest.approx(l_big, rel=1e-12)
    g_free, p_free, _ = _one_step(wl, micro, clip=None)
    assert _max_diff(p_free, p_acc) > 1e-4  # the clip mattered


def test_grad_clip_is_honoured_and_measured_before_clipping() -> None:
    wl = make_tiny_workload(dtype=torch.float64)
    torch.manual_seed(0)
    before = _params(wl.model_fn())
    clip = 0.05
    grads, after, _ = _one_step(wl, 4, clip=clip)
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    assert norm > clip  # the hook saw the unclipped gradient
    update = [(b - a) / 0.5 for a, b in zip(after, before)]  # SGD: p -= lr * clipped grad
    update_norm = math.sqrt(sum(float((u**2).sum()) for u in update))
    assert update_norm == pytest.approx(clip, rel=1e-5)
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6)
    assert _max_diff(update, [g * (clip / (norm + 1e-6)) for g in grads]) < 1e-12


def test_train_grad_clip_from_the_workload_and_overridden() -> None:
    wl = make_tiny_workload(dtype=torch.float64)
    plain = train(wl, batch_size=16, steps=3, seed=2)
    wl.grad_clip = 0.01
    clipped = train(wl, batch_size=16, steps=3, seed=2)
    explicit = train(make_tiny_workload(dtype=torch.float64), batch_size=16, steps=3, seed=2, grad_clip=0.01)
    assert clipped.grad_clip == 0.01 and plain.grad_clip is None
    assert clipped.history[-1]["val_loss"] == pytest.approx(explicit.history[-1]["val_loss"], rel=1e-12)
    assert clipped.history[-1]["val_loss"] != pytest.approx(plain.history[-1]["val_loss"], rel=1e-6)


def test_train_accumulation_with_clipping_matches_the_big_batch() -> None:
    wl = make_tiny_workload(dtype=torch.float64)
    a = train(wl, batch_size=22, steps=6, seed=4, grad_clip=0.05, drop_last=False)
    b = train(wl, batch_size=22, micro_batch_size=5, steps=6, seed=4, grad_clip=0.05, drop_last=False)
    assert b.accumulation_steps == 5
    assert a.history[-1]["val_loss"] == pytest.approx(b.history[-1]["val_loss"], rel=1e-10)
    assert a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"], rel=1e-10)


def test_workload_micro_batch_size_is_the_default_accumulation() -> None:
    wl = make_tiny_workload()
    wl.micro_batch_size = 5
    r = train(wl, batch_size=16, steps=1)
    assert (r.micro_batch_size, r.accumulation_steps) == (5, 4)
    assert train(wl, batch_size=4, steps=1).micro_batch_size == 4  # capped at the batch
    assert train(wl, batch_size=16, micro_batch_size=8, steps=1).accumulation_steps == 2


# ---------------------------------------------------------------------------------------------------------------
# The workload contract: dict batches, keyword forward, targets, loss from the output


class DictData(torch.utils.data.Dataset):
    """Items are dicts, as a tokenizer pipeline gives them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "attention_mask": torch.ones(()), "labels": self.y[i]}


class KeywordNet(nn.Module):
    def __init__(self, features: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, classes))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids) * attention_mask[:, None]


def _dict_workload(**fields) -> Workload:  # noqa: ANN003
    base = make_tiny_workload()
    (xt, yt), (xv, yv) = base.train_data.tensors, base.val_data.tensors
    kw = {"name": "dicts", "model_fn": KeywordNet, "optimizer_fn": base.optimizer_fn, "loss_fn": F.cross_entropy,
          "train_data": DictData(xt, yt), "val_data": DictData(xv, yv), "metrics": {"accuracy": accuracy},
          "base_batch_size": 16, "base_lr": 0.1, "forward": ("input_ids", "attention_mask")}
    kw.update(fields)
    return Workload(**kw)


def test_dict_batches_with_a_keyword_forward_train_like_pairs() -> None:
    pairs = make_tiny_workload()
    pairs.model_fn = lambda: _PairWrap(KeywordNet())
    r_pairs = train(pairs, batch_size=16, epochs=2, micro_batch_size=5)
    r_dict = train(_dict_workload(), batch_size=16, epochs=2, micro_batch_size=5)
    r_fn = train(_dict_workload(forward=lambda m, b: m(b["input_ids"], b["attention_mask"]),
                                targets=lambda b: b["labels"]), batch_size=16, epochs=2, micro_batch_size=5)
    r_key = train(_dict_workload(targets="labels"), batch_size=16, epochs=2, micro_batch_size=5)
    def flat(r):  # noqa: ANN001, ANN202
        return [v for h in r.history for v in (h["train_loss"], h["val_loss"], h["val_metrics"]["accuracy"])]

    assert len(r_pairs.history) == 2
    for r in (r_dict, r_fn, r_key):
        assert flat(r) == pytest.approx(flat(r_pairs), rel=1e-6)


class _PairWrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, torch.ones(len(x)))


@dataclass
class HFLikeOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


class HFLikeModel(nn.Module):
    """Keyword forward; computes its own loss when given labels (Hugging Face style)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = KeywordNet()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):  # noqa: ANN201
        logits = self.net(input_ids, attention_mask)
        return HFLikeOutput(None if labels is None else F.cross_entropy(logits, labels), logits)


def test_loss_read_from_an_hf_like_output() -> None:
    wl = _dict_workload(model_fn=HFLikeModel, forward=None, loss_fn="output",
                        metrics={"accuracy": lambda out, y: accuracy(out.logits, y)})
    r = train(wl, batch_size=16, epochs=2, micro_batch_size=5)
    ref = train(_dict_workload(), batch_size=16, epochs=2, micro_batch_size=5)
    assert [h["val_loss"] for h in r.history] == pytest.approx([h["val_loss"] for h in ref.history], rel=1e-6)
    assert r.history[-1]["val_metrics"]["accuracy"] == pytest.approx(ref.history[-1]["val_metrics"]["accuracy"])
    # a mapping output works too; an output without a loss is a one-line workload error
    model = HFLikeModel()
    batch = {"input_ids": torch.randn(4, 8), "attention_mask": torch.ones(4), "labels": torch.tensor([0, 1, 2, 0])}
    loss, _, targets = run_batch(_dict_workload(forward=lambda m, b: {"loss": m(**b).loss}, loss_fn="output"),
                                 model, batch)
    assert loss.dim() == 0 and torch.equal(targets, batch["labels"])
    with pytest.raises(WorkloadError, match="has no .loss"):
        run_batch(wl, model, {k: v for k, v in batch.items() if k != "labels"})


def test_batches_that_fit_no_default_need_a_forward() -> None:
    wl = make_tiny_workload()
    with pytest.raises(WorkloadError, match="Set Workload.forward"):
        run_batch(wl, wl.model_fn(), (torch.randn(2, 8), torch.zeros(2), torch.zeros(2)))
    with pytest.raises(DataError, match="no key"):
        run_batch(_dict_workload(forward=("input_ids", "mask")), KeywordNet(), DictData(
            torch.randn(2, 8), torch.zeros(2, dtype=torch.long))[0] | {})


@pytest.mark.parametrize(("field", "value", "msg"), [
    ("forward", 123, "forward must be"),
    ("forward", ["a", 1], "forward must be"),
    ("targets", 5, "targets must be"),
    ("loss_fn", "outputs", "loss_fn must be callable"),
    ("lr_schedule", "cosine", "lr_schedule must be a function"),
    ("grad_clip", -1.0, "grad_clip must be a positive number"),
    ("grad_clip", "1.0", "grad_clip must be a number"),
    ("micro_batch_size", 0, "micro_batch_size must be a positive integer"),
])
def test_contract_fields_are_validated(field: str, value: object, msg: str) -> None:
    wl = make_tiny_workload()
    setattr(wl, field, value)
    with pytest.raises(WorkloadError, match=msg):
        load_workload(wl)


# ---------------------------------------------------------------------------------------------------------------
# Learning rate: set at the top of the step; warm-up x the user's schedule


class LRLog:
    def __init__(self) -> None:
        self.before: list[float] = []
        self.state_lr: list[float] = []
        self.deltas: list[float] = []
        self._p: torch.Tensor | None = None
        self._g: torch.Tensor | None = None

    def on_before_optimizer_step(self, state) -> None:  # noqa: ANN001
        self.before.append(state.optimizer.param_groups[0]["lr"])
        self.state_lr.append(state.lr)
        p = next(state.model.parameters())
        self._p, self._g = p.detach().clone(), p.grad.detach().clone()

    def on_step_end(self, state) -> None:  # noqa: ANN001
        p = next(state.model.parameters()).detach()
        # SGD without momentum: p_new = p - lr * g, so the LR the step really used is (p - p_new) / g
        mask = self._g.abs() > 1e-6
        self.deltas.append(float(((self._p - p)[mask] / self._g[mask]).mean()))


def test_callbacks_see_the_lr_the_step_uses() -> None:
    wl = make_tiny_workload(lr=0.1, base_batch_size=16, dtype=torch.float64)
    log = LRLog()
    train(wl, batch_size=16, steps=6, warmup=4, callbacks=[log])
    want = [0.025, 0.05, 0.075, 0.1, 0.1, 0.1]
    assert log.before == pytest.approx(want)  # before the fix, step 1's hook saw the peak LR 0.1
    assert log.state_lr == pytest.approx(want)
    assert log.deltas == pytest.approx(want, rel=1e-6)  # and the optimizer stepped with exactly that LR


def test_user_cosine_schedule_composes_with_warmup() -> None:
    wl = make_tiny_workload(lr=0.1, base_batch_size=16, dtype=torch.float64)
    wl.lr_schedule = lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    log = LRLog()
    total, warm = 12, 3
    r = train(wl, batch_size=32, steps=total, warmup=warm, callbacks=[log])
    peak = 0.2  # linear rule: 0.1 x 32 / 16
    want = [peak * 0.5 * (1 + math.cos(math.pi * i / total)) * min(1.0, (i + 1) / warm) for i in range(total)]
    assert r.lr == pytest.approx(peak) and r.lr_schedule == "CosineAnnealingLR"
    assert log.before == pytest.approx(want, rel=1e-9)
    assert log.deltas == pytest.approx(want, rel=1e-6)
    # without warm-up the schedule alone
    log2 = LRLog()
    train(wl, batch_size=32, steps=total, callbacks=[log2])
    assert log2.before == pytest.approx([peak * 0.5 * (1 + math.cos(math.pi * i / total)) for i in range(total)])


def test_lr_schedule_object_steps_the_users_scheduler_on_its_own_values() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = LRSchedule(opt, warmup_steps=2, scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    seen = []
    for i in range(4):
        seen.append(sched.begin_step(i))
        opt.step()
        sched.end_step()
    assert seen == pytest.approx([0.5, 0.5, 0.25, 0.125])  # (1 x 1/2), (0.5 x 1), 0.25, 0.125: never compounded


def test_a_bad_lr_schedule_is_a_workload_error() -> None:
    wl = make_tiny_workload()
    wl.lr_schedule = lambda opt, total: 42
    with pytest.raises(WorkloadError, match="lr_schedule must return a scheduler"):
        train(wl, steps=1)
    wl.lr_schedule = lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, bogus=1)
    with pytest.raises(WorkloadError, match="lr_schedule raised TypeError"):
        train(wl, steps=1)


def test_an_absolute_lr_schedule_is_refused_and_a_relative_one_runs(tmp_path: Path) -> None:
    """Issue 23.1: OneCycleLR(max_lr=3e-4) trains at its own peak whatever LR the rule gives the batch size, so the
    LR batchfit reports would never run: refused with one line saying how to write it; written relative to the
    optimizer's LR it trains at the scaled peak."""
    from batchfit.cli import main

    wl = make_tiny_workload(lr=0.1, base_batch_size=16, dtype=torch.float64)
    wl.lr_schedule = lambda opt, n: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-4, total_steps=n)
    with pytest.raises(WorkloadError, match=r"lr_schedule sets absolute learning rates \(OneCycleLR: its LR is "):
        train(wl, batch_size=32, steps=8)
    wl.lr_schedule = lambda opt, n: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=n)
    log = LRLog()
    r = train(wl, batch_size=32, steps=8, callbacks=[log])
    assert r.lr == pytest.approx(0.2) and max(log.before) == pytest.approx(0.2, rel=0.05)  # the scaled peak ran
    wl.lr_schedule = lambda opt, n: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n, eta_min=1e-3)
    train(wl, batch_size=32, steps=4)  # partly absolute (eta_min): neither proportional nor fixed, left alone
    (tmp_path / "wl.py").write_text(
        "import torch\nfrom conftest import make_tiny_workload\n"
        "def make():\n    wl = make_tiny_workload()\n"
        "    wl.lr_schedule = lambda o, n: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=3e-4, total_steps=n)\n"
        "    return wl\n")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "-w", f"{tmp_path / 'wl.py'}:make", "-b", "16", "--steps", "4", "-q"])
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "absolute learning rates" in lines[0] and "Traceback" not in lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Errors in the user's code: one line naming the part of the workload (issue 13.4)


class _RaisesLater(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 5:
            raise RuntimeError("cuDNN kaput halfway")
        return self.lin(x)


class _TooLong(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x) + 10  # claims more than it holds

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.x[i], self.y[i]


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.sigmoid(self.lin(x))
        out += 1  # sigmoid's backward needs its output: autograd refuses this in-place change
        return out


def _frozen() -> nn.Module:
    m = nn.Linear(8, 3)
    m.requires_grad_(False)
    return m


def _bad(kind: str) -> Workload:
    wl = make_tiny_workload()
    if kind == "labels":
        x, y = wl.train_data.tensors
        wl.train_data = ArrayDataset(x, y + 5)
    elif kind == "shape":
        wl.model_fn = lambda: nn.Linear(7, 3)
    elif kind == "midway":
        wl.model_fn = _RaisesLater
    elif kind == "frozen":
        wl.model_fn = _frozen
    elif kind == "optimizer":
        wl.optimizer_fn = lambda params, lr: [torch.optim.SGD(params, lr=lr)]
    elif kind == "optimizer_raises":
        wl.optimizer_fn = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=-1)
    elif kind == "len":
        wl.train_data = _TooLong(*wl.train_data.tensors)
    elif kind == "metric_raises":
        wl.metrics = {"f1": lambda out, y: 1 / 0}
    elif kind == "metric_string":
        wl.metrics = {"f1": lambda out, y: "0.9"}
    elif kind == "inplace":
        wl.model_fn = _InPlace
    elif kind == "no_grad_loss":
        wl.loss_fn = lambda out, y: F.cross_entropy(out.detach(), y)
    return wl


USER_ERRORS = [
    ("labels", WorkloadError, r"^loss_fn raised IndexError: Target \d+ is out of bounds.*class labels in \[0"),
    ("shape", WorkloadError, r"^model forward raised RuntimeError: mat1 and mat2 shapes cannot be multiplied.*fix the "
                             "model"),
    ("midway", WorkloadError, r"^model forward raised RuntimeError: cuDNN kaput halfway"),
    ("frozen", WorkloadError, r"no trainable parameters .*unfreeze"),
    ("optimizer", WorkloadError, r"optimizer_fn must return a torch.optim.Optimizer, got list"),
    ("optimizer_raises", WorkloadError, r"^optimizer_fn raised ValueError: Invalid momentum"),
    ("len", DataError, r"^reading a batch of train_data raised IndexError.*len\(\) match"),
    ("metric_raises", WorkloadError, r"^metric 'f1' raised ZeroDivisionError"),
    ("metric_string", WorkloadError, r"^metric 'f1' returned str"),
    ("no_grad_loss", WorkloadError, r"loss does not depend on any trainable parameter"),
    ("inplace", WorkloadError, r"^backward through the model raised RuntimeError: one of the variables needed"),
]


@pytest.mark.parametrize(("kind", "cls", "pattern"), USER_ERRORS, ids=[k for k, *_ in USER_ERRORS])
def test_user_errors_are_one_line_workload_errors(kind: str, cls: type, pattern: str) -> None:
    with pytest.raises(cls, match=pattern) as info:
        train(_bad(kind), batch_size=16, epochs=2, drop_last=False)
    assert "\n" not in str(info.value)


def test_user_error_through_the_cli_is_exit_2(tmp_path, capsys) -> None:
    from batchfit.cli import main

    f = tmp_path / "wl.py"
    f.write_text(textwrap.dedent("""
        from batchfit.demos import digits_mlp
        def bad_labels():
            wl = digits_mlp()
            wl.train_data.tensors[1][7] = 99
            return wl
    """))
    rc = main(["train", "-q", "--steps", "300", "-w", f"{f}:bad_labels"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "internal error" not in err and len(err.splitlines()) == 1
    assert "loss_fn raised IndexError" in err


def test_an_oom_passes_through_run_batch_untouched() -> None:
    class OOM(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError):
        run_batch(make_tiny_workload(), OOM(), (torch.randn(2, 8), torch.zeros(2, dtype=torch.long)))


# ---------------------------------------------------------------------------------------------------------------
# Arguments (13.13, 13.17, 13.20)


def test_batch_larger_than_the_data_is_clamped_and_reported() -> None:
    wl = make_tiny_workload(lr=0.1, base_batch_size=16)  # 96 training samples
    with pytest.warns(UserWarning, match="larger than the training set"):
        r = train(wl, batch_size=10**12, drop_last=False, steps=1)
    assert (r.batch_size, r.effective_batch_size, r.requested_batch_size, r.samples) == (96, 96, 10**12, 96)
    assert r.lr == pytest.approx(0.1 * 96 / 16)  # the LR of the batch that ran, not of 1e12
    with pytest.raises(ConfigError, match="larger than the training set"):
        train(wl, batch_size=97, drop_last=True, steps=1)


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"seed": -1}, "seed must be an integer in"),
    ({"seed": 2**32}, "seed must be an integer in"),
    ({"seed": 10**30}, "seed must be an integer in"),
    ({"grad_clip": "1.0"}, "grad_clip must be a number"),
    ({"grad_clip": 0}, "grad_clip must be a positive number"),
    ({"grad_clip": float("nan")}, "grad_clip must be a finite number"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"eval_batch_size": 0}, "eval_batch_size must be a positive integer"),
    ({"drop_last": "no"}, "drop_last must be True or False"),
])
def test_bad_arguments_are_config_errors(kwargs: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        train(make_tiny_workload(), steps=1, **kwargs)


def test_largest_seed_is_accepted() -> None:
    assert train(make_tiny_workload(), steps=1, seed=2**32 - 1).seed == 2**32 - 1


def test_load_workload_of_a_non_string_names_the_type() -> None:
    with pytest.raises(ConfigError, match="must be a string .* got int 123"):
        load_workload(123)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# The memory budget meters what training holds (13.2)


def test_memory_budget_does_not_charge_the_nan_scan() -> None:
    """`find --memory-budget 300KiB` on demo:digits-mlp recommends hundreds; `train -b 64` under it must run (it
    used to fail in the up-front NaN scan of the whole data set)."""
    wl = load_workload("demo:digits-mlp")
    r = train(wl, batch_size=64, memory_budget="300KiB", steps=5)
    assert r.steps == 5 and r.peak_memory_bytes < 300 * 1024
    with pytest.raises(memory.OutOfMemoryError, match="budget exceeded"):  # the budget is enforced
        train(wl, batch_size=1024, memory_budget="300KiB", steps=2)


def test_train_fits_what_the_finder_says_fits() -> None:
    from batchfit.finder import find_batch_size

    wl = load_workload("demo:digits-mlp")
    fit = find_batch_size(wl, memory_budget="300KiB", throughput=False)
    assert fit.recommended_batch_size > 64
    for b in (fit.recommended_batch_size, fit.max_batch_size):
        r = train(wl, batch_size=b, memory_budget="300KiB", steps=3)
        assert r.steps == 3 and r.peak_memory_bytes <= 300 * 1024


# ---------------------------------------------------------------------------------------------------------------
# Results, progress, interruption


def test_result_names_per_rank_and_effective_batch(tiny_workload) -> None:
    r = train(tiny_workload, batch_size=16, micro_batch_size=4, steps=2)
    d = r.to_dict()
    assert (d["batch_size"], d["effective_batch_size"], d["batch_size_per_rank"], d["micro_batch_size"]) == \
        (16, 16, 16, 4)
    for key in ("grad_clip", "lr_schedule", "requested_batch_size", "accumulation_steps", "history"):
        assert key in d


def test_progress_events(tiny_workload) -> None:
    events = []
    r = train(tiny_workload, batch_size=16, steps=8, eval_every=4, progress=events.append)
    kinds = [e.kind for e in events]
    assert {e.stage for e in events} == {"train"}
    assert kinds[0] == "start" and kinds[-1] == "end" and events[0].total == 8
    assert [e.completed for e in events if e.kind == "update"] == list(range(1, 9))
    records = [e.data["record"] for e in events if e.kind == "record"]
    assert records == r.history and "effective batch 16" in events[0].message


def test_cli_json_says_interrupted_on_ctrl_c(tmp_path, capsys) -> None:
    from batchfit.cli import main

    class SigintAt:
        def __init__(self, step: int) -> None:
            self.step = step

        def on_step_end(self, state) -> None:  # noqa: ANN001
            if state.step == self.step:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C

    import batchfit.engine as engine

    real = engine.train

    def with_sigint(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        kwargs["callbacks"] = [*kwargs.get("callbacks", ()), SigintAt(50)]
        return real(*args, **kwargs)

    engine.train = with_sigint
    try:
        out = tmp_path / "run.json"
        rc = main(["train", "-q", "-w", "demo:digits-mlp", "-b", "16", "--steps", "200", "--eval-every", "20",
                   "--json", str(out)])
    finally:
        engine.train = real
    data = json.loads(out.read_text())
    assert rc == 130
    assert data["status"] == "interrupted"
    assert [h["step"] for h in data["history"]] == [20, 40]


# ---------------------------------------------------------------------------------------------------------------
# One step runner: build_run, the LR set by the step itself, the one evaluation pass


def _lr_at_each_step(step: TrainStep, batches: list) -> list[float]:
    seen: list[float] = []
    step.before_step.append(lambda s: seen.append(s.optimizer.param_groups[0]["lr"]))
    for batch in batches:
        step(batch)
    return seen


def test_the_step_sets_the_lr_of_each_step_itself() -> None:
    from batchfit.step import build_run

    wl = make_tiny_workload(lr=0.1, base_batch_size=16)
    run = build_run(wl, 32, None, device=CPU, seed=0, lr_rule="linear", total_steps=6, warmup_steps=4)
    assert run.lr == pytest.approx(0.2) and run.lr_rule == "linear" and run.lr_scaling["k"] == 2
    batches = [wl.train_data[i * 16:(i + 1) * 16] for i in range(5)]
    assert _lr_at_each_step(run.step, batches) == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2])  # no begin_step call
    assert run.step.index == 5 and run.step.lr == pytest.approx(0.2)
    # a caller may set it first (train does, for its callbacks): the step does not set it twice
    assert run.step.begin() == pytest.approx(0.2) and run.step.index == 5


def test_build_run_is_trains_setup() -> None:
    """train's model, optimizer at the rule's LR and step are build_run's: same seed, same numbers."""
    from batchfit.step import build_run

    wl = make_tiny_workload(lr=0.1, base_batch_size=16, optimizer="adam")
    grabbed = {}

    class Grab:
        def on_train_start(self, state) -> None:  # noqa: ANN001
            grabbed["params"] = _params(state.model)
            grabbed["lr"] = state.optimizer.param_groups[0]["lr"]
            grabbed["betas"] = state.optimizer.param_groups[0]["betas"]

    r = train(wl, batch_size=64, steps=1, seed=3, callbacks=[Grab()])
    run = build_run(wl, 64, None, device=CPU, seed=3)
    assert _max_diff(_params(run.model), grabbed["params"]) == 0.0
    assert run.lr == grabbed["lr"] == r.lr and run.lr_rule == r.lr_rule == "adam-sqrt"
    assert run.optimizer.param_groups[0]["betas"] == grabbed["betas"]
    assert run.lr_scaling == r.extras["lr_scaling"]
    fixed = build_run(wl, 64, 0.03, device=CPU, seed=3)
    assert fixed.lr == pytest.approx(0.03) and fixed.lr_rule == "fixed"
    probe = build_run(wl, device=CPU, seed=3, optimizer=False)  # gradients only: no optimizer, no schedule
    assert probe.optimizer is None and probe.schedule is None and probe.step.optimizer is None


def test_build_run_continues_a_run_from_its_state_bit_for_bit() -> None:
    from batchfit.step import build_run

    wl = make_tiny_workload(lr=0.1, base_batch_size=16, optimizer="adam", dtype=torch.float64)
    wl.lr_schedule = lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    batches = [wl.train_data[i * 16:(i + 1) * 16] for i in range(6)]
    whole = build_run(wl, 16, None, device=CPU, seed=0, total_steps=6, warmup_steps=3)
    lrs = _lr_at_each_step(whole.step, batches)
    first = build_run(wl, 16, None, device=CPU, seed=0, total_steps=6, warmup_steps=3)
    _lr_at_each_step(first.step, batches[:2])
    rest = build_run(wl, 16, None, device=CPU, state=first.state_dict(), total_steps=6, warmup_steps=3)
    assert rest.step.index == 2
    assert _lr_at_each_step(rest.step, batches[2:]) == lrs[2:]
    assert _max_diff(_params(rest.model), _params(whole.model)) == 0.0
    # from a state at another batch the rule moves the LR of every later step, as a batch-size change does
    twice = build_run(wl, 32, None, device=CPU, state=first.state_dict(), base_batch=16, lr_rule="linear",
                      total_steps=6, warmup_steps=3)
    assert _lr_at_each_step(twice.step, batches[2:]) == pytest.approx([2 * lr for lr in lrs[2:]], rel=1e-12)


def test_eval_pass_is_the_one_evaluation() -> None:
    """engine.evaluate, the finder's evaluation sizing and branching's loss readings all run step.eval_pass."""
    from batchfit.engine import evaluate
    from batchfit.step import build_run, eval_pass

    wl = make_tiny_workload()
    model = build_run(wl, device=CPU, seed=0, optimizer=False).model
    loss, metrics, _ = evaluate(wl, model, batch_size=10, device=CPU)
    batches = [wl.val_data[i:i + 10] for i in range(0, len(wl.val_data), 10)]
    assert eval_pass(wl, model, batches, device=CPU) == (loss, metrics)
    assert model.training  # its mode restored
    one, none = eval_pass(wl, model, [wl.val_data[0:32]], device=CPU, metrics=False)
    assert none == {} and one == pytest.approx(loss)
    with torch.no_grad():
        model.eval()
        direct = float(run_batch(wl, model, wl.val_data[0:32])[0])
    assert one == direct  # one batch: exactly its loss (branching's reading)


def test_measurements_build_no_model_optimizer_schedule_or_step_of_their_own() -> None:
    """The engine, the finder, step timing, branching and the noise probe build through step.build_run (and set no
    LR at the top of a step themselves); the one step that is not a build is the noise callback's extra-halves pass
    over the training run's own model."""
    import ast

    import batchfit

    root = Path(batchfit.__file__).resolve().parent
    banned = {"TrainStep", "LRSchedule", "for_workload", "build_model", "build_optimizer", "apply_scaling",
              "begin_step", "run_batch"}
    found = []
    for name in ("engine", "finder", "steptime", "branching", "noise"):
        tree = ast.parse((root / f"{name}.py").read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    f = node.func
                    called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                    if called in banned and not (name == "noise" and fn.name == "on_train_start"
                                                 and called == "TrainStep"):
                        found.append(f"{name}.{fn.name}: {called}")
    assert sorted(set(found)) == []
