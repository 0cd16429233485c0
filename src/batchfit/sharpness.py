"""Sharpness: the top eigenvalue of the training-loss Hessian, by power iteration with Hessian-vector products.

The guides' "large batches find sharp minima, small batches flat ones" (Keskar et al. 2017, "On Large-Batch
Training for Deep Learning: Generalization Gap and Sharp Minima") becomes a number: the largest-magnitude
eigenvalue of the Hessian of the training loss at the final weights. The Hessian is never formed; each power-iteration
step needs one Hessian-vector product, computed by differentiating ``g . v`` (Pearlmutter 1994, "Fast Exact
Multiplication by the Hessian"), the method PyHessian uses (Yao et al. 2020). The loss is measured on a fixed sample
of the training set (the same samples for every trial) with the model in eval mode, so dropout does not make the
operator random.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from batchfit import checks, data
from batchfit.errors import ConfigError
from batchfit.step import autocast, fetching, run_batch
from batchfit.workload import Workload

__all__ = ["DEFAULT_ITERS", "DEFAULT_SAMPLES", "DEFAULT_TOL", "SharpnessCallback", "top_hessian_eigenvalue"]

DEFAULT_SAMPLES = 512
DEFAULT_ITERS = 20
DEFAULT_TOL = 1e-3


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _normalize(v: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(_dot(v, v))
    return [x / (norm + 1e-12) for x in v]


def _fixed_sample(workload: Workload, num_samples: int, chunk_size: int, seed: int) -> list[tuple[Any, int]]:
    """The first ``num_samples`` samples of a ``seed``-shuffled epoch, as (host batch, samples) chunks."""
    source = data.train_source(workload)
    batches = source.epoch(chunk_size, generator=torch.Generator().manual_seed(seed), drop_last=False)
    chunks: list[tuple[Any, int]] = []
    total = 0
    for batch, _ in fetching(batches, "train_data"):
        m = data.batch_size_of(batch)
        if total + m > num_samples:
            m = num_samples - total
            batch = data.slice_batch(batch, 0, m)
        chunks.append((batch, m))
        total += m
        if total >= num_samples:
            break
    return chunks


def top_hessian_eigenvalue(
    workload: Workload,
    model: nn.Module,
    *,
    device: torch.device | str = "cpu",
    num_samples: int = DEFAULT_SAMPLES,
    chunk_size: int = 256,
    iters: int = DEFAULT_ITERS,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Largest-magnitude Hessian eigenvalue of the training loss at ``model``'s current weights.

    The loss is the sample-weighted mean over ``num_samples`` training samples drawn with ``seed`` (processed in
    chunks of ``chunk_size``, so memory stays at one chunk's double-backward). Power iteration stops after
    ``iters`` steps or when the estimate changes by less than ``tol`` (relative).

    Returns ``{"top_eigenvalue", "iterations", "converged", "num_samples"}``.

    >>> import torch
    >>> from batchfit.loading import load_workload
    >>> wl = load_workload("demo:digits-mlp")
    >>> r = top_hessian_eigenvalue(wl, wl.model_fn(), num_samples=64, iters=5)
    >>> r["top_eigenvalue"] > 0
    True
    """
    for name, value in (("num_samples", num_samples), ("chunk_size", chunk_size), ("iters", iters)):
        checks.positive_int(name, value)
    dev = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; sharpness is undefined")
    chunks = _fixed_sample(workload, num_samples, chunk_size, seed)
    total = sum(m for _, m in chunks)

    was_training = model.training
    model.eval()

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros_like(p) for p in params]
        for chunk, m in chunks:
            batch = data.to_device(chunk, dev)
            with autocast(precision, dev):
                loss, _, _ = run_batch(workload, model, batch)
            loss = loss.float() * (m / total)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            pairs = [(g, x) for g, x in zip(grads, v) if g is not None]
            if not pairs:
                continue
            gv = sum((g * x).sum() for g, x in pairs)
            hv = torch.autograd.grad(gv, params, allow_unused=True)
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h.detach())
        return out

    try:
        torch.manual_seed(seed)
        v = _normalize([torch.randn_like(p) for p in params])
        eig = float("nan")
        converged = False
        it = 0
        for step in range(1, iters + 1):
            it = step
            hv = hvp(v)
            new_eig = float(_dot(hv, v))  # Rayleigh quotient with the unit vector v
            if not math.isfinite(new_eig):
                eig = new_eig
                break
            v = _normalize(hv)
            if math.isfinite(eig) and abs(new_eig - eig) <= tol * max(abs(new_eig), 1e-12):
                eig = new_eig
                converged = True
                break
            eig = new_eig
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {
        "top_eigenvalue": eig if math.isfinite(eig) else None,
        "iterations": it,
        "converged": converged,
        "num_samples": total,
    }


class SharpnessCallback:
    """Engine callback: measure the final model's sharpness in ``on_train_end`` (into ``state.extras``)."""

    def __init__(self, *, num_samples: int = DEFAULT_SAMPLES, chunk_size: int = 256, iters: int = DEFAULT_ITERS,
                 seed: int = 0) -> None:
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.iters = iters
        self.seed = seed

    def on_train_end(self, state: Any, result: Any) -> None:
        if getattr(result, "diverged", False):
            state.extras["sharpness"] = None
            return
        state.extras["sharpness"] = top_hessian_eigenvalue(
            state.workload, state.model, device=state.device, num_samples=self.num_samples,
            chunk_size=self.chunk_size, iters=self.iters, seed=self.seed,
        )
