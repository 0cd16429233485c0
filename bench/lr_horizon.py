"""How the best LR moves with the horizon, and what the capped LR check's race would choose from it.

``pool``: one workload at its base batch, every LR multiplier x1/4 ... x64 (x2 apart) x ``--seeds`` seeds x each
horizon in ``--steps`` (constant LR, the LR check's own run: ``train_everywhere`` at the check's batch); per run the
validation accuracy and loss at the end. Resumable (the JSON is rewritten after every run).

``race``: the race of ``batchfit.tuning._calibrate_lr`` replayed on the pool, seed by seed (rung 0 at ``s0`` steps
on a given grid, rung 1 = its best and the x1/2, x2 neighbours at ``s1`` plus one x2 step past an edge, the peak by
the three-point vertex, carried by ``factor``), and the carried LR's accuracy read off the pool's mean curve at the
whole run (``full`` steps) -- the quality gap that LR would cost at that batch.

Run (docs/decisions.md, "The capped LR check is a race"):
    python bench/lr_horizon.py pool demo:mnist1d --steps 8,34,136,272,625 --seeds 8 \
        --out bench/results/lr_horizon_mnist1d.json
    python bench/lr_horizon.py pool demo:digits-mlp --steps 8,12,34,49,136,449,898 --seeds 8 \
        --out bench/results/lr_horizon_digits.json
    python bench/lr_horizon.py race bench/results/lr_horizon_mnist1d.json --horizons 8,34,625 --factor 0.418
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

MULTIPLIERS = [2.0 ** k for k in range(-2, 7)]
GRIDS = {"one-rung x1/4..x8": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0], "x4 apart x1/4..x64": [0.25, 1.0, 4.0, 16.0, 64.0]}


def pool(spec: str, steps_list: list[int], seeds: int, out: Path) -> None:
    import torch

    from batchfit.loading import load_workload
    from batchfit.study.trial import train_everywhere

    torch.set_num_threads(1)
    wl = load_workload(spec, **({"num_samples": 4000} if spec == "demo:mnist1d" else {}))
    res: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    done = {(r["m"], r["seed"], r["steps"]) for r in res}
    for steps in steps_list:
        for seed in range(seeds):
            for m in MULTIPLIERS:
                if (m, seed, steps) in done:
                    continue
                t0 = time.time()
                r = train_everywhere(wl, batch_size=wl.base_batch_size, lr=wl.base_lr * m, steps=steps,
                                     device="cpu", precision="fp32", seed=seed)
                last = r.history[-1] if r.history else {}
                res.append({"m": m, "seed": seed, "steps": steps, "batch": wl.base_batch_size,
                            "acc": (last.get("val_metrics") or {}).get("accuracy"), "loss": last.get("val_loss"),
                            "diverged": r.diverged, "sec": round(time.time() - t0, 3)})
                out.write_text(json.dumps(res))
    summary(res)


def _curve(res: list[dict[str, Any]], steps: int, key: str) -> dict[float, list[float]]:
    return {m: [r[key] for r in res if r["steps"] == steps and r["m"] == m and r[key] is not None]
            for m in MULTIPLIERS}


def _peak(scores: dict[float, float]) -> float:
    """The three-point vertex around the best (larger is better), in log2(m); the edge itself at an edge."""
    from batchfit.stats import three_point_peak

    ms = sorted(scores)
    i = int(np.argmax([scores[m] for m in ms]))
    if i in (0, len(ms) - 1):
        return ms[i]
    v = three_point_peak([(math.log2(ms[j]), scores[ms[j]]) for j in (i - 1, i, i + 1)])
    return 2 ** v if v is not None else ms[i]


def summary(res: list[dict[str, Any]]) -> None:
    for steps in sorted({r["steps"] for r in res}):
        for key, sign in (("acc", 1), ("loss", -1)):
            c = _curve(res, steps, key)
            mean = {m: sign * float(np.mean(v)) for m, v in c.items() if v}
            print(f"{steps:5d} steps {key:4s} peak of the seed-mean curve x{_peak(mean):.3g}: " + " ".join(
                f"x{m:g} {np.mean(v):.3f}±{np.std(v, ddof=1):.3f}" for m, v in c.items() if len(v) > 1))


def race(res: list[dict[str, Any]], s0: int, s1: int, full: int, factor: float, key: str) -> None:
    sign = 1 if key == "acc" else -1
    seeds = sorted({r["seed"] for r in res})

    def score(steps: int, seed: int, m: float) -> float:
        return sign * next(r[key] for r in res if r["steps"] == steps and r["seed"] == seed and r["m"] == m)

    peak = {h: _peak({m: sign * float(np.mean(v)) for m, v in _curve(res, h, key).items() if v}) for h in (s1, full)}
    print(f"by {key}: the seed-mean curve's peak x{peak[s1]:.3g} at {s1} steps, x{peak[full]:.3g} at {full}: "
          f"exponent {math.log(peak[s1] / peak[full]) / math.log(full / s1):.2f}")
    full_curve = {m: float(np.mean(v)) for m, v in _curve(res, full, "acc").items()}
    best = max(full_curve.values())
    for name, grid in GRIDS.items():
        peaks, carried, gaps = [], [], []
        for seed in seeds:
            r0 = {m: score(s0, seed, m) for m in grid}
            c = max(r0, key=r0.get)
            r1 = {m: score(s1, seed, m) for m in (c, c / 2, c * 2) if m in MULTIPLIERS}
            b = max(r1, key=r1.get)
            nxt = b * 2 if b == max(r1) else (b / 2 if b == min(r1) else None)
            if nxt in MULTIPLIERS:
                r1[nxt] = score(s1, seed, nxt)
            p = _peak(r1)
            lr = p * factor
            acc = float(np.interp(math.log2(lr), [math.log2(m) for m in MULTIPLIERS],
                                  [full_curve[m] for m in MULTIPLIERS]))
            peaks.append(p), carried.append(lr), gaps.append(100 * (best - acc) / best)
        print(f"{name:20s} scored by {key}: rung-1 peak " + " ".join(f"x{p:.3g}" for p in peaks) + "; carried "
              + " ".join(f"x{x:.3g}" for x in carried) + "; gap at the whole run (%) "
              + " ".join(f"{g:.1f}" for g in gaps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pool")
    p.add_argument("spec")
    p.add_argument("--steps", required=True)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("race")
    r.add_argument("pool", type=Path)
    r.add_argument("--horizons", required=True, help="s0,s1,full steps")
    r.add_argument("--factor", type=float, required=True, help="the carrying factor (s1 / full) ** exponent")
    a = ap.parse_args()
    if a.cmd == "pool":
        pool(a.spec, [int(s) for s in a.steps.split(",")], a.seeds, a.out)
    else:
        res = json.loads(a.pool.read_text())
        summary(res)
        s0, s1, full = (int(x) for x in a.horizons.split(","))
        for key in ("acc", "loss"):
            race(res, s0, s1, full, a.factor, key)


if __name__ == "__main__":
    main()
