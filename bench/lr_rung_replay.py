"""The LR check's race replayed on learning curves: what a change to the race would do, before running tunes.

``curves``: at one batch, every LR multiplier (of the workload's base LR) x ``--seeds`` seeds for ``--steps``
steps at constant LR, evaluated every ``--every`` steps (a run's prefix is the shorter run: the same seed, the same
data order). Resumable (the JSON is rewritten after every run).

``spread``: the single-seed peak of the LR-response curve at the curves' last step, scored by the last evaluation
(``last``), the mean of the last 3 (``last3``), or of every evaluation in the last 3/16 of the steps (``win``): how
much each score narrows the peak's spread over seeds (sd of log2).

``prefix``: the seed-mean curve's peak at every evaluated step (how the best LR moves within a rung).

``pool-exponent``: per seed, how fast the best LR falls between two horizons of a ``bench/lr_horizon.py`` pool.

``replay``: the race seed by seed -- the first rung on ``--grid0`` at ``--s0`` steps (argmax, or ``--centre
vertex``: a parabola through all its scores), the second rung (the centre, x1/2, x2, one more x2 past an edge) at
``--s1``, the peak carried by ``(s1 x batch / train samples) ** --exponent`` -- and the carried LR's accuracy at
the whole run read off either a pool's whole-run curve (``bench/lr_horizon.py pool``, at the same batch) or a
``cost_vs_full`` reference's seed means at ``--at-batch`` (the LR moved there by the square-root rule).

Run (docs/decisions.md, "Could the check measure the exponent itself, or a less noisy peak?" and "A race below
the base batch"):
    python bench/lr_rung_replay.py curves demo:mnist1d --batch 64 --steps 34 --every 2 --mults 2,4,8,16,32,64,128 \\
        --seeds 16 --out bench/results/lr_curves_mnist1d_b64.json
    python bench/lr_rung_replay.py curves demo:digits-mlp --batch 32 --steps 49 --every 2 --mults 2,4,8,16,32,64,128 \\
        --seeds 16 --out bench/results/lr_curves_digits_b32.json
    python bench/lr_rung_replay.py curves demo:mnist1d --batch 16 --steps 150 --every 2 --mults 1,2,4,8,16,32,64 \\
        --seeds 8 --out bench/results/lr_curves_mnist1d_b16.json
    python bench/lr_rung_replay.py spread bench/results/lr_curves_mnist1d_b64.json --metric acc
    python bench/lr_rung_replay.py pool-exponent bench/results/lr_horizon_mnist1d.json --horizons 34,136
    python bench/lr_rung_replay.py replay bench/results/lr_curves_mnist1d_b64.json --s0 8 --s1 34 --grid0 4,16,64 \\
        --train-samples 40000 --pool bench/results/lr_horizon_mnist1d.json --full 625 --score win
    python bench/lr_rung_replay.py replay bench/results/lr_curves_mnist1d_b16.json --s0 18 --s1 72 --grid0 2,8,32 \\
        --train-samples 40000 --reference bench/results/cost_vs_full_mnist1d_race4a_c1.0.json --at-batch 16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def curves(spec: str, batch: int, steps: int, every: int, mults: list[float], seeds: int, out: Path) -> None:
    import torch

    from batchfit.loading import load_workload
    from batchfit.study.trial import train_everywhere

    torch.set_num_threads(1)
    wl = load_workload(spec, **({"num_samples": 4000} if spec == "demo:mnist1d" else {}))
    res: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    done = {(r["m"], r["seed"]) for r in res}
    for seed in range(seeds):
        for m in mults:
            if (m, seed) in done:
                continue
            t0 = time.time()
            r = train_everywhere(wl, batch_size=batch, lr=wl.base_lr * m, steps=steps, device="cpu",
                                 precision="fp32", seed=seed, eval_every=every)
            hist = [{"step": h.get("step"), "acc": (h.get("val_metrics") or {}).get("accuracy"),
                     "loss": h.get("val_loss")} for h in r.history]
            res.append({"m": m, "seed": seed, "steps": steps, "batch": batch, "diverged": r.diverged,
                        "hist": hist, "sec": round(time.time() - t0, 2)})
            out.write_text(json.dumps(res))


def _peak(scores: dict[float, float]) -> float:
    """Three-point vertex around the best in log2 (larger is better); the best itself at an edge."""
    from batchfit.stats import three_point_peak

    ms = sorted(scores)
    v = [scores[m] for m in ms]
    i = int(np.argmax(v))
    if i in (0, len(ms) - 1):
        return ms[i]
    p = three_point_peak([(math.log2(ms[j]), v[j]) for j in (i - 1, i, i + 1)])
    return 2 ** p if p is not None else ms[i]


def _score(run: dict[str, Any], key: str, mode: str, step: int | None = None) -> float:
    """``key`` (acc: larger is better; loss: negated) at ``step`` (the nearest evaluation), or at the run's end by
    ``mode``."""
    sign = 1.0 if key == "acc" else -1.0
    h = [x for x in run["hist"] if x[key] is not None]
    if step is not None:
        return sign * min(h, key=lambda x: abs(x["step"] - step))[key]
    if mode == "last":
        return sign * h[-1][key]
    if mode == "last3":
        return sign * float(np.mean([x[key] for x in h[-3:]]))
    return sign * float(np.mean([x[key] for x in h if x["step"] >= run["steps"] * 13 / 16]))


def spread(res: list[dict[str, Any]], key: str) -> None:
    ms = sorted({r["m"] for r in res})
    for mode in ("last", "last3", "win"):
        peaks = []
        for s in sorted({r["seed"] for r in res}):
            peaks.append(_peak({r["m"]: _score(r, key, mode) for r in res if r["seed"] == s and not r["diverged"]}))
        mean = {m: float(np.mean([_score(r, key, mode) for r in res if r["m"] == m and not r["diverged"]]))
                for m in ms}
        lp = np.log2(peaks)
        print(f"{mode:5s}: seed-mean curve's peak x{_peak(mean):.3g}; single-seed peaks geo-mean x{2 ** lp.mean():.3g}"
              f", sd(log2) {lp.std(ddof=1):.3f}, range x{min(peaks):.3g}-x{max(peaks):.3g} over {len(peaks)} seeds")


def prefix(res: list[dict[str, Any]], key: str) -> None:
    ms = sorted({r["m"] for r in res})
    steps = sorted({x["step"] for r in res for x in r["hist"]})
    print(" ".join(f"{s}:x{_peak({m: float(np.mean([_score(r, key, '', s) for r in res if r['m'] == m and not r['diverged']])) for m in ms}):.3g}"  # noqa: E501
                   for s in steps))


def pool_exponent(pool: list[dict[str, Any]], h1: int, h2: int, key: str) -> None:
    """Per seed, the exponent of the best LR's fall from ``h1`` to ``h2`` steps on a ``bench/lr_horizon.py`` pool
    (the same seed at both horizons: the shorter run is the longer one's prefix)."""
    sign = 1.0 if key == "acc" else -1.0
    es = []
    for s in sorted({r["seed"] for r in pool}):
        p = [_peak({r["m"]: sign * r[key] for r in pool if r["steps"] == h and r["seed"] == s and r[key] is not None})
             for h in (h1, h2)]
        es.append(math.log(p[0] / p[1]) / math.log(h2 / h1))
    print(f"exponent {h1} -> {h2} steps by {key}, per seed: " + " ".join(f"{e:.2f}" for e in es)
          + f"; mean {np.mean(es):.2f}, sd {np.std(es, ddof=1):.2f}")


def _quality_at(args: argparse.Namespace, batch: int) -> tuple[Any, float]:
    """``(LR at the check's batch -> accuracy at the whole run, the best accuracy)``."""
    if args.pool:
        pool = json.loads(Path(args.pool).read_text())
        pm = sorted({r["m"] for r in pool if r["steps"] == args.full})
        curve = {m: float(np.mean([r["acc"] for r in pool if r["steps"] == args.full and r["m"] == m
                                   and r["acc"] is not None])) for m in pm}
        base_lr = args.base_lr
        return (lambda lr: float(np.interp(math.log2(lr / base_lr), [math.log2(m) for m in pm],
                                           [curve[m] for m in pm]))), max(curve.values())
    ref = next(iter(json.loads(Path(args.reference).read_text())["workloads"].values()))["reference"]
    cfg = sorted((c["lr"], c["quality_mean"]) for c in ref["configs"] if c["batch_size"] == args.at_batch)
    move = math.sqrt(args.at_batch / batch)  # the square-root rule from the check's batch to the scored one
    return (lambda lr: float(np.interp(math.log2(lr * move), [math.log2(x) for x, _ in cfg],
                                       [q for _, q in cfg]))), ref["best"]["quality"]


def replay(res: list[dict[str, Any]], args: argparse.Namespace) -> None:
    batch = res[0]["batch"]
    grid0 = [float(x) for x in args.grid0.split(",")]
    factor = (args.s1 * batch / args.train_samples) ** args.exponent
    quality, best = _quality_at(args, batch)
    gaps, centres, peaks = [], [], []
    for s in sorted({r["seed"] for r in res}):
        runs = {r["m"]: r for r in res if r["seed"] == s}
        r0 = {m: _score(runs[m], "acc", "", args.s0) for m in grid0 if m in runs}
        c = max(r0, key=r0.get)
        if args.centre == "vertex":
            xs, ys = np.log2(list(r0)), np.array(list(r0.values()))
            q = np.linalg.lstsq(np.vstack([xs ** 2, xs, np.ones_like(xs)]).T, ys, rcond=None)[0]
            if q[0] < 0:
                v = min(max(-q[1] / (2 * q[0]), xs.min()), xs.max())
                c = min(runs, key=lambda m: abs(math.log2(m) - v))
        r1 = {m: _score(runs[m], "acc", args.score) if args.s1 == runs[m]["steps"] else
              _score(runs[m], "acc", "", args.s1) for m in (c / 2, c, c * 2) if m in runs}
        b = max(r1, key=r1.get)
        nxt = b * 2 if b == max(r1) else (b / 2 if b == min(r1) else None)
        if nxt in runs:
            r1[nxt] = _score(runs[nxt], "acc", args.score) if args.s1 == runs[nxt]["steps"] else \
                _score(runs[nxt], "acc", "", args.s1)
        p = _peak(r1)
        centres.append(c), peaks.append(p)
        gaps.append(100 * (best - quality(args.base_lr * p * factor)) / best)
    g = np.array(gaps)
    print(f"factor {factor:.3f}; first-rung centres {[f'{x:g}' for x in centres]}; second-rung peaks geo-mean "
          f"x{2 ** np.mean(np.log2(peaks)):.3g}; gap at the whole run: mean {g.mean():.2f} %, median "
          f"{np.median(g):.2f} %, max {g.max():.1f} %, within 1 %: {(g <= 1).sum()}/{len(g)}, within 2.5 %: "
          f"{(g <= 2.5).sum()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curves")
    c.add_argument("spec")
    c.add_argument("--batch", type=int, required=True)
    c.add_argument("--steps", type=int, required=True)
    c.add_argument("--every", type=int, default=2)
    c.add_argument("--mults", required=True)
    c.add_argument("--seeds", type=int, default=8)
    c.add_argument("--out", type=Path, required=True)
    for name in ("spread", "prefix"):
        p = sub.add_parser(name)
        p.add_argument("curves", type=Path)
        p.add_argument("--metric", choices=("acc", "loss"), default="acc")
    e = sub.add_parser("pool-exponent")
    e.add_argument("pool", type=Path)
    e.add_argument("--horizons", required=True, help="h1,h2 steps present in the pool")
    e.add_argument("--metric", choices=("acc", "loss"), default="acc")
    r = sub.add_parser("replay")
    r.add_argument("curves", type=Path)
    r.add_argument("--s0", type=int, required=True)
    r.add_argument("--s1", type=int, required=True)
    r.add_argument("--grid0", required=True, help="the first rung's multipliers present in the curves")
    r.add_argument("--train-samples", type=int, required=True)
    r.add_argument("--exponent", type=float, default=0.3)
    r.add_argument("--score", choices=("last", "last3", "win"), default="last")
    r.add_argument("--centre", choices=("argmax", "vertex"), default="argmax")
    r.add_argument("--base-lr", type=float, default=1e-3)
    r.add_argument("--pool", help="bench/lr_horizon.py pool JSON at the curves' batch (with --full)")
    r.add_argument("--full", type=int, help="the pool's whole-run steps")
    r.add_argument("--reference", help="a cost_vs_full JSON whose reference scores the carried LR (with --at-batch)")
    r.add_argument("--at-batch", type=int)
    a = ap.parse_args(argv)
    if a.cmd == "curves":
        curves(a.spec, a.batch, a.steps, a.every, [float(x) for x in a.mults.split(",")], a.seeds, a.out)
        return 0
    if a.cmd == "pool-exponent":
        h1, h2 = (int(x) for x in a.horizons.split(","))
        pool_exponent(json.loads(a.pool.read_text()), h1, h2, a.metric)
        return 0
    res = json.loads(a.curves.read_text())
    if a.cmd == "spread":
        spread(res, a.metric)
    elif a.cmd == "prefix":
        prefix(res, a.metric)
    else:
        if not (a.pool and a.full) and not (a.reference and a.at_batch):
            print("give --pool and --full, or --reference and --at-batch", file=sys.stderr)
            return 2
        replay(res, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
