"""Memory accounting: small functions, one job each.

- :class:`LiveBytesTracker` counts the bytes of live tensor storage on the CPU with a torch dispatch mode (weak
  references take a storage's bytes off the count when it dies) and can enforce a memory *budget* by raising
  :class:`torch.OutOfMemoryError`, which makes every out-of-memory path deterministic on a CPU machine.
- :func:`cuda_peak` reads the CUDA caching allocator's peak statistics.
- :class:`PeakMeter` is the one interface both devices share (peak of a region, optional budget);
  :func:`enforce_budget` runs any code inside a budget.
- :func:`is_oom` decides whether an exception is an out-of-memory error; :func:`release_memory` frees what a failed
  step left behind.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from batchfit.errors import ConfigError

__all__ = [
    "MAX_BYTES",
    "Attempt",
    "LiveBytesTracker",
    "OutOfMemoryError",
    "PeakMeter",
    "available_bytes",
    "cuda_budget_fraction",
    "cuda_peak",
    "enforce_budget",
    "format_bytes",
    "is_oom",
    "parse_bytes",
    "release_memory",
    "reset_cuda_peak",
    "try_oom",
]

# torch.OutOfMemoryError is new in torch 2.5; before that the CUDA one is the only class.
OutOfMemoryError: type[RuntimeError] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

T = TypeVar("T")

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


# Larger than any machine's memory (8 EiB): a budget beyond it is a typo, not a limit.
MAX_BYTES = 2**63 - 1


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (Python's digit limit)
        return "a number too large to print"
    return text if len(text) <= 40 else text[:37] + "..."


def parse_bytes(text: str | int | float | None, name: str = "memory_budget") -> int | None:
    """Parse ``512MiB``, ``2GB``, ``1.5g`` or a plain byte count; ``None`` stays ``None``.

    Anything else — words, NaN, infinities, ``1e400``, zero or negative sizes, sizes beyond 8 EiB — raises
    :class:`ConfigError` with one line naming ``name`` (the keyword argument).

    >>> parse_bytes("512MiB")
    536870912
    """
    if text is None:
        return None
    hint = "write e.g. 512MiB, 2GiB or 1000000"
    shown = _short_repr(text)
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise ConfigError(f"{name} must be a number of bytes or a size such as 512MiB, got {shown}")
    if isinstance(text, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{name} {shown} is not understood; {hint}")
        number: int | float | str = m.group(1)
        unit = m.group(2).lower()
    else:
        number, unit = text, ""
    try:
        value = float(number) * _UNITS[unit]
    except OverflowError:  # an int beyond float's range
        value = math.inf
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite size, got {shown}; {hint}")
    if value > MAX_BYTES:
        raise ConfigError(f"{name} {shown} is larger than any machine's memory (8 EiB); {hint}")
    result = int(value)
    if result <= 0:
        raise ConfigError(f"{name} must be a positive size of at least 1 byte, got {shown}")
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
        local = getattr(leaf, "_local_tensor", None)  # a DTensor (FSDP2's sharded parameters): this rank's shard
        if isinstance(local, torch.Tensor):
            leaf = local
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
        self._sizes: dict[int, int] = {}  # bytes counted per storage (a storage resized in place: see resized)

    def __enter__(self) -> LiveBytesTracker:
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def resized(self, st: torch.UntypedStorage) -> None:
        """A counted storage changed size in place (FSDP2 frees and re-allocates its gathered parameters with
        ``UntypedStorage.resize_``, which no dispatch mode sees): count its bytes now."""
        key = id(st)
        ref = self._refs.get(key)
        if ref is None or ref() is not st:
            return
        now = st.nbytes()
        self.live += now - self._sizes.get(key, 0)
        self._sizes[key] = now
        self.peak = max(self.peak, self.live)

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

        def _release(_ref: weakref.ref, key: int = key) -> None:
            if self._refs.get(key) is _ref:
                del self._refs[key]
                self.live -= self._sizes.pop(key, 0)

        self._refs[key] = weakref.ref(st, _release)
        self._sizes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for st in _storages(out):
            self._add(st)
        if self.budget_bytes is not None and self.live > self.budget_bytes:
            live = self.live
            del out
            raise OutOfMemoryError(
                f"batchfit memory budget exceeded: {format_bytes(live)} live > budget "
                f"{format_bytes(self.budget_bytes)} (in {func})"
            )
        return out


_ACTIVE: list[LiveBytesTracker] = []  # trackers in use now (a storage resized in place is reported to them)


def storage_resized(st: torch.UntypedStorage) -> None:
    """Tell the active trackers that ``st`` changed size in place (see :meth:`LiveBytesTracker.resized`)."""
    for tracker in _ACTIVE:
        tracker.resized(st)


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
    "cudnn_status_not_supported",  # cuDNN reports some allocation failures this way (Accelerate treats it so too)
    "defaultcpuallocator",
)


def is_oom(exc: BaseException) -> bool:
    """True for :class:`torch.OutOfMemoryError` and the CUDA/cuDNN/cuBLAS/CPU allocation-failure messages."""
    if isinstance(exc, OutOfMemoryError):
        return True
    if isinstance(exc, (RuntimeError, MemoryError)):
        msg = str(exc).lower()
        return isinstance(exc, MemoryError) or any(p in msg for p in _OOM_PATTERNS)
    return False


def release_memory(*objects: Any) -> None:
    """Drop gradients of given modules/optimizers, collect garbage, drain autograd, empty the CUDA cache.

    Call this *outside* the ``except`` block that caught an OOM: while the traceback is alive, its frames keep
    the failed step's tensors alive.
    """
    for obj in objects:
        if isinstance(obj, torch.optim.Optimizer):
            obj.zero_grad(set_to_none=True)
        elif isinstance(obj, torch.nn.Module):
            obj.zero_grad(set_to_none=True)
    gc.collect()
    # An OOM inside backward() leaves the failed graph's pending tasks (and with them its saved activations) in
    # the autograd engine until the next backward runs; a one-element backward drains them now.
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and torch.cuda.is_initialized() else [])
    with torch.enable_grad():  # callers may be inside no_grad (evaluation)
        for dev in devices:
            torch.ones(1, device=dev, requires_grad=True).sum().backward()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Attempt(Generic[T]):
    """What :func:`try_oom` returns: the callable's ``value``, or the OOM it raised (``oom``) — never both."""

    value: T | None = None
    oom: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.oom is None


def _detached_copy(exc: BaseException) -> BaseException:
    line = (str(exc).splitlines() or ["out of memory"])[0]
    try:
        return type(exc)(line)
    except Exception:  # noqa: BLE001 - an exception class with an unusual constructor
        return OutOfMemoryError(line)


def try_oom(fn: Callable[[], T], *release: Any) -> Attempt[T]:
    """Run ``fn()``; an out-of-memory error is caught, memory freed *outside* the ``except`` block, and returned.

    The one OOM guard: every place that retries after an OOM (evaluation, the finder's trials, the noise probe,
    the sweep's micro-batch fallback) calls this and decides what to do next from the :class:`Attempt`. Any other
    exception propagates unchanged. ``release`` lists modules/optimizers whose gradients are dropped on OOM.

    >>> a = try_oom(lambda: 1 + 1)
    >>> a.ok, a.value
    (True, 2)
    """
    error: BaseException | None = None
    try:
        return Attempt(value=fn())
    except Exception as exc:  # noqa: BLE001 - re-raised below unless it is an OOM
        if not is_oom(exc):
            raise
        # keep only a one-line copy: the original's traceback frames hold the failed step's tensors
        error = _detached_copy(exc)
        del exc
    release_memory(*release)  # outside the except block: the traceback is gone now
    return Attempt(oom=error)


def cuda_budget_fraction(budget_bytes: int, device: torch.device) -> float:
    """The share of the GPU's memory that ``budget_bytes`` is (what ``set_per_process_memory_fraction`` takes)."""
    total = torch.cuda.get_device_properties(device).total_memory
    if budget_bytes > total:
        raise ConfigError(
            f"memory budget {format_bytes(budget_bytes)} is larger than the GPU's {format_bytes(total)}; "
            "give a smaller memory_budget or none"
        )
    return budget_bytes / total


def available_bytes(device: torch.device) -> int | None:
    """Memory this process could still use: CUDA free + what our allocator already holds; CPU ``MemAvailable``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return None


class PeakMeter:
    """Peak memory of a region, one interface for both devices; optionally enforcing a budget.

    - CPU: a :class:`LiveBytesTracker` over the region (parameters, buffers etc. registered with ``track``); with a
      budget, crossing it raises :data:`OutOfMemoryError` deterministically.
    - CUDA: the caching allocator's ``max_memory_allocated``; a budget caps the process with
      ``torch.cuda.set_per_process_memory_fraction`` (reset to 1.0 on exit), so the allocator raises a real OOM.

    >>> with PeakMeter(torch.device("cpu")) as meter:
    ...     x = torch.zeros(1024)
    >>> meter.peak()
    4096
    """

    def __init__(self, device: torch.device, budget_bytes: int | None = None, track: Any = ()) -> None:
        self.device = device
        self.budget_bytes = budget_bytes
        self._track = track
        self.tracker: LiveBytesTracker | None = None

    def __enter__(self) -> PeakMeter:
        if self.device.type == "cuda":
            if self.budget_bytes is not None:
                torch.cuda.set_per_process_memory_fraction(cuda_budget_fraction(self.budget_bytes, self.device),
                                                           self.device)
            reset_cuda_peak(self.device)
        else:
            self.tracker = LiveBytesTracker(self.budget_bytes, device_type="cpu")
            self.tracker.track(self._track)
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.tracker is not None:
            self.tracker.__exit__(*exc)
        elif self.budget_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)

    def track(self, obj: Any) -> None:
        """Count storages that already exist (CPU; CUDA sees every allocation anyway)."""
        if self.tracker is not None:
            self.tracker.track(obj)

    def reset(self) -> None:
        """Start a new peak from the memory live now."""
        if self.tracker is not None:
            self.tracker.reset_peak()
        else:
            reset_cuda_peak(self.device)

    def peak(self) -> int:
        if self.tracker is not None:
            return self.tracker.peak
        torch.cuda.synchronize(self.device)
        return cuda_peak(self.device)

    def live(self) -> int:
        if self.tracker is not None:
            return self.tracker.live
        return int(torch.cuda.memory_allocated(self.device))


def enforce_budget(budget: int | str | None, device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which allocations beyond ``budget`` raise an OOM (see :class:`PeakMeter`); no budget: no-op."""
    budget_bytes = parse_bytes(budget)
    if budget_bytes is None:
        return contextlib.nullcontext()
    return PeakMeter(device, budget_bytes)
