"""Memory accounting: byte parsing, the live-bytes tracker, the budget, OOM recognition and release."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit import memory
from batchfit.errors import ConfigError


def test_parse_bytes_units_and_errors() -> None:
    assert memory.parse_bytes("512MiB") == 512 * 1024**2
    assert memory.parse_bytes("2GB") == 2 * 1000**3
    assert memory.parse_bytes("1.5k") == 1536
    assert memory.parse_bytes(1000) == 1000
    assert memory.parse_bytes(None) is None
    for bad in ("lots", "12 parsecs", "-5MiB", 0, True):
        with pytest.raises(ConfigError):
            memory.parse_bytes(bad)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("1e400", "finite"),  # float("1e400") is inf: int() of it raised a raw OverflowError (issue 13.12)
        (float("nan"), "finite"),  # int(nan) raised a raw ValueError
        (float("inf"), "finite"),
        (10**400, "finite"),  # beyond float's range
        (-1, "positive"),
        (-2.5, "positive"),
        ("0.4", "positive"),  # rounds to 0 bytes
        ("1e30", "larger than any machine"),
        ("nan", "not understood"),
        ([512], "number of bytes"),
    ],
)
def test_parse_bytes_rejects_non_finite_and_absurd_sizes_in_one_line(bad: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        memory.parse_bytes(bad)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and message.startswith("memory_budget") and len(message) < 200
    with pytest.raises(ConfigError, match="^budget "):
        memory.parse_bytes(bad, name="budget")  # type: ignore[arg-type]


def test_format_bytes() -> None:
    assert memory.format_bytes(None) == "-"
    assert memory.format_bytes(512) == "512 B"
    assert memory.format_bytes(1536) == "1.5 KiB"
    assert memory.format_bytes(3 * 1024**3) == "3.0 GiB"


def test_tracker_counts_and_releases() -> None:
    tracker = memory.LiveBytesTracker(device_type="cpu")
    with tracker:
        a = torch.zeros(1000)  # 4,000 bytes
        b = a.view(10, 100)  # a view shares the storage: not counted twice
        assert tracker.live == 4000
        c = torch.ones(500, dtype=torch.float64)
        assert tracker.live == 8000
        del a, b
        assert tracker.live == 4000
        del c
    assert tracker.live == 0
    assert tracker.peak == 8000


def test_budget_raises_oom_and_drops_the_tensor() -> None:
    tracker = memory.LiveBytesTracker(budget_bytes=10_000, device_type="cpu")
    with tracker:
        keep = torch.zeros(1000)
        with pytest.raises(memory.OutOfMemoryError, match="budget exceeded"):
            torch.zeros(5000)
        assert tracker.live == 4000  # the tensor that broke the budget is gone with the exception
        del keep
    assert tracker.live == 0


def test_peak_meter_cpu_and_enforce_budget() -> None:
    dev = torch.device("cpu")
    with memory.PeakMeter(dev) as meter:
        x = torch.zeros(1024)
        meter.reset()
        y = torch.zeros(2048)
        del y
        assert meter.peak() == 4096 + 8192
        assert meter.live() == 4096
        del x
    with pytest.raises(memory.OutOfMemoryError), memory.enforce_budget("16KiB", dev):
        torch.zeros(8192)
    assert isinstance(memory.enforce_budget(None, dev), contextlib.nullcontext)  # no budget: nothing enforced
    meter = memory.enforce_budget("16KiB", dev)
    assert isinstance(meter, memory.PeakMeter) and meter.budget_bytes == 16 * 1024
    with memory.enforce_budget(None, dev):
        torch.zeros(8192)  # no budget: no limit
    assert memory.available_bytes(dev) is None or memory.available_bytes(dev) > 0


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (memory.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"), True),
        (MemoryError(), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_oom(exc: BaseException, expected: bool) -> None:
    assert memory.is_oom(exc) is expected


def _step(model: nn.Module, opt: torch.optim.Optimizer, b: int) -> None:
    x = torch.randn(b, 32)
    loss = F.cross_entropy(model(x), torch.zeros(b, dtype=torch.long))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_repeated_ooms_leave_live_memory_at_baseline() -> None:
    """The raw pattern (the finder's OOM storm is in test_finder)."""
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 4))
    opt = torch.optim.Adam(model.parameters())
    observer = memory.LiveBytesTracker(device_type="cpu")  # counts everything, enforces nothing
    observer.track([list(model.parameters())])
    with observer:
        _step(model, opt, 4)  # optimizer state now exists
        baseline = observer.live
        budget = memory.LiveBytesTracker(budget_bytes=baseline + 50_000, device_type="cpu")
        for _ in range(10):
            failed = False
            try:
                with budget:
                    _step(model, opt, 512)  # activations of 512 x 256 floats do not fit
            except Exception as exc:
                assert memory.is_oom(exc)
                failed = True
            assert failed
            memory.release_memory(model, opt)  # outside the except block
            assert observer.live == baseline
        _step(model, opt, 4)  # training still works after the storm
        assert observer.live == baseline


def test_train_inside_a_budget_raises_oom_and_leaves_no_budget_behind() -> None:
    from batchfit.demos import ArrayDataset
    from batchfit.engine import train
    from batchfit.workload import Workload

    x, y = torch.randn(512, 32), torch.randint(0, 4, (512,))
    wl = Workload(name="budget", model_fn=lambda: nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 4)),
                  optimizer_fn=lambda p, lr: torch.optim.SGD(p, lr=lr), loss_fn=F.cross_entropy,
                  train_data=ArrayDataset(x, y))
    assert train(wl, batch_size=8, steps=2, memory_budget="1MiB").steps == 2
    with pytest.raises(memory.OutOfMemoryError):
        train(wl, batch_size=512, steps=2, memory_budget="200KiB")
    torch.zeros(1_000_000)  # no budget is left active after the failure


def test_try_oom_returns_the_value_or_the_oom_and_frees_the_failed_step() -> None:
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 4))
    opt = torch.optim.Adam(model.parameters())
    observer = memory.LiveBytesTracker(device_type="cpu")
    observer.track([list(model.parameters())])
    with observer:
        _step(model, opt, 4)
        baseline = observer.live
        ok = memory.try_oom(lambda: 41 + 1)
        assert ok.ok and ok.value == 42 and ok.oom is None

        def too_big() -> None:
            with memory.LiveBytesTracker(budget_bytes=baseline + 50_000, device_type="cpu"):
                _step(model, opt, 512)

        failed = memory.try_oom(too_big, model, opt)
        assert not failed.ok and failed.value is None
        assert memory.is_oom(failed.oom) and "budget exceeded" in str(failed.oom)
        assert failed.oom.__traceback__ is None  # a detached copy: no frames keep the step's tensors alive
        assert observer.live == baseline
        assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="not an OOM"):  # any other error propagates unchanged
        memory.try_oom(lambda: (_ for _ in ()).throw(ValueError("not an OOM")))
