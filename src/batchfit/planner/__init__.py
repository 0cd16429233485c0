"""Plan for a GPU you don't have: peak memory, the largest batch and step time on a named GPU, from a CPU.

:func:`plan` traces one training step of a workload on PyTorch's ``meta`` device (:mod:`.trace`), puts in by rule
what a CPU cannot trace for CUDA (:mod:`.rules`: autocast's CUDA lists, the attention kernels, fused dropout,
``foreach`` optimizers, allocator rounding, library workspaces), replays the allocation timeline at any batch size
(:mod:`.timeline`, with the DDP/FSDP layouts), times the step with a roofline per operator (:mod:`.roofline`) on a
device from the table (:mod:`.devices`). docs/plan.md describes the model of each memory part and its limits.

(The package is ``planner``, not ``plan``, so that ``batchfit.plan`` stays the function.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchfit._lazy import lazy_exports

# The names are loaded on first use: ``batchfit.planner.devices`` (the GPU table that ``batchfit plan --help`` and
# its argument checks read) must not pull in torch through ``.core``.
_EXPORTS = {
    "FIT_SIZES": "batchfit.planner.core",
    "KNEE_SHARE": "batchfit.planner.core",
    "PARALLEL_MODES": "batchfit.planner.core",
    "PlanResult": "batchfit.planner.core",
    "calibrate_host": "batchfit.planner.core",
    "plan": "batchfit.planner.core",
    "CUDA_CONTEXT_BYTES": "batchfit.planner.devices",
    "DEVICES": "batchfit.planner.devices",
    "GpuSpec": "batchfit.planner.devices",
    "gpu_names": "batchfit.planner.devices",
    "lookup": "batchfit.planner.devices",
}

__all__ = ["CUDA_CONTEXT_BYTES", "DEVICES", "FIT_SIZES", "KNEE_SHARE", "PARALLEL_MODES", "GpuSpec", "PlanResult",
           "calibrate_host", "gpu_names", "lookup", "plan"]

if TYPE_CHECKING:  # pragma: no cover
    from batchfit.planner.core import FIT_SIZES, KNEE_SHARE, PARALLEL_MODES, PlanResult, calibrate_host, plan
    from batchfit.planner.devices import CUDA_CONTEXT_BYTES, DEVICES, GpuSpec, gpu_names, lookup


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)
