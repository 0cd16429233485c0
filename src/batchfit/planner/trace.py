"""One training step traced on the ``meta`` device: every allocation and free, in order, and every operator's work.

The workload's model is built on ``meta`` (no memory, no compute), its optimizer made to run as on CUDA, and two
steps are run the way :class:`batchfit.step.TrainStep` runs them (forward and loss through
:func:`batchfit.step.run_batch` under the precision's autocast, backward, gradient clipping, optimizer step,
``zero_grad(set_to_none=True)``) inside :class:`batchfit.planner.rules.CudaRules`. A dispatch mode records each
tensor storage's birth (with its byte size) and, through a weak reference, its death: the live-bytes timeline the
CUDA allocator would see, as a sequence of events. The second step is the one measured (the optimizer state exists
by then, as in the finder and the ground truth). Storages are classified afterwards: parameters and buffers, the
input batch, gradients (what ends up in ``.grad``), optimizer state (what ends up in ``optimizer.state``),
activations (everything else made by the forward and backward: saved tensors, temporaries, autocast's weight
copies) and optimizer temporaries (everything else made by the optimizer step). Host tensors (CPU: e.g. the
``step`` counters of non-capturable optimizers) are not device memory and are skipped.

For step time, every operator of the measured step is recorded with its FLOPs (``torch.utils.flop_counter``'s
formulas), the bytes it reads and writes, and the dtype class of its math.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from batchfit.errors import BatchfitError, ConfigError, WorkloadError
from batchfit.planner.devices import GpuSpec
from batchfit.planner.rules import GEMM_OPS, LT_OPS, CudaRules, cuda_optimizer_defaults, kernel_count
from batchfit.step import build_model, build_optimizer, run_batch, user_call

__all__ = ["CATEGORIES", "OpRecord", "Trace", "meta_batch", "meta_model", "sample_batch", "trace_step"]

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "optimizer_temporaries", "inputs")
PHASES = ("setup", "forward", "backward", "optimizer")

# operators that launch no kernel: allocation only, metadata, aliasing
_NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
                        "lift_fresh", "lift_fresh_copy", "_local_scalar_dense", "set_", "resize_",
                        "_has_compatible_shallow_copy_type", "_record_function_enter_new", "_record_function_exit",
                        "_record_function_enter"})
# Normalisations over a batch read their input twice: once for the statistics, once to normalise (forward); once for
# the reductions of the gradient, once for the input gradient (backward). The extra reads of these arguments count.
_TWO_PASS = {"native_batch_norm": (0,), "_batch_norm_with_update": (0,), "_native_batch_norm_legit": (0,),
             "_native_batch_norm_legit_functional": (0,), "cudnn_batch_norm": (0,), "native_group_norm": (0,),
             "native_batch_norm_backward": (0, 1), "batch_norm_backward": (0, 1), "cudnn_batch_norm_backward": (0, 1),
             "native_group_norm_backward": (0, 1)}
_TENSOR_CORE_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "_scaled_mm", "convolution",
                              "convolution_backward", "_convolution", "cudnn_convolution"})
_ATTENTION = "_scaled_dot_product_"
_META_HINT = (" (the plan runs the model on PyTorch's meta device, where no values exist: a model that reads tensor "
              "values in its forward, e.g. .item(), .tolist() or data-dependent shapes, cannot be planned; measure "
              "it with 'batchfit find --device cuda')")


@dataclass
class OpRecord:
    """One operator of the measured step: its phase, FLOPs, bytes read + written, and which peak it runs at
    (``tensor``: matmul/conv/attention math, at the peak of ``dtype``; ``memory``: bandwidth-bound; ``none``: no
    kernel)."""

    name: str
    phase: str
    flops: int
    bytes: int
    kind: str
    dtype: str
    kernels: int = 1  # CUDA kernels it launches (0: runs on the host or launches none)
    outputs: int = 0  # elements it writes (tensor ops: the GEMM's output tiles come from it)


@dataclass
class Trace:
    """The event timeline of two steps at one batch size."""

    batch_size: int
    sizes: list[int]  # bytes of each storage (token), unrounded
    tokens: list[int]  # event i concerns storage tokens[i]
    signs: list[int]  # +1 born, -1 freed
    phases: list[str]  # the phase event i happened in
    step_start: int  # the first event of the measured (second) step (the events end with that step)
    category: list[str]  # per token
    alloc_ops: list[str]  # per token: the operator that made it
    ops: list[OpRecord]  # operators of the measured step
    gemm_threads: set[str] = field(default_factory=set)
    lt_threads: set[str] = field(default_factory=set)
    rules: dict[str, int] = field(default_factory=dict)
    units: dict[str, int] = field(default_factory=dict)  # FSDP units: root / largest block parameter bytes
    param_bytes: int = 0
    grad_bytes: int = 0

    def signature(self) -> tuple:
        """What must be equal between traces at different batch sizes for one timeline to describe them all."""
        return (len(self.sizes), tuple(self.tokens), tuple(self.signs), tuple(self.phases), self.step_start,
                tuple(self.category), tuple(o.name for o in self.ops), tuple(o.kind for o in self.ops))


# ---------------------------------------------------------------------------------------------------------------
# The model and the batch on meta


def _retarget(model: nn.Module) -> nn.Module:
    """Every parameter and buffer on ``meta`` (shared ones stay shared: tied weights)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                memo[id(p)] = p if p.device.type == "meta" else \
                    nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is None:
                continue
            if id(b) not in memo:
                memo[id(b)] = b if b.device.type == "meta" else torch.empty_like(b, device="meta")
            module._buffers[name] = memo[id(b)]
    return model


def meta_model(workload: Any) -> tuple[nn.Module, str]:
    """The workload's model with its tensors on ``meta``: built there directly when its factory allows (no memory,
    seconds for billions of parameters), else built on the CPU and moved."""
    try:
        with torch.device("meta"):
            model = build_model(workload)
        how = "built on meta"
    except BatchfitError:
        model = build_model(workload)
        how = "built on the CPU, moved to meta"
    return _retarget(model), how


def sample_batch(workload: Any) -> tuple[Any, int]:
    """A small real batch from the workload's data (the worst case when the source knows it) and its size."""
    from batchfit.data import train_source

    source = train_source(workload)
    b0 = 2 if source.num_samples >= 2 else 1
    return source.sample(b0), b0


def meta_batch(batch: Any, b0: int, batch_size: int) -> Any:
    """``batch`` (of ``b0`` samples) as ``meta`` tensors of ``batch_size`` samples: the leading dimension of every
    tensor that has the batch's size is replaced; other tensors keep their shape."""
    if isinstance(batch, torch.Tensor):
        shape = tuple(batch.shape)
        if batch.dim() > 0 and shape[0] == b0:
            shape = (batch_size, *shape[1:])
        return torch.empty(shape, dtype=batch.dtype, device="meta")
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(meta_batch(b, b0, batch_size) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(meta_batch(b, b0, batch_size) for b in batch)
    if isinstance(batch, Mapping):
        moved = {k: meta_batch(v, b0, batch_size) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except Exception:  # noqa: BLE001 - a mapping that cannot be rebuilt from a dict
            return moved
    data = getattr(batch, "data", None)
    if isinstance(data, Mapping):  # BatchEncoding-like
        moved = {k: meta_batch(v, b0, batch_size) for k, v in data.items()}
        try:
            return type(batch)(moved)
        except Exception:  # noqa: BLE001
            return moved
    return batch


def _units(model: nn.Module) -> dict[str, int]:
    """FSDP wrapping as it is usually written (an auto-wrap policy on the model's block class): every instance of the
    module class that repeats and holds the most parameters (transformer layers, ResNet bottlenecks; composite
    modules before single layers) is a unit, the root holds the rest. Parameter bytes of the root and of the largest
    unit, and the number of units."""
    def nbytes(m: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    by_class: dict[type, list[nn.Module]] = {}
    for module in model.modules():
        if module is model or isinstance(module, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            continue
        by_class.setdefault(type(module), []).append(module)
    candidates = [ms for ms in by_class.values() if len(ms) >= 2 and sum(map(nbytes, ms)) > 0]
    units = max(candidates, key=lambda ms: (any(True for _ in ms[0].children()), sum(map(nbytes, ms))),
                default=[])
    total = nbytes(model)
    return {"root": total - sum(map(nbytes, units)), "block": max(map(nbytes, units), default=0),
            "blocks": len(units)}


# ---------------------------------------------------------------------------------------------------------------
# The recorder


def _storages(obj: Any) -> list[torch.UntypedStorage]:
    out = []
    for leaf in tree_flatten(obj)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.device.type == "meta":
            with contextlib.suppress(RuntimeError, NotImplementedError):
                out.append(leaf.untyped_storage())
    return out


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _dtype_class(tensors: list[torch.Tensor], name: str) -> str:
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    if torch.float16 in floats:
        return "fp16"
    if torch.bfloat16 in floats:
        return "bf16"
    if name.startswith("convolution") or name in ("_convolution", "cudnn_convolution"):
        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    if name.startswith(_ATTENTION) or name.startswith("_efficient_attention") or name.startswith("_flash_attention"):
        return "fp32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


_CONVOLUTIONS = ("convolution", "_convolution", "cudnn_convolution")


def _nchw_transposes(tensors: list[torch.Tensor], moved: int, kernels: int) -> tuple[int, int]:
    """cuDNN's Tensor Core convolutions work in NHWC: a channels-first (NCHW, PyTorch's default) tensor it reads or
    writes is transposed into or out of a scratch copy, one kernel reading and writing it once more (NVIDIA's
    layout guidance, the reason ``channels_last`` speeds up convolutional networks). (bytes, kernels) with them."""
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen or t.device.type != "meta" or t.dim() not in (4, 5):
            continue
        seen.add(id(t))
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        if t.is_contiguous() and not (t.is_contiguous(memory_format=fmt) and t.shape[1] > 1):
            moved += 2 * _nbytes(t)
            kernels += 1
    return moved, kernels


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.phase = "setup"
        self.record_ops = False
        self.sizes: list[int] = []
        self.tokens: list[int] = []
        self.signs: list[int] = []
        self.phases: list[str] = []
        self.alloc_ops: list[str] = []
        self.ops: list[OpRecord] = []
        self.gemm_threads: set[str] = set()
        self.lt_threads: set[str] = set()
        self.forward_flops: dict[str, int] = {}
        self._live: dict[int, tuple[weakref.ref, int]] = {}

    def token_of(self, t: torch.Tensor) -> int | None:
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return None
        st = t.untyped_storage()
        entry = self._live.get(id(st))
        return entry[1] if entry is not None and entry[0]() is st else None

    def add(self, st: torch.UntypedStorage, op: str) -> None:
        key = id(st)
        entry = self._live.get(key)
        if entry is not None and entry[0]() is st:
            return
        token = len(self.sizes)
        self.sizes.append(int(st.nbytes()))
        self.alloc_ops.append(op)

        def release(ref: weakref.ref, key: int = key, token: int = token) -> None:
            entry = self._live.get(key)
            if entry is not None and entry[0] is ref:
                del self._live[key]
                self.tokens.append(token)
                self.signs.append(-1)
                self.phases.append(self.phase)

        self._live[key] = (weakref.ref(st, release), token)
        self.tokens.append(token)
        self.signs.append(1)
        self.phases.append(self.phase)

    def track(self, obj: Any, op: str) -> None:
        for st in _storages(obj):
            self.add(st, op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        thread = "autograd" if self.phase == "backward" else "python"
        if name in GEMM_OPS:
            self.gemm_threads.add(thread)
        if name in LT_OPS:
            self.lt_threads.add(thread)
        if self.record_ops:
            self._record(func, name, args, kwargs, out)
        self.track(out, name)
        return out

    def _record(self, func: Any, name: str, args: Any, kwargs: Any, out: Any) -> None:
        if func.namespace == "prim" or getattr(func, "is_view", False) or name in _NO_KERNEL \
                or name.startswith("sym_"):
            return
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        seen: set[int] = set()
        moved = 0
        for t in inputs + outputs:
            if id(t) not in seen and t.device.type == "meta":
                seen.add(id(t))
                moved += _nbytes(t)
        for i in _TWO_PASS.get(name, ()):
            if i < len(args):
                moved += _nbytes(args[i])
        flops = 0
        counter = flop_registry.get(func._overloadpacket)
        if counter is not None:
            try:
                flops = int(counter(*args, **kwargs, out_val=out))
            except Exception:  # noqa: BLE001 - a formula that does not take these arguments: count bytes only
                flops = 0
        is_tensor = name in _TENSOR_CORE_OPS or name.startswith(_ATTENTION) \
            or name.startswith(("_flash_attention", "_efficient_attention"))
        base = name.removesuffix("_backward")
        if is_tensor and self.phase == "forward" and flops > 0:
            self.forward_flops[name] = flops
        elif is_tensor and flops == 0 and base != name and base in self.forward_flops:
            flops = 2 * self.forward_flops[base]  # no formula for this backward: about twice its forward
        tensor_op = flops > 0 and is_tensor
        kind = "tensor" if tensor_op else "memory"
        on_device = any(t.device.type == "meta" for t in inputs + outputs)
        dtype = _dtype_class(inputs, name) if tensor_op else "-"
        kernels = kernel_count(name, args, outputs) if on_device else 0
        if tensor_op and name.startswith(_CONVOLUTIONS) and dtype != "fp32":
            moved, kernels = _nchw_transposes(inputs + outputs, moved, kernels)
        self.ops.append(OpRecord(name, self.phase, flops, moved, kind, dtype, kernels,
                                 sum(t.numel() for t in outputs) if tensor_op else 0))


# ---------------------------------------------------------------------------------------------------------------
# The step


@contextlib.contextmanager
def _transformers_sees_a_trace() -> Any:
    """Hugging Face model code inspects values only outside a trace: ``is_tracing(tensor)`` (true for FakeTensors,
    fx proxies, export) makes it keep an attention mask instead of asking whether it is all ones (``mask.all()``,
    which a meta tensor cannot answer). Meta tensors count as traced here, so the plan keeps the mask, as the model
    does whenever a padded batch has padding."""
    import sys

    patched = []
    for mod_name, module in list(sys.modules.items()):
        original = getattr(module, "is_tracing", None) if mod_name.startswith("transformers") else None
        if callable(original) and getattr(original, "__module__", "").startswith("transformers"):
            def traced(tensor: Any = None, original: Any = original) -> bool:
                return (isinstance(tensor, torch.Tensor) and tensor.device.type == "meta") or original(tensor)

            module.is_tracing = traced
            patched.append((module, original))
    try:
        yield
    finally:
        for module, original in patched:
            module.is_tracing = original


@contextlib.contextmanager
def _fused_optimizers_on_meta() -> Any:
    """Let ``fused=True`` optimizers accept ``meta`` parameters (they check the device type up front), so that a
    fused optimizer is traced as the fused kernel it is on CUDA (state updated in place, no temporaries)."""
    import sys

    name = "_get_fused_kernels_supported_devices"
    patched = []
    for mod_name, module in list(sys.modules.items()):
        if mod_name.startswith("torch.optim") and callable(getattr(module, name, None)):
            original = getattr(module, name)
            setattr(module, name, lambda original=original: [*original(), "meta"])
            patched.append((module, original))
    try:
        yield
    finally:
        for module, original in patched:
            setattr(module, name, original)


def trace_step(workload: Any, batch_size: int, *, spec: GpuSpec, precision: str = "fp32",
               sample: tuple[Any, int] | None = None) -> Trace:
    """Trace two training steps of ``workload`` at ``batch_size`` as they would run on ``spec``."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"unknown precision {precision!r}; choose one of: fp32, bf16, fp16")
    low = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model, _ = meta_model(workload)
    model.train()
    with _fused_optimizers_on_meta():
        optimizer = build_optimizer(workload, model)
    cuda_optimizer_defaults(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    batch0, b0 = sample if sample is not None else sample_batch(workload)
    batch = meta_batch(batch0, b0, batch_size)
    rules = CudaRules(spec)
    rec = _Recorder()
    category: dict[int, str] = {}
    rec.track(list(model.parameters()) + list(model.buffers()), "parameter")
    for t in list(model.parameters()) + list(model.buffers()):
        category[rec.token_of(t)] = "parameters"
    rec.track(batch, "input")
    for st in _storages(batch):
        tok = rec._live[id(st)][1]
        category.setdefault(tok, "inputs")
    step_start = 0
    was_enabled = gc.isenabled()
    gc.disable()  # frees happen when the last reference goes, in program order (no collector in between)
    try:
        with rules, rec, _fused_optimizers_on_meta(), _transformers_sees_a_trace():
            for step in range(2):
                if step == 1:
                    step_start = len(rec.tokens)
                    rec.record_ops = True
                    rules.seen.clear()
                rec.phase = "forward"
                rules.start_autocast(low)
                try:
                    loss, outputs, targets = run_batch(workload, model, batch)
                finally:
                    rules.stop_autocast()
                del outputs, targets
                if not loss.requires_grad:
                    raise WorkloadError("the loss does not depend on any trainable parameter (it has no gradient); "
                                        "check the model's forward and loss_fn")
                rec.phase = "backward"
                user_call("backward through the model", "check the model's backward on the meta device",
                          loss.backward)
                del loss
                for p in params:
                    tok = rec.token_of(p.grad) if p.grad is not None else None
                    if tok is not None:
                        category[tok] = "gradients"
                rec.phase = "optimizer"
                clip = getattr(workload, "grad_clip", None)
                if clip is not None:
                    nn.utils.clip_grad_norm_(params, clip)  # foreach or not: scalars and in-place scaling
                user_call("optimizer.step()", "check the optimizer on the meta device", optimizer.step)
                for state in optimizer.state.values():
                    for value in state.values() if isinstance(state, Mapping) else ():
                        tok = rec.token_of(value)
                        if tok is not None:
                            category[tok] = "optimizer_state"
                optimizer.zero_grad(set_to_none=True)
            rec.phase = "end"
            rec.record_ops = False
            step_end = len(rec.tokens)
    except WorkloadError as exc:
        raise WorkloadError(f"tracing a training step on the meta device at batch size {batch_size}: {exc}"
                            f"{_META_HINT}") from exc
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError) as exc:
        raise WorkloadError(
            f"tracing a training step on the meta device failed at batch size {batch_size}: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}{_META_HINT}") from exc
    finally:
        if was_enabled:
            gc.enable()
    units = _units(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    del model, optimizer, params, batch
    phase_of_birth = {}
    for tok, sign, phase in zip(rec.tokens[:step_end], rec.signs[:step_end], rec.phases[:step_end]):
        if sign > 0 and tok not in phase_of_birth:
            phase_of_birth[tok] = phase
    cats = []
    for tok in range(len(rec.sizes)):
        cat = category.get(tok)
        if cat is None:
            cat = "optimizer_temporaries" if phase_of_birth.get(tok) == "optimizer" else "activations"
        cats.append(cat)
    return Trace(batch_size=batch_size, sizes=rec.sizes, tokens=rec.tokens[:step_end], signs=rec.signs[:step_end],
                 phases=rec.phases[:step_end],
                 step_start=step_start, category=cats, alloc_ops=rec.alloc_ops, ops=rec.ops,
                 gemm_threads=rec.gemm_threads, lt_threads=rec.lt_threads, rules=dict(rules.seen), units=units,
                 param_bytes=param_bytes, grad_bytes=grad_bytes)
