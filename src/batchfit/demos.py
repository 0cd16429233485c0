"""Built-in workloads (``demo:NAME``), all offline.

- ``digits-mlp``: the guides' small MLP (inputs -> 10 ReLU -> 10 classes, Adam) on scikit-learn's bundled
  handwritten digits (1,797 real 8x8 images), stratified train/validation split.
- ``mnist1d``: a small 1-D CNN on MNIST-1D generated locally (``mnist1d.data.make_dataset``; never downloaded).
- ``resnet-synthetic``: a ResNet-style bottleneck convnet (ResNet-50-like by default) on random images.
- ``gpt-synthetic``: a GPT-style decoder (GPT-2-small-like by default) on random tokens.

The synthetic demos are for memory and throughput work; their data carries no signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from batchfit.errors import ConfigError
from batchfit.workload import Workload, accuracy

__all__ = ["DEMOS", "ArrayDataset", "SyntheticDataset", "digits_mlp", "gpt_synthetic", "mnist1d", "resnet_synthetic"]


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"demo option {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"demo option {name} must be a positive number, got {value!r}")
    return float(value)


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
    if not (isinstance(val_fraction, float) and 0.0 < val_fraction < 1.0):
        raise ConfigError(f"demo option val_fraction must be between 0 and 1, got {val_fraction!r}")
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
    if size not in _RESNET_SIZES:
        raise ConfigError(f"demo option size must be one of {', '.join(_RESNET_SIZES)}, got {size!r}")
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
    if size not in _GPT_SIZES:
        raise ConfigError(f"demo option size must be one of {', '.join(_GPT_SIZES)}, got {size!r}")
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


DEMOS: dict[str, Callable[..., Workload]] = {
    "digits-mlp": digits_mlp,
    "mnist1d": mnist1d,
    "resnet-synthetic": resnet_synthetic,
    "gpt-synthetic": gpt_synthetic,
}
