from __future__ import annotations

import math

import pytest
import torch

from batchfit.errors import ConfigError
from batchfit.scaling import apply_scaling, default_rule, scale_lr


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
    assert h.betas == pytest.approx((0.6, 0.996))
    assert h.eps == pytest.approx(5e-9)
    # shrinking the batch moves betas towards 1
    h = scale_lr(1e-3, 32, 8, "adam-sqrt", betas=(0.9, 0.999), eps=1e-8)
    assert h.betas == pytest.approx((0.975, 0.99975))
    # beta1 cannot go negative at large k: clipped into [0, 1)
    h = scale_lr(1e-3, 32, 32 * 64, "adam-sqrt", betas=(0.9, 0.999))
    assert h.betas[0] == 0.0 and 0 < h.betas[1] < 1


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
    assert g["lr"] == pytest.approx(2e-3) and g["betas"] == pytest.approx((0.6, 0.96))
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
    assert opt.param_groups[0]["betas"] == pytest.approx((0.6, 0.996))
