from __future__ import annotations

import math

import pytest
import torch

from batchfit import schedule
from batchfit.errors import ConfigError
from batchfit.scaling import BETA1_SDE_LIMIT, apply_scaling, beta2_power, default_rule, scale_lr


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("none", 0.1), ("linear", 0.8), ("sqrt", 0.1 * math.sqrt(8))],
)
def test_rules(rule: str, expected: float) -> None:
    assert scale_lr(0.1, 32, 256, rule).lr == pytest.approx(expected)


def test_scaling_down_is_symmetric() -> None:
    assert scale_lr(0.8, 256, 32, "linear").lr == pytest.approx(0.1)
    assert scale_lr(0.1, 32, 8, "sqrt").lr == pytest.approx(0.05)


def test_adam_sqrt_malladi() -> None:
    h = scale_lr(1e-3, 32, 128, "adam-sqrt", betas=(0.9, 0.999), eps=1e-8)
    assert h.k == 4
    assert h.lr == pytest.approx(2e-3)
    assert h.betas == pytest.approx((0.6, 0.999**4), rel=1e-12)  # beta1 by the SDE rule, beta2 by its half-life
    assert h.eps == pytest.approx(5e-9)
    assert not h.outside_range and h.notes == ()
    # shrinking the batch moves betas towards 1
    h = scale_lr(1e-3, 32, 8, "adam-sqrt", betas=(0.9, 0.999), eps=1e-8)
    assert h.betas == pytest.approx((0.975, 0.999**0.25), rel=1e-12)
    assert not h.outside_range
    # beta1 cannot go negative at large k: held where the rule's range ends (issue 19.6)
    h = scale_lr(1e-3, 32, 32 * 64, "adam-sqrt", betas=(0.9, 0.999))
    assert h.betas[0] == 0.5 and 0 < h.betas[1] < 1 and h.outside_range


def test_apply_scaling_in_place() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    sgd = torch.optim.SGD(p, lr=0.1, momentum=0.9)
    assert default_rule(sgd) == "linear"
    apply_scaling(sgd, 0.1, 32, 128, "auto")
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.4)
    adam = torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
    assert default_rule(adam) == "adam-sqrt"
    apply_scaling(adam, 1e-3, 32, 128, "auto")
    g = adam.param_groups[0]
    assert g["lr"] == pytest.approx(2e-3) and g["betas"] == pytest.approx((0.6, 0.99**4), rel=1e-12)
    assert g["eps"] == pytest.approx(5e-7)


def test_apply_scaling_keeps_group_ratios() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.1)
    apply_scaling(opt, 0.1, 16, 64, "linear")
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.04])


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="unknown rule 'cube'"):
        scale_lr(0.1, 32, 64, "cube")
    with pytest.raises(ConfigError, match="batch_size"):
        scale_lr(0.1, 32, 0, "linear")
    with pytest.raises(ConfigError, match="base_lr"):
        scale_lr(float("nan"), 32, 64, "linear")
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="Adam-family"):
        apply_scaling(sgd, 0.1, 32, 64, "adam-sqrt")


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"betas": (0.9,)}, "betas must be a pair"),
    ({"betas": (0.9, 0.999, 0.5)}, "betas must be a pair"),
    ({"betas": (0.9, 1.0)}, r"betas must each be in \[0, 1\)"),
    ({"betas": (1.5, 0.999)}, r"betas must each be in \[0, 1\)"),
    ({"betas": (-0.1, 0.999)}, r"betas must each be in \[0, 1\)"),
    ({"betas": ("0.9", 0.999)}, "betas must be a number"),
    ({"eps": -1e-8}, "eps must be >= 0"),
    ({"eps": float("inf")}, "eps must be a finite number"),
])
def test_adam_hyperparameters_are_checked(kwargs: dict, msg: str) -> None:
    """Issue 13.20: a one-element betas, betas >= 1 and a negative eps used to be accepted silently."""
    for rule in ("adam-sqrt", "linear"):
        with pytest.raises(ConfigError, match=msg):
            scale_lr(1e-3, 32, 128, rule, **kwargs)


def test_adam_sqrt_accepts_tensor_betas_of_an_optimizer() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-3, betas=(torch.tensor(0.9), torch.tensor(0.999)))
    apply_scaling(opt, 1e-3, 32, 128, "adam-sqrt")
    assert opt.param_groups[0]["betas"] == pytest.approx((0.6, 0.999**4), rel=1e-6)  # float32 betas


# ---------------------------------------------------------------------------------------------------------------
# Issue 19.6: the adam-sqrt rule outside its range, beta2 by its half-life, the AdamW weight-decay timescale


def test_beta1_is_held_at_the_end_of_the_rules_range_at_kappa_16() -> None:
    """At k = 16 the SDE rule gives beta1 = 1 - 16 x 0.1 = -0.6; it used to be clipped to 0 (Adam without momentum)
    and presented as the rule's. Now beta1 is held at 0.5, where the rule stops, and the result says so."""
    h = scale_lr(1e-3, 32, 512, "adam-sqrt", betas=(0.9, 0.999), eps=1e-8)
    assert h.k == 16 and h.lr == pytest.approx(4e-3)
    assert h.betas[0] == 0.5 == 1 - BETA1_SDE_LIMIT
    assert h.betas[1] == pytest.approx(0.999**16, rel=1e-12)
    assert h.outside_range is True
    assert len(h.notes) == 1 and "beta1" in h.notes[0] and "-0.6" in h.notes[0] and "held at 0.5" in h.notes[0]
    assert h.to_dict()["outside_range"] is True and h.to_dict()["betas"] == [0.5, pytest.approx(0.999**16)]


@pytest.mark.parametrize(("beta1", "k", "expected", "outside"), [
    (0.9, 4, 0.6, False),      # k (1 - beta1) = 0.4: the rule
    (0.9, 5, 0.5, False),      # exactly 0.5: still the rule (its last value)
    (0.9, 6, 0.5, True),       # 0.6 > 0.5: held at 0.5
    (0.95, 8, 0.6, False),     # 0.4: the rule
    (0.95, 64, 0.5, True),
    (0.3, 2, 0.3, True),       # a base beta1 below 0.5 is already past the range: kept, not raised to 0.5
    (0.0, 4, 0.0, True),
    (0.9, 0.25, 0.975, False),  # smaller batch: the rule, in [beta1, 1)
])
def test_beta1_range(beta1: float, k: float, expected: float, outside: bool) -> None:
    h = scale_lr(1e-3, 64, int(64 * k), "adam-sqrt", betas=(beta1, 0.999))
    assert h.betas[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert h.outside_range is outside
    assert 0.0 <= h.betas[0] < 1.0 and 0.0 <= h.betas[1] < 1.0


def test_smaller_batches_keep_betas_below_one() -> None:
    # 1 - k (1 - beta) rounds to 1 for beta near 1 and tiny k: clipped below 1 and said so
    h = scale_lr(1e-3, 4096, 1, "adam-sqrt", betas=(0.9999999, 0.999999))
    assert h.betas[0] < 1.0 and h.betas[1] < 1.0 and h.outside_range and all("clipped" in n for n in h.notes)
    h = scale_lr(1e-3, 64, 16, "adam-sqrt", betas=(0.9, 0.98))
    assert h.betas == pytest.approx((0.975, 0.98**0.25), rel=1e-12) and not h.outside_range


def test_beta2_is_one_formula_for_the_rule_and_a_schedules_change() -> None:
    """beta2 -> beta2^k (Marek et al. 2025) in the adam-sqrt rule, the same helper a batch schedule's change uses."""
    for k in (0.25, 2, 16):
        h = scale_lr(1e-3, 32, int(32 * k), "adam-sqrt", betas=(0.9, 0.999))
        assert h.betas[1] == beta2_power(0.999, k) == pytest.approx(0.999**k, rel=1e-12)
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, betas=(0.9, 0.999))
        schedule.transfer(opt, k, beta2="power")
        assert opt.param_groups[0]["betas"][1] == h.betas[1]
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, betas=(0.9, 0.999))
    scaled = apply_scaling(opt, 1e-3, 32, 512, "auto")
    assert opt.param_groups[0]["betas"] == (0.5, pytest.approx(0.999**16, rel=1e-12))
    assert scaled.outside_range


@pytest.mark.parametrize(("rule", "lr_factor"), [("adam-sqrt", 2.0), ("linear", 4.0), ("sqrt", 2.0), ("none", 1.0)])
def test_weight_decay_timescale(rule: str, lr_factor: float) -> None:
    """Wang & Aitchison 2024; Bergsma et al. 2025: tau = B / (lr x weight_decay) kept constant across batch sizes,
    weight_decay_new = weight_decay_base x (B_new / B_base) x (lr_base / lr_new)."""
    base_b, b, base_lr, wd = 32, 128, 1e-3, 0.1
    betas = (0.9, 0.999) if rule == "adam-sqrt" else None
    h = scale_lr(base_lr, base_b, b, rule, betas=betas, weight_decay=wd, weight_decay_rule="timescale")
    assert h.lr == pytest.approx(base_lr * lr_factor)
    assert h.weight_decay == pytest.approx(wd * (b / base_b) * (base_lr / h.lr), rel=1e-12)
    assert b / (h.lr * h.weight_decay) == pytest.approx(base_b / (base_lr * wd), rel=1e-12)
    assert h.weight_decay_rule == "timescale"
    kept = scale_lr(base_lr, base_b, b, rule, betas=betas, weight_decay=wd)
    assert kept.weight_decay == wd and kept.weight_decay_rule == "keep"


def test_apply_scaling_moves_every_groups_weight_decay_on_request() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1e-3, weight_decay=0.1)
    h = apply_scaling(opt, 1e-3, 32, 128, "adam-sqrt", weight_decay_rule="timescale")
    assert [g["weight_decay"] for g in opt.param_groups] == [pytest.approx(0.2), 0.0]
    assert h.weight_decay == pytest.approx(0.2)
    opt = torch.optim.AdamW([a], lr=1e-3, weight_decay=0.1)
    apply_scaling(opt, 1e-3, 32, 128, "adam-sqrt")
    assert opt.param_groups[0]["weight_decay"] == 0.1
    with pytest.raises(ConfigError, match="weight_decay_rule"):
        scale_lr(1e-3, 32, 128, "linear", weight_decay=0.1, weight_decay_rule="cube")


def _adamw_workload() -> object:
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    from batchfit.workload import Workload

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = (x @ torch.randn(4, 2, generator=g)).argmax(1)
    return Workload(name="tiny-adamw", model_fn=lambda: torch.nn.Linear(4, 2),
                    optimizer_fn=lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999),
                                                                      weight_decay=0.1),
                    loss_fn=F.cross_entropy, train_data=TensorDataset(x, y), base_batch_size=8, base_lr=1e-3)


def test_train_records_the_scaling_and_applies_the_weight_decay_rule() -> None:
    from batchfit.engine import train

    seen: list[dict] = []

    class Watch:
        def on_train_start(self, state) -> None:  # noqa: ANN001
            seen.append(dict(state.optimizer.param_groups[0]))

    r = train(_adamw_workload(), batch_size=128, steps=1, weight_decay_rule="timescale", callbacks=[Watch()])
    s = r.to_dict()["lr_scaling"]
    assert s["rule"] == "adam-sqrt" and s["k"] == 16 and s["outside_range"] is True and s["notes"]
    assert s["betas"] == [0.5, pytest.approx(0.999**16)]
    assert seen[0]["betas"] == (0.5, pytest.approx(0.999**16)) and seen[0]["weight_decay"] == pytest.approx(0.4)
    kept = train(_adamw_workload(), batch_size=32, steps=1).to_dict()["lr_scaling"]
    assert kept["outside_range"] is False and kept["weight_decay"] == 0.1 and kept["weight_decay_rule"] == "keep"
    with pytest.raises(ConfigError, match="weight_decay_rule"):
        train(_adamw_workload(), batch_size=32, steps=1, weight_decay_rule="double")


def test_the_cli_takes_the_weight_decay_rule_and_train_records_the_scaling(tmp_path) -> None:  # noqa: ANN001
    import json

    from batchfit.cli import build_parser, main

    parser = build_parser()
    for command in ("train", "sweep", "tune"):
        assert parser.parse_args([command]).weight_decay_rule == "keep"
        assert parser.parse_args([command, "--wd-rule", "timescale"]).weight_decay_rule == "timescale"
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--wd-rule", "double"])
    out = tmp_path / "r.json"
    assert main(["train", "-b", "512", "--steps", "1", "--wd-rule", "timescale", "--json", str(out), "-q"]) == 0
    s = json.loads(out.read_text())["lr_scaling"]  # demo:digits-mlp, Adam tuned at batch 32: k = 16
    assert s["weight_decay_rule"] == "timescale" and s["outside_range"] is True and s["betas"][0] == 0.5
