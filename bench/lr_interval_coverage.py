"""Does the LR check's interval hold the whole run's best LR? Stored capped tunes against their references.

For every tune of a ``cost_vs_full`` results file whose folder still holds its ``lr.json``, the check's interval is
computed again from its stored scores with the current :func:`batchfit.tuning.lr_interval` (so a change to the
interval is judged on the same measurements), moved to the batch the check ran at (its runs' LRs hold the LR rule's
scale there), and compared with the reference's best LR at that batch (:func:`cost_vs_full.fitted_best_lr`, the
vertex through the best seed mean and its neighbours). Prints one line a tune and the count covered, with the
interval's width (high / low).

Run (docs/benchmarks.md, "Issue 18: where every target stands"):
    python bench/lr_interval_coverage.py bench/results/cost_vs_full_mnist1d_c1.0_current.json \\
        bench/results/cost_vs_full_mnist1d_c0.5_race_below.json bench/results/cost_vs_full_tiny_lm_current.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batchfit.decide import LRCheck  # noqa: E402
from batchfit.metric import Metric  # noqa: E402
from batchfit.stats import Interval  # noqa: E402
from batchfit.tuning import _best_multiplier, lr_interval  # noqa: E402
from cost_vs_full import fitted_best_lr  # noqa: E402


def check_interval(check: LRCheck, higher: bool) -> tuple[list[float], list[str], float] | None:
    """The interval the current code gives for a stored check, at the batch it ran at; its open sides; the scale from
    the base LR to that batch (the rule's). ``None`` when the check scored nothing."""
    ivs = {float(m): Interval.from_dict(v) for m, v in (check.intervals or {}).items()}
    if not ivs or not check.runs:
        return None
    metric = Metric(check.metric, higher)
    deciding = [r for r in check.runs if r.get("steps") == check.steps] or check.runs
    chosen = (check.lr_at_check_horizon or check.lr) / check.base_lr
    # the check carries only a moved LR (a kept base stays x1), and its interval is carried the same way
    fraction = (check.horizon_fraction or 1.0) if check.horizon_factor != 1.0 else 1.0
    interval, sides = lr_interval(check.base_lr, chosen if _best_multiplier(ivs, metric) is not None else 1.0, ivs,
                                  metric, [float(r["multiplier"]) for r in deciding], check.horizon_factor, fraction)
    run = check.runs[0]
    scale = float(run["lr"]) / (check.base_lr * float(run["multiplier"]))
    return interval, sides, scale


def coverage(results: Path) -> list[dict[str, Any]]:
    rows = []
    for name, w in json.loads(results.read_text())["workloads"].items():
        ref = w.get("reference")
        if ref is None:
            continue
        higher = bool(ref.get("higher_is_better", True))
        for t in [*w.get("tunes", []), *([w["loaded"]] if "loaded" in w else [])]:
            path = Path(t["out"]) / "lr.json"
            if not path.exists():
                continue
            check = LRCheck.from_dict(json.loads(path.read_text()))
            got = check_interval(check, higher)
            if got is None:
                continue
            (low, high), sides, scale = got
            truth = fitted_best_lr(ref, check.batch_size, higher)
            rows.append({"workload": name, "cap": t["cap"], "seed": t["seed"], "loaded": t is w.get("loaded"),
                         "batch": check.batch_size, "interval": [low * scale, high * scale], "open": sides,
                         "stored": [x * scale for x in check.lr_interval or [low, high]], "best": truth,
                         "covered": low * scale <= truth <= high * scale, "width": high / low,
                         "stored_covered": check.lr_interval is not None
                         and check.lr_interval[0] * scale <= truth <= check.lr_interval[1] * scale})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="cost_vs_full results files")
    args = ap.parse_args(argv)
    rows = [r for p in args.results for r in coverage(p)]
    for r in rows:
        print(f"{r['workload']:9s} cap {r['cap']:g} seed {r['seed']}{' (loaded)' if r['loaded'] else ''}: batch "
              f"{r['batch']}, [{r['interval'][0]:.3g}, {r['interval'][1]:.3g}] (x{r['width']:.1f} wide"
              f"{', open ' + ' and '.join(r['open']) if r['open'] else ''}; stored [{r['stored'][0]:.3g}, "
              f"{r['stored'][1]:.3g}]) against {r['best']:.3g}: {'covered' if r['covered'] else 'MISSED'}")
    tunes = [r for r in rows if not r["loaded"]]
    for name in sorted({r["workload"] for r in tunes}):
        some = [r for r in tunes if r["workload"] == name]
        width = sorted(r["width"] for r in some)[len(some) // 2]
        print(f"{name}: covered {sum(r['covered'] for r in some)} of {len(some)} (the stored intervals: "
              f"{sum(r['stored_covered'] for r in some)}); median width x{width:.1f}")
    print(f"covered: {sum(r['covered'] for r in tunes)} of {len(tunes)} tunes (the stored intervals: "
          f"{sum(r['stored_covered'] for r in tunes)}; loaded runs left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
