"""The cost bench scores an answer on its own trials only (bench/recommendation_stability.score_of_answer)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from batchfit.metric import Metric

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def rs():
    spec = importlib.util.spec_from_file_location("bench_recommendation_stability",
                                                  BENCH / "recommendation_stability.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def _trial(batch: int, lr: float, acc: float, samples: int = 1000) -> dict:
    return {"batch_size": batch, "lr": lr, "samples": samples, "status": "ok",
            "history": [{"samples": samples * k // 4, "val_metrics": {"accuracy": acc}} for k in (1, 2, 3, 4)]}


def test_an_earlier_answer_in_the_same_store_is_not_mixed_in(rs):
    metric = Metric("accuracy", higher_is_better=True)
    new = [_trial(16, 0.00758, a) for a in (0.89, 0.90, 0.88)]
    old = [_trial(16, 0.0214, a) for a in (0.85, 0.84, 0.87)] + [_trial(64, 0.00758, 0.5)]
    score = rs.score_of_answer(old + new, metric, 16, 0.00758, final=True)
    assert score["qualities"] == pytest.approx([0.89, 0.90, 0.88])
    assert score["quality_mean"] == pytest.approx(0.89)
    assert score["same_lr_as_recommended"] and score["other_trials_in_store"] == 4


def test_only_the_answers_own_lr_is_scored(rs):
    """The trained LR may differ from the recommended one by the rule's rounding (within 1 %), not more: an
    earlier answer's trials at the same batch are never scored as this one's."""
    metric = Metric("accuracy", higher_is_better=True)
    trials = [_trial(32, 0.0100, 0.7), _trial(32, 0.00402, 0.6)]
    score = rs.score_of_answer(trials, metric, 32, 0.004, final=True)
    assert score["trained_lr"] == [0.00402] and score["qualities"] == [0.6]
    assert not score["same_lr_as_recommended"]
    assert rs.score_of_answer(trials, metric, 32, 0.0041, final=True)["qualities"] == []  # 0.00402 is 2 % off
    assert rs.score_of_answer(trials, metric, 8, 0.004)["qualities"] == []
