"""demo:tiny-lm: a Markov source with an exactly known entropy rate, and a small causal transformer on it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import batchfit
from batchfit.demos import DEMOS, MarkovSource, TinyLM, TransformerBlock, tiny_lm
from batchfit.engine import evaluate
from batchfit.errors import ConfigError
from batchfit.loading import load_workload, parse_options

SMALL = dict(num_sequences=256, val_sequences=64, seq_len=16, vocab=16)


def _h(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_two_state_chain_entropy_rate_by_hand() -> None:
    a, b = 0.1, 0.3  # P(0 -> 1), P(1 -> 0)
    src = MarkovSource(np.array([[1 - a, a], [b, 1 - b]]))
    pi = np.array([b / (a + b), a / (a + b)])
    np.testing.assert_allclose(src.stationary, pi, rtol=1e-12)
    assert src.entropy_rate == pytest.approx(pi[0] * _h(a) + pi[1] * _h(b), rel=1e-12)
    assert src.loss_floor(10) == pytest.approx(src.entropy_rate, rel=1e-12)
    # the same chain written as order 2 (the older token ignored): the same rate; the first target, predicted
    # from one token, has the same conditional entropy too
    src2 = MarkovSource(np.stack([src.transitions, src.transitions]))
    assert src2.order == 2
    np.testing.assert_allclose(src2.stationary, pi[:, None] * src.transitions, rtol=1e-12)
    assert src2.entropy_rate == pytest.approx(src.entropy_rate, rel=1e-12)
    assert src2.conditional_entropy(1) == pytest.approx(src.entropy_rate, rel=1e-12)


@pytest.mark.parametrize("order", [1, 2])
def test_entropy_rate_matches_a_long_sample(order: int) -> None:
    src = MarkovSource.random(vocab=12, order=order, concentration=0.2, seed=1)
    assert 0 < src.entropy_rate < math.log(12)
    tokens = src.sample(4000, 100, seed=2)
    assert tokens.min() >= 0 and tokens.max() < 12
    nll = src.nll(tokens)  # (N, 99): -log p(x_t | x_<t) for t = 1 .. 99
    per_seq = nll[:, order - 1:].mean(axis=1)  # full contexts only; sequences are independent
    se = per_seq.std(ddof=1) / math.sqrt(len(per_seq))
    assert abs(per_seq.mean() - src.entropy_rate) < 4 * se
    # the start is stationary: the first target's mean surprise is its exact conditional entropy
    first = nll[:, 0]
    assert abs(first.mean() - src.conditional_entropy(1)) < 4 * first.std(ddof=1) / math.sqrt(len(first))
    # and the empirical token frequencies match the stationary distribution
    marginal = src.stationary if order == 1 else src.stationary.sum(axis=1)
    freq = np.bincount(tokens.ravel(), minlength=12) / tokens.size
    np.testing.assert_allclose(freq, marginal, atol=0.01)
    floor = src.loss_floor(99)
    assert floor == pytest.approx(nll.mean(), abs=4 * nll.mean(axis=1).std(ddof=1) / math.sqrt(len(nll)))
    if order == 2:
        assert src.conditional_entropy(1) > src.entropy_rate and floor > src.entropy_rate


def test_data_deterministic_per_data_seed() -> None:
    a, b, c = tiny_lm(**SMALL, data_seed=3), tiny_lm(**SMALL, data_seed=3), tiny_lm(**SMALL, data_seed=4)
    for x, y in zip(a.train_data.tensors + a.val_data.tensors, b.train_data.tensors + b.val_data.tensors):
        assert torch.equal(x, y)
    assert a.loss_floor == b.loss_floor != c.loss_floor
    assert not torch.equal(a.train_data.tensors[0], c.train_data.tensors[0])
    x, y = a.train_data.tensors
    assert x.shape == (256, 16) and y.shape == (256, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert not torch.equal(a.train_data.tensors[0][:64], a.val_data.tensors[0])  # validation is its own sample
    assert a.entropy_rate == pytest.approx(a.source.entropy_rate) and a.loss_floor < math.log(16)
    assert dataclasses.replace(a, base_lr=0.5).loss_floor == a.loss_floor  # as tune's LR check copies it


def test_model_is_causal_and_made_of_transformer_blocks() -> None:
    torch.manual_seed(0)
    wl = tiny_lm(**SMALL, depth=3)
    model = wl.model_fn().eval()
    assert sum(isinstance(m, TransformerBlock) for m in model.modules()) == 3
    x = wl.val_data.tensors[0][:4].clone()
    j = 9
    x2 = x.clone()
    x2[:, j] = (x2[:, j] + 1) % 16
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    assert y.shape == (4, 16, 16)
    torch.testing.assert_close(y[:, :j], y2[:, :j], rtol=0, atol=1e-6)
    assert not torch.allclose(y[:, j:], y2[:, j:])


def test_short_training_lowers_validation_loss() -> None:
    wl = tiny_lm(num_sequences=1024, val_sequences=64, seq_len=16, vocab=16, data_seed=1)
    torch.manual_seed(0)
    before = evaluate(wl, wl.model_fn(), batch_size=64, device=torch.device("cpu"))[0]
    assert before == pytest.approx(math.log(16), abs=0.1)  # a fresh model predicts about uniformly
    r = batchfit.train(wl, batch_size=8, steps=120)
    after = r.history[-1]["val_loss"]
    assert not r.diverged
    assert after < before - 0.5, (before, after)
    assert after > wl.loss_floor - 0.1  # nothing beats the source's entropy (up to the validation sample's noise)


def test_width_depth_heads_options_and_registry() -> None:
    wl = load_workload("demo:tiny-lm", **SMALL, **parse_options(["width=128", "heads=8", "depth=1",
                                                                 "tie_weights=true"]))
    assert DEMOS["tiny-lm"] is tiny_lm and wl.name == "tiny-lm" and "loss floor" in wl.description
    model = wl.model_fn()
    assert isinstance(model, TinyLM) and model.tok_emb.weight.shape == (16, 128)
    assert model.head.weight is model.tok_emb.weight
    assert model(wl.sample_batch(2)[0]).shape == (2, 16, 16)
    narrow = sum(p.numel() for p in tiny_lm(**SMALL, depth=1, tie_weights=True).model_fn().parameters())
    assert sum(p.numel() for p in model.parameters()) > 3 * narrow  # the default width is 64
    opt = wl.optimizer_fn(model.parameters(), 1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] > 0
    assert opt.param_groups[1]["weight_decay"] == 0 and all(p.ndim == 1 for p in opt.param_groups[1]["params"])
    assert wl.lr_schedule is None and tiny_lm(**SMALL, schedule="cosine").lr_schedule is not None
    with pytest.raises(ConfigError, match="divisible"):
        tiny_lm(**SMALL, width=30, heads=4)
    with pytest.raises(ConfigError, match="order"):
        tiny_lm(**SMALL, order=3)
