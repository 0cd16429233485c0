"""The sweep on tiny workloads: candidates, budgets, persistence on Optuna, resume, kill -9, divergence, failures."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit.demos import ArrayDataset
from batchfit.errors import ConfigError, WorkloadError
from batchfit.metric import Metric, best_config_mean
from batchfit.progress import KINDS, ProgressEvent
from batchfit.study import (
    MAX_LR_SEARCH,
    TUNE_NAMESPACE,
    Budget,
    SweepFailedError,
    SweepResult,
    TrialSummary,
    config_key,
    default_batch_sizes,
    load_results,
    lr_multipliers,
    parse_batch_sizes,
    parse_budget,
    parse_target,
    read_namespace,
    sweep,
    write_namespace,
)
from batchfit.study.store import is_schema_race, open_study
from batchfit.study.trial import classify_failure
from batchfit.workload import Workload, accuracy

HERE = Path(__file__).resolve()



# ---------------------------------------------------------------------------------------------------------------
# Workloads (module-level factories, so a subprocess can load them as tests/test_sweep.py:NAME)


def classify(n: int = 192, n_val: int = 64, lr: float = 0.2, fail_at_batch: int = 0, hidden: int = 16,
             fail_always: bool = False, no_val: bool = False) -> Workload:
    """A small MLP classifier on a fixed random, learnable dataset; ``fail_at_batch`` makes that batch's loss raise
    (``fail_always``: every batch's); ``hidden`` is the model's width; ``no_val``: no validation data."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, generator=g)
    x = torch.randn(n + n_val, 8, generator=g)
    y = (x @ w).argmax(dim=1)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if fail_always or (fail_at_batch and out.shape[0] == fail_at_batch):
            raise RuntimeError("synthetic failure for this batch size")
        return F.cross_entropy(out, target)

    return Workload(
        name="tiny-classify",
        model_fn=lambda: nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 3)),
        optimizer_fn=lambda params, lr: torch.optim.SGD(params, lr=lr),
        loss_fn=loss_fn,
        train_data=ArrayDataset(x[:n], y[:n]),
        val_data=None if no_val else ArrayDataset(x[n:], y[n:]),
        metrics={"accuracy": accuracy},
        base_batch_size=8,
        base_lr=lr,
    )


def regress(n: int = 512, lr: float = 0.2) -> Workload:
    """Linear regression (MSE, SGD, no metrics: val_loss ranks); the linear LR rule makes B=256 diverge."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + 128, 16, generator=g)
    y = (x @ torch.randn(16, 1, generator=g)) + 0.1 * torch.randn(n + 128, 1, generator=g)
    return Workload(
        name="tiny-regress",
        model_fn=lambda: nn.Linear(16, 1),
        optimizer_fn=lambda params, lr: torch.optim.SGD(params, lr=lr),
        loss_fn=F.mse_loss,
        train_data=ArrayDataset(x[:n], y[:n]),
        val_data=ArrayDataset(x[n:], y[n:]),
        base_batch_size=8,
        base_lr=lr,
    )


def _bs(trial: optuna.trial.FrozenTrial) -> int | None:
    """A stored trial's batch size (queued trials have no params yet: read the batchfit config)."""
    cfg = trial.user_attrs.get("batchfit_config")
    return cfg["batch_size"] if cfg else None


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sweep.db'}"


class Events:
    """A progress consumer: every sweep event, as (name, data), and the ProgressEvents themselves."""

    def __init__(self) -> None:
        self.raw: list[ProgressEvent] = []

    def __call__(self, event: ProgressEvent) -> None:
        assert isinstance(event, ProgressEvent) and event.stage == "sweep"
        self.raw.append(event)

    @property
    def events(self) -> list[tuple[str, dict]]:
        return [(e.data["event"], e.data) for e in self.raw]

    def started(self) -> list[int]:
        return [info["batch_size"] for event, info in self.events if event == "trial_start"]


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def test_parse_budget_and_steps() -> None:
    assert parse_budget("epochs:2") == Budget("epochs", 2.0)
    assert parse_budget("epochs:2").steps_for(16, 100) == 12  # 6 steps per epoch (drop_last)
    assert parse_budget("epochs:0.5").steps_for(16, 160) == 5
    assert parse_budget("steps:30").steps_for(1000, 5000) == 30
    assert parse_budget("samples:1000").steps_for(64, 5000) == 16  # ceil(1000 / 64)
    assert parse_budget("samples:10").steps_for(64, 5000) == 1
    for bad in ("weeks:3", "epochs", "epochs:x", "epochs:0", "steps:-5", "steps:1.5", "epochs:inf", ""):
        with pytest.raises(ConfigError):
            parse_budget(bad)


def test_parse_target_and_batch_sizes() -> None:
    assert parse_target(0.97) == {"kind": "fraction", "value": 0.97}
    assert parse_target("abs:0.9") == {"kind": "absolute", "value": 0.9}
    assert parse_target("=1.5") == {"kind": "absolute", "value": 1.5}
    for bad in (1.5, 0, -0.1, "high", float("nan"), True):
        with pytest.raises(ConfigError):
            parse_target(bad)
    assert parse_batch_sizes("64,16, 32,16") == [16, 32, 64]
    assert parse_batch_sizes([8, 4]) == [4, 8]
    for bad in ("", "16,,32", "16,x", "0,16", "-4", [], [0], [1.5], [True]):
        with pytest.raises(ConfigError):
            parse_batch_sizes(bad)


def test_default_candidates_and_lr_multipliers() -> None:
    assert default_batch_sizes(1437, None, 32) == [1, 16, 32, 64, 128, 256, 512, 1024, 1437]
    assert default_batch_sizes(1437, None, 32, extremes=False) == [16, 32, 64, 128, 256, 512, 1024]
    # beyond the memory limit by accumulation, up to 64 x the micro-batch; no extremes on big data
    assert default_batch_sizes(100_000, 64, 32) == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert default_batch_sizes(5000, 16, 24) == [16, 24, 32, 64, 128, 256, 512, 1024]  # full batch past the limit
    assert default_batch_sizes(10) == [1, 2, 4, 8, 10]
    assert lr_multipliers(1) == [1.0]
    assert lr_multipliers(2) == [0.5, 1.0]
    assert lr_multipliers(5) == [0.25, 0.5, 1.0, 2.0, 4.0]
    with pytest.raises(ConfigError):
        lr_multipliers(0)


def test_bad_inputs_raise_before_training(tmp_path: Path) -> None:
    wl = classify()
    url = _url(tmp_path)
    with pytest.raises(ConfigError, match="exceed the training set"):
        sweep(wl, batch_sizes=[8, 500], storage=url)
    with pytest.raises(ConfigError, match="not a database URL"):
        sweep(wl, batch_sizes=[8], storage="not-a-url")
    with pytest.raises(ConfigError, match="cannot open the store"):
        sweep(wl, batch_sizes=[8], storage="nosuchdriver://host/db")
    with pytest.raises(ConfigError, match="adam-sqrt"):
        sweep(wl, batch_sizes=[8], storage=url, lr_rule="adam-sqrt")
    with pytest.raises(ConfigError, match="lr_rule"):
        sweep(wl, batch_sizes=[8], storage=url, lr_rule="cubic")
    with pytest.raises(ConfigError):
        sweep(wl, batch_sizes=[8], storage=url, lr_search=0)
    with pytest.raises(ConfigError, match="no batchfit store"):
        load_results(f"sqlite:///{tmp_path / 'missing.db'}")


# ---------------------------------------------------------------------------------------------------------------
# Running, persisting, resuming


def test_sweep_results_resume_and_store_roundtrip(tmp_path: Path) -> None:
    url = _url(tmp_path)
    wl = classify()
    ev = Events()
    kw = dict(budget="epochs:3", storage=url, micro_batch_size=16, seed=0)
    res = sweep(wl, batch_sizes=[4, 8, 32], progress=ev, **kw).to_dict()
    assert ev.started() == [4, 8, 32]
    assert [t["batch_size"] for t in res["trials"]] == [4, 8, 32]
    t32 = res["trials"][2]
    # the memory limit (16) is exceeded by 32: it accumulates 2 micro-batches of 16
    assert (t32["micro_batch_size"], t32["accumulation_steps"]) == (16, 2)
    for t in res["trials"]:
        assert t["status"] == "ok" and t["error"] is None
        assert t["steps"] == 3 * (192 // t["batch_size"])  # equal-epoch budget, drop_last
        assert t["epochs"] == pytest.approx(3.0, abs=0.2)
        assert len(t["history"]) >= 10  # ~16 evaluations per trial: steps-to-target has resolution
        assert t["best_val_metrics"]["accuracy"] >= t["final_val_metrics"]["accuracy"] - 1e-9
        assert t["samples_per_s"] > 0 and t["peak_memory_bytes"] > 0
        # B_simple over training: from the trial's own accumulated micro-batches above the limit (every step); one
        # micro-batch (the layout is not split for it): from extra halves of every 8th step's batch
        measured = [r["step"] for r in t["history"] if "noise_window" in r]
        assert t["b_simple_history"] and t["noise_split"] is False
        if t["batch_size"] > 16:
            assert t["b_simple"] is not None and len(measured) == len(t["history"])
        else:  # a few single-step estimates of B = 4, 8: the EMA of |G|^2 may stay <= 0 (b_simple None)
            assert (t["micro_batch_size"], t["accumulation_steps"]) == (t["batch_size"], 1)
            assert measured and sum(r["noise_window"]["steps"] for r in t["history"] if "noise_window" in r) == \
                t["steps"] // 8  # every 8th step measured
    assert res["primary_metric"] == "accuracy" and res["higher_is_better"] is True
    best = best_config_mean(res["trials"], Metric("accuracy", True))  # the best configuration's final quality
    assert res["target"]["best"] == pytest.approx(best)
    assert res["target"]["value"] == pytest.approx(0.97 * best)
    reached = [t for t in res["trials"] if t["steps_to_target"] is not None]
    assert reached, "the best trial reaches 97 % of its own best by definition"
    for t in reached:  # the raw curve's first crossing, interpolated between the evaluations around it
        goal = res["target"]["value"] - 1e-12
        i = next(i for i, r in enumerate(t["history"]) if r["val_metrics"]["accuracy"] >= goal)
        rec, prev = t["history"][i], t["history"][i - 1] if i else None
        assert rec["val_metrics"]["accuracy"] >= res["target"]["value"] - 1e-9
        lo = prev["step"] if prev else rec["step"]
        assert lo <= t["steps_to_target"] <= rec["step"]
        frac = 1.0 if prev is None else (t["steps_to_target"] - prev["step"]) / (rec["step"] - prev["step"])
        if prev is not None:  # one fraction for every unit: steps, epochs and samples interpolate alike
            assert t["epochs_to_target"] == pytest.approx(prev["epoch"] + frac * (rec["epoch"] - prev["epoch"]))
            assert t["samples_to_target"] == pytest.approx(prev["samples"] + frac * (rec["samples"] - prev["samples"]))
    assert [t["batch_size"] for t in res["best_per_batch"]] == [4, 8, 32]
    json.dumps(res, allow_nan=False)  # plain JSON

    # every evaluation is in the store: intermediate values and user attributes, one per record
    study = optuna.load_study(study_name=res["study_name"], storage=url)
    done = {t.number: t.datetime_complete for t in study.trials}
    for ft in study.trials:
        assert len(ft.intermediate_values) == len([k for k in ft.user_attrs if k.startswith("eval_")])

    # the same call again: nothing re-runs, the same results come back
    ev2 = Events()
    res2 = sweep(wl, batch_sizes=[4, 8, 32], progress=ev2, **kw).to_dict()
    assert ev2.started() == []
    assert res2["trials"] == res["trials"]
    # a wider grid in the same study: only the new configuration runs
    ev3 = Events()
    res3 = sweep(wl, batch_sizes=[4, 8, 16, 32], progress=ev3, **kw).to_dict()
    assert ev3.started() == [16]
    assert [t["batch_size"] for t in res3["trials"]] == [4, 8, 16, 32]
    study = optuna.load_study(study_name=res["study_name"], storage=url)
    assert {t.number: t.datetime_complete for t in study.trials if t.number in done} == done

    # the store alone rebuilds the results (what `batchfit report STORE` uses)
    loaded = load_results(url).to_dict()
    assert loaded["trials"] == res3["trials"] and loaded["target"] == res3["target"]
    assert loaded["critical_batch_size"] == res3["critical_batch_size"]
    other = load_results(url, res["study_name"], target="abs:0.5")
    assert other.target["kind"] == "absolute" and other.target["value"] == 0.5

    # a different budget under the same explicit study name is refused, not mixed in
    with pytest.raises(ConfigError, match="different settings"):
        sweep(wl, batch_sizes=[4], budget="epochs:1", storage=url, study_name=res["study_name"])


def test_diverged_trial_recorded_and_sweep_goes_on(tmp_path: Path) -> None:
    # linear rule: lr 0.2 at B=8 -> 6.4 at B=256 diverges; lr_search 2 runs x1 then x1/2 for every batch
    res = sweep(regress(), batch_sizes=[8, 256], budget="steps:40", lr_search=2, lr_rule="linear",
                storage=_url(tmp_path), micro_batch_size=256, measure_noise=False).to_dict()
    by = {(t["batch_size"], t["lr_multiplier"]): t for t in res["trials"]}
    assert len(by) == 4
    assert by[(256, 1.0)]["status"] == "diverged" and "diverged" in by[(256, 1.0)]["error"]
    assert by[(256, 1.0)]["diverged_at_step"] is not None
    assert by[(8, 0.5)]["status"] == "ok" and by[(8, 1.0)]["status"] == "ok"  # ran after the divergence
    assert res["primary_metric"] == "val_loss" and res["higher_is_better"] is False
    best = best_config_mean(res["trials"], Metric("val_loss", False))
    assert res["target"]["value"] == pytest.approx(best / 0.97)
    # the best LR per batch size prefers a finished, non-diverged trial
    bpb = {t["batch_size"]: t for t in res["best_per_batch"]}
    assert bpb[8]["status"] == "ok"
    # a diverged trial is a result: a re-run does not retry it
    ev = Events()
    sweep(regress(), batch_sizes=[8, 256], budget="steps:40", lr_search=2, lr_rule="linear",
          storage=_url(tmp_path), micro_batch_size=256, measure_noise=False, progress=ev)
    assert ev.started() == []


def test_failing_trial_recorded_and_retried_on_request(tmp_path: Path) -> None:
    url = _url(tmp_path)
    kw = dict(batch_sizes=[8, 16, 32], budget="epochs:1", storage=url, micro_batch_size=32, measure_noise=False)
    res = sweep(classify(fail_at_batch=16), **kw)
    status = {t.batch_size: t.status for t in res.trials}
    assert status == {8: "ok", 16: "failed", 32: "ok"}
    err = next(t.error for t in res.trials if t.batch_size == 16)
    assert "synthetic failure" in err
    ev = Events()
    sweep(classify(), progress=ev, **kw)  # a recorded failure is not re-run by default ...
    assert ev.started() == []
    ev = Events()
    res = sweep(classify(), progress=ev, retry_failed=True, **kw)  # ... unless asked
    assert ev.started() == [16]
    assert {t.batch_size: t.status for t in res.trials} == {8: "ok", 16: "ok", 32: "ok"}


def test_sharpness_in_trials(tmp_path: Path) -> None:
    res = sweep(classify(), batch_sizes=[8, 64], budget="epochs:1", storage=_url(tmp_path), micro_batch_size=64,
                measure_noise=False, sharpness=True)
    for t in res.trials:
        assert isinstance(t.sharpness, float) and t.sharpness > 0


def test_extra_attrs_stored_and_returned(tmp_path: Path) -> None:
    url = _url(tmp_path)
    res = sweep(classify(), batch_sizes=[8], budget="steps:5", storage=url, micro_batch_size=8,
                extra_attrs={"find": {"max_batch_size": 123}, "noise": {"b_simple": 4.5}})
    assert res.find == {"max_batch_size": 123} and res.noise == {"b_simple": 4.5}
    assert res.to_dict()["find"] == {"max_batch_size": 123} and load_results(url).find == {"max_batch_size": 123}
    t = res.trials[0]  # B=8 runs as the recommendation would run it, one micro-batch; 5 steps: none of them is
    # an 8th step, the first that extra halves measure, so no B_simple of its own
    assert (t.micro_batch_size, t.accumulation_steps, t.noise_split, t.b_simple) == (8, 1, False, None)


# ---------------------------------------------------------------------------------------------------------------
# kill -9 mid-trial, and two workers sharing one study (subprocesses)

_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from batchfit.study import sweep

    spec, url, kill_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Killer:
        def __init__(self):
            self.batch, self.evals = None, 0
        def on_train_start(self, state):
            self.batch, self.evals = state.batch_size, 0
        def on_evaluate(self, state, record):
            self.evals += 1
            if self.batch == kill_batch and self.evals == 3:
                os.kill(os.getpid(), signal.SIGKILL)  # kill -9, mid-trial

    sweep(spec, batch_sizes=[4, 8, 16], budget="epochs:2", storage=url, micro_batch_size=16,
          measure_noise=False, callbacks=[Killer()])
""")


def _run_script(tmp_path: Path, url: str, kill_batch: int) -> subprocess.Popen:
    script = tmp_path / "run_sweep.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), f"{HERE}:classify", url, str(kill_batch)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_mid_trial_then_rerun(tmp_path: Path) -> None:
    url = _url(tmp_path)
    proc = _run_script(tmp_path, url, kill_batch=8)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    states = {_bs(t): t for t in study.trials}
    assert states[4].state.name == "COMPLETE"
    assert states[8].state.name == "RUNNING"  # left behind by the dead process
    partial = [k for k in states[8].user_attrs if k.startswith("eval_")]
    assert len(partial) == 3  # the evaluations before the kill were stored as they happened
    done_4 = (states[4].number, states[4].datetime_complete)

    ev = Events()
    res = sweep(f"{HERE}:classify", batch_sizes=[4, 8, 16], budget="epochs:2", storage=url, micro_batch_size=16,
                measure_noise=False, progress=ev)
    assert sorted(ev.started()) == [8, 16]  # B=4 finished: not re-run; B=8 re-run from the start
    study = optuna.load_study(study_name=res.study_name, storage=url)
    trials_8 = [t for t in study.trials if _bs(t) == 8]
    assert sorted(t.state.name for t in trials_8) == ["COMPLETE", "FAIL"]
    killed = next(t for t in trials_8 if t.state.name == "FAIL")
    assert killed.user_attrs["status"] == "interrupted"
    t4 = [t for t in study.trials if _bs(t) == 4]
    assert [(t.number, t.datetime_complete) for t in t4] == [done_4]  # nothing finished was lost or redone
    assert [t.status for t in res.trials] == ["ok", "ok", "ok"]
    t8 = next(t for t in res.trials if t.batch_size == 8)
    assert t8.history[0]["step"] <= t8.history[1]["step"] and t8.history[0]["epoch"] < 1  # from step 0
    assert t8.steps == 2 * (192 // 8) and len(t8.history) > 3


def test_two_workers_share_one_study(tmp_path: Path) -> None:
    url = _url(tmp_path)
    procs = [_run_script(tmp_path, url, kill_batch=0) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    res = load_results(url)
    assert [t.status for t in res.trials] == ["ok", "ok", "ok"]
    study = optuna.load_study(study_name=res.study_name, storage=url)
    complete = [_bs(t) for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(complete) == [4, 8, 16]  # each configuration trained exactly once


def test_duplicate_queue_entries_step_aside(tmp_path: Path) -> None:
    """Workers racing to enqueue (PostgreSQL, no file lock) may queue a configuration twice: it still runs once."""
    url = _url(tmp_path)
    kw = dict(budget="steps:3", storage=url, micro_batch_size=16, measure_noise=False)
    res = sweep(classify(), batch_sizes=[8], **kw)
    study = optuna.load_study(study_name=res.study_name, storage=url)
    cfg8 = study.trials[0].user_attrs["batchfit_config"]
    cfg16 = {"key": config_key(16, 1.0), "batch_size": 16, "lr_multiplier": 1.0}
    for cfg in (cfg8, cfg16, cfg16):
        study.enqueue_trial({"batch_size": cfg["batch_size"], "lr_multiplier": 1.0},
                            user_attrs={"batchfit_config": cfg})
    ev = Events()
    res = sweep(classify(), batch_sizes=[8, 16], progress=ev, **kw)
    assert ev.started() == [16]
    study = optuna.load_study(study_name=res.study_name, storage=url)
    pruned = [(_bs(t), t.user_attrs["duplicate_of"]) for t in study.trials if t.state.name == "PRUNED"]
    assert pruned == [(8, 0), (16, 2)]
    assert [(t.batch_size, t.status) for t in res.trials] == [(8, "ok"), (16, "ok")]


# ---------------------------------------------------------------------------------------------------------------
# Typed results, the tune namespace, progress events


def test_typed_results_round_trip_and_dict_form(tmp_path: Path) -> None:
    from _study_fixture import make_results

    url = _url(tmp_path)
    res = sweep(classify(), batch_sizes=[8, 32], budget="epochs:1", storage=url, micro_batch_limit=16, lr_search=2,
                measure_noise=False)
    assert isinstance(res, SweepResult) and all(isinstance(t, TrialSummary) for t in res.trials)
    d = res.to_dict()
    assert SweepResult.from_dict(d).to_dict() == d  # results.json -> typed -> results.json, exactly
    assert json.loads(json.dumps(d)) == d
    # the dict form is to_dict() alone: a SweepResult is read by attribute, not as a mapping
    assert not isinstance(res, Mapping) and not hasattr(res, "get") and not hasattr(res, "__getitem__")
    # best_per_batch entries are the same dicts as in trials (displays mark them by identity)
    assert all(any(b is t for t in d["trials"]) for b in d["best_per_batch"])
    assert res.status == d["status"] == "complete" and d["micro_batch_limit"] == d["micro_batch_size"] == 16
    for t in res.trials:
        assert TrialSummary.from_dict(t.to_dict()) == t
        assert t.best_metric == Metric("accuracy", True).of_trial(t.to_dict())  # one way to read the metric
    loaded = load_results(url)
    assert isinstance(loaded, SweepResult) and loaded.to_dict() == d
    # today's results.json structure (the report / recommend fixture): every key and value kept, keys only added
    fixture = make_results()
    again = SweepResult.from_dict(fixture).to_dict()
    for key, value in fixture.items():
        assert again[key] == value or key in ("trials", "best_per_batch"), key
    for old, new in zip(fixture["trials"], again["trials"]):
        assert {k: new[k] for k in old} == old
    assert set(again) - set(fixture) <= set(d)  # only keys a real sweep's results have
    with pytest.raises(ConfigError, match="trial 1.*batch_size"):
        SweepResult.from_dict({**fixture, "trials": [fixture["trials"][0], {"status": "ok"}]})


def test_tune_namespace_is_returned_by_load_results(tmp_path: Path) -> None:
    url = _url(tmp_path)
    res = sweep(classify(), batch_sizes=[8], budget="steps:3", storage=url, micro_batch_limit=8, measure_noise=False,
                extra_attrs={"find": {"max_batch_size": 99}})
    study = open_study(url)
    write_namespace(study, "lr_calibration", {"best_multiplier": 2.0, "lr": 0.4})
    study.set_user_attr("precision_check", {"legacy": True})  # a store written before the namespace existed
    assert study.user_attrs[f"{TUNE_NAMESPACE}lr_calibration"] == {"best_multiplier": 2.0, "lr": 0.4}
    assert read_namespace(study) == {"find": {"max_batch_size": 99}, "lr_calibration": {"best_multiplier": 2.0,
                                     "lr": 0.4}, "precision_check": {"legacy": True}}
    loaded = load_results(url)
    assert loaded.tune["lr_calibration"]["lr"] == 0.4 and loaded.find == {"max_batch_size": 99}
    d = loaded.to_dict()  # what the report reads: top-level keys, as tune's results.json has them
    assert d["find"] == {"max_batch_size": 99} and d["noise"] is None
    assert d["lr_calibration"] == {"best_multiplier": 2.0, "lr": 0.4} and d["precision_check"] == {"legacy": True}
    assert SweepResult.from_dict(d).tune == loaded.tune
    assert res.to_dict()["find"] == {"max_batch_size": 99}


def test_without_validation_data_sweeps_and_ranks_on_train_loss(tmp_path: Path) -> None:
    url = _url(tmp_path)
    res = sweep(classify(no_val=True), batch_sizes=[8, 16, 32], budget="epochs:2", storage=url,
                micro_batch_limit=32, measure_noise=False)
    assert (res.primary_metric, res.higher_is_better) == ("train_loss", False)
    assert [t.status for t in res.trials] == ["ok"] * 3
    for t in res.trials:
        assert t.best_train_loss is not None and t.best_metric == pytest.approx(t.best_train_loss)
        assert t.best_val_loss is None and t.final_train_loss is not None
        assert Metric("train_loss", False).of_trial(t.to_dict()) == pytest.approx(t.best_train_loss)
    best = best_config_mean(res.trials, Metric("train_loss", False))
    assert res.target["best"] == pytest.approx(best) and res.target["value"] == pytest.approx(best / 0.97)
    assert "train_loss" in res.target["definition"]
    assert any(t.steps_to_target is not None for t in res.trials)
    assert load_results(url).to_dict() == res.to_dict()


def test_progress_events_follow_the_one_convention(tmp_path: Path) -> None:
    ev = Events()
    sweep(classify(), batch_sizes=[8, 16], budget="steps:4", storage=_url(tmp_path), micro_batch_limit=16,
          measure_noise=False, eval_every=2, progress=ev)
    assert {e.kind for e in ev.raw} <= set(KINDS)
    names = [name for name, _ in ev.events]
    assert names[0] == "start" and names[-1] == "done" and names.count("trial_end") == 2
    start, end = ev.raw[0], ev.raw[-1]
    assert (start.kind, start.total, start.completed) == ("start", 2, 0)
    assert end.kind == "end" and isinstance(end.data["results"], SweepResult) and end.completed == 2
    assert {e.kind for e in ev.raw if e.data["event"] == "eval"} == {"record"}
    assert [e.completed for e in ev.raw if e.data["event"] == "trial_end"] == [1, 2]
    # the old two-argument (event, info) form is refused before any trial, in one line that says the new form
    with pytest.raises(ConfigError, match="one batchfit.progress.ProgressEvent"):
        sweep(classify(), batch_sizes=[8, 16], budget="steps:4", storage=_url(tmp_path / "old"),
              micro_batch_limit=16, measure_noise=False, eval_every=2, progress=lambda event, info: None)
    assert not (tmp_path / "old").exists()


# ---------------------------------------------------------------------------------------------------------------
# Hostile inputs (issue 13): all trials failing, failures kept, --lr-search bound, the study key


def test_every_trial_failed_has_a_status_and_raises_on_request(tmp_path: Path) -> None:
    res = sweep(classify(fail_always=True), batch_sizes=[8, 16], budget="steps:3", storage=_url(tmp_path),
                micro_batch_limit=16, measure_noise=False)
    assert res.status == "failed" and res.to_dict()["status"] == "failed"
    assert {t.error_kind for t in res.trials} == {"workload"}  # raised in this file: the user's loss
    with pytest.raises(WorkloadError, match="every trial of the sweep failed.*synthetic failure"):
        res.raise_for_status()
    ok = sweep(classify(), batch_sizes=[8], budget="steps:3", storage=_url(tmp_path / "b"), micro_batch_limit=8,
               measure_noise=False)
    ok.raise_for_status()  # nothing to raise
    # a failure inside batchfit itself is not the user's: it is raised as a batchfit bug
    internal = dataclasses.replace(res, trials=tuple(dataclasses.replace(t, error_kind="internal")
                                                    for t in res.trials))
    with pytest.raises(SweepFailedError):
        internal.raise_for_status()


def test_failures_are_classified_by_where_they_were_raised() -> None:
    from batchfit.study.inputs import GridPoint

    # the trial catches in batchfit's own frame: drop this test's frame from the traceback to look the same
    try:
        GridPoint.from_attr({})  # a KeyError raised inside batchfit
    except KeyError as exc:
        assert classify_failure(exc.with_traceback(exc.__traceback__.tb_next), 8)[0] == "internal"
    try:
        classify(fail_always=True).loss_fn(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    except RuntimeError as exc:
        kind, message = classify_failure(exc.with_traceback(exc.__traceback__.tb_next), 8)
        assert kind == "workload" and message.startswith("RuntimeError: synthetic failure")
    assert classify_failure(WorkloadError("bad labels"), 8) == ("workload", "bad labels")
    assert classify_failure(torch.cuda.OutOfMemoryError("CUDA out of memory"), 8)[0] == "memory"


def test_rerun_with_failed_trials_says_they_are_kept(tmp_path: Path) -> None:
    kw = dict(batch_sizes=[8, 16], budget="steps:3", storage=_url(tmp_path), micro_batch_limit=16,
              measure_noise=False)
    sweep(classify(fail_at_batch=16), **kw)
    ev = Events()
    sweep(classify(), progress=ev, **kw)
    start = ev.raw[0]
    assert start.data["failed_kept"] == 1 and ev.started() == []
    assert "1 failed trial(s) kept; rerun with --retry-failed" in start.message
    ev = Events()
    sweep(classify(), progress=ev, retry_failed=True, **kw)
    assert ev.raw[0].data["failed_kept"] == 0 and "kept" not in ev.raw[0].message and ev.started() == [16]


def test_lr_search_is_bounded(tmp_path: Path) -> None:
    assert len(lr_multipliers(MAX_LR_SEARCH)) == MAX_LR_SEARCH == 16
    for bad in (MAX_LR_SEARCH + 1, 3000):
        with pytest.raises(ConfigError, match="lr_search must be at most 16"):
            lr_multipliers(bad)
        with pytest.raises(ConfigError, match="lr_search must be at most 16"):
            sweep(classify(), batch_sizes=[8], storage=_url(tmp_path), lr_search=bad)


def test_study_key_covers_the_model_and_optimizer(tmp_path: Path) -> None:
    url = _url(tmp_path)
    kw = dict(batch_sizes=[8], budget="steps:3", storage=url, micro_batch_limit=8, measure_noise=False)
    first = sweep(classify(), **kw)
    wider = sweep(classify(hidden=64), **kw)  # same workload name and data, a wider model: a new study
    assert wider.study_name != first.study_name and wider.study_name.startswith("sweep-tiny-classify-")
    assert sweep(classify(), **kw).study_name == first.study_name  # the same settings resume the same study
    adam = dataclasses.replace(classify(), optimizer_fn=lambda p, lr: torch.optim.Adam(p, lr=lr))
    assert sweep(adam, **kw).study_name not in (first.study_name, wider.study_name)
    momentum = dataclasses.replace(classify(), optimizer_fn=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
    assert sweep(momentum, **kw).study_name != first.study_name
    with pytest.raises(ConfigError, match="different settings.*model"):
        sweep(classify(hidden=64), study_name=first.study_name, **kw)


def test_schema_creation_races_are_recognised_by_type() -> None:
    import sqlalchemy.exc as sa_exc

    psycopg = pytest.importorskip("psycopg")
    dup = sa_exc.ProgrammingError("CREATE TYPE", {}, psycopg.errors.DuplicateObject("type exists"))
    assert is_schema_race(dup)
    assert is_schema_race(sa_exc.IntegrityError("CREATE TYPE", {}, psycopg.errors.UniqueViolation("pg_type")))
    assert not is_schema_race(sa_exc.ProgrammingError("SELECT", {}, psycopg.errors.SyntaxError("bad sql")))
    assert not is_schema_race(RuntimeError("DuplicateObject"))  # a name in a message is not a type


def test_seeds_are_a_sweep_dimension_stored_and_resumed(tmp_path: Path) -> None:
    """11.2: replicate seeds are trials of the same study (keys ``..._s1``), every one kept by load_results, and a
    rerun with more seeds (everywhere or for some batch sizes only) trains only the missing ones."""
    url = _url(tmp_path)
    kw = dict(budget="steps:4", storage=url, micro_batch_limit=16, measure_noise=False, seed=5)
    res = sweep(classify(), batch_sizes=[8, 16], seeds=2, **kw)
    trials = res.to_dict()["trials"]
    assert sorted((t["batch_size"], t["seed"]) for t in trials) == [(8, 5), (8, 6), (16, 5), (16, 6)]
    assert all(t["status"] == "ok" for t in trials)
    assert trials[0]["optimizer"]["class"] == "SGD" and "momentum" in trials[0]["optimizer"]  # the recipe's source
    same = [t for t in trials if t["batch_size"] == 8]
    assert same[0]["history"] != same[1]["history"]  # another seed, another run
    assert len(load_results(url).trials) == 4
    ev = Events()
    res = sweep(classify(), batch_sizes=[8, 16], seeds=2, replicates={16: 3}, progress=ev, **kw)
    assert ev.started() == [16]  # only the new replicate trained
    assert sorted((t.batch_size, t.seed) for t in res.trials) == [(8, 5), (8, 6), (16, 5), (16, 6), (16, 7)]
    keys = {t.user_attrs["batchfit_config"]["key"] for t in open_study(url).get_trials()}
    assert {"b8_m1", "b8_m1_s6", "b16_m1_s7"} <= keys  # the base seed keeps the pre-seeds key
    with pytest.raises(ConfigError, match="seeds"):
        sweep(classify(), batch_sizes=[8], seeds=0, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Issue 19.7: a trial measures the layout the recommendation gives (no split for the noise meter)


def batchnorm_classify(n: int = 96, n_val: int = 32) -> Workload:
    """A classifier with BatchNorm: its running statistics depend on how the batch is cut into micro-batches."""
    g = torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(n + n_val, 8, generator=g) + 1.0
    y = (x @ torch.randn(8, 3, generator=g)).argmax(dim=1)
    return Workload(
        name="tiny-batchnorm",
        model_fn=lambda: nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)),
        optimizer_fn=lambda params, lr: torch.optim.SGD(params, lr=lr),
        loss_fn=F.cross_entropy,
        train_data=ArrayDataset(x[:n], y[:n]),
        val_data=ArrayDataset(x[n:], y[n:]),
        metrics={"accuracy": accuracy},
        base_batch_size=8,
        base_lr=0.1,
    )


class _Layout:
    """Counts the model's forward calls per optimizer step (training mode only) and keeps the BatchNorm buffers."""

    def __init__(self) -> None:
        self.forwards: list[int] = []
        self.rows: list[list[int]] = []
        self.buffers: dict[str, torch.Tensor] = {}
        self._calls: list[int] = []

    def on_train_start(self, state) -> None:  # noqa: ANN001
        def hook(module, args) -> None:  # noqa: ANN001
            if module.training:
                self._calls.append(args[0].shape[0])

        state.model.register_forward_pre_hook(hook)

    def on_step_end(self, state) -> None:  # noqa: ANN001
        self.forwards.append(len(self._calls))
        self.rows.append(list(self._calls))
        self._calls.clear()

    def on_train_end(self, state, result) -> None:  # noqa: ANN001
        self.buffers = {k: v.detach().clone() for k, v in state.model.named_buffers()}


@pytest.mark.parametrize(("batch", "limit"), [(8, 8), (16, 32)])
def test_a_trial_within_the_micro_limit_runs_as_one_micro_batch(tmp_path: Path, batch: int, limit: int) -> None:
    """With the noise meter on, a batch <= the micro-batch limit trains as micro-batch B x accumulation 1 (the
    recommendation's layout): the stored attributes say so, the model sees one forward of B samples per step, and
    the BatchNorm running statistics equal those of a plain ``batchfit.train`` at that batch."""
    import batchfit

    seen = _Layout()
    res = sweep(batchnorm_classify(), batch_sizes=[batch], budget="steps:5", storage=_url(tmp_path),
                micro_batch_limit=limit, measure_noise=True, callbacks=[seen])
    t = res.to_dict()["trials"][0]
    assert t["status"] == "ok"
    assert (t["micro_batch_size"], t["accumulation_steps"], t["noise_split"]) == (batch, 1, False)
    stored = optuna.load_study(study_name=res.study_name, storage=_url(tmp_path)).trials[0].user_attrs
    assert (stored["plan"]["micro_batch_size"], stored["plan"]["accumulation_steps"]) == (batch, 1)
    assert seen.forwards == [1] * 5 and seen.rows == [[batch]] * 5
    plain = _Layout()
    batchfit.train(batchnorm_classify(), batch_size=batch, steps=5, seed=t["seed"], callbacks=[plain])
    assert plain.rows == seen.rows
    assert seen.buffers.keys() == plain.buffers.keys() and "1.running_mean" in seen.buffers
    for k, v in plain.buffers.items():
        assert torch.equal(seen.buffers[k], v), k


@pytest.mark.parametrize(("batch", "limit"), [(8, 8), (16, 32)])
def test_a_trial_within_the_micro_limit_measures_b_simple_on_extra_halves(tmp_path: Path, batch: int,
                                                                          limit: int) -> None:
    """(a) A batch <= the micro-batch limit trains as one micro-batch and still records B_simple: every 8th step is
    measured by an extra forward/backward over the two halves of its batch, after the step, and the trial trains
    bit-for-bit as a plain ``batchfit.train`` (the BatchNorm running statistics included). The stored attributes
    say how noise was measured; the records pool against the training loss."""
    import batchfit
    from batchfit.noise import b_simple_against_loss, noise_records

    seen = _Layout()
    res = sweep(batchnorm_classify(), batch_sizes=[batch], budget="steps:16", storage=_url(tmp_path),
                micro_batch_limit=limit, measure_noise=True, callbacks=[seen])
    t = res.to_dict()["trials"][0]
    assert t["status"] == "ok"
    assert (t["micro_batch_size"], t["accumulation_steps"], t["noise_split"]) == (batch, 1, False)
    windows = {r["step"]: r["noise_window"] for r in t["history"] if "noise_window" in r}
    assert sorted(windows) == [8, 16] and all(w["steps"] == 1 for w in windows.values())
    assert t["b_simple_history"] and t["b_simple"] is not None
    assert b_simple_against_loss(noise_records([t]))  # pooled against the training loss
    stored = optuna.load_study(study_name=res.study_name, storage=_url(tmp_path)).trials[0].user_attrs
    assert (stored["plan"]["noise_method"], stored["plan"]["noise_every"]) == ("extra-halves", 8)
    assert stored["result"]["noise_method"] == "extra-halves" and stored["result"]["noise_samples"] == 2 * batch
    half = [batch // 2, batch // 2]
    assert seen.rows == [[batch, *half] if step % 8 == 0 else [batch] for step in range(1, 17)]
    plain = _Layout()
    batchfit.train(batchnorm_classify(), batch_size=batch, steps=16, seed=t["seed"], callbacks=[plain])
    assert [row[:1] for row in seen.rows] == plain.rows
    for k, v in plain.buffers.items():
        assert torch.equal(seen.buffers[k], v), k


def test_a_trial_above_the_micro_limit_accumulates_and_measures_b_simple(tmp_path: Path) -> None:
    """A batch above the limit runs as the recommendation's micro-batches x accumulation, and B_simple comes from
    those micro-batches (no extra split)."""
    seen = _Layout()
    res = sweep(batchnorm_classify(), batch_sizes=[32], budget="steps:4", storage=_url(tmp_path),
                micro_batch_limit=16, measure_noise=True, callbacks=[seen])
    t = res.to_dict()["trials"][0]
    assert (t["micro_batch_size"], t["accumulation_steps"], t["noise_split"]) == (16, 2, False)
    assert seen.rows == [[16, 16]] * 4
    assert t["b_simple_history"] and t["b_simple"] is not None
    stored = optuna.load_study(study_name=res.study_name, storage=_url(tmp_path)).trials[0].user_attrs
    assert stored["plan"]["noise_method"] == "accumulation" and "noise_every" not in stored["plan"]


# ---------------------------------------------------------------------------------------------------------------
# Issue 19.6: a batch size outside the adam-sqrt rule's range gets its LR searched


def test_a_batch_outside_the_adam_sqrt_range_gets_at_least_three_lr_multipliers() -> None:
    from batchfit.study import lr_multipliers_by_batch, make_grid

    sizes = [8, 32, 40, 64, 128]  # k = 1, 4, 5 (k (1 - 0.9) = 0.5: the rule's last value), 8 and 16 (outside)
    kw = {"rule": "adam-sqrt", "base_batch_size": 8, "betas": (0.9, 0.999)}
    wide = lr_multipliers_by_batch(sizes, 1, **kw)
    assert wide == {64: [0.5, 1.0, 2.0], 128: [0.5, 1.0, 2.0]}
    assert lr_multipliers_by_batch(sizes, 5, **kw) == {64: lr_multipliers(5), 128: lr_multipliers(5)}
    assert lr_multipliers_by_batch(sizes, 1, rule="linear", base_batch_size=8, betas=None) == {}
    grid = make_grid(sizes, lr_multipliers(1), by_batch=wide)
    per_batch: dict[int, list[float]] = {}
    for p in grid:
        per_batch.setdefault(p.batch_size, []).append(p.lr_multiplier)
    assert per_batch == {8: [1.0], 32: [1.0], 40: [1.0], 64: [1.0, 0.5, 2.0], 128: [1.0, 0.5, 2.0]}
    assert [p.key for p in grid[:5]] == [f"b{b}_m1" for b in sizes]  # every scaled LR first, then the neighbours
    assert grid == make_grid(sizes, lr_multipliers(1), by_batch=wide)  # deterministic
    seeded = make_grid(sizes, lr_multipliers(1), by_batch=wide, seeds=2)
    assert len(seeded) == 2 * len(grid) and {p.key for p in seeded if p.seed} >= {"b128_m0.5_s1", "b8_m1_s1"}


def _adam_classify() -> Workload:
    return dataclasses.replace(classify(n=64, n_val=32, lr=1e-3),
                               optimizer_fn=lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999)))


def test_the_sweep_searches_the_lr_of_a_batch_outside_the_rules_range(tmp_path: Path) -> None:
    res = sweep(_adam_classify(), batch_sizes=[8, 64], budget="steps:1", storage=_url(tmp_path),
                measure_noise=False, micro_batch_limit=64).to_dict()
    keys = sorted((t["batch_size"], t["lr_multiplier"]) for t in res["trials"])
    assert keys == [(8, 1.0), (64, 0.5), (64, 1.0), (64, 2.0)]  # k = 8: k (1 - beta1) = 0.8 > 0.5
    assert res["lr_multipliers"] == [1.0] and res["lr_multipliers_by_batch"] == {"64": [0.5, 1.0, 2.0]}
    by = {(t["batch_size"], t["lr_multiplier"]): t for t in res["trials"]}
    assert by[(64, 1.0)]["lr_scaling"]["outside_range"] is True
    assert by[(64, 1.0)]["optimizer"]["betas"] == [0.5, pytest.approx(0.999**8)]
    assert by[(8, 1.0)]["lr_scaling"]["outside_range"] is False
    again = sweep(_adam_classify(), batch_sizes=[8, 64], budget="steps:1", storage=_url(tmp_path),
                  measure_noise=False, micro_batch_limit=64)  # resumed: the same grid, nothing re-run
    assert again.study_name == res["study_name"] and len(again.trials) == 4


def test_the_weight_decay_rule_and_the_adam_sqrt_version_are_in_the_study_identity() -> None:
    from batchfit.study.identity import ADAM_SQRT_VERSION, identity_differences, study_identity, workload_fingerprint

    def identity(wl: Workload, **kw: object) -> dict:
        return study_identity(wl, workload_fingerprint(wl), device="cpu", precision="fp32",
                              budget=parse_budget("steps:1"), lr_rule="auto", warmup=0, seed=0,
                              metric=Metric("accuracy", True), **kw)

    sgd = identity(classify())
    assert "weight_decay_rule" not in sgd and "adam_sqrt" not in sgd  # the defaults keep their study names
    adam, timescale = identity(_adam_classify()), identity(_adam_classify(), weight_decay_rule="timescale")
    assert adam["adam_sqrt"] == ADAM_SQRT_VERSION and timescale["weight_decay_rule"] == "timescale"
    assert identity_differences(adam, timescale) == ["weight_decay_rule"]
    assert identity_differences(timescale, adam) == ["weight_decay_rule"]
    clipped = {k: v for k, v in adam.items() if k != "adam_sqrt"}  # a study scaled by the earlier (clipping) rule
    assert identity_differences(clipped, adam) == ["adam_sqrt"]


def test_the_printed_critical_batch_is_the_one_the_decision_uses(tmp_path: Path) -> None:
    """Issue 19.2: one fit at one target. The sweep's critical_batch_size (what the report prints) and the
    decision's S(B) fit (what the recommendation, its flags and its JSON read) are the same estimate; before, the
    sweep fitted at 97 % of the best single evaluation and the decision at 97 % of the best tied seed mean."""
    from batchfit.recommend import decide_results, recommend

    res = sweep(classify(n=256), batch_sizes=[4, 8, 16, 32], budget="epochs:4", storage=_url(tmp_path), seeds=2,
                seed=0, measure_noise=False)
    data = res.to_dict()
    decision = decide_results(data, 0.01)
    assert decision is not None and decision.critical is not None and data["critical_batch_size"] is not None
    assert data["critical_batch_size"]["b_crit"] == pytest.approx(decision.critical.b_crit.estimate, rel=1e-9)
    assert data["target"]["value"] == pytest.approx(decision.target, rel=1e-12)
    rec = recommend(data)
    assert rec.critical_batch["b_crit"]["estimate"] == pytest.approx(decision.critical.b_crit.estimate)


def test_a_trial_records_the_optimizers_own_settings_and_peak_lr_not_its_schedules(tmp_path: Path) -> None:
    """Issue 23.4: OneCycleLR starts at max_lr / 25 and sets momentum to 0.95 itself; the trial (and so the recipe)
    records the LR batchfit gave the batch size and the optimizer's own momentum 0.9."""
    wl = classify()
    wl.optimizer_fn = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)
    wl.lr_schedule = lambda o, n: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=[g["lr"] for g in o.param_groups], total_steps=n)
    res = sweep(wl, batch_sizes=[16], budget="steps:6", storage=_url(tmp_path), micro_batch_limit=16,
                measure_noise=False, eval_every=3).to_dict()
    (t,) = res["trials"]
    assert t["optimizer"]["momentum"] == pytest.approx(0.9)  # not OneCycle's max_momentum 0.95
    assert t["lr"] == pytest.approx(wl.base_lr * 16 / wl.base_batch_size)  # the peak, not max_lr / 25
