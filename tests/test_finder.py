"""The finder on the CPU with a deterministic memory budget: exact probes, verified sizes, caps, margin, state."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit import memory
from batchfit.demos import ArrayDataset
from batchfit.engine import resolve_device, train
from batchfit.errors import ConfigError
from batchfit.finder import CUDA_AIM, FindResult, MemoryModel, MemoryTrials, _knee, find_batch_size, search_max
from batchfit.workload import Workload, accuracy
from conftest import make_tiny_workload

BUDGET = 400 * 1024  # bytes; the tiny MLP's largest batch under it is a few hundred


class SquareNet(nn.Module):
    """Memory grows like B**2 (a B x B similarity matrix, as in attention): the linear model must fail here."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 16)
        sim = torch.softmax(x @ x.T, dim=1)  # (B, B)
        return self.lin(sim @ x)


class HeavyEval(nn.Module):
    """Cheap to train, but evaluation allocates a large per-sample buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            x = x + x.repeat(1, 200)[:, :16] * 0 + torch.zeros(x.shape[0], 4000).sum(dim=1, keepdim=True) * 0
        return self.lin(x)


class TwoBranch(nn.Module):
    """Two branches meet again (like a residual block): a failed backward leaves the other branch pending."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 4), nn.Sequential(nn.Tanh(), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.a(h) + self.b(h)


def make_workload(n: int = 2000, n_val: int = 200, model: str = "mlp", shared: nn.Module | None = None) -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + n_val, 16, generator=g)
    y = torch.randint(0, 4, (n + n_val,), generator=g)

    def model_fn() -> nn.Module:
        if shared is not None:
            return shared
        if model == "square":
            return SquareNet()
        if model == "heavy-eval":
            return HeavyEval()
        if model == "two-branch":
            return TwoBranch()
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

    return Workload(
        name=f"test-{model}",
        model_fn=model_fn,
        optimizer_fn=lambda params, lr: torch.optim.Adam(params, lr=lr),
        loss_fn=F.cross_entropy,
        train_data=ArrayDataset(x[:n], y[:n]),
        val_data=ArrayDataset(x[n:], y[n:]) if n_val else None,
        metrics={"accuracy": accuracy},
        base_batch_size=32,
        base_lr=1e-3,
    )


def fits(workload: Workload, b: int, budget: int = BUDGET) -> bool:
    trials = MemoryTrials(workload, resolve_device("cpu"), "fp32", 0, budget, budget)
    return trials.memory_trial(b, "check")["ok"]


def phases(result: FindResult) -> list[tuple[str, int, bool]]:
    return [(p["phase"], p["batch_size"], p["ok"]) for p in result.probes]


def test_exact_probe_sequence_and_exact_max() -> None:
    wl = make_workload()
    r = find_batch_size(wl, memory_budget=BUDGET, throughput=False)
    seq = phases(r)
    memory_trials = [s for s in seq if s[0] != "eval"]
    # two fixed probes (2, then 16x), a third at half the budget, the size for the margin, one verification
    assert [s[0] for s in memory_trials] == ["probe", "probe", "probe", "recommend", "verify"]
    assert [s[1] for s in memory_trials[:2]] == [2, 32]
    assert all(ok for _, _, ok in memory_trials)
    assert memory_trials[3][1] == r.recommended_batch_size
    assert memory_trials[4][1] == r.max_batch_size
    assert r.real_trials == len(memory_trials) == 5
    # the prediction is exact for a linear memory profile: the next size up does not fit
    assert fits(wl, r.max_batch_size) and not fits(wl, r.max_batch_size + 1)
    assert r.limited_by == "memory"
    assert r.memory_model["per_sample_bytes"] > 0 and r.memory_model["fixed_bytes"] > 0
    # the third probe landed between 70 % of the budget (the line from the first two errs low) and the budget
    third = r.probes[2]
    assert 0.7 * BUDGET <= third["peak_bytes"] <= BUDGET
    # same inputs, same probes (deterministic budget)
    assert phases(find_batch_size(wl, memory_budget=BUDGET, throughput=False)) == seq


def test_every_reported_size_was_run_and_bisection_only_after_a_failed_prediction() -> None:
    wl = make_workload(model="square")
    r = find_batch_size(wl, memory_budget=BUDGET, throughput=False)
    ran_ok = {(p["phase"] == "eval", p["batch_size"]) for p in r.probes if p["ok"]}
    assert (False, r.max_batch_size) in ran_ok
    assert (False, r.recommended_batch_size) in ran_ok
    assert (True, r.eval_batch_size) in ran_ok
    seq = phases(r)
    first_failure = next(i for i, s in enumerate(seq) if not s[2])
    # the convex B**2 profile makes the line from the small probes overshoot; bisection only after that
    assert first_failure >= 2 and seq[first_failure][0] in ("probe", "verify")
    assert all(s[0] != "bisect" for s in seq[:first_failure])
    assert any(s[0] == "bisect" for s in seq)
    # within the 2 % search tolerance of the true max (here it is exact: the budget is deterministic)
    assert fits(wl, r.max_batch_size) and not fits(wl, math.floor(r.max_batch_size / 0.98) + 1)


def test_caps_dataset_and_max_batch_size() -> None:
    wl = make_workload(n=300)
    r = find_batch_size(wl, memory_budget="64MiB", throughput=False)
    assert r.max_batch_size == 300 and r.limited_by == "dataset"
    assert max(p["batch_size"] for p in r.probes if p["phase"] != "eval") == 300
    r = find_batch_size(wl, memory_budget="64MiB", batch_size_cap=100, throughput=False)
    assert r.max_batch_size == 100 and r.limited_by == "max_batch_size"
    assert max(p["batch_size"] for p in r.probes if p["phase"] != "eval") <= 100


def test_margin_keeps_headroom_and_zero_margin_gives_the_max() -> None:
    wl = make_workload()
    r = find_batch_size(wl, memory_budget=BUDGET, margin=0.2, throughput=False)
    rec = next(p for p in r.probes if p["batch_size"] == r.recommended_batch_size and p["phase"] != "eval")
    assert rec["peak_bytes"] <= 0.8 * BUDGET
    assert r.recommended_batch_size < r.max_batch_size
    # within the 2 % search tolerance of the largest size that keeps the margin
    assert not fits(wl, math.floor(r.recommended_batch_size / 0.98) + 1, budget=int(0.8 * BUDGET))
    r0 = find_batch_size(wl, memory_budget=BUDGET, margin=0.0, throughput=False)
    assert r0.recommended_batch_size == r0.max_batch_size == r.max_batch_size


def test_state_and_rng_are_left_exactly_as_they_were() -> None:
    shared = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))  # model_fn hands back this object
    shared.eval()
    wl = make_workload(shared=shared)
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    random.seed(123)
    np.random.seed(7)
    torch.manual_seed(99)
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    find_batch_size(wl, memory_budget=BUDGET, throughput=True, batch_size_cap=64)
    after = shared.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in shared.parameters())
    assert not shared.training
    assert random.getstate() == rng[0]
    np_after = np.random.get_state()
    assert np_after[0] == rng[1][0] and np.array_equal(np_after[1], rng[1][1]) and np_after[2:] == rng[1][2:]
    assert torch.equal(torch.get_rng_state(), rng[2])


def test_the_callers_gradients_come_back_exactly() -> None:
    """Issue 13.14: find_batch_size set every parameter's .grad to None on the caller's model."""
    shared = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(8, 16)
    F.cross_entropy(shared(x), torch.zeros(8, dtype=torch.long)).backward()  # the caller's gradients
    shared[2].bias.grad = None  # one parameter without a gradient stays without
    before = {name: (p.grad, None if p.grad is None else p.grad.clone()) for name, p in shared.named_parameters()}
    find_batch_size(make_workload(shared=shared), memory_budget=BUDGET, throughput=True, batch_size_cap=64)
    for name, p in shared.named_parameters():
        obj, value = before[name]
        if value is None:
            assert p.grad is None, name
        else:
            assert p.grad is obj and torch.equal(p.grad, value), name  # the same tensor, bit for bit


def test_deprecated_max_batch_size_keyword_still_caps_with_a_warning() -> None:
    wl = make_workload(n=300)
    with pytest.warns(DeprecationWarning, match="batch_size_cap"):
        r = find_batch_size(wl, memory_budget="64MiB", max_batch_size=100, throughput=False)
    assert r.max_batch_size == 100 and r.batch_size_cap == 100 and r.limited_by == "max_batch_size"
    with pytest.raises(ConfigError, match="batch_size_cap only"):  # both names: which one is meant?
        find_batch_size(wl, memory_budget="64MiB", max_batch_size=100, batch_size_cap=50, throughput=False)


def test_result_round_trips_through_its_json() -> None:
    events: list = []
    r = find_batch_size(make_workload(n=300), memory_budget=BUDGET, batch_size_cap=64, throughput=True,
                        micro_batch_size_only=False, progress=events.append)
    d = r.to_dict()
    again = FindResult.from_dict(json.loads(json.dumps(d)))
    assert again == r and again.to_dict() == d
    assert d["accumulation_steps"] == again.extras["accumulation_steps"]  # extra keys come back as extras
    with_status = FindResult.from_dict({**d, "status": "ok", "world_size": 1})
    assert with_status.extras["status"] == "ok" and with_status.to_dict() == {**d, "status": "ok", "world_size": 1}
    # progress: one convention (batchfit.progress), stage "find": start, a record per trial, end
    assert {e.stage for e in events} == {"find"}
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and set(kinds[1:-1]) == {"record"}
    recs = [e.data for e in events if e.kind == "record"]
    assert recs == r.probes and [e.completed for e in events if e.kind == "record"] == list(range(1, len(recs) + 1))
    assert d["regime"] == {"micro_batches_per_step": 1, "grad_clip": None, "lr_schedule": False}


def test_the_finders_peak_is_the_peak_train_reports_with_clipping_and_accumulation() -> None:
    """Issue 10.2: the finder measures the step train runs. The workload clips gradients, has a cosine schedule and
    accumulates 4 micro-batches of 16 (its micro_batch_size 16 under base_batch_size 64); a finder trial at
    micro-batch b must peak exactly where ``train(batch_size=4*b, micro_batch_size=b)`` peaks (CPU: counted bytes,
    so exact). The finder's old private step (one micro-batch, no clipping) peaked lower."""
    wl = dataclasses.replace(
        make_workload(), micro_batch_size=16, base_batch_size=64, grad_clip=0.5,
        lr_schedule=lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total),
    )
    trials = MemoryTrials(wl, resolve_device("cpu"), "fp32", 0, limit=1 << 40, enforce_bytes=1 << 40)
    peaks = {}
    for b in (16, 24):
        rec = trials.run(b, "verify")
        assert rec["ok"] and rec["steps"] == 3
        peaks[b] = rec["peak_bytes"]
    trials.close()
    for b, peak in peaks.items():
        trained = train(wl, batch_size=4 * b, micro_batch_size=b, steps=3)
        assert trained.accumulation_steps == 4
        assert peak == trained.peak_memory_bytes, (b, peak, trained.peak_memory_bytes)
    # the comparison discriminates: a single micro-batch of 16 without clipping (the old trial) peaks elsewhere
    plain = dataclasses.replace(wl, micro_batch_size=None, base_batch_size=16, grad_clip=None)
    single = MemoryTrials(plain, resolve_device("cpu"), "fp32", 0, limit=1 << 40, enforce_bytes=1 << 40)
    assert single.run(16, "verify")["peak_bytes"] < peaks[16]
    single.close()
    r = find_batch_size(wl, memory_budget=BUDGET, throughput=False)
    assert r.regime == {"micro_batches_per_step": 4, "grad_clip": 0.5, "lr_schedule": True}
    assert r.max_batch_size < find_batch_size(plain, memory_budget=BUDGET, throughput=False).max_batch_size


def test_evaluation_is_sized_separately() -> None:
    heavy = make_workload(model="heavy-eval")
    r = find_batch_size(heavy, memory_budget=BUDGET, throughput=False)
    no_val = find_batch_size(make_workload(model="heavy-eval", n_val=0), memory_budget=BUDGET, throughput=False)
    assert no_val.eval_batch_size is None
    assert r.max_batch_size == no_val.max_batch_size  # evaluation OOMs never shrink the training batch
    assert r.eval_batch_size is not None and r.eval_batch_size < r.max_batch_size
    assert any(p["phase"] == "eval" and not p["ok"] for p in r.probes)
    # training at the recommendation inside the same budget, evaluating at the size found, works
    out = train(heavy, batch_size=r.recommended_batch_size, steps=5, eval_batch_size=r.eval_batch_size,
                memory_budget=BUDGET)
    assert out.steps == 5 and not out.diverged


def test_repeated_ooms_in_trials_leave_live_memory_at_baseline() -> None:
    wl = make_workload(model="two-branch")
    trials = MemoryTrials(wl, resolve_device("cpu"), "fp32", 0, BUDGET, BUDGET)
    observer = memory.LiveBytesTracker(device_type="cpu")
    with observer:
        assert trials.memory_trial(8, "probe")["ok"]
        baseline = observer.live  # the model, built once and kept for every trial, and its initial weights
        assert baseline == 2 * sum(p.numel() * 4 for p in trials.keeper.model.parameters())
        for i in range(16):  # alternately out of memory in backward (the autograd engine holds on) and forward
            rec = trials.memory_trial(420 if i % 2 == 0 else 1500, "bisect")
            assert not rec["ok"] and ("backward" in rec["error"]) == (i % 2 == 0)
            assert observer.live == baseline
        assert trials.memory_trial(8, "probe")["ok"]
        assert observer.live == baseline
        trials.close()
        assert observer.live == 0


def test_throughput_and_knee(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchfit import finder

    # timing stops early on a flat curve (its own test below); a busy machine can make this tiny model's curve look
    # flat at 8, so here it never is: every size up to the cap is timed
    monkeypatch.setattr(finder, "_flattened", lambda done: False)
    wl = make_workload(n=300)
    r = find_batch_size(wl, memory_budget=BUDGET, throughput=True, batch_size_cap=48)
    timed = [p for p in r.probes if p["phase"] == "throughput"]
    assert [p["batch_size"] for p in timed] == [1, 2, 4, 8, 16, 32, 48]
    assert all(p["ok"] and p["samples_per_s"] > 0 for p in timed)
    assert r.throughput_knee_batch_size in {p["batch_size"] for p in timed}
    assert r.throughput_trials == len(timed)
    recs = [{"phase": "throughput", "ok": True, "batch_size": b, "samples_per_s": s}
            for b, s in ((8, 100.0), (16, 190.0), (32, 200.0), (64, 196.0))]
    assert _knee(recs) == 16  # smallest with >= 95 % of the best (200)
    assert _knee([]) is None


def test_to_dict_fields_and_accumulation() -> None:
    r = find_batch_size(make_workload(n=300), memory_budget=BUDGET, throughput=False, batch_size_cap=16,
                        micro_batch_size_only=False)
    d = r.to_dict()
    for key in ("device", "precision", "memory_budget_bytes", "max_batch_size", "recommended_batch_size",
                "throughput_knee_batch_size", "memory_model", "probes", "real_trials", "seconds"):
        assert key in d
    assert set(d["memory_model"]) >= {"fixed_bytes", "per_sample_bytes"}
    assert set(d["probes"][0]) >= {"batch_size", "ok", "peak_bytes", "samples_per_s", "phase"}
    assert d["accumulation_steps"] == 2 and d["effective_batch_size"] == 32  # base batch 32 from micro 16


def test_search_max_on_a_synthetic_device() -> None:
    calls = []

    def run(b: int, phase: str) -> dict:
        calls.append((phase, b))
        peak = 1000 + 10 * b
        return {"ok": peak <= 5000, "parts": {"all": peak}, "static_bytes": 1000}

    best, _ = search_max(run, cap=10_000, limit=5000)
    assert best == 400
    assert calls == [("probe", 2), ("probe", 32), ("probe", 250), ("verify", 400)]
    model = MemoryModel.fit({2: {"a": 1020, "b": 3000}, 32: {"a": 1320, "b": 3000}})
    assert model is not None and model.peak(100) == 3000 and model.max_under(5000) == 400


def test_memory_line_spans_sizes_far_enough_apart_that_counting_noise_does_not_flatten_it() -> None:
    # 424 bytes a sample; 10's peak counted 500 bytes high and 11's 100 low (storages freed late by a collective,
    # as in a CI run) flatten the line through the neighbours 10 and 11 to slope 0
    points = {2: {"fb": 13_012}, 8: {"fb": 15_556}, 10: {"fb": 16_404 + 500}, 11: {"fb": 16_828 - 100}}
    model = MemoryModel.fit(points)
    assert model is not None
    fixed, slope = model.parts["fb"]
    assert slope == (16_728 - 15_556) / 3  # through 11 and 8 (the largest size at most 0.8 x 11), not 10
    # with only neighbours to go by, the two largest still make the line
    near = MemoryModel.fit({10: {"fb": 1000}, 11: {"fb": 1100}})
    assert near is not None and near.parts["fb"][1] == 100


# Allocated-bytes peaks an H100 measured for ResNet-50 (fp32, SGD, 224x224) in the finder's trials; the true
# largest batch there was 960 (bisection), and the line through 492 and 912 predicted 970 against the free memory.
H100_PEAKS = {2: 526_374_912, 32: 3_078_945_280, 492: 42_955_220_480, 912: 79_369_409_536, 950: 82_673_865_728}
H100_LIMIT = 84_440_000_000
H100_MAX = 960


def h100_run(calls: list) -> object:
    sizes = sorted(H100_PEAKS)

    def peak(b: int) -> float:  # piecewise linear through the measurements, extrapolated by the last segment
        i = max(1, min(len(sizes) - 1, next((k for k, s in enumerate(sizes) if s >= b), len(sizes) - 1)))
        (b0, b1) = sizes[i - 1], sizes[i]
        return H100_PEAKS[b0] + (H100_PEAKS[b1] - H100_PEAKS[b0]) * (b - b0) / (b1 - b0)

    def run(b: int, phase: str) -> dict:
        calls.append((phase, b))
        return {"ok": b <= H100_MAX, "parts": {"all": int(peak(b))}, "static_bytes": 0}

    return run


def test_cuda_aim_finds_the_h100_max_in_five_trials_where_the_exact_aim_needs_six() -> None:
    calls: list = []
    best, _ = search_max(h100_run(calls), cap=50_000, limit=H100_LIMIT, stepping_stone=0.95 * H100_LIMIT,
                         aim=CUDA_AIM)
    assert [c[0] for c in calls] == ["probe", "probe", "probe", "recommend", "verify"]
    assert 0.97 * H100_MAX <= best <= H100_MAX and best == calls[-1][1]
    calls_exact: list = []
    best_exact, _ = search_max(h100_run(calls_exact), cap=50_000, limit=H100_LIMIT,
                               stepping_stone=0.95 * H100_LIMIT)
    assert len(calls_exact) == 6 and ("verify", 970) in calls_exact  # what the H100 run did: OOM, then back off
    assert 0.97 * H100_MAX <= best_exact <= H100_MAX


def test_a_plan_seeded_search_needs_fewer_probes_and_reaches_the_same_answer() -> None:
    """On a GPU the plan's recommendation and largest batch run first (issue 22, item 5): with the plan for the
    H100 ResNet-50 (922 with the margin, 971 without) three trials where the probes from batch 2 take five, inside
    the search's 2 % of the true 960; on a linear device the same answer as without a plan, in fewer trials."""
    calls: list = []
    best, _ = search_max(h100_run(calls), cap=50_000, limit=H100_LIMIT, stepping_stone=0.95 * H100_LIMIT,
                         aim=CUDA_AIM, guess=(922, 971))
    assert calls[:2] == [("recommend", 922), ("verify", 961)] and len(calls) == 3
    assert 0.98 * H100_MAX <= best <= H100_MAX and best == calls[-1][1]

    def linear(log: list) -> object:
        def run(b: int, phase: str) -> dict:
            log.append((phase, b))
            peak = 1000 + 10 * b
            return {"ok": peak <= 5000, "parts": {"all": peak}, "static_bytes": 1000}
        return run

    plain: list = []
    seeded: list = []
    assert search_max(linear(plain), cap=10_000, limit=5000, stepping_stone=4750)[0] == 400
    assert search_max(linear(seeded), cap=10_000, limit=5000, stepping_stone=4750, guess=(370, 396))[0] == 400
    assert len(seeded) < len(plain) and seeded[0] == ("recommend", 370)
    wrong: list = []  # a plan far too optimistic: its sizes fail, the probes from batch 2 run as without it
    assert search_max(linear(wrong), cap=10_000, limit=5000, guess=(5000, 9000))[0] == 400
    assert wrong[0] == ("verify", 9000) and ("probe", 2) in wrong


def test_plan_guess_on_a_cuda_device_and_plan_vs_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The finder's first prediction on CUDA is batchfit.plan for that device's name and the search's limit; a
    device not in the table takes a row of its architecture; a plan that fails says why."""
    from batchfit import finder, planner

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    wl = make_workload()
    limit = 80 * 2**20
    guess = finder.plan_guess(wl, torch.device("cuda"), "fp32", limit, 0.05, 10**6)
    direct = planner.plan(wl, gpu="H100", batch_sizes=[1], memory_bytes=limit + planner.CUDA_CONTEXT_BYTES,
                          batch_size_cap=10**6)
    assert guess["gpu"] == "H100-80GB" and guess["predicted_max_batch_size"] == direct.limit_batch_size
    assert guess["predicted_recommended_batch_size"] == direct.max_batch_size <= direct.limit_batch_size
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Some Future GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert finder.plan_guess(wl, torch.device("cuda"), "fp32", limit, 0.05, 10**6)["gpu"].startswith("A100")
    failed = finder.plan_guess(wl, torch.device("cuda"), "fp8", limit, 0.05, 10**6)
    assert set(failed) == {"error"} and "precision" in failed["error"]
    records = [{"batch_size": 700, "ok": True, "peak_bytes": 70 * 2**20, "phase": "verify"},
               {"batch_size": 800, "ok": False, "peak_bytes": None, "phase": "verify"}]
    both = finder._plan_vs_measured(guess, records, 700)
    assert both["measured_max_batch_size"] == 700 and both["measured_peak_bytes_at_max"] == 70 * 2**20
    assert both["predicted_peak_bytes_at_max"] == guess["fixed_bytes"] + 700 * guess["per_sample_bytes"]
    assert both["probes"] == 2 and finder._plan_vs_measured(failed, records, 700) == failed


def test_tune_find_stage_reports_plan_vs_measured(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """``tune --device cuda``: the find stage passes the plan next to the measurement into its result (a faked
    CUDA finder here) and the report prints it on one line."""
    from batchfit import finder, report, tuning

    planned = {"gpu": "H100-80GB", "predicted_max_batch_size": 971, "predicted_recommended_batch_size": 922,
               "fixed_bytes": 300 * 2**20, "per_sample_bytes": 86 * 2**20, "measured_max_batch_size": 960,
               "predicted_peak_bytes_at_max": 300 * 2**20 + 960 * 86 * 2**20,
               "measured_peak_bytes_at_max": 83_547_788_288, "probes": 3}

    def fake_find(workload, **kwargs) -> FindResult:  # noqa: ANN001, ANN003
        assert kwargs["device"] == "cuda"
        return FindResult(device="cuda:0", precision="fp32", memory_budget_bytes=None, max_batch_size=960,
                          recommended_batch_size=922, throughput_knee_batch_size=256, memory_model={}, probes=[],
                          real_trials=3, seconds=1.0, extras={"plan": planned})

    monkeypatch.setattr(finder, "find_batch_size", fake_find)
    run = tuning._Run(out=tmp_path, progress=None, identity={"workload": "w"}, device="cuda", precision="fp32",
                      seed=0)
    result = tuning._find(make_workload(), run, memory_budget=None, batch_size_cap=None, margin=0.05)
    line = result["plan_vs_measured"]
    assert line.startswith("largest batch 971 vs 960, peak at 960 ") and "(H100-80GB, 3 real trials)" in line
    assert f"plan vs measured: {line}" in report._study_lines({"find": result})
    assert not any(x.startswith("plan vs measured") for x in report._study_lines({"find": {"real_trials": 3}}))
    assert finder.plan_vs_measured_line({"error": "unknown gpu"}) == "no plan (unknown gpu)"


def test_the_cpu_search_does_not_plan() -> None:
    r = find_batch_size(make_workload(), memory_budget=BUDGET, throughput=False)
    assert "plan" not in r.extras and r.probes[0]["phase"] == "probe"


def test_model_is_built_once_and_the_max_ran_three_steps() -> None:
    wl = make_workload()
    built = []
    factory = wl.model_fn
    wl.model_fn = lambda: built.append(1) or factory()
    r = find_batch_size(wl, memory_budget=BUDGET, throughput=True)
    assert len(built) == 1 and r.limited_by == "memory"
    steps = {}
    for p in r.probes:
        if p["phase"] in ("probe", "verify", "bisect", "recommend") and p["ok"]:
            steps[p["batch_size"]] = max(steps.get(p["batch_size"], 0), p["steps"])
    assert steps[r.max_batch_size] >= 3 and steps[r.recommended_batch_size] >= 2
    assert r.recommended_batch_size < r.max_batch_size
    assert all(p["steps"] == 2 for p in r.probes if p["phase"] in ("probe", "recommend"))
    assert all(p["steps"] == 3 for p in r.probes if p["phase"] in ("verify", "bisect"))
    # capped at a probe: that probe runs a verification's 3 steps and is the answer, no extra trial
    capped = find_batch_size(wl, memory_budget=BUDGET, throughput=False, batch_size_cap=16, margin=0.0)
    train_trials = [p for p in capped.probes if p["phase"] != "eval"]
    assert [(p["batch_size"], p["steps"]) for p in train_trials] == [(2, 2), (16, 3)]
    assert capped.max_batch_size == capped.recommended_batch_size == 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"margin": 1.0}, "margin"),
        ({"margin": -0.1}, "margin"),
        ({"batch_size_cap": 0}, "batch_size_cap"),
        ({"batch_size_cap": 2.5}, "batch_size_cap"),
        ({"memory_budget": "1e400"}, "memory_budget must be a finite size"),
        ({"memory_budget": float("nan")}, "memory_budget must be a finite size"),
        ({"memory_budget": -1}, "memory_budget must be a positive size"),
        ({"seed": 10**30}, "seed must be an integer in"),
        ({"seed": 2**32}, "seed must be an integer in"),
        ({"seed": 1.5}, "seed"),
        ({"memory_budget": "plenty"}, "not understood"),
        ({"seed": -1}, "seed"),
        ({"precision": "fp8"}, "precision"),
        ({"memory_budget": "1KiB"}, "even batch size 1"),
    ],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        find_batch_size(make_workload(n=64), throughput=False, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_a_budget_and_with_real_memory() -> None:
    wl = make_workload(n=20_000, n_val=500)
    # a first run creates what CUDA libraries keep for the process (cuBLAS handles and workspaces per thread):
    # the baseline is taken after it, and a second run must leave nothing behind
    find_batch_size(wl, device="cuda", memory_budget="512MiB", throughput=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    r = find_batch_size(wl, device="cuda", memory_budget="512MiB", throughput=True)
    assert r.device.startswith("cuda") and r.memory_limit_bytes == 512 * 1024**2
    ran_ok = {p["batch_size"] for p in r.probes if p["ok"] and p["phase"] in ("probe", "verify", "bisect",
                                                                                 "recommend")}
    assert r.max_batch_size in ran_ok and r.recommended_batch_size in ran_ok
    assert all(p["peak_bytes"] <= 512 * 1024**2 for p in r.probes if p["ok"] and p["peak_bytes"] is not None)
    leftover = torch.cuda.memory_allocated() - before
    assert leftover == 0, f"{leftover} bytes still allocated after find_batch_size"  # every trial's tensors are gone
    x = torch.empty(int(0.6 * torch.cuda.get_device_properties(0).total_memory) // 4, device="cuda")
    del x  # the budget's memory fraction was reset: more than 512 MiB can be allocated again
    r2 = find_batch_size(wl, device="cuda", throughput=False, batch_size_cap=4096)
    assert r2.memory_budget_bytes is None and r2.max_batch_size == 4096 and r2.limited_by == "max_batch_size"


# ---------------------------------------------------------------------------------------------------------------
# Issue 23.3: throughput timing warms up to a steady step, stops when the curve is flat, and the knee has a range


def _timed(b: int, rates: list[float]) -> dict:
    return {"batch_size": b, "phase": "throughput", "ok": True, "samples_per_s": float(np.median(rates)),
            "chunk_samples_per_s": rates}


def test_warm_up_runs_until_a_step_is_steady(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchfit import finder

    now = [0.0]  # a fake clock that each step advances by its own time: no sleeps, so a busy machine cannot flip it
    monkeypatch.setattr(finder.time, "perf_counter", lambda: now[0])
    times = iter([0.5, 0.2, 0.05, 0.011, 0.010, 0.010, 0.010])  # a cold loop: lazy init, then the allocator
    ran: list[int] = []

    def step(i: int) -> None:
        ran.append(i)
        now[0] += next(times)

    n = finder._warm_up(step, lambda: None)
    assert n == 5 and ran == [0, 1, 2, 3, 4]  # 0.011 -> 0.010 is within 25 %: steady (a fixed 2 would stop cold)
    slow = iter([0.01 * 1.5**i for i in range(40)])  # never steady (each step 1.5x the last): bounded

    def slower(i: int) -> None:
        now[0] += next(slow)

    assert finder._warm_up(slower, lambda: None) == finder.WARMUP_MAX_STEPS


def test_timing_stops_only_on_a_flat_curve_and_the_knee_has_a_range() -> None:
    from batchfit import finder

    rng = np.random.default_rng(0)

    def chunks(mean: float, rel: float = 0.02) -> list[float]:
        return list(mean * (1 + rel * rng.standard_normal(8)))

    rising = [_timed(1, chunks(100)), _timed(2, chunks(190)), _timed(4, chunks(350)), _timed(8, chunks(600))]
    assert not finder._flattened(rising)
    flat = [*rising, _timed(16, chunks(605)), _timed(32, chunks(598))]
    assert finder._flattened(flat)
    burst = [*rising, _timed(16, chunks(605)), _timed(32, chunks(150))]  # a load burst: clearly slower, not flat
    assert not finder._flattened(burst)
    # a knee that could be either of two sizes shows both; a clear one shows one
    tied = [_timed(16, chunks(100, 0.01)), _timed(32, chunks(186, 0.05)), _timed(64, chunks(196, 0.05)),
            _timed(128, chunks(198, 0.05))]
    lo, hi = finder.knee_spread(tied)
    assert lo <= finder._knee(tied) <= hi and lo < hi
    clear = [_timed(16, chunks(100, 0.005)), _timed(32, chunks(150, 0.005)), _timed(64, chunks(300, 0.005)),
             _timed(128, chunks(301, 0.005))]
    assert finder.knee_spread(clear) == [64, 64] == [finder._knee(clear)] * 2


def test_find_reports_the_knee_with_its_range_and_each_size_warm_up() -> None:
    r = find_batch_size(make_tiny_workload(n=256), throughput=True).to_dict()
    timed = [p for p in r["probes"] if p["phase"] == "throughput" and p["ok"]]
    assert timed and all(2 <= p["warmup_steps"] <= 12 and p["chunk_samples_per_s"] for p in timed)
    lo, hi = r["throughput_knee_range"]
    assert lo <= r["throughput_knee_batch_size"] <= hi
