"""``plan()``: peak memory, the largest batch and step time on a named GPU, from a machine without one."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from batchfit import checks
from batchfit.errors import ConfigError
from batchfit.loading import load_workload
from batchfit.memory import format_bytes, parse_bytes
from batchfit.planner.devices import CUDA_CONTEXT_BYTES, GpuSpec, lookup
from batchfit.planner.roofline import EFFICIENCY, Efficiency, calibrate_host_op, step_time, with_host_op
from batchfit.planner.rules import library_workspaces
from batchfit.planner.timeline import MemoryPoint, Parallel, Timeline, largest_under
from batchfit.planner.trace import Trace, sample_batch, trace_step
from batchfit.progress import ProgressFn, emit
from batchfit.workload import Workload

__all__ = ["FIT_SIZES", "KNEE_SHARE", "PARALLEL_MODES", "PlanResult", "calibrate_host", "plan"]

FIT_SIZES = (2, 3, 4)  # the three traced batch sizes the timeline is fitted through
KNEE_SHARE = 0.95  # as the finder: the knee is the smallest batch with >= 95 % of the best samples/s
PARALLEL_MODES = ("none", "ddp", "fsdp")
DEFAULT_CAP = 2**24  # no batch beyond this is searched when the data set does not say otherwise


@dataclass
class PlanResult:
    """What :func:`plan` predicts. ``points`` hold, per batch size, ``peak_bytes`` (the predicted
    ``torch.cuda.max_memory_allocated()`` of a training step), its ``parts``, where in the step the peak falls,
    ``step_seconds`` ``{estimate, low, high}`` and ``samples_per_s`` (per device). ``max_batch_size`` keeps the
    ``margin`` under the usable memory (the memory less the CUDA context), as the finder's recommendation does;
    ``limit_batch_size`` is the largest batch predicted to fit with no margin."""

    workload: str
    gpu: str
    gpu_spec: dict[str, Any]
    precision: str
    parallel: str
    world_size: int
    memory_bytes: int
    usable_bytes: int
    margin: float
    points: list[dict[str, Any]]
    max_batch_size: int
    limit_batch_size: int
    limited_by: str
    throughput_knee_batch_size: int | None
    fixed_bytes: int
    per_sample_bytes: int
    workspace: dict[str, int]
    rules: dict[str, Any]
    trace: dict[str, Any]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive_sizes(batch_sizes: Any) -> list[int] | None:
    if batch_sizes is None:
        return None
    if isinstance(batch_sizes, int) and not isinstance(batch_sizes, bool):
        batch_sizes = [batch_sizes]
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence) or not batch_sizes:
        raise ConfigError(f"batch_sizes must be a non-empty list of positive integers, got {batch_sizes!r}")
    return sorted({checks.positive_int("batch_sizes", b) for b in batch_sizes})


class _Memory:
    """Peak memory at any batch size: from the fitted timeline, or by tracing each size when there is none."""

    def __init__(self, wl: Workload, spec: GpuSpec, precision: str, sample: Any, parallel: Parallel) -> None:
        self.wl, self.spec, self.precision, self.sample, self.parallel = wl, spec, precision, sample, parallel
        self.traces: dict[int, Trace] = {}
        self.timeline: Timeline | None = None
        self.workspace: dict[str, int] = {}
        self.cache: dict[int, MemoryPoint] = {}
        self.trace_seconds = 0.0

    def traced(self, b: int) -> Trace:
        if b not in self.traces:
            t0 = time.perf_counter()
            self.traces[b] = trace_step(self.wl, b, spec=self.spec, precision=self.precision, sample=self.sample)
            self.trace_seconds += time.perf_counter() - t0
        return self.traces[b]

    def start(self) -> None:
        traces = [self.traced(b) for b in FIT_SIZES]
        self.timeline = Timeline.fit(traces)
        ref = traces[0]
        self.workspace = library_workspaces(self.spec, ref.gemm_threads, ref.lt_threads)

    def timeline_at(self, b: int) -> Timeline:
        if self.timeline is not None:
            return self.timeline
        return Timeline.single(self.traced(b))

    def __call__(self, b: int) -> MemoryPoint:
        if b not in self.cache:
            self.cache[b] = self.timeline_at(b).memory(b, sum(self.workspace.values()), self.parallel)
        return self.cache[b]

    def verify(self, b: int) -> bool:
        """Trace ``b`` directly and compare with the timeline; on a mismatch, trace every size from now on."""
        if self.timeline is None or b in FIT_SIZES or b < 1:
            return self.timeline is not None
        direct = Timeline.single(self.traced(b)).memory(b, sum(self.workspace.values()), self.parallel)
        predicted = self(b)
        if direct.peak_bytes == predicted.peak_bytes:
            return True
        self.timeline = None
        self.cache = {}
        return False


def _efficiency(host_op_seconds: Any) -> Efficiency:
    if host_op_seconds is None:
        return EFFICIENCY
    if isinstance(host_op_seconds, bool) or not isinstance(host_op_seconds, (int, float)) \
            or not 0 < host_op_seconds < 1:
        raise ConfigError(f"host_op_seconds must be a number of seconds in (0, 1), got {host_op_seconds!r}")
    return with_host_op(EFFICIENCY, float(host_op_seconds))


def _point(mem: Any, b: int, spec: Any, par: Any, target: float,
           efficiency: Efficiency = EFFICIENCY) -> dict[str, Any]:
    """One batch size's predicted peak (with its parts and where it happens) and step time."""
    m = mem(b)
    tl = mem.timeline_at(b)
    st = step_time(tl.ops_at(b), spec, par, param_bytes=tl.ref.param_bytes, grad_bytes=tl.ref.grad_bytes,
                   efficiency=efficiency)
    return {"batch_size": b, "peak_bytes": m.peak_bytes, "parts": m.parts, "peak_phase": m.phase, "peak_op": m.op,
            "fits": m.peak_bytes <= target, "step_seconds": st.to_dict(), "samples_per_s": b / st.estimate,
            "samples_per_s_interval": [b / st.high, b / st.low], "bound": st.bound,
            "gpu_seconds": st.gpu_seconds, "host_seconds": st.host_seconds, "kernels": st.kernels}


def plan(
    workload: Workload | str,
    *,
    gpu: str | GpuSpec = "H100-80GB",
    precision: str = "fp32",
    batch_sizes: Sequence[int] | None = None,
    parallel: str = "none",
    world_size: int = 1,
    margin: float = 0.05,
    memory_bytes: int | str | None = None,
    batch_size_cap: int | None = None,
    host_op_seconds: float | None = None,
    progress: ProgressFn | None = None,
) -> PlanResult:
    """Predict, without a GPU, the peak memory of a training step at each batch size on ``gpu``, split into
    parameters, gradients, optimizer state, activations, optimizer temporaries, the input batch and library
    workspaces; the largest batch that fits with ``margin`` headroom; seconds per step and samples/s with an
    interval; and the throughput knee.

    Args:
        gpu: a name from :data:`batchfit.planner.devices.DEVICES` (``H100-80GB``, ``H200``, ``A100-40GB``,
            ``A100-80GB``, ``L4``, ``RTX-4090``) or a :class:`GpuSpec`.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast, as ``batchfit train --precision``).
        batch_sizes: the (micro-)batch sizes to report; default: powers of two up to the largest that fits, and it.
        parallel: ``none``, ``ddp`` (full replicas) or ``fsdp`` (full sharding) over ``world_size`` GPUs; batch
            sizes are per GPU.
        margin: headroom kept under the usable memory by ``max_batch_size`` (the finder's 5 %).
        memory_bytes: the GPU's memory (e.g. ``"40GiB"`` for a MIG slice), instead of the table's.
        batch_size_cap: never consider a batch larger than this (the training set caps too).
        host_op_seconds: the host's seconds per operator (Python, autograd, dispatch), e.g. from
            :func:`batchfit.planner.roofline.calibrate_host_op` on one measured step of any model on that host;
            default: the table's generic value (docs/plan.md).

    >>> r = plan("demo:digits-mlp", gpu="L4")
    >>> r.max_batch_size > 0
    True
    """
    t_start = time.perf_counter()
    wl = load_workload(workload)
    checks.one_of("precision", precision, ("fp32", "bf16", "fp16"))
    checks.one_of("parallel", parallel, PARALLEL_MODES)
    world_size = checks.positive_int("world_size", world_size)
    if parallel == "none" and world_size != 1:
        raise ConfigError("world_size > 1 needs parallel='ddp' or 'fsdp'")
    if parallel != "none" and world_size == 1:
        raise ConfigError(f"parallel={parallel!r} needs world_size >= 2")
    margin = checks.fraction("margin", margin, low_open=False)
    checks.positive_int("batch_size_cap", batch_size_cap, allow_none=True)
    efficiency = _efficiency(host_op_seconds)
    sizes = _positive_sizes(batch_sizes)
    spec = lookup(gpu, parse_bytes(memory_bytes, "memory_bytes"))
    if precision == "bf16" and spec.compute_capability < (8, 0):
        raise ConfigError(f"{spec.name} has no bf16 support; use precision fp16 or fp32")
    par = Parallel(parallel, world_size)

    emit(progress, "plan", "start", f"tracing {wl.name} for {spec.name} ({precision})")
    sample = sample_batch(wl)
    mem = _Memory(wl, spec, precision, sample, par)
    mem.start()
    emit(progress, "plan", "update", f"traced batch sizes {', '.join(map(str, FIT_SIZES))}", completed=1)

    usable = spec.memory_bytes - CUDA_CONTEXT_BYTES
    target = (1.0 - margin) * usable
    cap_data = max(1, wl.num_train // world_size)
    cap = min(cap_data, batch_size_cap) if batch_size_cap is not None else min(cap_data, DEFAULT_CAP)
    max_bs = largest_under(mem, target, cap)
    verified = mem.verify(max_bs)
    if not verified:  # the timeline was wrong there: every size is traced from now on
        max_bs = largest_under(mem, target, cap)
    limit_bs = largest_under(mem, usable, cap)
    emit(progress, "plan", "update", f"largest batch with {margin:.0%} headroom: {max_bs}", completed=2)

    if sizes is None:
        top = max(max_bs, 1)
        sizes = sorted({2**k for k in range(top.bit_length()) if 2**k <= top} | ({max_bs} if max_bs else set()))
    points: list[dict[str, Any]] = []
    for b in sizes:
        points.append(_point(mem, b, spec, par, target, efficiency))
        emit(progress, "plan", "record", f"batch {b}", completed=len(points), **points[-1])
    fitting = [p for p in points if p["fits"]]
    knee = None
    if fitting:
        best = max(p["samples_per_s"] for p in fitting)
        knee = min(p["batch_size"] for p in fitting if p["samples_per_s"] >= KNEE_SHARE * best)
    lo_b, hi_b = 1, max(2, max_bs)
    lo, hi = mem(lo_b).peak_bytes, mem(hi_b).peak_bytes
    per_sample = (hi - lo) / (hi_b - lo_b)
    if max_bs >= cap:
        limited_by = "batch_size_cap" if batch_size_cap is not None and cap == batch_size_cap else "dataset"
    else:
        limited_by = "memory"
    notes = []
    if max_bs == 0:
        notes.append(f"not even batch size 1 fits in {format_bytes(target)} "
                     f"({1 - margin:.0%} of the usable {format_bytes(usable)})")
    if not verified:
        notes.append("the traces at different batch sizes did not line up (code that depends on the batch size): "
                     "every batch size was traced on its own")
    ref = mem.traces[FIT_SIZES[0]]
    result = PlanResult(
        workload=wl.name, gpu=spec.name, gpu_spec=spec.to_dict(), precision=precision, parallel=parallel,
        world_size=world_size, memory_bytes=spec.memory_bytes, usable_bytes=usable, margin=margin, points=points,
        max_batch_size=max_bs, limit_batch_size=limit_bs, limited_by=limited_by, throughput_knee_batch_size=knee,
        fixed_bytes=int(round(lo - per_sample * lo_b)), per_sample_bytes=int(math.ceil(per_sample)),
        workspace=dict(mem.workspace),
        rules={"kernels": dict(ref.rules), "cuda_context_bytes": CUDA_CONTEXT_BYTES,
               "optimizer": "foreach" if ref.ops and any(o.name.startswith("_foreach") for o in ref.ops)
               else "per-tensor", "fsdp_units": dict(ref.units),
               "host_op_seconds": efficiency.host_op[0],
               "host": "given" if host_op_seconds is not None else "generic"},
        trace={"batch_sizes": sorted(mem.traces), "timeline": "fitted" if mem.timeline is not None else "per size",
               "verified_at": max_bs if verified and max_bs not in FIT_SIZES else None,
               "events": len(ref.tokens), "operators": len(ref.ops), "seconds": mem.trace_seconds},
        seconds=time.perf_counter() - t_start, notes=notes,
    )
    emit(progress, "plan", "end", f"fits {max_bs} with {margin:.0%} headroom on {spec.name}", completed=len(points))
    return result


def calibrate_host(workload: Workload | str, measured_step_seconds: dict[int, float], *,
                   gpu: str | GpuSpec = "H100-80GB", precision: str = "fp32") -> float:
    """The host's seconds per operator, from measured seconds per step of ``workload`` at some batch sizes on the
    host that will train (any model: the host's cost per operator carries over). Each batch size the plan finds
    host-bound gives one value (the one at which its estimate equals the measurement); the median is returned, for
    :func:`plan`'s ``host_op_seconds``. A GPU-bound measurement says nothing about the host and is skipped."""
    wl = load_workload(workload)
    spec = lookup(gpu)
    checks.one_of("precision", precision, ("fp32", "bf16", "fp16"))
    mem = _Memory(wl, spec, precision, sample_batch(wl), Parallel())
    mem.start()
    values = []
    for b, seconds in sorted(measured_step_seconds.items()):
        ops = mem.timeline_at(b).ops_at(b)
        if step_time(ops, spec).bound == "host":
            values.append(calibrate_host_op(ops, spec, float(seconds)))
    if not values:
        raise ConfigError("no measured batch size is host-bound in the plan: measure a small batch to calibrate the "
                          "host")
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
