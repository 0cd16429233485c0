"""The local critical batch by branching, and B_simple beside it, on linear regression (closed forms known)."""

from __future__ import annotations

import math
import time

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
    t0 = time.perf_counter()
    r = branching.local_critical_batch(wl, factors=(1, 4, 16), checkpoints=(0.0, 1.0), reference_steps=40,
                                       replicates=2, noise_batches=16, eval_samples=512)
    wall = time.perf_counter() - t0
    assert [p.step for p in r.points] == [0, 40]
    assert r.batches == [4, 16, 64] and r.branch_samples == 128
    for p in r.points:
        assert p.efficiency[4].estimate == pytest.approx(1.0)
        assert p.local_critical_batch in r.batches
        assert p.b_simple is not None and p.b_simple.n == 16
        assert all(iv.known for iv in p.progress.values())  # two replicates: intervals exist
    assert r.points[1].loss < r.points[0].loss  # the reference run trained
    # each part timed once, inside the call (a part counted twice or timed from the wrong start breaks the sum)
    assert r.reference_seconds > 0 and r.branch_seconds > 0 and r.noise_seconds > 0
    assert r.reference_seconds + r.branch_seconds + r.noise_seconds <= wall
    assert r.cost_share == pytest.approx((r.branch_seconds + r.noise_seconds) / r.reference_seconds)
    again = branching.BranchingResult.from_dict(r.to_dict())
    assert again.to_dict() == r.to_dict()


def test_branching_rejects_batches_larger_than_the_data() -> None:
    wl, _ = _linreg(n=100)
    with pytest.raises(Exception, match="exceeds the training set"):
        branching.local_critical_batch(wl, factors=(1, 64), reference_steps=2)


def _point(wl: Workload, wstar: torch.Tensor, delta2: float, b0: int, factors: list[int]) -> tuple:
    """Branch from weights at |w - w*|^2 = delta2, the LR at the smallest batch set to McCandlish's optimal step."""
    d = wstar.shape[0]
    torch.manual_seed(1)
    model = wl.model_fn()
    direction = torch.randn_like(wstar)
    with torch.no_grad():
        model.weight.copy_((wstar + direction * math.sqrt(delta2) / direction.norm()).T)
    b_noise = 1 + d + d / delta2  # sigma = 1 (the closed form above)
    lr = 0.5 / (1 + b_noise / b0)  # eps_opt(B0) = eps_max / (1 + B_noise / B0); eps_max = 1/2 for H = 2 I
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    batches = [b0 * f for f in factors]
    result = branching.BranchingResult("linreg", b0, "linear", 0.2, 2 * batches[-1], 3, batches, 0)
    eval_batch = branching._fixed_eval_batch(wl, 4096)
    p = branching._measure_point(wl, ckpt, model, 0, b0, batches, "linear", 2 * batches[-1], 3, 64,
                                 torch.device("cpu"), 0, eval_batch, 0.2, result)
    return p, b_noise


def test_branching_finds_the_critical_batch_linear_regression_predicts() -> None:
    """Why the measurement must land where it does. With the smallest batch B0 at its optimal step
    eps_opt(B0) = eps_max / (1 + B_noise / B0) (McCandlish et al. 2018, eq. 2.6; eps_max = 1/2 as H = 2 I), the
    linear rule runs batch B = k B0 at eps_B = eps_max B / (B0 + B_noise), the same c = eps_B / B for every branch.
    For Gaussian inputs the excess loss e = |w - w*|^2 of SGD obeys, in expectation (Isserlis),
    e' = e [(1 - 2 eps)^2 + 4 eps^2 (d + 1) / B] + 4 eps^2 sigma^2 d / B: it contracts while
    q_B = eps_B (1 + (d + 1) / B) < 1 and settles at the floor c sigma^2 d / (1 - q_B). A branch long enough to
    settle therefore makes progress e0 - floor(B) (or diverges when q_B >= 1), and its efficiency is
    (e0 - floor(B)) / (e0 - floor(B0)). Far from the optimum (e0 = 800) the floor is negligible: the critical batch
    is set by stability, the largest power of two with q_B < 1 (8; B_noise ~ d + 1 = 9). Near it (e0 = 0.08,
    B_noise = 109) the floor rises with q_B and cuts efficiency below 1 - tolerance before stability does (32).
    So the critical batch rises as training approaches the optimum (the shape Merrill et al. 2025 measure), and the
    B_simple measured beside it must contain the closed form."""
    d = 8
    wl, wstar = _linreg(d=d, n=20_000)
    b0, factors = 2, [1, 2, 4, 8, 16, 32, 64]
    found = []
    for delta2 in (800.0, 0.08):
        p, b_noise = _point(wl, wstar, delta2, b0, factors)
        c = 0.5 / (b0 + b_noise)

        def efficiency(b: int, c: float = c, e0: float = delta2) -> float:
            q = c * b * (1 + (d + 1) / b)
            floor = lambda q_: c * d / (1 - q_)  # noqa: E731 - sigma = 1
            return (e0 - floor(q)) / (e0 - floor(c * b0 * (1 + (d + 1) / b0))) if q < 1 else -math.inf

        predicted = max(b0 * f for f in factors if all(efficiency(b0 * g) >= 0.8 for g in factors if g <= f))
        assert p.local_critical_batch == predicted, (delta2, b_noise, {b: iv.estimate for b, iv in
                                                                       p.efficiency.items()})
        assert p.b_simple is not None and p.b_simple.contains(b_noise), (p.b_simple, b_noise)
        found.append(p.local_critical_batch)
    assert found == [8, 32]  # the critical batch grows near the optimum


# ---------------------------------------------------------------------------------------------------------------
# The reference run and its branches run train's step (batchfit.step.build_run): warm-up, precision, divergence


def test_branching_applies_the_warm_up_to_the_reference_and_continues_it_in_each_branch() -> None:
    wl, _ = _linreg(n=512)
    log: list[tuple[int, float]] = []

    class LoggedSGD(torch.optim.SGD):
        made = 0

        def __init__(self, params, lr):  # noqa: ANN001
            super().__init__(params, lr=lr)
            self.n, LoggedSGD.made = LoggedSGD.made, LoggedSGD.made + 1

        def step(self, closure=None):  # noqa: ANN001, ANN202
            log.append((self.n, self.param_groups[0]["lr"]))
            return super().step(closure)

    wl.optimizer_fn = LoggedSGD
    r = branching.local_critical_batch(wl, factors=(1, 2), checkpoints=(0.0, 0.5), reference_steps=8, warmup=4,
                                       replicates=1, noise_batches=0, lr_rule="linear", branch_samples=16)
    by = {n: [lr for m, lr in log if m == n] for n in range(LoggedSGD.made)}
    assert by[0] == pytest.approx([0.0025, 0.005, 0.0075] + [0.01] * 5)  # the reference run, warmed up over 4
    assert by[1] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])  # from step 0 at batch 4: the same warm-up
    assert by[2] == pytest.approx([0.005, 0.01])  # at batch 8: x2 (linear), the warm-up continued
    assert by[3] == pytest.approx([0.01] * 4) and by[4] == pytest.approx([0.02] * 2)  # from step 4: warmed up
    assert r.warmup_steps == 4 and r.to_dict()["warmup_steps"] == 4


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_branching_runs_the_reference_the_branches_and_their_losses_at_the_precision(precision: str) -> None:
    wl, _ = _linreg(n=512)
    seen: list[bool] = []

    class Recorder(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(x)

    wl.model_fn = lambda: Recorder(8, 1, bias=False)
    r = branching.local_critical_batch(wl, factors=(1, 2), checkpoints=(0.0, 0.5), reference_steps=4,
                                       replicates=1, noise_batches=0, precision=precision)
    assert seen and all(seen) is (precision == "bf16") and any(seen) is (precision == "bf16")
    assert r.precision == precision and r.to_dict()["precision"] == precision
    with pytest.raises(Exception, match="fp16"):
        branching.local_critical_batch(wl, factors=(1, 2), reference_steps=2, precision="fp16")  # CPU: no fp16


def _log_workload(lr: float) -> Workload:
    """Descent on (log w)^2 from w = 2: at a small LR w settles at 1; at a large one the first step throws w below 0,
    and the next loss is NaN."""
    def model_fn() -> torch.nn.Module:
        m = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            m.weight.fill_(2.0)
        return m

    return Workload(name="log", model_fn=model_fn, optimizer_fn=lambda p, lr: torch.optim.SGD(p, lr=lr),
                    loss_fn=lambda out, y: torch.log(out).square().mean(),
                    train_data=TensorDataset(torch.ones(512, 1), torch.zeros(512, 1)), base_batch_size=1,
                    base_lr=lr)


def test_a_diverging_branch_stops_and_is_reported_as_not_efficient() -> None:
    r = branching.local_critical_batch(_log_workload(0.1), batch_size=1, factors=(1, 2, 128), checkpoints=(0.0,),
                                       reference_steps=4, replicates=2, noise_batches=0, lr_rule="linear")
    p = r.points[0]
    assert p.diverged == {128: 2}  # LR 12.8 at batch 128: both replicates' losses turned NaN, and stopped
    assert not p.efficiency[128].known and math.isnan(p.efficiency[128].estimate)
    assert p.local_critical_batch == 2 and math.isfinite(p.progress[2].estimate)
    assert r.diverged_at_step is None
    d = r.to_dict()
    assert d["points"][0]["diverged"] == {"128": 2}
    assert branching.BranchingResult.from_dict(d).points[0].diverged == {128: 2}


def test_a_diverging_reference_run_stops_the_measurement_and_says_where() -> None:
    r = branching.local_critical_batch(_log_workload(12.0), batch_size=1, factors=(1, 2), checkpoints=(0.0, 0.5),
                                       reference_steps=10, replicates=1, noise_batches=0, lr_rule="linear")
    assert r.diverged_at_step == 2  # the first step throws w below 0: the second step's loss is NaN
    assert [p.step for p in r.points] == [0]  # the checkpoint before it was measured; none after
    assert r.points[0].diverged == {1: 1, 2: 1}
    assert r.to_dict()["diverged_at_step"] == 2
