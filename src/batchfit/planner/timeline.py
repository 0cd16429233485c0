"""From traces to the peak at any batch size: the event timeline with sizes as polynomials in B.

A training step allocates the same storages in the same order at every batch size; only their sizes change, and
each size is a polynomial in B of degree <= 2 (linear for almost everything; quadratic for in-batch similarity
matrices such as contrastive losses). Three traces fix every storage's polynomial exactly, so the live bytes of the
CUDA allocator after every event — and with them the peak, where it happens and what is live there — follow for any
B by replaying the events (a cumulative sum), without tracing again. A fourth trace at the largest batch found
checks it; when traces at different sizes do not line up (a model whose code depends on B), every batch size is
traced.

The parallel layouts change what is live by rule: DDP adds its gradient buckets (a second copy of the gradients,
``gradient_as_bucket_view=False``, the default); FSDP (full sharding) divides parameters, gradients and optimizer
state by the world size and adds the units all-gathered at once (the root unit plus the current and the prefetched
block, and the unsharded gradients of a block and the root before their reduce-scatter in backward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from batchfit.planner.rules import BLOCK_ROUND
from batchfit.planner.trace import CATEGORIES, OpRecord, Trace

__all__ = ["MemoryPoint", "Parallel", "Timeline", "largest_under", "polynomial"]


@dataclass(frozen=True)
class Parallel:
    mode: str = "none"  # none | ddp | fsdp
    world_size: int = 1


@dataclass
class MemoryPoint:
    """The predicted peak at one batch size: total, by part, where in the step."""

    batch_size: int
    peak_bytes: int
    parts: dict[str, int]
    phase: str
    op: str


def polynomial(xs: Sequence[int], ys: Sequence[int]) -> tuple[Fraction, Fraction, Fraction]:
    """Exact coefficients (a, b, c) of ``a + b x + c x^2`` through three points (Lagrange, in fractions)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d01 = Fraction(y1 - y0, x1 - x0)
    d12 = Fraction(y2 - y1, x2 - x1)
    c = (d12 - d01) / (x2 - x0)
    b = d01 - c * (x0 + x1)
    a = y0 - b * x0 - c * x0 * x0
    return a, b, c


def _coefficients(values: list[list[int]], xs: Sequence[int]) -> np.ndarray:
    """(n, 3) float coefficients for n quantities measured at the three sizes (exact fits, stored as floats: sizes
    stay far below 2**53)."""
    arr = np.array(values, dtype=object).T  # (n, 3)
    out = np.zeros((arr.shape[0], 3), dtype=np.float64)
    for i, ys in enumerate(arr):
        if ys[0] == ys[1] == ys[2]:
            out[i, 0] = ys[0]
            continue
        a, b, c = polynomial(xs, [int(y) for y in ys])
        out[i] = (float(a), float(b), float(c))
    return out


def _eval(coef: np.ndarray, b: int) -> np.ndarray:
    return np.maximum(np.rint(coef[:, 0] + coef[:, 1] * b + coef[:, 2] * float(b) * b), 0.0)


class Timeline:
    """Replays traced events at any batch size. Build with :meth:`fit` (three traces) or :meth:`single` (one)."""

    def __init__(self, ref: Trace, size_coef: np.ndarray, op_coef: np.ndarray, fitted: bool) -> None:
        self.ref = ref
        self.size_coef = size_coef  # (tokens, 3)
        self.op_coef = op_coef  # (ops, 3 quantities, 3): flops, bytes, output elements
        self.fitted = fitted
        self.tokens = np.asarray(ref.tokens, dtype=np.int64)
        self.signs = np.asarray(ref.signs, dtype=np.float64)
        cats = np.asarray([CATEGORIES.index(c) for c in ref.category], dtype=np.int64)
        self.event_cat = cats[self.tokens] if len(self.tokens) else cats[:0]
        self.event_phase = np.asarray(ref.phases)
        self.start = ref.step_start

    @classmethod
    def fit(cls, traces: Sequence[Trace]) -> Timeline | None:
        """One timeline through three traces at different batch sizes, or ``None`` when they do not line up."""
        if len(traces) != 3 or len({t.signature() for t in traces}) != 1:
            return None
        xs = [t.batch_size for t in traces]
        size_coef = _coefficients([t.sizes for t in traces], xs)
        quantities = [[[getattr(o, q) for o in t.ops] for t in traces] for q in ("flops", "bytes", "outputs")]
        op_coef = np.stack([_coefficients(v, xs) for v in quantities], axis=1) if traces[0].ops \
            else np.zeros((0, 3, 3))
        return cls(traces[0], size_coef, op_coef, True)

    @classmethod
    def single(cls, trace: Trace) -> Timeline:
        """A timeline valid at ``trace.batch_size`` only."""
        sizes = np.zeros((len(trace.sizes), 3))
        sizes[:, 0] = trace.sizes
        ops = np.zeros((len(trace.ops), 3, 3))
        ops[:, 0, 0] = [o.flops for o in trace.ops]
        ops[:, 1, 0] = [o.bytes for o in trace.ops]
        ops[:, 2, 0] = [o.outputs for o in trace.ops]
        return cls(trace, sizes, ops, False)

    # -------------------------------------------------------------------------------------------------------
    def ops_at(self, b: int) -> list[OpRecord]:
        """The measured step's operators with their FLOPs, bytes and output elements at batch size ``b`` (the
        kernels each launches do not change with it)."""
        if not self.ref.ops:
            return []
        flops, moved, outputs = (_eval(self.op_coef[:, k, :], b) for k in range(3))
        return [OpRecord(o.name, o.phase, int(f), int(m), o.kind, o.dtype, o.kernels, int(n))
                for o, f, m, n in zip(self.ref.ops, flops, moved, outputs)]

    def live_by_part(self, b: int) -> np.ndarray:
        """(events, parts) live bytes after each event of the measured step, by category (allocator-rounded)."""
        sizes = _eval(self.size_coef, b)
        rounded = np.ceil(sizes / BLOCK_ROUND) * BLOCK_ROUND  # the allocator's blocks (0 stays 0)
        deltas = self.signs * rounded[self.tokens]
        out = np.zeros((len(deltas), len(CATEGORIES)))
        for k in range(len(CATEGORIES)):
            out[:, k] = np.cumsum(np.where(self.event_cat == k, deltas, 0.0))
        return out[self.start:]

    def memory(self, b: int, workspace: int, parallel: Parallel = Parallel()) -> MemoryPoint:
        """The peak of the measured step at batch size ``b`` with ``workspace`` bytes of library workspaces."""
        live = self.live_by_part(b)
        phases = self.event_phase[self.start:]
        weight = np.ones(len(CATEGORIES))
        extra_params = np.zeros(len(phases))
        extra_grads = np.zeros(len(phases))
        ref = self.ref
        if parallel.mode == "fsdp" and parallel.world_size > 1:
            n = parallel.world_size
            for k, cat in enumerate(CATEGORIES):
                if cat in ("parameters", "gradients", "optimizer_state", "optimizer_temporaries"):
                    weight[k] = 1.0 / n
            root, block = ref.units.get("root", 0), ref.units.get("block", 0)
            compute = (phases == "forward") | (phases == "backward")
            extra_params += np.where(compute, root + 2 * block, 0.0)  # the root, the current and the next block
            extra_grads += np.where(phases == "backward", root + block, 0.0)  # before their reduce-scatter
        elif parallel.mode == "ddp" and parallel.world_size > 1:
            extra_grads += ref.grad_bytes  # the buckets
        total = live @ weight + extra_params + extra_grads
        i = int(np.argmax(total))
        parts = {cat: int(round(live[i, k] * weight[k])) for k, cat in enumerate(CATEGORIES)}
        parts["parameters"] += int(extra_params[i])
        parts["gradients"] += int(extra_grads[i])
        parts["workspace"] = int(workspace)
        peak = sum(parts.values())
        tok = int(self.tokens[self.start + i])
        return MemoryPoint(b, peak, parts, str(phases[i]), ref.alloc_ops[tok])


def largest_under(peak: Callable[[int], MemoryPoint], limit: float, cap: int) -> int:
    """The largest batch size <= ``cap`` whose peak is <= ``limit`` (0 when not even 1 fits): doubling, then
    bisection (the peak grows with B)."""
    if peak(1).peak_bytes > limit:
        return 0
    lo, hi = 1, 2
    while hi <= cap and peak(hi).peak_bytes <= limit:
        lo, hi = hi, hi * 2
    if hi > cap:
        if peak(cap).peak_bytes <= limit:
            return cap
        hi = cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if peak(mid).peak_bytes <= limit:
            lo = mid
        else:
            hi = mid
    return lo
