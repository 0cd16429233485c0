"""Two configurations of a full-horizon reference grid, paired seed by seed at every evaluation point.

When does a whole run first tell two configurations apart? ``cost_vs_full``'s reference (a sweep store: every batch x
LR multiplier x seed for the whole train budget, evaluated along the way) holds the answer. For one batch size and
two LR multipliers, every seed's two runs share that seed's initialization and data order, so their difference at
an evaluation point cancels what the seed does to both; the mean difference over seeds with 2 standard errors says,
point by point, whether the run so far separates them. ``--key`` picks the validation loss (``val_loss``, default)
or a validation metric (``accuracy``). ``--peaks`` also prints, per evaluation point, the seed-mean best multiplier
at that batch (how the best LR moves with the horizon).

Run (docs/benchmarks.md, "examples/text_dict with the current code, and why no capped tune can answer it"):
    python bench/reference_curves.py /tmp/w21/text_dict/grid9.db --batch 16 --a 4 --b 1 --peaks
    python bench/reference_curves.py /tmp/w21/text_dict/grid9.db --batch 16 --a 4 --b 1 --key accuracy
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from batchfit.metric import Metric

Curves = dict[tuple[int, float], dict[int, list[dict[str, Any]]]]


def load_curves(store: Path) -> tuple[Curves, int]:
    """``{(batch, multiplier): {seed: evaluations by samples}}`` of every trial in the store
    (:func:`batchfit.study.load_results`), and the budget's samples (the most any trial trained)."""
    from batchfit.study import load_results

    curves: Curves = {}
    for t in load_results(f"sqlite:///{store}").trials:
        if t.lr_multiplier is None or not t.history:
            continue
        evals = sorted(t.history, key=lambda e: e.get("samples") or 0)
        curves.setdefault((int(t.batch_size), float(t.lr_multiplier)), {})[int(t.seed or 0)] = evals
    total = max((e.get("samples") or 0 for c in curves.values() for ev in c.values() for e in ev), default=0)
    return curves, total


def metric_of(key: str) -> Metric:
    """``val_loss`` (lower is better) or a validation metric (higher is better), read by :meth:`Metric.of_record`."""
    return Metric(key, key != "val_loss")


def value(evaluation: dict[str, Any], key: str) -> float:
    v = metric_of(key).of_record(evaluation)
    return math.nan if v is None else v


def paired(curves: Curves, batch: int, a: float, b: float, key: str) -> list[dict[str, float]]:
    """At every evaluation point both configurations reached on every shared seed: the mean of ``a - b`` over the
    seeds and 2 standard errors (``nan`` with one seed)."""
    ca, cb = curves[(batch, a)], curves[(batch, b)]
    seeds = sorted(set(ca) & set(cb))
    points = min(min(len(ca[s]), len(cb[s])) for s in seeds)
    out = []
    for i in range(points):
        d = [value(ca[s][i], key) - value(cb[s][i], key) for s in seeds]
        se2 = 2 * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
        out.append({"samples": ca[seeds[0]][i]["samples"], "mean": statistics.mean(d), "two_se": se2,
                    "seeds": len(d)})
    return out


def peaks(curves: Curves, batch: int, key: str) -> list[tuple[int, float]]:
    """Per evaluation point, the multiplier whose seed mean is best (lowest loss, highest metric)."""
    mults = sorted(m for (bb, m) in curves if bb == batch)
    points = min(len(ev) for m in mults for ev in curves[(batch, m)].values())
    first = next(iter(curves[(batch, mults[0])].values()))
    sign = -1.0 if metric_of(key).higher_is_better else 1.0
    out = []
    for i in range(points):
        means = {m: statistics.mean(value(ev[i], key) for ev in curves[(batch, m)].values()) for m in mults}
        out.append((first[i]["samples"], min(mults, key=lambda m: sign * means[m])))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path, help="a reference grid's sqlite store (cost_vs_full --work-dir)")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--a", type=float, required=True, help="LR multiplier (of the rule's LR) of the first")
    ap.add_argument("--b", type=float, default=1.0, help="LR multiplier of the second (default x1)")
    ap.add_argument("--key", default="val_loss", help="val_loss (default) or a validation metric's name")
    ap.add_argument("--peaks", action="store_true", help="also the seed-mean best multiplier at every point")
    args = ap.parse_args(argv)
    curves, total = load_curves(args.store)
    for key in ((args.batch, args.a), (args.batch, args.b)):
        if key not in curves:
            print(f"no trials at batch {key[0]}, x{key[1]:g} in {args.store}", file=sys.stderr)
            return 2
    print(f"batch {args.batch}: x{args.a:g} - x{args.b:g}, {args.key}, mean +- 2 standard errors over paired seeds")
    for p in paired(curves, args.batch, args.a, args.b, args.key):
        apart = abs(p["mean"]) > p["two_se"]
        print(f"  {p['samples'] / total:6.1%} of the run  {p['mean']:+.4f} +- {p['two_se']:.4f}"
              f"  ({p['seeds']} seeds){'  apart' if apart else ''}")
    if args.peaks:
        print(f"the seed-mean best multiplier at batch {args.batch} by {args.key}:")
        print("  " + ", ".join(f"{s / total:.0%}: x{m:g}" for s, m in peaks(curves, args.batch, args.key)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
