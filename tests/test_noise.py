"""The noise-scale estimator against closed-form per-example gradients (linear and logistic regression)."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit.demos import ArrayDataset
from batchfit.engine import train
from batchfit.errors import ConfigError, NoisyEstimateWarning
from batchfit.noise import (
    NoiseCallback,
    NoiseResult,
    _decode,
    _make_meter,
    _step_norms,
    default_micro_batch_size,
    noise_scale,
)
from batchfit.stats import unbiased_estimates
from batchfit.workload import Workload
from conftest import make_tiny_workload

N, D = 600, 5



def _data(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """A fixed dataset and fixed parameters (w, b) a fair way from the optimum, so B_simple is moderate."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w_true = torch.randn(D, generator=g, dtype=torch.float64)
    if kind == "linear":
        y = x @ w_true + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)
    else:
        y = (torch.rand(N, generator=g, dtype=torch.float64) < torch.sigmoid(2 * (x @ w_true))).double()
    return x, y, w_true + 0.3 * torch.randn(D, generator=g, dtype=torch.float64), 0.2


def _exact(kind: str) -> tuple[float, float]:
    """|G|² and tr(Σ) (population covariance) from all N per-example gradients, in closed form."""
    x, y, w, b = _data(kind)
    z = x @ w + b
    r = 2 * (z - y) if kind == "linear" else torch.sigmoid(z) - y  # d loss_i / d z_i
    per_example = torch.cat([r[:, None] * x, r[:, None]], dim=1)  # (N, D + 1): gradient w.r.t. (w, b)
    mean = per_example.mean(dim=0)
    trace = float(((per_example - mean) ** 2).sum(dim=1).mean())
    return float(mean @ mean), trace


def _workload(kind: str, dtype: torch.dtype = torch.float64) -> Workload:
    x, y, w, b = (t.to(dtype) if isinstance(t, torch.Tensor) else t for t in _data(kind))

    def model_fn() -> nn.Module:
        m = nn.Linear(D, 1).to(dtype)
        with torch.no_grad():
            m.weight.copy_(w[None])
            m.bias.fill_(b)
        return m

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = out.squeeze(-1)
        if kind == "linear":
            return F.mse_loss(out, target)
        return (F.softplus(out) - target * out).mean()  # binary cross-entropy with logits, written out

    return Workload(name=kind, model_fn=model_fn, optimizer_fn=lambda p, lr: torch.optim.SGD(p, lr=lr),
                    loss_fn=loss_fn, train_data=ArrayDataset(x, y), base_batch_size=32, base_lr=0.01)


@pytest.mark.parametrize(("kind", "method"), [("linear", "hooks"), ("linear", "copy"), ("logistic", "auto")])
def test_estimate_within_10_percent_of_exact(kind: str, method: str) -> None:
    g2, trace = _exact(kind)
    exact = trace / g2
    assert 2 < exact < 500  # the fixture is in the regime where the test says something
    r = noise_scale(_workload(kind), batch_size=128, micro_batch_size=16, steps=1500, rel_ci=0.05, method=method)
    assert r.converged
    assert r.b_simple == pytest.approx(exact, rel=0.10)
    assert r.b_simple_ci[0] <= exact * 1.02 and r.b_simple_ci[1] >= exact * 0.98  # the interval covers it
    assert r.grad_norm_sq == pytest.approx(g2, rel=0.10) and r.trace_cov == pytest.approx(trace, rel=0.10)


def _mean_and_se(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(len(t)))


@pytest.mark.parametrize(("kind", "batch", "micro", "method"),
                         [("linear", 24, 8, "hooks"), ("logistic", 50, 16, "hooks"), ("logistic", 50, 16, "copy")])
def test_grad_norm_and_trace_estimates_are_unbiased(kind: str, batch: int, micro: int, method: str) -> None:
    """Mean over many seeds vs the exact values. Batches are drawn without replacement from the N samples and the
    estimator corrects for that (without the correction |G|² would be low by tr(Σ)/(N-1), ~9 % for the logistic
    fixture). The 50/16 split is uneven (16, 16, 16, 2): treating every micro-batch as size 16 would be far off."""
    want_g2, want_trace = _exact(kind)
    g2_runs, trace_runs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoisyEstimateWarning)
        for seed in range(40):
            r = noise_scale(_workload(kind), batch_size=batch, micro_batch_size=micro, steps=25, min_steps=25,
                            seed=seed, method=method)
            assert r.steps == 25
            g2_runs.append(r.grad_norm_sq)
            trace_runs.append(r.trace_cov)
    for got, want in ((_mean_and_se(g2_runs), want_g2), (_mean_and_se(trace_runs), want_trace)):
        mean, se = got
        assert abs(mean - want) < 4 * se, (mean, want, se)
        assert abs(mean - want) < 0.05 * abs(want)


def test_unbiased_estimates_formula() -> None:
    # k = 2 equal halves, B = 8: |g1|² = 4, |g2|² = 0 with g1 = (2, 0), g2 = (0, 0) -> big = |(1, 0)|² = 1
    g2, trace = unbiased_estimates(2.0, 1.0, k=2, batch_size=8)
    assert (g2, trace) == (0.0, 8.0)
    with pytest.raises(ConfigError, match="at least 2 micro-batches"):
        unbiased_estimates(1.0, 1.0, k=1, batch_size=8)


def test_default_micro_batch_size() -> None:
    assert default_micro_batch_size(64) == 32
    assert default_micro_batch_size(65) == 33
    assert default_micro_batch_size(64, parts=4) == 16
    assert default_micro_batch_size(3, parts=4) == 1
    with pytest.raises(ConfigError, match="at least 2 samples"):
        default_micro_batch_size(1)


def test_result_dict_and_reading(tiny_workload: Workload) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoisyEstimateWarning)
        r = noise_scale(tiny_workload, batch_size=16, micro_batch_size=4, steps=12)
    d = r.to_dict()
    for key in ("b_simple", "b_simple_ci", "grad_norm_sq", "trace_cov", "batch_size", "micro_batch_size", "steps",
                "history", "converged"):
        assert key in d
    assert d["batch_size"] == 16 and d["micro_batch_size"] == 4 and len(d["b_simple_ci"]) == 2
    assert [h["step"] for h in d["history"]] == list(range(1, r.steps + 1))
    assert "B_simple" in r.reading() and "\n" not in r.reading()


def test_noisy_estimate_warns(tiny_workload: Workload) -> None:
    with pytest.warns(NoisyEstimateWarning, match="wider than"):
        r = noise_scale(tiny_workload, batch_size=16, micro_batch_size=8, steps=3, rel_ci=0.01)
    assert not r.converged and r.steps == 3


def test_progress_callback_and_train_steps(tiny_workload: Workload) -> None:
    seen: list[dict] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoisyEstimateWarning)
        r = noise_scale(tiny_workload, batch_size=16, steps=5, min_steps=5, train_steps=6, lr=0.05,
                        progress=lambda ev: seen.append(ev.data) if ev.kind == "update" else None)
    assert [s["step"] for s in seen] == [1, 2, 3, 4, 5] and r.train_steps == 6
    assert r.micro_batch_size == 4  # default: 4 micro-batches


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"batch_size": 16, "micro_batch_size": 16}, ">= 2 micro-batches"),
    ({"batch_size": 1}, "at least 2 samples"),
    ({"batch_size": 500}, "larger than the training set"),
    ({"rel_ci": 0.0}, "rel_ci must be"),
    ({"lr": 0.1}, "give train_steps > 0"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"precision": "fp16"}, "fp16 training needs CUDA"),
    ({"train_steps": -1}, "train_steps must be"),
    ({"method": "magic"}, "unknown noise measurement method"),
])
def test_bad_arguments(tiny_workload: Workload, kwargs: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        noise_scale(tiny_workload, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Training mode


@pytest.mark.parametrize("method", ["hooks", "copy"])
def test_callback_agrees_with_exact_at_fixed_parameters(method: str) -> None:
    """With lr ~ 0 the parameters stay put, so the training-mode estimate must land near the exact value too.
    Batch 48 = micro-batches 20 + 20 + 8 (uneven), and without drop_last each epoch ends with 24 = 20 + 4."""
    kind = "linear"
    g2, trace = _exact(kind)
    cb = NoiseCallback(beta=0.999, method=method)
    res = train(_workload(kind), batch_size=48, micro_batch_size=20, lr=1e-12, epochs=25, drop_last=False,
                callbacks=[cb])
    assert len(res.history) == 25 and all("b_simple" in rec for rec in res.history)
    hist = res.extras["b_simple_history"]
    assert [h["step"] for h in hist] == [rec["step"] for rec in res.history]
    assert set(hist[0]) == {"step", "epoch", "b_simple", "grad_norm_sq", "trace_cov", "train_loss"}
    assert [h["train_loss"] for h in hist] == [rec["train_loss"] for rec in res.history]
    assert res.extras["b_simple"] == hist[-1]["b_simple"] == res.history[-1]["b_simple"]
    assert cb.valid_steps == res.steps == 25 * 13 and res.extras["b_simple_skipped_steps"] == 0
    assert res.extras["b_simple"] == pytest.approx(trace / g2, rel=0.10)
    assert hist[-1]["grad_norm_sq"] == pytest.approx(g2, rel=0.10)
    assert hist[-1]["trace_cov"] == pytest.approx(trace, rel=0.10)


@pytest.mark.parametrize("method", ["hooks", "copy", "auto"])
def test_callback_short_last_batch_and_cleanup(tiny_workload: Workload, method: str) -> None:
    cb = NoiseCallback(flush_every=2, method=method)
    # 96 samples, batch 20, no drop_last: 4 full steps + one of 16 = micro 10 + 6 (uneven)
    res = train(tiny_workload, batch_size=20, micro_batch_size=10, epochs=1, drop_last=False, callbacks=[cb])
    assert res.steps == 5 and cb.valid_steps == 5
    assert res.history[-1]["b_simple"] is not None
    assert cb._meter.params and all(not p._backward_hooks for p in cb._meter.params)  # no hook left behind


@pytest.mark.parametrize("method", ["hooks", "copy"])
def test_meters_measure_each_micro_batch_contribution(method: str) -> None:
    """Uneven micro-batches (3, 1) and a parameter that first gets a gradient in the second micro-batch."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    model = nn.ModuleDict({"a": a, "b": b})
    meter = _make_meter(method, model)
    x = torch.randn(4, 4)
    micro = [(x[:3], False), (x[3:], True)]
    contributions = []
    for xs, use_b in micro:
        loss = a(xs).pow(2).mean() + (b(xs).pow(2).mean() if use_b else 0.0)
        before = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
        (loss * (len(xs) / 4)).backward()
        after = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
        contributions.append(sum(float((y - z).pow(2).sum()) for y, z in zip(after, before)))
        meter.end_micro(len(xs), last=use_b)
    assert meter.micro_batches == 2
    norms, boundaries = meter.take()
    measured = _step_norms(norms, boundaries, [p.grad for p in model.parameters()], k=2, batch_size=4)
    small, big, k, batch = _decode([measured], scaled=False)[0]
    assert small == pytest.approx(4 * (contributions[0] / 3 + contributions[1] / 1), rel=1e-6)  # B sum_i n_i/b_i
    assert big == pytest.approx(sum(float(p.grad.pow(2).sum()) for p in model.parameters()), rel=1e-6)
    assert (k, batch) == (2, 4)
    meter.detach()


def test_callback_needs_two_micro_batches(tiny_workload: Workload) -> None:
    with pytest.raises(ConfigError, match=">= 2 micro-batches per step"):
        train(tiny_workload, batch_size=16, steps=2, callbacks=[NoiseCallback()])
    with pytest.raises(ConfigError, match="beta"):
        NoiseCallback(beta=1.0)
    with pytest.raises(ConfigError, match="unknown noise measurement method"):
        NoiseCallback(method="magic")


def test_callback_skips_non_finite_steps(tiny_workload: Workload) -> None:
    class Poison:
        """Step 2's gradient turns infinite (as an fp16 overflow would); Heal zeroes it after the noise callback
        has looked, so the optimizer step stays harmless and training goes on."""

        def __init__(self, value: float) -> None:
            self.value = value

        def on_before_optimizer_step(self, state) -> None:  # noqa: ANN001
            if state.step == 1:
                for p in state.model.parameters():
                    p.grad.fill_(self.value)

    cb = NoiseCallback()
    res = train(tiny_workload, batch_size=16, micro_batch_size=8, steps=5, lr=1e-3,
                callbacks=[Poison(math.inf), cb, Poison(0.0)])
    assert not res.diverged and res.steps == 5
    assert cb.skipped_steps == 1 and cb.valid_steps == 4
    assert res.extras["b_simple_skipped_steps"] == 1
    assert res.extras["b_simple"] is not None and math.isfinite(res.extras["b_simple"])


def test_decode_divides_micro_norms_by_the_loss_scale() -> None:
    """fp16: the micro-batch norms carry the loss scale s (a device tensor, or a float from get_scale()); the
    accumulated gradient is read after unscale_."""
    norms = [torch.tensor(3.0) * 8, torch.tensor(4.0) * 8]  # one micro-batch of each half, scaled by s = 8
    grads = [torch.tensor([1.0, 2.0])]
    for scale in (torch.tensor(8.0), 8.0):
        st = _step_norms(norms, [(1, 2), (2, 2)], grads, k=2, batch_size=4, scale=scale)
        small, big, _, _ = _decode([st], scaled=True)[0]
        assert small == pytest.approx(4 * (9 / 2 + 16 / 2)) and big == pytest.approx(5.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_callback_mixed_precision_on_cuda(precision: str) -> None:
    kind = "linear"
    g2, trace = _exact(kind)
    cb = NoiseCallback(beta=0.999)
    res = train(_workload(kind, torch.float32), batch_size=48, micro_batch_size=16, lr=1e-12, epochs=25,
                device="cuda", precision=precision, callbacks=[cb])
    assert cb.valid_steps >= res.steps - 3  # at most a few fp16 overflow steps skipped
    assert res.extras["b_simple"] == pytest.approx(trace / g2, rel=0.15)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_extra_halves_mixed_precision_on_cuda(precision: str) -> None:
    """extra-halves under autocast (fp16: the pass is scaled by the run's GradScaler, its gradients unscaled for the
    batch norm and the micro norms divided by the scale) agree with the exact values at fixed parameters."""
    g2, trace = _exact("linear")
    cb = NoiseCallback(beta=0.999, halves_every=1)
    res = train(cb.watch(_workload("linear", torch.float32)), batch_size=48, lr=1e-12, epochs=25, device="cuda",
                precision=precision, callbacks=[cb])
    assert res.extras["noise_method"] == "extra-halves" and cb.valid_steps >= res.steps - 3
    assert res.extras["b_simple"] == pytest.approx(trace / g2, rel=0.15)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_extra_halves_leave_cuda_training_unchanged(precision: str) -> None:
    """On CUDA (the device's RNG forked for dropout, the GradScaler untouched): the run with the measurement ends
    exactly as the run without it, where the run without it is reproducible on this device at all."""
    kw = dict(batch_size=16, steps=24, eval_every=4, seed=1, device="cuda", precision=precision)
    plain, again = (_train_halves(_bn_dropout_workload(), None, **kw) for _ in range(2))
    try:
        _assert_same_training(plain, again)
    except AssertionError:
        pytest.skip("training is not bit-for-bit reproducible on this device (nondeterministic kernels)")
    cb = NoiseCallback()
    _assert_same_training(plain, _train_halves(_bn_dropout_workload(), cb, **kw))
    assert cb.halves_steps == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_probe_on_cuda(precision: str) -> None:
    g2, trace = _exact("logistic")
    r = noise_scale(_workload("logistic", torch.float32), batch_size=128, micro_batch_size=16, steps=1500,
                    rel_ci=0.05, device="cuda", precision=precision)
    assert r.converged and r.b_simple == pytest.approx(trace / g2, rel=0.10)


# ---------------------------------------------------------------------------------------------------------------
# The probe runs the training step's forward/backward (the workload contract) and reports one way


class _DictData(torch.utils.data.Dataset):
    """The linear fixture's samples as dict items ``{"features", "labels"}`` (collated into dict batches)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.x[i], "labels": self.y[i]}


class _KeywordLinear(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *, features: torch.Tensor) -> torch.Tensor:
        return self.inner(features)


def test_probe_honours_the_workload_contract_dict_batches_and_keyword_forward() -> None:
    """The same data as (input, target) pairs and as dict batches with a keyword forward: the probe goes through
    the step's run_batch, so both give the same estimate, bit for bit."""
    pairs = _workload("linear")
    x, y = pairs.train_data.tensors
    as_dicts = dataclasses.replace(pairs, train_data=_DictData(x, y), forward=("features",),
                                   model_fn=lambda: _KeywordLinear(pairs.model_fn()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoisyEstimateWarning)
        a = noise_scale(pairs, batch_size=32, micro_batch_size=8, steps=6, min_steps=6)
        b = noise_scale(as_dicts, batch_size=32, micro_batch_size=8, steps=6, min_steps=6)
    assert a.steps == b.steps == 6
    assert (a.grad_norm_sq, a.trace_cov) == pytest.approx((b.grad_norm_sq, b.trace_cov), rel=1e-12)


def test_result_round_trips_and_progress_events(tiny_workload: Workload) -> None:
    events: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoisyEstimateWarning)
        r = noise_scale(tiny_workload, batch_size=16, micro_batch_size=4, steps=5, min_steps=5,
                        progress=events.append)
    d = json.loads(json.dumps(r.to_dict()))
    again = NoiseResult.from_dict(d)
    assert again.to_dict() == d and again.b_simple == r.b_simple and again.b_simple_ci == r.b_simple_ci
    with_status = NoiseResult.from_dict({**d, "status": "ok"})
    assert with_status.extras == {"status": "ok"} and with_status.to_dict()["status"] == "ok"
    unbounded = NoiseResult.from_dict({**d, "b_simple": None, "b_simple_ci": [None, None]})  # JSON of inf
    assert unbounded.b_simple == math.inf and unbounded.b_simple_ci == (-math.inf, math.inf)
    assert {e.stage for e in events} == {"noise"}
    assert [e.kind for e in events] == ["start"] + ["update"] * 5 + ["end"]
    updates = [e for e in events if e.kind == "update"]
    assert [e.completed for e in updates] == [1, 2, 3, 4, 5] and all(e.total == 5 for e in updates)
    assert updates[-1].data["b_simple"] == pytest.approx(r.history[-1]["b_simple"])
    assert events[-1].message == r.reading()
    assert d["regime"]["micro_batches_per_step"] == 4 and d["regime"]["training_before"] is None
    assert "unclipped" in d["regime"]["gradients"]


@pytest.mark.parametrize("seed", [-1, 2**32, 10**30, 1.5])
def test_one_seed_check(tiny_workload: Workload, seed: object) -> None:
    with pytest.raises(ConfigError, match="seed must be an integer in"):
        noise_scale(tiny_workload, batch_size=16, steps=2, seed=seed)  # type: ignore[arg-type]


def test_training_meter_reads_gradients_before_clipping(tiny_workload: Workload) -> None:
    """The noise meter hooks into the one step before clipping: clipping every step to a norm of 1e-9 leaves the
    estimate as it is (a meter after the clip would see |G|² ~ 1e-18)."""
    runs = {}
    for clip in (None, 1e-9):
        cb = NoiseCallback(beta=0.5)
        res = train(tiny_workload, batch_size=16, micro_batch_size=8, steps=6, lr=1e-12, grad_clip=clip,
                    callbacks=[cb])
        runs[clip] = (res.extras["b_simple_history"][-1]["grad_norm_sq"], res.extras["b_simple"])
    assert runs[None][0] > 1e-6
    assert runs[1e-9] == pytest.approx(runs[None], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Issue 19.3: one estimator; B_simple against the training loss; the value at initialisation labelled as such


def test_evaluation_records_carry_the_raw_estimates_over_the_steps_their_train_loss_covers() -> None:
    """Each record's ``noise_window`` is the plain mean of the per-step unbiased |G|^2 and tr(Sigma) estimates over
    the steps since the previous evaluation (the steps ``train_loss`` averages): every valid step counted once."""
    from batchfit.noise import noise_records

    kind = "linear"
    g2, trace = _exact(kind)
    cb = NoiseCallback()
    res = train(_workload(kind), batch_size=48, micro_batch_size=24, lr=1e-12, epochs=10, callbacks=[cb])
    windows = [rec["noise_window"] for rec in res.history]
    assert sum(w["steps"] for w in windows) == cb.valid_steps == res.steps
    steps = sum(w["steps"] for w in windows)
    pooled_g2 = sum(w["steps"] * w["grad_norm_sq"] for w in windows) / steps
    pooled_tr = sum(w["steps"] * w["trace_cov"] for w in windows) / steps
    assert pooled_tr / pooled_g2 == pytest.approx(trace / g2, rel=0.15)  # fixed parameters: the exact value
    records = noise_records([{"history": res.history}])
    assert [(r.train_loss, r.steps) for r in records] == [(rec["train_loss"], rec["noise_window"]["steps"])
                                                          for rec in res.history]


def _synthetic_records(trials: int, seed: int = 0) -> list:
    """Trials whose records follow B_simple = 100 / (4 L^2) (tr(Sigma) 100, |G|^2 = 4 L^2, each with 20 % noise)
    at training losses falling from 2 to a trial-specific end, as batch sizes with different budgets do."""
    import numpy as np

    from batchfit.noise import NoiseRecord

    rng = np.random.default_rng(seed)
    out = []
    for t in range(trials):
        for loss in np.geomspace(2.0, 0.1 + 0.05 * t, 12):
            out.append(NoiseRecord(t, float(loss), float(4 * loss * loss * (1 + 0.2 * rng.standard_normal())),
                                   float(100 * (1 + 0.2 * rng.standard_normal())), 10))
    return out


def test_b_simple_against_the_training_loss_recovers_a_known_curve_with_a_bootstrap_over_trials() -> None:
    from batchfit.noise import b_simple_against_loss, b_simple_at_loss

    records = _synthetic_records(6)
    at = b_simple_at_loss(records, 0.5)
    assert at is not None and at.trials == 6 and at.band[0] < 0.5 < at.band[1]
    iv = at.b_simple
    assert iv.known and iv.method == "bootstrap over trials" and iv.n == 6
    assert 0 < iv.low < iv.estimate < iv.high < math.inf  # type: ignore[operator]
    assert iv.estimate == pytest.approx(100.0, rel=0.15)  # 100 / (4 x 0.25)
    assert b_simple_at_loss(records, 0.5) == at  # reproducible: a seeded bootstrap
    curve = b_simple_against_loss(records)
    assert [p.train_loss for p in curve] == sorted((p.train_loss for p in curve), reverse=True)
    estimates = [p.b_simple.estimate for p in curve]
    assert estimates == sorted(estimates)  # it grows as the loss falls
    for p in curve:
        assert p.b_simple.estimate == pytest.approx(100 / (4 * p.train_loss ** 2), rel=0.3)
    # two trials in the band: the estimate, but a bootstrap over two trials cannot show their spread
    two = b_simple_at_loss(_synthetic_records(2), 0.5)
    assert two is not None and not two.b_simple.known
    assert b_simple_at_loss(records, 50.0) is None  # far outside the measured losses: no value, no extrapolation


def test_branching_measures_b_simple_through_the_noise_estimator(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchfit import branching, noise, stats

    calls = []
    original = stats.noise_scale_interval
    assert noise.noise_scale_interval is original  # the one estimator, importable from both

    def spy(*args: object, **kwargs: object) -> object:
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(branching, "noise_scale_interval", spy)
    wl = _workload("linear")
    model = wl.model_fn()
    iv = branching.gradient_noise_scale(wl, model, batch_size=32, pairs=8, device=torch.device("cpu"))
    assert len(calls) == 1
    g2s, trs = calls[0][0]
    assert len(g2s) == len(trs) == 8 and iv == original(g2s, trs, seed=0, method="bootstrap-pairs")
    assert iv.estimate == pytest.approx(sum(trs) / sum(g2s))  # the ratio of the means, divided last


def test_the_lightning_logger_measures_b_simple_through_the_noise_estimator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's noise logger feeds each step to :class:`batchfit.noise.RunningNoiseScale` (no EMA of its own):
    the value it logs is the one the estimator gives for the same micro-batch norms."""
    pytest.importorskip("lightning.pytorch")
    from batchfit import noise
    from batchfit.integrations.lightning import _NoiseLogger

    added = []
    original = noise.RunningNoiseScale

    class Spy(original):  # type: ignore[misc, valid-type]
        def add_step(self, *args: object, **kwargs: object) -> tuple[float, float]:
            added.append(args)
            return super().add_step(*args, **kwargs)

    monkeypatch.setattr(noise, "RunningNoiseScale", Spy)
    torch.manual_seed(0)
    model = nn.Linear(D, 1)
    x, y = (t.float() for t in _data("linear")[:2])
    logger = _NoiseLogger(model, population=N, beta=0.9)
    reference = original(0.9)
    logged = []
    for step in range(6):
        model.zero_grad()
        for micro in range(2):  # two micro-batches of 16, each loss weighted 1/2 as Lightning normalises it
            xb, yb = x[32 * step + 16 * micro:][:16], y[32 * step + 16 * micro:][:16]
            logger.start_micro((xb, yb))
            (F.mse_loss(model(xb).squeeze(-1), yb) / 2).backward()
            if micro == 0:
                logger.end_micro()
        logged.append(logger.end_step(None))
        reference.add_step(*added[-1])
        assert logged[-1] == reference.b_simple
    logger.close()
    assert len(added) == 6 and all(a[2] == 2 and a[3] == 32 and a[4] == N for a in added)
    assert all(v is not None and v > 0 for v in logged)


def test_the_reading_at_initialisation_is_labelled_and_never_compared_with_the_batch() -> None:
    r = NoiseResult(workload="w", b_simple=45.4, b_simple_ci=(41.2, 50.0), grad_norm_sq=1.0, trace_cov=45.4,
                    batch_size=32, micro_batch_size=8, steps=100, converged=True, rel_ci=0.1)
    text = r.reading()
    assert "B_simple at initialisation ~ 45.4" in text and "not a batch size to aim for" in text
    assert "near it" not in text and "well below" not in text and "critical batch of order" not in text
    later = dataclasses.replace(r, train_steps=200).reading()
    assert "after 200 training steps" in later and "batch 32 is near it" in later


# ---------------------------------------------------------------------------------------------------------------
# Issue 19.7: a run whose steps are one micro-batch, measured by extra halves without changing training


def _bn_dropout_workload(n: int = 96, n_val: int = 32) -> Workload:
    """BatchNorm (running statistics: buffers a forward moves) and dropout (draws from the RNG) with momentum SGD
    (optimizer state), the three things an extra forward/backward could leave changed."""
    g = torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(n + n_val, 8, generator=g) + 1.0
    y = (x @ torch.randn(8, 3, generator=g)).argmax(dim=1)
    from batchfit.workload import accuracy

    return Workload(
        name="bn-dropout",
        model_fn=lambda: nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                                       nn.Linear(16, 3)),
        optimizer_fn=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        loss_fn=F.cross_entropy, train_data=ArrayDataset(x[:n], y[:n]), val_data=ArrayDataset(x[n:], y[n:]),
        metrics={"accuracy": accuracy}, base_batch_size=16, base_lr=0.1,
    )


class _FinalState:
    """The model's parameters and buffers and the optimizer's state after training."""

    def on_train_end(self, state, result) -> None:  # noqa: ANN001
        self.model = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        self.optimizer = [{k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                          for s in state.optimizer.state.values()]


def _train_halves(workload: Workload, cb: NoiseCallback | None, **kw: object) -> tuple:
    final = _FinalState()
    if cb is None:
        return train(workload, callbacks=[final], **kw), final
    return train(cb.watch(workload), callbacks=[cb, final], **kw), final


def _assert_same_training(a: tuple, b: tuple) -> None:
    (ra, fa), (rb, fb) = a, b
    assert fa.model.keys() == fb.model.keys() and "1.running_mean" in fa.model
    for k, v in fa.model.items():
        assert torch.equal(v, fb.model[k]), k
    assert len(fa.optimizer) == len(fb.optimizer) > 0
    for sa, sb in zip(fa.optimizer, fb.optimizer):
        assert all(torch.equal(v, sb[k]) for k, v in sa.items())
    for key in ("train_loss", "val_loss", "val_metrics", "train_eval_loss"):
        assert [r.get(key) for r in ra.history] == [r.get(key) for r in rb.history], key


@pytest.mark.parametrize(("method", "precision"), [("hooks", "fp32"), ("copy", "fp32"), ("auto", "bf16")])
def test_extra_halves_leave_training_bit_for_bit_unchanged(method: str, precision: str) -> None:
    """(b) Training with the extra-halves measurement ends with exactly the parameters, BatchNorm buffers, optimizer
    state and losses of training without it, while the measurement did run and fill the evaluation records."""
    kw = dict(batch_size=16, steps=24, eval_every=4, seed=1, precision=precision)
    plain = _train_halves(_bn_dropout_workload(), None, **kw)
    cb = NoiseCallback(method=method)
    measured = _train_halves(_bn_dropout_workload(), cb, **kw)
    _assert_same_training(plain, measured)
    res = measured[0]
    assert (res.accumulation_steps, res.extras["noise_method"], res.extras["noise_every"]) == (1, "extra-halves", 8)
    assert cb.halves_steps == cb.valid_steps == 3  # steps 8, 16, 24
    windows = [r["noise_window"] for r in res.history if "noise_window" in r]
    assert [r["step"] for r in res.history if "noise_window" in r] == [8, 16, 24]
    assert all(w["steps"] == 1 and w["trace_cov"] > 0 for w in windows)
    assert res.extras["b_simple_history"][-1]["b_simple"] is not None
    assert "noise_error" not in res.extras


@pytest.mark.parametrize("unguarded", ["buffers", "rng", "grads"])
def test_each_guard_of_the_extra_pass_is_needed(monkeypatch: pytest.MonkeyPatch, unguarded: str) -> None:
    """The bit-for-bit test above can fail: without restoring the buffers, forking the RNG or putting ``.grad`` back
    the run with the measurement differs from the one without it (the fixture exercises all three)."""
    import contextlib

    import batchfit.noise as noise_mod

    kw = dict(batch_size=16, steps=24, eval_every=4, seed=1)
    plain = _train_halves(_bn_dropout_workload(), None, **kw)
    if unguarded == "buffers":
        monkeypatch.setattr(noise_mod._BufferSnapshot, "restore", lambda self: None)
    elif unguarded == "rng":
        monkeypatch.setattr(noise_mod, "_forked_rng", lambda device: contextlib.nullcontext())
    else:
        real = NoiseCallback._measure_halves

        def leaky(self: NoiseCallback, state: object) -> None:
            real(self, state)
            for p in self._params:  # what a pass that did not put the step's (zeroed) .grad back would leave
                p.grad = torch.full_like(p, 1e-3)

        monkeypatch.setattr(NoiseCallback, "_measure_halves", leaky)
    with pytest.raises(AssertionError):
        _assert_same_training(plain, _train_halves(_bn_dropout_workload(), NoiseCallback(), **kw))


def test_extra_halves_agree_with_accumulation_on_the_same_split() -> None:
    """(c) Without BatchNorm or dropout the halves of a batch are exactly the two micro-batches of accumulation:
    measuring every step, each evaluation window's |G|^2 and tr(Sigma) equal those of a run at micro-batch B/2
    (to rounding: the two runs differ only in how the batch gradient is summed)."""
    kw = dict(batch_size=32, steps=48, eval_every=8, seed=0, lr=0.05)
    acc = NoiseCallback()
    ra = train(make_tiny_workload(n=480), micro_batch_size=16, callbacks=[acc], **kw)
    halves = NoiseCallback(halves_every=1)
    rh = train(halves.watch(make_tiny_workload(n=480)), callbacks=[halves], **kw)
    assert (ra.extras["noise_method"], rh.extras["noise_method"]) == ("accumulation", "extra-halves")
    assert acc.valid_steps == halves.valid_steps == halves.halves_steps == 48
    assert [r["step"] for r in ra.history] == [r["step"] for r in rh.history]
    for a, h in zip(ra.history, rh.history):
        wa, wh = a["noise_window"], h["noise_window"]
        assert wa["steps"] == wh["steps"]
        assert wh["grad_norm_sq"] == pytest.approx(wa["grad_norm_sq"], rel=1e-4)
        assert wh["trace_cov"] == pytest.approx(wa["trace_cov"], rel=1e-4)


def _pooled(res: object) -> tuple[int, float, float]:
    windows = [r["noise_window"] for r in res.history if "noise_window" in r]  # type: ignore[attr-defined]
    steps = sum(w["steps"] for w in windows)
    return (steps, sum(w["steps"] * w["grad_norm_sq"] for w in windows) / steps,
            sum(w["steps"] * w["trace_cov"] for w in windows) / steps)


def test_extra_halves_every_8th_step_agree_with_accumulation_and_the_exact_values() -> None:
    """(c) At the default period (every 8th step), at fixed parameters (lr ~ 0) on the closed-form fixture: the mean
    |G|^2 and tr(Sigma) over the measured steps agree with accumulation's over every step, and with the exact
    values, within 15 % (120 measured steps against 960)."""
    g2, trace = _exact("linear")
    acc = NoiseCallback()
    ra = train(_workload("linear"), batch_size=48, micro_batch_size=24, lr=1e-12, epochs=80, callbacks=[acc])
    halves = NoiseCallback()
    rh = train(halves.watch(_workload("linear")), batch_size=48, lr=1e-12, epochs=80, callbacks=[halves])
    n_acc, g2_acc, tr_acc = _pooled(ra)
    n_h, g2_h, tr_h = _pooled(rh)
    assert (n_acc, n_h) == (960, 120)
    assert g2_h == pytest.approx(g2_acc, rel=0.15) and tr_h == pytest.approx(tr_acc, rel=0.15)
    assert g2_h == pytest.approx(g2, rel=0.15) and tr_h == pytest.approx(trace, rel=0.15)
    assert tr_h / g2_h == pytest.approx(trace / g2, rel=0.20)


def test_extra_halves_cost_is_bounded_and_taken_at_the_steps_parameters() -> None:
    """(d) Over 40 steps of B = 16 the extra passes are 2 forwards of 8 samples on every 8th step: 1/8 of the
    training forwards' samples (= 1/HALVES_EVERY, the documented share), counted in batchfit.cost; each runs after
    the step's own forward, at the parameters that forward saw (before the optimizer step)."""
    from batchfit import cost
    from batchfit.noise import HALVES_EVERY

    class Forwards:
        def __init__(self) -> None:
            self.rows: list[list[int]] = []
            self._row: list[int] = []
            self.at: list[list[torch.Tensor]] = []  # the parameters each training-mode forward saw
            self.before_step: list[list[torch.Tensor]] = []

        def on_train_start(self, state) -> None:  # noqa: ANN001
            def hook(module, args) -> None:  # noqa: ANN001
                if module.training:
                    self._row.append(args[0].shape[0])
                    self.at.append([p.detach().clone() for p in module.parameters()])

            state.model.register_forward_pre_hook(hook)

        def on_before_optimizer_step(self, state) -> None:  # noqa: ANN001
            self.before_step.append([p.detach().clone() for p in state.model.parameters()])

        def on_step_end(self, state) -> None:  # noqa: ANN001
            self.rows.append(self._row)
            self._row = []

    seen, cb = Forwards(), NoiseCallback()
    with cost.measure() as spent:
        res = train(cb.watch(make_tiny_workload()), batch_size=16, steps=40, callbacks=[cb, seen], lr=0.1)
    assert res.steps == 40 and cb.halves_steps == 5
    assert seen.rows == [[16, 8, 8] if (i + 1) % 8 == 0 else [16] for i in range(40)]
    extra = sum(sum(r[1:]) for r in seen.rows)
    assert extra / (16 * 40) == 1 / HALVES_EVERY <= 0.15
    assert spent.samples == 16 * 40 + extra and res.extras["noise_samples"] == extra and res.samples == 16 * 40
    forwards = iter(seen.at)
    for i, row in enumerate(seen.rows):
        own = next(forwards)
        for _ in row[1:]:  # the halves see exactly the parameters of the step's own forward and gradient
            assert all(torch.equal(a, b) for a, b in zip(next(forwards), own))
            assert all(torch.equal(a, b) for a, b in zip(own, seen.before_step[i]))


def test_a_failing_extra_pass_stops_the_measurement_not_training() -> None:
    """A model that cannot take half a batch: the measurement stops with a warning and ``noise_error``; training
    is the run without it."""

    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training and x.shape[0] != 16:
                raise ValueError("this model takes batches of 16")
            return self.inner(x)

    wl = dataclasses.replace(_bn_dropout_workload(), model_fn=Fixed)
    kw = dict(batch_size=16, steps=20, eval_every=4, seed=1)
    plain = _train_halves(wl, None, **kw)
    cb = NoiseCallback()
    with pytest.warns(RuntimeWarning, match="extra-halves noise measurement failed"):
        measured = _train_halves(wl, cb, **kw)
    assert "takes batches of 16" in measured[0].extras["noise_error"] and cb.valid_steps == 0
    for k, v in plain[1].model.items():
        assert torch.equal(v, measured[1].model[k]), k
    assert [r["train_loss"] for r in plain[0].history] == [r["train_loss"] for r in measured[0].history]
