"""bench/lr_interval_coverage.py computes a stored check's interval again exactly as the check does."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_workload

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def cov():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_lr_interval_coverage", BENCH / "lr_interval_coverage.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("peak_steps", [True, False])
def test_a_stored_check_gives_its_own_interval_back(cov, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    peak_steps: bool) -> None:
    import batchfit.tuning as tuning
    from batchfit.decide import LRCheck
    from batchfit.study import parse_budget

    def lr_run(workload: object, run: object, metric: object, batch: int, steps: int, m: float,
               seed: int | None = None) -> dict[str, object]:
        # peaked at x10 (the interval closed), or still rising at the largest LR tried (open above)
        x = math.log2(m) - math.log2(10.0)
        score = 0.9 - 0.05 * x * x if peak_steps else min(0.95, 0.2 + 0.08 * math.log2(m))
        return {"multiplier": m, "lr": 0.01 * m, "score": score, "diverged": False, "seconds": 0.0,
                "samples": steps * batch, "seed": seed}

    monkeypatch.setattr(tuning, "_lr_run", lr_run)
    wl = make_tiny_workload(n=512, n_val=1000, lr=0.01)
    run = tuning._Run(tmp_path, None, {"workload": "tiny"}, "cpu", "fp32", 0)
    check = tuning._calibrate_lr(wl, run, budget=parse_budget("epochs:20"),
                                 multipliers=tuning.LR_CALIBRATION_MULTIPLIERS, tolerance=0.0, max_samples=2_816,
                                 train_samples=5_120)
    stored = LRCheck.from_dict(check.to_dict())
    (low, high), sides, scale = cov.check_interval(stored, higher=True)
    assert scale == pytest.approx(1.0)  # the check ran at the base batch
    assert [low, high] == pytest.approx(check.lr_interval) and sides == check.lr_interval_open
    assert (sides == []) == peak_steps
