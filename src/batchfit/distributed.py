"""Data parallelism under ``torchrun``: one process per device, DDP, and ranks that always agree.

``torchrun --nproc-per-node N -m batchfit train|find|noise ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and a rendezvous address in the environment. The CLI calls :func:`init_from_env`, which joins the
process group (NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on the CPU). Then:

- **Training** (``engine.train(..., world_size=N)``): every rank draws the same seeded order, cuts it into
  *global* batches and reads its own shard of each (:mod:`batchfit.data` sources); the model is wrapped in
  ``DistributedDataParallel`` (:func:`wrap_ddp`); accumulation micro-steps run under ``no_sync()`` so gradients are
  all-reduced once per optimizer step; effective batch = micro-batch x accumulation x world size, and the LR rule
  sees that global batch.
- **Decisions are collective.** Anything that changes control flow (a non-finite loss, the finder's
  "did this batch fit?") is reduced across ranks before it is acted on (:func:`any_flag`, :func:`agree_record`),
  so one rank's out-of-memory makes every rank back off and no rank waits forever in a collective the others
  skipped. The finder's probes themselves run without gradient communication: an OOM half-way through a step can
  then never leave another rank stuck inside DDP's all-reduce.
- **Output**: only rank 0 writes files and progress (:func:`is_main`).
- **One decides, all train** (``tune`` and ``sweep``): rank 0 runs the whole decision (the study, the plan,
  racing, the recommendation) inside :func:`lead`; the other ranks wait in :func:`follow`. Every training job rank 0
  runs goes through :func:`everywhere`, which first sends the call to the followers (one broadcast), so all ranks
  run the same job with their own device and shard. Nothing a follower measures can steer a decision (a timing that
  differs between ranks cannot send them down different paths), and only rank 0 opens the store.

An unexpected exception on one rank ends that process; torchrun's agent then stops the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib
import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from batchfit.errors import ConfigError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Leader",
    "agree_record",
    "all_max",
    "all_min",
    "all_sum",
    "all_sum_tensors",
    "any_flag",
    "check_world",
    "everywhere",
    "follow",
    "init_from_env",
    "is_ddp",
    "is_initialized",
    "is_main",
    "launched_by_torchrun",
    "lead",
    "lead_workload",
    "leading",
    "local_rank",
    "rank",
    "rank_device",
    "run_led",
    "shard",
    "shutdown",
    "unwrap",
    "world_size",
    "wrap_ddp",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer than this fails instead of hanging


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def launched_by_torchrun() -> bool:
    """True when this process was started by ``torchrun`` (its rank variables are set)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return _dist().get_world_size() if is_initialized() else 1


def rank() -> int:
    return _dist().get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or no process group): the process that prints and writes output."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str | None) -> str:
    """The device this rank trains on: ``cuda``/``auto`` (with CUDA) -> ``cuda:LOCAL_RANK``; ``cpu`` stays."""
    wanted = "auto" if device is None else str(device)
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but CUDA is not available here; use device='cpu'")
        lr = local_rank()
        if lr >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {lr} has no GPU ({torch.cuda.device_count()} visible); start at most "
                f"{torch.cuda.device_count()} processes per node (torchrun --nproc-per-node)"
            )
        return f"cuda:{lr}"
    return wanted


def init_from_env(device: str | None = "cpu") -> str:
    """Join the process group torchrun describes; return this rank's device (see :func:`rank_device`).

    NCCL on CUDA, gloo on the CPU. ``BATCHFIT_DIST_TIMEOUT`` (seconds, default 600) bounds every collective.
    Calling it again once initialized is a no-op.
    """
    if not launched_by_torchrun():
        raise ConfigError("not started by torchrun (RANK, WORLD_SIZE and LOCAL_RANK are not all set)")
    dev = rank_device(device)
    if is_initialized():
        return dev
    dist = _dist()
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run without torchrun")
    try:
        timeout_s = float(os.environ.get("BATCHFIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        raise ConfigError("BATCHFIT_DIST_TIMEOUT must be a number of seconds") from None
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(dev))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dev


def shutdown() -> None:
    """Leave the process group. Collect garbage first: a DDP wrapper still alive (in a reference cycle) when the
    gloo group goes makes the process abort at exit now and then ("terminate called without an active
    exception", measured at 15-35 % of runs on torch 2.13 CPU); with it collected first, 0 of 75."""
    if is_initialized():
        gc.collect()
        _dist().destroy_process_group()


def check_world(expected: int) -> None:
    """``engine.train(world_size=N)`` with N > 1 needs a process group of exactly N ranks."""
    if expected > 1 and world_size() != expected:
        raise ConfigError(
            f"world_size={expected} needs an initialized process group of {expected} ranks (found "
            f"{world_size()}); launch with torchrun --nproc-per-node {expected}, or pass world_size=1"
        )


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP with gradients as views into the communication buckets (no second copy of the gradients)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )


def shard(global_indices: torch.Tensor, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's share of a global batch: contiguous, sizes differing by at most one."""
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    return torch.tensor_split(global_indices, world)[rank_]


# ---------------------------------------------------------------------------------------------------------------
# Collective decisions


def _reduce(values: list[float], op: str, device: torch.device | None = None) -> list[float]:
    if not is_initialized() or world_size() == 1:
        return list(values)
    dist = _dist()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
            torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.cpu().tolist()


def all_sum(*values: float) -> list[float]:
    return _reduce(list(values), "sum")


def all_max(*values: float) -> list[float]:
    return _reduce(list(values), "max")


def all_min(*values: float) -> list[float]:
    return _reduce(list(values), "min")


def all_sum_tensors(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over the ranks in place, in one collective (flattened); a no-op in a single process."""
    if not tensors or not is_initialized() or world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _dist().all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def any_flag(*flags: torch.Tensor | bool) -> list[bool]:
    """Element-wise "does any rank say yes?" for a few flags, in one all-reduce."""
    local = [float(bool(f)) for f in flags]
    return [v > 0 for v in _reduce(local, "max")]


def agree_record(rec: dict[str, Any]) -> dict[str, Any]:
    """Merge one finder trial record across ranks so every rank takes the same next decision.

    ``ok`` only if it was ok on every rank (one rank's OOM fails the size for all); peaks (``peak_bytes``,
    ``static_bytes`` and each ``parts`` entry) are the maximum over ranks; ``samples_per_s`` the minimum (the
    slowest rank sets the pace of synchronous data parallelism); a failure's ``error`` names the rank.
    Without a process group the record is returned unchanged.
    """
    if not is_initialized() or world_size() == 1:
        return rec
    dist = _dist()
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, rec)
    merged = dict(rec)
    oks = [bool(r.get("ok")) for r in gathered]
    merged["ok"] = all(oks)
    merged["world_size"] = len(gathered)
    if merged["ok"]:
        for key in ("peak_bytes", "static_bytes"):
            vals = [r.get(key) for r in gathered if r.get(key) is not None]
            if vals:
                merged[key] = max(vals)
        if any(r.get("parts") for r in gathered):
            keys = sorted({k for r in gathered for k in (r.get("parts") or {})})
            merged["parts"] = {k: max((r.get("parts") or {}).get(k, 0) for r in gathered) for k in keys}
        rates = [r.get("samples_per_s") for r in gathered if r.get("samples_per_s") is not None]
        if rates:
            merged["samples_per_s"] = min(rates)
            slowest = min((r for r in gathered if r.get("samples_per_s") is not None),
                          key=lambda r: r["samples_per_s"])
            for key in ("chunk_samples_per_s", "timed_steps", "warmup_steps"):  # the slowest rank's timing
                if key in slowest:
                    merged[key] = slowest[key]
    else:
        failed = [(i, r) for i, r in enumerate(gathered) if not r.get("ok")]
        # name the rank that failed itself, not one that backed off because of it (sharded: PeerOutOfMemoryError)
        i, r = next(((j, q) for j, q in failed if not q.get("peer")), failed[0])
        merged["error"] = f"rank {i}: {r.get('error') or 'failed'}"
        merged["failed_ranks"] = [j for j, _ in failed]
        # a size that failed anywhere has no peak to report (the ranks that ran it measured only part of it)
        merged.update(peak_bytes=None, static_bytes=None, parts={}, samples_per_s=None)
    return merged


# ---------------------------------------------------------------------------------------------------------------
# Models


def is_ddp(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_ddp(model) else model


# ---------------------------------------------------------------------------------------------------------------
# One decides, all train: tune and sweep under torchrun


_JOB_KWARGS_LOCAL = {"progress": None, "callbacks": ()}  # rank 0's own observers; a follower runs without them


@dataclasses.dataclass
class Leader:
    """Rank 0's side of :func:`lead`: the workload its jobs refer to, and the result the followers get at the end."""

    workload: Any
    result: Any = None
    broken: bool = False  # a job raised here: the followers may be inside its collectives, so nothing more is sent


_LEADER: list[Leader] = []  # the active lead (at most one; nested leads re-use it)


def leading() -> bool:
    """True inside :func:`lead` on rank 0 of several: training goes through :func:`everywhere`."""
    return bool(_LEADER)


@dataclasses.dataclass(frozen=True)
class _WorkloadRef:
    """A job argument standing for the leader's workload, with the (picklable) fields rank 0 changed on it (e.g. the
    LR check's ``base_lr``); a follower applies them to its own copy."""

    changes: tuple[tuple[str, Any], ...] = ()


def _send(message: Any) -> Any:
    box = [message]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def _as_ref(value: Any, base: Any) -> Any:
    if value is base:
        return _WorkloadRef()
    if base is None or type(value) is not type(base) or not dataclasses.is_dataclass(value):
        return value
    changes = []
    for f in dataclasses.fields(value):
        new, old = getattr(value, f.name), getattr(base, f.name)
        if new is old or (type(new) is type(old) and _same(new, old)):
            continue
        try:
            pickle.dumps(new)
        except Exception as exc:
            raise RuntimeError(f"a job's workload differs from the leader's in {f.name!r}, which cannot be sent to the "
                               "other ranks; derive it inside the job function") from exc
        changes.append((f.name, new))
    return _WorkloadRef(tuple(changes))


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors, arrays: not equal unless the same object
        return False


def everywhere(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on every rank when leading (:func:`lead`), else here only; returns rank 0's result.

    ``fn`` is a module-level function of batchfit that runs its own collectives (``engine.train``, the finder, the
    noise probe). The leader's workload (or a copy of it with picklable fields changed) is sent as a reference;
    ``device`` becomes the follower's own device; ``progress`` and ``callbacks`` are rank 0's and stay there (a
    job that needs a callback on every rank builds it inside ``fn``). Every other argument must pickle.
    """
    if not _LEADER:
        return fn(*args, **kwargs)
    if _LEADER[0].broken:
        raise RuntimeError("a job failed on rank 0 under torchrun; no further job can be sent to the other ranks")
    base = _LEADER[0].workload
    sent_args = tuple(_as_ref(a, base) for a in args)
    sent = {k: _JOB_KWARGS_LOCAL[k] if k in _JOB_KWARGS_LOCAL else _as_ref(v, base) for k, v in kwargs.items()}
    _send(("job", fn.__module__, fn.__qualname__, sent_args, sent))
    try:
        return fn(*args, **kwargs)
    except BaseException:
        _LEADER[0].broken = True
        raise


@contextlib.contextmanager
def lead(workload: Any) -> Iterator[Leader]:
    """On rank 0 of several (a no-op yielding a :class:`Leader` otherwise, and inside another lead): the body decides
    and every job it runs through :func:`everywhere` runs on all ranks; at the end the followers are released with
    ``leader.result`` (when it pickles), or, when the body raised, with its one-line error."""
    if world_size() == 1 or not is_main() or _LEADER:
        yield _LEADER[0] if _LEADER else Leader(workload)
        return
    leader = Leader(workload)
    _LEADER.append(leader)
    message: Any = ("error", "rank 0 stopped", 1)
    try:
        yield leader
        try:
            pickle.dumps(leader.result)
            message = ("done", leader.result)
        except Exception:
            message = ("done", None)
    except BaseException as exc:  # rank 0's own decision failed: the followers wait at the next message
        from batchfit.errors import BatchfitError

        line = " ".join(str(exc).split()) or type(exc).__name__
        message = ("error", f"rank 0 stopped: {line}", 2 if isinstance(exc, BatchfitError) else 1)
        raise
    finally:
        _LEADER.clear()
        if not leader.broken:  # a failed job: this rank's error ends the job, torchrun stops the others
            with contextlib.suppress(Exception):  # followers already gone: nothing to tell
                _send(message)


def lead_workload(workload: Any) -> None:
    """Name the workload the jobs of the active lead refer to (once it is loaded and validated on rank 0)."""
    if _LEADER:
        _LEADER[0].workload = workload


def run_led(fn: Callable[..., Any], workload: Any, kwargs: dict[str, Any], load: Callable[[Any], Any]) -> Any:
    """``fn(workload, **kwargs)`` as ``tune`` and ``sweep`` run under torchrun: rank 0 runs it inside :func:`lead`
    (``fn`` calls :func:`lead_workload` once it has loaded the workload), every other rank loads the workload with
    ``load`` and follows; ``kwargs["device"]`` becomes each rank's own device. Without torchrun (or inside a lead
    already) just ``fn(workload, **kwargs)``. Every rank returns rank 0's result."""
    if world_size() == 1 or _LEADER:
        return fn(workload, **kwargs)
    kwargs = {**kwargs, "device": rank_device(kwargs.get("device", "cpu"))}
    if not is_main():
        return follow(load(workload), kwargs["device"])
    with lead(None) as leader:
        leader.result = fn(workload, **kwargs)
    return leader.result


def follow(workload: Any, device: str) -> Any:
    """A follower's side of :func:`lead`: run each job rank 0 sends, with this rank's workload and ``device``, until
    rank 0 is done; return its result (raise :class:`~batchfit.errors.LeaderStoppedError` when it stopped on an
    error). A job that fails here raises: this rank's one line ends the job (torchrun stops the other ranks)."""
    from batchfit.errors import LeaderStoppedError

    while True:
        message = _send(None)
        if message[0] == "done":
            return message[1]
        if message[0] == "error":
            raise LeaderStoppedError(message[1], exit_code=message[2])
        _, module, qualname, args, kwargs = message
        if not module.startswith("batchfit."):
            raise RuntimeError(f"rank 0 sent a job outside batchfit ({module}.{qualname})")
        fn: Any = importlib.import_module(module)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        args = tuple(_resolve(a, workload) for a in args)
        kwargs = {k: _resolve(v, workload) for k, v in kwargs.items()}
        if "device" in kwargs:
            kwargs["device"] = device
        with warnings.catch_warnings():  # rank 0 reports what the job found; the same warning from every rank
            warnings.simplefilter("ignore")  # would only repeat it
            fn(*args, **kwargs)


def _resolve(value: Any, workload: Any) -> Any:
    if isinstance(value, _WorkloadRef):
        return dataclasses.replace(workload, **dict(value.changes)) if value.changes else workload
    return value
