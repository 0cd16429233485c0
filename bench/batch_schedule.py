"""Issue 14.5: a batch-size warm-up derived from the measured local critical batch vs the best fixed batch.

For each workload (demo:digits-mlp, demo:mnist1d; a GPU workload with --device cuda), with >= 3 seeds and the same
sample budget for every arm (:func:`batchfit.schedule_check.compare`):

- first the base LR at B0 is checked (x0.5 ... x4, seed 0), so no arm starts from an untuned LR;
- the derived schedule (branching at B0 -> :func:`batchfit.schedule.derive_schedule`),
- every fixed batch B0 x 2^j at the rule-scaled LR, then the best one with its LR retuned (x0.5, x2),
- the best fixed batch with a cosine LR decay (the best LR-decay schedule at a fixed batch that we try).

Reported per arm: final quality (95 % t interval over seeds), optimizer steps / samples / training seconds to the
target (the worst seed's final quality of the best fixed batch, relaxed by 1 %), the paired share of steps saved by
the schedule, the decision, and the branching measurement's cost as a share of the reference run (B0, first seed).
Goal of the issue: >= 25 % fewer optimizer steps at equal final quality; branching <= 10 % of the reference run.

Run:  python bench/batch_schedule.py --out bench/results/batch_schedule_cpu.json
      (--quick: fewer epochs and batches, for a shared 2-core machine)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from batchfit.engine import train
from batchfit.loading import load_workload
from batchfit.metric import Metric
from batchfit.schedule_check import compare
from batchfit.workload import Workload

SETUPS = {  # workload, B0, epochs, fixed-batch factors, workload options
    "demo:digits-mlp": (16, 12, (1, 2, 4, 8, 16), {}),
    "demo:mnist1d": (32, 6, (1, 2, 4, 8, 16), {"num_samples": 4000}),
}
GPU_SETUPS = {"demo:resnet-synthetic": (32, 2, (1, 2, 4, 8, 16), {})}
LR_MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)
BRANCHING = {"factors": (1, 2, 4, 8), "checkpoints": (0.0, 0.1, 0.3), "replicates": 2, "noise_batches": 8}


def calibrated(wl: Workload, b0: int, epochs: int, device: str) -> tuple[Workload, dict[str, float]]:
    """The base LR at B0 tuned first (seed 0, x0.5 ... x4 of the workload's), so that no arm starts from an
    untuned LR: every arm's LR is then the rule's scaling of this one (tune's LR check does the same)."""
    metric = Metric.for_workload(wl)
    scores: dict[str, float] = {}
    for m in LR_MULTIPLIERS:
        trial = dataclasses.replace(wl, base_lr=wl.base_lr * m)
        r = train(trial, batch_size=b0, epochs=epochs, seed=0, device=device)
        v = metric.of_record(r.history[-1]) if r.history else None
        scores[f"{m:g}"] = v if v is not None else float("nan")
    best = max(scores, key=lambda k: scores[k] if metric.higher_is_better else -scores[k])
    return dataclasses.replace(wl, base_lr=wl.base_lr * float(best)), scores


def _fmt(d: dict[str, Any] | None) -> str:
    if not d or d.get("estimate") is None:
        return "-"
    est, lo, hi = d["estimate"], d.get("low"), d.get("high")
    if est == float("inf"):
        return "not reached"
    return f"{est:.4g}" if lo is None else f"{est:.4g} [{lo:.4g}, {hi:.4g}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/batch_schedule_cpu.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="halve the epochs and drop the largest fixed batch")
    ap.add_argument("--workloads", nargs="*", default=None)
    ap.add_argument("--bound", default="estimate", choices=("estimate", "low"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    setups = dict(GPU_SETUPS if args.device.startswith("cuda") else SETUPS)
    if args.workloads:
        setups = {k: v for k, v in {**SETUPS, **GPU_SETUPS}.items() if k in args.workloads}
    out: dict[str, Any] = {"device": args.device, "seeds": args.seeds, "quick": args.quick, "bound": args.bound,
                           "torch": torch.__version__, "threads": torch.get_num_threads(), "workloads": {}}
    for name, (b0, epochs, factors, options) in setups.items():
        if args.quick:
            epochs, factors = max(2, epochs // 2), factors[:-1]
        t0 = time.perf_counter()
        wl, lr_scores = calibrated(load_workload(name, **options), b0, epochs, args.device)
        check = compare(wl, batch_size=b0, epochs=epochs, seeds=list(range(args.seeds)), factors=factors,
                        lr_factors=(0.5, 2.0), cosine=True, bound=args.bound, device=args.device,
                        branching_kwargs=dict(BRANCHING))
        d = check.to_dict()
        d["bench_seconds"] = time.perf_counter() - t0
        d["setup"] = {"batch_size": b0, "epochs": epochs, "factors": list(factors), "options": options,
                      "base_lr": wl.base_lr, "lr_calibration": lr_scores, "branching": BRANCHING}
        for a in d["arms"]:  # the histories make the file large; the summary keeps what the table shows
            for r in a["runs"]:
                r.pop("history", None)
        out["workloads"][name] = d
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
        print(f"\n## {name}: B0 {b0}, {epochs} epochs, {args.seeds} seeds ({d['bench_seconds']:.0f} s); base LR "
              f"{wl.base_lr:.4g} after the LR check {lr_scores}")
        pts = d["branching"]["points"]
        print("critical batch by checkpoint (step: lcb [supported], B_simple):",
              "; ".join(f"{p['step']}: {p['local_critical_batch']} {p['supported_range']}, "
                        f"{_fmt(p['b_simple'])}" for p in pts))
        print("schedule:", ", ".join(f"{p['step']}:{p['batch_size']}" for p in d["schedule"]))
        print(f"target {d['target']}; best fixed: {d['best_fixed']}")
        print("| arm | final | steps to target | samples to target | seconds to target |")
        print("|---|---|---|---|---|")
        for a in d["arms"]:
            print(f"| {a['name']} | {_fmt(a['final'])} | {_fmt(a['steps_to_target'])} | "
                  f"{_fmt(a['samples_to_target'])} | {_fmt(a['seconds_to_target'])} |")
        print("steps saved (paired):", _fmt(d["steps_saved"]), "| seconds saved:", _fmt(d["seconds_saved"]))
        print("branching cost share of the reference run:",
              None if d["branching_cost_share"] is None else f"{d['branching_cost_share']:.0%}")
        print("decision:", d["reason"])


if __name__ == "__main__":
    main()
