"""Step time on a GPU from the traced operators: a roofline per operator, host overhead, collectives.

Each operator of the measured step takes ``max(FLOPs / (peak x e_t), bytes / (bandwidth x e_m))`` on the GPU (at
least a kernel's floor), where the peak is the device's dense peak for the operator's math (bf16/fp16 Tensor Cores,
TF32 for fp32 convolutions — cuDNN's default ``allow_tf32=True`` — and for fp32 matmuls only when
``torch.backends.cuda.matmul.allow_tf32`` is on, FP32 CUDA cores otherwise) and ``e_t``, ``e_m`` are the shares of the
peak and of the bandwidth real kernels reach. The host spends ``h`` per operator (Python, the dispatcher, autograd,
the launch). The GPU works asynchronously: with a launch queue that hides every gap a step takes the longer of the
two sums (the low end), with none each operator waits for the later of its launch and its kernel (the sum of the
per-operator maxima, the high end); the estimate is halfway between. Data parallelism adds its
collectives over the link (ring all-reduce ``2 (N-1)/N`` x the gradient bytes for DDP; all-gathers in forward and
backward and a reduce-scatter for FSDP), overlapped with compute in the estimate and the low end, not in the high
end. The interval is the spread of the efficiencies below: what they are, not a statistical interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from batchfit.planner.devices import GpuSpec
from batchfit.planner.timeline import Parallel
from batchfit.planner.trace import OpRecord

__all__ = ["EFFICIENCY", "Efficiency", "StepTime", "calibrate_host_op", "kernel_seconds", "step_time",
           "wave_efficiency", "with_host_op"]


@dataclass(frozen=True)
class Efficiency:
    """(estimate, optimistic, pessimistic) for each factor; docs/plan.md gives each one's source."""

    tensor: tuple[float, float, float] = (0.6, 0.8, 0.45)  # share of the dense peak a GEMM filling every SM reaches
    memory: tuple[float, float, float] = (0.7, 0.9, 0.55)  # share of DRAM bandwidth a large streaming kernel reaches
    latency: tuple[float, float, float] = (4e-6, 2.5e-6, 6e-6)  # GPU seconds per kernel beyond its work
    host_op: tuple[float, float, float] = (40e-6, 20e-6, 90e-6)  # host seconds per operator (Python, autograd, ATen)
    host_launch: tuple[float, float, float] = (4e-6, 2e-6, 8e-6)  # host seconds per kernel launch
    link: tuple[float, float, float] = (0.75, 0.9, 0.5)  # share of the link's bandwidth collectives reach
    tile: int = 128 * 128  # output elements of one GEMM/convolution thread-block tile (cuBLAS's common 128 x 128)
    split_k_min: int = 256  # the shortest reduction a split-K slice gets


EFFICIENCY = Efficiency()


@dataclass
class StepTime:
    estimate: float
    low: float
    high: float
    gpu_seconds: float
    host_seconds: float
    comm_seconds: float
    bound: str  # "gpu compute", "gpu memory", "host" or "communication"
    kernels: int = 0

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


def wave_efficiency(flops: float, outputs: float, sms: int, tile: int = EFFICIENCY.tile,
                    split_k_min: int = EFFICIENCY.split_k_min) -> float:
    """The share of the SMs a GEMM-like kernel keeps busy: its output is cut into ``tile``-element tiles, split
    along the reduction (split-K) while the tiles leave SMs idle and each slice keeps ``split_k_min`` of the
    reduction, and the tiles run in waves of ``sms``; the last wave's idle SMs are lost (NVIDIA, Matrix
    Multiplication Background User's Guide: tile and wave quantization)."""
    if outputs <= 0 or sms <= 0 or flops <= 0:
        return 1.0
    tiles = math.ceil(outputs / tile)
    reduction = flops / (2.0 * outputs)
    split = max(1, min(sms // tiles, int(reduction // split_k_min)))
    units = tiles * split
    return units / (math.ceil(units / sms) * sms)


def kernel_seconds(op: OpRecord, spec: GpuSpec, e_t: float, e_m: float, latency: float) -> tuple[float, bool]:
    """(GPU seconds of one operator, whether its math bounds it): a latency per kernel plus the longer of its math
    at ``e_t`` of the dense peak and its bytes at ``e_m`` of the bandwidth; a GEMM/convolution/attention kernel that
    fills only part of the SMs reaches that part of both."""
    t_mem = op.bytes / (spec.bandwidth * e_m)
    t_flop = op.flops / (spec.peak_flops(op.dtype) * e_t) if op.kind == "tensor" else 0.0
    work = max(t_mem, t_flop)
    if op.kind == "tensor":
        work /= wave_efficiency(op.flops, op.outputs, spec.sms)
    return op.kernels * latency + work, t_flop >= t_mem


def _times(ops: Sequence[OpRecord], spec: GpuSpec, e_t: float, e_m: float, latency: float, host_op: float,
           host_launch: float) -> tuple[float, float, float, float, float, dict[str, float]]:
    """(sum of GPU times, sum of host times, sum of per-operator max(GPU, host), compute-bound part, memory-bound
    part, GPU time by phase)."""
    gpu = host = serial = compute = memory = 0.0
    by_phase: dict[str, float] = {}
    for op in ops:
        if op.kind == "none":
            continue
        h = host_op + op.kernels * host_launch
        t, math_bound = kernel_seconds(op, spec, e_t, e_m, latency) if op.kernels else (0.0, False)
        if math_bound:
            compute += t
        else:
            memory += t
        gpu += t
        host += h
        serial += max(t, h)
        by_phase[op.phase] = by_phase.get(op.phase, 0.0) + t
    return gpu, host, serial, compute, memory, by_phase


def _comm_bytes(parallel: Parallel, param_bytes: int, grad_bytes: int) -> float:
    n = parallel.world_size
    if n <= 1 or parallel.mode == "none":
        return 0.0
    share = (n - 1) / n
    if parallel.mode == "ddp":
        return 2 * share * grad_bytes
    return share * (2 * param_bytes + grad_bytes)  # all-gather (forward, backward) + reduce-scatter


def step_time(ops: Sequence[OpRecord], spec: GpuSpec, parallel: Parallel = Parallel(), *, param_bytes: int = 0,
              grad_bytes: int = 0, efficiency: Efficiency = EFFICIENCY) -> StepTime:
    """Predicted seconds per training step (with its interval) for the measured step's operators."""
    e = efficiency
    comm_bytes = _comm_bytes(parallel, param_bytes, grad_bytes)
    results = []
    for i in range(3):  # estimate, optimistic, pessimistic
        gpu, host, serial, compute, memory, by_phase = _times(ops, spec, e.tensor[i], e.memory[i], e.latency[i],
                                                              e.host_op[i], e.host_launch[i])
        overlapped = max(gpu, host)  # the launch queue hides every gap
        # the estimate sits halfway between a queue that hides every gap and none (each operator waits for the
        # later of its launch and its kernel); the low end takes the first, the high end the second
        step = {0: (overlapped + serial) / 2, 1: overlapped, 2: serial}[i]
        comm = comm_bytes / (spec.link * e.link[i]) if comm_bytes else 0.0
        overlap_with = by_phase.get("backward", 0.0) + (by_phase.get("forward", 0.0) if parallel.mode == "fsdp"
                                                        else 0.0)
        exposed = comm if i == 2 else max(0.0, comm - overlap_with)
        results.append((step + exposed, gpu, host, comm, compute, memory))
    est, gpu, host, comm, compute, memory = results[0]
    if comm > max(gpu, host) and comm > 0:
        bound = "communication"
    elif host >= gpu:
        bound = "host"
    else:
        bound = "gpu compute" if compute >= memory else "gpu memory"
    return StepTime(estimate=est, low=results[1][0], high=results[2][0], gpu_seconds=gpu, host_seconds=host,
                    comm_seconds=comm, bound=bound, kernels=sum(op.kernels for op in ops if op.kind != "none"))


def with_host_op(efficiency: Efficiency, seconds: float) -> Efficiency:
    """``efficiency`` with the host time per operator set to ``seconds`` (a measured host), its interval kept in the
    same proportion around it."""
    est, low, high = efficiency.host_op
    return replace(efficiency, host_op=(seconds, seconds * low / est, seconds * high / est))


def calibrate_host_op(ops: Sequence[OpRecord], spec: GpuSpec, measured_seconds: float,
                      efficiency: Efficiency = EFFICIENCY) -> float:
    """The host seconds per operator at which the estimate of this step equals ``measured_seconds`` (one measured
    step of any model on the host that will train: Habitat's idea, Yu et al. ATC 2021, applied to the host, which
    no GPU table describes). Bisection: the estimate grows with the host time. Clamped to [0.1 µs, 10 ms]."""
    lo, hi = 1e-7, 1e-2
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        if step_time(ops, spec, efficiency=with_host_op(efficiency, mid)).estimate < measured_seconds:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5
