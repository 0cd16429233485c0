"""Step-time calibration: interleaved rounds of the training step, the CPU clock, and what the decision reads."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from batchfit import decide, steptime
from batchfit.metric import Metric
from batchfit.recommend import step_time_intervals
from batchfit.stats import Interval
from batchfit.steptime import StepTimeCalibration, calibrate_step_time, cpu_clock
from conftest import make_tiny_workload


def test_every_batch_size_is_timed_in_the_same_rounds() -> None:
    cal = calibrate_step_time(make_tiny_workload(), {8: 8, 32: 16, 96: 32}, rounds=6)
    assert cal.rounds == 6 and sorted(cal.seconds) == [8, 32, 96]
    assert all(len(v) == 6 and all(x > 0 for x in v) for v in cal.seconds.values())
    assert cal.clock == "process CPU time, 1 thread" and not cal.errors
    iv = cal.interval(32)
    assert iv is not None and iv.known and iv.low <= iv.estimate <= iv.high  # type: ignore[operator]
    assert iv.estimate == float(np.median(cal.seconds[32])) and iv.n == 6
    assert cal.interval(1234) is None


def test_round_trips_through_its_json_dict() -> None:
    cal = StepTimeCalibration("wall", {8: [0.1, 0.2, 0.3], 16: [0.2, 0.3, 0.5]}, {8: 8, 16: 8}, 3, 1.5,
                              {32: "out of memory: x"})
    again = StepTimeCalibration.from_dict(cal.to_dict())
    assert again == cal
    assert cal.to_dict()["seconds_per_step"]["16"]["estimate"] == 0.3


def test_the_cpu_clock_uses_one_thread_and_restores_the_count() -> None:
    before = torch.get_num_threads()
    with cpu_clock() as clock:
        assert torch.get_num_threads() == 1
        t0 = clock()
        sum(i * i for i in range(200_000))  # CPU work shows on the process clock
        assert clock() > t0
    assert torch.get_num_threads() == before


def test_the_users_model_comes_back_as_it_was() -> None:
    torch.manual_seed(0)
    own = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    state = {k: v.clone() for k, v in own.state_dict().items()}
    wl = dataclasses.replace(make_tiny_workload(), model_fn=lambda: own)
    cal = calibrate_step_time(wl, {8: 8, 16: 16}, rounds=6)
    assert cal.rounds == 6
    assert all(torch.equal(state[k], v) for k, v in own.state_dict().items())
    assert all(p.grad is None for p in own.parameters())


def test_the_rounds_are_cut_to_the_time_limit_but_never_below_six() -> None:
    cal = calibrate_step_time(make_tiny_workload(), {8: 8, 16: 16}, rounds=50, max_seconds=0.0)
    assert cal.rounds == steptime.MIN_ROUNDS


def test_the_decision_reads_the_calibration_not_the_trials_wall_clock() -> None:
    """A trial timed while the machine was busy (3x slower wall clock) cannot move the decision when every batch
    size was timed in the same interleaved rounds."""
    acc = Metric("accuracy", True)

    def trial(b: int, seed: int, sps: float) -> dict:
        hist = [{"step": i, "val_metrics": {"accuracy": a}} for i, a in enumerate((0.8, 0.9, 0.95, 0.95))]
        return {"batch_size": b, "lr_multiplier": 1.0, "lr": 0.01, "status": "ok", "seed": seed, "history": hist,
                "best_val_metrics": {"accuracy": 0.95}, "samples_per_s": sps,
                "steps_to_target": 80 * (1 + 160 / b) * (1 + 0.02 * seed)}

    sizes = (16, 32, 64, 128, 256)
    cal = {b: Interval(0.001 + 0.0001 * b, 0.00095 + 0.0001 * b, 0.00105 + 0.0001 * b, method="calibration")
           for b in sizes}
    picks = []
    for busy in (None, 32, 64):
        trials = [trial(b, s, b / (0.001 + 0.0001 * b) / (3 if b == busy else 1)) for b in sizes for s in range(3)]
        d = decide.decide(trials, acc, step_time=cal)
        assert d is not None
        assert all(d.evidence[b].seconds_per_step == cal[b] for b in sizes)
        picks.append(d.batch_size)
    assert len(set(picks)) == 1, picks


def test_recommend_reads_the_stored_calibration() -> None:
    cal = StepTimeCalibration("wall", {8: [0.1, 0.2, 0.3]}, {8: 8}, 3, 1.0)
    ivs = step_time_intervals({"step_time": cal.to_dict()})
    assert ivs is not None and ivs[8].estimate == 0.2
    assert step_time_intervals({}) is None and step_time_intervals({"step_time": {"seconds": {}}}) is None


def test_a_size_that_runs_out_of_memory_drops_out_and_the_rest_are_timed(monkeypatch) -> None:  # noqa: ANN001
    """An OOM at one size (fragmentation after the others, on a GPU) is recorded for it; the others are timed."""
    from batchfit.step import TrainStep

    real = TrainStep.__call__
    calls = {"n": 0}

    def flaky(self, batch, global_count=None):  # noqa: ANN001, ANN202
        if self.micro_batch_size == 16:
            calls["n"] += 1
            if calls["n"] > 4:  # the warm-up passes; a later round runs out of memory
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch, global_count)

    monkeypatch.setattr(TrainStep, "__call__", flaky)
    cal = calibrate_step_time(make_tiny_workload(), {8: 8, 16: 16, 32: 32}, rounds=6)
    assert sorted(cal.seconds) == [8, 32] and "out of memory" in cal.errors[16]
    assert all(len(cal.seconds[b]) == 6 for b in (8, 32))


def test_a_size_where_the_users_code_fails_is_recorded_and_the_rest_are_timed() -> None:
    """The user's model fails at one micro-batch size (as a sweep trial would, recorded and skipped there): the
    calibration records that size's one-line error and times the others, instead of stopping tune."""
    base = make_tiny_workload()

    class Picky(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training and x.shape[0] == 16:
                raise RuntimeError("picky forward")
            return self.inner(x)

    wl = dataclasses.replace(base, model_fn=lambda: Picky(base.model_fn()))
    cal = calibrate_step_time(wl, {8: 8, 16: 16, 32: 32}, rounds=6)
    assert sorted(cal.seconds) == [8, 32] and "picky forward" in cal.errors[16]
