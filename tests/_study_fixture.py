"""A sweep results dict of the pinned shape, built by hand for the report / recommend / tune-CLI unit tests."""

from __future__ import annotations

import copy
from typing import Any


def make_trial(batch: int, *, lr: float, acc: float, seconds_to_target: float | None, status: str = "ok",
               lr_multiplier: float = 1.0, steps: int = 100, micro: int | None = None,
               b_simple: float | None = 50.0) -> dict[str, Any]:
    micro = micro or batch
    history = []
    for epoch in range(1, 5):
        history.append({
            "epoch": float(epoch), "step": epoch * steps // 4, "samples": epoch * 1000, "train_loss": 1.0 / epoch,
            "val_loss": 1.1 / epoch, "val_metrics": {"accuracy": acc * (0.7 + 0.1 * epoch)},
            "generalization_gap": 0.1 / epoch, "samples_per_s": 1000.0 * batch ** 0.5, "seconds": 0.5 * epoch,
            "train_seconds": 0.4 * epoch, "b_simple": b_simple,
        })
    ok = status == "ok"
    return {
        "batch_size": batch, "micro_batch_size": micro, "accumulation_steps": -(-batch // micro), "lr": lr,
        "lr_multiplier": lr_multiplier, "status": status, "error": None if ok else "loss became NaN",
        "best_val_metrics": {"accuracy": acc} if ok else {}, "final_val_metrics": {"accuracy": acc} if ok else {},
        "best_val_loss": 0.3 if ok else None, "final_val_loss": 0.3 if ok else None,
        "generalization_gap": 0.02 * batch ** 0.25, "samples_per_s": 1000.0 * batch ** 0.5,
        "peak_memory_bytes": 100_000 + 2_000 * micro,
        "steps_to_target": (steps // 2) if seconds_to_target is not None else None,
        "epochs_to_target": 2.0 if seconds_to_target is not None else None,
        "seconds_to_target": seconds_to_target,
        "samples_to_target": 2000 if seconds_to_target is not None else None,
        "b_simple": b_simple,
        "b_simple_history": [{"step": h["step"], "epoch": h["epoch"], "b_simple": b_simple * (1 + 0.2 * i)}
                             for i, h in enumerate(history)] if b_simple else [],
        "sharpness": None, "history": history if ok else history[:1], "steps": steps, "epochs": 4.0,
        "seconds": 2.0,
    }


def make_results() -> dict[str, Any]:
    """Batch 16 is the most accurate, 64 within 1 % and the fastest to the target, 128 is clearly worse."""
    trials = [
        make_trial(16, lr=0.0007, acc=0.950, seconds_to_target=3.0, steps=400),
        make_trial(32, lr=0.001, acc=0.948, seconds_to_target=2.0, steps=200),
        make_trial(64, lr=0.0014, acc=0.945, seconds_to_target=1.0, steps=100),
        make_trial(64, lr=0.0028, acc=0.0, seconds_to_target=None, status="diverged", lr_multiplier=2.0),
        make_trial(128, lr=0.002, acc=0.900, seconds_to_target=0.5, steps=50),
    ]
    best = [copy.deepcopy(t) for t in trials if t["status"] == "ok"]
    return {
        "workload": "digits-mlp", "device": "cpu", "precision": "fp32",
        "budget": {"kind": "epochs", "value": 4}, "lr_rule": "adam-sqrt",
        "target": {"fraction": 0.97, "value": 0.92},
        "primary_metric": "accuracy", "higher_is_better": True,
        "study_name": "test-study", "storage": "sqlite:///x.db",
        "trials": trials, "best_per_batch": best,
        "critical_batch_size": {"b_crit": 40.0, "s_min": 30.0, "r2": 0.97,
                                "points": [[16, 200], [32, 100], [64, 50], [128, 25]]},
        "b_simple": 55.0,
        "find": {"device": "cpu", "precision": "fp32", "memory_budget_bytes": None, "max_batch_size": 1437,
                 "recommended_batch_size": 512, "throughput_knee_batch_size": 128,
                 "memory_model": {"fixed_bytes": 100_000, "per_sample_bytes": 2_000},
                 "probes": [], "real_trials": 3, "seconds": 1.0},
        "noise": {"b_simple": 55.0, "b_simple_ci": [45.0, 65.0]},
    }


def make_sweep_result() -> Any:
    """:func:`make_results` as the typed :class:`batchfit.study.SweepResult` (what ``load_results`` returns)."""
    from batchfit.study import SweepResult

    return SweepResult.from_dict(make_results())
