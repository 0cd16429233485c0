"""The gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training"): where "small batch" ends and "large batch" begins.

G is the true (full-data) gradient and Σ the per-example gradient covariance. A mini-batch gradient of size B has
E|G_B|² = |G|² + tr(Σ)/B, so two batch sizes give two equations for the two unknowns (the paper's Appendix A).
Within one optimizer step the k micro-batches (sizes b_i, B = Σ b_i) are the small batches and their
sample-weighted sum, the accumulated gradient, is the big one:

    small = Σ_i (b_i/B) |g_i|²       E[small] = |G|² + k tr(Σ)/B
    big   = |Σ_i (b_i/B) g_i|²       E[big]   = |G|² + tr(Σ)/B

so ``tr(Σ) ≈ B (small - big)/(k - 1)`` and ``|G|² ≈ (k big - small)/(k - 1)``, both unbiased for any split,
uneven ones included. Their ratio is not: the numerator and denominator are averaged separately (a plain mean at
fixed parameters, bias-corrected EMAs while training) and divided last.

Per-micro-batch norms |b_i g_i / B| come either from tensor hooks on the parameters (a leaf's hook sees the
gradient of *this* micro-batch before it is added to ``.grad``: no copy, one read) or from differencing ``.grad``
against one running copy with fused ``torch._foreach`` ops (fewer Python calls); see :func:`_make_meter`.

Two modes:

- :func:`noise_scale` (probe): fixed parameters, many batches, a bootstrap confidence interval, stop when it is
  within ±``rel_ci``.
- :class:`NoiseCallback` (training): ``engine.train(..., callbacks=[NoiseCallback()])`` puts ``b_simple`` and the
  raw estimates' means over the record's steps (``noise_window``) in each evaluation record. A step of >= 2
  micro-batches is measured from its own micro-batches (``accumulation``); a run whose steps are one micro-batch
  is measured on every :data:`HALVES_EVERY`-th step by an extra forward/backward over the two halves of that
  step's batch, after the step and outside its timing, with everything the extra pass could touch restored, so
  training is bit-for-bit the run without it (``extra-halves``; :meth:`NoiseCallback.watch`).

and, over a sweep's trials, :func:`b_simple_against_loss` / :func:`b_simple_at_loss`: those records pooled against
the training loss (B_simple grows as the loss falls, so it is stated at a loss). Every B_simple in batchfit (the
probe, training, branching, the Lightning logger, the pooled values) goes through the estimator in
:mod:`batchfit.stats` (:func:`~batchfit.stats.unbiased_estimates`, :func:`~batchfit.stats.noise_scale_interval`;
both importable from here too) or :class:`RunningNoiseScale`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from batchfit import checks, data, distributed, sharding
from batchfit._io import split_fields
from batchfit.engine import train
from batchfit.errors import ConfigError, DataError, NoisyEstimateWarning, WorkloadError
from batchfit.loading import load_workload
from batchfit.metric import finite_or_none as _finite
from batchfit.progress import ProgressFn, emit
from batchfit.runtime import resolve_device
from batchfit.stats import Interval, noise_scale_interval, ratio_bootstrap_ci, unbiased_estimates
from batchfit.step import TrainStep, build_run, call_forward, check_precision, fetching
from batchfit.workload import Workload

__all__ = [
    "HALVES_EVERY",
    "NOISE_METHODS",
    "NoiseAtLoss",
    "NoiseCallback",
    "NoiseRecord",
    "NoiseResult",
    "RunningNoiseScale",
    "b_simple_against_loss",
    "b_simple_at_loss",
    "default_micro_batch_size",
    "noise_records",
    "noise_scale",
    "noise_scale_interval",
    "training_micro_batch_size",
    "unbiased_estimates",
]

_FP16_INIT_SCALE = 2.0**16
_LOW_PRECISION = (torch.float16, torch.bfloat16)

# How a training run gets its small-batch gradients (the ``noise_method`` of a result and a sweep trial)
NOISE_METHODS = ("accumulation", "extra-halves")
# extra-halves: the measured steps are every 8th. Each costs one forward/backward over the step's B samples (two
# halves of B/2) beyond training's own, so the extra compute is 1/8 = 12.5 % of the training steps' forward/backward
# samples (less of the run's time: the optimizer steps and evaluations are not repeated); see NoiseCallback
HALVES_EVERY = 8


# ---------------------------------------------------------------------------------------------------------------
# The estimator (:func:`batchfit.stats.unbiased_estimates`) and the micro-batches it needs


def default_micro_batch_size(batch_size: int, parts: int = 2) -> int:
    """The micro-batch that splits ``batch_size`` into ``parts`` (at least 2) micro-batches: ``ceil(B / parts)``."""
    if batch_size < 2:
        raise ConfigError(
            f"the noise scale needs a batch of at least 2 samples (split into micro-batches), got {batch_size}"
        )
    return math.ceil(batch_size / max(2, min(parts, batch_size)))


def training_micro_batch_size(batch_size: int, micro_batch_size: int | None, world_size: int = 1) -> int | None:
    """The micro-batch ``train --measure-noise`` uses: the given one if it makes >= 2 micro-batches per step
    (counting data-parallel ranks), else a clear error; none given: 2 micro-batches (``ceil(B / 2)``) on one
    device, the per-rank batch (the ranks' gradients serve as the micro-batches) under data parallelism."""
    if micro_batch_size is None:
        return None if world_size >= 2 else default_micro_batch_size(batch_size)
    if micro_batch_size >= batch_size and world_size < 2:
        raise ConfigError(
            f"measure_noise needs >= 2 micro-batches per step, but micro-batch {micro_batch_size} covers batch "
            f"{batch_size}; give micro_batch_size <= {max(1, batch_size // 2)} or leave it out"
        )
    return micro_batch_size


def _norms_of(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor norms (0-d tensors on the device): one fused call for dense tensors."""
    dense = [t for t in tensors if not t.is_sparse]
    norms = _foreach_norm(dense) if dense else []
    if len(dense) < len(tensors):
        norms += [torch.linalg.vector_norm(t.coalesce().values()) for t in tensors if t.is_sparse]
    return norms


@dataclass
class _StepNorms:
    """One step's raw measurements, still on the device: ``vector`` stacks the per-parameter norms of each
    micro-batch's contribution (``micro``: (end index, samples) per micro-batch), then the per-parameter norms of
    the accumulated gradient (from ``n_small`` on), then, for fp16, the loss scale. All arithmetic waits until
    many steps are read at once (:func:`_decode`), so a step costs one stack beyond the norms themselves."""

    vector: torch.Tensor
    micro: list[tuple[int, int]]
    n_small: int
    k: int
    batch_size: int
    scale: float | None  # a loss scale known on the host; None: in the vector (fp16) or no scaling


def _step_norms(small_norms: list[torch.Tensor], micro: list[tuple[int, int]], grads: list[torch.Tensor], *,
                k: int, batch_size: int, scale: torch.Tensor | float | None = None) -> _StepNorms | None:
    if not small_norms or not grads:
        return None
    parts = small_norms + _norms_of(grads)
    host_scale: float | None = None
    if isinstance(scale, torch.Tensor):
        parts.append(scale.reshape(()))
    elif scale is not None:
        host_scale = float(scale)
    return _StepNorms(torch.stack(parts), micro, len(small_norms), k, batch_size, host_scale)


def _decode(steps: list[_StepNorms], scaled: bool) -> list[tuple[float, float, int, int]]:
    """Read many steps with one transfer; return ``(small, big, k, B)`` per step, where
    ``small = Σ_i (b_i/B)|g_i|² = B Σ_i n_i / b_i`` (n_i = |b_i g_i / B|², what the meter measured) and ``big`` the
    squared norm of the accumulated gradient. ``scaled``: the micro-batch norms carry an fp16 loss scale."""
    if not steps:
        return []
    flat = torch.cat([st.vector.to(steps[0].vector.device) for st in steps]).double().cpu().numpy()  # one sync
    out, offset = [], 0
    for st in steps:
        v = flat[offset : offset + len(st.vector)]
        offset += len(st.vector)
        sq = v * v
        small, start = 0.0, 0
        for end, b in st.micro:
            small += float(sq[start:end].sum()) * st.batch_size / b
            start = end
        end_big = len(v) - 1 if scaled and st.scale is None else len(v)
        big = float(sq[st.n_small : end_big].sum())
        if scaled:
            scale = st.scale if st.scale is not None else float(v[-1])
            small /= scale * scale
        out.append((small, big, st.k, st.batch_size))
    return out


class _HookMeter:
    """Micro-batch gradient norms from tensor hooks: a leaf's hook sees this backward's gradient before it is added
    to ``.grad``. No extra memory, one read of each gradient; a Python call per parameter tensor per micro-batch.
    Under data parallelism the hooks see this rank's local gradients, as the estimator needs."""

    def __init__(self) -> None:
        self.params: list[nn.Parameter] = []
        self._handles: list[Any] = []
        self._norms: list[torch.Tensor] = []
        self._micro: list[tuple[int, int]] = []  # (end index into _norms, samples) per micro-batch

    def attach(self, model: nn.Module) -> None:
        self.detach()
        self.params = _trainable(model)
        self._handles = [p.register_hook(self._hook) for p in self.params]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._norms, self._micro = [], []

    def new_step(self) -> None:
        """Forget earlier micro-batches, keeping the norms the current backward has just collected."""
        if self._micro:
            self._norms = self._norms[self._micro[-1][0] :]
            self._micro = []

    def _hook(self, grad: torch.Tensor) -> None:
        # Runs once per parameter per micro-batch, so the common case is a single call.
        if grad.is_sparse or grad.dtype in _LOW_PRECISION:
            g = grad.coalesce().values() if grad.is_sparse else grad
            self._norms.append(torch.linalg.vector_norm(g, dtype=torch.float32))
        else:
            self._norms.append(torch.linalg.vector_norm(grad))

    def end_micro(self, samples: int, last: bool) -> None:
        self._micro.append((len(self._norms), samples))

    @property
    def micro_batches(self) -> int:
        return len(self._micro)

    def take(self) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """This step's per-parameter norms and micro-batch boundaries; the meter starts afresh."""
        micro, norms = self._micro, self._norms
        self._norms, self._micro = [], []
        return norms, micro


class _CopyMeter:
    """Micro-batch gradient norms by differencing the accumulated ``.grad`` against one running copy, with
    ``torch._foreach`` ops: |Δ_i| = |acc_i − acc_{i−1}|. A few fused calls per micro-batch whatever the number of
    parameter tensors (the cheapest on small models), at the price of one extra copy of the gradients and a few
    passes over them. Not for data parallelism (the last micro-batch's ``.grad`` is already all-reduced)."""

    def __init__(self) -> None:
        self.params: list[nn.Parameter] = []
        self._prev: list[torch.Tensor] = []
        self._norms: list[torch.Tensor] = []
        self._micro: list[tuple[int, int]] = []
        self._present: tuple[int, ...] | None = None  # parameters with a gradient in the running copy

    def attach(self, model: nn.Module) -> None:
        self.detach()
        self.params = _trainable(model)
        self._prev = [torch.empty_like(p, memory_format=torch.preserve_format) for p in self.params]
        self._all = tuple(range(len(self.params)))

    def detach(self) -> None:
        self._prev, self._norms, self._micro, self._present = [], [], [], None

    def new_step(self) -> None:
        self._norms, self._micro, self._present = [], [], None

    def end_micro(self, samples: int, last: bool) -> None:
        params = self.params
        idx = tuple(i for i, p in enumerate(params) if p.grad is not None)
        if idx:
            if any(params[i].grad.is_sparse for i in idx):
                raise ConfigError("sparse gradients cannot be differenced; use NoiseCallback(method='hooks')")
            grads = [params[i].grad for i in idx]
            prev = self._prev if idx == self._all else [self._prev[i] for i in idx]
            if self._present is None:  # the first micro-batch: its contribution is the gradient itself
                norms = _foreach_norm(grads)
            else:
                for j, i in enumerate(idx):
                    if i not in self._present:  # a parameter first reached in this micro-batch
                        prev[j].zero_()
                _foreach_sub_(prev, grads)  # prev = acc_{i-1} - acc_i = -Δ_i
                norms = _foreach_norm(prev)
            self._norms.extend(norms)
            if not last:
                _foreach_copy_(prev, grads)
            self._present = idx if self._present is None else tuple(sorted(set(idx) | set(self._present)))
        self._micro.append((len(self._norms), samples))

    @property
    def micro_batches(self) -> int:
        return len(self._micro)

    def take(self) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        micro, norms = self._micro, self._norms
        self.new_step()
        return norms, micro


def _foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    fn = getattr(torch, "_foreach_norm", None)
    return list(fn(tensors)) if fn is not None else [torch.linalg.vector_norm(t) for t in tensors]


def _foreach_sub_(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    fn = getattr(torch, "_foreach_sub_", None)
    if fn is not None:
        fn(a, b)
    else:
        for x, y in zip(a, b):
            x.sub_(y)


def _foreach_copy_(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    fn = getattr(torch, "_foreach_copy_", None)  # torch >= 2.1
    if fn is not None:
        fn(a, b)
    else:
        for x, y in zip(a, b):
            x.copy_(y)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise WorkloadError("the model has no trainable parameters; there is no gradient to measure")
    return params


METHODS = ("auto", "hooks", "copy")
COPY_MAX_BYTES = 64 * 2**20
COPY_MAX_ELEMENTS_PER_TENSOR = 5_000
COPY_MAX_CUDA_SHARE = 0.05  # on CUDA: copy while one extra gradient copy is at most 5 % of the device's memory


def _make_meter(method: str, model: nn.Module, world_size: int = 1) -> _HookMeter | _CopyMeter:
    """Pick and attach a meter. ``auto`` weighs the two costs: hooks make a Python call per parameter tensor per
    micro-batch (~5-10 µs each), the copy method makes ~5 extra passes over the gradients (and holds one copy).
    On a CPU copy wins when the tensors are small, i.e. at most ``COPY_MAX_ELEMENTS_PER_TENSOR`` elements per
    parameter tensor on average (about where the two costs meet) and at most ``COPY_MAX_BYTES`` in all; on CUDA
    while the copy is at most ``COPY_MAX_CUDA_SHARE`` of the device; hooks otherwise, and always for sparse
    gradients and under data parallelism."""
    if method not in METHODS:
        raise ConfigError(f"unknown noise measurement method {method!r}; choose one of: {', '.join(METHODS)}")
    if method == "auto":
        params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in params)
        grad_bytes = sum(p.numel() * p.element_size() for p in params)
        sparse = any(getattr(m, "sparse", False) is True for m in model.modules())
        small = grad_bytes <= COPY_MAX_BYTES and numel <= COPY_MAX_ELEMENTS_PER_TENSOR * max(1, len(params))
        if params and params[0].device.type == "cuda":
            # on a GPU the copy's extra passes are a few fused multi-tensor kernels at HBM speed, while hooks
            # launch kernels per tensor from Python: copy wins unless the extra gradient copy is a large share
            # of the device (ResNet-50 on an H100: copy 0.98-1.00x, hooks 1.02x of training time; see benchmarks)
            total = torch.cuda.get_device_properties(params[0].device).total_memory
            small = grad_bytes <= COPY_MAX_CUDA_SHARE * total
        method = "copy" if small and not sparse and world_size == 1 else "hooks"
    if method == "copy" and world_size > 1:
        raise ConfigError("the copy method does not work under data parallelism; use method='hooks' or 'auto'")
    meter: _HookMeter | _CopyMeter = _CopyMeter() if method == "copy" else _HookMeter()
    meter.attach(model)
    return meter


def _gradients(params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


class _Ema:
    """Exponential moving average with the bias correction of Adam (divide by 1 - beta^t)."""

    def __init__(self, beta: float) -> None:
        self.beta, self.value, self.weight = beta, 0.0, 0.0

    def update(self, x: float) -> None:
        self.value = self.beta * self.value + (1 - self.beta) * x
        self.weight = self.beta * self.weight + (1 - self.beta)

    def get(self) -> float | None:
        return self.value / self.weight if self.weight > 0 else None


def _ratio(trace_cov: float | None, grad_norm_sq: float | None) -> float | None:
    """B_simple, or None while undefined (no data, or no signal above the noise yet: |G|² estimate <= 0)."""
    if trace_cov is None or grad_norm_sq is None or not grad_norm_sq > 0:
        return None
    return trace_cov / grad_norm_sq


# ---------------------------------------------------------------------------------------------------------------
# While training: the ratio of two EMAs (the ratio with its interval is :func:`batchfit.stats.noise_scale_interval`)


class RunningNoiseScale:
    """B_simple while training: each step's unbiased ``(|G|², tr(Σ))`` estimates (:func:`unbiased_estimates`) fed
    to two bias-corrected EMAs (``beta``; Kingma & Ba 2015) that are divided last, as McCandlish et al. (2018,
    appendix A) recommend; :class:`NoiseCallback` and the Lightning logger both use this one.

    Beside the EMAs it keeps plain sums since the last :meth:`take_window`: the mean of the raw estimates over the
    steps an evaluation record covers (the same steps as its ``train_loss``), which :func:`b_simple_at_loss` pools.
    """

    def __init__(self, beta: float = 0.95) -> None:
        self._g2, self._tr = _Ema(beta), _Ema(beta)
        self.steps = 0
        self._win_g2 = self._win_tr = 0.0
        self._win_steps = 0

    def add_step(self, small: float, big: float, k: int, batch_size: int,
                 population: int | None = None) -> tuple[float, float]:
        """Add one step from its micro-batch norms (see :func:`unbiased_estimates`); return its estimates."""
        g2, tr = unbiased_estimates(small, big, k, batch_size, population)
        self.add(g2, tr)
        return g2, tr

    def add(self, grad_norm_sq: float, trace_cov: float) -> None:
        self._g2.update(grad_norm_sq)
        self._tr.update(trace_cov)
        self._win_g2 += grad_norm_sq
        self._win_tr += trace_cov
        self._win_steps += 1
        self.steps += 1

    @property
    def grad_norm_sq(self) -> float | None:
        return self._g2.get()

    @property
    def trace_cov(self) -> float | None:
        return self._tr.get()

    @property
    def b_simple(self) -> float | None:
        """The EMA ratio; ``None`` before any step or while the |G|² average is <= 0."""
        return _ratio(self.trace_cov, self.grad_norm_sq)

    def take_window(self) -> dict[str, Any] | None:
        """``{steps, grad_norm_sq, trace_cov}``: the plain means of the raw estimates since the last call (``None``
        when no step was added); the window starts afresh."""
        n = self._win_steps
        out = None if not n else {"steps": n, "grad_norm_sq": self._win_g2 / n, "trace_cov": self._win_tr / n}
        self._win_g2 = self._win_tr = 0.0
        self._win_steps = 0
        return out


# ---------------------------------------------------------------------------------------------------------------
# B_simple against the training loss (issue 19.3)
#
# The noise scale grows as the loss falls (McCandlish et al. 2018, fig. 4; Kaplan et al. 2020), so a value means
# nothing without the loss it was measured at: a sweep's large-batch trials run few steps and stay near
# initialisation, and a median over each trial's run then falls with the batch size for that reason alone. Every
# trial's evaluation records carry the training loss and the mean |G|² and tr(Σ) estimates over the same steps
# (``noise_window``, written by :class:`NoiseCallback`); pooled over trials, B_simple at a loss is the ratio of the
# step-weighted sums of the records whose training loss lies in a band around it, with a bootstrap over trials.

NOISE_LOSS_BINS = 6  # bins over the pooled training-loss range (log scale); a band is one bin wide
_MIN_BAND_RECORDS = 3  # fewer records in a band: it is widened (twice at most), then no value
_MIN_BAND_TRIALS = 3  # fewer trials in a band: the estimate, with an unknown interval


@dataclass(frozen=True)
class NoiseRecord:
    """One evaluation record's noise measurement: the mean of the per-step |G|² and tr(Σ) estimates over the
    ``steps`` its ``train_loss`` covers. ``trial``: which trial (the bootstrap resamples whole trials)."""

    trial: int
    train_loss: float
    grad_norm_sq: float
    trace_cov: float
    steps: int


def noise_records(trials: Sequence[Any]) -> list[NoiseRecord]:
    """Every ``(train_loss, |G|², tr(Σ))`` record of every trial's ``history``: the record's ``noise_window`` (the
    raw estimates' means over the steps since the previous evaluation). Trials written before the window was
    recorded fall back to the EMA values of their ``b_simple_history`` at the record's step (weight 1 each).
    ``trials``: :class:`batchfit.study.TrialSummary` (read by attribute) or their dict form."""
    out: list[NoiseRecord] = []
    for i, t in enumerate(trials):
        if isinstance(t, Mapping):
            ema_history, history = t.get("b_simple_history"), t.get("history")
        elif hasattr(t, "history"):
            ema_history, history = getattr(t, "b_simple_history", None), t.history
        else:
            continue
        ema = {h.get("step"): h for h in ema_history or [] if isinstance(h, Mapping)}
        for r in history or []:
            if not isinstance(r, Mapping) or (loss := _finite(r.get("train_loss"))) is None:
                continue
            w = r.get("noise_window")
            if isinstance(w, Mapping):
                g2, tr, n = _finite(w.get("grad_norm_sq")), _finite(w.get("trace_cov")), _finite(w.get("steps"))
                if g2 is not None and tr is not None and n is not None and n >= 1:
                    out.append(NoiseRecord(i, loss, g2, tr, int(n)))
                continue
            e = ema.get(r.get("step"))
            if isinstance(e, Mapping):
                g2, tr = _finite(e.get("grad_norm_sq")), _finite(e.get("trace_cov"))
                if g2 is not None and tr is not None:
                    out.append(NoiseRecord(i, loss, g2, tr, 1))
    return out


@dataclass(frozen=True)
class NoiseAtLoss:
    """B_simple pooled over the records whose training loss lies in ``band`` around ``train_loss``."""

    train_loss: float
    band: tuple[float, float]
    b_simple: Interval
    records: int
    trials: int
    steps: int

    def to_dict(self) -> dict[str, Any]:
        iv = self.b_simple.to_dict()
        iv = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in iv.items()}
        return {"train_loss": self.train_loss, "band": list(self.band), "b_simple": iv, "records": self.records,
                "trials": self.trials, "steps": self.steps}


def _loss_axis(records: Sequence[NoiseRecord]) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """Log loss when every loss is positive (the noise scale moves with the loss multiplicatively), else linear."""
    if all(r.train_loss > 0 for r in records):
        return math.log, math.exp
    return (lambda x: x), (lambda x: x)


def _pooled(records: Sequence[NoiseRecord], loss: float, band: tuple[float, float], *, seed: int, n_boot: int,
            level: float) -> NoiseAtLoss:
    """The ratio of the step-weighted sums over ``records``, its interval a bootstrap over their trials."""
    sums: dict[int, list[float]] = {}
    for r in records:
        s = sums.setdefault(r.trial, [0.0, 0.0])
        s[0] += r.steps * r.grad_norm_sq
        s[1] += r.steps * r.trace_cov
    g2 = [s[0] for s in sums.values()]
    tr = [s[1] for s in sums.values()]
    iv = noise_scale_interval(g2, tr, seed=seed, n_boot=n_boot, level=level, method="bootstrap over trials")
    if len(sums) < _MIN_BAND_TRIALS:  # a bootstrap over one or two trials cannot show their spread
        iv = Interval(iv.estimate, None, None, level, "bootstrap over trials", len(sums))
    return NoiseAtLoss(loss, band, iv, len(records), len(sums), sum(r.steps for r in records))


def _default_half_width(records: Sequence[NoiseRecord], fwd: Callable[[float], float]) -> float:
    xs = [fwd(r.train_loss) for r in records]
    span = max(xs) - min(xs)
    floor = 0.05 if fwd is math.log else 0.05 * max(abs(x) for x in xs) or 0.05
    return max(span / (2 * NOISE_LOSS_BINS), floor)


def b_simple_at_loss(records: Sequence[NoiseRecord], loss: float, *, half_width: float | None = None,
                     level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> NoiseAtLoss | None:
    """B_simple at training loss ``loss``, pooled over every record whose loss lies within ``half_width`` of it
    (on the log-loss axis; default half a bin of :data:`NOISE_LOSS_BINS` over the records' range, at least ±5 %):
    the ratio of the step-weighted sums of tr(Σ) and |G|², with a 95 % percentile bootstrap over trials (unknown
    with fewer than 3 trials in the band). A band with fewer than 3 records is widened twice (x2, x4); ``None``
    when it still has too few, or when ``loss`` is not a finite number."""
    if not records or _finite(loss) is None:
        return None
    fwd, inv = _loss_axis(records)
    if fwd is math.log and not loss > 0:
        return None
    h = half_width if half_width is not None else _default_half_width(records, fwd)
    x = fwd(loss)
    for widen in (1, 2, 4):
        inside = [r for r in records if abs(fwd(r.train_loss) - x) <= h * widen]
        if len(inside) >= _MIN_BAND_RECORDS:
            return _pooled(inside, float(loss), (inv(x - h * widen), inv(x + h * widen)), seed=seed, n_boot=n_boot,
                           level=level)
    return None


def b_simple_against_loss(records: Sequence[NoiseRecord], *, bins: int = NOISE_LOSS_BINS, level: float = 0.95,
                          n_boot: int = 1000, seed: int = 0) -> list[NoiseAtLoss]:
    """B_simple against the training loss: the records' loss range cut into ``bins`` equal bins of log loss, each
    non-empty bin pooled as in :func:`b_simple_at_loss` (its ``train_loss`` where its records lie: their
    step-weighted mean on the log-loss axis; ``band`` the bin's edges), highest loss (earliest in training) first."""
    if not records:
        return []
    fwd, inv = _loss_axis(records)
    xs = [fwd(r.train_loss) for r in records]
    lo, hi = min(xs), max(xs)
    width = (hi - lo) / bins if hi > lo else 1.0
    groups: dict[int, list[NoiseRecord]] = {}
    for r, x in zip(records, xs):
        groups.setdefault(min(bins - 1, int((x - lo) / width)) if hi > lo else 0, []).append(r)
    out = []
    for i in sorted(groups, reverse=True):
        a, b = lo + i * width, lo + (i + 1) * width if hi > lo else hi
        g = groups[i]
        at = inv(sum(r.steps * fwd(r.train_loss) for r in g) / sum(r.steps for r in g))
        out.append(_pooled(g, at, (inv(a), inv(b)), seed=seed + i, n_boot=n_boot, level=level))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training mode


class NoiseCallback:
    """Measure B_simple while training (``engine.train(..., callbacks=[NoiseCallback()])``).

    Each measured step's |G|² and tr(Σ) estimates feed two bias-corrected EMAs (``beta``; :class:`RunningNoiseScale`);
    each evaluation record gets ``record["b_simple"]`` (the EMA ratio) and ``record["noise_window"]`` =
    ``{steps, grad_norm_sq, trace_cov}``, the plain means of the raw estimates over the measured steps since the
    previous evaluation (the steps its ``train_loss`` covers: what :func:`b_simple_at_loss` pools against the training
    loss), and ``state.extras["b_simple_history"]`` one entry ``{step, epoch, b_simple, grad_norm_sq, trace_cov,
    train_loss}`` (the EMA values; ``train_loss`` the record's); ``state.extras["b_simple"]`` is the last value and
    ``state.extras["noise_method"]`` how it was measured. Steps with a non-finite gradient are skipped (counted in
    ``state.extras["b_simple_skipped_steps"]``). Values stay on the device and are read every ``flush_every``
    measured steps (one sync) and at each evaluation.

    Where the small-batch gradients come from (``noise_method``):

    - ``accumulation``: a step of >= 2 micro-batches (``micro_batch_size < batch_size``, or data-parallel ranks) is
      measured from its own micro-batches, every step, at no extra forward/backward.
    - ``extra-halves``: a run whose steps are one micro-batch, with a workload from :meth:`watch`. Every
      ``halves_every``-th step (default :data:`HALVES_EVERY`: 1/8 more forward/backward samples than training) is
      measured after it, outside the step's timing: the parameters are set back to the values the step's gradient
      was taken at (a copy taken just before the optimizer step: the one part inside the step, a single pass over
      the parameters), one extra forward/backward runs over the two halves of that step's batch through a
      :class:`batchfit.step.TrainStep` (the same forward, loss, precision, autocast and loss scale; no optimizer),
      ``small`` comes from the halves' gradients and ``big`` from their weighted sum, exactly as a step of two
      micro-batches (so both methods give the same estimates). Then the
      training state is put back as it was: the parameters, every buffer (BatchNorm running statistics and
      ``num_batches_tracked``), ``.grad``, the torch (CPU and the device's), Python and NumPy random number
      generators (the pass runs under ``torch.random.fork_rng``, so its dropout draws nothing from the stream the
      next step uses); the model stays in the train mode the step saw. Training is bit-for-bit the run without the
      measurement. The pass's samples go to :func:`batchfit.cost.add_samples` (compute spent; counted by any
      :func:`batchfit.cost.measure` around the run) and to ``state.extras["noise_samples"]`` (a run's own
      ``samples`` stay its training samples). A failure of the extra pass (e.g. a model that cannot take half a
      batch) stops the measurement, not training (``state.extras["noise_error"]``).

    Without either (one micro-batch per step and no :meth:`watch`) it is a :class:`ConfigError`.

    ``method``: how micro-batch gradient norms are taken: ``hooks`` (tensor hooks, no extra memory, one read of
    each gradient), ``copy`` (a running copy of the gradients and fused ``torch._foreach`` ops: few Python calls,
    more memory traffic) or ``auto`` (copy for models of many small tensors on one device, hooks otherwise).
    """

    def __init__(self, beta: float = 0.95, flush_every: int = 64, method: str = "auto",
                 halves_every: int = HALVES_EVERY) -> None:
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ConfigError(f"the noise EMA beta must be in [0, 1), got {beta!r}")
        checks.positive_int("flush_every", flush_every)
        checks.positive_int("halves_every", halves_every)
        if method not in METHODS:
            raise ConfigError(f"unknown noise measurement method {method!r}; choose one of: {', '.join(METHODS)}")
        self.beta = float(beta)
        self.flush_every = flush_every
        self.method = method
        self.halves_every = halves_every
        self.noise_method: str | None = None  # "accumulation" or "extra-halves", set when training starts
        self._meter: _HookMeter | _CopyMeter = _HookMeter()
        self._pending: list[_StepNorms] = []
        self._scaled = False
        self._running = RunningNoiseScale(self.beta)
        self.valid_steps = 0
        self.skipped_steps = 0
        self.halves_steps = 0  # extra-halves passes run
        self.halves_samples = 0  # the samples they forwarded and backwarded
        self._population: int | None = None
        self._world = 1
        self._sharded = False  # FSDP2: a _ShardedMeter, its steps' estimates already reduced (in _ready)
        self._ready: list[tuple[float, float, int, int]] = []
        # extra-halves
        self._watched: Workload | None = None  # the workload behind watch(): the extra pass runs its forward
        self._halves: TrainStep | None = None
        self._params: list[nn.Parameter] = []
        self._armed = False  # the step in progress is a measured one: the watched forward keeps its batch
        self._seen: Any = None  # the batch of the last training-mode forward while armed
        self._step_batch: Any = None  # the measured step's batch (one micro-batch: the whole batch)
        self._before: list[torch.Tensor] | None = None  # the parameters its gradient was taken at
        self._failed: str | None = None

    def watch(self, workload: Workload) -> Workload:
        """The same workload, whose forward also hands this callback the batch of each measured training step, so a
        run whose steps are one micro-batch can be measured by extra halves. The forward itself is the workload's
        (``batchfit.step``'s default or ``Workload.forward``), called exactly as before: train the returned
        workload with this callback, ``train(cb.watch(workload), callbacks=[cb], ...)``."""
        if not isinstance(workload, Workload):
            raise ConfigError(f"NoiseCallback.watch takes a Workload, got {type(workload).__name__}")
        original = workload

        def forward(model: nn.Module, batch: Any) -> Any:
            if self._armed and model.training:
                self._seen = batch
            return call_forward(original, model, batch)

        self._watched = original
        return dataclasses.replace(workload, forward=forward)

    # -- engine hooks -------------------------------------------------------------------------------------------
    def on_train_start(self, state: Any) -> None:
        self._world = state.world_size
        self._scaled = state.scaler is not None
        self._failed = None
        self._sharded = sharding.is_fsdp(state.model)
        if self._sharded:  # FSDP2: the small batches are the global micro-batches (every rank's i-th together)
            self.noise_method = "accumulation"
            self._meter = _ShardedMeter(state.model, state.world_size)
            if state.accumulation_steps >= 2 and state.train_step is not None:
                state.train_step.sync_every_micro = True  # each micro-batch's gradient reduce-scattered as it ends
            else:
                self._failed = (f"under FSDP B_simple needs >= 2 micro-batches per rank (the ranks' gradients are "
                                f"only seen reduce-scattered), and this run has {state.accumulation_steps}")
                state.extras["noise_error"] = self._failed
        elif state.accumulation_steps * state.world_size >= 2:
            self.noise_method = "accumulation"
            self._meter = _make_meter(self.method, state.model, state.world_size)
        elif self._watched is not None and state.world_size == 1:
            if state.batch_size < 2:
                raise ConfigError(f"the noise scale needs a batch of at least 2 samples, got {state.batch_size}")
            self.noise_method = "extra-halves"
            self._params = _trainable(state.model)
            self._meter = _make_meter(self.method, state.model, 1)  # chosen once; attached only during a pass
            self._meter.detach()
            self._halves = TrainStep(self._watched, state.model, None, device=state.device,
                                     precision=state.precision, scaler=state.scaler, world_size=1)
            state.extras["noise_every"] = self.halves_every
        else:
            raise ConfigError(
                f"measuring the noise scale needs >= 2 micro-batches per step, but batch {state.batch_size} runs "
                f"as one micro-batch of {state.micro_batch_size}; give a micro-batch size <= "
                f"{default_micro_batch_size(state.batch_size)}, or train cb.watch(workload) to measure it on extra "
                "halves of every few batches"
            )
        # each batch is drawn without replacement from the N training samples (engine: one permutation per epoch)
        self._population = state.workload.num_train
        self._pending = []
        self._ready = []
        self._running = RunningNoiseScale(self.beta)
        self.valid_steps = self.skipped_steps = self.halves_steps = self.halves_samples = 0
        self._arm(state)
        state.extras["noise_method"] = self.noise_method
        state.extras["b_simple_history"] = []
        state.extras["b_simple"] = None

    def on_micro_batch_end(self, state: Any) -> None:
        if self.noise_method == "extra-halves":
            # the step's own forward is the last one before its first micro-batch ends; one micro-batch: its batch
            if self._armed and state.micro_index == 0 and state.micro_samples == state.batch_samples:
                self._step_batch = self._seen
            self._seen = None
            return
        if self._sharded:
            if self._failed is None:
                self._meter.end_micro(state.micro_samples, state.micro_index + 1 >= state.accumulation_steps)
            return
        if state.micro_index == 0:
            self._meter.new_step()  # a fresh step: never mix micro-batches of different steps
        last = (state.micro_index + 1) * state.micro_batch_size >= state.batch_samples
        self._meter.end_micro(state.micro_samples, last)

    def on_before_optimizer_step(self, state: Any) -> None:
        if self.noise_method == "extra-halves":
            if self._step_batch is not None:  # the parameters the step's gradient was taken at
                with torch.no_grad():
                    self._before = [p.detach().clone() for p in self._params]
            return
        if self._sharded:  # the meter's all-reduce already summed every rank's shards
            if self._failed is None:
                small, big, k = self._meter.take(state.batch_samples * self._world)
                if k >= 2:
                    self._ready.append((small, big, k, state.batch_samples * self._world))
            return
        # Gradients here are unscaled and not yet clipped; the micro-batch norms still carry the fp16 loss scale.
        norms, micro = self._meter.take()
        # Data parallel: the meter saw this rank's micro-batches, the gradient here is the all-reduced global one,
        # so every rank's micro-batches count (k x world of them, assuming even shards) against the global batch.
        k, batch = len(micro) * self._world, state.batch_samples * self._world
        if k < 2:
            return  # e.g. a last, short batch that fits one micro-batch: nothing to compare
        step = _step_norms(norms, micro, _gradients(self._meter.params), k=k, batch_size=batch,
                           scale=_loss_scale(state.scaler))
        if step is not None:
            self._pending.append(step)

    def on_step_end(self, state: Any) -> None:
        if self.noise_method == "extra-halves":
            if self._before is not None and self._step_batch is not None and self._failed is None:
                self._measure_halves(state)
            self._before = self._step_batch = self._seen = None
            self._arm(state)
        if len(self._pending) >= self.flush_every:
            self._flush()

    def on_evaluate(self, state: Any, record: dict[str, Any]) -> None:
        self._flush()
        record["b_simple"] = self._log(state, record.get("train_loss"))
        window = self._running.take_window()
        if window is not None:
            record["noise_window"] = window

    def on_train_end(self, state: Any, result: Any) -> None:
        self._flush()
        history = state.extras.setdefault("b_simple_history", [])
        if self.valid_steps and (not history or history[-1]["step"] != state.step):
            self._log(state)
        state.extras["b_simple_skipped_steps"] = self.skipped_steps
        if self._sharded and state.train_step is not None:
            state.train_step.sync_every_micro = False
        if self.noise_method == "extra-halves":
            state.extras["noise_samples"] = self.halves_samples
        self._meter.detach()
        self._armed = False
        self._before = self._step_batch = self._seen = None

    # -- internals ----------------------------------------------------------------------------------------------
    def _arm(self, state: Any) -> None:
        """extra-halves: whether the next step (number ``state.step + 1``) is measured: every ``halves_every``-th,
        so after any number of steps the measured ones are at most 1/``halves_every`` of them."""
        self._armed = (self.noise_method == "extra-halves" and self._failed is None
                       and (state.step + 1) % self.halves_every == 0)

    def _measure_halves(self, state: Any) -> None:
        """One extra forward/backward over the two halves of the step's batch at the parameters the step's gradient
        was taken at; the step's estimate goes to the pending list. Everything it touches is put back."""
        batch, before, params, model = self._step_batch, self._before, self._params, state.model
        n = data.batch_size_of(batch)
        if n < 2 or self._halves is None or before is None or not model.training:
            return
        grads = [p.grad for p in params]  # the optimizer step has zeroed them; kept whatever they are
        buffers = _BufferSnapshot(model)
        measured, swapped = None, False
        with _forked_rng(state.device):
            meter = self._meter
            meter.attach(model)
            step = self._halves
            step.micro_batch_size = math.ceil(n / 2)
            step.on_micro = [lambda mb: meter.end_micro(mb.samples, mb.last)]
            try:
                _swap_(params, before)  # the parameters before the optimizer step
                swapped = True
                for p in params:
                    p.grad = None
                step.forward_backward(batch, n)
                norms, micro = meter.take()
                halves = _gradients(params)  # sum_i (b_i/n) g_i: the weighted sum of the two halves' gradients
                scale = _loss_scale(state.scaler)
                if scale is not None:  # fp16: the pass's gradients carry the loss scale; the meter's norms keep it
                    for g in halves:
                        g.div_(scale)
                if len(micro) >= 2:
                    measured = _step_norms(norms, micro, halves, k=len(micro), batch_size=n, scale=scale)
            except Exception as exc:  # the measurement stops; training goes on untouched
                self._failed = " ".join(str(exc).split())[:300] or type(exc).__name__
                state.extras["noise_error"] = f"the extra-halves noise measurement failed: {self._failed}"
                warnings.warn(state.extras["noise_error"] + "; B_simple is not measured further in this run",
                              RuntimeWarning, stacklevel=2)
            finally:
                meter.detach()
                step.on_micro = []
                for p, g in zip(params, grads):
                    p.grad = g
                if swapped:
                    _swap_(params, before)  # back to the values after the optimizer step
                buffers.restore()
        if measured is not None:
            self._pending.append(measured)
            self.halves_steps += 1
            self.halves_samples += n
        if state.device.type == "cuda":  # its kernels finish here, not inside the next step's timing
            torch.cuda.synchronize(state.device)

    def _flush(self) -> None:
        if not self._pending and not self._ready:
            return
        decoded = _decode(self._pending, scaled=self._scaled) if self._pending else []
        if self._world > 1 and decoded:  # data parallel: each rank measured only its own micro-batches
            from batchfit import distributed

            # the engine weights rank r's micro-batch i by b_i x world / B, so each rank's "small" is world^2 x its
            # share of sum_i (b_i/B)|g_i|^2 over all ranks' micro-batches (every rank flushes at the same steps)
            smalls = distributed.all_sum(*(small for small, _, _, _ in decoded))
            decoded = [(s / self._world**2, big, k, b) for s, (_, big, k, b) in zip(smalls, decoded)]
        decoded, self._ready = decoded + self._ready, []
        for small, big, k, batch in decoded:
            if not (math.isfinite(small) and math.isfinite(big)):
                self.skipped_steps += 1
                continue
            self._running.add_step(small, big, k, batch, self._population)
            self.valid_steps += 1
        self._pending = []

    def _log(self, state: Any, train_loss: Any = None) -> float | None:
        run = self._running
        b_simple = run.b_simple
        entry = {
            "step": state.step,
            "epoch": round(state.step / max(1, state.steps_per_epoch), 4),
            "b_simple": b_simple,
            "grad_norm_sq": run.grad_norm_sq,
            "trace_cov": run.trace_cov,
        }
        if _finite(train_loss) is not None:
            entry["train_loss"] = float(train_loss)
        state.extras["b_simple_history"].append(entry)
        state.extras["b_simple"] = b_simple
        return b_simple


def _loss_scale(scaler: Any) -> torch.Tensor | float | None:
    """The fp16 loss scale: the scaler's device tensor (no host sync) or its value; None without a scaler."""
    if scaler is None:
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else scaler.get_scale()


def _swap_(params: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> None:
    """Exchange the values of ``params`` and ``other`` in place (exact copies; the tensors stay the same objects)."""
    with torch.no_grad():
        for p, o in zip(params, other):
            tmp = p.detach().clone()
            p.copy_(o)
            o.copy_(tmp)


class _BufferSnapshot:
    """Every buffer of a model (BatchNorm running statistics, ``num_batches_tracked``, ...), to put back exactly:
    the same tensor objects under the same names, with their values; buffers added meanwhile are removed."""

    def __init__(self, model: nn.Module) -> None:
        self._modules = [(m, dict(m._buffers)) for m in model.modules()]
        self._values = [(buf, buf.detach().clone()) for _, bufs in self._modules for buf in bufs.values()
                        if buf is not None]

    def restore(self) -> None:
        for module, bufs in self._modules:
            now = module._buffers
            if now.keys() != bufs.keys() or any(now[k] is not v for k, v in bufs.items()):
                module._buffers.clear()
                module._buffers.update(bufs)
        with torch.no_grad():
            for buf, value in self._values:
                buf.copy_(value)


class _forked_rng:  # noqa: N801 - used as a context manager, like torch.random.fork_rng
    """The random number generators a forward can draw from (torch's on the CPU and on ``device``, Python's,
    NumPy's global one), restored on exit: what runs inside leaves every stream where it was."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> None:
        dev = self.device
        if dev.type == "cpu":
            self._torch = torch.random.fork_rng(devices=[])
        else:
            module = getattr(torch, dev.type)
            index = dev.index if dev.index is not None else module.current_device()
            self._torch = torch.random.fork_rng(devices=[index], device_type=dev.type)
        self._torch.__enter__()
        self._py = random.getstate()
        self._np = np.random.get_state()

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self._py)
        np.random.set_state(self._np)
        self._torch.__exit__(*exc)


# ---------------------------------------------------------------------------------------------------------------
# Probe mode


@dataclass
class NoiseResult:
    """What :func:`noise_scale` measured; ``to_dict()`` is the JSON ``batchfit noise`` writes.

    ``b_simple`` is ``inf`` when the |G|² estimate is not positive (no signal above the noise); the interval is
    a 95 % bootstrap percentile interval over steps; ``converged`` says whether it lies within ±``rel_ci``.
    """

    workload: str
    b_simple: float
    b_simple_ci: tuple[float, float]
    grad_norm_sq: float
    trace_cov: float
    batch_size: int
    micro_batch_size: int
    steps: int
    converged: bool
    rel_ci: float
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    train_steps: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    seed: int = 0
    seconds: float = 0.0
    regime: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extras"))
        d["b_simple_ci"] = list(self.b_simple_ci)
        d["mode"] = "probe"
        d["reading"] = self.reading()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NoiseResult:
        """The inverse of :meth:`to_dict` (``mode`` and ``reading`` are derived; other unknown keys such as
        ``status`` or ``warning`` go to ``extras``). Written JSON has no infinities (they become ``null``): a null
        ``b_simple`` or upper bound reads back as ``inf``, a null lower bound as ``-inf``."""
        known, extras = split_fields(cls, data, derived=("mode", "reading"), deep=True)
        b = known.get("b_simple")
        known["b_simple"] = math.inf if b is None else float(b)
        low, high = known.get("b_simple_ci") or (None, None)
        known["b_simple_ci"] = (-math.inf if low is None else float(low), math.inf if high is None else float(high))
        for key in ("grad_norm_sq", "trace_cov"):
            if known.get(key) is None:
                known[key] = math.nan
        return cls(**known, extras=extras)

    def reading(self) -> str:
        """One line: the number, where in training it was measured, and what it says about the batch size.

        At initialisation (``train_steps`` 0) the value is labelled so and never compared with the batch as if it
        were the critical batch: the noise scale grows as the loss falls (McCandlish et al. 2018), so the value at
        the first step is a floor of what training will see, not the batch to aim for."""
        b, (low, high) = self.b_simple, self.b_simple_ci
        at_init = not self.train_steps
        where = "at initialisation" if at_init else f"after {self.train_steps} training steps"
        if not math.isfinite(b):
            return (
                f"B_simple is unbounded {where}: the gradient signal is below the noise (|G|^2 estimate <= 0), "
                "as near a minimum; every batch counts as small here. Probe earlier in training or with more steps."
            )
        ci = f"95% CI {_fmt(low)}-{_fmt(high)}"
        if at_init:
            return (
                f"B_simple at initialisation ~ {_fmt(b)} ({ci}), before any training step: the noise scale grows "
                "as the loss falls, so this is a floor of the critical batch later in training, not a batch size to "
                "aim for; the sweep measures B_simple against the training loss."
            )
        bs = self.batch_size
        if bs < b / 3:
            verdict = f"batch {bs} is well below it: larger batches should cut the steps needed almost in proportion"
        elif bs > 3 * b:
            verdict = f"batch {bs} is well above it: extra samples per step buy little, so smaller batches save compute"
        else:
            verdict = f"batch {bs} is near it: a balance of steps and compute"
        return (
            f"B_simple {where} ~ {_fmt(b)} ({ci}): critical batch of order {_fmt(b)} at this point of training; "
            f"{verdict}. An order-of-magnitude guide that grows as training goes on."
        )


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def _delta_ci_ok(g2: np.ndarray, tr: np.ndarray, rel_ci: float) -> bool:
    """Cheap first check: the normal-approximation (delta-method) 95 % interval of mean(tr)/mean(g2)."""
    n = len(g2)
    mg, mt = g2.mean(), tr.mean()
    if not mg > 0 or not mt > 0:
        return False
    r = mt / mg
    cov = np.cov(np.stack([tr, g2]))
    var_r = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (n * mg * mg)
    return 1.96 * math.sqrt(max(var_r, 0.0)) <= rel_ci * r


def _within(b: float, ci: tuple[float, float], rel_ci: float) -> bool:
    return math.isfinite(b) and b > 0 and ci[0] >= b * (1 - rel_ci) and ci[1] <= b * (1 + rel_ci)


def _trained_model(workload: Workload, *, train_steps: int, batch_size: int, micro_batch_size: int,
                   lr: float | None, device: Any, precision: str, seed: int) -> nn.Module:
    grabbed: dict[str, nn.Module] = {}

    class _Grab:
        def on_train_end(self, state: Any, result: Any) -> None:
            grabbed["model"] = state.model

    result = train(workload, batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr, steps=train_steps,
                   device=device, precision=precision, seed=seed, callbacks=[_Grab()])
    if result.diverged:
        raise ConfigError(
            f"training for {train_steps} steps before the probe diverged at step {result.diverged_at_step}; "
            "give a smaller lr or fewer train steps"
        )
    return grabbed["model"]


@dataclass(frozen=True)
class _ProbePlan:
    """The validated inputs of one probe."""

    batch_size: int  # the global batch B
    micro_batch_size: int
    local_batch: int  # this rank's share of B
    world: int
    steps: int
    min_steps: int
    rel_ci: float
    train_steps: int
    lr: float | None
    device: torch.device
    precision: str
    seed: int
    method: str
    sharded: bool = False  # FSDP2: the small batches are the global micro-batches (every rank's i-th together)


def _probe_plan(workload: Workload, *, batch_size: Any, micro_batch_size: Any, steps: Any, min_steps: Any,
                device: Any, precision: str, seed: Any, rel_ci: Any, train_steps: Any, lr: Any,
                method: str, parallel: str = "ddp") -> _ProbePlan:
    dev = resolve_device(device)
    check_precision(precision, dev)
    sharding.check_parallel(parallel, precision)
    batch_size = checks.positive_int("batch_size", workload.base_batch_size if batch_size is None else batch_size)
    # torchrun: each rank takes its contiguous shard of every batch; its local gradients, before they are summed
    # over ranks, are the small batches (together with any micro-batch split inside a rank)
    world = distributed.world_size() if distributed.is_initialized() else 1
    if world > 1 and batch_size % world:
        raise ConfigError(f"batch_size {batch_size} does not divide over {world} processes; use a multiple of "
                          f"{world}")
    local_batch = batch_size // world
    sharded = parallel == "fsdp" and distributed.is_initialized()
    if sharded:
        # FSDP2: gradients exist only reduce-scattered (summed over ranks), so a small batch is every rank's i-th
        # micro-batch together; each rank needs >= 2 of them
        micro_batch_size = default_micro_batch_size(local_batch) if micro_batch_size is None else micro_batch_size
        checks.positive_int("micro_batch_size", micro_batch_size)
        if micro_batch_size * 2 > local_batch:
            raise ConfigError(f"parallel='fsdp' needs >= 2 micro-batches per process, but micro_batch_size "
                              f"{micro_batch_size} > half of each process's share ({local_batch}); give a "
                              f"micro_batch_size <= {max(1, local_batch // 2)} or a larger batch_size")
        if train_steps:
            raise ConfigError("train_steps with parallel='fsdp' is not supported yet; probe the initialisation "
                              "(train_steps=0) or use parallel='ddp'")
    if micro_batch_size is None:
        micro_batch_size = local_batch if world > 1 else default_micro_batch_size(batch_size, parts=4)
    checks.positive_int("micro_batch_size", micro_batch_size)
    if world > 1 and micro_batch_size > local_batch:
        raise ConfigError(
            f"micro_batch_size {micro_batch_size} is larger than each process's share of the batch ({local_batch}); "
            f"give a micro_batch_size <= {local_batch}"
        )
    if world == 1 and micro_batch_size >= batch_size:
        raise ConfigError(
            f"the noise scale needs >= 2 micro-batches per batch, but micro-batch {micro_batch_size} >= batch "
            f"{batch_size}; give a micro_batch_size <= {max(1, batch_size // 2)}"
        )
    n = workload.num_train
    if batch_size > n:
        raise ConfigError(
            f"batch size {batch_size} is larger than the training set ({n} samples); use a batch_size <= {n}"
        )
    checks.positive_int("steps", steps)
    checks.positive_int("min_steps", min_steps)
    checks.non_negative_int("train_steps", train_steps)
    rel_ci = checks.fraction("rel_ci", rel_ci)
    checks.one_of("noise measurement method", method, METHODS)
    if lr is not None and not train_steps:
        raise ConfigError("lr only sets the training steps before the probe; give train_steps > 0 as well")
    lr = checks.positive_number("lr", lr, allow_none=True)
    return _ProbePlan(batch_size, micro_batch_size, local_batch, world, steps, min(min_steps, steps), rel_ci,
                      train_steps, lr, dev, precision, checks.seed(seed), method, sharded)


class _FixedLossScale:
    """fp16 without optimizer steps: the loss times a fixed scale (halved after an overflow), read back exactly."""

    def __init__(self, value: float) -> None:
        self.value = value

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.value


class _Estimates:
    """Per-step |G|² and tr(Σ) estimates; B_simple is the ratio of their means, with a bootstrap interval over steps.

    Stopping: a cheap delta-method check first, then the bootstrap, at most once per 5 % more steps (so a long
    probe stays linear in its length)."""

    def __init__(self, plan: _ProbePlan) -> None:
        self.plan = plan
        self.g2s: list[float] = []
        self.trs: list[float] = []
        self.history: list[dict[str, Any]] = []
        self.rng = np.random.default_rng(plan.seed)
        self.ci: tuple[float, float] | None = None
        self.done = False
        self._sum_g2 = self._sum_tr = 0.0
        self._next_bootstrap = 0

    def add(self, step: int, g2: float, tr: float) -> dict[str, Any]:
        """Add one step's estimates; return its report ``{step, b_simple, b_simple_ci, grad_norm_sq, trace_cov}``."""
        self.g2s.append(g2)
        self.trs.append(tr)
        self._sum_g2, self._sum_tr = self._sum_g2 + g2, self._sum_tr + tr
        mg, mt = self._sum_g2 / len(self.g2s), self._sum_tr / len(self.g2s)
        b_now = _ratio(mt, mg)
        self.history.append({"step": step, "b_simple": b_now})
        if len(self.g2s) >= max(2, self.plan.min_steps, self._next_bootstrap) and b_now is not None:
            g2_arr, tr_arr = np.asarray(self.g2s), np.asarray(self.trs)
            if _delta_ci_ok(g2_arr, tr_arr, self.plan.rel_ci):
                self.ci = ratio_bootstrap_ci(g2_arr, tr_arr, self.rng)
                self.done = _within(b_now, self.ci, self.plan.rel_ci)
                self._next_bootstrap = math.ceil(len(self.g2s) * 1.05)
        return {"step": step, "b_simple": b_now, "b_simple_ci": self.ci, "grad_norm_sq": mg, "trace_cov": mt}

    def final(self) -> tuple[float, tuple[float, float], float, float, bool]:
        """``(B_simple, interval, mean |G|², mean tr(Σ), converged)``; when it stopped on convergence, the interval
        that stopped it."""
        g2_arr, tr_arr = np.asarray(self.g2s), np.asarray(self.trs)
        mg, mt = float(g2_arr.mean()), float(tr_arr.mean())
        b_simple = mt / mg if mg > 0 else math.inf
        ci = self.ci
        if not (self.done and ci is not None):
            ci = ratio_bootstrap_ci(g2_arr, tr_arr, self.rng) if len(self.g2s) >= 2 else (-math.inf, math.inf)
        return b_simple, ci, mg, mt, _within(b_simple, ci, self.plan.rel_ci)


def _probe_batches(workload: Workload, plan: _ProbePlan) -> Iterator[tuple[Any, int]]:
    """Batches of B distinct samples, consecutive slices of one seeded permutation per pass over the data (this
    rank's shard under torchrun), for as many passes as the probe needs."""
    source = data.train_source(workload)
    gen = torch.Generator().manual_seed(plan.seed)
    rank = distributed.rank() if plan.world > 1 else 0
    while True:
        empty = True
        batches = source.epoch(plan.batch_size, generator=gen, drop_last=True, rank=rank, world_size=plan.world)
        for item in fetching(batches, "train_data"):
            empty = False
            yield item
        if empty:
            raise DataError(f"train_data yielded no batch of {plan.batch_size}; check its length against the "
                            "samples it yields")


class _ShardedMeter:
    """FSDP2: after each micro-batch the step reduce-scatters (``TrainStep.sync_every_micro``), so this rank's
    gradient shards hold the running sum over every rank's micro-batches so far; the difference to the previous sum
    is the shard of the i-th *global* micro-batch's weighted gradient ``(b_i/B) G_i`` (b_i = micro-batch x world).
    The full gradients' squared norms are the shards' squared norms summed over ranks
    (:func:`batchfit.sharding.sharded_sq_norm` does it for one list; :meth:`take` sums all of a step in one
    all-reduce)."""

    def __init__(self, model: nn.Module, world: int) -> None:
        self.params = _trainable(model)
        self.world = world
        self._prev: list[torch.Tensor] | None = None
        self._sq: list[float] = []
        self._micro: list[int] = []

    def _shards(self) -> list[torch.Tensor]:
        out = []
        for p in self.params:
            g = p.grad
            if g is None:
                g = torch.zeros_like(getattr(p, "_local_tensor", p))
            inner = getattr(g, "_local_tensor", None)
            out.append((inner if isinstance(inner, torch.Tensor) else g).detach())
        return out

    def end_micro(self, samples: int, last: bool) -> None:
        now = self._shards()
        prev = self._prev
        diff = now if prev is None else [a - b for a, b in zip(now, prev)]
        self._sq.append(sum(float(d.double().pow(2).sum()) for d in diff))
        self._micro.append(samples * self.world)
        self._prev = None if last else [t.clone() for t in now]

    def take(self, batch_size: int) -> tuple[float, float, int]:
        """``(small, big, k)`` of the step: ``small = Σ_i (b_i/B)|G_i|²`` over the global micro-batches, ``big``
        the squared norm of the step's full gradient; one all-reduce."""
        local_small = sum(sq * batch_size / b for sq, b in zip(self._sq, self._micro))
        local_big = sum(float(t.double().pow(2).sum()) for t in self._shards())
        small, big = distributed.all_sum(local_small, local_big)
        k = len(self._micro)
        self._prev, self._sq, self._micro = None, [], []
        return small, big, k

    def detach(self) -> None:
        self._prev, self._sq, self._micro = None, [], []


def _measure(step: TrainStep, meter: Any, batch: Any, count: int, plan: _ProbePlan,
             scale: float) -> tuple[float, float, int]:
    """One probe step through the training step's forward/backward (the meter hooked into its micro-batches);
    returns ``(small, big, k)`` with the loss scale taken out. No optimizer step: the parameters stay put."""
    if plan.sharded:
        for p in meter.params:
            p.grad = None
        step.forward_backward(batch, count)
        small, big, k = meter.take(plan.batch_size)
        return small / scale**2, big / scale**2, k
    for p in meter.params:
        p.grad = None
    step.forward_backward(batch, count)
    norms, micro = meter.take()
    grads = _gradients(meter.params)
    if plan.world > 1:  # the batch gradient is the sum of the ranks' shares
        distributed.all_sum_tensors(grads)
    measured = _step_norms(norms, micro, grads, k=len(micro) * plan.world, batch_size=plan.batch_size)
    if measured is None:
        raise WorkloadError("the loss does not depend on any trainable parameter; there is no gradient")
    small, big, k, _ = _decode([measured], scaled=False)[0]
    if plan.world > 1:  # each rank measured only its own micro-batches ...
        small = distributed.all_sum(small)[0]
        # ... and the step weights each micro-batch loss by its share x world (DDP's averaging convention), so
        # every norm carries a factor world: take it out of both
        small, big = small / plan.world**2, big / plan.world**2
    return small / scale**2, big / scale**2, k  # fp16: both carry the fixed loss scale


def noise_scale(
    workload: Workload | str,
    *,
    batch_size: int | None = None,
    micro_batch_size: int | None = None,
    steps: int = 200,
    min_steps: int = 10,
    device: str | torch.device | None = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    rel_ci: float = 0.10,
    train_steps: int = 0,
    lr: float | None = None,
    method: str = "auto",
    progress: ProgressFn | None = None,
    parallel: str = "ddp",
) -> NoiseResult:
    """Probe B_simple at fixed parameters: sample batches, split each into micro-batches, estimate.

    Each probe step is the forward/backward of the training step (:class:`batchfit.step.TrainStep`: the workload's
    forward, targets and loss, micro-batch losses weighted by their share of the batch), with the meter in its
    per-micro-batch hook; no optimizer step is taken.

    Args:
        batch_size: the big batch B (default: the workload's ``base_batch_size``; at least 2).
        micro_batch_size: the small batch b < B (default ``ceil(B / 4)``: 4 micro-batches).
        steps: the most batches to sample; it stops earlier once the 95 % interval is within ±``rel_ci``
            (after ``min_steps``), otherwise warns with :class:`NoisyEstimateWarning`.
        train_steps: train this many optimizer steps first (``engine.train`` at ``batch_size`` and ``lr`` or the
            scaled base LR, with the workload's clipping and schedule) and probe the trained parameters; 0 probes
            the seeded initialisation.
        lr: the learning rate of those training steps (only with ``train_steps``).
        method: how micro-batch gradient norms are taken (see :class:`NoiseCallback`); the result is the same.
        progress: receives :class:`batchfit.progress.ProgressEvent` s of stage ``noise``: ``start``, an ``update``
            per step (``completed`` = steps done, ``data`` = ``{step, b_simple, b_simple_ci, grad_norm_sq,
            trace_cov}``, ``b_simple_ci`` None until an interval is computed), ``end`` with the reading.
        parallel: under torchrun, ``ddp`` (each rank's local gradients are the small batches) or ``fsdp`` (FSDP2:
            the model is sharded; gradients exist only summed over ranks, so a small batch is every rank's i-th
            micro-batch together, b = micro-batch x world, and the squared norms come from the shards' squared
            norms summed over ranks; default micro-batch: half of each rank's share).

    >>> r = noise_scale("demo:digits-mlp", batch_size=64, steps=20)  # doctest: +SKIP
    >>> r.b_simple > 0  # doctest: +SKIP
    True
    """
    t_start = time.perf_counter()
    workload = load_workload(workload)
    plan = _probe_plan(workload, batch_size=batch_size, micro_batch_size=micro_batch_size, steps=steps,
                       min_steps=min_steps, device=device, precision=precision, seed=seed, rel_ci=rel_ci,
                       train_steps=train_steps, lr=lr, method=method, parallel=parallel)
    emit(progress, "noise", "start", f"B_simple at batch {plan.batch_size}", completed=0, total=plan.steps)
    trained = None
    if plan.train_steps:
        trained = _trained_model(workload, train_steps=plan.train_steps, batch_size=plan.batch_size,
                                 micro_batch_size=plan.micro_batch_size, lr=plan.lr, device=plan.device,
                                 precision=plan.precision, seed=plan.seed).to(plan.device)
    scaler = _FixedLossScale(_FP16_INIT_SCALE) if plan.precision == "fp16" else None
    # the seeded initialisation (or the trained model) in train mode: the gradient training would see (dropout,
    # batch-norm statistics); gradients only (no optimizer); FSDP2 shards it in place
    shard = getattr(workload, "shard", None)
    run = build_run(workload, precision=plan.precision, device=plan.device, seed=plan.seed, model=trained,
                    optimizer=False, micro_batch_size=plan.micro_batch_size, scaler=scaler, world_size=plan.world,
                    wrap=(lambda m: sharding.wrap_fsdp(m, plan.device, plan.precision, shard)) if plan.sharded
                    else None)
    model, step = run.model, run.step
    meter: Any = _ShardedMeter(model, plan.world) if plan.sharded else _make_meter(plan.method, model, plan.world)
    step.on_micro.append(lambda mb: meter.end_micro(mb.samples, mb.last))
    step.sync_every_micro = plan.sharded  # FSDP2: each micro-batch's gradient reduce-scattered as it ends
    est = _Estimates(plan)
    skipped = step_no = 0
    try:
        for step_no, (batch, count) in zip(range(1, plan.steps + 1), _probe_batches(workload, plan)):
            small, big, k = _measure(step, meter, batch, count, plan, scaler.value if scaler else 1.0)
            del batch
            if not (math.isfinite(small) and math.isfinite(big)):
                skipped += 1
                if scaler is not None:
                    scaler.value /= 2  # an fp16 overflow: retry the next batch at half the loss scale
                continue
            report = est.add(step_no, *unbiased_estimates(small, big, k, plan.batch_size,
                                                          population=workload.num_train))
            emit(progress, "noise", "update", completed=step_no, total=plan.steps, **report)
            if est.done:
                break
    finally:
        meter.detach()
        for p in meter.params:
            p.grad = None

    if not est.g2s:
        raise WorkloadError(
            f"every one of the {step_no} probe steps had a non-finite gradient; check the data and the loss "
            "(or use precision fp32)"
        )
    b_simple, ci, mg, mt, converged = est.final()
    result = NoiseResult(
        workload=workload.name, b_simple=b_simple, b_simple_ci=ci, grad_norm_sq=mg, trace_cov=mt,
        batch_size=plan.batch_size, micro_batch_size=plan.micro_batch_size, steps=step_no, converged=converged,
        rel_ci=plan.rel_ci, history=est.history, skipped_steps=skipped, train_steps=plan.train_steps,
        device=str(plan.device), precision=plan.precision, seed=plan.seed, seconds=time.perf_counter() - t_start,
        regime={"micro_batches_per_step": math.ceil(plan.local_batch / plan.micro_batch_size) * plan.world,
                "gradients": "at fixed parameters, unclipped (no optimizer step)",
                "training_before": None if not plan.train_steps else {
                    "steps": plan.train_steps, "grad_clip": getattr(workload, "grad_clip", None),
                    "lr_schedule": getattr(workload, "lr_schedule", None) is not None}},
    )
    if not converged:
        warnings.warn(
            f"B_simple = {_fmt(b_simple)} has a 95% interval of {_fmt(ci[0])}-{_fmt(ci[1])}, wider than "
            f"±{plan.rel_ci:.0%} after {step_no} steps; give more steps or a larger batch size for a firmer estimate",
            NoisyEstimateWarning,
            stacklevel=2,
        )
    emit(progress, "noise", "end", result.reading(), completed=step_no, total=plan.steps)
    return result
