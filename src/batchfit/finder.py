"""The batch-size finder: predict the largest batch that fits from a few small real probes, then verify it.

Method (see docs/finder.md):

1. Probe: run real optimizer steps (2 each; the peak is measured in the 2nd step, when the optimizer state exists) at a
   tiny batch, at 16 times that, and at the size the line through those two puts at 70 % of the memory limit (the
   peak is convex in B, so that line errs low and the probe lands below the limit). Peaks are measured separately
   for the forward/backward part and the optimizer part of a step, because at small batches the optimizer's
   temporaries, not the activations, can set the peak.
2. Fit ``peak = fixed + per_sample * B`` for each part from the largest size that fit and one well below it, and
   predict the largest B whose peak stays under the limit (the budget, or the memory available).
3. Run the size predicted for the margin (the recommendation), refit through it, verify the predicted maximum with
   real steps and refit; only where a prediction fails, back off just below the failure and then bisect. Every
   size reported was run.
4. The recommendation keeps a headroom ``margin`` (re-fitted, and itself run); evaluation is sized separately (its
   own search, at the recommended training batch); throughput is timed at powers of two up to the max, and the
   knee is the smallest batch within 5 % of the best samples/s.

Every trial runs the step ``train`` runs (:mod:`batchfit.step`): the workload's micro-batch loss weighting when it
accumulates, its gradient clipping and its LR schedule, inside a :class:`batchfit.memory.PeakMeter`. The sizes found
are micro-batches (one forward/backward each).

The maximum reported ran at least 3 optimizer steps; the recommendation, under it, at least 2. The model is
built from ``model_fn`` once and every trial starts from its initial weights with a fresh optimizer. Nothing the
caller can see changes: a model object ``model_fn`` hands back is returned to its device with its weights and
gradients bit for bit, and the Python, NumPy and torch (CPU and CUDA) random states are restored.

The parts, one job each: :class:`MemoryModel` and :func:`search_max` (the search, pure arithmetic on trial
records); :class:`batchfit.step.ModelKeeper` (the model built once, reset between trials, handed back as it
came); :class:`batchfit.step.StepRunner` (real training steps at a size); :class:`MemoryTrials` (one step sequence
inside a peak meter); :func:`_time_throughput` and :func:`_size_evaluation`; :func:`find_batch_size` composes them.
"""

from __future__ import annotations

import functools
import math
import random
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from batchfit import checks, data, distributed, memory, sharding
from batchfit._io import split_fields
from batchfit.errors import ConfigError
from batchfit.loading import load_workload
from batchfit.progress import ProgressFn, emit
from batchfit.runtime import resolve_device
from batchfit.step import (
    ModelKeeper,
    StepRunner,
    accumulation_count,
    check_precision,
    eval_pass,
    make_scaler,
)
from batchfit.workload import Workload

__all__ = [
    "CUDA_AIM",
    "GROWTH",
    "KNEE_SHARE",
    "MAX_TIMED_STEPS",
    "MEMORY_PHASES",
    "MIN_TIMED_SECONDS",
    "PROBE_STEPS",
    "STEPS_PER_TRIAL",
    "THIRD_PROBE_SHARE",
    "TOLERANCE",
    "FindResult",
    "MemoryModel",
    "MemoryTrials",
    "find_batch_size",
    "search_max",
]

MEMORY_PHASES = ("probe", "verify", "bisect", "recommend")
STEPS_PER_TRIAL = 3  # optimizer steps per verifying trial; peaks are read from step 2 on (optimizer state exists)
PROBE_STEPS = 2  # a probe (and the recommendation, under a verified maximum) measures: its peak is read in step 2
GROWTH = 16  # the second probe is this many times the first
THIRD_PROBE_SHARE = 0.7  # the third probe aims at this share of the limit (close enough to extrapolate well)
TOLERANCE = 0.02  # after a failed prediction, back off to 98 % of the failing size before bisecting
KNEE_SHARE = 0.95  # the knee: the smallest batch with >= 95 % of the best measured samples/s
MIN_TIMED_SECONDS = 0.3  # throughput: time at least this long (and at least 3 steps) per batch size ...
MAX_TIMED_STEPS = 48  # ... but at most this many steps (tiny batches on a fast device finish 48 steps in < 0.3 s)
MAX_SEARCH_TRIALS = 40
WARMUP_MAX_STEPS = 12  # throughput: warm up until a step is within WARMUP_STEADY of the one before, at most this many
WARMUP_STEADY = 0.25
FLAT_SIZES = 2  # throughput timing stops after this many sizes in a row not faster than the best beyond the noise
KNEE_BOOTSTRAP = 200  # resamples of the timed chunks behind the knee's spread
# CUDA: the caching allocator cannot hand out the last bytes of the device (2 MiB segment rounding, fragmentation,
# cuDNN workspaces), so a prediction from allocated-bytes peaks is verified this much lower. On an H100 (ResNet-50,
# fp32) the line through two fitting sizes predicted 967-970 where 960 was the true largest batch: 0.8 % high.
CUDA_AIM = 0.99


@dataclass
class FindResult:
    """What ``find_batch_size`` measured; ``to_dict()`` is the JSON ``batchfit find`` writes, ``from_dict()`` reads
    it back.

    ``max_batch_size`` is the largest size verified to fit (the maximum *found*; the input cap is
    ``batch_size_cap``); ``recommended_batch_size`` keeps the margin and was run too. ``memory_budget_bytes`` is the
    user's budget (``None``: the device's available memory was the limit, given as ``memory_limit_bytes``).
    ``limited_by`` is ``memory``, ``dataset`` or ``max_batch_size`` (the cap). ``regime`` says what each trial's step
    ran: micro-batches per step, gradient clipping, LR schedule.
    """

    device: str
    precision: str
    memory_budget_bytes: int | None
    max_batch_size: int
    recommended_batch_size: int
    throughput_knee_batch_size: int | None
    memory_model: dict[str, Any]
    probes: list[dict[str, Any]]
    real_trials: int
    seconds: float
    eval_batch_size: int | None = None
    workload: str = ""
    memory_limit_bytes: int | None = None
    margin: float = 0.05
    limited_by: str = "memory"
    throughput_trials: int = 0
    eval_trials: int = 0
    batch_size_cap: int | None = None
    regime: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extras"))
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FindResult:
        """The inverse of :meth:`to_dict`: known keys become fields, any other key (``status``, ``world_size``,
        ``accumulation_steps`` ...) goes back into ``extras``."""
        known, extras = split_fields(cls, data, deep=True)
        return cls(**known, extras=extras)


# ---------------------------------------------------------------------------------------------------------------
# The memory model: one line per part of a step, the peak is the highest line


SPREAD = 0.8  # the memory line's smaller size is at most this fraction of its larger one, where one ran


@dataclass
class MemoryModel:
    """``peak(B) = max over parts of (fixed + per_sample * B)``, each part fitted through two measured sizes."""

    parts: dict[str, tuple[float, float]]  # part -> (fixed_bytes, per_sample_bytes)

    @classmethod
    def fit(cls, points: dict[int, dict[str, int]]) -> MemoryModel | None:
        """Fit from ``{batch: {part: peak}}`` through the largest size and the largest one at most ``SPREAD`` of it
        (the second largest when none is): the line is local to where it is used, and its two sizes far enough apart
        that a few hundred bytes of counting noise (storages freed when a collective's handle lets go of them) do not
        swamp the slope, as they did between two neighbouring sizes such as 10 and 11."""
        if len(points) < 2:
            return None
        sizes = sorted(points)
        b2 = sizes[-1]
        b1 = max((b for b in sizes[:-1] if b <= SPREAD * b2), default=sizes[-2])
        p1, p2 = points[b1], points[b2]
        parts = {}
        for part in p2:
            if part not in p1:
                continue
            slope = max(0.0, (p2[part] - p1[part]) / (b2 - b1))
            parts[part] = (p2[part] - slope * b2, slope)
        return cls(parts) if parts else None

    def peak(self, batch_size: int) -> float:
        return max(fixed + slope * batch_size for fixed, slope in self.parts.values())

    def max_under(self, limit: float) -> int:
        """The largest B whose predicted peak is <= limit (0 when none; a huge number when nothing grows)."""
        best = 2**62
        for fixed, slope in self.parts.values():
            if slope > 0:
                best = min(best, math.floor((limit - fixed) / slope))
            elif fixed > limit:
                best = 0
        return max(0, best)

    def binding(self, batch_size: int) -> tuple[str, float, float]:
        part = max(self.parts, key=lambda k: self.parts[k][0] + self.parts[k][1] * batch_size)
        return (part, *self.parts[part])


def search_max(
    run: Callable[[int, str], dict[str, Any]],
    *,
    cap: int,
    limit: float,
    first: int = 2,
    stepping_stone: float | None = None,
    aim: float = 1.0,
    guess: tuple[int, int] | None = None,
) -> tuple[int, dict[int, dict[str, int]]]:
    """Largest batch in ``[1, cap]`` for which ``run(b, phase)`` reports ``ok``: probe, predict, verify, bisect.

    ``run`` returns a record with ``ok``, ``parts`` ({part: peak bytes}) and ``static_bytes`` (what is live before
    the batch: parameters, gradients, optimizer state). With ``stepping_stone`` (the margin's peak), the size
    predicted for it runs first (phase ``recommend``): it is the recommendation, and the line through it predicts
    the maximum from close by. With ``aim`` < 1 an unbracketed prediction is verified that much lower (CUDA: the
    allocator cannot hand out the last ~1 % of the device). With ``guess`` (a plan's predicted recommendation and
    largest batch: :func:`batchfit.plan`), those two run first instead of the small probes, and the usual
    prediction and verification go on from them; if neither fits, the small probes run as without a guess.
    Returns the largest size that ran and the fitted points. Raises :class:`ConfigError` when even batch 1 does not
    fit.
    """
    points: dict[int, dict[str, int]] = {}
    lo, hi = 0, cap + 1  # lo: largest size that ran; hi: smallest size that failed (cap + 1: none failed yet)

    def attempt(b: int, phase: str) -> dict[str, Any]:
        nonlocal lo, hi
        rec = run(b, phase)
        if rec["ok"]:
            lo = max(lo, b)
            points[b] = rec["parts"]
        else:
            hi = min(hi, b)
        return rec

    if guess is not None:  # the plan's recommendation, then its largest batch, aimed a little low
        for b, phase in ((guess[0], "recommend"), (math.floor(guess[1] * aim), "verify")):
            if stepping_stone is not None or phase == "verify":
                b = max(1, min(cap, b))
                if lo < b < hi:
                    attempt(b, phase)
    if lo == 0:
        _probe_up(attempt, lambda: (lo, hi), cap, first, limit, points, stepping_stone)
    return _predict_and_verify(attempt, lambda: (lo, hi), points, cap, limit, aim)


Bracket = Callable[[], tuple[int, int]]  # (largest size that ran, smallest that failed or cap + 1)


def _probe_up(attempt: Callable[[int, str], dict[str, Any]], bracket: Bracket, cap: int, first: int, limit: float,
              points: dict[int, dict[str, int]], stepping_stone: float | None) -> None:
    """search_max's probes from a small batch up."""
    def tried(b: int, phase: str) -> dict[str, Any]:
        nonlocal lo, hi
        rec = attempt(b, phase)
        lo, hi = bracket()
        return rec

    lo, hi = bracket()

    # 1. a tiny first probe; if even that fails, halve down to 1
    b = max(1, min(cap, first))
    rec = tried(b, "probe")
    while not rec["ok"] and b > 1:
        b = max(1, b // 2)
        rec = tried(b, "probe")
    if not rec["ok"]:
        raise ConfigError(
            f"even batch size 1 does not fit in {memory.format_bytes(limit)} ({rec.get('error', 'out of memory')}); "
            "raise memory_budget, use precision='bf16' or a smaller model"
        )
    # 2. a second probe GROWTH times larger (geometric bisection if it fails), then a third aimed at 70 % of the limit
    #    from the line through the first two: the peak is convex in B, so that line errs towards smaller peaks and
    #    the third probe lands between 70 % of the limit and the limit, close enough to extrapolate from.
    b = min(cap, GROWTH * lo)
    while lo < b < hi:
        if tried(b, "probe")["ok"]:
            break
        b = math.floor(math.sqrt(lo * hi))
    model = MemoryModel.fit(points)
    if model is not None and lo < cap:
        b = min(cap, hi - 1, model.max_under(THIRD_PROBE_SHARE * limit))
        if b >= 2 * lo:
            tried(b, "probe")
    model = MemoryModel.fit(points)
    if stepping_stone is not None and model is not None and hi > cap:
        # aim 1 % low: the line errs towards smaller peaks (convexity), and anything within 2 % is accepted
        b = min(cap, math.floor(model.max_under(stepping_stone) * (1 - TOLERANCE / 2)))
        if lo < b < hi and b > math.floor(lo * (1 + TOLERANCE)):
            tried(b, "recommend")


def _predict_and_verify(attempt: Callable[[int, str], dict[str, Any]], bracket: Bracket,
                        points: dict[int, dict[str, int]], cap: int, limit: float,
                        aim: float) -> tuple[int, dict[int, dict[str, int]]]:
    """search_max's last part: predict from the fitted line, verify, bisect."""
    # 3. predict from the fit and verify; where a prediction fails, predict again from what ran (if the new
    #    prediction falls inside the bracket), else back off to 98 % of the failure once, then bisect
    verified_from_fit = False
    backed_off = False
    for _ in range(MAX_SEARCH_TRIALS):
        lo, hi = bracket()
        if hi - lo <= 1:
            break
        model = MemoryModel.fit(points)
        pred = None if model is None else min(cap, model.max_under(limit))
        if hi <= cap:  # a failure bounds the search
            if lo >= math.floor((1 - TOLERANCE) * hi):
                break
            if verified_from_fit and pred is not None and pred <= lo:  # the refit through lo agrees: stop
                break
            if pred is not None and lo < pred < hi:
                cand, phase = pred, "verify"
            elif not backed_off and 2 * lo >= hi:
                cand, phase, backed_off = max(lo + 1, math.floor((1 - TOLERANCE) * hi)), "bisect", True
            else:  # midpoint; geometric mean while the bracket spans more than a factor of 4
                cand = (lo + hi) // 2 if 4 * lo >= hi else math.floor(math.sqrt(lo * hi))
                phase = "bisect"
        elif pred is None:  # only one size ran: bisect towards the cap
            cand, phase = (lo + hi) // 2, "bisect"
        else:
            # stop when the model says nothing larger fits, or when a verified prediction's refit agrees
            if pred <= lo or (verified_from_fit and pred <= math.floor(lo * (1 + TOLERANCE))):
                break
            cand, phase = math.floor(pred * aim), "verify"
            if cand <= lo:
                cand = pred
        rec = attempt(cand, phase)
        verified_from_fit = phase == "verify" and rec["ok"]  # lo is now a verified prediction
    return bracket()[0], points


# ---------------------------------------------------------------------------------------------------------------
# Small helpers (the model kept between trials and the steps at a size: batchfit.step.ModelKeeper / StepRunner)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _scaler(precision: str) -> Any:
    return make_scaler(precision)


# ---------------------------------------------------------------------------------------------------------------
# Memory trials: the step inside a peak meter


class MemoryTrials:
    """One memory trial = a few real optimizer steps at a micro-batch size inside a :class:`memory.PeakMeter`
    (CPU: counted live bytes, the budget enforced deterministically; CUDA: the allocator's peak, a user budget
    enforced with the process memory fraction). Out-of-memory is caught by :func:`memory.try_oom`; the trial
    returns a record either way and the model goes back to its initial weights."""

    def __init__(self, workload: Workload, device: torch.device, precision: str, seed: int, limit: int,
                 enforce_bytes: int | None, cap: int | None = None, parallel: str = "ddp") -> None:
        # sharded (FSDP2 under torchrun): a sharded copy of the model; every collective of a trial is guarded
        self.sharded = parallel == "fsdp" and distributed.is_initialized()
        self.keeper: Any = (sharding.ShardedKeeper(workload, device, seed, precision) if self.sharded
                            else ModelKeeper(workload, device, seed))
        self.runner = StepRunner(workload, device, precision)
        self.device, self.precision = device, precision
        self.cap = cap if cap is not None else workload.num_train
        self.limit = limit
        self.enforce_bytes = enforce_bytes  # CPU: always the limit; CUDA: only a user budget (else real memory)

    def run(self, b: int, phase: str) -> dict[str, Any]:
        """A real trial at batch ``b`` inside the limit: ok, peak per part, or the OOM message."""
        # probes and the recommendation (under a verified maximum) measure; a size that may be the maximum (a
        # verification, a bisection step, anything at the cap) runs a verification's steps
        steps = PROBE_STEPS if phase in ("probe", "recommend") and b < self.cap else STEPS_PER_TRIAL
        rec: dict[str, Any] = {"batch_size": b, "phase": phase, "ok": False, "peak_bytes": None,
                               "samples_per_s": None, "parts": {}, "static_bytes": None, "steps": steps}
        t0 = time.perf_counter()
        model = self.keeper.get()
        optimizer, opt_state = self.keeper.optimizer(model)
        try:
            attempt = memory.try_oom(self.guarded(functools.partial(self._measure, model, optimizer, b, steps)),
                                     model, optimizer)
            self.after(attempt, model)
            if attempt.ok:
                out = attempt.value
                assert out is not None
                rec.update(ok=True, parts=out["parts"], static_bytes=out["static_bytes"],
                           peak_bytes=max(out["parts"].values()))
                if rec["peak_bytes"] > self.limit:  # CUDA without a budget: fits the device, not the limit
                    rec.update(ok=False, error=f"peak {memory.format_bytes(rec['peak_bytes'])} > limit")
            else:
                rec["error"] = _one_line(attempt.oom)  # type: ignore[arg-type]
                rec["peer"] = (isinstance(attempt.oom, sharding.PeerOutOfMemoryError)  # another rank's OOM
                               and not isinstance(attempt.oom, sharding.NoRoomError))
        finally:
            self.keeper.reset(model, optimizer, opt_state)
            del model, optimizer, opt_state  # reference counting frees the trial's optimizer state and activations
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        return rec

    def _measure(self, model: nn.Module, optimizer: torch.optim.Optimizer, b: int, steps: int) -> dict[str, Any]:
        track = [list(model.parameters()), list(model.buffers()), optimizer.state]
        with memory.PeakMeter(self.device, self.enforce_bytes, track=track) as meter:
            if self.sharded:  # every collective checks this rank's room for it first
                self.keeper.guard.headroom = lambda: self.headroom(meter)
            return self.runner.run(model, optimizer, _scaler(self.precision), b, steps, meter)

    memory_trial = run  # the name the distributed test and the benchmarks use

    def headroom(self, meter: memory.PeakMeter) -> float | None:
        """Bytes this rank may still allocate inside ``meter`` (sharded trials check it before each collective)."""
        if self.device.type == "cpu":
            return None if self.enforce_bytes is None else self.enforce_bytes - meter.live()
        allocated = torch.cuda.memory_allocated(self.device)
        if self.enforce_bytes is not None:
            return self.enforce_bytes - allocated
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - allocated

    def guarded(self, fn: Callable[[], Any], meter: memory.PeakMeter | None = None) -> Callable[[], Any]:
        """Sharded: ``fn`` with every collective guarded (one rank's OOM -> all ranks' PeerOutOfMemoryError) and a
        last check at its end; otherwise ``fn`` itself."""
        if not self.sharded:
            return fn
        guard = self.keeper.guard
        self.runner.guard = guard

        def run() -> Any:
            guard.active = True
            if meter is not None:
                guard.headroom = lambda: self.headroom(meter)
            try:
                out = fn()
                guard.finish()
                return out
            finally:
                guard.active = False
                guard.headroom = None

        return run

    def after(self, attempt: memory.Attempt[Any], model: nn.Module) -> None:
        """Sharded, after an out-of-memory: answer the other ranks' pending check, then a legal model state."""
        if self.sharded and not attempt.ok:
            self.keeper.guard.after_oom(attempt.oom)
            self.keeper.recover(model)

    def close(self) -> None:
        self.keeper.close()


# ---------------------------------------------------------------------------------------------------------------
# Throughput and evaluation sizing


def _time_throughput(trials: MemoryTrials, sizes: list[int], on_record: Callable[[dict[str, Any]], None]) -> None:
    """Time untracked steps at each size (a CPU tracker's Python overhead would distort small batches): 2 warm-up
    steps, then chunks of 3 until ``MIN_TIMED_SECONDS`` have passed or ``MAX_TIMED_STEPS`` steps ran."""
    dev, runner = trials.device, trials.runner
    model = trials.keeper.get()
    optimizer, opt_state = trials.keeper.optimizer(model)
    scaler = _scaler(trials.precision)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(model: nn.Module, optimizer: torch.optim.Optimizer, b: int) -> dict[str, Any]:
        with (memory.PeakMeter(dev, trials.enforce_bytes) if dev.type == "cuda" else _NoMeter()) as meter:
            step = runner.step(model, optimizer, scaler, b, WARMUP_MAX_STEPS + MAX_TIMED_STEPS)  # one schedule
            warm = _warm_up(lambda i: runner.run(model, optimizer, scaler, b, 1, step=step), sync,
                            agree=trials.sharded)
            steps, t0, chunks = 0, time.perf_counter(), []
            while True:  # chunks of 3 steps, one CUDA sync per chunk
                t_chunk = time.perf_counter()
                runner.run(model, optimizer, scaler, b, 3, step=step)
                steps += 3
                sync()
                chunks.append(3 * b * runner.micro_batches / max(time.perf_counter() - t_chunk, 1e-9))
                elapsed = time.perf_counter() - t0
                done = elapsed >= MIN_TIMED_SECONDS or steps >= MAX_TIMED_STEPS
                if trials.sharded:  # every rank runs as many steps (each step's collectives), decided together
                    trials.keeper.guard.check()  # (a rank's out-of-memory in the last steps is answered here)
                    done = distributed.any_flag(done)[0]
                if done:
                    break
            samples = b * runner.micro_batches * steps
            return {"samples_per_s": samples / elapsed, "timed_steps": steps, "warmup_steps": warm,
                    "chunk_samples_per_s": chunks, "peak_bytes": meter.peak()}

    done: list[dict[str, Any]] = []
    try:
        for b in sizes:
            rec: dict[str, Any] = {"batch_size": b, "phase": "throughput", "ok": False, "peak_bytes": None,
                                   "samples_per_s": None}
            t_start = time.perf_counter()
            error: str | None = None
            attempt: memory.Attempt[dict[str, Any]] = memory.Attempt()
            try:
                attempt = memory.try_oom(trials.guarded(functools.partial(timed, model, optimizer, b)), model,
                                         optimizer)
                trials.after(attempt, model)
            except Exception as exc:
                if b != 1:  # batch 1 may be invalid for a model (BatchNorm in train mode): recorded, not raised
                    raise
                error = _one_line(exc)
            if error is not None:  # outside the except block: its traceback holds the failed step's tensors
                memory.release_memory(model, optimizer)
                rec["error"] = error
            elif attempt.ok:
                rec.update(ok=True, **attempt.value)  # type: ignore[arg-type]
            else:
                rec["error"] = _one_line(attempt.oom)  # type: ignore[arg-type]
            rec["seconds"] = round(time.perf_counter() - t_start, 4)
            rec = distributed.agree_record(rec)  # torchrun: the same record on every rank
            flat = False
            if rec["ok"] and rec.get("samples_per_s"):
                done.append(rec)
                flat = _flattened(done)  # the curve is flat within the noise: larger sizes cannot be the knee
                left = [s for s in sizes if s > b]
                if flat and left:
                    rec["note"] = (f"samples/s flat over the last {FLAT_SIZES + 1} sizes (within the timing "
                                   f"noise): {', '.join(map(str, left))} not timed")
            on_record(rec)
            if flat:
                break
    finally:
        trials.keeper.reset(model, optimizer, opt_state)
        del model, optimizer, opt_state
        if dev.type == "cuda":
            torch.cuda.empty_cache()


class _NoMeter:
    """A stand-in for :class:`memory.PeakMeter` where timing must not be metered (the CPU tracker is slow)."""

    def __enter__(self) -> _NoMeter:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def peak(self) -> None:
        return None


def _size_evaluation(trials: MemoryTrials, b_train: int, limit: float, on_record: Callable[[dict[str, Any]], None],
                     aim: float = 1.0) -> int | None:
    """Size evaluation on its own: the training state of batch ``b_train`` stays live beside it, as in training
    (the optimizer state, made by one small step, and the last training batch, still referenced by the loop)."""
    wl, dev = trials.keeper.workload, trials.device
    if wl.val_data is None:
        return None
    val = data.val_source(wl)
    assert val is not None
    model = trials.keeper.get()
    optimizer, opt_state = trials.keeper.optimizer(model)
    try:
        track = [list(model.parameters()), list(model.buffers()), optimizer.state]
        with memory.PeakMeter(dev, trials.enforce_bytes, track=track) as meter:
            trials.runner.run(model, optimizer, _scaler(trials.precision), min(b_train, 2), 1)
            last_batch = trials.runner.batch(b_train)  # held on the host, as training holds it (the step moves
            # each micro-batch to the device and frees it; on the CPU host memory is the device's)

            def run(b: int, phase: str) -> dict[str, Any]:
                rec: dict[str, Any] = {"batch_size": b, "phase": "eval", "ok": False, "peak_bytes": None,
                                       "samples_per_s": None, "parts": {}, "train_batch_size": b_train}
                t0 = time.perf_counter()
                static = meter.live()
                meter.reset()
                attempt = memory.try_oom(trials.guarded(lambda: _eval_batches(wl, model, val, b, dev,
                                                                               trials.precision)))
                trials.after(attempt, model)
                if attempt.ok:
                    peak = meter.peak()
                    rec.update(ok=peak <= limit, peak_bytes=peak, parts={"eval": peak}, static_bytes=static)
                else:
                    rec["error"] = _one_line(attempt.oom)  # type: ignore[arg-type]
                rec["seconds"] = round(time.perf_counter() - t0, 4)
                rec = distributed.agree_record(rec)  # torchrun: one rank's OOM fails the size on all ranks
                on_record(rec)
                return rec

            best, _ = search_max(run, cap=val.num_samples, limit=limit, aim=aim)
            del last_batch
    finally:
        trials.keeper.reset(model, optimizer, opt_state)
    return best


def _eval_batches(workload: Workload, model: nn.Module, source: Any, b: int, device: torch.device,
                  precision: str) -> None:
    """Two evaluation batches of ``b`` through the one evaluation pass ``engine.evaluate`` runs
    (:func:`batchfit.step.eval_pass`: loss, then every metric, then freed)."""
    eval_pass(workload, model, (source.sample(b) for _ in range(2)), device=device, precision=precision)


# ---------------------------------------------------------------------------------------------------------------
# The public function


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: rec.get(k) for k in ("batch_size", "ok", "peak_bytes", "samples_per_s", "phase")}
    for k in ("parts", "error", "seconds", "steps", "timed_steps", "train_batch_size", "warmup_steps",
              "chunk_samples_per_s", "note"):
        if rec.get(k) not in (None, {}):
            out[k] = rec[k]
    if "parts" in out:
        out["peak_bytes_by_part"] = out.pop("parts")
    return out


def _warm_up(step: Callable[[int], None], sync: Callable[[], None], agree: bool = False) -> int:
    """Run single steps until one takes within :data:`WARMUP_STEADY` of the one before (lazy initialisation,
    the allocator and the optimizer state settle: a cold batch-1 loop can read 30x slow), at least 2 and at most
    :data:`WARMUP_MAX_STEPS`; returns the steps run. ``agree`` (sharded ranks, whose steps are collectives): it
    stops when every rank is steady, so all run as many steps."""
    last = None
    for i in range(WARMUP_MAX_STEPS):
        t0 = time.perf_counter()
        step(i)
        sync()
        dt = time.perf_counter() - t0
        steady = i >= 1 and last is not None and abs(dt - last) <= WARMUP_STEADY * last
        if agree:
            steady = not distributed.any_flag(not steady)[0]
        if steady:
            return i + 1
        last = dt
    return WARMUP_MAX_STEPS


def _rate(rec: Mapping[str, Any]) -> Any:
    """A timed size's samples/s: the median over its chunks with a distribution-free interval."""
    from batchfit.stats import median_interval

    chunks = [float(x) for x in rec.get("chunk_samples_per_s") or [] if x and math.isfinite(x)]
    return median_interval(chunks) if chunks else None


def _flattened(done: list[dict[str, Any]]) -> bool:
    """The curve has flattened: the last :data:`FLAT_SIZES` timed sizes are tied with the best before them within
    the timing noise (their chunk-median intervals overlap the best's; without intervals, medians within 5 %). A
    size clearly slower or faster is not flat (a load burst, or the curve still rising): timing goes on. At least
    4 sizes are timed before it can stop."""
    if len(done) < max(4, FLAT_SIZES + 1):
        return False
    best = max(done[:-FLAT_SIZES], key=lambda r: r["samples_per_s"])
    b_iv = _rate(best)
    for rec in done[-FLAT_SIZES:]:
        iv = _rate(rec)
        if iv is None or b_iv is None:
            return False
        if iv.known and b_iv.known:
            if not iv.overlaps(b_iv):
                return False
        elif abs(iv.estimate / b_iv.estimate - 1) > 1 - KNEE_SHARE:
            return False
    return True


def _knee_of(rates: Mapping[int, float]) -> int:
    best = max(rates.values())
    return min(b for b, r in rates.items() if r >= KNEE_SHARE * best)


def _knee(records: list[dict[str, Any]]) -> int | None:
    timed = [r for r in records if r["phase"] == "throughput" and r["ok"] and r["samples_per_s"]]
    if not timed:
        return None
    return _knee_of({r["batch_size"]: r["samples_per_s"] for r in timed})


def knee_spread(records: list[dict[str, Any]], *, seed: int = 0) -> list[int] | None:
    """The knee's 95 % range: the knee of :data:`KNEE_BOOTSTRAP` resamples of every timed size's chunks (the
    median of each resample); ``None`` when no size was timed in chunks. A knee that flips between 64 and 128 on
    a rerun shows here as [64, 128]."""
    import numpy as np

    timed = [r for r in records if r["phase"] == "throughput" and r["ok"] and r.get("chunk_samples_per_s")]
    if not timed:
        return None
    rng = np.random.default_rng(seed)
    knees = []
    for _ in range(KNEE_BOOTSTRAP):
        rates = {}
        for r in timed:
            c = np.asarray(r["chunk_samples_per_s"], dtype=float)
            rates[r["batch_size"]] = float(np.median(c[rng.integers(0, len(c), len(c))]))
        knees.append(_knee_of(rates))
    lo, hi = np.quantile(knees, [0.025, 0.975], method="nearest")
    return [int(lo), int(hi)]


@dataclass(frozen=True)
class _Plan:
    """The validated inputs of one search."""

    device: torch.device
    budget: int | None  # the user's budget (bytes), if any
    limit: int  # what the search must stay under: the budget or the memory available (the tightest rank's)
    enforce: int | None  # CPU: always the limit; CUDA: only a user budget (else the allocator's real limit)
    cap: int  # the largest size tried: the cap, the training set, the rank's share of it under torchrun
    margin: float
    seed: int


def _plan(wl: Workload, device: Any, precision: str, memory_budget: Any, cap: int | None, margin: Any,
          seed: Any) -> _Plan:
    dev = resolve_device(device)
    check_precision(precision, dev)
    margin = checks.fraction("margin", margin, low_open=False)
    checks.positive_int("batch_size_cap", cap, allow_none=True)
    seed = checks.seed(seed)
    budget = memory.parse_bytes(memory_budget, "memory_budget")
    if budget is not None and dev.type == "cuda":
        memory.cuda_budget_fraction(budget, dev)  # a budget larger than the GPU is an error up front
    if dev.type == "cuda":
        torch.cuda.init()  # before the RNG states are saved: seeding a not-yet-initialised device is deferred
        torch.cuda.empty_cache()
    limit = budget if budget is not None else memory.available_bytes(dev)
    if limit is None:
        raise ConfigError("cannot tell how much memory is available here; give memory_budget")
    # with accumulation a trial's batch holds k micro-batches: the micro-batch can be at most the data set / k
    size = max(1, wl.num_train // accumulation_count(wl))
    size = size if cap is None else min(size, cap)
    enforce = limit if dev.type == "cpu" else budget  # each rank enforces its own budget
    if distributed.world_size() > 1:  # torchrun: sizes are per device; predictions use the tightest rank's limit
        size = min(size, max(1, wl.num_train // distributed.world_size()))
        limit = int(distributed.all_min(limit)[0])
    return _Plan(dev, budget, limit, enforce, size, margin, seed)


def _verified_max(max_bs: int, records: list[dict[str, Any]], run: Callable[[int, str], dict[str, Any]]) -> int:
    """The maximum must have run a verification's steps (it can be a probe, rarely: run it again)."""
    def verified() -> set[int]:
        return {r["batch_size"] for r in records
                if r["phase"] in MEMORY_PHASES and r["ok"] and r.get("steps", 0) >= STEPS_PER_TRIAL}

    while max_bs not in verified():
        if run(max_bs, "verify")["ok"]:
            break
        ok_below = [r["batch_size"] for r in records if r["phase"] in MEMORY_PHASES and r["ok"]
                    and r["batch_size"] < max_bs]
        if not ok_below:
            raise ConfigError(f"batch size {max_bs} fit in a probe but not in {STEPS_PER_TRIAL} steps; "
                              "memory grows from step to step: check the workload for a leak")
        max_bs = max(ok_below)
    return max_bs


def _recommend(max_bs: int, target: float, records: list[dict[str, Any]], points: dict[int, dict[str, int]],
               run: Callable[[int, str], dict[str, Any]]) -> int:
    """The recommendation: the largest size whose peak keeps the margin under the limit, itself run (usually
    already, as the stepping stone); ``points`` gains what it runs."""
    ok_sizes = {r["batch_size"]: r for r in records
                if r["phase"] in MEMORY_PHASES and r["ok"] and r["batch_size"] <= max_bs}
    model = MemoryModel.fit(points)
    want = max_bs if model is None else min(max_bs, model.max_under(target))
    for _ in range(4):
        under = [b for b, r in ok_sizes.items() if r["peak_bytes"] <= target]
        if under and max(under) >= want * (1 - TOLERANCE):
            return max(under)  # a size already run is close enough
        if want < 1:
            break
        if want in ok_sizes:  # ran, but above the margin: the line was optimistic here
            want = math.floor(want * (1 - TOLERANCE))
            continue
        rec = run(want, "recommend")
        if not rec["ok"]:
            want = math.floor(want * (1 - TOLERANCE))
            continue
        ok_sizes[want] = rec
        points[want] = rec["parts"]
        model = MemoryModel.fit(points)
        if model is not None:
            want = min(max_bs, model.max_under(target))
    under = [b for b, r in ok_sizes.items() if r["peak_bytes"] <= target]
    return max(under) if under else min(ok_sizes)


def _memory_model_dict(model: MemoryModel | None, max_bs: int) -> dict[str, Any]:
    out: dict[str, Any] = {"fixed_bytes": None, "per_sample_bytes": None, "parts": {}}
    if model is not None:
        part, fixed, slope = model.binding(max_bs)
        out.update(fixed_bytes=int(round(fixed)), per_sample_bytes=int(round(slope)), binding_part=part,
                   parts={k: {"fixed_bytes": int(round(f)), "per_sample_bytes": int(round(s))}
                          for k, (f, s) in model.parts.items()})
    return out


def _extras(wl: Workload, recommended: int, micro_only: bool, parallel: str, sharded: bool,
            records: list[dict[str, Any]], model: Any, max_bs: int, largest_unit: int, plan: Any) -> dict[str, Any]:
    """The result's accumulation, world size and global-batch split, and under sharding the per-rank memory model
    with the split at other world sizes."""
    extras: dict[str, Any] = {}
    if not micro_only:
        accumulation = max(1, math.ceil(wl.base_batch_size / recommended))
        extras.update(accumulation_steps=accumulation, effective_batch_size=recommended * accumulation)
    world = distributed.world_size()
    extras["world_size"] = world
    extras["parallel"] = parallel if sharded or world > 1 else "none"
    # the workload's base batch as a global batch on this world: micro-batch x accumulation x world size
    extras["global_batch"] = sharding.plan_global_batch(wl.base_batch_size, world, recommended)
    if sharded:
        static = [r["static_bytes"] for r in records if r["phase"] in MEMORY_PHASES and r["ok"]
                  and r.get("static_bytes") is not None]
        extras["sharding"] = sharding.per_rank_model(
            _memory_model_dict(model, max_bs), static_bytes=max(static) if static else None,
            largest_unit_bytes=largest_unit, world_size=world, limit=plan.limit, margin=plan.margin)
        # the same global batch (and so the same LR) at other world sizes: the accumulation adjusts
        extras["sharding"]["global_batch_by_world"] = {
            w: sharding.plan_global_batch(wl.base_batch_size, int(w), m)
            for w, m in extras["sharding"]["per_rank_recommended_by_world"].items()}
    return extras


def plan_guess(wl: Workload, device: torch.device, precision: str, limit: int, margin: float,
               cap: int) -> dict[str, Any]:
    """What :func:`batchfit.plan` predicts for this search on a CUDA device: the largest batch under ``limit``, the
    recommendation under the margin, and the line of peaks (``fixed_bytes`` + ``per_sample_bytes`` x B) to compare
    with the measurement. ``{"error": why}`` when it cannot plan (the search then goes on without it)."""
    from batchfit.planner import CUDA_CONTEXT_BYTES, DEVICES, lookup, plan

    try:
        name = torch.cuda.get_device_name(device)
        try:
            spec = lookup(name)
        except ConfigError:  # not in the table: a row of the same architecture (only the memory rules matter here)
            major = torch.cuda.get_device_capability(device)[0]
            spec = next((d for d in DEVICES.values() if d.compute_capability[0] == major), DEVICES["H100-80GB"])
        result = plan(wl, gpu=spec, precision=precision, batch_sizes=[1], margin=margin, batch_size_cap=cap,
                      memory_bytes=int(limit) + CUDA_CONTEXT_BYTES)
    except Exception as exc:  # noqa: BLE001 - any failure of the plan: the search runs as without one
        return {"error": _one_line(exc)}
    return {"gpu": spec.name, "device_name": name, "predicted_max_batch_size": result.limit_batch_size,
            "predicted_recommended_batch_size": result.max_batch_size, "fixed_bytes": result.fixed_bytes,
            "per_sample_bytes": result.per_sample_bytes, "seconds": round(result.seconds, 3)}


def _plan_vs_measured(guess: dict[str, Any], records: list[dict[str, Any]], max_bs: int) -> dict[str, Any]:
    """The plan's prediction next to the measurement: the largest batch, and the peak at the measured largest."""
    out = dict(guess)
    if "error" in guess:
        return out
    measured = [r["peak_bytes"] for r in records if r["batch_size"] == max_bs and r["ok"] and r.get("peak_bytes")]
    out.update(measured_max_batch_size=max_bs,
               predicted_peak_bytes_at_max=guess["fixed_bytes"] + guess["per_sample_bytes"] * max_bs,
               measured_peak_bytes_at_max=max(measured) if measured else None,
               probes=sum(r["phase"] in MEMORY_PHASES for r in records))
    return out


def plan_vs_measured_line(planned: Mapping[str, Any]) -> str:
    """One line: the plan's largest batch and peak against the measured ones (or why there was no plan)."""
    if "error" in planned:
        return f"no plan ({planned['error']})"
    pred, meas = planned.get("predicted_peak_bytes_at_max"), planned.get("measured_peak_bytes_at_max")
    peak = (f"peak at {planned.get('measured_max_batch_size')} {memory.format_bytes(pred)} vs "
            f"{memory.format_bytes(meas)}" if pred is not None and meas is not None else "peak not measured")
    return (f"largest batch {planned.get('predicted_max_batch_size')} vs {planned.get('measured_max_batch_size')}, "
            f"{peak} ({planned.get('gpu')}, {planned.get('probes')} real trials)")


def find_batch_size(
    workload: Workload | str,
    *,
    device: str | torch.device | None = "cpu",
    precision: str = "fp32",
    memory_budget: int | str | None = None,
    batch_size_cap: int | None = None,
    margin: float = 0.05,
    throughput: bool = True,
    micro_batch_size_only: bool = True,
    seed: int = 0,
    progress: ProgressFn | None = None,
    max_batch_size: int | None = None,
    parallel: str = "ddp",
) -> FindResult:
    """Find the largest training (micro-)batch that fits (verified), a recommended one with headroom, and the knee.

    Args:
        memory_budget: bytes or e.g. ``"512MiB"``. On the CPU it is enforced by counting live tensor bytes (an
            allocation beyond it raises an OOM, deterministically); on CUDA with
            ``torch.cuda.set_per_process_memory_fraction``. ``None``: the memory available now is the limit.
        batch_size_cap: never try larger (the training-set size caps too). ``max_batch_size`` is its old name
            (deprecated: in the result ``max_batch_size`` is the largest batch *found*).
        margin: headroom for ``recommended_batch_size``: its predicted and measured peak stays under
            ``(1 - margin) x limit``.
        throughput: time samples/s at powers of two up to the max and report the knee.
        micro_batch_size_only: the sizes found are micro-batches (one forward/backward). With ``False`` the result
            also says how many accumulation steps reach the workload's ``base_batch_size`` at the recommended size.
        progress: receives :class:`batchfit.progress.ProgressEvent` s of stage ``find``: ``start``, a ``record``
            per trial as it completes (``data``: the trial's public record), ``end`` with the one-line result.
        parallel: under torchrun, ``ddp`` (every rank holds the whole model) or ``fsdp`` (FSDP2: every trial
            trains a sharded model, every out-of-memory is decided by all ranks together; sizes are per rank and
            the result's ``sharding`` holds the per-rank memory model: the sharded state, the largest all-gathered
            unit, activations per sample, and the per-rank maximum predicted at other world sizes). Without a
            process group both train one unsharded model.

    >>> r = find_batch_size("demo:digits-mlp", memory_budget="1MiB", throughput=False)
    >>> r.max_batch_size >= r.recommended_batch_size
    True
    """
    t_start = time.perf_counter()
    if max_batch_size is not None:
        if batch_size_cap is not None:
            raise ConfigError("give batch_size_cap only (max_batch_size is its deprecated name)")
        checks.positive_int("max_batch_size", max_batch_size)  # named as the caller wrote it
        warnings.warn("find_batch_size(max_batch_size=) is deprecated: the input cap is batch_size_cap "
                      "(max_batch_size is the largest batch found, in the result)", DeprecationWarning, stacklevel=2)
        batch_size_cap = max_batch_size
    wl = load_workload(workload)
    sharding.check_parallel(parallel, precision)
    plan = _plan(wl, device, precision, memory_budget, batch_size_cap, margin, seed)
    records: list[dict[str, Any]] = []

    def note(rec: dict[str, Any]) -> None:
        records.append(rec)
        emit(progress, "find", "record", f"{rec['phase']} {rec['batch_size']}", completed=len(records),
             **_public(rec))

    emit(progress, "find", "start", f"largest batch that fits {memory.format_bytes(plan.limit)}")
    rng = _rng_states()
    trials = MemoryTrials(wl, plan.device, precision, plan.seed, plan.limit, plan.enforce, plan.cap, parallel)
    largest_unit = 0
    try:

        def run(b: int, phase: str) -> dict[str, Any]:
            rec = distributed.agree_record(trials.run(b, phase))  # torchrun: one OOM -> all back off
            note(rec)
            return rec

        target = (1.0 - plan.margin) * plan.limit
        aim = CUDA_AIM if plan.device.type == "cuda" else 1.0
        guess = None
        if plan.device.type == "cuda" and distributed.world_size() == 1:  # the plan is the first prediction
            guess = plan_guess(wl, plan.device, precision, plan.limit, plan.margin, plan.cap)
        seed_sizes = None if guess is None or "error" in guess else \
            (guess["predicted_recommended_batch_size"], guess["predicted_max_batch_size"])
        max_bs, points = search_max(run, cap=plan.cap, limit=plan.limit,
                                    stepping_stone=target if plan.margin > 0 else None, aim=aim, guess=seed_sizes)
        max_bs = _verified_max(max_bs, records, run)
        recommended = _recommend(max_bs, target, records, points, run)
        model = MemoryModel.fit(points)
        try:  # evaluation, sized on its own at the recommended training batch
            eval_bs = _size_evaluation(trials, recommended, target, note, aim=aim)
        except ConfigError:  # not even one evaluation sample fits beside the training state
            eval_bs = None
        if throughput:  # powers of two up to the max, and the knee
            sizes = sorted({2**k for k in range(max_bs.bit_length()) if 2**k <= max_bs} | {max_bs, recommended})
            _time_throughput(trials, sizes, note)
        if trials.sharded:
            largest_unit = max(sharding.unit_bytes(trials.keeper.get()).values(), default=0)
    finally:
        trials.close()
        _restore_rng(rng)

    if max_bs < plan.cap:
        limited_by = "memory"
    else:
        limited_by = "max_batch_size" if batch_size_cap is not None and batch_size_cap == plan.cap else "dataset"
    extras = _extras(wl, recommended, micro_batch_size_only, parallel, trials.sharded, records, model, max_bs,
                     largest_unit, plan)
    if throughput:
        extras["throughput_knee_range"] = knee_spread(records, seed=plan.seed)
    if guess is not None:
        extras["plan"] = _plan_vs_measured(guess, records, max_bs)
    result = FindResult(
        device=str(plan.device), precision=precision, memory_budget_bytes=plan.budget, max_batch_size=max_bs,
        recommended_batch_size=recommended, throughput_knee_batch_size=_knee(records),
        memory_model=_memory_model_dict(model, max_bs), probes=[_public(r) for r in records],
        real_trials=sum(r["phase"] in MEMORY_PHASES for r in records), seconds=time.perf_counter() - t_start,
        eval_batch_size=eval_bs, workload=wl.name, memory_limit_bytes=plan.limit, margin=plan.margin,
        limited_by=limited_by, throughput_trials=sum(r["phase"] == "throughput" for r in records),
        eval_trials=sum(r["phase"] == "eval" for r in records), batch_size_cap=batch_size_cap,
        regime=trials.runner.regime(), extras=extras,
    )
    emit(progress, "find", "end", f"fits {max_bs}, recommended {recommended}", completed=len(records))
    return result
