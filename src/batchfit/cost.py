"""What a measurement costs, in the unit the user pays in: runs of their own training.

A user who will train for a *train budget* (``samples:N``, ``steps:S``, ``epochs:E`` or ``tokens:T``;
:func:`train_budget_samples`) pays ``runs = samples spent / samples of one run at the train budget`` for batchfit's
answer. Every sample a training step forwards and backwards through the user's model (:class:`batchfit.step.
TrainStep`, the one step every stage runs) is counted here; evaluation passes are not (they are forward only, and
their time is in ``seconds``). :func:`measure` takes the count and the wall clock of a block of work, so each stage
of ``tune`` records what it spent beside its result, and a resumed ``tune`` adds up the stored costs instead of
recounting.

The cost cap ``max_cost`` (in runs) is what ``tune`` may spend; :class:`Cost` says whether the spending stayed
within it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from batchfit._io import split_fields
from batchfit.errors import ConfigError

__all__ = ["DEFAULT_MAX_COST", "STAGE_SHARES", "Cost", "Meter", "TrainBudget", "TrainBudgetPlan", "add_samples",
           "allowance", "cost_of", "measure", "parse_train_budget", "plan_horizon", "train_budget_samples"]

TRAIN_BUDGET_KINDS = ("samples", "steps", "epochs", "tokens")

_COUNT = [0]  # samples forwarded and backwarded by TrainStep in this process


def add_samples(n: int) -> None:
    """Called by :class:`batchfit.step.TrainStep` for every batch it trains on."""
    _COUNT[0] += int(n)


@dataclass
class Meter:
    """The samples trained and the wall-clock seconds of a block of work (:func:`measure`)."""

    samples: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"samples": int(self.samples), "seconds": float(self.seconds)}


@contextlib.contextmanager
def measure() -> Iterator[Meter]:
    """``with measure() as m: ...`` -> ``m.samples`` trained and ``m.seconds`` elapsed inside the block (also when it
    raises: an interrupted stage still reports what it spent)."""
    meter = Meter()
    start, t0 = _COUNT[0], time.perf_counter()
    try:
        yield meter
    finally:
        meter.samples = _COUNT[0] - start
        meter.seconds = time.perf_counter() - t0


@dataclass(frozen=True)
class TrainBudget:
    """What the user will train: ``kind`` in :data:`TRAIN_BUDGET_KINDS` and its value."""

    kind: str
    value: float

    def __str__(self) -> str:
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{self.kind}:{v}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": int(self.value) if float(self.value).is_integer() else self.value}


@dataclass(frozen=True)
class TrainBudgetPlan:
    """tune's plan (results.json's ``"train_budget"``): the train budget ``budget`` (``epochs:20``) and its
    ``samples`` (one run), the cap ``max_cost`` (runs; ``None``: uncapped) and ``cap_samples``, the per-trial
    ``measurement`` budget and its ``measurement_samples``, what a trial costs with its B_simple passes
    (``trial_cost_samples``), the candidates ``dropped`` to keep the cap, and the ``note`` that says so.

    Every field defaults to ``None``: an older results.json that lacks a key reads it as no value. ``from_dict``
    keeps values as they were written; other keys go to ``extras`` and come back from ``to_dict``."""

    budget: str | None = None
    samples: int | None = None
    max_cost: float | None = None
    measurement: str | None = None
    measurement_samples: int | None = None
    trial_cost_samples: int | None = None
    dropped: list[int] | None = None
    note: str | None = None
    cap_samples: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "extras"}
        d.update(copy.deepcopy(self.extras))
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainBudgetPlan:
        known, extras = split_fields(cls, data, deep=True)
        return cls(**known, extras=extras)


def parse_train_budget(text: str | TrainBudget, *, name: str = "train_budget") -> TrainBudget:
    """``samples:N``, ``steps:S`` (at the workload's base batch), ``epochs:E`` or ``tokens:T``."""
    if isinstance(text, TrainBudget):
        return text
    from batchfit import checks

    kind, value = checks.kind_value(name, text, TRAIN_BUDGET_KINDS,
                                    "epochs:20, samples:100000, steps:5000 or tokens:1e9")
    return TrainBudget(kind, value)


def train_budget_samples(budget: TrainBudget, *, num_train: int, base_batch_size: int,
                         tokens_per_sample: int | None = None) -> int:
    """Samples of one run at the train budget: ``epochs x`` the training set, ``steps x`` the base batch (the batch
    the user's steps are counted at), ``tokens /`` the workload's tokens per sample."""
    if budget.kind == "samples":
        n = budget.value
    elif budget.kind == "epochs":
        n = budget.value * num_train
    elif budget.kind == "steps":
        n = budget.value * base_batch_size
    else:
        if not tokens_per_sample:
            raise ConfigError(f"train budget {budget}: this workload does not say how many tokens a sample holds "
                              "(set Workload.tokens_per_sample), so give the budget as samples:N or epochs:E")
        n = budget.value / tokens_per_sample
    return max(1, int(round(n)))


@dataclass
class Cost:
    """What an answer cost: ``samples`` trained and ``seconds`` elapsed in the stages' measuring runs (training and
    their evaluations; tune's start-up, fits and report are ``tune_seconds`` beside it), by stage, against one run
    at the train budget (``runs = samples / train_budget_samples``) and the cap ``max_cost`` (in runs; ``None``:
    uncapped)."""

    samples: int
    seconds: float
    train_budget_samples: int | None
    by_stage: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_cost: float | None = None
    train_budget: str | None = None

    @property
    def runs(self) -> float | None:
        return self.samples / self.train_budget_samples if self.train_budget_samples else None

    @property
    def within_cap(self) -> bool | None:
        return None if self.max_cost is None or self.runs is None else self.runs <= self.max_cost * (1 + 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": int(self.samples), "seconds": float(self.seconds),
                "train_budget_samples": self.train_budget_samples, "runs": self.runs,
                "train_budget": self.train_budget, "max_cost": self.max_cost, "within_cap": self.within_cap,
                "by_stage": {k: dict(v) for k, v in self.by_stage.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cost:
        return cls(int(data.get("samples") or 0), float(data.get("seconds") or 0.0),
                   data.get("train_budget_samples"), dict(data.get("by_stage") or {}), data.get("max_cost"),
                   data.get("train_budget"))

    def line(self) -> str:
        """``cost 0.84 runs (24,120 samples, 31 s training) of the train budget epochs:20`` for the ``-q`` line and
        report: ``seconds`` are the stages' measuring runs, not tune's wall time (start-up, fits, the report)."""
        runs = "" if self.runs is None else f"{self.runs:.2f} runs "
        cap = "" if self.max_cost is None else f", cap {self.max_cost:g}"
        of = f" of the train budget {self.train_budget}" if self.train_budget else ""
        return f"cost {runs}({self.samples:,} samples, {self.seconds:.0f} s training){of}{cap}"


def _stage(data: Any) -> dict[str, Any] | None:
    c = data.get("cost") if isinstance(data, Mapping) else None
    if isinstance(c, Mapping) and isinstance(c.get("samples"), (int, float)):
        return {"samples": int(c["samples"]), "seconds": float(c.get("seconds") or 0.0)}
    return None


def cost_of(results: Mapping[str, Any]) -> Cost:
    """The cost of everything in ``results`` (tune's results dict, or a sweep's): each stage's recorded ``cost``,
    the LR check's runs and every sweep trial's samples and seconds, against the stored train budget."""
    by: dict[str, dict[str, Any]] = {}
    for key, name in (("find", "find"), ("noise", "noise"), ("step_time", "step_time"),
                      ("precision_check", "precision"), ("batch_schedule_check", "batch_schedule_check")):
        c = _stage(results.get(key))
        if c is not None:
            by[name] = c
    lr = results.get("lr_calibration")
    if isinstance(lr, Mapping) and isinstance(lr.get("runs"), list):
        runs = [r for r in lr["runs"] if isinstance(r, Mapping)]
        by["lr_check"] = {"samples": int(sum(r.get("samples") or 0 for r in runs)),
                          "seconds": float(sum(r.get("seconds") or 0.0 for r in runs))}
    trials = [t for t in results.get("trials") or [] if isinstance(t, Mapping)]
    if trials:
        by["sweep"] = {"samples": int(sum((t.get("samples") or 0) + (t.get("noise_samples") or 0) for t in trials
                                          if isinstance(t.get("samples"), (int, float)))),
                       "seconds": float(sum(t.get("seconds") or 0.0 for t in trials
                                            if isinstance(t.get("seconds"), (int, float)))),
                       "trials": len(trials)}
    plan = results.get("train_budget") if isinstance(results.get("train_budget"), Mapping) else {}
    return Cost(samples=sum(v["samples"] for v in by.values()), seconds=sum(v["seconds"] for v in by.values()),
                train_budget_samples=plan.get("samples"), by_stage=by, max_cost=plan.get("max_cost"),
                train_budget=plan.get("budget"))


DEFAULT_MAX_COST = 1.0  # tune's default cap, in runs of the train budget (when it plans its own measurement budget)

# The share of the cap each stage after the finder may spend (the sweep and its racing get the rest). The finder's
# memory probes are not sized (their count depends on the memory line); what they spend comes off the sweep's share.
# The LR check's share pays for a second, longer rung (tuning._calibrate_lr): on demo:mnist1d an untuned base LR
# cost 9-37 % of the final accuracy, more than any batch size among the near-best did (docs/benchmarks.md).
STAGE_SHARES: dict[str, float] = {"noise": 0.03, "lr_check": 0.30, "step_time": 0.06, "precision": 0.04}


def allowance(stage: str, train_samples: int, max_cost: float | None) -> int | None:
    """The samples ``stage`` may spend under the cap (:data:`STAGE_SHARES`); ``None`` when uncapped."""
    if max_cost is None:
        return None
    return int(STAGE_SHARES[stage] * max_cost * train_samples)


def plan_horizon(train_samples: int, max_cost: float, candidates: int, *, spent: int = 0, finalist_seeds: int = 3,
                 first_round: int | None = None, reserve: float | None = None,
                 overhead: float = 0.0) -> tuple[int, float]:
    """The samples each sweep trial may train (equal samples at every batch size) so that ``tune`` stays within
    ``max_cost`` runs of ``train_samples``, and the trials that estimate assumes.

    ``spent``: samples already spent (the finder and the noise probe run before the plan). Expected trials: the
    first round (``first_round``, default one per candidate; more where a batch size searches its LR), then
    racing's ``finalist_seeds - 1`` more for each of the two finalists and one more for a quarter of the candidates
    (the faster undecided), each at the first round's trials per candidate. ``reserve`` (default: the LR check's,
    step timing's and the precision check's :data:`STAGE_SHARES`) of the cap is kept for the stages that run after
    the plan. ``overhead``: a trial's samples beyond its horizon, as a fraction of it (the sweep's B_simple
    measurement, :data:`batchfit.noise.HALVES_EVERY`). Never more than the train budget itself; at least 1 (the
    caller checks whether that horizon can measure anything)."""
    first = candidates if first_round is None else max(candidates, first_round)
    per = first / max(candidates, 1)
    runs = first + per * (2 * (finalist_seeds - 1) + math.ceil(candidates / 4))
    if reserve is None:
        reserve = sum(STAGE_SHARES[k] for k in ("lr_check", "step_time", "precision"))
    room = (1.0 - reserve) * max_cost * train_samples - spent
    return max(1, int(min(train_samples, room / (runs * (1.0 + overhead))))), float(runs)
