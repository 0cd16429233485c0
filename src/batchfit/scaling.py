"""Learning-rate scaling rules: from the batch size the LR was tuned at to the effective batch size.

With ``k = batch_size / base_batch_size``:

- ``none``: keep the LR.
- ``linear``: ``lr * k`` (Goyal et al. 2017, "Accurate, Large Minibatch SGD"), for SGD-family optimizers.
- ``sqrt``: ``lr * sqrt(k)`` (Krizhevsky 2014; Hoffer et al. 2017).
- ``adam-sqrt``: the square-root scaling rule for adaptive methods (Malladi et al. 2022, "On the SDEs and Scaling
  Rules for Adaptive Gradient Algorithms"): ``lr * sqrt(k)``, ``beta1 -> 1 - k (1 - beta1)`` while
  ``k (1 - beta1) <= 0.5`` (held at ``0.5`` beyond, see :func:`scale_lr`), ``beta2 -> beta2 ** k`` (the
  second-moment half-life kept constant in samples, Marek et al. 2025, :func:`beta2_power`),
  ``eps -> eps / sqrt(k)``.

``auto`` picks ``linear`` for SGD-family optimizers and ``adam-sqrt`` for the Adam family.

Weight decay (``weight_decay_rule``): ``keep`` (the default) leaves it; ``timescale`` keeps the AdamW EMA timescale
in samples, ``tau = B / (lr x weight_decay)``, constant across batch sizes (Wang & Aitchison 2024, "How to set
AdamW's weight decay as you scale model and dataset size"; Bergsma et al. 2025, "Power Lines"):
``weight_decay -> weight_decay x k / (lr_new / lr_base)`` (:func:`timescale_weight_decay`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from batchfit import checks
from batchfit.errors import ConfigError

__all__ = [
    "BETA1_SDE_LIMIT",
    "RULES",
    "RULE_CHOICES",
    "WEIGHT_DECAY_RULES",
    "ScaledHyperparameters",
    "apply_scaling",
    "beta2_power",
    "default_rule",
    "is_adam_family",
    "optimizer_settings",
    "scale_lr",
    "timescale_weight_decay",
]

RULES = ("none", "linear", "sqrt", "adam-sqrt")
RULE_CHOICES = ("auto", *RULES)
WEIGHT_DECAY_RULES = ("keep", "timescale")

# Betas may not reach 1 (Adam divides by 1 - beta^t); a rule value rounding up to 1 is clipped to this (and said so).
_BETA_MIN, _BETA_MAX = 0.0, 0.999999
# The adam-sqrt rule moves beta1 only while k (1 - beta1) stays at most this: the SDE approximation behind it holds
# for small k (1 - beta); beyond it beta1 is held where the rule stops, 1 - BETA1_SDE_LIMIT (see scale_lr).
BETA1_SDE_LIMIT = 0.5


@dataclass(frozen=True)
class ScaledHyperparameters:
    """The result of :func:`scale_lr`: the values to train at ``batch_size``.

    ``outside_range`` is true when the rule was asked outside the range it is meant for (adam-sqrt with
    ``k (1 - beta1) > 0.5``) or a value had to be clipped; the betas returned then are batchfit's choice, not the
    rule's, and ``notes`` says which value and why (one sentence each).
    """

    lr: float
    rule: str
    k: float
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    weight_decay_rule: str = "keep"
    outside_range: bool = False
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """The JSON form a training result records (``lr_scaling``)."""
        return {"rule": self.rule, "k": self.k, "lr": self.lr,
                "betas": None if self.betas is None else [float(b) for b in self.betas], "eps": self.eps,
                "weight_decay": self.weight_decay, "weight_decay_rule": self.weight_decay_rule,
                "outside_range": self.outside_range, "notes": list(self.notes)}


def is_adam_family(optimizer: torch.optim.Optimizer) -> bool:
    """Adam-family optimizers keep per-parameter second moments: ``betas`` with two entries in their defaults."""
    betas = optimizer.defaults.get("betas")
    return isinstance(betas, (tuple, list)) and len(betas) == 2


def default_rule(optimizer: torch.optim.Optimizer) -> str:
    return "adam-sqrt" if is_adam_family(optimizer) else "linear"


def beta2_power(beta2: float, k: float) -> float:
    """``beta2 ** k``: Adam's second-moment EMA keeps its half-life in *samples* when the batch changes by ``k``
    (Marek et al. 2025, "Small batch size training for language models"); clipped below 1.

    The one formula for both the adam-sqrt rule (:func:`scale_lr`) and a batch-size schedule's change
    (:func:`batchfit.schedule.transfer`).

    >>> round(beta2_power(0.999, 16), 6)
    0.984119
    """
    return min(_BETA_MAX, max(_BETA_MIN, float(beta2) ** k))


def timescale_weight_decay(weight_decay: float, k: float, lr_factor: float) -> float:
    """The weight decay that keeps the AdamW timescale ``tau = B / (lr x weight_decay)`` constant in samples when the
    batch changes by ``k`` and the LR by ``lr_factor`` (Wang & Aitchison 2024; Bergsma et al. 2025):
    ``weight_decay x k / lr_factor``.

    >>> timescale_weight_decay(0.1, 4, 2.0)  # adam-sqrt: LR x2 at 4x the batch, so weight decay x2
    0.2
    """
    return float(weight_decay) * k / lr_factor


def _scale_beta1(beta1: float, k: float) -> tuple[float, str | None]:
    """The adam-sqrt beta1 at batch factor ``k``, and a note when the rule was outside its range."""
    stretch = k * (1.0 - beta1)
    if k > 1 and stretch > BETA1_SDE_LIMIT:
        held = min(beta1, 1.0 - BETA1_SDE_LIMIT)
        return held, (f"beta1: the SDE rule 1 - k (1 - beta1) = {1.0 - stretch:.6g} is outside its range "
                      f"(k (1 - beta1) = {stretch:.3g} > {BETA1_SDE_LIMIT:g}); held at {held:.6g}")
    value = 1.0 - stretch
    if value > _BETA_MAX:
        return _BETA_MAX, f"beta1: the rule's {value!r} rounds to 1; clipped to {_BETA_MAX}"
    return value, None


def scale_lr(
    base_lr: float,
    base_batch_size: int,
    batch_size: int,
    rule: str = "linear",
    *,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    weight_decay: float | None = None,
    weight_decay_rule: str = "keep",
) -> ScaledHyperparameters:
    """Scale the learning rate (and, for ``adam-sqrt``, Adam's betas and epsilon) to a new batch size.

    ``adam-sqrt`` with ``k = batch_size / base_batch_size``:

    - beta1 follows the SDE rule ``1 - k (1 - beta1)`` only while ``k (1 - beta1) <= 0.5``. The SDE approximation
      of Malladi et al. (2022) is derived for small ``k (1 - beta)``; at ``k = 16`` and beta1 0.9 the formula gives
      -0.6, which is no momentum coefficient at all. Beyond the range beta1 is held where the rule stops:
      ``1 - 0.5 = 0.5`` (or the base beta1 when that is already below 0.5), a momentum that still averages ~2
      steps, rather than 0 (no momentum, a different optimizer). The result is then ``outside_range`` and
      ``notes`` says so: the betas are batchfit's choice, part of the recipe, not the rule's. Smaller batches
      (``k < 1``) keep the SDE rule, which stays in [beta1, 1).
    - beta2 by a constant half-life in samples, ``beta2 ** k`` (:func:`beta2_power`, Marek et al. 2025), which
      agrees with the SDE rule ``1 - k (1 - beta2)`` to first order and stays in [0, 1) at any ``k``.
    - eps ``/ sqrt(k)``.

    ``weight_decay_rule="timescale"`` scales ``weight_decay`` to keep ``B / (lr x weight_decay)`` constant
    (:func:`timescale_weight_decay`); ``keep`` returns it unchanged.

    >>> scale_lr(0.1, 256, 1024, "linear").lr
    0.4
    >>> h = scale_lr(1e-3, 32, 128, "adam-sqrt", betas=(0.9, 0.999), eps=1e-8)
    >>> round(h.lr, 6), tuple(round(b, 6) for b in h.betas), h.eps, h.outside_range
    (0.002, (0.6, 0.996006), 5e-09, False)
    >>> h = scale_lr(1e-3, 32, 512, "adam-sqrt", betas=(0.9, 0.999))
    >>> tuple(round(b, 6) for b in h.betas), h.outside_range
    ((0.5, 0.984119), True)
    """
    checks.one_of("rule", rule, RULES)
    checks.one_of("weight_decay_rule", weight_decay_rule, WEIGHT_DECAY_RULES)
    checks.positive_int("base_batch_size", base_batch_size)
    checks.positive_int("batch_size", batch_size)
    checks.positive_number("base_lr", base_lr)
    betas = _check_betas(betas)
    if eps is not None:
        eps = checks.finite_number("eps", eps)
        if eps < 0:
            raise ConfigError(f"eps must be >= 0, got {eps!r}")
    if weight_decay is not None:
        weight_decay = checks.finite_number("weight_decay", weight_decay)
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
    k = batch_size / base_batch_size
    lr_factor = {"none": 1.0, "linear": k, "sqrt": math.sqrt(k), "adam-sqrt": math.sqrt(k)}[rule]
    new_wd = weight_decay
    if weight_decay is not None and weight_decay_rule == "timescale":
        new_wd = timescale_weight_decay(weight_decay, k, lr_factor)
    lr = float(base_lr) if rule == "none" else base_lr * lr_factor
    if rule != "adam-sqrt":
        return ScaledHyperparameters(lr, rule, k, betas, eps, new_wd, weight_decay_rule)
    new_betas, notes = None, []
    if betas is not None:
        b1, note = _scale_beta1(betas[0], k)
        notes += [note] if note else []
        b2 = beta2_power(betas[1], k)
        if b2 == _BETA_MAX and betas[1] ** k > _BETA_MAX:
            notes.append(f"beta2: the rule's {betas[1] ** k!r} rounds to 1; clipped to {_BETA_MAX}")
        new_betas = (b1, b2)
    new_eps = None if eps is None else eps / math.sqrt(k)
    return ScaledHyperparameters(lr, rule, k, new_betas, new_eps, new_wd, weight_decay_rule,  # type: ignore[arg-type]
                                 outside_range=bool(notes), notes=tuple(notes))


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
    optimizer: torch.optim.Optimizer, base_lr: float, base_batch_size: int, batch_size: int, rule: str,
    *, weight_decay_rule: str = "keep",
) -> ScaledHyperparameters:
    """Scale an optimizer built at ``base_lr`` to ``batch_size`` in place; ``rule='auto'`` picks by family.

    Every param group's LR is multiplied by the same factor (groups built with LR multipliers keep their ratios);
    ``weight_decay_rule="timescale"`` moves every group's ``weight_decay`` by ``k / lr factor``. The result is the
    optimizer defaults' scaling; it is ``outside_range`` when any group's was.
    """
    if rule == "auto":
        rule = default_rule(optimizer)
    if rule == "adam-sqrt" and not is_adam_family(optimizer):
        raise ConfigError(
            f"LR rule 'adam-sqrt' needs an Adam-family optimizer (with betas); {type(optimizer).__name__} has none. "
            "use lr_rule='linear' or 'sqrt'"
        )
    defaults = optimizer.defaults
    scaled = scale_lr(base_lr, base_batch_size, batch_size, rule, betas=defaults.get("betas"), eps=defaults.get("eps"),
                      weight_decay=defaults.get("weight_decay"), weight_decay_rule=weight_decay_rule)
    factor = scaled.lr / base_lr
    notes = list(scaled.notes)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if weight_decay_rule == "timescale" and group.get("weight_decay"):
            group["weight_decay"] = timescale_weight_decay(group["weight_decay"], scaled.k, factor)
        if rule == "adam-sqrt":
            b1, b2 = group["betas"]
            moved = scale_lr(1.0, base_batch_size, batch_size, rule, betas=(b1, b2))
            group["betas"] = moved.betas
            notes += [n for n in moved.notes if n not in notes]
            if group.get("eps") is not None:
                group["eps"] = group["eps"] / math.sqrt(scaled.k)
    if len(notes) != len(scaled.notes):
        scaled = ScaledHyperparameters(scaled.lr, scaled.rule, scaled.k, scaled.betas, scaled.eps,
                                       scaled.weight_decay, scaled.weight_decay_rule, True, tuple(notes))
    return scaled


def optimizer_settings(optimizer: Any) -> dict[str, Any]:
    """The class and the hyperparameters of ``optimizer``'s first param group (what a trial records as ``optimizer``;
    the LR there is the step-0 LR, after warm-up, so the recipe quotes the trial's peak ``lr`` instead)."""
    group = optimizer.param_groups[0]
    out: dict[str, Any] = {"class": type(optimizer).__name__, "module": type(optimizer).__module__}
    for key, value in group.items():
        if key == "params" or callable(value):
            continue
        if value is False or key in ("foreach", "fused", "capturable", "differentiable", "maximize"):
            continue  # off flags are every optimizer's defaults, and implementation switches are no recipe
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
            out[key] = [float(v) for v in value]
    if len(optimizer.param_groups) > 1:
        out["param_groups"] = len(optimizer.param_groups)
    return out
