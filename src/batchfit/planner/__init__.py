"""Plan for a GPU you don't have: peak memory, the largest batch and step time on a named GPU, from a CPU.

:func:`plan` traces one training step of a workload on PyTorch's ``meta`` device (:mod:`.trace`), puts in by rule
what a CPU cannot trace for CUDA (:mod:`.rules`: autocast's CUDA lists, the attention kernels, fused dropout,
``foreach`` optimizers, allocator rounding, library workspaces), replays the allocation timeline at any batch size
(:mod:`.timeline`, with the DDP/FSDP layouts), times the step with a roofline per operator (:mod:`.roofline`) on a
device from the table (:mod:`.devices`). docs/plan.md describes the model of each memory part and its limits.

(The package is ``planner``, not ``plan``, so that ``batchfit.plan`` stays the function.)
"""

from batchfit.planner.core import FIT_SIZES, KNEE_SHARE, PARALLEL_MODES, PlanResult, calibrate_host, plan
from batchfit.planner.devices import CUDA_CONTEXT_BYTES, DEVICES, GpuSpec, gpu_names, lookup

__all__ = ["CUDA_CONTEXT_BYTES", "DEVICES", "FIT_SIZES", "KNEE_SHARE", "PARALLEL_MODES", "GpuSpec", "PlanResult",
           "calibrate_host", "gpu_names", "lookup", "plan"]
