"""A capped tune against the full-horizon reference (issue 18.5).

For each workload:

(a) **The full-horizon reference**: every candidate batch size trained for the whole train budget, with the LR rule's
    LR x {1/4, 1/2, 1, 2, 4} and ``--ref-seeds`` seeds (default 3), scored the way tune scores a trial (the mean of
    its last 3 evaluations). Its best configuration is the best seed mean; a batch size is in its *non-inferior set*
    when its best LR's seed mean lies within ``--tolerance`` (relative) of the best, and its *best LR* is that LR.
(b) **Capped tunes**: ``tune --max-cost C`` for each C in ``--caps`` (default 1.0 and 0.5) with ``--tune-seeds``
    seeds of batchfit's own randomness (default 3).

Per tune it records the cost in runs (``results.json["cost"]``), the recommended batch and LR, whether the batch is
in the reference's non-inferior set, the LR's factor from the reference's best LR at that batch, and the
recommended configuration's quality at the train budget: trained again for the whole train budget on the reference's
seeds exactly as tune's sweep trains it (a one-batch sweep from the tune's checked base LR), seed mean with a t
interval, against the reference's best seed mean.

Run:   python bench/cost_vs_full.py --workloads digits,mnist1d --out bench/results/cost_vs_full.json
       (a reference grid is resumed from ``--work-dir``: an earlier run's stores are reused, not retrained)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batchfit.loading import load_workload  # noqa: E402
from batchfit.metric import Metric  # noqa: E402
from batchfit.report import write_json  # noqa: E402
from batchfit.stats import mean_interval, three_point_peak  # noqa: E402
from batchfit.study import parse_budget  # noqa: E402
from batchfit.tuning import _auto_eval_every, default_batch_sizes, tune  # noqa: E402
from recommendation_stability import _base_lr, _configs, _grid, _score_config, score_of_answer  # noqa: E402

# name -> (spec, workload options, train budget)
WORKLOADS: dict[str, tuple[str, dict[str, Any], str]] = {
    "digits": ("demo:digits-mlp", {}, "epochs:20"),
    "mnist1d": ("demo:mnist1d", {"num_samples": 4000}, "samples:40000"),
    "tiny-lm": ("demo:tiny-lm", {}, "epochs:1"),
    "text_dict": ("examples/text_dict/workload.py:make", {}, "epochs:3"),
}


def reference(spec: str, options: dict[str, Any], budget: str, seeds: int, store: Path,
              lrs: int = 5, micro_limit: int | None = None) -> dict[str, Any]:
    wl = load_workload(spec, **options)
    sizes = default_batch_sizes(wl.num_train, None, wl.base_batch_size)
    kind = parse_budget(budget).kind
    eval_every = _auto_eval_every(wl.num_train, min(sizes), kind)
    t0 = time.perf_counter()
    grid = _grid(spec, options, store, budget, lrs, seeds, eval_every, sizes, micro_limit, final=True)
    grid["wall_seconds"] = round(time.perf_counter() - t0, 1)
    grid["higher_is_better"] = Metric.for_workload(wl).higher_is_better
    grid["eval_every"] = eval_every
    return grid


def _per_batch_best(grid: dict[str, Any], higher: bool) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for c in grid["configs"]:
        b = int(c["batch_size"])
        if b not in out or (c["quality_mean"] > out[b]["quality_mean"]) == higher:
            out[b] = c
    return out


def fitted_best_lr(grid: dict[str, Any], batch: int, higher: bool = True) -> float:
    """The reference's best LR at ``batch``, from the seed means of every LR tried there: the vertex of the
    parabola through the best LR and its two neighbours in log2(LR) (grid points a factor 2 apart cannot place the
    best LR closer than x2, the argmax of noisy means can land on either of two tied neighbours), kept between those
    neighbours; the argmax itself when it is at the edge of the LRs tried or the three points do not bend down."""
    pts = sorted((math.log2(c["lr"]), c["quality_mean"] if higher else -c["quality_mean"])
                 for c in grid["configs"] if int(c["batch_size"]) == batch)
    i = max(range(len(pts)), key=lambda j: pts[j][1])
    if i == 0 or i == len(pts) - 1:
        return 2.0 ** pts[i][0]
    vertex = three_point_peak(pts[i - 1:i + 2])
    if vertex is None:
        return 2.0 ** pts[i][0]
    return 2.0 ** min(max(vertex, pts[i - 1][0]), pts[i + 1][0])


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _gap(best: float, q: float | None, higher: bool) -> float | None:
    """How far ``q`` lies behind ``best``, relative (positive = worse), for a score or a loss; ``None`` without."""
    if q is None:
        return None
    return (best - q) / abs(best) if higher else (q - best) / abs(best)


def judge(grid: dict[str, Any], tol: float, higher: bool | None = None) -> dict[str, Any]:
    """The reference's verdict; ``higher``: whether the quality is a score (default: the grid's metric, a score
    for a grid stored before it was recorded; demo:tiny-lm ranks on the validation loss)."""
    if higher is None:
        higher = bool(grid.get("higher_is_better", True))
    best = grid["best"]["quality"]
    per = _per_batch_best(grid, higher)
    bound = best * (1 - tol) if higher else best * (1 + tol)
    ok = sorted(b for b, c in per.items() if (c["quality_mean"] >= bound if higher else c["quality_mean"] <= bound))
    return {"best": grid["best"], "non_inferior": ok, "higher_is_better": higher,
            "best_lr_by_batch": {b: fitted_best_lr(grid, b, higher) for b in sorted(per)},
            "argmax_lr_by_batch": {b: per[b]["lr"] for b in sorted(per)},
            "tied_lr_range_by_batch": {b: tied_lr_range(grid, b, tol, higher) for b in sorted(per)},
            "quality_by_batch": {b: per[b]["quality_mean"] for b in sorted(per)}}


def _lr_factors(t: dict[str, Any], verdict: dict[str, Any]) -> None:
    """A tune's LR against the reference's best LR at its batch: fitted (the verdict) and the grid's argmax."""
    b, lr = t.get("batch_size"), t.get("lr")
    if not b or not lr:
        return
    for key, table in (("lr_factor_from_reference", "best_lr_by_batch"),
                       ("lr_factor_from_reference_argmax", "argmax_lr_by_batch")):
        ref = verdict[table].get(b, verdict[table].get(str(b)))
        t[key] = None if ref is None else max(lr / ref, ref / lr)


def tied_lr_range(grid: dict[str, Any], batch: int, tol: float, higher: bool = True) -> list[float] | None:
    """``[low, high]``: the LRs at ``batch`` whose seed mean lies within ``tol`` (relative) of that batch's best
    seed mean. Where the LR response is flat (demo:digits-mlp: x2 ... x16 of the rule within 1 %), "the best LR" is
    any of them and a factor from one of them says little; this range is what the reference can tell apart."""
    pts = [(c["lr"], c["quality_mean"]) for c in grid["configs"] if int(c["batch_size"]) == batch]
    if not pts:
        return None
    best = max(q for _, q in pts) if higher else min(q for _, q in pts)
    ok = [lr for lr, q in pts if (q >= best * (1 - tol) if higher else q <= best * (1 + tol))]
    return [min(ok), max(ok)]


def _rejudge(t: dict[str, Any], verdict: dict[str, Any], tol: float) -> None:
    """A stored tune judged again against ``verdict`` (a widened reference moves its best): the gap, whether its
    batch is non-inferior, and whether its LR lies in the reference's tied LR range at that batch."""
    b, lr = t.get("batch_size"), t.get("lr")
    q = (t.get("quality") or {}).get("quality_mean")
    if not b or not lr or q is None:
        return
    best = verdict["best"]["quality"]
    t["relative_gap_to_best"] = _gap(best, q, verdict.get("higher_is_better", True))
    t["batch_non_inferior"] = b in verdict["non_inferior"]
    rng = verdict["tied_lr_range_by_batch"].get(b, verdict["tied_lr_range_by_batch"].get(str(b)))
    t["reference_tied_lr_range"] = rng
    t["lr_in_tied_range"] = rng is not None and rng[0] <= lr <= rng[1]


def one_tune(spec: str, options: dict[str, Any], budget: str, cap: float, seed: int, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = tune(spec, out_dir=out, seed=seed, train_budget=budget, max_cost=cap, workload_options=options)
    wall = time.perf_counter() - t0
    d = res.to_dict()
    rec = res.recommendation
    return {"cap": cap, "seed": seed, "batch_size": rec.batch_size if rec else None, "lr": rec.lr if rec else None,
            "cost": d.get("cost"), "runs": (d.get("cost") or {}).get("runs"),
            "measurement": (d.get("train_budget") or {}).get("measurement"),
            "dropped": (d.get("train_budget") or {}).get("dropped"),
            "flags": (d.get("recommendation") or {}).get("flags"), "wall_seconds": round(wall, 1), "out": str(out)}


def _seed_interval(qs: list[float]) -> dict[str, Any] | None:
    """The seed mean's t interval of a re-trained answer (``None`` with fewer than 2 seeds)."""
    return mean_interval(qs).to_dict() if len(qs) >= 2 else None


def rescore(out: dict[str, Any], grid_store: Path, root: Path) -> None:
    """A stored reference and every stored tune's score read again from their stores (no training) and scored at
    the end of the budget (:func:`recommendation_stability._quality`): for results
    written when the reference was scored on the mean of the last 3 evaluations, which an epochs budget biases."""
    from batchfit.study import load_results

    wl = load_workload(out["spec"], **out["options"])
    metric = Metric.for_workload(wl)
    ref = out["reference"]
    trials = [t.to_dict() for t in load_results(f"sqlite:///{grid_store}").trials]
    ref.update(_configs(trials, metric, int(ref["seeds"]), True), higher_is_better=metric.higher_is_better)
    for t in out.get("tunes", []):
        db = root / f"score_c{t['cap']:g}_s{t['seed']}.db"
        if not t.get("quality") or not db.exists():
            continue
        score = score_of_answer([s.to_dict() for s in load_results(f"sqlite:///{db}").trials], metric,
                                t["batch_size"], t["lr"], base_lr=t["quality"].get("base_lr"), final=True)
        t["quality"].update(score)
        t["quality_interval"] = _seed_interval(score["qualities"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="digits,mnist1d")
    ap.add_argument("--caps", default="1.0,0.5")
    ap.add_argument("--tune-seeds", type=int, default=3)
    ap.add_argument("--ref-seeds", type=int, default=3)
    ap.add_argument("--ref-lrs", type=int, default=5,
                    help="LRs per batch size in the reference (5: the rule's x 1/4 ... 4; 9: x 1/16 ... 16, for a "
                         "workload whose best LR sits at the edge of the narrower grid)")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--micro-limit", type=int, default=None,
                    help="the reference's largest micro-batch (larger batches accumulate; tiny-lm's full batch of "
                         "32,768 sequences in one pass needs gigabytes)")
    ap.add_argument("--load", action="store_true",
                    help="also tune seed 0 at the first cap with two busy processes beside it")
    ap.add_argument("--no-reference", action="store_true",
                    help="only the capped tunes (cost, answer, wall time): no full-horizon grid, no re-scoring")
    ap.add_argument("--rescore", type=Path, default=None, metavar="GRID_STORE",
                    help="score the stored reference (this SQLite grid store) and the stored tunes' scores (in "
                         "--work-dir) again at the end of the budget, without training; then judge as usual")
    ap.add_argument("--out", type=Path, default=Path("bench/results/cost_vs_full.json"))
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/cost_vs_full"))
    args = ap.parse_args(argv)
    report: dict[str, Any] = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                              "settings": {k: str(v) for k, v in vars(args).items()}, "workloads": {}}
    if args.out.exists():
        report["workloads"] = json.loads(args.out.read_text()).get("workloads", {})
    for name in args.workloads.split(","):
        spec, options, budget = WORKLOADS[name]
        out = report["workloads"].setdefault(name, {"spec": spec, "options": options, "train_budget": budget})
        root = args.work_dir / name
        root.mkdir(parents=True, exist_ok=True)
        if args.rescore is not None:
            rescore(out, args.rescore, root)
            write_json(args.out, report)
        if "reference" not in out and not args.no_reference:
            out["reference"] = reference(spec, options, budget, args.ref_seeds, root / "grid.db", args.ref_lrs,
                                         args.micro_limit)
            write_json(args.out, report)
        verdict = judge(out["reference"], args.tolerance) if "reference" in out else None
        out["verdict_basis"] = verdict
        if verdict is not None:
            print(f"[{name}] reference best {verdict['best']}; non-inferior {verdict['non_inferior']}", flush=True)
        tunes = out.setdefault("tunes", [])
        for cap in (float(c) for c in args.caps.split(",")):
            for seed in range(args.tune_seeds):
                if any(t["cap"] == cap and t["seed"] == seed for t in tunes):
                    continue
                t = one_tune(spec, options, budget, cap, seed, root / f"tune_c{cap:g}_s{seed}")
                if t["batch_size"] and verdict is not None:
                    b, lr = t["batch_size"], t["lr"]
                    score = _score_config(spec, options, b, lr, budget, args.ref_seeds,
                                          out["reference"]["eval_every"], _base_lr(t),
                                          root / f"score_c{cap:g}_s{seed}.db", final=True)
                    best = verdict["best"]["quality"]
                    t.update(quality=score, quality_interval=_seed_interval(score["qualities"]),
                             relative_gap_to_best=_gap(best, score["quality_mean"],
                                                       verdict.get("higher_is_better", True)),
                             batch_non_inferior=b in verdict["non_inferior"])
                    _lr_factors(t, verdict)
                tunes.append(t)
                print(f"[{name}] cap {cap:g} seed {seed}: batch {t['batch_size']} LR {t['lr'] or float('nan'):.4g} "
                      f"cost {t['runs']:.2f} runs, gap {_or(t.get('relative_gap_to_best'), float('nan')):.2%}, "
                      f"non-inferior {t.get('batch_non_inferior')}, LR factor {t.get('lr_factor_from_reference')}",
                      flush=True)
                write_json(args.out, report)
        if args.load and "loaded" not in out:
            from recommendation_stability import _busy, _stop

            cap = float(args.caps.split(",")[0])
            procs = _busy(2)
            try:
                loaded = one_tune(spec, options, budget, cap, 0, root / f"tune_c{cap:g}_s0_loaded")
            finally:
                _stop(procs)
            quiet = next((t for t in tunes if t["cap"] == cap and t["seed"] == 0), None)
            loaded["same_as_quiet"] = quiet is not None and (loaded["batch_size"], loaded["lr"]) == (
                quiet["batch_size"], quiet["lr"])
            out["loaded"] = loaded
            print(f"[{name}] under load, cap {cap:g} seed 0: batch {loaded['batch_size']} LR {loaded['lr']:.4g}, "
                  f"cost {loaded['runs']:.2f} runs, same as quiet: {loaded['same_as_quiet']}", flush=True)
            write_json(args.out, report)
        if verdict is not None:  # every tune judged against this verdict (a rerun re-judges the stored tunes)
            for t in [*tunes, *([out["loaded"]] if "loaded" in out else [])]:
                _lr_factors(t, verdict)
                _rejudge(t, verdict, args.tolerance)
        by_cap: dict[str, Any] = {}
        for cap in sorted({t["cap"] for t in tunes}):
            ts = [t for t in tunes if t["cap"] == cap and t["batch_size"]]
            if not ts:
                continue
            bs = [t["batch_size"] for t in ts]
            med = statistics.median(bs)
            by_cap[f"{cap:g}"] = {
                "runs": [round(t["runs"], 3) for t in ts], "batch": bs, "lr": [t["lr"] for t in ts],
                "max_runs": max(t["runs"] for t in ts),
                "worst_gap": max(_or(t.get("relative_gap_to_best"), float("inf")) for t in ts),
                "all_non_inferior": all(t.get("batch_non_inferior") for t in ts),
                "worst_lr_factor": max((t.get("lr_factor_from_reference") or float("inf")) for t in ts),
                "worst_lr_factor_argmax": max((t.get("lr_factor_from_reference_argmax") or float("inf"))
                                              for t in ts),
                "all_lr_tied": all(t.get("lr_in_tied_range") for t in ts),
                "batch_within_x2": all(med / 2 <= b <= med * 2 for b in bs)}
        out["summary"] = by_cap
        write_json(args.out, report)
        print(f"[{name}] {json.dumps(by_cap)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
