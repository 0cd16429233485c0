from __future__ import annotations

import pytest

from _study_fixture import make_results, make_trial
from batchfit.errors import ConfigError
from batchfit.recommend import Recommendation, recommend, within_tolerance


def test_picks_fastest_to_target_within_tolerance() -> None:
    rec = recommend(make_results())
    # 16 is best (0.950); 32 (0.948) and 64 (0.945) are within 1 %; all reached the target after 2000 samples,
    # and 64 ran fastest (8000 samples/s -> 0.25 s); 128 is faster still but 0.900 is outside the tolerance.
    assert rec.batch_size == 64
    assert rec.candidates == [16, 32, 64]
    assert rec.lr == pytest.approx(0.0014)
    assert set(rec.to_dict()) >= {"batch_size", "micro_batch_size", "accumulation_steps", "lr", "warmup_steps",
                                  "precision", "reasons", "candidates", "tolerance"}
    assert "in 0.25 s of training" in rec.reasons[0] and "8000 samples/s" in rec.reasons[0]
    assert "0.95" in rec.reasons[0]


def test_tolerance_zero_keeps_only_the_best() -> None:
    assert recommend(make_results(), tolerance=0.0).batch_size == 16
    assert recommend(make_results(), tolerance=0.06).batch_size == 128


def test_micro_batch_is_the_knee_when_memory_is_plentiful() -> None:
    res = make_results()
    res["find"]["throughput_knee_batch_size"] = 16  # knee 16 fits (512 does): 64 = 16 x 4
    rec = recommend(res)
    assert (rec.micro_batch_size, rec.accumulation_steps) == (16, 4)
    assert "knee is 16" in rec.reasons[1]


def test_micro_batch_is_the_largest_that_fits_when_the_knee_does_not() -> None:
    res = make_results()
    res["find"].update(recommended_batch_size=24, throughput_knee_batch_size=128)
    rec = recommend(res)
    # 64 / 24 -> 3 accumulation steps of ceil(64 / 3) = 22
    assert (rec.micro_batch_size, rec.accumulation_steps) == (22, 3)
    assert "fits in memory" in rec.reasons[1] and "24" in rec.reasons[1]


def test_without_a_finder_result_uses_the_sweeps_micro_batch() -> None:
    res = make_results()
    res["find"] = None
    res["best_per_batch"][2]["micro_batch_size"] = 32
    rec = recommend(res)
    assert (rec.micro_batch_size, rec.accumulation_steps) == (32, 2)
    assert "no finder result" in rec.reasons[1]


def test_explicit_find_argument_wins_over_the_results_copy() -> None:
    find = dict(make_results()["find"], recommended_batch_size=8, throughput_knee_batch_size=None)
    rec = recommend(make_results(), find)
    assert (rec.micro_batch_size, rec.accumulation_steps) == (8, 8)


def test_precision_says_when_only_fp32_was_measured() -> None:
    rec = recommend(make_results())
    assert rec.precision == "fp32"
    assert "only fp32 was measured" in rec.reasons[4]


@pytest.mark.parametrize(
    ("bf16_speed", "bf16_mem", "bf16_loss", "expected"),
    [(1500.0, 1000, 0.50, "bf16"),   # faster, same loss
     (900.0, 500, 0.50, "bf16"),     # slower but half the memory
     (900.0, 1000, 0.50, "fp32"),    # saves nothing
     (1500.0, 1000, 0.90, "fp32")],  # faster but the loss is worse
)
def test_precision_follows_the_measurement(bf16_speed: float, bf16_mem: int, bf16_loss: float,
                                           expected: str) -> None:
    res = make_results()
    res["precision_check"] = {
        "fp32": {"status": "ok", "samples_per_s": 1000.0, "peak_memory_bytes": 1000, "train_loss": 0.5},
        "bf16": {"status": "ok", "samples_per_s": bf16_speed, "peak_memory_bytes": bf16_mem, "train_loss": bf16_loss},
    }
    rec = recommend(res)
    assert rec.precision == expected
    assert f"{bf16_speed:.0f} samples/s" in rec.reasons[4]


def test_warmup_resolves_the_sweeps_fraction_and_notes_diverged_larger_lrs() -> None:
    res = make_results()
    res["warmup"] = 0.1
    rec = recommend(res)
    assert rec.warmup_steps == 10  # 10 % of the 100 steps batch 64 trained
    assert "1 larger LR(s) at this batch diverged" in rec.reasons[3]


def test_best_per_batch_is_derived_from_trials_when_missing() -> None:
    res = make_results()
    res["best_per_batch"] = []
    res["trials"].append(make_trial(64, lr=0.0007, acc=0.91, seconds_to_target=0.2, lr_multiplier=0.5))
    rec = recommend(res)
    assert rec.batch_size == 64 and rec.lr == pytest.approx(0.0014)  # the better of the two LRs at 64
    assert "best of 3 learning rates" in rec.reasons[2]


def test_lower_is_better_metric() -> None:
    res = make_results()
    res["primary_metric"], res["higher_is_better"] = "val_loss", False
    for t in res["trials"] + res["best_per_batch"]:
        t["best_val_metrics"] = {}
    losses = {16: 0.30, 32: 0.302, 64: 0.40, 128: 0.31}
    for t in res["best_per_batch"]:
        t["best_val_loss"] = losses[t["batch_size"]]
    rec = recommend(res)
    assert rec.candidates == [16, 32]
    assert rec.batch_size == 32


def test_time_to_target_without_throughput_uses_the_recorded_seconds() -> None:
    res = make_results()
    for t in res["best_per_batch"]:
        t["samples_per_s"] = None
    res["best_per_batch"][1]["seconds_to_target"] = 0.1  # batch 32 now the fastest
    rec = recommend(res)
    assert rec.batch_size == 32 and "measured wall-clock training time" in rec.reasons[0]


def test_no_ranked_target_falls_back_to_best_quality() -> None:
    res = make_results()
    for t in res["best_per_batch"]:
        t["seconds_to_target"] = t["samples_to_target"] = None
    assert recommend(res).batch_size == 16


def test_no_finished_trial_is_a_clear_error() -> None:
    res = make_results()
    res["best_per_batch"] = []
    for t in res["trials"]:
        t["status"] = "failed"
    with pytest.raises(ConfigError, match="no finished trial"):
        recommend(res)


@pytest.mark.parametrize("tol", [-0.1, 1.0, float("nan"), "1%"])
def test_bad_tolerance(tol: object) -> None:
    with pytest.raises(ConfigError, match="tolerance"):
        recommend(make_results(), tolerance=tol)  # type: ignore[arg-type]


def test_within_tolerance() -> None:
    assert within_tolerance(0.99, 1.0, 0.01, True) and not within_tolerance(0.98, 1.0, 0.01, True)
    assert within_tolerance(1.01, 1.0, 0.01, False) and not within_tolerance(1.02, 1.0, 0.01, False)


def _without_validation(res: dict) -> dict:
    """The fixture as a workload without validation data sweeps it: ranked on the training loss (lower is better)."""
    res["primary_metric"], res["higher_is_better"] = "train_loss", False
    losses = {16: 0.200, 32: 0.201, 64: 0.202, 128: 0.40}
    for t in res["trials"] + res["best_per_batch"]:
        t["best_val_metrics"], t["final_val_metrics"], t["best_val_loss"], t["final_val_loss"] = {}, {}, None, None
        t["best_train_loss"] = losses[t["batch_size"]] if t["status"] == "ok" else None
    return res


def test_a_workload_without_validation_data_is_ranked_on_training_loss() -> None:
    """13.5: every trial finished without validation data -> a recommendation on the training loss, said so."""
    rec = recommend(_without_validation(make_results()))
    assert rec.metric == "train_loss" and rec.ranked_on_training_loss
    assert rec.candidates == [16, 32, 64]  # 128's loss 0.40 is far outside 1 %
    assert rec.batch_size == 64  # the fastest to the target among them
    assert "no validation data" in rec.reasons[0] and "training loss" in rec.reasons[0]
    assert "ranked on training loss" in rec.headline()


def test_no_finished_trial_without_validation_data_names_the_training_loss() -> None:
    res = _without_validation(make_results())
    for t in res["trials"] + res["best_per_batch"]:
        t["best_train_loss"] = None
    with pytest.raises(ConfigError, match="training-loss"):
        recommend(res)


def test_recommendation_round_trips_through_its_json_form() -> None:
    rec = recommend(make_results())
    data = rec.to_dict()
    assert {"batch_size", "micro_batch_size", "accumulation_steps", "lr", "warmup_steps", "precision", "reasons",
            "candidates", "tolerance", "metric", "higher_is_better"} == set(data)
    assert Recommendation.from_dict(data) == rec
    # keys a newer batchfit writes (intervals) survive a round trip; old dict-style reads still work
    newer = dict(data, batch_size_interval=[32, 128])
    again = Recommendation.from_dict(newer)
    assert again.to_dict() == newer and again["batch_size"] == 64 and again.get("nope", 1) == 1
    with pytest.raises(ConfigError, match="needs lr"):
        Recommendation.from_dict({k: v for k, v in data.items() if k != "lr"})


class _Typed:
    """Stands for a typed result (SweepResult / TuneResult): only ``to_dict()``."""

    def __init__(self, data: dict) -> None:
        self.data = data

    def to_dict(self) -> dict:
        return self.data


def test_typed_results_and_tunes_namespace_give_the_same_recommendation() -> None:
    """recommend() reads the finder, LR-check and precision results whether they are inline or under "tune"."""
    res = make_results()
    res["precision_check"] = {
        "fp32": {"status": "ok", "samples_per_s": 1000.0, "peak_memory_bytes": 1000, "train_loss": 0.5},
        "bf16": {"status": "ok", "samples_per_s": 1500.0, "peak_memory_bytes": 1000, "train_loss": 0.5},
    }
    res["lr_calibration"] = {"best_multiplier": 2.0, "base_lr": 0.001, "lr": 0.002, "batch_size": 32,
                             "metric": "accuracy"}
    res["find"]["throughput_knee_batch_size"] = 16
    inline = recommend(res)
    assert inline.precision == "bf16" and "moved from 0.001 to 0.002" in inline.reasons[2]
    assert inline.micro_batch_size == 16
    nested = {k: v for k, v in res.items() if k not in ("find", "precision_check", "lr_calibration")}
    nested["tune"] = {k: res[k] for k in ("find", "precision_check", "lr_calibration")}
    assert recommend(_Typed(nested)) == inline
