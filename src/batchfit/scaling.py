"""Learning-rate scaling rules: from the batch size the LR was tuned at to the effective batch size.

With ``k = batch_size / base_batch_size``:

- ``none``: keep the LR.
- ``linear``: ``lr * k`` (Goyal et al. 2017, "Accurate, Large Minibatch SGD"), for SGD-family optimizers.
- ``sqrt``: ``lr * sqrt(k)`` (Krizhevsky 2014; Hoffer et al. 2017).
- ``adam-sqrt``: the square-root scaling rule for adaptive methods (Malladi et al. 2022, "On the SDEs and Scaling
  Rules for Adaptive Gradient Algorithms"): ``lr * sqrt(k)``, ``beta1 -> 1 - k (1 - beta1)``,
  ``beta2 -> 1 - k (1 - beta2)``, ``eps -> eps / sqrt(k)``.

``auto`` picks ``linear`` for SGD-family optimizers and ``adam-sqrt`` for the Adam family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from batchfit import checks
from batchfit.errors import ConfigError

__all__ = [
    "RULES",
    "RULE_CHOICES",
    "ScaledHyperparameters",
    "apply_scaling",
    "default_rule",
    "is_adam_family",
    "scale_lr",
]

RULES = ("none", "linear", "sqrt", "adam-sqrt")
RULE_CHOICES = ("auto", *RULES)

# Betas may not reach 1 or go below 0 when k is large (or small); clip them into a usable range.
_BETA_MIN, _BETA_MAX = 0.0, 0.999999


@dataclass(frozen=True)
class ScaledHyperparameters:
    """The result of :func:`scale_lr`: the values to train at ``batch_size``."""

    lr: float
    rule: str
    k: float
    betas: tuple[float, float] | None = None
    eps: float | None = None


def is_adam_family(optimizer: torch.optim.Optimizer) -> bool:
    """Adam-family optimizers keep per-parameter second moments: ``betas`` with two entries in their defaults."""
    betas = optimizer.defaults.get("betas")
    return isinstance(betas, (tuple, list)) and len(betas) == 2


def default_rule(optimizer: torch.optim.Optimizer) -> str:
    return "adam-sqrt" if is_adam_family(optimizer) else "linear"


def scale_lr(
    base_lr: float,
    base_batch_size: int,
    batch_size: int,
    rule: str = "linear",
    *,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
) -> ScaledHyperparameters:
    """Scale the learning rate (and, for ``adam-sqrt``, Adam's betas and epsilon) to a new batch size.

    >>> scale_lr(0.1, 256, 1024, "linear").lr
    0.4
    >>> h = scale_lr(1e-3, 32, 128, "adam-sqrt", betas=(0.9, 0.999), eps=1e-8)
    >>> round(h.lr, 6), tuple(round(b, 6) for b in h.betas), h.eps
    (0.002, (0.6, 0.996), 5e-09)
    """
    checks.one_of("rule", rule, RULES)
    checks.positive_int("base_batch_size", base_batch_size)
    checks.positive_int("batch_size", batch_size)
    checks.positive_number("base_lr", base_lr)
    betas = _check_betas(betas)
    if eps is not None:
        eps = checks.finite_number("eps", eps)
        if eps < 0:
            raise ConfigError(f"eps must be >= 0, got {eps!r}")
    k = batch_size / base_batch_size
    if rule == "none":
        return ScaledHyperparameters(float(base_lr), rule, k, betas, eps)
    if rule == "linear":
        return ScaledHyperparameters(base_lr * k, rule, k, betas, eps)
    if rule == "sqrt":
        return ScaledHyperparameters(base_lr * math.sqrt(k), rule, k, betas, eps)
    new_betas = None
    if betas is not None:
        new_betas = tuple(min(_BETA_MAX, max(_BETA_MIN, 1.0 - k * (1.0 - b))) for b in betas)  # type: ignore[assignment]
    new_eps = None if eps is None else eps / math.sqrt(k)
    return ScaledHyperparameters(base_lr * math.sqrt(k), rule, k, new_betas, new_eps)  # type: ignore[arg-type]


def _check_betas(betas: object) -> tuple[float, float] | None:
    """Adam's ``(beta1, beta2)``: two finite numbers in [0, 1)."""
    if betas is None:
        return None
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ConfigError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    out = tuple(checks.finite_number("betas", float(b) if isinstance(b, torch.Tensor) and b.numel() == 1 else b)
                for b in betas)
    if not all(0.0 <= b < 1.0 for b in out):
        raise ConfigError(f"betas must each be in [0, 1), got {tuple(betas)!r}")
    return out  # type: ignore[return-value]


def apply_scaling(
    optimizer: torch.optim.Optimizer, base_lr: float, base_batch_size: int, batch_size: int, rule: str
) -> ScaledHyperparameters:
    """Scale an optimizer built at ``base_lr`` to ``batch_size`` in place; ``rule='auto'`` picks by family.

    Every param group's LR is multiplied by the same factor (groups built with LR multipliers keep their ratios).
    """
    if rule == "auto":
        rule = default_rule(optimizer)
    if rule == "adam-sqrt" and not is_adam_family(optimizer):
        raise ConfigError(
            f"LR rule 'adam-sqrt' needs an Adam-family optimizer (with betas); {type(optimizer).__name__} has none. "
            "use lr_rule='linear' or 'sqrt'"
        )
    defaults = optimizer.defaults
    scaled = scale_lr(base_lr, base_batch_size, batch_size, rule, betas=defaults.get("betas"), eps=defaults.get("eps"))
    factor = scaled.lr / base_lr
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if rule == "adam-sqrt":
            b1, b2 = group["betas"]
            group["betas"] = scale_lr(1.0, base_batch_size, batch_size, rule, betas=(b1, b2)).betas
            if group.get("eps") is not None:
                group["eps"] = group["eps"] / math.sqrt(scaled.k)
    return scaled
