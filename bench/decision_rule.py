"""The decision rule's error rates, simulated at the measured seed spread (issue 19.1).

Eight candidate batch sizes (16 ... 2048). Shape ``step``: the four fastest are truly worse than the best by ``gap``
(a multiple of the tolerance ``delta``), the four slowest equal to it; shape ``curve``: flat to 128, then falling
smoothly (quadratic in log2 B) to ``-gap x delta`` at 2048. Each repetition draws ``seeds`` seeds: a seed effect
shared by every candidate (``seed_sd``) plus each run's own noise (``sd``). Three rules decide on the same draws:

- **curve** (``batchfit.stats.select_non_inferior`` with positions, what ``decide`` uses): one quadratic curve in
  log2(batch) over every seed with seed effects (falling back to per-batch means on lack of fit), simultaneous max-t
  bounds; non-inferior when the low bound lies above ``-delta``; the fastest non-inferior is chosen;
- **paired** (the same without positions): per-batch means in the paired two-way model;
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


POSITIONS = {i: float(4 + i) for i in range(8)}  # log2 of batch sizes 16 ... 2048


def _mu(gap: float, shape: str, delta: float) -> np.ndarray:
    if shape == "step":  # four equal, four worse by the gap
        return np.array([0.0] * 4 + [-gap * delta] * 4)
    # a smooth curve: flat to batch 128, then falling to -gap x delta at 2048 (quadratic in log2 B)
    return np.array([-gap * delta * max(0.0, (i - 3) / 4) ** 2 for i in range(8)])


def simulate(gap: float, *, seeds: int, sd: float, seed_sd: float, delta: float, reps: int, seed: int,
             shape: str = "step") -> dict:
    rng = np.random.default_rng(seed)
    mu = _mu(gap, shape, delta)
    worse = mu < -delta
    equal = [i for i in range(8) if mu[i] == 0.0]
    bad = [i for i in range(8) if worse[i]]
    rules = ("curve", "paired", "old")
    out = {r: {"worse_tied": 0, "equal_apart": 0, "equal_shown": 0, "equal_n": 0, "chose_worse": 0, "picks": []}
           for r in rules}
    for _ in range(reps):
        y = mu[:, None] + rng.normal(0, seed_sd, seeds)[None, :] + rng.normal(0, sd, (8, seeds))
        vals = {i: dict(enumerate(y[i])) for i in range(8)}
        curve = stats.select_non_inferior(vals, tolerance=delta, positions=POSITIONS)
        paired = stats.select_non_inferior(vals, tolerance=delta)
        old_tied, old_pick = _old_rule(y, delta)
        old_ref = max(range(8), key=lambda i: y[i].mean())
        for name, tied, pick, ref, sel in (("curve", list(curve.non_inferior), max(curve.non_inferior),
                                            curve.reference, curve),
                                           ("paired", list(paired.non_inferior), max(paired.non_inferior),
                                            paired.reference, paired),
                                           ("old", old_tied, old_pick, old_ref, None)):
            o = out[name]
            o["worse_tied"] += sum(1 for i in tied if i in bad and i != ref)
            o["chose_worse"] += pick in bad
            o["equal_shown"] += sum(1 for i in tied if i in equal and i != ref)
            o["equal_n"] += len(equal) - (ref in equal)
            o["picks"].append(pick)
            if sel is not None:
                o["equal_apart"] += sum(1 for i in equal if sel.comparisons[i].verdict == "inferior")
    res = {}
    for name, o in out.items():
        picks = np.array(o["picks"])
        res[name] = {"worse_called_tied": o["worse_tied"] / max(1, len(bad) * reps),
                     "chose_a_worse_batch": o["chose_worse"] / reps,
                     "equal_shown_or_tied": o["equal_shown"] / max(1, o["equal_n"]),
                     "pick_spread_x": float(2 ** (np.quantile(picks, 0.9) - np.quantile(picks, 0.1)))}
        if name != "old":
            res[name]["equal_called_worse"] = o["equal_apart"] / max(1, len(equal) * reps)
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
    for shape in ("step", "curve"):
        for seeds in (2, 3, 5):
            for gap in (0.0, 0.5, 1.5, 2.0, 3.0):
                r = simulate(gap, seeds=seeds, sd=a.sd, seed_sd=a.seed_sd, delta=a.delta, reps=a.reps,
                             seed=int(100 * seeds + 10 * gap), shape=shape)
                rows.append({"shape": shape, "seeds": seeds, "gap_in_tolerances": gap, **r})
                print(f"{shape} seeds {seeds} gap {gap}: " + "  ".join(
                    f"{k} " + " ".join(f"{n}={v:.3f}" for n, v in r[k].items()) for k in r), flush=True)
    data = {"command": "python bench/decision_rule.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                   for k, v in vars(a).items()),
            "settings": vars(a), "rows": rows, "seconds": time.perf_counter() - t0}
    with open(a.out, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
