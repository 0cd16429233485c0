"""``tune``: the main job, as one recipe — find -> noise -> LR check -> sweep -> precision check -> report.

Every stage writes its result into ``out_dir`` as soon as it finishes (``find.json``, ``noise.json``, ``lr.json``,
the sweep's Optuna store ``batchfit.db``, ``precision.json``, then ``results.json``, the plots, ``report.md`` and
``report.html``), so nothing computed is lost; re-running the same call resumes: finished stages whose settings
did not change are read back, and the sweep resumes from its store (finished trials are not re-run).

The capabilities underneath (finder, noise, sweep, recommend, report) do not know about this module.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from batchfit.errors import BatchfitError, ConfigError, NoisyEstimateWarning

if TYPE_CHECKING:  # the CLI imports this module to build its parser: keep torch out of that path
    from batchfit.workload import Workload

# Defaults sized so that `batchfit tune` on demo:digits-mlp (1,437 training samples) finishes in about 3 minutes
# on 2 CPU cores: 8 batch sizes from 16 to full batch, 20 epochs each at the rule's LR, a <= 100-step noise probe,
# and 4 evaluations per epoch at the smallest batch (at least one per epoch at every batch).
DEFAULT_BUDGET = "epochs:20"
DEFAULT_NOISE_STEPS = 100
EVALS_PER_EPOCH = 4  # at the smallest batch size: finer steps-to-target at little cost
PRECISION_CHECK_STEPS = 50
LR_CALIBRATION_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
LR_CALIBRATION_EXTEND = 3  # extra x2 steps when the best LR is at an edge of the range
LR_CALIBRATION_BUDGET_DIVISOR = 4  # each check run gets 1/4 of a sweep trial's steps at the base batch
STATE_FILE = "tune_state.json"


class Reporter(Protocol):
    """What ``tune`` tells a progress display; the CLI's rich display implements it (all methods optional)."""

    def stage_start(self, stage: str, message: str, total: int | None = None) -> None: ...
    def stage_update(self, stage: str, completed: int, message: str) -> None: ...
    def stage_end(self, stage: str, message: str) -> None: ...


class _Quiet:
    def stage_start(self, stage: str, message: str, total: int | None = None) -> None:
        pass

    def stage_update(self, stage: str, completed: int, message: str) -> None:
        pass

    def stage_end(self, stage: str, message: str) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# Settings


def default_batch_sizes(num_train: int, max_micro_batch: int | None = None,
                        base_batch_size: int | None = None) -> list[int]:
    """tune's candidates: the sweep's powers of two from 16 (extended past the memory limit by accumulation) and
    the base batch, plus the full batch on small training sets, but not B = 1 (N steps per epoch is too slow for
    a default run). On demo:digits-mlp: 16, 32, ..., 1024 and 1437."""
    from batchfit.study import FULL_BATCH_MAX_N, MAX_ACCUMULATION
    from batchfit.study import default_batch_sizes as sweep_defaults

    sizes = sweep_defaults(num_train, max_micro_batch, base_batch_size, extremes=False)
    upper = num_train if max_micro_batch is None else max_micro_batch * MAX_ACCUMULATION
    if num_train <= FULL_BATCH_MAX_N and num_train <= upper and num_train not in sizes:
        sizes.append(num_train)
    return sorted(sizes)


def _auto_eval_every(num_train: int, smallest_batch: int, budget_kind: str) -> int | None:
    """4 evaluations per epoch at the smallest batch (finer steps-to-target for the batches with the most steps;
    the engine also evaluates at every epoch end); ``None`` (the sweep's ~16 per trial) for step/sample budgets."""
    if budget_kind != "epochs":
        return None
    per_epoch = max(1, num_train // smallest_batch)
    every = per_epoch // EVALS_PER_EPOCH
    return every if 1 <= every < per_epoch else None


# ---------------------------------------------------------------------------------------------------------------
# Resume: a stage's result is reused when the settings it was computed with are unchanged


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cached(out: Path, stage: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
    state = _read_json(out / STATE_FILE) or {}
    if state.get(stage) != json.loads(json.dumps(key)):
        return None
    data = _read_json(out / f"{stage}.json")
    return data if isinstance(data, dict) else None


def _store(out: Path, stage: str, key: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    from batchfit.report import write_json

    write_json(out / f"{stage}.json", data)  # the result first, then the note that it is complete
    state = _read_json(out / STATE_FILE) or {}
    state[stage] = dict(key)
    write_json(out / STATE_FILE, state)


# ---------------------------------------------------------------------------------------------------------------
# Stages


def _find(workload: Workload, out: Path, rep: Any, *, device: str, precision: str, seed: int,
          memory_budget: Any, max_batch_size: int | None, margin: float) -> dict[str, Any]:
    key = {"workload": workload.name, "n": workload.num_train, "device": device, "precision": precision,
           "seed": seed, "memory_budget": memory_budget, "max_batch_size": max_batch_size, "margin": margin}
    cached = _cached(out, "find", key)
    if cached is not None:
        rep.stage_end("find", f"resumed: fits {cached.get('recommended_batch_size')}, knee "
                              f"{cached.get('throughput_knee_batch_size')}")
        return cached
    from batchfit.finder import find_batch_size

    rep.stage_start("find", "largest batch that fits, and the throughput knee")
    result = find_batch_size(workload, device=device, precision=precision, memory_budget=memory_budget,
                             max_batch_size=max_batch_size, margin=margin, throughput=True, seed=seed).to_dict()
    result.setdefault("margin", margin)
    _store(out, "find", key, result)
    rep.stage_end("find", f"fits {result.get('recommended_batch_size')} (with {margin:.0%} margin), throughput "
                          f"knee {result.get('throughput_knee_batch_size')}, {result.get('real_trials')} real trials")
    return result


def _noise(workload: Workload, out: Path, rep: Any, *, device: str, precision: str, seed: int,
           steps: int) -> dict[str, Any]:
    key = {"workload": workload.name, "n": workload.num_train, "device": device, "precision": precision,
           "seed": seed, "steps": steps}
    cached = _cached(out, "noise", key)
    if cached is not None:
        rep.stage_end("noise", f"resumed: B_simple {cached.get('b_simple'):.3g}")
        return cached
    from batchfit.noise import noise_scale

    rep.stage_start("noise", "gradient noise scale B_simple at initialisation", total=steps)

    def on_step(info: dict[str, Any]) -> None:
        b = info.get("b_simple")
        rep.stage_update("noise", int(info.get("step", 0)),
                         f"B_simple {b:.3g}" if isinstance(b, (int, float)) and math.isfinite(b) else "")

    with warnings.catch_warnings(record=True) as caught:  # a wide interval is shown in the display, not as a
        warnings.simplefilter("always", NoisyEstimateWarning)  # Python warning in the middle of the live view
        result = noise_scale(workload, steps=steps, device=device, precision=precision, seed=seed,
                             callbacks=[on_step])
    data = result.to_dict()
    noisy = [str(w.message) for w in caught if issubclass(w.category, NoisyEstimateWarning)]
    if noisy:
        data["warning"] = noisy[-1]
    _store(out, "noise", key, data)
    rep.stage_end("noise", result.reading() + (" (wide interval: an order-of-magnitude guide)" if noisy else ""))
    return data


class _SweepProgress:
    """Turns the sweep's ``progress(event, info)`` calls into display updates, and rewrites results.json and the
    report (without plots, which are slow) after every finished trial, so a partial study is always readable."""

    def __init__(self, rep: Any, out: Path, tolerance: float) -> None:
        self.rep, self.out, self.tolerance = rep, out, tolerance
        self.done = 0

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "start":
            self.done = int(info["total"]) - int(info.get("pending", info["total"]))
            self.rep.stage_start("sweep", f"{len(info.get('batch_sizes') or [])} batch sizes x "
                                          f"{len(info.get('lr_multipliers') or [1])} LR(s), budget "
                                          f"{info['budget']['kind']}:{info['budget']['value']}",
                                 total=int(info["total"]))
            self.rep.stage_update("sweep", self.done, "resumed" if self.done else "")
        elif event == "trial_start":
            self.rep.stage_start("trial", f"batch {info['batch_size']} (micro {info['micro_batch_size']} x "
                                          f"{info['accumulation_steps']}), lr {info.get('lr', 0):.3g}",
                                 total=int(info.get("total_steps") or info.get("steps") or 1))
            self.rep.stage_update("trial", 0, "")
        elif event == "step":
            self.rep.stage_update("trial", int(info["step"]), "")
        elif event == "eval":
            metric = info.get("metric")
            if isinstance(metric, (int, float)):
                self.rep.stage_update("trial", int(info["record"].get("step", 0)), f"val {metric:.4g}")
        elif event == "trial_end":
            self.done += 1
            if info.get("results"):
                from batchfit.report import write_report

                write_report(info["results"], self.out, tolerance=self.tolerance, plots=False)
            best = info.get("best")
            self.rep.stage_update("sweep", self.done, f"batch {info['batch_size']}: {info.get('status')}"
                                  + (f", best {best:.4g}" if isinstance(best, (int, float)) else ""))


def _save_study_attr(storage: str, study_name: str | None, key: str, value: Any) -> None:
    """Keep a tune-only result in the sweep's study too, so ``batchfit report STORE`` has it."""
    if not study_name:
        return
    import optuna

    from batchfit._io import to_jsonable as _jsonable
    from batchfit.study import open_storage

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage, heartbeat=False))
    study.set_user_attr(key, _jsonable(value))


def _calibrate_lr(workload: Workload, out: Path, rep: Any, *, budget: Any, multipliers: Sequence[float],
                  tolerance: float, device: str, precision: str, seed: int) -> dict[str, Any]:
    """Check the workload's base LR at its own base batch: short runs (a quarter of the sweep's budget) at
    ``base_lr x m`` for each multiplier; keep the base LR unless another is better by more than ``tolerance``.

    Every rule scales the LR *from* the base point, so an untuned base LR skews every batch size's result alike;
    Shallue et al. (2019) show that comparisons between batch sizes are only fair with the LR tuned. A quarter of the
    budget keeps this cheap; short runs favour larger LRs (Wu et al. 2018, short-horizon bias), which is why the base LR
    is kept unless clearly beaten.
    """
    from batchfit.engine import train

    batch = min(workload.base_batch_size, workload.num_train)
    steps = max(1, budget.steps_for(batch, workload.num_train) // LR_CALIBRATION_BUDGET_DIVISOR)
    key = {"workload": workload.name, "n": workload.num_train, "base_lr": workload.base_lr, "batch": batch,
           "steps": steps, "multipliers": list(multipliers), "tolerance": tolerance, "device": device,
           "precision": precision, "seed": seed}
    cached = _cached(out, "lr", key)
    if cached is not None:
        rep.stage_end("lr", f"resumed: base LR x{cached['best_multiplier']:g} = {cached['lr']:.3g}")
        return cached
    primary = workload.primary_metric if workload.val_data is not None else "train_loss"
    higher = workload.metric_higher_is_better if workload.val_data is not None else False
    rep.stage_start("lr", f"base LR {workload.base_lr:.3g} at batch {batch}: {len(multipliers)} LRs x {steps} "
                          "steps", total=len(multipliers))
    runs: list[dict[str, Any]] = []

    def run(m: float) -> None:
        lr = workload.base_lr * m
        r = train(workload, batch_size=batch, lr=lr, steps=steps, device=device, precision=precision, seed=seed)
        values = [
            (h.get("val_metrics") or {}).get(primary) if primary not in ("val_loss", "train_loss") else h.get(primary)
            for h in r.history
        ]
        values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        score = None if r.diverged or not values else (max(values) if higher else min(values))
        runs.append({"multiplier": m, "lr": lr, "score": score, "diverged": r.diverged, "seconds": r.seconds,
                     "samples": r.samples})
        rep.stage_update("lr", len(runs), f"x{m:g}: {primary} {score:.4g}" if score is not None
                         else f"x{m:g}: diverged")

    def best_run() -> dict[str, Any] | None:
        scored = [x for x in runs if x["score"] is not None]
        return (max if higher else min)(scored, key=lambda x: x["score"]) if scored else None

    for m in multipliers:
        run(m)
    # the best at an edge of the range: keep going that way (x2 per run, at most LR_CALIBRATION_EXTEND runs)
    for _ in range(LR_CALIBRATION_EXTEND):
        best, tried = best_run(), sorted(x["multiplier"] for x in runs)
        if best is None or best["multiplier"] not in (tried[0], tried[-1]) or len(tried) < 2:
            break
        nxt = best["multiplier"] * (2.0 if best["multiplier"] == tried[-1] else 0.5)
        rep.stage_start("lr", f"best at the edge (x{best['multiplier']:g}): trying x{nxt:g}", total=len(runs) + 1)
        run(nxt)
    scored = [x for x in runs if x["score"] is not None]
    best = best_run()
    base = next((x for x in scored if x["multiplier"] == 1.0), None)
    from batchfit.recommend import within_tolerance

    keep_base = best is None or (base is not None and within_tolerance(base["score"], best["score"], tolerance,
                                                                       higher))
    chosen = base if keep_base and base is not None else best
    mult = chosen["multiplier"] if chosen else 1.0
    data = {"batch_size": batch, "steps": steps, "metric": primary, "base_lr": workload.base_lr, "runs": runs,
            "best_multiplier": mult, "lr": workload.base_lr * mult, "kept_base": mult == 1.0}
    _store(out, "lr", key, data)
    msg = (f"kept the base LR {workload.base_lr:.3g}" if mult == 1.0 else
           f"base LR {workload.base_lr:.3g} -> {workload.base_lr * mult:.3g} (x{mult:g}: {primary} "
           f"{chosen['score']:.4g} vs {base['score'] if base and base['score'] is not None else float('nan'):.4g})")
    rep.stage_end("lr", msg)
    return data


def _precision_check(workload: Workload, out: Path, rep: Any, rec: Mapping[str, Any], *, device: str,
                     precision: str, seed: int, steps: int) -> dict[str, Any]:
    """A short measured run of the recommended configuration in fp32 and in bf16 (same steps, same seed)."""
    from batchfit.engine import check_precision, resolve_device, train

    dev = resolve_device(device)
    if precision == "fp16":
        return {"note": "the sweep ran in fp16; bf16 vs fp32 was not compared"}
    try:
        check_precision("bf16", dev)
    except ConfigError as exc:
        return {"note": f"bf16 is not available here ({exc})"}
    key = {"workload": workload.name, "device": device, "seed": seed, "steps": steps,
           "batch_size": rec["batch_size"], "micro_batch_size": rec["micro_batch_size"], "lr": rec["lr"]}
    cached = _cached(out, "precision", key)
    if cached is not None:
        rep.stage_end("precision", "resumed")
        return cached
    rep.stage_start("precision", f"fp32 vs bf16 at batch {rec['batch_size']} for {steps} steps", total=2)
    check: dict[str, Any] = {"steps": steps, "batch_size": rec["batch_size"],
                             "micro_batch_size": rec["micro_batch_size"]}
    for i, p in enumerate(("fp32", "bf16")):
        try:
            r = train(workload, batch_size=rec["batch_size"], micro_batch_size=rec["micro_batch_size"], lr=rec["lr"],
                      warmup=rec.get("warmup_steps") or 0, steps=steps, precision=p, device=dev, seed=seed,
                      drop_last=True)
            last = r.history[-1] if r.history else {}
            check[p] = {"status": "diverged" if r.diverged else "ok", "samples_per_s": r.samples_per_s,
                        "peak_memory_bytes": r.peak_memory_bytes, "train_loss": last.get("train_loss"),
                        "val_loss": last.get("val_loss"), "seconds": r.seconds}
        except BatchfitError as exc:
            check[p] = {"status": "failed", "error": str(exc)}
        rep.stage_update("precision", i + 1, f"{p} done")
    _store(out, "precision", key, check)
    sp = [(check[p] or {}).get("samples_per_s") for p in ("fp32", "bf16")]
    rep.stage_end("precision", "samples/s fp32 {} vs bf16 {}".format(*(f"{s:.0f}" if s else "-" for s in sp)))
    return check


# ---------------------------------------------------------------------------------------------------------------
# The recipe


def tune(
    workload: Workload | str = "demo:digits-mlp",
    *,
    out_dir: str | Path = "batchfit-out",
    batch_sizes: Sequence[int] | None = None,
    budget: str = DEFAULT_BUDGET,
    lr_rule: str = "auto",
    lr_search: int = 1,
    warmup: int | float = 0,
    target: Any = 0.97,
    storage: str | None = None,
    study_name: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    memory_budget: int | str | None = None,
    max_batch_size: int | None = None,
    margin: float = 0.05,
    noise_steps: int = DEFAULT_NOISE_STEPS,
    eval_every: int | str | None = "auto",
    tolerance: float = 0.01,
    find: bool = True,
    noise: bool = True,
    precision_check: bool = True,
    lr_calibration: bool = True,
    sharpness: bool = False,
    workload_options: Mapping[str, Any] | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Measure and recommend the batch size for a workload: find -> noise -> sweep -> report -> recommendation.

    Args:
        out_dir: where every result is written as it completes (also the default Optuna store,
            ``sqlite:///<out_dir>/batchfit.db``); re-running with the same ``out_dir`` resumes.
        batch_sizes: effective batch sizes to compare (default :func:`default_batch_sizes`: powers of two from 16
            up to 64 x the largest micro-batch that fits, the base batch, and the full batch on small sets).
        budget: ``epochs:E`` (equal-epoch comparison), ``steps:S`` or ``samples:N`` per trial.
        lr_search: learning rates tried per batch size around the rule's (1 = the rule's only).
        target: the fraction of the best validation metric that counts as "converged" (time-to-target).
        eval_every: evaluate every N optimizer steps; ``"auto"`` = 4 evaluations per epoch at the smallest batch
            with an epoch budget (every batch also evaluates at each epoch end), the sweep's default otherwise.
        tolerance: recommend among batch sizes within this relative tolerance of the best validation metric.
        find / noise / precision_check: run those stages (the sweep and report always run).
        lr_calibration: first check the workload's base LR at its base batch (x1/4 ... x8, a quarter of the budget each,
            extended by up to 3 x2 steps while the best is at an edge) and move it when another is better by more
            than ``tolerance``; every batch's LR is scaled from it.
        reporter: progress callbacks (see :class:`Reporter`); the CLI passes a rich live display.

    Returns the sweep's results dict with ``"recommendation"``, ``"precision_check"`` and ``"report"`` (paths).

    >>> out = tune("demo:digits-mlp", out_dir="/tmp/bf")  # doctest: +SKIP
    >>> out["recommendation"]["batch_size"]  # doctest: +SKIP
    """
    rep: Any = reporter or _Quiet()
    t_start = time.perf_counter()
    from batchfit.engine import check_precision, resolve_device
    from batchfit.memory import parse_bytes
    from batchfit.study import parse_batch_sizes, parse_budget, parse_target, sweep
    from batchfit.workload import load_workload

    # -- validate everything before any work ------------------------------------------------------------------
    wl = load_workload(workload, **dict(workload_options or {}))
    bud = parse_budget(budget)
    parse_target(target)
    sizes = None if batch_sizes is None else parse_batch_sizes(batch_sizes)
    if sizes is not None and max(sizes) > wl.num_train:
        raise ConfigError(f"batch size {max(sizes)} exceeds the training set ({wl.num_train} samples); use batch "
                          f"sizes <= {wl.num_train}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise ConfigError(f"tolerance must be a fraction in [0, 1), e.g. 0.01 for 1 %, got {tolerance!r}")
    for name, value in (("lr_search", lr_search), ("noise_steps", noise_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if eval_every not in (None, "auto") and (isinstance(eval_every, bool) or not isinstance(eval_every, int)
                                             or eval_every < 1):
        raise ConfigError(f"eval_every must be a positive integer, 'auto' or None, got {eval_every!r}")
    check_precision(precision, resolve_device(device))
    memory_budget = parse_bytes(memory_budget) if memory_budget is not None else None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {str(out)!r} is a file; give a directory for --out")
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'batchfit.db').resolve()}"

    # -- 1. find: the largest micro-batch that fits, and the throughput knee ----------------------------------
    find_result = _find(wl, out, rep, device=device, precision=precision, seed=seed, memory_budget=memory_budget,
                        max_batch_size=max_batch_size, margin=margin) if find else None
    fits = None
    if find_result and find_result.get("recommended_batch_size"):
        fits = int(find_result["recommended_batch_size"])

    # -- 2. noise: B_simple at initialisation ------------------------------------------------------------------
    noise_result = _noise(wl, out, rep, device=device, precision=precision, seed=seed,
                          steps=noise_steps) if noise else None

    # -- 3. sweep: every candidate batch at its rule-scaled LR, persisted in the Optuna store --------------------
    if sizes is None:
        sizes = default_batch_sizes(wl.num_train, fits, wl.base_batch_size)
        if max_batch_size is not None:
            sizes = [b for b in sizes if b <= max_batch_size] or [min(max_batch_size, wl.num_train)]
    if eval_every == "auto":
        eval_every = _auto_eval_every(wl.num_train, min(sizes), bud.kind)
    if fits is None and not find:
        fits = max(sizes)  # no finder: no memory limit (the sweep would otherwise run its own finder)
    lr_result = None
    if lr_calibration:
        lr_result = _calibrate_lr(wl, out, rep, budget=bud, multipliers=LR_CALIBRATION_MULTIPLIERS,
                                  tolerance=tolerance, device=device, precision=precision, seed=seed)
        if lr_result["best_multiplier"] != 1.0:
            wl = dataclasses.replace(wl, base_lr=lr_result["lr"])
    results = sweep(
        wl, batch_sizes=sizes, budget=bud, lr_rule=lr_rule, lr_search=lr_search, warmup=warmup,
        target=target, storage=storage, study_name=study_name, micro_batch_size=fits, device=device,
        precision=precision, seed=seed, measure_noise=True, sharpness=sharpness, eval_every=eval_every,
        extra_attrs={"find": find_result, "noise": noise_result, "lr_calibration": lr_result},
        progress=_SweepProgress(rep, out, tolerance),
    )
    results = dict(results)
    results["lr_calibration"] = lr_result
    if results.get("find") is None:
        results["find"] = find_result
    if results.get("noise") is None:
        results["noise"] = noise_result
    counts = results.get("counts") or {}
    rep.stage_end("sweep", ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no trials")

    # -- 4. recommendation, with a measured precision check of the recommended configuration -------------------
    from batchfit.recommend import recommend
    from batchfit.report import write_report

    rec: dict[str, Any] | None
    try:
        rec = recommend(results, find_result, tolerance=tolerance)
    except ConfigError:  # no trial finished: the report still shows what happened, without a recommendation
        rec = None
    if precision_check and rec is not None:
        results["precision_check"] = _precision_check(
            wl, out, rep, rec, device=device, precision=precision, seed=seed,
            steps=PRECISION_CHECK_STEPS,
        )
        rec = recommend(results, find_result, tolerance=tolerance)
        _save_study_attr(storage, results.get("study_name"), "precision_check", results["precision_check"])

    # -- 5. report ---------------------------------------------------------------------------------------------
    rep.stage_start("report", f"writing {out}/report.html")
    results["tune_seconds"] = time.perf_counter() - t_start
    paths = write_report(results, out, recommendation=rec, tolerance=tolerance)
    rep.stage_end("report", f"{out}/report.html, report.md, results.json, {len(paths['plots'])} plots")
    results["recommendation"] = rec
    results["report"] = {k: (str(v) if isinstance(v, Path) else {n: str(p) for n, p in v.items()})
                         for k, v in paths.items() if k in ("results", "markdown", "html", "plots")}
    return results
