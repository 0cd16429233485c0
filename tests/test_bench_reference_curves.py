"""bench/reference_curves.py reads a real sweep store and pairs two LRs seed by seed at every evaluation."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from batchfit import sweep
from conftest import make_tiny_workload

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def rc():
    spec = importlib.util.spec_from_file_location("bench_reference_curves", BENCH / "reference_curves.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def test_pairs_two_lrs_of_a_sweep_store_at_every_evaluation(rc, tmp_path: Path, capsys) -> None:
    store = tmp_path / "grid.db"
    sweep(make_tiny_workload(n=96), batch_sizes=[8], budget="steps:24", lr_search=2, seeds=2,
          storage=f"sqlite:///{store}", measure_noise=False, eval_every=6, seed=0)
    curves, total = rc.load_curves(store)
    assert set(curves) == {(8, 0.5), (8, 1.0)} and all(set(c) == {0, 1} for c in curves.values())
    assert total == 24 * 8
    rows = rc.paired(curves, 8, 1.0, 0.5, "val_loss")
    assert len(rows) == len(curves[(8, 1.0)][0]) >= 4 and all(r["seeds"] == 2 for r in rows)
    # the mean is the mean of the per-seed differences
    i = len(rows) - 1
    d = [curves[(8, 1.0)][s][i]["val_loss"] - curves[(8, 0.5)][s][i]["val_loss"] for s in (0, 1)]
    assert math.isclose(rows[i]["mean"], sum(d) / 2) and rows[i]["two_se"] >= 0
    best = rc.peaks(curves, 8, "val_loss")
    assert len(best) == len(rows) and {m for _, m in best} <= {0.5, 1.0}
    assert rc.main([str(store), "--batch", "8", "--a", "1", "--b", "0.5", "--peaks"]) == 0
    out = capsys.readouterr().out
    assert "x1 - x0.5, val_loss" in out and "100.0% of the run" in out
    assert rc.main([str(store), "--batch", "16", "--a", "1"]) == 2
