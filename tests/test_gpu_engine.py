"""CUDA paths of the engine: run on a machine with a GPU (skipped elsewhere)."""

from __future__ import annotations

import math

import pytest
import torch

from batchfit.engine import train
from batchfit.loading import load_workload
from conftest import make_tiny_workload
from test_engine import GradCapture, _rel_diff

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_accumulation_exact_float64() -> None:
    wl = make_tiny_workload(dtype=torch.float64)
    big, acc = GradCapture(), GradCapture()
    train(wl, batch_size=22, steps=1, device="cuda", callbacks=[big])
    train(wl, batch_size=22, micro_batch_size=4, steps=1, device="cuda", callbacks=[acc])
    assert _rel_diff(acc.grads[0], big.grads[0]) <= 1e-6


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_precisions_train_and_report_peak(precision: str) -> None:
    wl = load_workload("demo:gpt-synthetic", size="tiny", seq_len=64, vocab=512, num_samples=256)
    r = train(wl, batch_size=32, micro_batch_size=16, steps=20, device="cuda", precision=precision)
    assert not r.diverged and r.precision == precision
    assert r.peak_memory_bytes and r.peak_memory_bytes > 0
    assert all(math.isfinite(h["val_loss"]) for h in r.history)


def test_cuda_bf16_uses_less_memory_than_fp32() -> None:
    wl = load_workload("demo:resnet-synthetic", size="tiny", image_size=64, width=16, num_classes=10,
                       num_samples=256)
    peaks = {p: train(wl, batch_size=64, steps=3, device="cuda", precision=p).peak_memory_bytes
             for p in ("fp32", "bf16")}
    assert peaks["bf16"] < peaks["fp32"]


def test_cuda_divergence_flagged() -> None:
    import torch.nn.functional as F
    from torch import nn

    wl = make_tiny_workload(lr=50.0)
    wl.model_fn = lambda: nn.Linear(8, 3)
    wl.loss_fn = lambda out, y: ((out - F.one_hot(y, 3).float()) ** 2).mean()
    wl.metrics = {}
    r = train(wl, batch_size=8, epochs=5, device="cuda")
    assert r.diverged


def test_cuda_fp16_step_with_clip_schedule_warmup_and_accumulation() -> None:
    wl = load_workload("demo:gpt-synthetic", size="tiny", seq_len=64, vocab=512, num_samples=256)
    wl.grad_clip = 1.0
    wl.lr_schedule = lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    lrs: list[float] = []

    class Log:
        def on_before_optimizer_step(self, state) -> None:  # noqa: ANN001
            lrs.append(state.optimizer.param_groups[0]["lr"])

    r = train(wl, batch_size=32, micro_batch_size=8, steps=20, warmup=4, device="cuda", precision="fp16",
              callbacks=[Log()])
    assert not r.diverged and r.accumulation_steps == 4 and r.grad_clip == 1.0
    assert r.lr_schedule == "CosineAnnealingLR"
    want = [r.lr * 0.5 * (1 + math.cos(math.pi * i / 20)) * min(1.0, (i + 1) / 4) for i in range(20)]
    assert lrs == pytest.approx(want, rel=1e-9)


def test_cuda_accumulation_with_clipping_matches_big_batch_float64() -> None:
    wl = make_tiny_workload(dtype=torch.float64)
    a = train(wl, batch_size=22, steps=5, grad_clip=0.05, device="cuda")
    b = train(wl, batch_size=22, micro_batch_size=4, steps=5, grad_clip=0.05, device="cuda")
    assert a.history[-1]["val_loss"] == pytest.approx(b.history[-1]["val_loss"], rel=1e-9)


def test_cuda_memory_budget_caps_training_and_user_errors_are_one_line() -> None:
    from batchfit import memory
    from batchfit.errors import WorkloadError

    wl = load_workload("demo:resnet-synthetic", size="tiny", image_size=64, width=16, num_classes=10,
                       num_samples=256)
    r = train(wl, batch_size=32, steps=3, device="cuda", memory_budget="4GiB")
    assert r.peak_memory_bytes < 4 * 1024**3
    with pytest.raises(Exception) as info:  # noqa: PT011 - the class depends on the torch version
        train(wl, batch_size=256, steps=2, device="cuda", memory_budget="8MiB")
    assert memory.is_oom(info.value)
    bad = make_tiny_workload()
    bad.model_fn = lambda: torch.nn.Linear(7, 3)
    with pytest.raises(WorkloadError, match="^model forward raised RuntimeError"):
        train(bad, steps=1, device="cuda")
