"""bench/lr_interval_coverage.py computes a stored check's interval again exactly as the check does."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from conftest import capped_lr_check

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
    from batchfit.decide import LRCheck

    def score(m: float, steps: int) -> float:
        # peaked at x10 (the interval closed), or still rising at the largest LR tried (open above)
        x = math.log2(m) - math.log2(10.0)
        return 0.9 - 0.05 * x * x if peak_steps else min(0.95, 0.2 + 0.08 * math.log2(m))

    check = capped_lr_check(tmp_path, monkeypatch, score)
    stored = LRCheck.from_dict(check.to_dict())
    (low, high), sides, scale = cov.check_interval(stored, higher=True)
    assert scale == pytest.approx(1.0)  # the check ran at the base batch
    assert [low, high] == pytest.approx(check.lr_interval) and sides == check.lr_interval_open
    assert (sides == []) == peak_steps
