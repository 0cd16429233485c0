"""The decision rule's error rates, simulated at the measured seed spread (issue 19.1).

Eight candidate batch sizes; the four fastest are truly worse than the best by ``gap`` (a multiple of the tolerance
``delta``), the four slowest equal to it. Each repetition draws ``seeds`` seeds: a seed effect shared by every
candidate (``seed_sd``) plus each run's own noise (``sd``). Two rules decide on the same draws:

- **new** (``batchfit.stats.select_non_inferior``): paired two-way model, simultaneous max-t bounds, a candidate is
  non-inferior when its low bound lies above ``-delta``; the fastest non-inferior is chosen;
- **old** (the rule before issue 19): pooled-variance t intervals of each candidate's seed mean widened to a half-width
  of at least ``delta / 2``, "tied" when they overlap the best's; the fastest tied is chosen.

Reported per gap: the share of the worse candidates' comparisons called tied / non-inferior (false "tied" when the
gap exceeds the tolerance), the share of the equal candidates called worse (false "apart") or shown non-inferior
(power), and the share of repetitions that chose a worse candidate (wrong choice when the gap exceeds the
tolerance).

    python bench/decision_rule.py --out bench/results/decision_rule_sim.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from batchfit import stats


def _old_rule(y: np.ndarray, delta: float) -> tuple[list[int], int]:
    ivs = stats.pooled_mean_intervals({i: list(y[i]) for i in range(len(y))})
    q = {}
    for i, iv in ivs.items():
        if iv is None:
            iv = stats.Interval(float(y[i].mean()), None, None)
        half = delta / 2
        if not iv.known:
            iv = stats.Interval(iv.estimate, iv.estimate - half, iv.estimate + half)
        else:
            iv = stats.Interval(iv.estimate, min(iv.low, iv.estimate - half), max(iv.high, iv.estimate + half))
        q[i] = iv
    best = max(q, key=lambda i: q[i].estimate)
    tied = [i for i in q if q[i].overlaps(q[best])]
    return tied, max(tied)


def simulate(gap: float, *, seeds: int, sd: float, seed_sd: float, delta: float, reps: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    mu = np.array([0.0] * 4 + [-gap * delta] * 4)
    out = {r: {"worse_tied": 0, "equal_apart": 0, "equal_shown": 0, "equal_n": 0, "chose_worse": 0}
           for r in ("new", "old")}
    for _ in range(reps):
        y = mu[:, None] + rng.normal(0, seed_sd, seeds)[None, :] + rng.normal(0, sd, (8, seeds))
        sel = stats.select_non_inferior({i: dict(enumerate(y[i])) for i in range(8)}, tolerance=delta)
        new_tied = list(sel.non_inferior)
        old_tied, old_pick = _old_rule(y, delta)
        old_ref = max(range(8), key=lambda i: y[i].mean())
        for name, tied, pick, ref in (("new", new_tied, max(new_tied), sel.reference),
                                      ("old", old_tied, old_pick, old_ref)):
            o = out[name]
            o["worse_tied"] += sum(1 for i in tied if i >= 4 and i != ref)
            o["chose_worse"] += pick >= 4 and gap > 0
            o["equal_shown"] += sum(1 for i in tied if i < 4 and i != ref)
            o["equal_n"] += 4 - (ref < 4)
        out["new"]["equal_apart"] += sum(1 for i in range(4) if sel.comparisons[i].verdict == "inferior")
    res = {}
    for name, o in out.items():
        res[name] = {"worse_called_tied": o["worse_tied"] / (4 * reps),
                     "chose_a_worse_batch": o["chose_worse"] / reps,
                     "equal_shown_or_tied": o["equal_shown"] / max(1, o["equal_n"])}
        if name == "new":
            res[name]["equal_called_worse"] = o["equal_apart"] / (4 * reps)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--sd", type=float, default=0.0025, help="each run's own noise (digits: residual sd 0.0025)")
    ap.add_argument("--seed-sd", type=float, default=0.005, help="the seed effect shared by every batch size")
    ap.add_argument("--delta", type=float, default=0.0094, help="the tolerance (1 %% of digits' 0.94 accuracy)")
    ap.add_argument("--out", default="bench/results/decision_rule_sim.json")
    a = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    for seeds in (2, 3, 5):
        for gap in (0.0, 0.5, 1.5, 2.0, 3.0):
            r = simulate(gap, seeds=seeds, sd=a.sd, seed_sd=a.seed_sd, delta=a.delta, reps=a.reps,
                         seed=int(100 * seeds + 10 * gap))
            rows.append({"seeds": seeds, "gap_in_tolerances": gap, **r})
            print(f"seeds {seeds} gap {gap}: new {r['new']}  old {r['old']}", flush=True)
    data = {"command": "python bench/decision_rule.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                   for k, v in vars(a).items()),
            "settings": vars(a), "rows": rows, "seconds": time.perf_counter() - t0}
    with open(a.out, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
