"""Top Hessian eigenvalue by power iteration against the exact Hessian of a quadratic loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit.demos import ArrayDataset
from batchfit.errors import ConfigError
from batchfit.sharpness import top_hessian_eigenvalue
from batchfit.workload import Workload


def _regression(scale: float) -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) * torch.tensor([scale, 1, 1, 1, 0.5, 0.2],
                                                                             dtype=torch.float64)
    y = x @ torch.randn(6, 1, generator=g, dtype=torch.float64)
    return Workload(name="quad", model_fn=lambda: nn.Linear(6, 1).double(),
                    optimizer_fn=lambda p, lr: torch.optim.SGD(p, lr=lr), loss_fn=F.mse_loss,
                    train_data=ArrayDataset(x, y))


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_matches_the_exact_hessian(scale: float) -> None:
    wl = _regression(scale)
    torch.manual_seed(0)
    model = wl.model_fn()
    x = wl.train_data.tensors[0]
    # MSE of a linear model: H = 2/n [x 1]^T [x 1] over (weights, bias), independent of the weights
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    exact = torch.linalg.eigvalsh(2 * xa.T @ xa / len(x)).max().item()
    r = top_hessian_eigenvalue(wl, model, num_samples=200, chunk_size=64, iters=200, tol=1e-9)
    assert r["top_eigenvalue"] == pytest.approx(exact, rel=1e-4)
    assert r["num_samples"] == 200 and r["iterations"] <= 200
    assert all(p.grad is None for p in model.parameters())  # leaves no gradients behind


def test_chunking_does_not_change_the_value() -> None:
    wl = _regression(2.0)
    torch.manual_seed(0)
    model = wl.model_fn()
    a = top_hessian_eigenvalue(wl, model, num_samples=150, chunk_size=150, iters=50, tol=1e-10)
    b = top_hessian_eigenvalue(wl, model, num_samples=150, chunk_size=7, iters=50, tol=1e-10)
    assert a["top_eigenvalue"] == pytest.approx(b["top_eigenvalue"], rel=1e-6)


def test_bad_arguments() -> None:
    wl = _regression(1.0)
    with pytest.raises(ConfigError):
        top_hessian_eigenvalue(wl, wl.model_fn(), iters=0)
    with pytest.raises(ConfigError):
        top_hessian_eigenvalue(wl, wl.model_fn(), num_samples=-1)
