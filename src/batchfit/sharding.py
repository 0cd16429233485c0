"""Sharded data parallelism (PyTorch FSDP2, ``fully_shard``) for train, find, noise, sweep and tune.

``parallel="fsdp"`` (CLI ``--parallel fsdp``) under ``torchrun``: every rank holds 1/world of the parameters,
gradients and optimizer state; a unit's full parameters exist only while it runs (all-gathered before its forward
and again before its backward, freed after), and its gradients are reduce-scattered after its backward.

- **Units** (:func:`shard_units`): the workload's ``shard`` field names them (class names, e.g.
  ``("TransformerBlock",)``, or a function ``module -> bool``); by default every module holding at least
  :data:`DEFAULT_MIN_SHARE` of the model's parameters (and at most half of them: bigger ones are descended into;
  ``ModuleList`` / ``Sequential`` containers always are). A unit whose parameters are shared with modules outside
  it (tied embeddings) stays in the root. :func:`wrap_fsdp` shards each unit, innermost first, then the root.
- **Mixed precision**: ``bf16`` computes in bf16 through ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``; ``fp16`` is refused (it needs a gradient scaler; use bf16).
- **Accumulation**: gradients are reduce-scattered only on a step's last micro-batch
  (``set_requires_gradient_sync``), so micro-batch x accumulation x world size is the effective batch exactly.
- **Out-of-memory decisions are collective** (:class:`CollectiveGuard`): in a guarded region (the finder's trials)
  every collective FSDP makes is preceded by a one-number all-reduce, "did any rank run out of memory, or would
  this collective not fit?". A rank that runs out of memory anywhere in the region posts "yes" once, which answers
  the all-reduce every other rank is waiting in (no other collective can lie in between), so all ranks raise
  :class:`PeerOutOfMemoryError` together and nobody waits in a collective the others skipped; the model then goes
  back to a legal state (:func:`recover`: ``reset_iter_state`` where torch has it, else the caller rebuilds it).

FSDP2 lives in ``torch.distributed.fsdp`` from torch 2.6 and in ``torch.distributed._composable.fsdp`` in 2.4-2.5;
:func:`fsdp_api` imports it from either place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from batchfit import distributed
from batchfit.errors import ConfigError, WorkloadError
from batchfit.memory import OutOfMemoryError

__all__ = [
    "DEFAULT_MIN_SHARE",
    "PARALLEL_CHOICES",
    "CollectiveGuard",
    "PeerOutOfMemoryError",
    "check_parallel",
    "fsdp_api",
    "is_fsdp",
    "recover",
    "shard_units",
    "sharded_sq_norm",
    "unit_bytes",
    "wrap_fsdp",
]

PARALLEL_CHOICES = ("ddp", "fsdp")
DEFAULT_MIN_SHARE = 0.05  # default units: modules with at least 5 % of the model's parameters (and at most half)
_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def check_parallel(parallel: Any, precision: str | None = None) -> str:
    """``ddp`` or ``fsdp``; anything else, or fp16 with fsdp, is a one-line :class:`ConfigError`."""
    if parallel not in PARALLEL_CHOICES:
        raise ConfigError(f"parallel must be one of: {', '.join(PARALLEL_CHOICES)}; got {parallel!r}")
    if parallel == "fsdp" and precision == "fp16":
        raise ConfigError("parallel='fsdp' does not support precision fp16 (it needs a gradient scaler); use bf16")
    return str(parallel)


def fsdp_api() -> tuple[Any, Any, Any]:
    """``(fully_shard, MixedPrecisionPolicy, FSDPModule)`` from wherever this torch keeps FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import (  # type: ignore[no-redef]
                FSDPModule,
                MixedPrecisionPolicy,
                fully_shard,
            )
        except ImportError:
            raise ConfigError(f"parallel='fsdp' needs FSDP2 (torch >= 2.4); this is torch {torch.__version__}; "
                              "use parallel='ddp'") from None
    return fully_shard, MixedPrecisionPolicy, FSDPModule


def is_fsdp(model: nn.Module) -> bool:
    try:
        return isinstance(model, fsdp_api()[2])
    except ConfigError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Which modules are sharded as units


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _owned_elsewhere(model: nn.Module, unit: nn.Module) -> bool:
    """Whether a parameter of ``unit`` is also held by a module outside it (a tied weight)."""
    inside = {id(m) for m in unit.modules()}
    mine = {id(p) for p in unit.parameters()}
    for m in model.modules():
        if id(m) in inside:
            continue
        if any(id(p) in mine for p in m._parameters.values() if p is not None):
            return True
    return False


def shard_units(model: nn.Module, spec: Any = None, min_share: float = DEFAULT_MIN_SHARE) -> list[nn.Module]:
    """The modules :func:`wrap_fsdp` shards as units (the root excluded), in ``model.modules()`` order.

    ``spec``: ``None`` (the default rule in the module docstring), a class name or a sequence of class names, or a
    function ``module -> bool``. A named class that the model does not contain is a :class:`ConfigError`.
    """
    total = _numel(model)
    if spec is None:
        low, units = max(1, math.ceil(min_share * total)), []

        def visit(module: nn.Module) -> None:
            for child in module.children():
                n = _numel(child)
                if n == 0:
                    continue
                if isinstance(child, _CONTAINERS) or (2 * n > total and any(True for _ in child.children())):
                    visit(child)
                elif n >= low:
                    units.append(child)

        visit(model)
    elif callable(spec):
        units = []
        for m in model.modules():
            if m is model:
                continue
            try:
                chosen = spec(m)
            except Exception as exc:
                raise WorkloadError(f"Workload.shard raised {type(exc).__name__}: {exc}; it takes a module and "
                                    "returns True for the modules to shard as units") from exc
            if chosen:
                units.append(m)
    else:
        names = (spec,) if isinstance(spec, str) else tuple(spec) if isinstance(spec, Sequence) else None
        if not names or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"Workload.shard must be None, class names (e.g. ('TransformerBlock',)) or a function "
                              f"module -> bool; got {spec!r}")
        units = [m for m in model.modules() if m is not model and type(m).__name__ in names]
        found = {type(m).__name__ for m in units}
        missing = [n for n in names if n not in found]
        if missing:
            have = sorted({type(m).__name__ for m in model.modules() if _numel(m)})
            raise ConfigError(f"Workload.shard names {', '.join(missing)}, which the model does not contain; its "
                              f"modules with parameters are: {', '.join(have)}")
    return [u for u in units if _numel(u) > 0 and not _owned_elsewhere(model, u)]


def _comm_bytes(model: nn.Module, world: int) -> dict[str, int]:
    """An upper bound of what one all-gather (or reduce-scatter) of each unit allocates: its parameters padded to
    a multiple of the world size along dim 0 (FSDP2's shards), plus the shard copied in (or out)."""
    _, _, fsdp_module = fsdp_api()
    units = {name: m for name, m in model.named_modules() if isinstance(m, fsdp_module)}
    owner: dict[int, str] = {}
    for name in sorted(units, key=len):  # the innermost unit holding a parameter owns it
        for p in units[name].parameters():
            owner[id(p)] = name
    out = dict.fromkeys(units, 0)
    for p in model.parameters():
        name = owner.get(id(p))
        if name is None:
            continue
        rows = p.shape[0] if p.dim() else 1
        row = p.numel() // max(1, rows) if p.dim() else 1
        padded = (math.ceil(rows / world) * world) * row * p.element_size()
        out[name] += padded + padded // world
    return out


def unit_bytes(model: nn.Module) -> dict[str, int]:
    """Full (all-gathered) bytes of each FSDP unit's own parameters, by module name (``""``: the root)."""
    _, _, fsdp_module = fsdp_api()
    units = {name: m for name, m in model.named_modules() if isinstance(m, fsdp_module)}
    nested = {id(p) for name, m in units.items() if name for p in m.parameters()}
    out = {}
    for name, m in units.items():
        params = [p for p in m.parameters() if name or id(p) not in nested]
        if name:  # a nested unit's parameters belong to it, not to an enclosing one
            inner = {id(p) for n2, m2 in units.items() if n2.startswith(name + ".") for p in m2.parameters()}
            params = [p for p in params if id(p) not in inner]
        out[name] = sum(p.numel() * p.element_size() for p in params)
    return out


_PATCHED = False


def _report_resizes() -> None:
    """FSDP2 frees a unit's gathered parameters with ``UntypedStorage.resize_(0)`` and re-allocates them the same
    way, below any dispatch mode: report both to batchfit's CPU memory meter (:func:`memory.storage_resized`), so
    a sharded trial's live bytes are what the rank holds. Once per process; a torch without these helpers (other
    FSDP2 versions) is left as it is (the meter then over-counts the gathered units)."""
    global _PATCHED
    if _PATCHED:
        return
    _PATCHED = True
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param as impl
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import _fsdp_param as impl  # type: ignore[no-redef]
        except ImportError:
            return
    from batchfit import memory

    for name in ("alloc_storage", "free_storage"):
        original = getattr(impl, name, None)
        if not callable(original):
            continue

        def reporting(tensor: torch.Tensor, _original: Callable[[torch.Tensor], None] = original) -> None:
            _original(tensor)
            if memory._ACTIVE:
                memory.storage_resized(tensor.untyped_storage())

        setattr(impl, name, reporting)


def wrap_fsdp(model: nn.Module, device: torch.device, precision: str = "fp32", spec: Any = None) -> nn.Module:
    """Shard ``model`` over the process group's ranks in place (units innermost first, then the root); returns it.

    The parameters become ``DTensor`` s holding this rank's shard; build the optimizer after this.
    """
    fully_shard, mixed_precision_policy, _ = fsdp_api()
    if not distributed.is_initialized():
        raise ConfigError("parallel='fsdp' needs a process group; launch with torchrun --nproc-per-node N")
    from torch.distributed.device_mesh import init_device_mesh

    _report_resizes()
    model.to(device)
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    mp = (mixed_precision_policy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
          else mixed_precision_policy())
    units = shard_units(model, spec)
    depth = {id(m): name.count(".") + 1 for name, m in model.named_modules()}
    for unit in sorted(units, key=lambda m: -depth[id(m)]):  # innermost first
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def sharded_sq_norm(tensors: Sequence[torch.Tensor]) -> float:
    """The squared norm of the full tensors behind this rank's shards: the shards' squared norms summed over ranks
    (plain tensors count as they are, summed once: they are replicated)."""
    local, replicated = 0.0, 0.0
    for t in tensors:
        inner = getattr(t, "_local_tensor", None)
        if isinstance(inner, torch.Tensor):
            local += float(inner.detach().double().pow(2).sum())
        else:
            replicated += float(t.detach().double().pow(2).sum())
    return distributed.all_sum(local)[0] + replicated


# ---------------------------------------------------------------------------------------------------------------
# Collective out-of-memory decisions inside a sharded step


class PeerOutOfMemoryError(OutOfMemoryError):
    """Raised on every rank when any rank ran out of memory (or a collective would not fit) in a guarded region."""


class NoRoomError(PeerOutOfMemoryError):
    """What the rank that had no room for the next collective raises (the others raise the peer error)."""


class _Check(torch.autograd.Function):
    """Identity in forward; its backward runs the guard's check (before the FSDP collective that follows)."""

    @staticmethod
    def forward(ctx: Any, guard: CollectiveGuard, need: int, *tensors: torch.Tensor) -> Any:
        ctx.guard, ctx.need = guard, need
        out = tuple(t.view_as(t) for t in tensors)
        return out if len(out) > 1 else out[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        ctx.guard.check(ctx.need, in_backward=True)
        return (None, None, *grads)


def _grad_tensors(obj: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_flatten(obj)[0]
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


def _replace(obj: Any, old: list[torch.Tensor], new: Sequence[torch.Tensor]) -> Any:
    swap = {id(o): n for o, n in zip(old, new)}
    leaves, spec = torch.utils._pytree.tree_flatten(obj)
    return torch.utils._pytree.tree_unflatten([swap.get(id(x), x) if isinstance(x, torch.Tensor) else x
                                               for x in leaves], spec)


class CollectiveGuard:
    """Make every out-of-memory inside a sharded step a decision all ranks take together.

    Checks (one all-reduce of a flag each) run before each unit's forward all-gather, before its backward
    all-gather, before its reduce-scatter, before the root's end-of-backward reduce-scatter, before gradient
    clipping (:class:`batchfit.step.TrainStep` calls :meth:`check`) and at the end of the region (:meth:`finish`).
    A check also says "no" when ``headroom()`` (bytes this rank may still allocate) is below what the next
    collective allocates, so an allocation inside FSDP's own collectives, which could not be answered, does not
    happen. A rank that ran out of memory calls :meth:`after_oom`, which posts its "yes" once.
    """

    def __init__(self, model: nn.Module, headroom: Callable[[], float | None] | None = None) -> None:
        _, _, fsdp_module = fsdp_api()
        self.model = model
        self.headroom = headroom
        self.world = distributed.world_size()
        self.active = False
        self._queued = False
        self._handles: list[Any] = []
        sizes = _comm_bytes(model, self.world)
        biggest = max(sizes.values(), default=0)
        for name, unit in model.named_modules():
            if not isinstance(unit, fsdp_module):
                continue
            own = sizes.get(name, 0)
            # forward: this unit's all-gather; backward: it again and the next unit's, prefetched beside it;
            # reduce-scatter: its gradients copied into the (padded) input buffer and the output shard
            self._handles += [
                unit.register_forward_pre_hook(self._pre_forward(own), prepend=True, with_kwargs=True),
                unit.register_forward_pre_hook(self._wrap_inputs(own), with_kwargs=True),
                unit.register_forward_hook(self._wrap_outputs(own + biggest, root=not name)),
            ]
        self._root_need = sizes.get("", 0)

    # -- hooks ----------------------------------------------------------------------------------------------
    def _pre_forward(self, need: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, _kwargs: Any) -> None:
            if self.active:
                self.check(need)

        return hook

    def _wrap_inputs(self, need: int) -> Callable[..., Any]:
        def hook(_m: nn.Module, args: Any, kwargs: Any) -> Any:
            tensors = _grad_tensors((args, kwargs)) if self.active and torch.is_grad_enabled() else []
            if not tensors:
                return None
            out = _Check.apply(self, need, *tensors)
            out = out if isinstance(out, tuple) else (out,)
            return _replace((args, kwargs), tensors, out)

        return hook

    def _wrap_outputs(self, need: int, root: bool) -> Callable[..., Any]:
        def hook(_m: nn.Module, _args: Any, output: Any) -> Any:
            tensors = _grad_tensors(output) if self.active and torch.is_grad_enabled() else []
            if not tensors:
                return None
            if root:
                self._queued = False
            out = _Check.apply(self, -1 if root else need, *tensors)
            out = out if isinstance(out, tuple) else (out,)
            return _replace(output, tensors, out)

        return hook

    # -- the decision ---------------------------------------------------------------------------------------
    def check(self, need: int = 0, *, in_backward: bool = False, failed: bool = False) -> None:
        """One collective "does any rank say stop?"; raise :class:`PeerOutOfMemoryError` on every rank if so."""
        if need < 0:  # the root's output: also check before the root's end-of-backward reduce-scatter
            need = self._root_need
            if in_backward and not self._queued:
                self._queued = True
                from torch.autograd import Variable

                Variable._execution_engine.queue_callback(lambda: self.check(self._root_need))
        short = False
        if not failed and need and self.headroom is not None:
            room = self.headroom()
            short = room is not None and room < need
        mine = 2.0 if failed else 1.0 if short else 0.0
        says = [0.0] * self.world  # one entry per rank: who stopped, and why
        says[distributed.rank()] = mine
        says = distributed.all_max(*says)
        if max(says) > 0:
            r = max(range(self.world), key=lambda i: says[i])
            why = ("ran out of memory" if says[r] >= 2 else
                   f"had no room for the next all-gather / reduce-scatter ({need} bytes)")
            if mine == 1.0:
                raise NoRoomError(f"out of memory: no room for the next all-gather / reduce-scatter of a sharded "
                                  f"step ({need} bytes); every rank backs off")
            raise PeerOutOfMemoryError(f"out of memory: rank {r} {why} in a sharded step (every rank backs off)")

    def after_oom(self, exc: BaseException | None) -> None:
        """After an out-of-memory this rank raised itself (not a :class:`PeerOutOfMemoryError`): answer the check the
        other ranks wait in. Collective only in that case."""
        if exc is not None and not isinstance(exc, PeerOutOfMemoryError):
            try:
                self.check(failed=True)
            except PeerOutOfMemoryError:
                pass

    def finish(self) -> None:
        """The region's last check (every rank passes it, so a late out-of-memory is still answered)."""
        self.check(0)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def reshard(model: nn.Module) -> None:
    """Free every unit's gathered parameters (the sharded parameters are the module's again)."""
    fsdp_module = fsdp_api()[2]
    for m in model.modules():
        if isinstance(m, fsdp_module):
            m.reshard()


def recover(model: nn.Module) -> bool:
    """Put a sharded model back in a legal state after an exception in its forward or backward: reshard every unit
    and clear FSDP's per-iteration state (``reset_iter_state``, torch >= 2.13). Returns False when this torch has no
    such reset: the caller must then rebuild the sharded model."""
    reset = getattr(model, "reset_iter_state", None)
    if callable(reset):
        reset()
        model.zero_grad(set_to_none=True)
        return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# The finder's model under sharding


def _local(t: torch.Tensor) -> torch.Tensor:
    inner = getattr(t, "_local_tensor", None)
    return inner if isinstance(inner, torch.Tensor) else t


class ShardedKeeper:
    """:class:`batchfit.step.ModelKeeper` for sharded trials: the model ``model_fn`` returns is never touched (a
    copy of it is sharded, so :meth:`close` has nothing to hand back); every trial starts from the initial shards
    with a fresh optimizer; after an out-of-memory :meth:`recover` puts the sharded model back in a legal state
    (or, on a torch without ``reset_iter_state``, shards a fresh copy)."""

    def __init__(self, workload: Any, device: torch.device, seed: int, precision: str = "fp32") -> None:
        self.workload, self.device, self.seed, self.precision = workload, device, seed, precision
        self.model: nn.Module | None = None
        self.guard: CollectiveGuard | None = None
        self._initial: list[torch.Tensor] = []
        self._source: nn.Module | None = None

    def _seed(self) -> None:
        torch.random.default_generator.manual_seed(self.seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(self.seed)

    def get(self) -> nn.Module:
        if self.model is None:
            import copy

            from batchfit.step import build_model

            if self._source is None:
                self._seed()
                self._source = build_model(self.workload)
            model = copy.deepcopy(self._source)
            model.zero_grad(set_to_none=True)
            wrap_fsdp(model, self.device, self.precision, getattr(self.workload, "shard", None))
            self._initial = [_local(t).detach().clone() for t in self._tensors(model)]
            self.guard = CollectiveGuard(model)
            self.model = model
        self.model.train()
        return self.model

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [*model.parameters(), *model.buffers()]

    def optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
        import copy

        from batchfit.step import build_optimizer

        self._seed()
        optimizer = build_optimizer(self.workload, model)
        return optimizer, copy.deepcopy(optimizer.state_dict())

    def reset(self, model: nn.Module, optimizer: torch.optim.Optimizer, opt_state: dict[str, Any]) -> None:
        reshard(model)  # an evaluation forward leaves the root's parameters gathered
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for t, init in zip(self._tensors(model), self._initial):
                _local(t).copy_(init)
        optimizer.load_state_dict(opt_state)

    def recover(self, model: nn.Module) -> None:
        """After an exception inside a sharded step (every rank had one): a legal state again."""
        if not recover(model):
            self.close()

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
        self.model, self.guard, self._initial = None, None, []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# The memory model per rank, and keeping the global batch when the world size changes

WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)


def plan_global_batch(batch_size: int, world_size: int, max_micro: int) -> dict[str, int] | None:
    """Split a global batch over ``world_size`` ranks: ``micro x accumulation x world == batch_size`` exactly, the
    micro-batch the largest divisor of the rank's share that is ``<= max_micro`` (fewest accumulation steps).
    ``None`` when the batch does not divide over the ranks or nothing fits (``max_micro < 1``)."""
    if world_size < 1 or batch_size % world_size or max_micro < 1:
        return None
    share = batch_size // world_size
    accumulation = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= max_micro)
    return {"batch_size": batch_size, "world_size": world_size, "batch_size_per_rank": share,
            "micro_batch_size": share // accumulation, "accumulation_steps": accumulation}


def per_rank_model(memory_model: dict[str, Any], *, static_bytes: int | None, largest_unit_bytes: int,
                   world_size: int, limit: float, margin: float) -> dict[str, Any]:
    """The per-rank memory model of a sharded search and what it predicts at other world sizes.

    ``peak(B, W) = sharded_state x world / W + other_fixed + activations_per_sample x B``: the sharded parameters,
    gradients and optimizer state (``static_bytes``, measured on this world) divide by the world size; the rest of
    the fixed part (the largest all-gathered unit, buffers, temporaries) and the activations per sample do not.
    """
    fixed, slope = memory_model.get("fixed_bytes"), memory_model.get("per_sample_bytes")
    out: dict[str, Any] = {"parallel": "fsdp", "world_size": world_size, "sharded_state_bytes": static_bytes,
                           "largest_unit_bytes": int(largest_unit_bytes), "activation_bytes_per_sample": slope,
                           "fixed_bytes": fixed, "per_rank_max_by_world": {}, "per_rank_recommended_by_world": {}}
    # every part of the step (forward/backward, optimizer step) is a line; the peak is the highest of them, so the
    # largest batch at a world size is the tightest over the parts that grow (one part that does not grow only
    # binds when its fixed bytes alone exceed the limit)
    parts = [(p["fixed_bytes"], p["per_sample_bytes"]) for p in (memory_model.get("parts") or {}).values()] \
        or ([(fixed, slope)] if fixed is not None and slope is not None else [])
    if static_bytes is None or not any(s > 0 for _, s in parts):
        if parts and static_bytes is not None:
            out["note"] = "no part of the step grew with the batch over the measured sizes: memory bounds no batch"
        return out
    total_state = static_bytes * world_size
    for w in WORLD_SIZES:
        for key, lim in (("per_rank_max_by_world", limit), ("per_rank_recommended_by_world", (1 - margin) * limit)):
            best = math.inf
            for f, s in parts:
                fixed_w = f - static_bytes + total_state / w
                if s > 0:
                    best = min(best, math.floor((lim - fixed_w) / s))
                elif fixed_w > lim:
                    best = 0
            out[key][str(w)] = max(0, int(best))
    return out
