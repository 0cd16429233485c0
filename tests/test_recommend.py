from __future__ import annotations

import json

import numpy as np
import pytest

from _study_fixture import make_results, make_trial
from batchfit.errors import ConfigError
from batchfit.recommend import Recommendation, critical_interval, optimizer_settings, recommend, within_tolerance


def _trial(batch: int, q: float, *, seed: int = 0, mult: float = 1.0, steps_to_target: float | None = 100.0,
           sps: float | None = None, metric: str = "accuracy", lr: float = 0.01, **more: object) -> dict:
    """A finished trial whose evaluations climb to ``q`` (its 3-evaluation moving average peaks at ``q``)."""
    values = [q * f for f in (0.8, 0.9, 1.0, 1.0, 1.0)]
    hist = []
    for i, v in enumerate(values):
        rec = {"step": 10 * (i + 1), "epoch": float(i + 1), "train_loss": 1.0 / (i + 1), "val_loss": 1.1 / (i + 1)}
        if metric == "accuracy":
            rec["val_metrics"] = {"accuracy": v}
        else:
            rec[metric] = q / (0.8, 0.9, 1.0, 1.0, 1.0)[i]  # a loss: falls to q
        hist.append(rec)
    return {"batch_size": batch, "micro_batch_size": batch, "accumulation_steps": 1, "lr": lr * mult,
            "lr_multiplier": mult, "status": "ok", "seed": seed, "history": hist,
            "best_val_metrics": {"accuracy": q} if metric == "accuracy" else {},
            "samples_per_s": sps if sps is not None else batch / (0.001 + 0.0001 * batch),
            "steps_to_target": steps_to_target, "steps": 50, "warmup_steps": 0, **more}


def _results(trials: list[dict], metric: str = "accuracy", **more: object) -> dict:
    return {"workload": "w", "primary_metric": metric, "higher_is_better": metric == "accuracy", "trials": trials,
            "best_per_batch": [], "lr_rule": "linear", **more}


STEPS = {16: 800, 32: 420, 64: 230, 128: 140, 256: 100}  # S(B) = 60 (1 + 200 / B), roughly


def test_non_inferior_batch_sizes_are_broken_on_time_to_target_and_said_so() -> None:
    rng = np.random.default_rng(0)
    trials = [_trial(b, 0.95 + 0.001 * rng.standard_normal(), seed=s, steps_to_target=STEPS[b] * rng.lognormal(0, .05))
              for b in STEPS for s in range(3)]
    rec = recommend(_results(trials))
    assert rec.tied == [16, 32, 64, 128, 256] == rec.candidates == rec.non_inferior
    # step time 1 ms + 0.1 ms x B: time to target S(B) t(B) is least near B = 32-64
    assert rec.batch_size in (32, 64)
    assert f"are non-inferior to batch {rec.reference_batch_size}" in rec.reasons[0]
    assert "batch sizes 16\u2013256" in rec.reasons[0]
    assert "chosen on time to target" in rec.reasons[0] and "faster than" in rec.reasons[0]
    assert not any("undecided" in f for f in rec.flags)
    assert "the largest of them is chosen" in rec.decision_rule
    ev = {e["batch_size"]: e for e in rec.intervals}
    assert set(ev) == set(STEPS) and all(e["seeds"] == 3 and e["quality"]["low"] is not None for e in ev.values())
    assert {e["verdict"] for e in ev.values()} == {"reference", "non-inferior"}
    assert rec.selection["critical"] > 2  # max-t over 4 comparisons: above the single t quantile


def test_a_clear_winner_is_chosen_on_quality_beyond_the_noise() -> None:
    trials = [_trial(b, q + 0.001 * s, seed=s) for b, q in ((16, 0.80), (64, 0.95), (256, 0.85)) for s in range(3)]
    rec = recommend(_results(trials))
    assert rec.batch_size == 64 and rec.tied == [64]
    assert "no other batch size was shown non-inferior" in rec.reasons[0]
    assert "16, 256 worse beyond the tolerance" in rec.reasons[0]
    assert not any("edge of range" in f for f in rec.flags)


def test_a_winner_at_the_edge_of_the_tried_range_is_flagged() -> None:
    trials = [_trial(b, q + 0.001 * s, seed=s) for b, q in ((16, 0.95), (64, 0.90), (256, 0.85)) for s in range(3)]
    rec = recommend(_results(trials))
    assert rec.batch_size == 16 and any("edge of range" in f and "smallest" in f for f in rec.flags)


def test_one_seed_chooses_the_best_estimate_and_flags_the_faster_undecided() -> None:
    """One seed: no seed noise to judge by. The validation set's binomial interval (the old rule's) ties 0.955 with
    0.947, and the tie went to the faster batch; now 64 is undecided and 16 is chosen."""
    trials = [_trial(16, 0.955, steps_to_target=800), _trial(64, 0.947, steps_to_target=230),
              _trial(256, 0.80, steps_to_target=100)]
    rec = recommend(_results(trials, num_val=360))
    assert rec.batch_size == 16 and rec.tied == [16]
    assert any(f.startswith("undecided: batch size 64 ") for f in rec.flags), rec.flags
    assert "undecided at this number of seeds" in rec.reasons[0]


def test_tolerance_is_the_non_inferiority_margin() -> None:
    trials = [_trial(b, q + 0.0005 * s, seed=s) for b, q in ((16, 0.950), (64, 0.944)) for s in range(3)]
    assert recommend(_results(trials), tolerance=0.0).tied == [16]  # 64 is worse: not non-inferior at 0
    assert recommend(_results(trials), tolerance=0.02).tied == [16, 64]  # within the practical margin


def test_reruns_with_other_seeds_agree() -> None:
    truth = {16: 0.95, 32: 0.95, 64: 0.95, 128: 0.95, 256: 0.948}
    picks = []
    for rerun in range(6):
        rng = np.random.default_rng(10 + rerun)
        trials = [_trial(b, truth[b] + 0.002 * rng.standard_normal(), seed=s,
                         steps_to_target=STEPS[b] * rng.lognormal(0, 0.1)) for b in truth for s in range(3)]
        picks.append(recommend(_results(trials)).batch_size)
    assert max(picks) / min(picks) <= 2, picks


def test_lower_is_better_metric() -> None:
    trials = [_trial(b, q + 0.001 * s, seed=s, metric="val_loss", steps_to_target=STEPS[b])
              for b, q in ((16, 0.30), (32, 0.301), (64, 0.40)) for s in range(3)]
    rec = recommend(_results(trials, metric="val_loss"))
    assert rec.candidates == [16, 32] and rec.batch_size == 32  # tied; 32 reaches the target sooner


def test_critical_batch_interval_from_seeds() -> None:
    rng = np.random.default_rng(1)
    trials = [_trial(b, 0.95, seed=s, steps_to_target=60 * (1 + 200 / b) * rng.lognormal(0, 0.05))
              for b in (16, 32, 64, 128, 256, 512) for s in range(3)]
    crit = recommend(_results(trials)).critical_batch
    iv = crit["b_crit"]
    assert iv["low"] < 200 < iv["high"] and crit["support"] == [16, 512] and crit["extrapolated"] is False
    two = critical_interval(_results([t for t in trials if t["batch_size"] <= 64]))
    assert two is not None and two.support == (16, 64)


def _fixture64() -> dict:
    """The fixture without batch sizes 16 and 32: batch 64 is the best, and 128 is apart from it (at the 1 % margin
    that one seed without a validation size is compared within), so 64 is chosen alone."""
    res = make_results()
    res["trials"] = [t for t in res["trials"] if t["batch_size"] >= 64]
    res["best_per_batch"] = [t for t in res["best_per_batch"] if t["batch_size"] >= 64]
    return res


def test_micro_batch_is_the_knee_when_memory_is_plentiful() -> None:
    res = _fixture64()
    res["find"]["throughput_knee_batch_size"] = 16  # knee 16 fits (512 does): 64 = 16 x 4
    rec = recommend(res)
    assert (rec.micro_batch_size, rec.accumulation_steps) == (16, 4)
    assert "knee is 16" in rec.reasons[1]


def test_micro_batch_is_the_largest_that_fits_when_the_knee_does_not() -> None:
    res = _fixture64()
    res["find"].update(recommended_batch_size=24, throughput_knee_batch_size=128)
    rec = recommend(res)
    # 64 / 24 -> 3 accumulation steps of ceil(64 / 3) = 22
    assert (rec.micro_batch_size, rec.accumulation_steps) == (22, 3)
    assert "fits in memory" in rec.reasons[1] and "24" in rec.reasons[1]


def test_without_a_finder_result_uses_the_sweeps_micro_batch() -> None:
    res = _fixture64()
    res["find"] = None
    for t in res["trials"]:
        if t["batch_size"] == 64:
            t["micro_batch_size"] = 32
    rec = recommend(res)
    assert (rec.micro_batch_size, rec.accumulation_steps) == (32, 2)
    assert "no finder result" in rec.reasons[1]


def test_explicit_find_argument_wins_over_the_results_copy() -> None:
    find = dict(make_results()["find"], recommended_batch_size=8, throughput_knee_batch_size=None)
    rec = recommend(_fixture64(), find)
    assert (rec.micro_batch_size, rec.accumulation_steps) == (8, 8)


def test_precision_says_when_only_fp32_was_measured() -> None:
    rec = recommend(make_results())
    assert rec.precision == "fp32"
    assert "only fp32 was measured" in rec.reasons[4]


def _check(fp32: list[float], bf16: list[float], *, mem: int = 1000, loss: float = 0.5) -> dict:
    return {"fp32": {"status": "ok", "step_seconds": fp32, "peak_memory_bytes": 1000, "train_loss": 0.5},
            "bf16": {"status": "ok", "step_seconds": bf16, "peak_memory_bytes": mem, "train_loss": loss}}


@pytest.mark.parametrize(
    ("bf16_time", "mem", "loss", "fits", "expected", "words"),
    [(0.6, 1000, 0.50, 512, "bf16", "beyond the timing noise"),   # faster beyond the noise
     (1.0, 500, 0.50, 512, "fp32", "memory does not bind"),       # half the memory, but memory does not bind
     (1.0, 500, 0.50, 16, "bf16", "memory binds"),                # ... and where it binds (16 < batch 64)
     (1.3, 1000, 0.50, 512, "fp32", "not a speed-up"),            # slower
     (0.6, 1000, 0.90, 512, "fp32", "loss was worse")],           # faster but the loss is worse
)
def test_precision_follows_repeated_timings(bf16_time: float, mem: int, loss: float, fits: int, expected: str,
                                            words: str) -> None:
    rng = np.random.default_rng(0)
    res = make_results()
    res["find"].update(recommended_batch_size=fits, throughput_knee_batch_size=None)
    res["precision_check"] = _check(list(rng.lognormal(0, 0.05, 10) * 0.01),
                                    list(rng.lognormal(0, 0.05, 10) * 0.01 * bf16_time), mem=mem, loss=loss)
    rec = recommend(res)
    assert rec.precision == expected and words in rec.reasons[4], rec.reasons[4]
    assert rec.precision_advice["precision"] == expected


def test_one_throughput_reading_is_no_speedup() -> None:
    """An older check (one samples/s per precision) cannot show a speed-up beyond the noise: the old rule took
    a 1.5x reading at face value (and once a 7.2x timing artefact)."""
    res = make_results()
    res["precision_check"] = {
        "fp32": {"status": "ok", "samples_per_s": 1000.0, "peak_memory_bytes": 1000, "train_loss": 0.5},
        "bf16": {"status": "ok", "samples_per_s": 1500.0, "peak_memory_bytes": 1000, "train_loss": 0.5}}
    rec = recommend(res)
    assert rec.precision == "fp32" and "one timing per precision" in rec.reasons[4]


def test_warmup_resolves_the_sweeps_fraction_and_notes_diverged_larger_lrs() -> None:
    res = _fixture64()
    res["warmup"] = 0.1
    rec = recommend(res)
    assert rec.warmup_steps == 10  # 10 % of the 100 steps batch 64 trained
    assert "1 larger LR(s) at this batch diverged" in rec.reasons[3]


def test_best_per_batch_is_derived_from_trials_when_missing() -> None:
    res = _fixture64()
    res["best_per_batch"] = []
    res["trials"].append(make_trial(64, lr=0.0007, acc=0.91, seconds_to_target=0.2, lr_multiplier=0.5))
    rec = recommend(res)
    assert rec.batch_size == 64 and rec.lr == pytest.approx(0.0014)  # the better of the two LRs at 64
    assert "best of 3 learning rates" in rec.reasons[2]


def test_time_to_target_without_throughput_uses_the_recorded_seconds() -> None:
    res = make_results()
    for t in res["trials"]:
        t["samples_per_s"] = None
        for h in t["history"]:
            h.pop("samples_per_s", None)
    for t in res["trials"]:
        if t["batch_size"] == 32:
            t["seconds_to_target"] = 0.1  # batch 32 now the fastest
    rec = recommend(res)
    assert rec.batch_size == 32 and "chosen on time to target: 32" in rec.reasons[0]


def test_no_ranked_target_falls_back_to_best_quality() -> None:
    res = make_results()
    for t in res["trials"]:
        t["steps_to_target"] = t["seconds_to_target"] = t["samples_to_target"] = None
    rec = recommend(res)
    assert rec.batch_size == 16 and "the best accuracy estimate decides" in rec.reasons[0]


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
    losses = {16: 0.200, 32: 0.201, 64: 0.2015, 128: 0.40}
    for t in res["trials"] + res["best_per_batch"]:
        t["best_val_metrics"], t["final_val_metrics"], t["best_val_loss"], t["final_val_loss"] = {}, {}, None, None
        t["best_train_loss"] = losses[t["batch_size"]] if t["status"] == "ok" else None
        for i, h in enumerate(t["history"]):
            h.pop("val_metrics", None)
            h["val_loss"] = None
            h["train_loss"] = losses[t["batch_size"]] * (4 - i if i < 1 else 1)  # falls to the trial's loss
    return res


def test_a_workload_without_validation_data_is_ranked_on_training_loss() -> None:
    """13.5: every trial finished without validation data -> a recommendation on the training loss, said so."""
    rec = recommend(_without_validation(make_results()))
    assert rec.metric == "train_loss" and rec.ranked_on_training_loss
    assert rec.candidates == [16, 32, 64]  # 3 seeds: within the 1 % margin; 0.40 is not
    assert rec.batch_size == 64  # the least time to target among the tied (the fixture's fastest)
    assert "no validation data" in rec.reasons[0] and "training loss" in rec.reasons[0]
    assert "ranked on training loss" in rec.headline()


def test_no_finished_trial_without_validation_data_names_the_training_loss() -> None:
    res = _without_validation(make_results())
    for t in res["trials"] + res["best_per_batch"]:
        t["best_train_loss"], t["history"] = None, []
    with pytest.raises(ConfigError, match="training-loss"):
        recommend(res)


def test_recommendation_round_trips_through_its_json_form() -> None:
    rec = recommend(_fixture64())
    data = rec.to_dict()
    assert data["world_size"] == 1 and data["parallel"] is None  # one process
    assert {"batch_size", "micro_batch_size", "accumulation_steps", "lr", "warmup_steps", "precision", "reasons",
            "candidates", "tolerance", "metric", "higher_is_better", "world_size", "parallel", "intervals", "tied",
            "non_inferior",
            "reference_batch_size", "selection", "holds_for", "long_horizon", "flags", "decision_rule",
            "decision_target", "critical_batch", "noise_scale", "precision_advice", "recipe"} == set(data)
    assert json.loads(json.dumps(data)) == data  # plain JSON
    assert Recommendation.from_dict(data) == rec
    assert list(Recommendation.from_dict(data).to_dict()) == list(data)  # the same keys in the same order
    # the decision's evidence is typed fields, not dict entries
    assert rec.extra == {} and rec.tied == data["tied"] and rec.critical_batch == data["critical_batch"]
    assert rec.recipe is not None and rec.recipe["snippets"] and rec.decision_rule == data["decision_rule"]
    # keys a newer batchfit writes survive a round trip, in ``extra``
    newer = dict(data, batch_size_interval=[32, 128])
    again = Recommendation.from_dict(newer)
    assert again.to_dict() == newer and again.batch_size == 64 and again.extra == {"batch_size_interval": [32, 128]}
    assert not hasattr(again, "get") and not hasattr(again, "__getitem__")  # no dict-style access
    # a recommendation from before the evidence fields: loads, with empty evidence
    old = {k: data[k] for k in ("batch_size", "micro_batch_size", "accumulation_steps", "lr", "precision")}
    older = Recommendation.from_dict(old)
    assert older.tied == [] and older.flags == [] and older.critical_batch is None and older.extra == {}
    assert {k: v for k, v in older.to_dict().items() if k in old} == old
    with pytest.raises(ConfigError, match="needs lr"):
        Recommendation.from_dict({k: v for k, v in data.items() if k != "lr"})


def test_typed_results_and_tunes_namespace_give_the_same_recommendation() -> None:
    """recommend() reads the finder, LR-check and precision results whether they are inline or under "tune"."""
    res = _fixture64()
    res["precision_check"] = _check([0.010, 0.011, 0.010, 0.0105, 0.0102, 0.0101],
                                    [0.006, 0.0061, 0.0062, 0.0060, 0.0063, 0.0061])
    res["lr_calibration"] = {"best_multiplier": 2.0, "base_lr": 0.001, "lr": 0.002, "batch_size": 32,
                             "metric": "accuracy"}
    res["find"]["throughput_knee_batch_size"] = 16
    inline = recommend(res)
    assert inline.precision == "bf16" and "moved from 0.001 to 0.002" in inline.reasons[2]
    assert inline.micro_batch_size == 16
    nested = {k: v for k, v in res.items() if k not in ("find", "precision_check", "lr_calibration")}
    nested["tune"] = {k: res[k] for k in ("find", "precision_check", "lr_calibration")}
    from batchfit.study import SweepResult

    assert recommend(nested) == inline
    assert recommend(SweepResult.from_dict(nested)) == inline  # the typed result: read by attribute


def test_the_lr_reason_carries_the_checks_interval_moved_to_the_recommended_batch() -> None:
    res = _fixture64()
    res["lr_calibration"] = {"best_multiplier": 2.0, "base_lr": 0.001, "lr": 0.002, "batch_size": 32,
                             "metric": "accuracy", "lr_interval": [0.001, 0.008], "lr_interval_open": ["above"]}
    rec = recommend(res)
    reason = rec.reasons[2]
    scale = rec.lr / 0.002  # the rule's move from the check's LR to the recommended batch's
    assert f"in [{0.001 * scale:.3g}, {0.008 * scale:.3g}], open at the top" in reason
    res["lr_calibration"]["lr_interval_open"] = []
    assert "open" not in recommend(res).reasons[2].split("best LR at this batch in")[1]
    del res["lr_calibration"]["lr_interval"]  # a check stored before the interval: no interval to state
    assert "best LR at this batch" not in recommend(res).reasons[2]


def test_the_recipe_carries_every_optimizer_setting_and_snippets() -> None:
    import torch

    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.003, betas=(0.8, 0.99), eps=1e-7,
                            weight_decay=0.05)
    trials = [_trial(b, 0.95, seed=s, optimizer=optimizer_settings(opt), grad_clip=1.0, lr_schedule="CosineAnnealingLR")
              for b in (16, 64) for s in range(2)]
    rec = recommend(_results(trials, framework="lightning"))
    r = rec.recipe
    assert r["optimizer"]["class"] == "AdamW" and r["optimizer"]["betas"] == [0.8, 0.99]
    assert r["optimizer"]["eps"] == 1e-7 and r["optimizer"]["weight_decay"] == 0.05
    assert r["grad_clip"] == 1.0 and r["lr_schedule"] == "CosineAnnealingLR" and r["lr"] == rec.lr
    py = r["snippets"]["pytorch"]
    assert "torch.optim.AdamW(model.parameters(), lr=" in py and "betas=(0.8, 0.99)" in py and "eps=1e-07" in py
    assert "clip_grad_norm_(model.parameters(), 1)" in py
    compile(py, "snippet", "exec")  # valid Python
    assert "accumulate_grad_batches=1" in r["snippets"]["lightning"] and "keras" not in r["snippets"]
    assert "betas (0.8, 0.99)" in rec.reasons[-1]
    keras = recommend(_results(trials, framework="keras")).recipe["snippets"]["keras"]
    assert "keras.optimizers.AdamW(learning_rate=" in keras and "beta_1=0.8" in keras and "epsilon=1e-07" in keras


def test_a_study_without_recorded_optimizer_settings_says_so() -> None:
    rec = recommend(make_results())
    r = rec.recipe
    assert r["optimizer"] is None and "did not record" in r["note"] and set(r["snippets"]) == {"pytorch"}


def test_a_tied_batch_that_never_reached_the_target_is_the_slowest_not_a_reason_to_stop_comparing() -> None:
    trials = [_trial(b, 0.95 + 0.001 * s, seed=s, steps_to_target=None if b == 16 else STEPS[b])
              for b in (16, 32, 64) for s in range(3)]
    rec = recommend(_results(trials))
    assert rec.tied == [16, 32, 64] and rec.batch_size in (32, 64)
    assert "chosen on time to target" in rec.reasons[0] and "16 did not reach the target" in rec.reasons[0]


def test_a_recipe_outside_the_rules_range_says_the_betas_are_part_of_it() -> None:
    """Issue 19.6: at k = 16 adam-sqrt holds beta1 at 0.5; the recommendation says the betas are part of the recipe
    and never presents a held (or, in an older study, clipped) beta as the rule's."""
    import torch

    from batchfit.recommend import OUTSIDE_RANGE
    from batchfit.scaling import scale_lr

    scaled = scale_lr(1e-3, 16, 256, "adam-sqrt", betas=(0.9, 0.999), eps=1e-8)
    opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), lr=scaled.lr, betas=scaled.betas, eps=scaled.eps)
    inside = scale_lr(1e-3, 16, 32, "adam-sqrt", betas=(0.9, 0.999), eps=1e-8)
    opt_in = torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), lr=inside.lr, betas=inside.betas, eps=inside.eps)
    trials = [_trial(256, 0.95 + 0.001 * s, seed=s, lr_rule="adam-sqrt", optimizer=optimizer_settings(opt),
                     lr_scaling=scaled.to_dict()) for s in range(2)]
    trials += [_trial(32, 0.80 + 0.001 * s, seed=s, lr_rule="adam-sqrt", optimizer=optimizer_settings(opt_in),
                      lr_scaling=inside.to_dict()) for s in range(2)]
    rec = recommend(_results(trials, lr_rule="adam-sqrt"))
    assert rec.batch_size == 256
    assert OUTSIDE_RANGE == "outside the rule's range: the betas are part of the recipe"
    assert OUTSIDE_RANGE in rec.reasons[2] and OUTSIDE_RANGE in rec.reasons[-1]
    assert "betas (0.5, 0.984" in rec.reasons[-1] and "held at 0.5" in rec.reasons[-1]
    r = rec.recipe
    assert r["outside_rule_range"] is True and r["lr_scaling"]["outside_range"] is True
    assert r["snippets"]["pytorch"].splitlines()[1].startswith(f"# {OUTSIDE_RANGE}")
    text = " ".join(rec.reasons)
    assert "betas (0," not in text and "the rule's betas" not in text
    # inside the range nothing is said
    inside_rec = recommend(_results([dict(t, batch_size=32) for t in trials[2:]] + [
        _trial(64, 0.5, seed=0, lr_rule="adam-sqrt", optimizer=optimizer_settings(opt_in),
               lr_scaling=inside.to_dict())], lr_rule="adam-sqrt"))
    assert OUTSIDE_RANGE not in " ".join(inside_rec.reasons) and "outside_rule_range" not in inside_rec.recipe


def test_an_older_studys_clipped_beta1_is_not_presented_as_the_rules() -> None:
    """A trial recorded before ``lr_scaling`` (adam-sqrt then clipped a negative beta1 to 0) is said to be outside."""
    import torch

    from batchfit.recommend import OUTSIDE_RANGE

    opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), lr=4e-3, betas=(0.0, 0.984))
    trials = [_trial(256, 0.95 + 0.001 * s, seed=s, lr_rule="adam-sqrt", optimizer=optimizer_settings(opt))
              for s in range(2)]
    rec = recommend(_results(trials, lr_rule="adam-sqrt"))
    assert OUTSIDE_RANGE in rec.reasons[2] and OUTSIDE_RANGE in rec.reasons[-1]
    assert "clipped to 0" in rec.reasons[-1]


# ---------------------------------------------------------------------------------------------------------------
# Issue 19.3: one B_simple, stated against the training loss at the decision's target


def _noisy_results() -> dict:
    from _study_fixture import with_noise_windows

    res = with_noise_windows(make_results())  # true B_simple = 100 / (4 L^2): 25 at loss 1, 100 at loss 0.5
    res["b_simple"] = 266.0  # the old median over the trials' runs: not a number the recommendation may quote
    res["noise"] = {"b_simple": 45.4, "b_simple_ci": [41.2, 50.0], "batch_size": 32, "train_steps": 0}
    return res


def test_the_b_simple_sentence_is_the_pooled_value_at_the_target_loss_and_labels_the_initialisation_value() -> None:
    from batchfit.noise import b_simple_at_loss, noise_records

    res = _noisy_results()
    rec = recommend(res)
    noise = rec.noise_scale
    # the fixture's trials meet the target at their second evaluation, where the training loss is 0.5
    assert noise["loss_source"] == "target" and noise["train_loss"] == pytest.approx(0.5)
    expected = b_simple_at_loss(noise_records(res["trials"]), 0.5)
    assert expected is not None and expected.b_simple.known and expected.b_simple.low > 0
    assert noise["at_loss"]["b_simple"]["estimate"] == pytest.approx(expected.b_simple.estimate)
    assert expected.b_simple.contains(100.0) or abs(expected.b_simple.estimate / 100.0 - 1) < 0.1
    sentence = next(r for r in rec.reasons if r.startswith("Gradient noise scale"))
    assert f"B_simple {expected.b_simple.estimate:.3g} [" in sentence and "at training loss 0.5" in sentence
    assert "meets the decision's target" in sentence and "bootstrap over trials" in sentence
    # B / B_simple as B / [high, low]: finite at both ends
    ratio = noise["noise_ratio"]
    assert ratio["low"] == pytest.approx(rec.batch_size / expected.b_simple.high)
    assert ratio["high"] == pytest.approx(rec.batch_size / expected.b_simple.low)
    # the probe's value is labelled as measured at initialisation and is never "the" B_simple
    assert "B_simple at initialisation is 45.4" in sentence and "not the critical batch" in sentence
    text = " ".join(rec.reasons)
    assert "266" not in text and "B_simple is 45.4" not in text
    assert noise["at_initialisation"]["b_simple"] == 45.4
    assert json.loads(json.dumps(rec.to_dict())) == rec.to_dict()


def test_without_the_target_reached_the_b_simple_sentence_says_it_is_at_the_end_of_the_run() -> None:
    res = _noisy_results()
    for t in res["trials"]:
        t["steps_to_target"] = None
    rec = recommend(res)
    noise = rec.noise_scale
    assert noise["loss_source"] == "end_of_run" and noise["train_loss"] == pytest.approx(0.25)  # the last record
    sentence = next(r for r in rec.reasons if r.startswith("Gradient noise scale"))
    assert "at training loss 0.25" in sentence and "at the end of its run" in sentence


def test_a_study_without_noise_records_quotes_no_b_simple_at_a_loss() -> None:
    res = make_results()  # per-trial medians only: nothing to pool against the training loss
    res["b_simple"] = 266.0
    rec = recommend(res)
    assert rec.noise_scale["at_loss"] is None
    assert "266" not in " ".join(rec.reasons)
    assert any("B_simple at initialisation is 55" in r for r in rec.reasons)


def test_the_recommendation_says_which_budget_and_target_it_holds_for() -> None:
    """Issue 19.9: the chosen batch depends on the budget and the target; the first reason and the JSON say which."""
    rec = recommend(make_results())
    holds = rec.holds_for
    assert holds["budget"] == "epochs:4" and holds["target"] == pytest.approx(0.92)  # the recorded target
    assert holds["target_fraction"] == 0.97
    assert "It holds for a budget of epochs:4 per run and the target accuracy" in rec.reasons[0]
    assert "may favour a larger batch" in rec.reasons[0]


def test_a_finder_result_given_to_recommend_replaces_the_stored_one() -> None:
    """The calling form ``recommend(results, find)``: the given finder result (not the one in results, where 512
    fits) splits the chosen batch into micro-batches that fit, by memory or by the throughput knee."""
    res = make_results()
    assert res["find"]["recommended_batch_size"] == 512
    stored = recommend(res)
    assert (stored.batch_size, stored.micro_batch_size, stored.accumulation_steps) == (64, 64, 1)
    small = recommend(res, {"recommended_batch_size": 16, "max_batch_size": 20, "margin": 0.1})
    assert (small.batch_size, small.micro_batch_size, small.accumulation_steps) == (64, 16, 4)
    assert any(r.startswith("Micro-batch 16 x 4") and "fits in memory with 10% headroom is 16" in r
               for r in small.reasons), small.reasons
    uneven = recommend(res, find={"recommended_batch_size": 24})  # 64 = 3 passes of at most 24: 22 x 3
    assert (uneven.micro_batch_size, uneven.accumulation_steps) == (22, 3)
    knee = recommend(res, find={"recommended_batch_size": 64, "throughput_knee_batch_size": 32})
    assert (knee.micro_batch_size, knee.accumulation_steps) == (32, 2)
    assert any("throughput knee is 32" in r for r in knee.reasons), knee.reasons



def test_measurements_read_tunes_stage_results_typed_and_keep_every_key() -> None:
    """Issue 20.1: Measurements.of reads the finder's, the noise probe's, the step timing's and the plan's dicts
    into their types once (unknown keys kept in ``extras``); tune's result holding them typed gives the same
    recommendation as the dict form; an older file's missing keys read as None, as ``.get`` read them."""
    from dataclasses import replace

    from batchfit.cost import TrainBudgetPlan
    from batchfit.finder import FindResult
    from batchfit.noise import NoiseResult
    from batchfit.recommend import Measurements
    from batchfit.steptime import StepTimeCalibration
    from batchfit.tuning import TuneResult

    cost = {"samples": 10, "seconds": 0.5}
    res = make_results()
    found = FindResult(device="cpu", precision="fp32", memory_budget_bytes=None, max_batch_size=1437,
                       recommended_batch_size=512, throughput_knee_batch_size=128, memory_model={}, probes=[],
                       real_trials=3, seconds=1.0, eval_batch_size=512, batch_size_cap=2048)
    res["find"] = {**found.to_dict(), "cost": cost, "plan_vs_measured": "peak 1.0 MiB planned, 1.1 MiB measured"}
    probe = NoiseResult(workload="w", b_simple=45.4, b_simple_ci=(41.2, 50.0), grad_norm_sq=1.0, trace_cov=45.4,
                        batch_size=32, micro_batch_size=32, steps=20, converged=True, rel_ci=0.2)
    res["noise"] = {**probe.to_dict(), "cost": cost, "warning": "wide"}
    sizes = (16, 32, 64, 128)
    res["step_time"] = {**StepTimeCalibration("wall", {b: [1e-3 * (1 + b / 64) * (1 + r / 100) for r in range(5)]
                                                       for b in sizes}, {b: b for b in sizes}, 5, 0.1).to_dict(),
                        "cost": cost}
    res["train_budget"] = {"budget": "epochs:20", "samples": 40_000, "max_cost": 1.0, "measurement": "samples:4000",
                           "measurement_samples": 4_000, "trial_cost_samples": 4_500, "dropped": [], "note": "",
                           "cap_samples": 40_000.0, "later": {"key": 1}}
    res = json.loads(json.dumps(res))  # as results.json holds it
    m = Measurements.of(res)
    assert isinstance(m.find, FindResult) and isinstance(m.noise, NoiseResult)
    assert isinstance(m.step_time, StepTimeCalibration) and isinstance(m.train_budget, TrainBudgetPlan)
    assert (m.find.recommended_batch_size, m.find.extras["cost"]) == (512, cost)
    assert (m.noise.b_simple, m.noise.extras["warning"], m.step_time.extras["cost"]) == (45.4, "wide", cost)
    assert (m.train_budget.samples, m.train_budget.measurement_samples) == (40_000, 4_000)
    for key in ("find", "noise", "step_time", "train_budget"):  # a round trip keeps every key
        assert getattr(m, key).to_dict() == res[key], key
    assert m.to_dict() == res

    typed = replace(TuneResult.from_dict(res), find=m.find, noise=m.noise, step_time=m.step_time,
                    train_budget=m.train_budget)
    from_tune = Measurements.of(typed)
    assert from_tune.find is m.find and from_tune.noise is m.noise and from_tune.train_budget is m.train_budget
    rec = recommend(res)
    assert recommend(typed) == rec
    assert rec.noise_scale["at_initialisation"] == {"b_simple": 45.4, "b_simple_ci": [41.2, 50.0], "batch_size": 32,
                                                    "train_steps": 0}
    assert any(f.startswith("short horizon: each candidate was measured on 4,000 samples, 10% of the train budget "
                            "epochs:20") for f in rec.flags), rec.flags

    old = Measurements.of({**res, "find": {"recommended_batch_size": 24}, "noise": {"b_simple": 50.0},
                           "step_time": {}, "train_budget": None})
    assert (old.find.margin, old.find.max_batch_size, old.find.real_trials) == (None, None, None)
    assert (old.noise.batch_size, old.noise.train_steps) == (None, None)
    assert old.step_time is None and old.train_budget is None
    was = recommend(old)
    assert any(r.startswith("Micro-batch 22 x 3") and "with the safety margin" in r for r in was.reasons)
    assert was.noise_scale["at_initialisation"] == {"b_simple": 50.0, "b_simple_ci": None, "batch_size": None,
                                                    "train_steps": 0}
    with pytest.raises(ConfigError, match="noise is not what batchfit writes"):
        Measurements.of({**res, "noise": {"b_simple": "big"}})

def test_the_recipe_speaks_the_projects_form_dict_batches_collate_and_trainer_arguments() -> None:
    """Issue 23.4: a dict-batch project with its own collate and a loss carried by the output gets that loop, and a
    Trainer project gets TrainingArguments with every optimizer setting."""
    from batchfit.recommend import recipe
    from batchfit.study import TrialSummary

    pick = TrialSummary(batch_size=64, status="ok", lr_rule="adam-sqrt", grad_clip=1.0, seed=0, lr_schedule="LambdaLR",
                        optimizer={"class": "AdamW", "module": "torch.optim", "betas": [0.9, 0.98], "eps": 1e-8,
                                   "weight_decay": 0.01})
    form = {"collate_fn": "DataCollatorWithPadding", "mapping": True, "loss_from_output": True, "targets_key": None}
    r = recipe(pick, batch=64, micro=16, acc=4, lr=3e-4, warmup_steps=10, precision="bf16", framework="hf",
               batch_form=form)
    torch_code, hf = r["snippets"]["pytorch"], r["snippets"]["hf"]
    assert "collate_fn=collate_fn)  # your DataCollatorWithPadding" in torch_code
    assert "for i, batch in enumerate(loader):" in torch_code and "model(**batch).loss / accumulation" in torch_code
    assert "(x, y)" not in torch_code
    for arg in ("per_device_train_batch_size=16", "gradient_accumulation_steps=4", "learning_rate=0.0003",
                "adam_beta1=0.9", "adam_beta2=0.98", "adam_epsilon=1e-08", "weight_decay=0.01", "warmup_steps=10",
                "max_grad_norm=1", "bf16=True"):
        assert arg in hf, arg
    compile(hf.replace("output_dir=...,", "output_dir='x',"), "hf", "exec")  # it is valid Python
    keyed = recipe(pick, batch=64, micro=16, acc=4, lr=3e-4, warmup_steps=0, precision="fp32",
                   batch_form={**form, "loss_from_output": False, "targets_key": "label", "collate_fn": None})
    assert "loss_fn(model(**batch), batch['label'])" in keyed["snippets"]["pytorch"]
    plain = recipe(pick, batch=64, micro=16, acc=4, lr=3e-4, warmup_steps=0, precision="fp32")
    assert "for i, (x, y) in enumerate(loader):" in plain["snippets"]["pytorch"] and "hf" not in plain["snippets"]


def test_the_projects_own_warm_up_is_named_instead_of_warm_up_0() -> None:
    import torch

    from batchfit.tuning import _schedule_warmup, batch_form_of, framework_of
    from conftest import make_tiny_workload

    wl = make_tiny_workload()
    assert _schedule_warmup(wl) is None and framework_of(wl) == "pytorch"
    wl.lr_schedule = lambda o, n: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=[g["lr"] for g in o.param_groups], total_steps=n, pct_start=0.3)
    assert _schedule_warmup(wl) == pytest.approx(0.3, abs=0.01)
    wl.lr_schedule = lambda o, n: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=n)
    assert _schedule_warmup(wl) is None
    form = batch_form_of(wl)
    assert form["mapping"] is False and form["collate_fn"] is None and form["loss_from_output"] is False
    from batchfit.recommend import Measurements, _warmup_reason
    from batchfit.study import TrialSummary

    pick = TrialSummary(batch_size=32, status="ok", steps=100, lr_schedule="OneCycleLR", warmup_steps=0)
    own = Measurements.of({"batch_form": {"schedule_warmup": 0.3}, "trials": []})
    _, text = _warmup_reason(own, pick, 0.1)
    assert text.startswith("Warm-up: your lr_schedule (OneCycleLR) ramps the LR up over its first 30% of the run")
    _, text = _warmup_reason(Measurements.of({"trials": []}), pick, 0.1)
    assert text.startswith("Warm-up 0 step(s)")


def test_a_hugging_face_workload_is_recognised_for_its_recipe() -> None:
    pytest.importorskip("transformers")
    import transformers

    from batchfit.integrations.hf import hf_workload
    from batchfit.tuning import batch_form_of, framework_of

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=2)
    data = [{"input_ids": [1, 2, 3], "labels": 0}, {"input_ids": [4, 5, 6], "labels": 1}] * 4
    wl = hf_workload(lambda: transformers.BertForSequenceClassification(cfg), data, data)
    assert framework_of(wl) == "hf"
    form = batch_form_of(wl)
    assert form["mapping"] and form["loss_from_output"] and form["collate_fn"]


def test_every_candidate_tied_at_a_short_horizon_says_so_with_the_budget_that_could_tell() -> None:
    """Issue 18.3: every batch size within the tolerance of the best at a horizon short of the train budget: the
    horizon cannot tell them apart (the choice is by speed alone), and the flag names the next budget to try, x4
    the horizon per candidate at about x4 the cap; a clear winner, or the whole train budget measured, says
    nothing of the kind."""
    rng = np.random.default_rng(0)
    plan = {"budget": "samples:40000", "samples": 40_000, "max_cost": 0.5, "measurement": "samples:4000",
            "measurement_samples": 4_000}
    tied = [_trial(b, 0.95 + 0.001 * rng.standard_normal(), seed=s, steps_to_target=STEPS[b] * rng.lognormal(0, .05))
            for b in STEPS for s in range(3)]
    rec = recommend(_results(tied, train_budget=plan))
    assert rec.tied == sorted(STEPS)
    flag = [f for f in rec.flags if f.startswith("every batch size tried (16-256) is within the tolerance")]
    assert len(flag) == 1, rec.flags
    assert "at 4,000 samples" in flag[0] and "by speed alone" in flag[0]
    assert "measuring each candidate on 16,000 samples (x4 this horizon) needs about --max-cost 2" in flag[0]
    whole = recommend(_results(tied, train_budget={**plan, "measurement_samples": 40_000}))
    assert not any(f.startswith("every batch size tried") for f in whole.flags)
    apart = [_trial(b, q + 0.001 * s, seed=s) for b, q in ((16, 0.80), (64, 0.95), (256, 0.85)) for s in range(3)]
    clear = recommend(_results(apart, train_budget=plan))
    assert clear.batch_size == 64 and not any(f.startswith("every batch size tried") for f in clear.flags)
    # near the train budget the next horizon is the train budget itself
    near = recommend(_results(tied, train_budget={**plan, "measurement_samples": 20_000}))
    assert any("on 40,000 samples (x2 this horizon) needs about --max-cost 1" in f for f in near.flags), near.flags
    # nothing trained: that flag, not this one, and it names the same next budget
    flat = json.loads(json.dumps(tied))
    for t in flat:
        for r in t["history"]:
            r["val_loss"] = r["train_loss"] = 0.693
    still = recommend(_results(flat, train_budget=plan))
    assert not any(f.startswith("every batch size tried") for f in still.flags)
    assert any(f.startswith("budget too short to tell batch sizes apart") and f.endswith(
        "measuring each candidate on 16,000 samples (x4 this horizon) needs about --max-cost 2 (cost grows with the "
        "horizon per candidate; whether the model trains by then is not measured: on examples/text_dict it did "
        "not, at the rule's LR)") for f in still.flags), still.flags
    assert still.batch_size == 16
