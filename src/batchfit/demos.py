"""Built-in workloads (``demo:NAME``), all offline.

- ``digits-mlp``: the guides' small MLP (inputs -> 10 ReLU -> 10 classes, Adam) on scikit-learn's bundled
  handwritten digits (1,797 real 8x8 images), stratified train/validation split.
- ``mnist1d``: a small 1-D CNN on MNIST-1D generated locally (``mnist1d.data.make_dataset``; never downloaded).
- ``resnet-synthetic``: a ResNet-style bottleneck convnet (ResNet-50-like by default) on random images.
- ``gpt-synthetic``: a GPT-style decoder (GPT-2-small-like by default) on random tokens.
- ``tiny-lm``: a small decoder-only transformer language model on text generated locally from a random Markov
  source whose entropy rate (the validation loss's floor) is known exactly; one epoch is the intended budget.

The synthetic demos are for memory and throughput work; their data carries no signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from batchfit import checks
from batchfit.errors import ConfigError
from batchfit.metric import accuracy
from batchfit.workload import Workload

__all__ = ["DEMOS", "ArrayDataset", "LMWorkload", "MarkovSource", "SyntheticDataset", "TinyLM", "TransformerBlock",
           "digits_mlp", "gpt_synthetic", "mnist1d", "resnet_synthetic", "tiny_lm"]


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    return checks.int_at_least(f"demo option {name}", value, minimum)


def _positive_float(name: str, value: object) -> float:
    return checks.positive_number(f"demo option {name}", value)


class ArrayDataset(TensorDataset):
    """A :class:`TensorDataset` of ``(input, target)`` with a vectorised ``get_batch`` (the engine's fast path)."""

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t[indices] for t in self.tensors)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# digits-mlp


def digits_mlp(hidden: int = 10, val_fraction: float = 0.2, seed: int = 0, lr: float = 1e-3,
               batch_size: int = 32) -> Workload:
    """The guides' MLP (inputs -> ``hidden`` ReLU -> 10 classes, Adam) on scikit-learn's handwritten digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    hidden = _positive_int("hidden", hidden)
    val_fraction = checks.fraction("demo option val_fraction", val_fraction)
    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_fraction, stratify=y, random_state=seed)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)  # standardise with train statistics only
    std[std < 1e-6] = 1.0  # pixels constant in train (always blank) stay as they are
    x_tr, x_va = (x_tr - mean) / std, (x_va - mean) / std

    def to_ds(a: np.ndarray, b: np.ndarray) -> ArrayDataset:
        return ArrayDataset(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.long))

    def model_fn() -> nn.Module:
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    return Workload(
        name="digits-mlp",
        model_fn=model_fn,
        optimizer_fn=lambda params, lr: torch.optim.Adam(params, lr=lr),
        loss_fn=F.cross_entropy,
        train_data=to_ds(x_tr, y_tr),
        val_data=to_ds(x_va, y_va),
        metrics={"accuracy": accuracy},
        base_batch_size=_positive_int("batch_size", batch_size),
        base_lr=_positive_float("lr", lr),
        description=f"MLP 64-{hidden}-10 (ReLU, Adam) on sklearn digits ({len(x_tr)} train / {len(x_va)} val)",
    )


# ---------------------------------------------------------------------------------------------------------------
# mnist1d


class Conv1dNet(nn.Module):
    """A small 1-D CNN for MNIST-1D sequences of length 40."""

    def __init__(self, channels: int = 32, length: int = 40, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, 1, length)).numel()
        self.head = nn.Linear(flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L)
        return self.head(self.conv(x.unsqueeze(1)).flatten(1))


def mnist1d(num_samples: int = 10_000, channels: int = 32, seed: int = 42, lr: float = 1e-3,
            batch_size: int = 64) -> Workload:
    """A 1-D CNN on MNIST-1D generated locally with ``mnist1d.data.make_dataset`` (80/20 train/val split)."""
    from mnist1d.data import get_dataset_args, make_dataset

    num_samples = _positive_int("num_samples", num_samples, minimum=20)
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = int(seed)
    data = make_dataset(args)  # generated from templates in the package; no download
    x_tr = torch.tensor(np.asarray(data["x"]), dtype=torch.float32)
    y_tr = torch.tensor(np.asarray(data["y"]), dtype=torch.long)
    x_va = torch.tensor(np.asarray(data["x_test"]), dtype=torch.float32)
    y_va = torch.tensor(np.asarray(data["y_test"]), dtype=torch.long)
    length = x_tr.shape[1]
    channels = _positive_int("channels", channels)
    return Workload(
        name="mnist1d",
        model_fn=lambda: Conv1dNet(channels, length),
        optimizer_fn=lambda params, lr: torch.optim.Adam(params, lr=lr),
        loss_fn=F.cross_entropy,
        train_data=ArrayDataset(x_tr, y_tr),
        val_data=ArrayDataset(x_va, y_va),
        metrics={"accuracy": accuracy},
        base_batch_size=_positive_int("batch_size", batch_size),
        base_lr=_positive_float("lr", lr),
        description=f"1-D CNN ({channels} ch, Adam) on MNIST-1D ({len(x_tr)} train / {len(x_va)} val)",
    )


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data for memory and throughput work


class SyntheticDataset(Dataset):
    """``size`` virtual samples drawn from a small fixed pool of random tensors (cheap, vectorised indexing)."""

    def __init__(self, size: int, make_pool: Callable[[torch.Generator, int], tuple[torch.Tensor, torch.Tensor]],
                 pool: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.size = size
        self.inputs, self.targets = make_pool(gen, pool)
        self.pool = pool

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        return self.inputs[i % self.pool], self.targets[i % self.pool]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        j = indices % self.pool
        return self.inputs[j], self.targets[j]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Identity() if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class ResNet(nn.Module):
    """A bottleneck ResNet; ``layers=(3, 4, 6, 3), width=64`` is ResNet-50's shape."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks: list[nn.Module] = []
        cin = width
        for stage, n in enumerate(layers):
            w = width * 2**stage
            for i in range(n):
                blocks.append(Bottleneck(cin, w, stride=2 if (i == 0 and stage > 0) else 1))
                cin = w * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W)
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


_RESNET_SIZES = {"resnet50": (3, 4, 6, 3), "resnet26": (2, 2, 2, 2), "tiny": (1, 1, 1, 1)}


def resnet_synthetic(size: str = "resnet50", image_size: int = 224, width: int = 64, num_classes: int = 1000,
                     num_samples: int = 50_000, lr: float = 0.1, batch_size: int = 256) -> Workload:
    """ResNet-style convnet (SGD with momentum) on random images, for memory/throughput work."""
    checks.one_of("demo option size", size, _RESNET_SIZES)
    image_size = _positive_int("image_size", image_size, minimum=8)
    width = _positive_int("width", width)
    num_classes = _positive_int("num_classes", num_classes, minimum=2)
    num_samples = _positive_int("num_samples", num_samples, minimum=2)
    layers = _RESNET_SIZES[size]

    def make_pool(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, 3, image_size, image_size, generator=gen),
                torch.randint(0, num_classes, (n,), generator=gen))

    train = SyntheticDataset(num_samples, make_pool, seed=0)
    val = SyntheticDataset(max(2, num_samples // 50), make_pool, seed=1)
    return Workload(
        name="resnet-synthetic",
        model_fn=lambda: ResNet(layers, width, num_classes),
        optimizer_fn=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4),
        loss_fn=F.cross_entropy,
        train_data=train,
        val_data=val,
        metrics={"accuracy": accuracy},
        base_batch_size=_positive_int("batch_size", batch_size),
        base_lr=_positive_float("lr", lr),
        sample_batch=lambda b: train.get_batch(torch.arange(b)),
        description=f"ResNet ({size}, width {width}) on random {image_size}x{image_size} images",
    )


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-style decoder; ``n_layer=12, n_head=12, d_model=768, vocab=50257`` is GPT-2 small's shape."""

    def __init__(self, vocab: int, seq_len: int, n_layer: int, n_head: int, d_model: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(seq_len, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, n_head) for _ in range(n_layer)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx: (B, T) -> logits (B, T, V)
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln(self.blocks(x)))


_GPT_SIZES = {"gpt2-small": (12, 12, 768), "gpt2-mini": (4, 4, 256), "tiny": (2, 2, 64)}


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def gpt_synthetic(size: str = "gpt2-small", seq_len: int = 1024, vocab: int = 50257, num_samples: int = 10_000,
                  lr: float = 6e-4, batch_size: int = 8) -> Workload:
    """GPT-style decoder (AdamW) on random token sequences, for memory/throughput work."""
    checks.one_of("demo option size", size, _GPT_SIZES)
    seq_len = _positive_int("seq_len", seq_len, minimum=2)
    vocab = _positive_int("vocab", vocab, minimum=2)
    num_samples = _positive_int("num_samples", num_samples, minimum=2)
    n_layer, n_head, d_model = _GPT_SIZES[size]

    def make_pool(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, vocab, (n, seq_len + 1), generator=gen)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    train = SyntheticDataset(num_samples, make_pool, seed=0)
    val = SyntheticDataset(max(2, num_samples // 50), make_pool, seed=1)
    return Workload(
        name="gpt-synthetic",
        model_fn=lambda: GPT(vocab, seq_len, n_layer, n_head, d_model),
        optimizer_fn=lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1),
        loss_fn=_lm_loss,
        train_data=train,
        val_data=val,
        metrics={"token_accuracy": accuracy},
        base_batch_size=_positive_int("batch_size", batch_size),
        base_lr=_positive_float("lr", lr),
        sample_batch=lambda b: train.get_batch(torch.arange(b)),
        description=f"GPT decoder ({size}: {n_layer} layers, d={d_model}) on random tokens, T={seq_len}",
    )


# ---------------------------------------------------------------------------------------------------------------
# tiny-lm: a small decoder-only transformer on tokens from a Markov source with a known entropy rate


class MarkovSource:
    """An order-``k`` Markov chain over ``V`` tokens, started in its stationary distribution.

    ``transitions`` has shape ``(V,) * k + (V,)``: ``transitions[x_1, ..., x_k, y]`` is the probability of ``y``
    after the context ``x_1 ... x_k``. Everything a language model's loss can be compared with is exact:

    - :attr:`stationary`: the stationary distribution of contexts (k-tuples), by power iteration to 1e-14 in L1
      (unique: the generated chains have every transition probability positive);
    - :attr:`entropy_rate` ``H = -sum_c pi_c sum_y P_cy log P_cy`` in nats per token: no predictor of ``x_t``
      from its past does better in expectation, once the context is full (``t >= k``);
    - :meth:`conditional_entropy` ``H(X_t | X_0 ... X_{t-1})`` for every position (above ``H`` for ``t < k``, where
      the context is short) and :meth:`loss_floor`, their mean over a sequence's targets: the least expected
      next-token cross-entropy over ``seq_len`` targets.
    """

    def __init__(self, transitions: np.ndarray) -> None:
        p = np.asarray(transitions, dtype=np.float64)
        if p.ndim < 2 or len(set(p.shape)) != 1:
            raise ConfigError(f"Markov transitions must have shape (V,) * order + (V,), got {p.shape}")
        if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=-1), 1.0, atol=1e-9):
            raise ConfigError("Markov transitions must be finite, non-negative, and each row must sum to 1")
        self.transitions = p / p.sum(axis=-1, keepdims=True)
        self.order = p.ndim - 1
        self.vocab = p.shape[-1]
        self.stationary = self._stationary()
        plogp = np.where(self.transitions > 0, self.transitions * np.log(np.where(self.transitions > 0,
                                                                                   self.transitions, 1.0)), 0.0)
        self.entropy_rate = float(-(self.stationary * plogp.sum(axis=-1)).sum())

    @classmethod
    def random(cls, vocab: int, order: int = 1, concentration: float = 0.05, backoff: float | None = 1.0,
               smoothing: float = 1e-3, seed: int | np.random.Generator = 0) -> MarkovSource:
        """A random chain with sparse, low-entropy rows.

        Order 1: each token's next-token distribution is drawn from a symmetric Dirichlet(``concentration``).
        Higher orders with ``backoff``: hierarchically, as in a hierarchical Dirichlet language model, the row of
        context ``(a, c)`` is drawn from ``Dirichlet(backoff * row(c))`` (``c`` the context one token shorter), so
        the shorter context already predicts much and the longer one refines it (large ``backoff``: little);
        ``backoff=None``: every context's row independently from the symmetric Dirichlet (the shorter context then
        predicts almost nothing). Every row is then mixed with ``smoothing`` of the uniform distribution, so that
        every transition is possible (one stationary distribution; a model is never infinitely surprised)."""
        rng = np.random.default_rng(seed)

        def normalise(g: np.ndarray) -> np.ndarray:
            g[g.sum(axis=-1) == 0] = 1.0  # a row that underflowed entirely (never at sane settings): uniform
            return g / g.sum(axis=-1, keepdims=True)

        if backoff is None:
            rows = normalise(rng.gamma(concentration, size=(vocab,) * (order + 1)))
        else:
            rows = normalise(rng.gamma(concentration, size=(vocab, vocab)))
            for _ in range(order - 1):  # one more token of context: rows[a, c] ~ Dirichlet(backoff * rows[c])
                rows = normalise(rng.gamma(backoff * np.broadcast_to(rows, (vocab, *rows.shape))))
        return cls((1.0 - smoothing) * rows + smoothing / vocab)

    def _stationary(self, tol: float = 1e-14, max_iter: int = 100_000) -> np.ndarray:
        k, p = self.order, self.transitions
        axes = list(range(k + 1))
        pi = np.full((self.vocab,) * k, float(self.vocab) ** -k)
        for _ in range(max_iter):
            # pi'(x_2 .. x_k, y) = sum_{x_1} pi(x_1 .. x_k) P(y | x_1 .. x_k)
            new = np.einsum(pi, axes[:k], p, axes, axes[1:])
            new /= new.sum()
            done = np.abs(new - pi).sum() < tol
            pi = new
            if done:
                return pi
        raise ConfigError("the Markov chain's stationary distribution did not converge; use a larger smoothing")

    def _joint_entropy(self, n: int) -> float:
        """``H(X_0 .. X_{n-1})`` under the stationary start, for ``1 <= n <= order``."""
        q = self.stationary.sum(axis=tuple(range(n, self.order))) if n < self.order else self.stationary
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    def conditional_entropy(self, t: int) -> float:
        """``H(X_t | X_0 .. X_{t-1})`` in nats for ``t >= 1``: the entropy rate once ``t >= order``."""
        if t < 1:
            raise ValueError("conditional_entropy needs t >= 1 (X_0 has no past)")
        if t >= self.order:
            return self.entropy_rate
        return self._joint_entropy(t + 1) - self._joint_entropy(t)

    def loss_floor(self, seq_len: int) -> float:
        """The least expected mean cross-entropy (nats/token) of predicting ``x_1 .. x_T`` from their pasts."""
        return float(np.mean([self.conditional_entropy(t) for t in range(1, seq_len + 1)]))

    def sample(self, num_sequences: int, length: int, seed: int | np.random.Generator = 0) -> np.ndarray:
        """``(num_sequences, length)`` int64 tokens; deterministic for a given seed."""
        rng = np.random.default_rng(seed)
        k, v = self.order, self.vocab
        out = np.empty((num_sequences, length), dtype=np.int64)
        # the first k tokens: a context drawn from the stationary distribution
        first = np.searchsorted(np.cumsum(self.stationary.ravel()), rng.random(num_sequences) * self.stationary.sum(),
                                side="right")
        first = np.minimum(first, v**k - 1)
        for i in range(min(k, length)):
            out[:, i] = (first // v ** (k - 1 - i)) % v
        # then one vectorised inverse-CDF draw per position: row c's CDF is shifted by c in one flat table
        cdf = np.cumsum(self.transitions.reshape(v**k, v), axis=1)
        cdf /= cdf[:, -1:]
        flat = (cdf + np.arange(v**k)[:, None]).ravel()
        context = first.copy()
        for t in range(k, length):
            u = rng.random(num_sequences)
            nxt = np.searchsorted(flat, context + u, side="right") - context * v
            nxt = np.clip(nxt, 0, v - 1)
            out[:, t] = nxt
            context = (context * v + nxt) % v**k
        return out

    def nll(self, tokens: np.ndarray) -> np.ndarray:
        """``-log p(x_t | x_<t)`` under the true chain for ``t = 1 .. L-1``: shape ``(N, L - 1)``."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n, length = tokens.shape
        k = self.order
        out = np.empty((n, max(0, length - 1)))
        for t in range(1, length):
            if t >= k:
                p = self.transitions[tuple(tokens[:, t - k + i] for i in range(k + 1))]
            else:  # a short context: the stationary marginals' conditional
                joint = self.stationary.sum(axis=tuple(range(t + 1, k))) if t + 1 < k else self.stationary
                prev = joint.sum(axis=-1)
                p = joint[tuple(tokens[:, i] for i in range(t + 1))] / prev[tuple(tokens[:, i] for i in range(t))]
            out[:, t - 1] = -np.log(p)
        return out


class TransformerBlock(nn.Module):
    """One pre-LN decoder block: ``x + attn(ln(x))`` with causal multi-head self-attention (PyTorch's
    ``scaled_dot_product_attention``, ``is_causal=True``), then ``x + mlp(ln(x))`` (4x GELU MLP).

    Its own module so that sharding wraps one block at a time (FSDP2: ``fully_shard(block)`` for each block)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.ln_attn = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, mlp_ratio * width)
        self.mlp_out = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).split(c, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C / H)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x))))


class TinyLM(nn.Module):
    """A small decoder-only transformer: token + learned position embeddings, ``depth`` :class:`TransformerBlock`
    s in ``self.blocks``, a final LayerNorm and a linear head (``tie_weights``: the token embedding's transpose).

    Initialisation follows GPT-2 as nanoGPT (Karpathy) writes it: normal(0, 0.02) weights, zero biases, and the
    projections back into the residual stream scaled by ``1 / sqrt(2 depth)``."""

    def __init__(self, vocab: int, seq_len: int, width: int = 64, depth: int = 2, heads: int = 4,
                 tie_weights: bool = False) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim == 1:  # LayerNorm scales
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * depth) if name.endswith(("attn_out.weight", "mlp_out.weight")) else 0.02
                nn.init.normal_(p, std=std)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx: (B, T) -> logits (B, T, V)
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len {self.seq_len}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _adamw_no_decay_on_vectors(weight_decay: float) -> Callable[..., torch.optim.Optimizer]:
    """AdamW (betas 0.9 / 0.95, as GPT-style training uses) decaying matrices only (group 0), not biases, norms."""

    def make(params: Any, lr: float) -> torch.optim.Optimizer:
        params = [p for p in params if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))

    return make


def _cosine_to_zero(optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total_steps))


@dataclass
class LMWorkload(Workload):
    """A :class:`Workload` that knows its loss floor: the least expected validation loss, in nats per token."""

    loss_floor: float | None = None
    entropy_rate: float | None = None
    source: MarkovSource | None = None


def tiny_lm(num_sequences: int = 32_768, seq_len: int = 64, vocab: int = 64, order: int = 2,
            concentration: float = 0.1, backoff: float = 1.0, val_sequences: int = 1024, width: int = 64,
            depth: int = 2, heads: int = 4, tie_weights: bool = False, data_seed: int = 0, lr: float = 1e-3,
            batch_size: int = 8, weight_decay: float = 0.1, schedule: str = "constant") -> LMWorkload:
    """A small transformer language model on text from a random Markov source whose entropy rate is known exactly.

    Data: ``num_sequences`` training and ``val_sequences`` validation sequences of ``seq_len + 1`` tokens
    (inputs: the first ``seq_len``, targets: the last ``seq_len``) from one :class:`MarkovSource` of order ``order``
    (1 or 2) over ``vocab`` tokens, generated locally and deterministically from ``data_seed`` (the chain, the
    training text and the validation text each from their own stream). ``concentration`` is the Dirichlet
    concentration of the order-1 rows (small: sparse rows, low entropy); at order 2 ``backoff`` sets how much the
    older token refines the last token's prediction (hierarchically drawn rows; ``0``: independent rows, which
    a small model does not learn in an epoch: the last token alone then predicts almost nothing).

    The floor: no model's expected validation loss goes below ``loss_floor`` (the workload's attribute, and in
    its description): the mean over target positions of ``H(X_t | X_<t)``, which is the entropy rate
    (``entropy_rate``, nats/token) at every position whose context is full and slightly above it at the first
    ``order - 1``. ``val_loss - loss_floor`` is the excess loss (the KL from the true source, in expectation);
    trials are ranked on ``val_loss`` (no metric: a ratio target on an excess near zero would be ill-posed).

    Model: :class:`TinyLM` (``width``, ``depth`` :class:`TransformerBlock` s, ``heads``; ``tie_weights``), next-token
    cross-entropy averaged over tokens; AdamW (betas 0.9 / 0.95, ``weight_decay`` on matrices only) at ``lr`` for
    the base ``batch_size``; ``schedule``: ``constant`` (default) or ``cosine`` (to zero over the run).

    The intended budget is one epoch (``--epochs 1``; two at most): the sample-limited regime, where the loss still
    falls at the end. At the defaults an epoch at batch 8 is 4,096 steps: measured with ``batchfit.train`` on one
    CPU thread (``torch.set_num_threads(1)``) of the 2-core development machine, about 10.5 ms a step at batch 8 and
    15 ms at batch 16 (training time over 600 / 400 steps, evaluations excluded), a whole epoch with 9 evaluations
    53 s of CPU time. Batch 8 at ``lr`` 1e-3 (seed 0) ends the epoch at a validation loss of 0.938 against a floor
    of 0.8165 (log(64) = 4.16 at the start; 1.52 after 1/8 epoch, 1.01 after half), still falling; batch 16 at
    lr 1.5e-3 and batch 32 at 3e-3 end within 0.003 of it on the same samples; ``width=128`` ends about 0.04 lower
    and ``schedule=cosine`` about 0.05 lower (0.071 above the floor).
    """
    num_sequences = _positive_int("num_sequences", num_sequences)
    val_sequences = _positive_int("val_sequences", val_sequences)
    seq_len = _positive_int("seq_len", seq_len, minimum=2)
    vocab = _positive_int("vocab", vocab, minimum=2)
    order = checks.int_at_least("demo option order", order, 1, maximum=2)
    if vocab ** (order + 1) > 2**22:
        raise ConfigError(f"demo option vocab={vocab} at order {order} makes a transition table of "
                          f"{vocab ** (order + 1):,} entries; use a smaller vocab")
    concentration = _positive_float("concentration", concentration)
    checks.non_negative_number("demo option backoff", backoff, hint="0 makes the rows independent")
    width, depth, heads = (_positive_int(n, v) for n, v in (("width", width), ("depth", depth), ("heads", heads)))
    if width % heads:
        raise ConfigError(f"demo option width ({width}) must be divisible by heads ({heads})")
    checks.boolean("demo option tie_weights", tie_weights)
    checks.non_negative_int("demo option data_seed", data_seed)
    checks.non_negative_number("demo option weight_decay", weight_decay)
    checks.one_of("demo option schedule", schedule, ("constant", "cosine"))

    seeds = np.random.SeedSequence(data_seed).spawn(3)  # the chain, the training text, the validation text
    source = MarkovSource.random(vocab, order, concentration, float(backoff) or None,
                                 seed=np.random.default_rng(seeds[0]))
    train_tokens = torch.from_numpy(source.sample(num_sequences, seq_len + 1, np.random.default_rng(seeds[1])))
    val_tokens = torch.from_numpy(source.sample(val_sequences, seq_len + 1, np.random.default_rng(seeds[2])))
    train = ArrayDataset(train_tokens[:, :-1].contiguous(), train_tokens[:, 1:].contiguous())
    val = ArrayDataset(val_tokens[:, :-1].contiguous(), val_tokens[:, 1:].contiguous())
    floor = source.loss_floor(seq_len)
    return LMWorkload(
        name="tiny-lm",
        model_fn=lambda: TinyLM(vocab, seq_len, width, depth, heads, tie_weights),
        optimizer_fn=_adamw_no_decay_on_vectors(float(weight_decay)),
        loss_fn=_lm_loss,
        train_data=train,
        val_data=val,
        base_batch_size=_positive_int("batch_size", batch_size),
        base_lr=_positive_float("lr", lr),
        sample_batch=lambda b: train.get_batch(torch.arange(b) % len(train)),
        lr_schedule=_cosine_to_zero if schedule == "cosine" else None,
        shard=("TransformerBlock",),  # parallel='fsdp': one block at a time (the embeddings and head: the root)
        description=(f"tiny LM (width {width}, {depth} blocks, {heads} heads, AdamW) on an order-{order} Markov "
                     f"source, V={vocab}, T={seq_len}, {num_sequences} train / {val_sequences} val sequences; "
                     f"loss floor {floor:.4f} nats/token (entropy rate {source.entropy_rate:.4f})"),
        loss_floor=floor,
        entropy_rate=source.entropy_rate,
        source=source,
    )


DEMOS: dict[str, Callable[..., Workload]] = {
    "digits-mlp": digits_mlp,
    "mnist1d": mnist1d,
    "resnet-synthetic": resnet_synthetic,
    "gpt-synthetic": gpt_synthetic,
    "tiny-lm": tiny_lm,
}
