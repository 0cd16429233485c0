"""Does `batchfit tune`'s recommendation survive a re-run? (issue 11.8)

For each workload (default: demo:digits-mlp and demo:mnist1d):

1. **Seeds**: `tune` with seeds 0 .. S-1 (default S = 5), each into a fresh directory, with its defaults (racing
   on). Reports every recommended effective batch and LR, their spread (max / min and the largest factor from the
   median), tune's compute (training samples: sweep trials, LR check, noise probe, precision check) and wall time.
2. **Load**: `tune` with seed 0 again while two busy processes (`python -c "while True: pass"`) load the machine
   (killed afterwards); the same recommendation as the quiet seed-0 run is the target.
3. **Grid**: the candidate batch sizes x `--grid-lrs` learning-rate multipliers around the rule-scaled LR, each with
   `--grid-seeds` seeds (default 3), on tune's budget and evaluation cadence (`batchfit.sweep(seeds=...)`); each
   configuration's quality is its seed mean of the best 3-evaluation moving average (what tune ranks on). The grid's
   best is the best seed mean. Every distinct recommended configuration is re-trained with the same seeds and scored
   the same way.

Targets (issue 11): every recommended batch and LR within x2 of their medians across seeds; the same recommendation
with and without load; the recommended configuration's seed-averaged quality within 1 % of the grid's best; tune
under 25 % of the 3-seed grid's training samples; the README main job (tune on digits) about 3 minutes on 2 cores.

Run:  python bench/recommendation_stability.py                 (full: 5 seeds, both workloads, 5 x 3 grid)
      python bench/recommendation_stability.py --quick         (digits only, 3 seeds, 3 LRs x 2 grid seeds, 5 epochs)
Writes bench/results/recommendation_stability_cpu[_quick].json after every part (interruption keeps what finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from batchfit.decide import quality_of_trial
from batchfit.loading import load_workload
from batchfit.metric import Metric, final_quality
from batchfit.report import write_json
from batchfit.study import sweep
from batchfit.tuning import DEFAULT_BUDGET, _auto_eval_every, default_batch_sizes, tune

__all__ = ["main"]

WORKLOADS = {"digits": ("demo:digits-mlp", {}), "mnist1d": ("demo:mnist1d", {"num_samples": 4000})}


def _compute(res: Any) -> int:
    """Training samples `tune` spent: sweep trials, LR-check runs, the noise probe and the precision check."""
    d = res.to_dict()
    total = sum(int(t.get("samples") or 0) for t in d.get("trials") or [])
    total += sum(int(r.get("samples") or 0) for r in (d.get("lr_calibration") or {}).get("runs") or [])
    noise = d.get("noise") or {}
    total += int(noise.get("steps") or 0) * int(noise.get("batch_size") or 0)
    prec = d.get("precision_check") or {}
    if prec.get("steps") and prec.get("batch_size"):
        total += 2 * int(prec["steps"]) * int(prec["batch_size"])
    return total


def _tune_once(spec: str, options: dict[str, Any], out: Path, seed: int, budget: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = tune(spec, out_dir=out, seed=seed, budget=budget, workload_options=options)
    wall = time.perf_counter() - t0
    rec = res.recommendation
    d = res.to_dict()
    seeds: dict[int, int] = {}
    for t in d["trials"]:
        seeds[t["batch_size"]] = seeds.get(t["batch_size"], 0) + 1
    return {"seed": seed, "batch_size": rec.batch_size if rec else None, "lr": rec.lr if rec else None,
            "micro_batch_size": rec.micro_batch_size if rec else None, "precision": rec.precision if rec else None,
            "tied": rec.tied if rec else None, "flags": rec.flags if rec else None,
            "reason": rec.reasons[0] if rec else None, "trials": len(d["trials"]), "trials_per_batch": seeds,
            "lr_check": (d.get("lr_calibration") or {}).get("decision"), "samples": _compute(res),
            "wall_seconds": round(wall, 1), "out": str(out)}


def _spread(values: list[float]) -> dict[str, Any]:
    med = statistics.median(values)
    return {"values": values, "median": med, "max_over_min": max(values) / min(values),
            "max_factor_from_median": max(max(v / med, med / v) for v in values),
            "within_x2_of_median": all(med / 2 <= v <= med * 2 for v in values)}


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # only the processes this script started, by their handles
        p.kill()
        p.wait()


FINAL_WINDOW = 0.1  # the end of the budget: the evaluations in its last 10 % of samples


def _quality(t: dict[str, Any], metric: Metric, final: bool) -> float | None:
    """A trial's score: what tune ranks on (the mean of its last 3 evaluations), or with ``final`` the quality at
    the end of the budget: the mean of its evaluations in the last :data:`FINAL_WINDOW` of its samples (the last
    evaluation at least). A reference over an epochs budget evaluates every batch size at the same *step*
    cadence, so the last 3 evaluations span x64 more of the run at batch 512 than at batch 8 (demo:tiny-lm's one
    epoch: the last 3 of 4 at batch 8, the only one at batch 32 and up; demo:digits-mlp's 20: 0.75 epoch at batch
    16, 3 epochs at 256): their mean is biased against whoever is evaluated least often. One window in samples
    for every batch size is not, and averages what falls in it (9 evaluations at batch 16 on digits, 3 at 256)."""
    if t["status"] != "ok":
        return None
    if not final:
        return quality_of_trial(t, metric)
    recs = [r for r in t.get("history") or [] if metric.of_record(r) is not None]
    end = recs[-1].get("samples") if recs else None
    whole = isinstance(end, (int, float)) and end > 0  # every evaluation in the window; without samples the last
    return final_quality(recs, metric, len(recs) if whole else 1, window=FINAL_WINDOW)


def _configs(trials: list[dict[str, Any]], metric: Metric, seeds: int, final: bool) -> dict[str, Any]:
    """The grid's configurations (seed means over complete seeds) and its best, from its trials."""
    configs: dict[tuple[int, float], list[float]] = {}
    for t in trials:
        q = _quality(t, metric, final)
        if q is not None:
            configs.setdefault((t["batch_size"], float(t["lr"])), []).append(q)
    means = {k: statistics.mean(v) for k, v in configs.items() if len(v) == seeds}
    best = max(means, key=lambda k: means[k] if metric.higher_is_better else -means[k])
    return {"best": {"batch_size": best[0], "lr": best[1], "quality": means[best]},
            "configs": [{"batch_size": b, "lr": lr, "quality_mean": m, "seeds": len(configs[(b, lr)])}
                        for (b, lr), m in sorted(means.items())],
            "quality_at": (f"mean of the evaluations in the last {FINAL_WINDOW:.0%} of the budget's samples" if final
                           else "mean of the last 3 evaluations")}


def _grid(spec: str, options: dict[str, Any], store: Path, budget: str, lrs: int, seeds: int,
          eval_every: int | None, sizes: list[int], micro_limit: int | None = None,
          final: bool = False) -> dict[str, Any]:
    """Every size x LR x seed for the whole budget; ``micro_limit``: the largest micro-batch (a larger batch
    accumulates: the same update, less memory), default the largest size; ``final``: scored at the end of the
    budget (:func:`_quality`)."""
    wl = load_workload(spec, **options)
    metric = Metric.for_workload(wl)
    res = sweep(wl, batch_sizes=sizes, budget=budget, lr_search=lrs, seeds=seeds, storage=f"sqlite:///{store}",
                measure_noise=False, eval_every=eval_every,
                micro_batch_limit=min(max(sizes), micro_limit or max(sizes)), seed=0)
    d = res.to_dict()
    return {"batch_sizes": sizes, "lr_multipliers": d.get("lr_multipliers"), "seeds": seeds,
            "trials": len(d["trials"]), "samples": sum(int(t.get("samples") or 0) for t in d["trials"]),
            **_configs(d["trials"], metric, seeds, final)}


def _base_lr(run: dict[str, Any]) -> float | None:
    """The base LR a tune run's sweep scaled from: the LR check's, when it moved it, else the workload's."""
    try:
        d = json.loads((Path(run["out"]) / "results.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    cal = d.get("lr_calibration") or {}
    return float(cal["lr"]) if cal.get("lr") else None


def _score_config(spec: str, options: dict[str, Any], batch: int, lr: float, budget: str, seeds: int,
                  eval_every: int | None, base_lr: float | None, store: Path, final: bool = False) -> dict[str, Any]:
    """The recommended configuration trained again on the grid's seeds exactly as tune's sweep trained it: a
    one-batch sweep from the run's (checked) base LR with the workload's LR rule, so the rule's other settings
    (adam-sqrt also moves betas and eps with the batch) are the recommended recipe's, and scored like the grid."""
    wl = load_workload(spec, **options)
    if base_lr is not None:
        wl = dataclasses.replace(wl, base_lr=base_lr)
    metric = Metric.for_workload(wl)
    res = sweep(wl, batch_sizes=[batch], budget=budget, seeds=seeds, storage=f"sqlite:///{store}",
                measure_noise=False, eval_every=eval_every, micro_batch_limit=batch, seed=0).to_dict()
    return score_of_answer(res["trials"], metric, batch, lr, base_lr=base_lr, final=final)


LR_MATCH = 0.01  # a trained LR within 1 % (log) of the recommended one is the answer's (the rule's rounding)


def answer_trials(trials: list[dict[str, Any]], batch: int, lr: float) -> list[dict[str, Any]]:
    """The trials of one answer in a score store: its batch size at the trained LR nearest the recommended one,
    when that is within :data:`LR_MATCH` of it (else none).

    A store can hold an earlier answer's trials too (a tune directory decided again by newer code, then scored
    into the same store): its mean must not mix them in."""
    at_batch = [t for t in trials if int(t.get("batch_size") or 0) == int(batch) and t.get("lr")]
    if not at_batch:
        return []
    nearest = min({float(t["lr"]) for t in at_batch}, key=lambda x: abs(math.log(x / lr)))
    if abs(math.log(nearest / lr)) > LR_MATCH:  # only another answer's trials: none of this one's
        return []
    return [t for t in at_batch if abs(float(t["lr"]) - nearest) <= 1e-9 * nearest]


def score_of_answer(trials: list[dict[str, Any]], metric: Any, batch: int, lr: float, *,
                    base_lr: float | None = None, final: bool = False) -> dict[str, Any]:
    """The answer's seed qualities from its own trials (:func:`answer_trials`)."""
    own = answer_trials(trials, batch, lr)
    qs = [q for t in own if (q := _quality(t, metric, final)) is not None]
    lrs = sorted({float(t["lr"]) for t in own})
    return {"batch_size": batch, "lr": lr, "trained_lr": lrs, "base_lr": base_lr, "qualities": qs,
            "quality_mean": statistics.mean(qs) if qs else None,
            "same_lr_as_recommended": bool(lrs) and all(abs(x - lr) <= 1e-6 * lr for x in lrs),
            "other_trials_in_store": len(trials) - len(own)}


def run_workload(name: str, args: argparse.Namespace, root: Path, report: dict[str, Any], path: Path) -> None:
    spec, options = WORKLOADS[name]
    out: dict[str, Any] = report.setdefault("workloads", {}).setdefault(name, {"spec": spec, "options": options})
    # 1. seeds
    runs = out.setdefault("tune_seeds", [])
    for seed in range(len(runs), args.seeds):
        runs.append(_tune_once(spec, options, root / name / f"seed{seed}", seed, args.budget))
        print(f"[{name}] seed {seed}: batch {runs[-1]['batch_size']}, LR {runs[-1]['lr']:.4g}, "
              f"{runs[-1]['trials']} trials, {runs[-1]['wall_seconds']} s", flush=True)
        write_json(path, report)
    ok = [r for r in runs if r["batch_size"]]
    out["spread"] = {"batch_size": _spread([float(r["batch_size"]) for r in ok]),
                     "lr": _spread([float(r["lr"]) for r in ok]),
                     "samples_median": statistics.median(r["samples"] for r in ok),
                     "wall_seconds_median": statistics.median(r["wall_seconds"] for r in ok)}
    write_json(path, report)
    # 2. load
    if args.load and "loaded" not in out:
        procs = _busy(2)
        try:
            loaded = _tune_once(spec, options, root / name / "seed0-loaded", 0, args.budget)
        finally:
            _stop(procs)
        quiet = runs[0]
        loaded["same_as_quiet"] = (loaded["batch_size"], loaded["lr"]) == (quiet["batch_size"], quiet["lr"])
        out["loaded"] = loaded
        print(f"[{name}] loaded seed 0: batch {loaded['batch_size']}, LR {loaded['lr']:.4g} "
              f"(quiet: {quiet['batch_size']}, {quiet['lr']:.4g}), {loaded['wall_seconds']} s", flush=True)
        write_json(path, report)
    # 3. grid and the recommended configurations on the same footing
    if args.grid_seeds and "grid" not in out:
        wl = load_workload(spec, **options)
        sizes = default_batch_sizes(wl.num_train, None, wl.base_batch_size)
        from batchfit.study import parse_budget

        eval_every = _auto_eval_every(wl.num_train, min(sizes), parse_budget(args.budget).kind)
        t0 = time.perf_counter()
        out["grid"] = _grid(spec, options, root / name / "grid.db", args.budget, args.grid_lrs, args.grid_seeds,
                            eval_every, sizes)
        out["grid"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
        write_json(path, report)
        recs = sorted({(r["batch_size"], r["lr"], _base_lr(r)) for r in ok}, key=str)
        out["recommended_scores"] = [_score_config(spec, options, b, lr, args.budget, args.grid_seeds, eval_every,
                                                   base, root / name / f"rescore_b{b}_base{base}.db")
                                     for b, lr, base in recs]
        _targets(out)
        print(f"[{name}] grid best {out['grid']['best']}; worst recommended gap "
              f"{out['targets']['worst_quality_gap']:.2%}; tune {out['targets']['tune_share_of_grid_samples']:.1%} "
              "of the grid's samples", flush=True)
        write_json(path, report)


def reanalyze(old_json: Path, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Recompute every recommendation of an earlier run from its stores (the same trials, seeds and timings) with
    this version's decision code, and re-score the recommended configurations against the earlier grid (resumed
    from its store: nothing is trained again except the recommended configurations)."""
    from batchfit.recommend import recommend
    from batchfit.study import load_results

    old = json.loads(old_json.read_text())
    report: dict[str, Any] = {"command": " ".join(["python", "bench/recommendation_stability.py",
                                                   *sys.argv[1:]]), "reanalysis_of": old.get("command"),
                              "settings": old.get("settings"), "workloads": {}}
    for name, w in old.get("workloads", {}).items():
        if not w.get("tune_seeds"):
            continue
        spec, options = WORKLOADS[name]
        out: dict[str, Any] = {"spec": spec, "options": options, "tune_seeds": []}
        report["workloads"][name] = out

        def again(run: dict[str, Any]) -> dict[str, Any]:
            res = load_results(f"sqlite:///{Path(run['out']) / 'batchfit.db'}")
            rec = recommend(res)

            class _R:  # what _compute reads
                def to_dict(self) -> dict[str, Any]:
                    return res.to_dict()

            return dict(run, batch_size=rec.batch_size, lr=rec.lr, tied=rec.tied, flags=rec.flags,
                        reason=rec.reasons[0], samples=_compute(_R()), old_batch_size=run["batch_size"],
                        old_lr=run["lr"])

        out["tune_seeds"] = [again(r) for r in w["tune_seeds"]]
        ok = out["tune_seeds"]
        out["spread"] = {"batch_size": _spread([float(r["batch_size"]) for r in ok]),
                         "lr": _spread([float(r["lr"]) for r in ok]),
                         "samples_median": statistics.median(r["samples"] for r in ok),
                         "wall_seconds_median": statistics.median(r["wall_seconds"] for r in ok)}
        if w.get("loaded"):
            loaded = again(w["loaded"])
            loaded["same_as_quiet"] = (loaded["batch_size"], loaded["lr"]) == (ok[0]["batch_size"], ok[0]["lr"])
            out["loaded"] = loaded
        if w.get("grid"):
            root = Path(w["tune_seeds"][0]["out"]).parent
            wl = load_workload(spec, **options)
            from batchfit.study import parse_budget

            budget = old["settings"]["budget"]
            eval_every = _auto_eval_every(wl.num_train, min(w["grid"]["batch_sizes"]), parse_budget(budget).kind)
            out["grid"] = _grid(spec, options, root / "grid.db", budget, old["settings"]["grid_lrs"],
                                old["settings"]["grid_seeds"], eval_every, w["grid"]["batch_sizes"])
            out["grid"]["wall_seconds"] = w["grid"].get("wall_seconds")
            recs = sorted({(r["batch_size"], r["lr"], _base_lr(r)) for r in ok}, key=str)
            out["recommended_scores"] = [_score_config(spec, options, b, lr, budget, old["settings"]["grid_seeds"],
                                                       eval_every, base, root / f"rescore_b{b}_base{base}.db")
                                         for b, lr, base in recs]
            _targets(out)
        write_json(path, report)
    return report


def _targets(out: dict[str, Any]) -> None:
    best = out["grid"]["best"]["quality"]
    for s in out["recommended_scores"]:
        s["relative_gap_to_grid_best"] = (best - s["quality_mean"]) / abs(best) if s["quality_mean"] is not None \
            else None
    worst = max((s["relative_gap_to_grid_best"] for s in out["recommended_scores"]
                 if s["relative_gap_to_grid_best"] is not None), default=float("nan"))
    med_samples = out["spread"]["samples_median"]
    out["targets"] = {
        "batch_within_x2": out["spread"]["batch_size"]["within_x2_of_median"],
        "lr_within_x2": out["spread"]["lr"]["within_x2_of_median"],
        "same_under_load": (out.get("loaded") or {}).get("same_as_quiet"),
        "worst_quality_gap": worst, "quality_within_1pct": worst <= 0.01,
        "tune_share_of_grid_samples": med_samples / out["grid"]["samples"],
        "tune_under_25pct": med_samples / out["grid"]["samples"] < 0.25,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits only, 3 seeds, 3 LRs x 2 grid seeds, epochs:5")
    p.add_argument("--workloads", default=None, help="comma-separated: digits,mnist1d")
    p.add_argument("--seeds", type=int, default=None, help="tune seeds (default 5; --quick 3)")
    p.add_argument("--grid-seeds", type=int, default=None, help="seeds per grid configuration (default 3)")
    p.add_argument("--grid-lrs", type=int, default=None, help="LR multipliers in the grid (default 5)")
    p.add_argument("--budget", default=None, help=f"per-trial budget (default tune's {DEFAULT_BUDGET})")
    p.add_argument("--no-load", dest="load", action="store_false", help="skip the busy-machine run")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    p.add_argument("--work-dir", type=Path, default=None, help="where tune writes (default: a temp dir)")
    p.add_argument("--reanalyze", type=Path, metavar="JSON",
                   help="recompute an earlier run's recommendations from its stores with this version's decision "
                        "code (same trials), and re-score them against its grid")
    args = p.parse_args(argv)
    if args.reanalyze is not None:
        report = reanalyze(args.reanalyze, args, args.out or args.reanalyze.with_name(
            args.reanalyze.stem + "_reanalyzed.json"))
        print(json.dumps({n: w.get("targets") for n, w in report["workloads"].items()}, indent=1, default=str))
        return 0
    q = args.quick
    args.seeds = args.seeds or (3 if q else 5)
    args.grid_seeds = 2 if q and args.grid_seeds is None else (3 if args.grid_seeds is None else args.grid_seeds)
    args.grid_lrs = args.grid_lrs or (3 if q else 5)
    args.budget = args.budget or ("epochs:5" if q else DEFAULT_BUDGET)
    names = (args.workloads or ("digits" if q else "digits,mnist1d")).split(",")
    path = args.out or Path(__file__).parent / "results" / f"recommendation_stability_cpu{'_quick' if q else ''}.json"
    report: dict[str, Any] = {"command": " ".join(["python", "bench/recommendation_stability.py", *(argv or
                                                                                                    sys.argv[1:])]),
                              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="bf-stability-"))
    t0 = time.perf_counter()
    for name in names:
        run_workload(name, args, root, report, path)
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(path, report)
    print(json.dumps({n: w.get("targets") for n, w in report["workloads"].items()}, indent=1, default=str))
    print(f"written {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
