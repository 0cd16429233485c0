"""Does a batch-size warm-up derived from the measured critical batch beat the best fixed batch? (issue 14.3)

:func:`compare` measures the local critical batch by branching (:func:`batchfit.branching.local_critical_batch`),
derives a warm-up that follows it (:func:`batchfit.schedule.derive_schedule`; batches above the memory limit run as
micro-batches x accumulation), then trains, on the **same sample budget** and the **same seeds** (>= 3 for an
interval):

- the derived schedule,
- every fixed batch ``B0 x 2^j`` with the rule-scaled LR (optionally the best one's LR retuned by ``lr_factors``),
- optionally the best fixed batch with a cosine LR decay (the usual LR-decay baseline).

The **best fixed batch** is the one with the best final quality; among those tied with it within the intervals,
the one with the fewest optimizer steps to the target (:func:`batchfit.stats.choose`). The **target** is the
quality every seed of the best fixed batch reached at its end (its worst seed), relaxed by ``target_tolerance``;
each run's steps, samples and training seconds to the target are read from its evaluation history. The schedule
is **recommended only when it wins beyond the noise**: its final quality is tied with (or better than) the best
fixed batch's, and the paired (same seed) share of optimizer steps it saves to the target has a confidence
interval above zero. Merrill et al. 2025 report 43 % fewer steps on a 1B language model this way; the answer here
is whatever the measurement says, including "no".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from batchfit import checks
from batchfit.errors import ConfigError
from batchfit.loading import load_workload
from batchfit.metric import Metric
from batchfit.progress import ProgressFn, emit
from batchfit.schedule import Phase, ScheduleState, derive_schedule
from batchfit.stats import Interval, choose, mean_interval
from batchfit.workload import Workload

__all__ = ["PLOT_NAME", "PLOT_TITLE", "Arm", "ScheduleCheck", "compare", "cosine_schedule", "plot", "report_lines",
           "report_tables", "tune_stage"]


@dataclass
class Arm:
    """One way of training (the schedule, a fixed batch, a fixed batch with an LR decay), over the seeds."""

    name: str
    kind: str  # "schedule" | "fixed" | "fixed-lr" | "cosine"
    batch_size: int
    lr: float | None
    runs: list[dict[str, Any]] = field(default_factory=list)  # per seed: final, steps, to_target
    phases: list[dict[str, int]] | None = None

    def final(self) -> Interval:
        return _interval([r["final"] for r in self.runs])

    def to_target(self, key: str) -> Interval:
        """Steps / samples / seconds to the target over the seeds (a run that never reached it counts as inf)."""
        return _interval([r["to_target"][key] if r["to_target"] else math.inf for r in self.runs])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "batch_size": self.batch_size, "lr": self.lr,
                "phases": self.phases, "runs": self.runs, "final": self.final().to_dict(),
                "steps_to_target": self.to_target("steps").to_dict(),
                "samples_to_target": self.to_target("samples").to_dict(),
                "seconds_to_target": self.to_target("seconds").to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Arm:
        return cls(d["name"], d["kind"], int(d["batch_size"]), d.get("lr"), list(d["runs"]), d.get("phases"))


@dataclass
class ScheduleCheck:
    """The comparison and its decision (``to_dict`` is what tune stores and the report reads)."""

    workload: str
    metric: Metric
    budget_samples: int
    seeds: list[int]
    target: float | None
    branching: dict[str, Any]
    schedule: list[dict[str, int]]
    arms: list[Arm]
    best_fixed: str
    recommended: bool
    reason: str
    steps_saved: Interval | None  # paired share of optimizer steps saved to the target (schedule vs best fixed)
    seconds_saved: Interval | None
    branching_cost_share: float | None  # branching seconds / the reference run's (B0, first seed) seconds

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "metric": self.metric.to_dict(), "budget_samples": self.budget_samples,
                "seeds": self.seeds, "target": self.target, "branching": self.branching, "schedule": self.schedule,
                "arms": [a.to_dict() for a in self.arms], "best_fixed": self.best_fixed,
                "recommended": self.recommended, "reason": self.reason,
                "steps_saved": None if self.steps_saved is None else self.steps_saved.to_dict(),
                "seconds_saved": None if self.seconds_saved is None else self.seconds_saved.to_dict(),
                "branching_cost_share": self.branching_cost_share}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScheduleCheck:
        iv = lambda x: None if x is None else Interval.from_dict(x)  # noqa: E731
        return cls(d["workload"], Metric.from_dict(d["metric"]), int(d["budget_samples"]), list(d["seeds"]),
                   d.get("target"), d["branching"], list(d["schedule"]), [Arm.from_dict(a) for a in d["arms"]],
                   d["best_fixed"], bool(d["recommended"]), d["reason"], iv(d.get("steps_saved")),
                   iv(d.get("seconds_saved")), d.get("branching_cost_share"))


def _interval(values: Sequence[float]) -> Interval:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < len(values):  # a run that never got there: the mean is unbounded
        return Interval(math.inf, None, None, n=len(values))
    return mean_interval(finite)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """Cosine decay to zero over the run (Loshchilov & Hutter 2017), the LR-decay baseline at a fixed batch."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def _to_target(history: list[dict[str, Any]], metric: Metric, target: float) -> dict[str, float] | None:
    for rec in history:
        if metric.reaches(metric.of_record(rec), target):
            return {"steps": rec["step"], "samples": rec["samples"], "seconds": rec.get("train_seconds") or 0.0}
    return None


def _run(workload: Workload, metric: Metric, arm: Arm, seed: int, budget: int, eval_points: int,
         common: dict[str, Any]) -> Any:
    from batchfit.engine import train

    limit = common.get("micro_batch_limit")
    kw: dict[str, Any] = {"epochs": common["epochs"], "device": common["device"]}
    if arm.phases is not None:  # the memory limit caps the micro-batch; accumulation makes up each phase
        phases = [Phase(p["step"], p["batch_size"]) for p in arm.phases]
        kw.update(batch_schedule=phases, micro_batch_limit=limit)
        n_steps = phases[-1].step + max(1, (budget - ScheduleState(phases).samples_through(phases[-1].step))
                                        // phases[-1].batch_size)
    else:
        kw.update(batch_size=arm.batch_size, micro_batch_size=None if limit is None else min(arm.batch_size, limit))
        n_steps = max(1, budget // arm.batch_size)
    wl = dataclasses.replace(workload, lr_schedule=cosine_schedule) if arm.kind == "cosine" else workload
    r = train(wl, seed=seed, lr=arm.lr, eval_every=max(1, n_steps // eval_points), **kw)
    arm.runs.append({"seed": seed, "final": metric.of_record(r.history[-1]) if r.history else None,
                     "steps": r.steps, "samples": r.samples, "seconds": r.train_seconds, "diverged": r.diverged,
                     "history": [{k: rec.get(k) for k in ("step", "samples", "train_seconds", "train_loss",
                                                          "val_loss", "val_metrics")} for rec in r.history],
                     "to_target": None})
    return r


def compare(
    workload: Workload | str,
    *,
    batch_size: int | None = None,
    epochs: int = 1,
    seeds: Sequence[int] = (0, 1, 2),
    factors: Sequence[int] = (1, 2, 4, 8, 16, 32),
    lr_factors: Sequence[float] = (),
    cosine: bool = False,
    branching: Any = None,
    branching_kwargs: dict[str, Any] | None = None,
    micro_batch_limit: int | None = None,
    max_batch_size: int | None = None,
    target_tolerance: float = 0.01,
    bound: str = "estimate",
    eval_points: int = 20,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> ScheduleCheck:
    """Train the derived schedule and the fixed batches on the same budget and seeds; decide (module docstring).

    Args:
        batch_size: ``B0``, the smallest batch (the schedule's start and the branching reference).
        epochs: the sample budget of every arm (epochs x training samples).
        factors: fixed batches ``B0 x factor`` (capped by ``max_batch_size`` and the training set).
        lr_factors: also train the best fixed batch at its LR x each factor (its LR retuned), e.g. (0.5, 2).
        cosine: also train the best fixed batch with a cosine LR decay.
        branching: a measurement to reuse (:class:`batchfit.branching.BranchingResult`); measured when ``None``
            (``branching_kwargs`` go to :func:`~batchfit.branching.local_critical_batch`).
        micro_batch_limit: the largest micro-batch that fits (the finder's); larger batches accumulate.
        target_tolerance: the target is the best fixed batch's final quality relaxed by this share.
        bound: ``estimate`` follows the measured critical batch, ``low`` the lower end of its supported range.
    """
    from batchfit.branching import BranchingResult, local_critical_batch
    from batchfit.engine import plan_train

    workload = load_workload(workload)
    seeds = [checks.seed(s) for s in seeds]
    if not seeds:
        raise ConfigError("seeds is empty; give at least one (three for intervals)")
    checks.positive_int("epochs", epochs)
    checks.fraction("target_tolerance", target_tolerance)
    plan = plan_train(workload, batch_size=batch_size, epochs=epochs, device=device)
    b0, n = plan.batch_size_per_rank, plan.num_samples
    cap = min(n, max_batch_size or n)
    budget = epochs * n
    metric = Metric.for_workload(workload)
    if branching is None:
        bkw = {"factors": [f for f in (1, 2, 4, 8, 16, 32) if b0 * f <= cap],
               "checkpoints": (0.0, 0.1, 0.25, 0.5), "reference_steps": plan.total_steps,
               "finish_reference": False, **(branching_kwargs or {})}
        emit(progress, "schedule_check", "start", f"branching at batch {b0}")
        branching = local_critical_batch(workload, batch_size=b0, device=device, seed=seeds[0], **bkw)
    elif isinstance(branching, dict):
        branching = BranchingResult.from_dict(branching)
    phases = derive_schedule(branching.points, base_batch_size=b0, total_samples=budget, max_batch_size=cap,
                             bound=bound)
    common = {"epochs": epochs, "device": device, "micro_batch_limit": micro_batch_limit}
    sched = Arm("schedule", "schedule", phases[0].batch_size, None, phases=[p.to_dict() for p in phases])
    fixed = [Arm(f"fixed {b0 * f}", "fixed", b0 * f, None) for f in sorted(set(factors)) if b0 * f <= cap]
    total = len(seeds) * (1 + len(fixed) + len(lr_factors) + int(cosine))
    done = 0
    for arm in [sched, *fixed]:
        for s in seeds:
            _run(workload, metric, arm, s, budget, eval_points, common)
            done += 1
            emit(progress, "schedule_check", "update", f"{arm.name} seed {s}", completed=done, total=total)
    best, _ = _best_fixed(fixed, metric, target_tolerance)
    extra: list[Arm] = []
    peak = _peak_lr(workload, best.batch_size, device)
    for f in lr_factors:
        extra.append(Arm(f"{best.name} lr x{f:g}", "fixed-lr", best.batch_size, peak * f))
    if cosine:
        extra.append(Arm(f"{best.name} cosine", "cosine", best.batch_size, None))
    for arm in extra:
        for s in seeds:
            _run(workload, metric, arm, s, budget, eval_points, common)
            done += 1
            emit(progress, "schedule_check", "update", f"{arm.name} seed {s}", completed=done, total=total)
    best, target = _best_fixed([*fixed, *(a for a in extra if a.kind == "fixed-lr")], metric, target_tolerance)
    return _decide(workload.name, metric, budget, seeds, branching, phases, sched, [*fixed, *extra], best,
                   target_tolerance, fixed[0] if fixed else None, target=target)


def _peak_lr(workload: Workload, batch: int, device: Any) -> float:
    from batchfit.engine import plan_train
    from batchfit.scaling import apply_scaling, default_rule
    from batchfit.step import build_model, build_optimizer

    plan = plan_train(workload, batch_size=batch, steps=1, device=device)
    opt = build_optimizer(workload, build_model(workload))
    rule = default_rule(opt) if plan.lr_rule == "auto" else plan.lr_rule
    apply_scaling(opt, workload.base_lr, workload.base_batch_size, batch, rule)
    return float(opt.param_groups[0]["lr"])


def _target(metric: Metric, value: float, tol: float) -> float:
    return value - tol * abs(value) if metric.higher_is_better else value + tol * abs(value)


def _target_of(arm: Arm, metric: Metric, tol: float) -> float | None:
    """The quality every seed of ``arm`` reached at its end (its worst seed's final), relaxed by ``tol``."""
    finals = [r["final"] for r in arm.runs]
    if not finals or any(v is None for v in finals):
        return None
    worst = min(finals) if metric.higher_is_better else max(finals)
    return _target(metric, worst, tol)


def _mark_targets(arms: Sequence[Arm], metric: Metric, target: float) -> None:
    for a in arms:
        for r in a.runs:
            r["to_target"] = _to_target(r["history"], metric, target)


def _best_fixed(fixed: Sequence[Arm], metric: Metric, tol: float) -> tuple[Arm, float | None]:
    """Best final quality; among those tied with it, the fewest steps to the target (then the smaller batch).

    Returns the arm and the target: the worst seed's final quality of the best-quality arm, relaxed by ``tol``."""
    quality = {a.name: a.final() for a in fixed if all(r["final"] is not None for r in a.runs)}
    if not quality:
        return fixed[0], None
    top = max(quality, key=lambda k: quality[k].estimate if metric.higher_is_better else -quality[k].estimate)
    target = _target_of(next(a for a in fixed if a.name == top), metric, tol)
    if target is not None:
        _mark_targets(fixed, metric, target)
    cost = {a.name: a.to_target("steps") for a in fixed if a.name in quality}
    pick = choose(quality, cost, higher_is_better=metric.higher_is_better)
    return next(a for a in fixed if a.name == pick.chosen), target


def _decide(name: str, metric: Metric, budget: int, seeds: list[int], branching: Any, phases: list[Phase],
            sched: Arm, others: list[Arm], best: Arm, tol: float, reference: Arm | None,
            target: float | None = None) -> ScheduleCheck:
    arms = [sched, *others]
    best_final = best.final()
    target = target if target is not None else _target_of(best, metric, tol)
    if target is not None:
        _mark_targets(arms, metric, target)
    sq = sched.final() if all(r["final"] is not None for r in sched.runs) else Interval(math.nan, None, None)
    quality_ok = math.isfinite(sq.estimate) and (sq.overlaps(best_final) or metric.better(sq.estimate,
                                                                                          best_final.estimate))
    saved = seconds = None
    pairs = [(a, b) for a, b in zip(sched.runs, best.runs) if a["to_target"] and b["to_target"]]
    if pairs and len(pairs) == len(seeds):
        saved = mean_interval([1 - a["to_target"]["steps"] / b["to_target"]["steps"] for a, b in pairs])
        secs = [(a["to_target"]["seconds"], b["to_target"]["seconds"]) for a, b in pairs]
        if all(b > 0 for _, b in secs):
            seconds = mean_interval([1 - a / b for a, b in secs])
    beyond = saved is not None and saved.known and saved.low > 0  # type: ignore[operator]
    recommended = quality_ok and beyond
    q = f"final {metric.name} {sq.estimate:.4g} vs {best_final.estimate:.4g} ({best.name})"
    if not quality_ok:
        reason = f"not recommended: the schedule's {q} is worse beyond the noise"
    elif saved is None:
        reason = (f"not recommended: the schedule did not reach the target {target} in every seed" if target
                  is not None else "not recommended: no target (the fixed batches have no final quality)")
    elif saved.known and saved.high < 0:  # type: ignore[operator]
        reason = (f"not recommended: {-saved.estimate:.0%} more optimizer steps to the target than {best.name}, "
                  f"beyond the noise ({saved}); {q}")
    elif not beyond:
        reason = (f"not recommended: the share of steps saved to the target, {saved.estimate:.0%} ({saved}), is "
                  f"inside the noise; {q}")
    else:
        reason = (f"recommended: {saved.estimate:.0%} fewer optimizer steps to the target ({saved}) at equal "
                  f"quality; {q}")
    cost = None
    if reference is not None and reference.runs and reference.runs[0]["seconds"]:
        cost = (branching.branch_seconds + branching.noise_seconds) / reference.runs[0]["seconds"]
    return ScheduleCheck(name, metric, budget, seeds, target, branching.to_dict(), [p.to_dict() for p in phases],
                         arms, best.name, recommended, reason, saved, seconds, cost)


# ---------------------------------------------------------------------------------------------------------------
# The report's section (issue 14.4): batchfit.report calls these when results carry "batch_schedule_check"

PLOT_NAME = "critical_batch_over_training"
PLOT_TITLE = "The local critical batch and B_simple over training"


def _iv(d: Any) -> str:
    if not d:
        return "-"
    est, lo, hi = d.get("estimate"), d.get("low"), d.get("high")
    if est is None or not math.isfinite(est):
        return "not reached" if est == math.inf else "-"
    if lo is None or hi is None:
        return f"{est:.4g}"
    return f"{est:.4g} [{lo:.4g}, {hi:.4g}]"


def report_tables(check: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the section: the critical batch over training, the schedule, the arms."""
    points = (check.get("branching") or {}).get("points") or []
    crit = [[str(p["step"]), str(p["samples"]), str(p.get("local_critical_batch") or "-"),
             "{} .. {}".format(*[x if x is not None else "-" for x in (p.get("supported_range") or (None, None))]),
             _iv(p.get("b_simple"))] for p in points]
    sched = [[str(p["step"]), str(p["batch_size"])] for p in check.get("schedule") or []]
    arms = [[a["name"], _iv(a["final"]), _iv(a["steps_to_target"]), _iv(a["samples_to_target"]),
             _iv(a["seconds_to_target"])] for a in check.get("arms") or []]
    metric = (check.get("metric") or {}).get("name", "metric")
    return [("The local critical batch over training (branching) and B_simple beside it",
             ["step", "samples", "local critical batch", "supported range", "B_simple [95 % interval]"], crit),
            ("The derived schedule", ["from step", "batch"], sched),
            (f"Schedule vs fixed batches (same samples, seeds {check.get('seeds')}; target {metric} "
             f"{check.get('target') if check.get('target') is None else format(check['target'], '.4g')})",
             ["arm", f"final {metric}", "steps to target", "samples to target", "seconds to target"], arms)]


def report_lines(check: dict[str, Any]) -> list[str]:
    """The decision and its cost, one sentence each."""
    lines = [check.get("reason", "")]
    if check.get("branching_cost_share") is not None:
        lines.append(f"Branching measurement cost: {check['branching_cost_share']:.0%} of the reference run "
                     f"(batch {(check.get('branching') or {}).get('base_batch_size')}, first seed).")
    if check.get("seconds_saved"):
        lines.append(f"Training time saved to the target: {_iv(check['seconds_saved'])} (share, paired by seed).")
    return lines


def plot(check: dict[str, Any], out_dir: Any) -> dict[str, Any]:
    """The local critical batch (supported range as error bars) and B_simple (95 % interval) against samples."""
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = (check.get("branching") or {}).get("points") or []
    if not points:
        return {}
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [max(1, p["samples"]) for p in points]
    lcb = [p.get("local_critical_batch") or math.nan for p in points]
    lo = [max(0.0, c - (p["supported_range"][0] or c)) for c, p in zip(lcb, points)]
    hi = [max(0.0, (p["supported_range"][1] or c) - c) for c, p in zip(lcb, points)]
    ax.errorbar(xs, lcb, yerr=[lo, hi], fmt="o-", capsize=4, label="local critical batch (supported range)")
    bs = [(p.get("b_simple") or {}) for p in points]
    est = [b.get("estimate") if b.get("estimate") not in (None, math.inf) else math.nan for b in bs]
    blo = [max(0.0, e - b["low"]) if b.get("low") is not None and math.isfinite(e) else 0.0 for e, b in zip(est, bs)]
    bhi = [max(0.0, b["high"] - e) if b.get("high") not in (None, math.inf) and math.isfinite(e) else 0.0
           for e, b in zip(est, bs)]
    ax.errorbar(xs, est, yerr=[blo, bhi], fmt="s--", capsize=4, label="B_simple (95 % interval)")
    steps = check.get("schedule") or []
    if steps:
        b0 = (check.get("branching") or {}).get("base_batch_size") or 1
        sched_x, sched_y, samples, last = [], [], 0, 0
        for i, p in enumerate(steps):
            samples += (p["step"] - last) * (steps[i - 1]["batch_size"] if i else b0)
            last = p["step"]
            sched_x.append(max(1, samples))
            sched_y.append(p["batch_size"])
        sched_x.append(max(sched_x[-1] + 1, check.get("budget_samples") or sched_x[-1] + 1))
        sched_y.append(sched_y[-1])
        ax.step(sched_x, sched_y, where="post", color="k", alpha=0.6, label="derived schedule")
    ax.set_xscale("symlog")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("batch size")
    ax.set_title(PLOT_TITLE)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / f"{PLOT_NAME}.png"
    fig.savefig(path, format="png")
    return {PLOT_NAME: path}


def tune_stage(workload: Workload, run: Any, *, budget: Any, micro_batch_limit: int | None, seeds: int | None,
               seed: int = 0, device: Any = "cpu") -> dict[str, Any]:
    """``tune --batch-schedule-check``: :func:`compare` on tune's budget (whole epochs, at least 1), from the
    workload's base batch, the finder's micro-batch limit, and ``max(3, seeds)`` seeds; written to
    ``batch_schedule_check.json`` as soon as it is done."""
    from batchfit._io import write_json

    n = workload.num_train
    kind, value = getattr(budget, "kind", "epochs"), float(getattr(budget, "value", 1))
    samples = value * n if kind == "epochs" else (value if kind == "samples" else value * workload.base_batch_size)
    epochs = max(1, round(samples / n))
    seed_list = [seed + i for i in range(max(3, seeds or 0))]
    run.emit("batch_schedule_check", "start", f"derived batch warm-up vs fixed batches: {epochs} epoch(s), "
                                              f"{len(seed_list)} seeds")

    def forward(event: Any) -> None:
        if event.kind == "update":
            run.emit("batch_schedule_check", "update", event.message, completed=event.completed, total=event.total)

    check = compare(workload, epochs=epochs, seeds=seed_list, micro_batch_limit=micro_batch_limit, device=device,
                    progress=forward)
    data = check.to_dict()
    write_json(run.out / "batch_schedule_check.json", data)
    run.emit("batch_schedule_check", "end", check.reason, result=data)
    return data
