"""Does a busy machine move the step times the decision reads? (issue 11.1: "a busy machine widens the interval
instead of moving the answer")

For each workload, the step of every candidate batch size is timed three ways, quietly and again while two busy
processes (`python -c "while True: pass"`) share the machine:

1. **calibration**: `batchfit.steptime.calibrate_step_time` — what tune's decision reads (interleaved rounds; on
   the CPU one-thread process CPU time; the median over rounds with its interval);
2. **wall, default threads**: the same step on the wall clock at PyTorch's default intra-op thread count, in the
   same interleaved rounds (what a trial's own throughput reading sees);
3. **cpu, default threads**: process CPU time at the default thread count.

Reports, per batch size, loaded / quiet for each clock, and whether the quiet median lies inside the loaded
interval. Target: the calibration's loaded/quiet ratios near 1 at every batch size, so the decision's ranking of
batch sizes does not move.

Run:  python bench/step_time_under_load.py [--out bench/results/step_time_under_load_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from batchfit.data import train_source
from batchfit.loading import load_workload
from batchfit.step import LRSchedule, TrainStep, build_model, build_optimizer
from batchfit.steptime import calibrate_step_time

WORKLOADS = {"demo:digits-mlp": [16, 32, 64, 128, 256, 512, 1437],
             "demo:mnist1d": [16, 32, 64, 128, 256, 512, 1024, 3200]}
ROUNDS = 8


def _default_threads(spec: str, sizes: list[int]) -> dict[str, dict[int, list[float]]]:
    """Wall and process-CPU seconds per step at the default thread count, in interleaved rounds of 5 steps."""
    wl = load_workload(spec)
    torch.manual_seed(0)
    model = build_model(wl)
    opt = build_optimizer(wl, model)
    source = train_source(wl)
    steps = {b: (TrainStep(wl, model, opt, device=torch.device("cpu"), micro_batch_size=b,
                           schedule=LRSchedule.for_workload(wl, opt, total_steps=10**6)), source.sample(b))
             for b in sizes}
    for step, batch in steps.values():
        step(batch)
        step(batch)
    out: dict[str, dict[int, list[float]]] = {"wall": {b: [] for b in sizes}, "cpu": {b: [] for b in sizes}}
    for _ in range(ROUNDS):
        for b, (step, batch) in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(5):
                step(batch)
            out["wall"][b].append((time.perf_counter() - w0) / 5)
            out["cpu"][b].append((time.process_time() - c0) / 5)
    return out


def measure(spec: str, sizes: list[int]) -> dict[str, Any]:
    cal = calibrate_step_time(load_workload(spec), {b: b for b in sizes}, rounds=ROUNDS)
    other = _default_threads(spec, sizes)
    return {"calibration": {str(b): iv.to_dict() for b, iv in cal.intervals().items()}, "clock": cal.clock,
            "wall_default_threads": {str(b): statistics.median(v) for b, v in other["wall"].items()},
            "cpu_default_threads": {str(b): statistics.median(v) for b, v in other["cpu"].items()},
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "step_time_under_load_cpu.json")
    args = p.parse_args(argv)
    report: dict[str, Any] = {"command": " ".join(["python", "bench/step_time_under_load.py", *(argv or
                                                                                                sys.argv[1:])]),
                              "workloads": {}}
    for spec, sizes in WORKLOADS.items():
        quiet = measure(spec, sizes)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        try:
            time.sleep(1.0)
            loaded = measure(spec, sizes)
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
        rows = []
        for b in map(str, sizes):
            q, ld = quiet["calibration"][b], loaded["calibration"][b]
            rows.append({"batch_size": int(b),
                         "calibration_quiet_ms": q["estimate"] * 1e3, "calibration_loaded_ms": ld["estimate"] * 1e3,
                         "calibration_ratio": ld["estimate"] / q["estimate"],
                         "quiet_inside_loaded_interval": ld["low"] is not None and ld["low"] <= q["estimate"]
                         <= ld["high"],
                         "wall_default_ratio": loaded["wall_default_threads"][b] / quiet["wall_default_threads"][b],
                         "wall_default_quiet_ms": quiet["wall_default_threads"][b] * 1e3,
                         "wall_default_loaded_ms": loaded["wall_default_threads"][b] * 1e3,
                         "cpu_default_ratio": loaded["cpu_default_threads"][b] / quiet["cpu_default_threads"][b]})
        report["workloads"][spec] = {"quiet": quiet, "loaded": loaded, "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        for r in rows:
            print(f"{spec} B={r['batch_size']:>5}: calibration {r['calibration_quiet_ms']:.3f} -> "
                  f"{r['calibration_loaded_ms']:.3f} ms (x{r['calibration_ratio']:.2f}, quiet inside loaded "
                  f"interval: {r['quiet_inside_loaded_interval']}); wall at {quiet['threads']} threads "
                  f"{r['wall_default_quiet_ms']:.3f} -> {r['wall_default_loaded_ms']:.3f} ms "
                  f"(x{r['wall_default_ratio']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
