"""The capped LR check alone on demo:mnist1d (4,000 samples, train budget samples:40000, the check's 30 % share),
5 seeds, scored by the workload's accuracy (``acc``) or by the validation loss (``loss``): where does the race's
second rung put the peak? (docs/benchmarks.md, "The LR check as a race").

Run: python bench/lr_race_score.py acc|loss
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import batchfit.tuning as tuning
from batchfit.cost import STAGE_SHARES
from batchfit.loading import load_workload
from batchfit.metric import Metric
from batchfit.study import parse_budget

TRAIN_SAMPLES = 40_000


def main(mode: str) -> None:
    wl = load_workload("demo:mnist1d", num_samples=4000)
    if mode == "loss":  # every score the check reads becomes the validation loss
        Metric.for_workload = classmethod(lambda cls, w: cls("val_loss", False))
    for seed in range(5):
        run = tuning._Run(Path(tempfile.mkdtemp()), None, {"workload": "mnist1d", "seed": seed}, "cpu", "fp32", seed)
        t0 = time.time()
        c = tuning._calibrate_lr(wl, run, budget=parse_budget("samples:2204"),
                                 multipliers=tuning.LR_CALIBRATION_MULTIPLIERS, tolerance=0.01,
                                 max_samples=int(STAGE_SHARES["lr_check"] * TRAIN_SAMPLES),
                                 train_samples=TRAIN_SAMPLES)
        second = c.rungs[1]["multipliers"] if c.rungs else None
        print(mode, seed, f"peak x{c.lr_at_check_horizon / wl.base_lr:.3g}", f"carried x{c.best_multiplier:.3g}",
              f"second rung {second}", f"{time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "acc")
