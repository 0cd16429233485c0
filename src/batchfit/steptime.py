"""Step-time calibration: the time per optimizer step at each candidate batch size, by interleaved rounds.

The sweep's trials each time themselves once, at different moments: on a busy machine one trial runs while another
process is busy and the next does not, and the comparison of batch sizes moves with the load. Here every candidate
is timed in the same rounds — round 1 times batch 16, 32, ..., 1437 one after another, round 2 again, ... — so a
change of load hits every candidate alike, and each candidate's time is the **median over rounds** with a
distribution-free interval (:func:`batchfit.stats.median_interval`): a burst of load widens the interval instead
of moving the estimate.

What is timed is the step ``train`` runs (:class:`batchfit.step.TrainStep`: forward/backward over the given
micro-batches — in ``tune`` the ones the recommendation would give that batch size —, clipping, the optimizer step,
the schedule), on a batch drawn once per size (data loading is not part of it; the trials' wall-clock throughput,
which includes it, is still reported).

**The clock.** On CUDA: wall-clock time with a device synchronisation around each timed chunk. On the CPU: the
process's CPU time (``time.process_time``) with PyTorch limited to one intra-op thread while timing. Measured on
the 2-core CPU machine (``bench/step_time_under_load.py``; docs/benchmarks.md, "Step time under load"): with two
busy processes beside it, the wall clock of the mnist1d step at PyTorch's default two threads became 18-167x
slower, by a different factor at each batch size (OpenMP threads spin-wait for a sibling the scheduler has taken
off the core), while one-thread CPU time moved 0-3 % at 13 of 15 batch sizes (13 % and 19 % at two). One-thread
CPU time ranks batch sizes by the work per step; on a many-core CPU large batches parallelise better than this
ranks them (docs/decisions.md says so).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from batchfit import memory
from batchfit.errors import WorkloadError
from batchfit.stats import DEFAULT_LEVEL, Interval, median_interval
from batchfit.step import ModelKeeper, StepRunner, TrainStep, make_scaler

__all__ = ["StepTimeCalibration", "calibrate_step_time", "cpu_clock"]

ROUNDS = 8  # interleaved rounds
MIN_ROUNDS = 6  # the fewest whose median has a distribution-free 95 % interval (1 - 2 / 2**6 > 0.95)
CHUNK_SECONDS = 0.02  # each (round, batch size) times whole steps until at least this long ...
MAX_CHUNK_STEPS = 16  # ... but at most this many steps
WARMUP_STEPS = 2  # per batch size, untimed (the optimizer state, the allocator, lazy kernels)
MAX_SECONDS = 30.0  # the rounds after the first are cut to fit this (never below MIN_ROUNDS)


@dataclass(frozen=True)
class StepTimeCalibration:
    """Seconds per optimizer step at each batch size, one value per interleaved round."""

    clock: str
    seconds: dict[int, list[float]]  # batch size -> seconds per step, one per round (round order)
    micro_batch: dict[int, int]
    rounds: int
    elapsed: float
    errors: dict[int, str] = field(default_factory=dict)  # batch sizes that could not be timed, and why
    level: float = DEFAULT_LEVEL
    extras: dict[str, Any] = field(default_factory=dict)  # other keys of its dict form, kept (tune's ``cost``)

    def interval(self, batch_size: int) -> Interval | None:
        """The median seconds per step over the rounds, with its order-statistic interval (``None``: not timed)."""
        values = self.seconds.get(int(batch_size))
        if not values:
            return None
        iv = median_interval(values, self.level)
        return Interval(iv.estimate, iv.low, iv.high, iv.level, f"interleaved-median ({self.clock})", len(values),
                        iv.spread)

    def intervals(self) -> dict[int, Interval]:
        return {b: iv for b in sorted(self.seconds) if (iv := self.interval(b)) is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"clock": self.clock, "rounds": self.rounds, "elapsed": self.elapsed, "level": self.level,
                "seconds": {str(b): list(v) for b, v in sorted(self.seconds.items())},
                "micro_batch": {str(b): m for b, m in sorted(self.micro_batch.items())},
                "errors": {str(b): e for b, e in sorted(self.errors.items())},
                "seconds_per_step": {str(b): iv.to_dict() for b, iv in self.intervals().items()}, **self.extras}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepTimeCalibration:
        """The inverse of :meth:`to_dict` (``seconds_per_step`` is derived; any other key, such as tune's ``cost``,
        goes to ``extras``)."""
        own = {"clock", "seconds", "micro_batch", "rounds", "elapsed", "errors", "level", "seconds_per_step"}
        return cls(clock=str(data.get("clock", "")),
                   seconds={int(b): [float(x) for x in v] for b, v in (data.get("seconds") or {}).items()},
                   micro_batch={int(b): int(m) for b, m in (data.get("micro_batch") or {}).items()},
                   rounds=int(data.get("rounds") or 0), elapsed=float(data.get("elapsed") or 0.0),
                   errors={int(b): str(e) for b, e in (data.get("errors") or {}).items()},
                   level=float(data.get("level") or DEFAULT_LEVEL),
                   extras={k: copy.deepcopy(v) for k, v in data.items() if k not in own})


@dataclass
class _Timed:
    """One batch size's step (it counts its own steps and sets each one's LR first, as ``train``'s does) and its
    batch (drawn once)."""

    step: TrainStep
    batch: Any
    chunk: int = 1

    def run(self, n: int = 1) -> None:
        for _ in range(n):
            self.step(self.batch)


def _attempt(fn: Callable[[], Any], model: Any, optimizer: Any) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, why)`` when it ran out of memory (:func:`memory.try_oom`) or the user's code
    failed at this size: that size is recorded and skipped, as the sweep records a failed trial and goes on."""
    try:
        attempt = memory.try_oom(fn, model, optimizer)
    except WorkloadError as exc:
        return None, str(exc).splitlines()[0][:300]
    if not attempt.ok:
        return None, f"out of memory: {str(attempt.oom).splitlines()[0][:200]}"
    return attempt.value, None


@contextlib.contextmanager
def cpu_clock() -> Iterator[Callable[[], float]]:
    """Process CPU time with one intra-op thread (restored after): the CPU clock other processes do not move."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield time.process_time
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _clock(device: torch.device) -> Iterator[tuple[Callable[[], float], str]]:
    if device.type == "cuda":
        def wall() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        yield wall, "wall clock, CUDA-synchronised"
    else:
        with cpu_clock() as clock:
            yield clock, "process CPU time, 1 thread"


def sample_plan(sizes: list[int], rounds: int, max_samples: int) -> tuple[list[int], int, int, list[int]]:
    """``(sizes kept, rounds, steps per chunk at most, sizes left out)`` so that the warm-up (``WARMUP_STEPS`` + 1
    steps a size) and the rounds step at most ``max_samples`` samples."""
    keep = sorted(sizes)
    left_out: list[int] = []
    while keep:
        total = sum(keep)
        warm = (WARMUP_STEPS + 1) * total
        for r in (rounds, MIN_ROUNDS):
            chunk = (max_samples - warm) // (max(r, 1) * total)
            if chunk >= 1:
                return keep, r, int(min(MAX_CHUNK_STEPS, chunk)), left_out
        left_out.insert(0, keep.pop())
    return [], 0, 1, left_out


def calibrate_step_time(workload: Any, micro_batches: Mapping[int, int], *, device: str | torch.device = "cpu",
                        precision: str = "fp32", seed: int = 0, rounds: int = ROUNDS,
                        max_seconds: float = MAX_SECONDS, max_samples: int | None = None) -> StepTimeCalibration:
    """Time ``train``'s step at every batch size in ``micro_batches`` (batch size -> its micro-batch: in ``tune``,
    the one the recommendation would give it) in interleaved rounds; see the module docstring for the clock.

    ``max_samples`` (``tune``'s share of its cost cap) bounds the samples stepped: the rounds fall to
    :data:`MIN_ROUNDS` and each chunk to fewer steps; when even one step per round at every size does not fit, the
    largest sizes are left untimed (named in ``errors``; the decision then times them from the sweep's own trials).
    """
    # batchfit.step's model keeper (the model built once, handed back as model_fn gave it) and step runner (the step
    # ``train`` builds, by build_run: the workload's clipping and schedule, on its training source)

    dev = torch.device(device)
    sizes = sorted(int(b) for b in micro_batches)
    errors: dict[int, str] = {}
    max_chunk = MAX_CHUNK_STEPS
    if max_samples is not None:
        sizes, rounds, max_chunk, left_out = sample_plan(sizes, rounds, max_samples)
        errors.update({b: f"not timed: the cost cap leaves {max_samples:,} samples for step timing" for b in left_out})
    keeper = ModelKeeper(workload, dev, seed)
    runner = StepRunner(workload, dev, precision)
    seconds: dict[int, list[float]] = {b: [] for b in sizes}
    t_start = time.perf_counter()
    model = keeper.get()
    optimizer, _ = keeper.optimizer(model)
    try:
        with _clock(dev) as (clock, clock_name):
            timed: dict[int, _Timed] = {}
            for b in sizes:  # warm-up, and how many steps make a chunk of CHUNK_SECONDS
                step = runner.step(model, optimizer, make_scaler(precision), int(micro_batches[b]), 1_000_000)
                item = _Timed(step, runner.source.sample(b))

                def warm(item: _Timed = item) -> float:
                    item.run(WARMUP_STEPS)
                    t0 = clock()
                    item.run()
                    return clock() - t0

                one_step, failed = _attempt(warm, model, optimizer)
                if failed is not None:
                    errors[b] = failed
                    continue
                one = max(float(one_step), 1e-6)  # type: ignore[arg-type]
                item.chunk = max(1, min(max_chunk, round(CHUNK_SECONDS / one)))
                timed[b] = item
            done = 0
            while done < rounds and timed:
                round_start = time.perf_counter()
                for b, item in list(timed.items()):  # ascending batch sizes, the same order every round
                    t0 = clock()
                    _, failed = _attempt(functools.partial(item.run, item.chunk), model, optimizer)
                    if failed is not None:  # OOM after other sizes (fragmentation), or the user's code failed
                        errors[b] = failed  # at this size: it drops out, the rest go on
                        del timed[b]
                        seconds[b] = []
                        continue
                    seconds[b].append((clock() - t0) / item.chunk)
                done += 1
                per_round = time.perf_counter() - round_start
                left = max_seconds - (time.perf_counter() - t_start)
                if done >= MIN_ROUNDS and per_round > left:
                    break
    finally:
        timed = {}  # the steps and batches go before the model is handed back (device memory)
        del optimizer
        keeper.close()
        del model
    return StepTimeCalibration(clock=clock_name, seconds={b: v for b, v in seconds.items() if v},
                               micro_batch={int(b): int(m) for b, m in micro_batches.items()}, rounds=done,
                               elapsed=time.perf_counter() - t_start, errors=errors)

