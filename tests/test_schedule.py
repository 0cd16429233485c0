"""Batch-size schedules: parsing, the optimizer transfer at a change, and the schedule derived from branching."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from batchfit import schedule
from batchfit.errors import ConfigError
from batchfit.schedule import Phase


def test_parse_schedule_from_text_pairs_and_dicts() -> None:
    want = [Phase(0, 32), Phase(500, 64), Phase(1500, 256)]
    assert schedule.parse_schedule("0:32, 500:64,1500:256") == want
    assert schedule.parse_schedule([(1500, 256), (0, 32), (500, 64)]) == want
    assert schedule.parse_schedule([p.to_dict() for p in want]) == want
    assert schedule.parse_schedule("0:32,100:32,200:64") == [Phase(0, 32), Phase(200, 64)]  # no-op change merged


@pytest.mark.parametrize("bad, match", [
    ("", "STEP:BATCH"), ("0:32,500", "STEP:BATCH"), ("10:32", "start at step 0"), ("0:32,100:48", "integer factor"),
    ("0:32,100:64,100:128", "same step twice"), ("0:0", "positive integer"), ("0:a", "integers"),
    ("-5:32", "integer >= 0"),
])
def test_parse_schedule_rejects_bad_specs_in_one_line(bad: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        schedule.parse_schedule(bad)


def test_plan_micro_keeps_accumulation_exact_under_the_memory_limit() -> None:
    assert schedule.plan_micro(64, None) == (64, 1)
    assert schedule.plan_micro(64, 100) == (64, 1)
    assert schedule.plan_micro(256, 100) == (86, 3)
    micro, acc = schedule.plan_micro(1000, 64)
    assert micro <= 64 and micro * acc >= 1000 and (acc - 1) * micro < 1000


def test_transfer_sgd_scales_the_lr_linearly() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    out = schedule.transfer(opt, 4)
    assert out["lr"] == pytest.approx(0.4) and "beta2" not in out


def test_transfer_adam_keeps_the_beta2_half_life_in_samples() -> None:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, betas=(0.9, 0.999))
    schedule.transfer(opt, 4)
    b2 = opt.param_groups[0]["betas"][1]
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3)  # adam-sqrt: x sqrt(4)
    half_life_samples = lambda beta, batch: math.log(0.5) / math.log(beta) * batch  # noqa: E731
    assert half_life_samples(b2, 128) == pytest.approx(half_life_samples(0.999, 32))
    opt2 = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, betas=(0.9, 0.999))
    schedule.transfer(opt2, 4, beta2="sde")
    assert opt2.param_groups[0]["betas"][1] == pytest.approx(0.996)


def test_transfer_adamw_timescale_holds_b_over_eta_lambda() -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0.1)
    tau = lambda g, b: b / (g["lr"] * g["weight_decay"])  # noqa: E731  (D, the data size, is constant)
    before = tau(opt.param_groups[0], 64)
    schedule.transfer(opt, 2, weight_decay_timescale=True)
    assert tau(opt.param_groups[0], 128) == pytest.approx(before)


def test_schedule_state_phases_changes_and_samples() -> None:
    st = schedule.ScheduleState(schedule.parse_schedule("0:8,10:16,20:64"))
    assert st.phase_at(0).batch_size == 8 and st.phase_at(15).batch_size == 16 and st.phase_at(99).batch_size == 64
    assert st.change_at(10) == (Phase(0, 8), Phase(10, 16)) and st.change_at(11) is None and st.change_at(0) is None
    assert st.samples_through(25) == 10 * 8 + 10 * 16 + 5 * 64


def test_derive_schedule_follows_the_measured_critical_batch() -> None:
    pts = [SimpleNamespace(samples=0, local_critical_batch=40), SimpleNamespace(samples=3200, local_critical_batch=130),
           SimpleNamespace(samples=9000, local_critical_batch=100),  # a lower reading never shrinks the batch
           SimpleNamespace(samples=20000, local_critical_batch=600)]
    phases = schedule.derive_schedule(pts, base_batch_size=16, total_samples=50_000, max_batch_size=256)
    assert [p.batch_size for p in phases] == [32, 128, 256]
    st = schedule.ScheduleState(phases)
    assert st.samples_through(phases[1].step) >= 3200  # the change happens once those samples were seen
    assert st.samples_through(phases[2].step) >= 20000
    assert schedule.derive_schedule([], base_batch_size=16, total_samples=100) == [Phase(0, 16)]
