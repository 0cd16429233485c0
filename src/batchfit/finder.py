"""The batch-size finder: predict the largest batch that fits from a few small real probes, then verify it.

Method (see docs/finder.md):

1. Probe: run real optimizer steps (2 each; the peak is measured in the 2nd step, when the optimizer state exists) at a
   tiny batch, at 16 times that, and at the size the line through those two puts at 70 % of the memory limit (the
   peak is convex in B, so that line errs low and the probe lands below the limit). Peaks are measured separately
   for the forward/backward part and the optimizer part of a step, because at small batches the optimizer's
   temporaries, not the activations, can set the peak.
2. Fit ``peak = fixed + per_sample * B`` for each part from the two largest sizes that fit, and predict the largest
   B whose peak stays under the limit (the budget, or the memory available).
3. Run the size predicted for the margin (the recommendation), refit through it, verify the predicted maximum with
   real steps and refit; only where a prediction fails, back off just below the failure and then bisect. Every
   size reported was run.
4. The recommendation keeps a headroom ``margin`` (re-fitted, and itself run); evaluation is sized separately (its
   own search, at the recommended training batch); throughput is timed at powers of two up to the max, and the
   knee is the smallest batch within 5 % of the best samples/s.

The maximum reported ran at least 3 optimizer steps; the recommendation, under it, at least 2. The model is
built from ``model_fn`` once and every trial starts from its initial weights with a fresh optimizer. Nothing the
caller can see changes: a model object ``model_fn`` hands back is returned to its device with its weights bit for
bit, and the Python, NumPy and torch (CPU and CUDA) random states are restored.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from batchfit import distributed, memory
from batchfit.engine import (
    Batcher,
    autocast,
    build_model,
    check_positive_int,
    check_precision,
    compute_loss,
    resolve_device,
    to_device,
)
from batchfit.errors import ConfigError, WorkloadError
from batchfit.workload import Workload, load_workload

PHASES = ("probe", "verify", "bisect", "recommend", "throughput", "eval")
MEMORY_PHASES = ("probe", "verify", "bisect", "recommend")
STEPS_PER_TRIAL = 3  # optimizer steps per verifying trial; peaks are read from step 2 on (optimizer state exists)
PROBE_STEPS = 2  # a probe (and the recommendation, under a verified maximum) measures: its peak is read in step 2
GROWTH = 16  # the second probe is this many times the first
THIRD_PROBE_SHARE = 0.7  # the third probe aims at this share of the limit (close enough to extrapolate well)
TOLERANCE = 0.02  # after a failed prediction, back off to 98 % of the failing size before bisecting
KNEE_SHARE = 0.95  # the knee: the smallest batch with >= 95 % of the best measured samples/s
MIN_TIMED_SECONDS = 0.3  # throughput: time at least this long (and at least 3 steps) per batch size
MAX_SEARCH_TRIALS = 40
# CUDA: the caching allocator cannot hand out the last bytes of the device (2 MiB segment rounding, fragmentation,
# cuDNN workspaces), so a prediction from allocated-bytes peaks is verified this much lower. On an H100 (ResNet-50,
# fp32) the line through two fitting sizes predicted 967-970 where 960 was the true largest batch: 0.8 % high.
CUDA_AIM = 0.99


@dataclass
class FindResult:
    """What ``find_batch_size`` measured; ``to_dict()`` is the JSON ``batchfit find`` writes.

    ``max_batch_size`` is the largest size verified to fit; ``recommended_batch_size`` keeps the margin and was run
    too. ``memory_budget_bytes`` is the user's budget (``None``: the device's available memory was the limit,
    given as ``memory_limit_bytes``).
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
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extras"))
        return d


# ---------------------------------------------------------------------------------------------------------------
# The memory model: one line per part of a step, the peak is the highest line


@dataclass
class MemoryModel:
    """``peak(B) = max over parts of (fixed + per_sample * B)``, each part fitted through two measured sizes."""

    parts: dict[str, tuple[float, float]]  # part -> (fixed_bytes, per_sample_bytes)

    @classmethod
    def fit(cls, points: dict[int, dict[str, int]]) -> MemoryModel | None:
        """Fit from ``{batch: {part: peak}}`` using the two largest sizes (the line is local to where it is used)."""
        if len(points) < 2:
            return None
        (b1, p1), (b2, p2) = sorted(points.items())[-2:]
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
) -> tuple[int, dict[int, dict[str, int]]]:
    """Largest batch in ``[1, cap]`` for which ``run(b, phase)`` reports ``ok``: probe, predict, verify, bisect.

    ``run`` returns a record with ``ok``, ``parts`` ({part: peak bytes}) and ``static_bytes`` (what is live before
    the batch: parameters, gradients, optimizer state). With ``stepping_stone`` (the margin's peak), the size
    predicted for it runs first (phase ``recommend``): it is the recommendation, and the line through it predicts
    the maximum from close by. With ``aim`` < 1 an unbracketed prediction is verified that much lower (CUDA: the
    allocator cannot hand out the last ~1 % of the device). Returns the largest size that ran and the fitted points.
    Raises :class:`ConfigError` when even batch 1 does not fit.
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

    # 1. a tiny first probe; if even that fails, halve down to 1
    b = max(1, min(cap, first))
    rec = attempt(b, "probe")
    while not rec["ok"] and b > 1:
        b = max(1, b // 2)
        rec = attempt(b, "probe")
    if not rec["ok"]:
        raise ConfigError(
            f"even batch size 1 does not fit in {memory.format_bytes(limit)} ({rec.get('error', 'out of memory')}); "
            "raise --memory-budget, use --precision bf16 or a smaller model"
        )
    # 2. a second probe GROWTH times larger (geometric bisection if it fails), then a third aimed at 70 % of the limit
    #    from the line through the first two: the peak is convex in B, so that line errs towards smaller peaks and
    #    the third probe lands between 70 % of the limit and the limit, close enough to extrapolate from.
    b = min(cap, GROWTH * lo)
    while lo < b < hi:
        if attempt(b, "probe")["ok"]:
            break
        b = math.floor(math.sqrt(lo * hi))
    model = MemoryModel.fit(points)
    if model is not None and lo < cap:
        b = min(cap, hi - 1, model.max_under(THIRD_PROBE_SHARE * limit))
        if b >= 2 * lo:
            attempt(b, "probe")
    model = MemoryModel.fit(points)
    if stepping_stone is not None and model is not None and hi > cap:
        # aim 1 % low: the line errs towards smaller peaks (convexity), and anything within 2 % is accepted
        b = min(cap, math.floor(model.max_under(stepping_stone) * (1 - TOLERANCE / 2)))
        if lo < b < hi and b > math.floor(lo * (1 + TOLERANCE)):
            attempt(b, "recommend")
    # 3. predict from the fit and verify; where a prediction fails, predict again from what ran (if the new
    #    prediction falls inside the bracket), else back off to 98 % of the failure once, then bisect
    verified_from_fit = False
    backed_off = False
    for _ in range(MAX_SEARCH_TRIALS):
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
    return lo, points


# ---------------------------------------------------------------------------------------------------------------
# Trials


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


class _Trials:
    """Runs real training steps at a batch size, every trial on one model reset to its initial weights.

    ``close()`` hands the model back (device, weights, training flag); ``find_batch_size`` calls it at the end.
    """

    def __init__(self, workload: Workload, device: torch.device, precision: str, seed: int,
                 limit: int, enforce_bytes: int | None, cap: int | None = None) -> None:
        self.workload = workload
        self.cap = cap if cap is not None else workload.num_train
        self.device = device
        self.precision = precision
        self.seed = seed
        self.limit = limit
        self.enforce_bytes = enforce_bytes  # CPU: always the limit; CUDA: only a user budget (else real memory)
        self.train_batcher = Batcher(workload.train_data, workload.collate_fn)
        self.val_batcher = (Batcher(workload.val_data, workload.collate_fn)
                            if workload.val_data is not None else None)
        self._model: nn.Module | None = None
        self._snap: dict[str, Any] = {}

    # -- building and restoring --------------------------------------------------------------------------------
    def _seed(self) -> None:
        torch.random.default_generator.manual_seed(self.seed)  # CPU generator only: CUDA seeds stay untouched
        if self.device.type == "cuda":
            torch.cuda.manual_seed(self.seed)

    def build(self) -> tuple[nn.Module, torch.optim.Optimizer, Any, dict[str, Any]]:
        """The model in its initial state, a fresh optimizer (and fp16 scaler) for one trial.

        The model is built once per finder and reused: a trial starts from the initial weights (copied back in
        place), which costs a host-to-device copy instead of a model construction per trial.
        """
        if self._model is None:
            self._seed()
            model = build_model(self.workload)
            # a model_fn may hand back the same object every time: keep a CPU copy and put it back at close()
            tensors = list(model.parameters()) + list(model.buffers())
            self._snap = {
                "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict(keep_vars=True).items()},
                "device": tensors[0].device if tensors else torch.device("cpu"),
                "training": model.training,
            }
            model.to(self.device)
            self._model = model
        model = self._model
        model.train()
        self._seed()
        try:
            optimizer = self.workload.optimizer_fn(model.parameters(), self.workload.base_lr)
        except Exception as exc:
            raise WorkloadError(f"optimizer_fn raised {type(exc).__name__}: {exc}") from exc
        opt_snap = copy.deepcopy(optimizer.state_dict())  # an optimizer_fn may hand back one object too
        scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        return model, optimizer, scaler, opt_snap

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, opt_snap: dict[str, Any]) -> None:
        """Back to the initial weights (in place, on the device) and the optimizer's initial state."""
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.load_state_dict(self._snap["state"])
        optimizer.load_state_dict(opt_snap)

    def close(self) -> None:
        """Hand the model back as it came: its device, weights and training flag."""
        if self._model is None:
            return
        model, snap = self._model, self._snap
        self._model, self._snap = None, {}
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.to(snap["device"])
            model.load_state_dict(snap["state"])
        model.train(snap["training"])
        del model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- steps -------------------------------------------------------------------------------------------------
    def make_batch(self, b: int) -> Any:
        if self.workload.sample_batch is not None:  # the workload's worst case (largest / longest) batch
            return self.workload.sample_batch(b)
        return self.train_batcher(torch.arange(b))

    def train_steps(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, b: int, steps: int,
                    meter: memory.PeakMeter | None) -> dict[str, Any]:
        """``steps`` optimizer steps, written like the engine's loop (the same references stay alive)."""
        dev = self.device
        parts = {"forward_backward": 0, "optimizer": 0}
        static = 0
        batch = None
        for s in range(steps):
            measuring = meter is not None and s >= 1
            if measuring:
                static = max(static, meter.live() + _param_bytes(model))  # + the gradients to come
                meter.reset()
            batch = to_device(self.make_batch(b), dev)
            with autocast(self.precision, dev):
                loss, _, _ = compute_loss(self.workload, model, batch)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if measuring:
                parts["forward_backward"] = max(parts["forward_backward"], meter.peak())
                meter.reset()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if measuring:
                parts["optimizer"] = max(parts["optimizer"], meter.peak())
        return {"parts": parts, "static_bytes": static, "last_batch": batch}

    def memory_trial(self, b: int, phase: str) -> dict[str, Any]:
        """A real trial at batch ``b`` inside the limit: ok, peak per part, or the OOM message."""
        rec: dict[str, Any] = {"batch_size": b, "phase": phase, "ok": False, "peak_bytes": None,
                               "samples_per_s": None, "parts": {}, "static_bytes": None}
        t0 = time.perf_counter()
        # probes and the recommendation (it lies under a maximum that is verified) measure; a size that may be the
        # maximum (a verification, a bisection step, anything at the cap) runs a verification's steps
        steps = PROBE_STEPS if phase in ("probe", "recommend") and b < self.cap else STEPS_PER_TRIAL
        rec["steps"] = steps
        model, optimizer, scaler, snap = self.build()
        error: str | None = None
        try:
            try:
                track = [list(model.parameters()), list(model.buffers()), optimizer.state]
                with memory.PeakMeter(self.device, self.enforce_bytes, track=track) as meter:
                    out = self.train_steps(model, optimizer, scaler, b, steps, meter)
                    del out["last_batch"]
                rec.update(ok=True, parts=out["parts"], static_bytes=out["static_bytes"],
                           peak_bytes=max(out["parts"].values()))
                if rec["peak_bytes"] > self.limit:  # CUDA without a budget: fits the device, not the limit
                    rec.update(ok=False, error=f"peak {memory.format_bytes(rec['peak_bytes'])} > limit")
            except Exception as exc:
                if not memory.is_oom(exc):
                    raise
                error = _one_line(exc)
            if error is not None:  # free outside the except block: its traceback keeps the step's tensors alive
                rec["error"] = error
                memory.release_memory(model, optimizer)
        finally:
            self.restore(model, optimizer, snap)
            del model, optimizer, snap  # reference counting frees the trial's optimizer state and activations
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        return rec

    def throughput(self, sizes: list[int], on_record: Callable[[dict[str, Any]], None]) -> None:
        """Time untracked steps (a CPU tracker's Python overhead would distort small batches) at each size."""
        dev = self.device
        model, optimizer, scaler, snap = self.build()
        try:
            for b in sizes:
                rec: dict[str, Any] = {"batch_size": b, "phase": "throughput", "ok": False, "peak_bytes": None,
                                       "samples_per_s": None}
                t_start = time.perf_counter()
                error: str | None = None
                ctx = memory.PeakMeter(dev, self.enforce_bytes) if dev.type == "cuda" else None
                try:
                    if ctx is not None:
                        ctx.__enter__()
                    try:
                        self.train_steps(model, optimizer, scaler, b, 2, None)  # warm-up (and optimizer state)
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
                        steps, t0 = 0, time.perf_counter()
                        while True:  # chunks of 3 steps, one CUDA sync per chunk
                            self.train_steps(model, optimizer, scaler, b, 3, None)
                            steps += 3
                            if dev.type == "cuda":
                                torch.cuda.synchronize(dev)
                            elapsed = time.perf_counter() - t0
                            if elapsed >= MIN_TIMED_SECONDS or steps >= 48:
                                break
                        rec.update(ok=True, samples_per_s=b * steps / elapsed, timed_steps=steps)
                        if ctx is not None:
                            rec["peak_bytes"] = ctx.peak()
                    finally:
                        if ctx is not None:
                            ctx.__exit__(None, None, None)
                except Exception as exc:
                    if not memory.is_oom(exc) and b != 1:  # batch 1 may be invalid for a model (BatchNorm)
                        raise
                    error = _one_line(exc)
                if error is not None:
                    rec["error"] = error
                    memory.release_memory(model, optimizer)
                rec["seconds"] = round(time.perf_counter() - t_start, 4)
                rec = distributed.agree_record(rec)  # torchrun: the same record on every rank
                on_record(rec)
        finally:
            self.restore(model, optimizer, snap)
            del model, optimizer, snap
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    def eval_search(self, b_train: int, limit: float, on_record: Callable[[dict[str, Any]], None],
                    aim: float = 1.0) -> int | None:
        """Size evaluation on its own: the training state of batch ``b_train`` stays live, as in training."""
        if self.val_batcher is None:
            return None
        dev = self.device
        cap = len(self.workload.val_data)  # type: ignore[arg-type]
        model, optimizer, scaler, snap = self.build()
        try:
            track = [list(model.parameters()), list(model.buffers()), optimizer.state]
            with memory.PeakMeter(dev, self.enforce_bytes, track=track) as meter:
                # the training state evaluation runs beside: the optimizer state (one step at a small batch makes
                # it: its size does not depend on the batch) and the last training batch, still referenced
                self.train_steps(model, optimizer, scaler, min(b_train, 2), 1, None)
                last_batch = to_device(self.make_batch(b_train), dev)

                def run(b: int, phase: str) -> dict[str, Any]:
                    rec: dict[str, Any] = {"batch_size": b, "phase": "eval", "ok": False, "peak_bytes": None,
                                           "samples_per_s": None, "parts": {}, "train_batch_size": b_train}
                    t0 = time.perf_counter()
                    error: str | None = None
                    try:
                        static = meter.live()
                        meter.reset()
                        self._eval_batches(model, b)
                        peak = meter.peak()
                        rec.update(ok=peak <= limit, peak_bytes=peak, parts={"eval": peak}, static_bytes=static)
                    except Exception as exc:
                        if not memory.is_oom(exc):
                            raise
                        error = _one_line(exc)
                    if error is not None:  # outside the except block
                        rec["error"] = error
                        memory.release_memory()
                    rec["seconds"] = round(time.perf_counter() - t0, 4)
                    rec = distributed.agree_record(rec)  # torchrun: one rank's OOM fails the size on all ranks
                    on_record(rec)
                    return rec

                best, _ = search_max(run, cap=cap, limit=limit, aim=aim)
                del last_batch
        finally:
            self.restore(model, optimizer, snap)
        return best

    @torch.no_grad()
    def _eval_batches(self, model: nn.Module, b: int) -> None:
        """Two evaluation batches the way ``engine.evaluate`` runs them (outputs of one live during the next)."""
        assert self.val_batcher is not None
        model.eval()
        try:
            n = len(self.workload.val_data)  # type: ignore[arg-type]
            for start in (0, b):
                idx = torch.arange(start, start + b) % n
                batch = to_device(self.val_batcher(idx), self.device)
                with autocast(self.precision, self.device):
                    loss, outputs, targets = compute_loss(self.workload, model, batch)
                for fn in self.workload.metrics.values():
                    fn(outputs, targets)
        finally:
            model.train()


# ---------------------------------------------------------------------------------------------------------------
# The public function


def _rng_states(device: torch.device) -> dict[str, Any]:
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


def _check_margin(margin: Any) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (0.0 <= margin < 1.0):
        raise ConfigError(f"margin must be a fraction in [0, 1) such as 0.05, got {margin!r}")
    return float(margin)


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: rec.get(k) for k in ("batch_size", "ok", "peak_bytes", "samples_per_s", "phase")}
    for k in ("parts", "error", "seconds", "steps", "timed_steps", "train_batch_size"):
        if rec.get(k) not in (None, {}):
            out[k] = rec[k]
    if "parts" in out:
        out["peak_bytes_by_part"] = out.pop("parts")
    return out


def _knee(records: list[dict[str, Any]]) -> int | None:
    timed = [r for r in records if r["phase"] == "throughput" and r["ok"] and r["samples_per_s"]]
    if not timed:
        return None
    best = max(r["samples_per_s"] for r in timed)
    return min(r["batch_size"] for r in timed if r["samples_per_s"] >= KNEE_SHARE * best)


def find_batch_size(
    workload: Workload | str,
    *,
    device: str | torch.device | None = "cpu",
    precision: str = "fp32",
    memory_budget: int | str | None = None,
    max_batch_size: int | None = None,
    margin: float = 0.05,
    throughput: bool = True,
    micro_batch_size_only: bool = True,
    seed: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> FindResult:
    """Find the largest training batch that fits (verified), a recommended one with headroom, and the knee.

    Args:
        memory_budget: bytes or e.g. ``"512MiB"``. On the CPU it is enforced by counting live tensor bytes (an
            allocation beyond it raises an OOM, deterministically); on CUDA with
            ``torch.cuda.set_per_process_memory_fraction``. ``None``: the memory available now is the limit.
        max_batch_size: never try larger (the training-set size caps too).
        margin: headroom for ``recommended_batch_size``: its predicted and measured peak stays under
            ``(1 - margin) x limit``.
        throughput: time samples/s at powers of two up to the max and report the knee.
        micro_batch_size_only: the sizes found are micro-batches (one forward/backward). With ``False`` the result
            also says how many accumulation steps reach the workload's ``base_batch_size`` at the recommended size.
        progress: called with each trial's record as it completes.

    >>> r = find_batch_size("demo:digits-mlp", memory_budget="1MiB", throughput=False)
    >>> r.max_batch_size >= r.recommended_batch_size
    True
    """
    t_start = time.perf_counter()
    wl = load_workload(workload)
    dev = resolve_device(device)
    check_precision(precision, dev)
    margin = _check_margin(margin)
    check_positive_int("max batch size", max_batch_size, allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    budget = memory.parse_bytes(memory_budget)
    if budget is not None and dev.type == "cuda":
        memory.cuda_budget_fraction(budget, dev)  # a budget larger than the GPU is an error up front
    if dev.type == "cuda":
        torch.cuda.init()  # before the RNG states are saved: seeding a not-yet-initialised device is deferred
        torch.cuda.empty_cache()
    limit = budget if budget is not None else memory.available_bytes(dev)
    if limit is None:
        raise ConfigError("cannot tell how much memory is available here; give --memory-budget")
    cap = wl.num_train if max_batch_size is None else min(wl.num_train, max_batch_size)
    enforce = limit if dev.type == "cpu" else budget  # each rank enforces its own budget
    if distributed.world_size() > 1:  # torchrun: sizes are per device; predictions use the tightest rank's limit
        cap = min(cap, max(1, wl.num_train // distributed.world_size()))
        limit = int(distributed.all_min(limit)[0])

    records: list[dict[str, Any]] = []

    def note(rec: dict[str, Any]) -> None:
        records.append(rec)
        if progress is not None:
            progress(_public(rec))

    rng = _rng_states(dev)
    trials = _Trials(wl, dev, precision, seed, limit, enforce, cap)
    try:

        def run(b: int, phase: str) -> dict[str, Any]:
            rec = distributed.agree_record(trials.memory_trial(b, phase))  # torchrun: one OOM -> all back off
            note(rec)
            return rec

        target = (1.0 - margin) * limit
        aim = CUDA_AIM if dev.type == "cuda" else 1.0
        max_bs, points = search_max(run, cap=cap, limit=limit, stepping_stone=target if margin > 0 else None,
                                    aim=aim)
        model = MemoryModel.fit(points)

        def verified() -> dict[int, dict[str, Any]]:  # sizes that ran a verification's steps and fit
            return {r["batch_size"]: r for r in records
                    if r["phase"] in MEMORY_PHASES and r["ok"] and r.get("steps", 0) >= STEPS_PER_TRIAL}

        # -- the maximum must have run a verification's steps (it can be a probe, rarely: run it again) -----------
        while max_bs not in verified():
            if run(max_bs, "verify")["ok"]:
                break
            ok_below = [r["batch_size"] for r in records if r["phase"] in MEMORY_PHASES and r["ok"]
                        and r["batch_size"] < max_bs]
            if not ok_below:
                raise ConfigError(f"batch size {max_bs} fit in a probe but not in {STEPS_PER_TRIAL} steps; "
                                  "memory grows from step to step: check the workload for a leak")
            max_bs = max(ok_below)

        # -- the recommendation: the margin under the limit, itself run (usually already, as the stepping stone) --
        ok_sizes = {r["batch_size"]: r for r in records
                    if r["phase"] in MEMORY_PHASES and r["ok"] and r["batch_size"] <= max_bs}
        recommended = None
        want = max_bs if model is None else min(max_bs, model.max_under(target))
        for _ in range(4):
            under = [b for b, r in ok_sizes.items() if r["peak_bytes"] <= target]
            if under and max(under) >= want * (1 - TOLERANCE):
                recommended = max(under)  # a size already run is close enough
                break
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
        if recommended is None:
            under = [b for b, r in ok_sizes.items() if r["peak_bytes"] <= target]
            recommended = max(under) if under else min(ok_sizes)

        # -- evaluation, sized on its own at the recommended training batch ----------------------------------------
        try:
            eval_bs = trials.eval_search(recommended, target, note, aim=aim)
        except ConfigError:  # not even one evaluation sample fits beside the training state
            eval_bs = None

        # -- throughput at powers of two up to the max, and the knee ----------------------------------------------
        if throughput:
            sizes = sorted({2**k for k in range(max_bs.bit_length()) if 2**k <= max_bs} | {max_bs, recommended})
            trials.throughput(sizes, note)
    finally:
        trials.close()
        _restore_rng(rng)

    memory_model: dict[str, Any] = {"fixed_bytes": None, "per_sample_bytes": None, "parts": {}}
    if model is not None:
        part, fixed, slope = model.binding(max_bs)
        memory_model.update(fixed_bytes=int(round(fixed)), per_sample_bytes=int(round(slope)), binding_part=part,
                            parts={k: {"fixed_bytes": int(round(f)), "per_sample_bytes": int(round(s))}
                                   for k, (f, s) in model.parts.items()})
    if max_bs < cap:
        limited_by = "memory"
    else:
        limited_by = "max_batch_size" if max_batch_size is not None and max_batch_size < wl.num_train else "dataset"
    extras: dict[str, Any] = {}
    if not micro_batch_size_only:
        accumulation = max(1, math.ceil(wl.base_batch_size / recommended))
        extras.update(accumulation_steps=accumulation, effective_batch_size=recommended * accumulation)
    return FindResult(
        device=str(dev),
        precision=precision,
        memory_budget_bytes=budget,
        max_batch_size=max_bs,
        recommended_batch_size=recommended,
        throughput_knee_batch_size=_knee(records),
        memory_model=memory_model,
        probes=[_public(r) for r in records],
        real_trials=sum(r["phase"] in MEMORY_PHASES for r in records),
        seconds=time.perf_counter() - t_start,
        eval_batch_size=eval_bs,
        workload=wl.name,
        memory_limit_bytes=limit,
        margin=margin,
        limited_by=limited_by,
        throughput_trials=sum(r["phase"] == "throughput" for r in records),
        eval_trials=sum(r["phase"] == "eval" for r in records),
        extras=extras,
    )
