"""Batch-size schedules: the effective batch changes during a run, and the optimizer settings move with it.

A schedule is a list of :class:`Phase` (from step ``s`` on, effective batch ``B``), written on the command line as
``0:32,500:64,1500:128``. Batches change by integer factors (each phase's batch divides the next's or is divided by
it), so exact accumulation keeps working: the micro-batch follows the memory limit found by the finder, and the
accumulation steps make up the rest.

At each change by a factor ``k = B_new / B_old`` the optimizer is transferred (:func:`transfer`):

- the learning rate by the batch-size rule (linear: x k, Goyal et al. 2017; sqrt / adam-sqrt: x sqrt(k), Malladi et
  al. 2022);
- Adam's beta2 -> beta2^k (Marek et al. 2025: keep the second-moment half-life constant *in samples*; option
  ``beta2="power"``, the default for Adam-family optimizers; :func:`batchfit.scaling.beta2_power`, the formula the
  adam-sqrt rule uses too), or ``1 - k (1 - beta2)`` (Malladi et al.'s SDE rule as written) or unchanged;
- optionally the AdamW timescale ``tau = B / (eta lambda D)`` of Bergsma et al. 2025 ("Power Lines") held constant:
  ``lambda -> lambda x k / (eta_new / eta_old)``.

:func:`derive_schedule` turns a branching measurement (:mod:`batchfit.branching`) into a batch-size warm-up that
follows the measured local critical batch (Merrill et al. 2025 derive one the same way): the batch doubles once the
critical batch measured at that point of training allows it, capped by the largest batch wanted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from batchfit import checks
from batchfit.errors import ConfigError
from batchfit.scaling import beta2_power, default_rule, is_adam_family, timescale_weight_decay

__all__ = [
    "BETA2_RULES",
    "Phase",
    "ScheduleState",
    "derive_schedule",
    "parse_schedule",
    "plan_micro",
    "transfer",
]

BETA2_RULES = ("power", "sde", "keep")


@dataclass(frozen=True)
class Phase:
    """From optimizer step ``step`` on (0-based), train with effective batch ``batch_size``."""

    step: int
    batch_size: int

    def to_dict(self) -> dict[str, int]:
        return {"step": self.step, "batch_size": self.batch_size}


def _shown(value: Any) -> str:
    """``repr(value)``, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_factors(phases: Sequence[Phase]) -> None:
    for a, b in zip(phases, phases[1:]):
        big, small = max(a.batch_size, b.batch_size), min(a.batch_size, b.batch_size)
        if big % small:
            raise ConfigError(f"batch_schedule: batch {a.batch_size} -> {b.batch_size} at step {b.step} is not an "
                              "integer factor; each change must multiply or divide the batch by a whole number")


def parse_schedule(spec: str | Sequence[Phase] | Sequence[Sequence[int]] | Sequence[Mapping[str, int]]
                   ) -> list[Phase]:
    """``"0:32,500:64"`` (or phases, pairs, or dicts) -> validated phases sorted by step, starting at step 0."""
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            step, sep, batch = part.strip().partition(":")
            if not sep:
                raise ConfigError(f"batch_schedule item {part.strip()!r} is not STEP:BATCH; write e.g. 0:32,500:64")
            try:
                items.append((int(step), int(batch)))
            except ValueError:
                raise ConfigError(f"batch_schedule item {part.strip()!r}: STEP and BATCH must be integers") from None
    else:
        if isinstance(spec, (bytes, Mapping)) or not isinstance(spec, Iterable):
            raise ConfigError(f"batch_schedule must be 'STEP:BATCH,...' (e.g. '0:32,500:64'), 'auto' or a list of "
                              f"(step, batch) pairs; got {_shown(spec)}")
        items = []
        for p in spec:
            if isinstance(p, Phase):
                items.append((p.step, p.batch_size))
            elif isinstance(p, Mapping):
                items.append((p.get("step"), p.get("batch_size")))  # type: ignore[arg-type]
            elif isinstance(p, (str, bytes)) or not isinstance(p, Iterable) or len(pair := tuple(p)) != 2:
                raise ConfigError(f"batch_schedule item {_shown(p)} is not a (step, batch) pair; write e.g. "
                                  "[(0, 32), (500, 64)] or '0:32,500:64'")
            else:
                items.append(pair)
    if not items:
        raise ConfigError("batch_schedule is empty; give at least 0:BATCH")
    phases = [Phase(checks.non_negative_int("batch_schedule step", s), checks.positive_int("batch_schedule batch",
                                                                                           b)) for s, b in items]
    phases.sort(key=lambda p: p.step)
    if phases[0].step != 0:
        raise ConfigError(f"batch_schedule must start at step 0 (it starts at {phases[0].step}); write 0:BATCH first")
    if len({p.step for p in phases}) != len(phases):
        raise ConfigError("batch_schedule names the same step twice")
    merged = [phases[0]]
    for p in phases[1:]:
        if p.batch_size != merged[-1].batch_size:
            merged.append(p)
    _check_factors(merged)
    return merged


def plan_micro(batch_size: int, micro_limit: int | None) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for an effective batch under a memory limit (exact accumulation)."""
    if micro_limit is None or batch_size <= micro_limit:
        return batch_size, 1
    acc = math.ceil(batch_size / micro_limit)
    micro = math.ceil(batch_size / acc)
    return micro, math.ceil(batch_size / micro)


def transfer(optimizer: torch.optim.Optimizer, k: float, *, lr_rule: str = "auto", beta2: str | None = None,
             weight_decay_timescale: bool = False) -> dict[str, float]:
    """Move the optimizer's settings in place for a batch change by factor ``k``; returns the first group's values.

    ``lr_rule`` ``auto`` picks linear (SGD family) or adam-sqrt (Adam family); ``beta2`` (Adam family only):
    ``power`` (beta2^k, the default), ``sde`` (1 - k (1 - beta2)) or ``keep``.
    """
    checks.positive_number("k", k)
    rule = default_rule(optimizer) if lr_rule == "auto" else lr_rule
    checks.one_of("lr_rule", rule, ("none", "linear", "sqrt", "adam-sqrt"))
    lr_factor = {"none": 1.0, "linear": k, "sqrt": math.sqrt(k), "adam-sqrt": math.sqrt(k)}[rule]
    adam = is_adam_family(optimizer)
    b2_rule = checks.one_of("beta2", beta2 or ("power" if adam else "keep"), BETA2_RULES)
    for g in optimizer.param_groups:
        old_lr = g["lr"]
        g["lr"] = old_lr * lr_factor
        if adam and "betas" in g and b2_rule != "keep":
            b1, b2 = g["betas"]
            new_b2 = beta2_power(b2, k) if b2_rule == "power" else min(0.999999, max(0.0, 1.0 - k * (1.0 - b2)))
            g["betas"] = (b1, new_b2)
        if weight_decay_timescale and g.get("weight_decay"):
            # tau = B / (eta lambda D) constant: lambda' = lambda x k / (eta' / eta)
            g["weight_decay"] = timescale_weight_decay(g["weight_decay"], k, lr_factor)
    g0 = optimizer.param_groups[0]
    out = {"lr": float(g0["lr"]), "lr_factor": float(lr_factor)}
    if "betas" in g0:
        out["beta2"] = float(g0["betas"][1])
    if "weight_decay" in g0:
        out["weight_decay"] = float(g0["weight_decay"])
    return out


class ScheduleState:
    """Where a run is in its schedule: the phase of a step, and which steps change the batch."""

    def __init__(self, phases: Sequence[Phase], micro_limit: int | None = None) -> None:
        self.phases = list(phases)
        self.micro_limit = micro_limit

    def phase_at(self, step: int) -> Phase:
        current = self.phases[0]
        for p in self.phases:
            if p.step <= step:
                current = p
        return current

    def change_at(self, step: int) -> tuple[Phase, Phase] | None:
        """(old, new) when step ``step`` starts a new phase (never at step 0)."""
        for i, p in enumerate(self.phases[1:], start=1):
            if p.step == step:
                return self.phases[i - 1], p
        return None

    def samples_through(self, steps: int) -> int:
        """Samples consumed by the first ``steps`` optimizer steps."""
        total = 0
        for i, p in enumerate(self.phases):
            end = self.phases[i + 1].step if i + 1 < len(self.phases) else math.inf
            n = max(0, min(steps, end) - p.step)
            total += int(n) * p.batch_size
        return total


def derive_schedule(points: Sequence[Any], *, base_batch_size: int, total_samples: int,
                    max_batch_size: int | None = None, bound: str = "estimate") -> list[Phase]:
    """A batch-size warm-up following the measured local critical batch.

    ``points`` are branching checkpoints with ``samples`` (training samples seen) and ``local_critical_batch``
    (:class:`batchfit.branching.BranchPoint`). From each checkpoint on, the batch is the largest
    ``base_batch_size x 2^j`` not above the critical batch measured there (never decreasing, at most
    ``max_batch_size``); change points are converted from samples to optimizer steps under the schedule itself.
    ``bound="low"`` follows the lower end of each point's supported range instead (the largest batch efficient
    beyond the noise): a more cautious warm-up.
    """
    b0 = checks.positive_int("base_batch_size", base_batch_size)
    checks.positive_int("total_samples", total_samples)
    cap = max_batch_size or math.inf
    checks.one_of("bound", bound, ("estimate", "low"))
    marks: list[tuple[int, int]] = []
    current = b0
    for p in sorted(points, key=lambda q: q.samples):
        lcb = p.local_critical_batch if bound == "estimate" else p.supported_range[0]
        if lcb is None:
            continue
        b = b0
        while b * 2 <= min(lcb, cap):
            b *= 2
        current = max(current, b)
        if current != (marks[-1][1] if marks else b0):
            marks.append((int(p.samples), current))
    phases = [Phase(0, b0)]
    step, samples, batch = 0, 0, b0
    for at_samples, new_batch in marks:
        if at_samples >= total_samples:
            break
        more = math.ceil(max(0, at_samples - samples) / batch)
        step += more
        samples += more * batch
        if step == phases[-1].step:
            phases[-1] = Phase(step, new_batch)
        else:
            phases.append(Phase(step, new_batch))
        batch = new_batch
    return parse_schedule(phases)
