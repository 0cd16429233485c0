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

from collections.abc import Sequence
from dataclasses import dataclass

from batchfit.planner.devices import GpuSpec
from batchfit.planner.timeline import Parallel
from batchfit.planner.trace import OpRecord

__all__ = ["EFFICIENCY", "Efficiency", "StepTime", "step_time"]


@dataclass(frozen=True)
class Efficiency:
    """(estimate, optimistic, pessimistic) for each factor."""

    tensor: tuple[float, float, float] = (0.5, 0.75, 0.3)  # share of the dense Tensor Core / FP32 peak
    memory: tuple[float, float, float] = (0.6, 0.85, 0.45)  # share of DRAM bandwidth
    host: tuple[float, float, float] = (40e-6, 15e-6, 100e-6)  # seconds per operator on the host
    kernel_floor: float = 2e-6  # the shortest kernel
    link: tuple[float, float, float] = (0.75, 0.9, 0.5)  # share of the link's bandwidth collectives reach


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

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


def _times(ops: Sequence[OpRecord], spec: GpuSpec, e_t: float, e_m: float, floor: float,
           host: float) -> tuple[float, float, float, float, dict[str, float]]:
    """(sum of GPU times, sum of per-operator max(GPU, host), compute-bound part, memory-bound part, GPU time by
    phase)."""
    gpu = serial = compute = memory = 0.0
    by_phase: dict[str, float] = {}
    for op in ops:
        if op.kind == "none":
            continue
        t_mem = op.bytes / (spec.bandwidth * e_m)
        t_flop = op.flops / (spec.peak_flops(op.dtype) * e_t) if op.kind == "tensor" else 0.0
        t = max(t_mem, t_flop, floor)
        if t_flop >= t_mem:
            compute += t
        else:
            memory += t
        gpu += t
        serial += max(t, host)
        by_phase[op.phase] = by_phase.get(op.phase, 0.0) + t
    return gpu, serial, compute, memory, by_phase


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
    kernels = sum(op.kind != "none" for op in ops)
    comm_bytes = _comm_bytes(parallel, param_bytes, grad_bytes)
    results = []
    for i in range(3):  # estimate, optimistic, pessimistic
        gpu, serial, compute, memory, by_phase = _times(ops, spec, e.tensor[i], e.memory[i], e.kernel_floor,
                                                        e.host[i])
        host = kernels * e.host[i]
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
                    comm_seconds=comm, bound=bound)
