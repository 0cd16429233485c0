"""Memory accounting: small functions, one job each.

- :class:`LiveBytesTracker` counts the bytes of live tensor storage on the CPU with a torch dispatch mode (weak
  references take a storage's bytes off the count when it dies) and can enforce a memory *budget* by raising
  :class:`torch.OutOfMemoryError`, which makes every out-of-memory path deterministic on a CPU machine.
- :func:`cuda_peak` reads the CUDA caching allocator's peak statistics.
- :func:`is_oom` decides whether an exception is an out-of-memory error; :func:`release_memory` frees what a failed
  step left behind.
"""

from __future__ import annotations

import gc
import re
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from batchfit.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str | int | float | None) -> int | None:
    """Parse ``512MiB``, ``2GB``, ``1.5g`` or a plain byte count; ``None`` stays ``None``.

    >>> parse_bytes("512MiB")
    536870912
    """
    if text is None:
        return None
    if isinstance(text, bool):
        raise ConfigError(f"memory size must be a number of bytes or e.g. 512MiB, got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"memory size {text!r} is not understood; write e.g. 512MiB, 2GiB or 1000000")
        value, unit = float(m.group(1)), m.group(2).lower()
    result = int(value * _UNITS[unit])
    if result <= 0:
        raise ConfigError(f"memory size must be positive, got {text!r}")
    return result


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _storages(obj: Any) -> Iterable[torch.UntypedStorage]:
    for leaf in tree_flatten(obj)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
            try:
                yield leaf.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, some subclasses)
                continue


class LiveBytesTracker(TorchDispatchMode):
    """Count live tensor-storage bytes created under this mode (plus any registered with :meth:`track`).

    Storage Python objects are preserved by torch while the storage lives, so a weak reference's callback fires
    exactly when the storage is freed. With ``budget_bytes`` set, an allocation that lifts the live count above
    the budget raises :class:`torch.OutOfMemoryError` (the new tensor is dropped with the exception).
    """

    def __init__(self, budget_bytes: int | None = None, device_type: str | None = None) -> None:
        super().__init__()
        self.budget_bytes = budget_bytes
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def track(self, obj: Any) -> None:
        """Count storages that already exist (parameters, gradients, optimizer state, the input batch)."""
        for st in _storages(obj):
            self._add(st)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _add(self, st: torch.UntypedStorage) -> None:
        if self.device_type is not None and st.device.type != self.device_type:
            return
        key = id(st)
        if key in self._refs and self._refs[key]() is st:
            return
        nbytes = st.nbytes()

        def _release(_ref: weakref.ref, key: int = key, nbytes: int = nbytes) -> None:
            if self._refs.get(key) is _ref:
                del self._refs[key]
                self.live -= nbytes

        self._refs[key] = weakref.ref(st, _release)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for st in _storages(out):
            self._add(st)
        if self.budget_bytes is not None and self.live > self.budget_bytes:
            live = self.live
            del out
            raise torch.OutOfMemoryError(
                f"batchfit memory budget exceeded: {format_bytes(live)} live > budget "
                f"{format_bytes(self.budget_bytes)} (in {func})"
            )
        return out


def cuda_peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device))


def reset_cuda_peak(device: torch.device) -> None:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)


_OOM_PATTERNS = (
    "out of memory",
    "cudnn_status_alloc_failed",
    "cublas_status_alloc_failed",
    "cuda error: out of memory",
    "can't allocate memory",
    "memory budget exceeded",
)


def is_oom(exc: BaseException) -> bool:
    """True for :class:`torch.OutOfMemoryError` and the CUDA/cuDNN/cuBLAS/CPU allocation-failure messages."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, (RuntimeError, MemoryError)):
        msg = str(exc).lower()
        return isinstance(exc, MemoryError) or any(p in msg for p in _OOM_PATTERNS)
    return False


def release_memory(*objects: Any) -> None:
    """Drop gradients of given modules/optimizers, collect garbage and empty the CUDA cache.

    Call this *outside* the ``except`` block that caught an OOM: while the traceback is alive, its frames keep
    the failed step's tensors alive.
    """
    for obj in objects:
        if isinstance(obj, torch.optim.Optimizer):
            obj.zero_grad(set_to_none=True)
        elif isinstance(obj, torch.nn.Module):
            obj.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
