"""The local critical batch by branching, and B_simple beside it, on linear regression (closed forms known)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from batchfit import branching
from batchfit.workload import Workload


def _linreg(d: int = 8, n: int = 20_000, sigma: float = 1.0, seed: int = 0) -> tuple[Workload, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    y = x @ w + sigma * torch.randn(n, 1, generator=g)
    wl = Workload(name="linreg", model_fn=lambda: torch.nn.Linear(d, 1, bias=False),
                  optimizer_fn=lambda p, lr: torch.optim.SGD(p, lr=lr), loss_fn=F.mse_loss,
                  train_data=TensorDataset(x, y), base_batch_size=4, base_lr=0.01)
    return wl, w


def test_b_simple_matches_the_closed_form_of_gaussian_linear_regression() -> None:
    """For x ~ N(0, I_d), y = x.w* + noise(sigma): per-sample gradients at w have mean G = 2 delta and covariance
    4 (delta delta^T + (|delta|^2 + sigma^2) I) (Isserlis), so B_simple = tr(Sigma) / |G|^2
    = 1 + d + d sigma^2 / |delta|^2 with delta = w - w*."""
    d, sigma = 8, 1.0
    wl, wstar = _linreg(d=d, sigma=sigma)
    torch.manual_seed(0)
    model = wl.model_fn()
    with torch.no_grad():
        model.weight.copy_((wstar + 0.5 * torch.randn_like(wstar)).T)  # |delta|^2 ~ 2
    delta2 = float((model.weight.detach().T - wstar).square().sum())
    truth = 1 + d + d * sigma**2 / delta2
    est = branching.gradient_noise_scale(wl, model, batch_size=32, pairs=400, device=torch.device("cpu"))
    assert est.contains(truth), (est, truth)
    assert abs(est.estimate - truth) / truth < 0.3


def test_b_simple_is_bounded_below_when_the_signal_vanishes() -> None:
    wl, wstar = _linreg()
    model = wl.model_fn()
    with torch.no_grad():
        model.weight.copy_(wstar.T)  # at the optimum: |G|^2 ~ 0, B_simple -> infinity
    est = branching.gradient_noise_scale(wl, model, batch_size=16, pairs=64, device=torch.device("cpu"))
    assert est.known and est.high == math.inf and est.low > 50


def test_efficiency_finds_the_largest_contiguous_efficient_batch_and_its_supported_range() -> None:
    progress = {4: [1.0, 1.0, 1.0], 8: [0.99, 0.97, 0.98], 16: [0.9, 0.7, 0.95], 32: [0.5, 0.55, 0.45],
                64: [0.85, 0.9, 0.88]}  # 64 looks efficient again, but 32 broke the run: it does not count
    eff, lcb, (sure, maybe) = branching._efficiency(progress, tolerance=0.2)
    assert eff[4].estimate == 1.0
    assert lcb == 16  # mean 0.85 >= 0.8
    assert sure == 8  # 16's interval reaches below 0.8
    assert maybe == 64  # the upper end: anything whose interval reaches the bar


def test_branching_measures_every_checkpoint_with_intervals_and_costs() -> None:
    wl, _ = _linreg(n=4096)
    r = branching.local_critical_batch(wl, factors=(1, 4, 16), checkpoints=(0.0, 1.0), reference_steps=40,
                                       replicates=2, noise_batches=16, eval_samples=512)
    assert [p.step for p in r.points] == [0, 40]
    assert r.batches == [4, 16, 64] and r.branch_samples == 128
    for p in r.points:
        assert p.efficiency[4].estimate == pytest.approx(1.0)
        assert p.local_critical_batch in r.batches
        assert p.b_simple is not None and p.b_simple.n == 16
        assert all(iv.known for iv in p.progress.values())  # two replicates: intervals exist
    assert r.points[1].loss < r.points[0].loss  # the reference run trained
    assert r.reference_seconds > 0 and r.branch_seconds > 0 and math.isfinite(r.cost_share)
    again = branching.BranchingResult.from_dict(r.to_dict())
    assert again.to_dict() == r.to_dict()


def test_branching_rejects_batches_larger_than_the_data() -> None:
    wl, _ = _linreg(n=100)
    with pytest.raises(Exception, match="exceeds the training set"):
        branching.local_critical_batch(wl, factors=(1, 64), reference_steps=2)
