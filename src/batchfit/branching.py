"""The local critical batch over training, measured by branching short runs from checkpoints.

Merrill et al. 2025 ("Critical Batch Size Revisited") measure the critical batch *directly*: from checkpoints of a
reference run, continue training for the same number of samples at batch sizes ``B0 * 2^i`` (the learning rate
scaled by the batch-size rule) and ask up to which batch the loss still falls as much as at the smallest batch. That
batch — the largest whose progress per sample stays within a tolerance of the smallest batch's — is the *local*
critical batch: beyond it, larger batches waste samples. They find it near zero at initialisation, rising fast, then
flattening, and that the gradient noise scale (McCandlish et al. 2018) tracks it only loosely; so beside every
branching measurement this module also measures B_simple at the same checkpoint, and the report shows both.

Cost: ``len(checkpoints) x len(batches) x replicates`` branches of ``branch_samples`` samples each (plus the
reference run's own steps and B_simple's ``noise_batches`` gradient pairs per checkpoint); the result states it.

Every progress number is an interval over replicates (data orders), and the local critical batch comes with the
range the data support: from the largest batch that is efficient beyond the noise to the largest that may be.

The reference run and every branch are built by :func:`batchfit.step.build_run` and run ``train``'s step: the
workload's clipping and LR schedule, the warm-up (a branch continues the reference's warm-up and schedule from the
checkpoint's step, its LR moved by the rule as at a batch-size change), the precision (autocast; fp16's loss scale),
and the divergence check (a non-finite training loss stops the run: a branch is then reported in its point's
``diverged`` and counts as not efficient; the reference run stops measuring, ``diverged_at_step``). Every loss is read
by the one evaluation pass (:func:`batchfit.step.eval_pass`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from batchfit import checks
from batchfit.data import train_source
from batchfit.errors import ConfigError
from batchfit.loading import load_workload
from batchfit.progress import ProgressFn, emit
from batchfit.runtime import resolve_device
from batchfit.scaling import RULE_CHOICES
from batchfit.stats import Interval, mean_interval, noise_scale_interval, unbiased_estimates
from batchfit.step import LossMeter, TrainStep, build_run, check_precision, eval_pass
from batchfit.workload import Workload

__all__ = ["BranchPoint", "BranchingResult", "gradient_noise_scale", "local_critical_batch"]


@dataclass
class BranchPoint:
    """One checkpoint: the loss decrease of each branch batch size over the same samples, and what it implies."""

    step: int
    samples: int
    loss: float
    progress: dict[int, Interval]  # batch -> loss decrease over branch_samples (mean over replicates)
    efficiency: dict[int, Interval]  # batch -> progress / the smallest batch's progress
    local_critical_batch: int | None  # the largest batch whose efficiency estimate >= 1 - tolerance
    supported_range: tuple[int | None, int | None]  # (efficient beyond the noise, possibly efficient)
    b_simple: Interval | None
    diverged: dict[int, int] = field(default_factory=dict)  # batch -> replicates whose training loss went non-finite

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "samples": self.samples, "loss": self.loss,
                "progress": {str(b): iv.to_dict() for b, iv in self.progress.items()},
                "efficiency": {str(b): iv.to_dict() for b, iv in self.efficiency.items()},
                "local_critical_batch": self.local_critical_batch, "supported_range": list(self.supported_range),
                "b_simple": None if self.b_simple is None else self.b_simple.to_dict(),
                "diverged": {str(b): n for b, n in self.diverged.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BranchPoint:
        lo, hi = d.get("supported_range") or (None, None)
        return cls(int(d["step"]), int(d["samples"]), float(d["loss"]),
                   {int(b): Interval.from_dict(v) for b, v in d["progress"].items()},
                   {int(b): Interval.from_dict(v) for b, v in d["efficiency"].items()},
                   d.get("local_critical_batch"), (lo, hi),
                   None if d.get("b_simple") is None else Interval.from_dict(d["b_simple"]),
                   {int(b): int(n) for b, n in (d.get("diverged") or {}).items()})


@dataclass
class BranchingResult:
    """The local critical batch (and B_simple) at each checkpoint of a reference run."""

    workload: str
    base_batch_size: int
    lr_rule: str
    tolerance: float
    branch_samples: int
    replicates: int
    batches: list[int]
    reference_steps: int
    points: list[BranchPoint] = field(default_factory=list)
    reference_seconds: float = 0.0
    branch_seconds: float = 0.0
    noise_seconds: float = 0.0
    precision: str = "fp32"
    warmup_steps: int = 0
    diverged_at_step: int | None = None  # the reference run's training loss went non-finite here: measuring stopped

    @property
    def cost_share(self) -> float:
        """Branching (and B_simple) time as a share of the reference run's time."""
        if not self.reference_seconds:
            return math.inf
        return (self.branch_seconds + self.noise_seconds) / self.reference_seconds

    def to_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "base_batch_size": self.base_batch_size, "lr_rule": self.lr_rule,
                "tolerance": self.tolerance, "branch_samples": self.branch_samples, "replicates": self.replicates,
                "batches": list(self.batches), "reference_steps": self.reference_steps,
                "points": [p.to_dict() for p in self.points], "reference_seconds": self.reference_seconds,
                "branch_seconds": self.branch_seconds, "noise_seconds": self.noise_seconds,
                "cost_share": self.cost_share, "precision": self.precision, "warmup_steps": self.warmup_steps,
                "diverged_at_step": self.diverged_at_step}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BranchingResult:
        return cls(d["workload"], int(d["base_batch_size"]), d["lr_rule"], float(d["tolerance"]),
                   int(d["branch_samples"]), int(d["replicates"]), [int(b) for b in d["batches"]],
                   int(d["reference_steps"]), [BranchPoint.from_dict(p) for p in d["points"]],
                   float(d.get("reference_seconds", 0)), float(d.get("branch_seconds", 0)),
                   float(d.get("noise_seconds", 0)), str(d.get("precision") or "fp32"),
                   int(d.get("warmup_steps") or 0), d.get("diverged_at_step"))


# ---------------------------------------------------------------------------------------------------------------
# Pieces


def _fixed_eval_batch(workload: Workload, samples: int) -> Any:
    """A fixed set of training samples on which every branch's loss is read (optimisation progress, not test)."""
    src = train_source(workload)
    gen = torch.Generator().manual_seed(12345)
    batch, _ = next(iter(src.epoch(min(samples, src.num_samples), generator=gen, drop_last=False)))
    return batch


def _loss_on(workload: Workload, model: torch.nn.Module, batch: Any, device: torch.device, precision: str) -> float:
    """The loss (eval mode) on the fixed batch, by the one evaluation pass."""
    return eval_pass(workload, model, [batch], device=device, precision=precision, metrics=False)[0]


def _train_to(step: TrainStep, losses: LossMeter, stream: Any, batch: int, done: int,
              target: int) -> tuple[int, int | None]:
    """Steps of ``batch`` from ``done`` to ``target``, checking the training loss as ``train`` does (CPU: every
    step; CUDA: every few steps and at the end); returns ``(steps done, the step at which it turned non-finite or
    None)`` — a non-finite loss stops the run there."""
    while done < target:
        step(next(stream), batch)
        done += 1
        if losses.check_due(done, last=done == target) and losses.nonfinite():
            return done, done
    return done, None


def _batches(workload: Workload, batch_size: int, seed: int) -> Any:
    """An endless stream of training batches (reshuffled each epoch) from a seeded order."""
    src = train_source(workload)
    gen = torch.Generator().manual_seed(seed)
    while True:
        yielded = False
        for batch, _ in src.epoch(batch_size, generator=gen, drop_last=True):
            yielded = True
            yield batch
        if not yielded:
            raise ConfigError(f"batch {batch_size} is larger than the training set ({src.num_samples})")


def gradient_noise_scale(workload: Workload, model: torch.nn.Module, *, batch_size: int, pairs: int,
                         device: torch.device, seed: int = 0) -> Interval:
    """B_simple = tr(Sigma) / |G|^2 at the model's current weights (McCandlish et al. 2018, appendix A).

    Each of ``pairs`` batches of ``2 b`` samples gives two half-batch gradients; the unbiased two-batch estimates of
    ``|G|^2`` and ``tr(Sigma)`` (:func:`batchfit.stats.unbiased_estimates`) are averaged over the pairs and their
    ratio bootstrapped over the pairs (:func:`batchfit.stats.noise_scale_interval`, the estimator every B_simple
    in batchfit goes through).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    half = max(1, batch_size // 2)
    after: list[torch.Tensor] = []  # the accumulated gradient after each half's backward, through the one step

    def take(_: Any) -> None:
        after.append(torch.cat([p.grad.detach().reshape(-1).double() for p in params if p.grad is not None]))

    step = build_run(workload, device=device, model=model, optimizer=False, micro_batch_size=half,
                     on_micro=[take]).step
    g2s, trs = [], []
    stream = _batches(workload, 2 * half, seed)
    for _ in range(pairs):
        model.zero_grad(set_to_none=True)
        after.clear()
        step.forward_backward(next(stream))
        # each half's loss is weighted 1/2: after the first backward the gradient is g0 / 2, after both (g0 + g1) / 2
        g0, g1 = 2 * after[0], 2 * (after[1] - after[0])
        small = 0.5 * (g0.square().sum() + g1.square().sum())
        big = after[1].square().sum()
        g2, tr = unbiased_estimates(float(small), float(big), k=2, batch_size=2 * half)
        g2s.append(g2)
        trs.append(tr)
    model.zero_grad(set_to_none=True)
    # |G|^2 near an optimum can be estimated <= 0 (noise dominates the signal): B_simple is then only bounded below
    return noise_scale_interval(g2s, trs, seed=seed, method="bootstrap-pairs")


def _branch(workload: Workload, ckpt: dict[str, Any], *, base_batch: int, batch: int, rule: str, steps: int,
            device: torch.device, seed: int, eval_batch: Any, precision: str = "fp32", total_steps: int = 1,
            warmup_steps: int = 0) -> tuple[float, int | None]:
    """Loss decrease of one branch: from the checkpoint (a :meth:`batchfit.step.StepRun.state_dict` of the
    reference run), ``steps`` steps at ``batch``, the LR moved from the checkpoint's by the rule (the reference's
    warm-up and schedule continue from its step). ``(nan, branch step)`` when the training loss turned non-finite."""
    losses = LossMeter(device)
    run = build_run(workload, batch, None, precision, device=device, lr_rule=rule, base_batch=base_batch, state=ckpt,
                    total_steps=total_steps, warmup_steps=warmup_steps, losses=losses)
    stream = _batches(workload, batch, seed)
    before = _loss_on(workload, run.model, eval_batch, device, precision)
    _, diverged = _train_to(run.step, losses, stream, batch, 0, steps)
    if diverged is not None:
        return math.nan, diverged
    return before - _loss_on(workload, run.model, eval_batch, device, precision), None


def _mean(values: list[float]) -> Interval:
    """The mean over the finite replicates (a diverged branch's ``nan`` left out); unknown when there is none."""
    finite = [v for v in values if math.isfinite(v)]
    return mean_interval(finite) if finite else Interval(math.nan, None, None, n=0)


def _efficiency(progress: dict[int, list[float]], tolerance: float,
                diverged: Sequence[int] = ()) -> tuple[dict[int, Interval], int | None, tuple[int | None, int | None]]:
    """Each batch's progress over the smallest's (replicate by replicate); a batch with a diverged branch is not
    efficient (an unknown efficiency)."""
    batches = sorted(progress)
    ref = np.asarray(progress[batches[0]])
    eff: dict[int, Interval] = {}
    for b in batches:
        ratios = [p / r for p, r in zip(progress[b], ref) if r > 0 and math.isfinite(p)]
        eff[b] = mean_interval(ratios) if ratios and b not in diverged else Interval(math.nan, None, None, n=0)
    bar = 1.0 - tolerance
    lcb = sure = maybe = None
    run_est = run_low = True  # contiguous from the smallest batch
    for b in batches:
        iv = eff[b]
        est_ok = math.isfinite(iv.estimate) and iv.estimate >= bar
        low_ok = iv.known and iv.low >= bar  # type: ignore[operator]
        high_ok = (iv.high >= bar) if iv.known else est_ok  # type: ignore[operator]
        run_est = run_est and est_ok
        run_low = run_low and low_ok
        lcb = b if run_est else lcb
        sure = b if run_low else sure
        maybe = b if high_ok else maybe
    return eff, lcb, (sure, maybe)


# ---------------------------------------------------------------------------------------------------------------
# The measurement


def local_critical_batch(
    workload: Workload | str,
    *,
    batch_size: int | None = None,
    factors: Sequence[int] = (1, 2, 4, 8, 16, 32),
    checkpoints: Sequence[float] = (0.0, 0.2, 0.5, 0.9),
    reference_steps: int = 200,
    branch_samples: int | None = None,
    lr_rule: str = "auto",
    tolerance: float = 0.2,
    replicates: int = 2,
    noise_batches: int = 32,
    eval_samples: int = 1024,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: ProgressFn | None = None,
    finish_reference: bool = True,
    precision: str = "fp32",
    warmup: int = 0,
) -> BranchingResult:
    """Measure the local critical batch at checkpoints (fractions of ``reference_steps``) of a reference run.

    Args:
        batch_size: the reference run's batch ``B0`` (default: the workload's ``base_batch_size``).
        factors: branch batches are ``B0 x factor`` (include 1).
        branch_samples: samples each branch trains on (default: 2 steps of the largest branch batch).
        tolerance: a batch is efficient while its loss decrease is >= (1 - tolerance) x the smallest batch's.
        replicates: data orders per branch (>= 2 gives intervals).
        noise_batches: gradient pairs for B_simple at each checkpoint (0: skip).
        finish_reference: train the reference run to ``reference_steps`` after the last checkpoint (the cost share
            is then against a whole run); ``False`` stops at the last checkpoint (``train(batch_schedule="auto")``,
            whose own run is the whole run; ``reference_seconds`` then covers only the part trained).
        precision: ``fp32``, ``bf16`` or ``fp16`` (CUDA): the reference run, the branches and their loss readings
            run under it, as ``train`` does.
        warmup: linear warm-up steps of the reference run (over ``reference_steps``, times the workload's
            ``lr_schedule``); the branches continue it from their checkpoint.
    """
    workload = load_workload(workload)
    dev = resolve_device(device)
    check_precision(precision, dev)
    warmup = checks.non_negative_int("warmup", warmup)
    b0 = checks.positive_int("batch_size", workload.base_batch_size if batch_size is None else batch_size)
    facs = sorted({checks.positive_int("factors", f) for f in factors})
    if facs[0] != 1:
        facs = [1, *facs]
    steps_total = checks.positive_int("reference_steps", reference_steps)
    tol = checks.fraction("tolerance", tolerance)
    reps = checks.positive_int("replicates", replicates)
    checks.one_of("lr_rule", lr_rule, RULE_CHOICES)
    ckpt_steps = sorted({min(steps_total, max(0, round(checks.fraction("checkpoints", c, low_open=False,
                                                                       high_open=False) * steps_total)))
                         for c in checkpoints})
    batches = [b0 * f for f in facs]
    samples = branch_samples or 2 * batches[-1]
    checks.positive_int("branch_samples", samples)
    if batches[-1] > workload.num_train:
        raise ConfigError(f"the largest branch batch {batches[-1]} exceeds the training set "
                                 f"({workload.num_train}); use fewer factors or a smaller batch_size")

    losses = LossMeter(dev)
    ref = build_run(workload, b0, None, precision, device=dev, seed=seed, lr_rule=lr_rule, total_steps=steps_total,
                    warmup_steps=warmup, losses=losses)
    rule = ref.lr_rule or lr_rule
    eval_batch = _fixed_eval_batch(workload, eval_samples)
    result = BranchingResult(workload.name, b0, rule, tol, samples, reps, batches, steps_total, precision=precision,
                             warmup_steps=warmup)
    stream = _batches(workload, b0, seed)
    emit(progress, "branching", "start", f"reference run of {steps_total} steps at batch {b0}",
         total=len(ckpt_steps))
    done = 0
    for target in ckpt_steps:
        t0 = time.perf_counter()
        done, result.diverged_at_step = _train_to(ref.step, losses, stream, b0, done, target)
        result.reference_seconds += time.perf_counter() - t0
        if result.diverged_at_step is not None:
            break
        result.points.append(_measure_point(workload, ref.state_dict(), ref.model, done, b0, batches, rule, samples,
                                            reps, noise_batches, dev, seed, eval_batch, tol, result))
        emit(progress, "branching", "update", f"step {done}: local critical batch "
             f"{result.points[-1].local_critical_batch}", completed=len(result.points), total=len(ckpt_steps))
    t0 = time.perf_counter()
    if finish_reference and result.diverged_at_step is None:  # the rest of the reference run: the cost share is
        done, result.diverged_at_step = _train_to(ref.step, losses, stream, b0, done, steps_total)  # per whole run
    result.reference_seconds += time.perf_counter() - t0
    if result.diverged_at_step is not None:
        emit(progress, "branching", "end", f"the reference run's training loss turned non-finite at step "
             f"{result.diverged_at_step}; {len(result.points)} checkpoints measured before it")
    else:
        emit(progress, "branching", "end",
             f"{len(result.points)} checkpoints, cost {result.cost_share:.0%} of the run")
    return result


def _measure_point(workload: Workload, ckpt: dict[str, Any], model: torch.nn.Module, step_no: int, b0: int,
                   batches: list[int], rule: str, samples: int, reps: int, noise_batches: int,
                   dev: torch.device, seed: int, eval_batch: Any, tol: float, result: BranchingResult) -> BranchPoint:
    """The branches from one checkpoint (``ckpt``: :meth:`batchfit.step.StepRun.state_dict` of the reference
    run, whose ``model`` B_simple and the point's loss are read on), and what they imply."""
    t0 = time.perf_counter()
    prog: dict[int, list[float]] = {b: [] for b in batches}
    diverged: dict[int, int] = {}
    for r in range(reps):
        for b in batches:
            steps = max(1, math.ceil(samples / b))
            change, at = _branch(workload, ckpt, base_batch=b0, batch=b, rule=rule, steps=steps, device=dev,
                                 seed=seed * 1000 + 17 * r + step_no + 1, eval_batch=eval_batch,
                                 precision=result.precision, total_steps=max(1, result.reference_steps),
                                 warmup_steps=result.warmup_steps)
            prog[b].append(change)
            if at is not None:
                diverged[b] = diverged.get(b, 0) + 1
    result.branch_seconds += time.perf_counter() - t0
    eff, lcb, supported = _efficiency(prog, tol, list(diverged))
    bs = None
    if noise_batches:
        t0 = time.perf_counter()
        bs = gradient_noise_scale(workload, model, batch_size=b0 if b0 >= 2 else 2, pairs=noise_batches,
                                  device=dev, seed=seed + step_no)
        result.noise_seconds += time.perf_counter() - t0
    loss = _loss_on(workload, model, eval_batch, dev, result.precision)
    return BranchPoint(step_no, step_no * b0, loss, {b: _mean(v) for b, v in prog.items()}, eff, lcb,
                       supported, bs, diverged)
