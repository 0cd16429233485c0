"""The critical batch size: fit steps-to-target ``S(B) = S_min (1 + B_crit / B)`` across batch sizes.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training") derive that the optimizer steps ``S`` and the
examples ``E = B S`` needed to reach a given loss trade off as ``(S / S_min - 1)(E / E_min - 1) = 1``, i.e.
``S(B) = S_min (1 + B_crit / B)`` with ``B_crit = E_min / S_min``: below ``B_crit`` doubling the batch nearly halves
the steps (perfect scaling); above it the steps stop falling (diminishing returns). Shallue et al. 2019
("Measuring the Effects of Data Parallelism on Neural Network Training") measure exactly this curve, steps to a
validation goal with the learning rate retuned at each batch size, and find the same shape across workloads.

The model is linear in ``x = 1 / B``: ``S = a + b x`` with ``S_min = a`` and ``B_crit = b / a``. We solve it by
least squares on the *relative* error (weights ``1 / S^2``), so a batch of 16 needing 900 steps does not drown
out a batch of 1024 needing 20; ``r2`` is the weighted coefficient of determination of that fit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["MIN_POINTS", "fit_critical_batch", "pooled_points", "predict_steps", "seed_points"]

MIN_POINTS = 3


def fit_critical_batch(points: Iterable[Sequence[float]]) -> tuple[dict[str, Any] | None, str | None]:
    """Fit ``S(B) = S_min (1 + B_crit / B)`` to ``[(B, S), ...]``.

    Returns ``(fit, None)`` with ``fit = {"b_crit", "s_min", "r2", "points"}``, or ``(None, reason)`` when the data
    cannot support a fit (fewer than 3 batch sizes, or a fit without a physical meaning).

    >>> fit, _ = fit_critical_batch([(b, 100 * (1 + 256 / b)) for b in (16, 64, 256, 1024)])
    >>> round(fit["b_crit"]), round(fit["s_min"]), round(fit["r2"], 6)
    (256, 100, 1.0)
    """
    clean: dict[int, float] = {}
    for item in points:
        b, s = int(item[0]), float(item[1])
        if b >= 1 and math.isfinite(s) and s > 0:
            clean[b] = min(s, clean.get(b, math.inf))  # the best (fewest) steps per batch size
    pts = sorted(clean.items())
    if len(pts) < MIN_POINTS:
        return None, (
            f"only {len(pts)} batch size(s) reached the target; the S(B) fit needs at least {MIN_POINTS} "
            "(add batch sizes, a larger budget, or a lower target)"
        )
    bs = np.array([p[0] for p in pts], dtype=float)
    ss = np.array([p[1] for p in pts], dtype=float)
    x = 1.0 / bs
    w = 1.0 / ss  # sqrt of the 1/S^2 weights: minimise sum(((S - S_hat) / S)^2)
    design = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (a, b), *_ = np.linalg.lstsq(design, ss * w, rcond=None)
    pred = a + b * x
    wts = w**2
    mean = float(np.sum(wts * ss) / np.sum(wts))
    ss_tot = float(np.sum(wts * (ss - mean) ** 2))
    ss_res = float(np.sum(wts * (ss - pred) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    point_list = [[int(bb), int(round(s)) if float(s).is_integer() else float(s)] for bb, s in pts]
    if a <= 0:
        return None, (
            f"steps-to-target keeps falling faster than 1/B (fitted S_min = {a:.3g} <= 0), so no critical batch "
            "is visible in this range; add larger batch sizes"
        )
    if b <= 0:
        return None, (
            "steps-to-target does not fall as the batch grows (fitted B_crit <= 0): the smallest batch size tried "
            "is already above the critical batch; add smaller batch sizes"
        )
    return {"b_crit": float(b / a), "s_min": float(a), "r2": float(r2), "points": point_list}, None


def predict_steps(fit: dict[str, Any], batch_size: float) -> float:
    """``S_min (1 + B_crit / B)`` for a fitted curve."""
    return float(fit["s_min"]) * (1.0 + float(fit["b_crit"]) / float(batch_size))


def seed_points(trials: Iterable[Any]) -> list[tuple[int, float]]:
    """``(B, steps)`` for each (batch size, seed) that reached the target: the fewest steps to it over that batch
    size's learning rates (Shallue et al. 2019 retune the LR per batch size). ``trials`` are trial dicts or
    summaries with ``batch_size``, ``seed``, ``status`` and ``steps_to_target``."""
    def get(t: Any, name: str) -> Any:
        return t.get(name) if isinstance(t, Mapping) else getattr(t, name, None)

    best: dict[tuple[int, Any], float] = {}
    for t in trials:
        steps = get(t, "steps_to_target")
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not math.isfinite(steps) or steps <= 0:
            continue
        if get(t, "status") not in ("ok", "diverged"):
            continue
        key = (int(get(t, "batch_size")), get(t, "seed"))
        best[key] = min(best.get(key, math.inf), float(steps))
    return [(b, s) for (b, _), s in sorted(best.items(), key=lambda kv: (kv[0][0], repr(kv[0][1])))]


def pooled_points(points: Iterable[Sequence[float]]) -> list[tuple[int, float]]:
    """One point per batch size: its replicates' geometric mean (steps are positive and their noise multiplicative;
    the minimum over seeds would be biased low)."""
    by_b: dict[int, list[float]] = {}
    for b, s in points:
        if math.isfinite(float(s)) and float(s) > 0:
            by_b.setdefault(int(b), []).append(float(s))
    return [(b, float(np.exp(np.mean(np.log(v))))) for b, v in sorted(by_b.items())]
