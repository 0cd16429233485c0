"""The sweep's inputs: the equal budget, the steps-to-target goal, the candidate batch sizes, the LR multipliers.

Each parser returns a normalised value or raises :class:`~batchfit.errors.ConfigError` with one line that says
what to write instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from batchfit import checks
from batchfit.errors import ConfigError

__all__ = [
    "BUDGET_KINDS",
    "DEFAULT_BUDGET",
    "EVALS_PER_TRIAL",
    "FULL_BATCH_MAX_N",
    "MAX_ACCUMULATION",
    "MAX_LR_SEARCH",
    "OUTSIDE_RANGE_LR_SEARCH",
    "SMALL_BATCH_MAX_N",
    "Budget",
    "GridPoint",
    "config_key",
    "make_grid",
    "default_batch_sizes",
    "lr_multipliers",
    "lr_multipliers_by_batch",
    "parse_batch_sizes",
    "parse_budget",
    "parse_target",
]

BUDGET_KINDS = ("epochs", "steps", "samples")
DEFAULT_BUDGET = "epochs:5"
EVALS_PER_TRIAL = 16  # steps-to-target resolution: ~1/16 of a trial
SMALL_BATCH_MAX_N = 2048  # B = 1 joins the default candidates only on training sets this small
FULL_BATCH_MAX_N = 8192  # full-batch (B = N) joins the default candidates only on training sets this small
MAX_ACCUMULATION = 64  # default candidates stop at 64 x the largest micro-batch that fits
MAX_LR_SEARCH = 16  # LR multipliers 2^-8 ... 2^7: a wider search is a different tool (and 2^±1500 overflows)
OUTSIDE_RANGE_LR_SEARCH = 3  # the fewest LRs (x1/2, x1, x2) a batch gets where its LR rule is outside its range


@dataclasses.dataclass(frozen=True)
class Budget:
    """The equal budget every trial gets: ``epochs`` (the guides' comparison), ``steps`` or ``samples``."""

    kind: str
    value: float

    def steps_for(self, batch_size: int, num_train: int) -> int:
        """Optimizer steps at ``batch_size`` (drop_last: ``num_train // batch_size`` steps per epoch)."""
        if self.kind == "steps":
            return int(self.value)
        if self.kind == "samples":
            return max(1, math.ceil(self.value / batch_size))
        return max(1, round(self.value * (num_train // batch_size)))

    def to_dict(self) -> dict[str, Any]:
        value: float | int = int(self.value) if float(self.value).is_integer() else self.value
        return {"kind": self.kind, "value": value}

    def __str__(self) -> str:
        return f"{self.kind}:{self.to_dict()['value']}"


def parse_budget(text: str | Budget) -> Budget:
    """``epochs:E`` (E may be fractional), ``steps:S`` or ``samples:N``.

    >>> parse_budget("epochs:5"), parse_budget("steps:200").steps_for(64, 1000)
    (Budget(kind='epochs', value=5.0), 200)
    """
    if isinstance(text, Budget):
        return text
    from batchfit import checks

    kind, value = checks.kind_value("budget", text, BUDGET_KINDS, "epochs:5, steps:500 or samples:100000")
    if kind in ("steps", "samples") and not value.is_integer():
        raise ConfigError(f"budget {text!r}: {kind} must be a whole number")
    return Budget(kind, value)


def parse_target(target: float | str | Mapping[str, Any]) -> dict[str, Any]:
    """A fraction of the best validation metric any trial reached (``0.97``), or an absolute value (``abs:0.9``).

    For a metric where lower is better (a loss), the fractional target is ``best / fraction`` (within the same ratio).

    >>> parse_target(0.97), parse_target("abs:0.9")
    ({'kind': 'fraction', 'value': 0.97}, {'kind': 'absolute', 'value': 0.9})
    """
    if isinstance(target, Mapping):
        kind, value = target.get("kind"), target.get("value")
        checks.one_of("target kind", kind, ("fraction", "absolute"))
        return parse_target(value if kind == "fraction" else f"abs:{value}")
    kind = "fraction"
    raw: Any = target
    if isinstance(target, str):
        text = target.strip().lower()
        for prefix in ("abs:", "absolute:", "="):
            if text.startswith(prefix):
                kind, text = "absolute", text[len(prefix):]
                break
        try:
            raw = float(text)
        except ValueError:
            raise ConfigError(
                f"target {target!r} is not understood; give a fraction of the best metric (0.97) or an absolute "
                "value (abs:0.9)"
            ) from None
    checks.finite_number("target", raw, hint="write a fraction (0.97) or abs:VALUE")
    if kind == "fraction":
        checks.fraction("target fraction", raw, high_open=False, hint=f"for an absolute metric value write abs:{raw}")
    return {"kind": kind, "value": float(raw)}


def parse_batch_sizes(text: str | Sequence[int]) -> list[int]:
    """``"16,32,64"`` (or a sequence of ints) -> a sorted list of distinct positive batch sizes.

    >>> parse_batch_sizes("64, 16,32,16")
    [16, 32, 64]
    """
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise ConfigError(f"batch sizes {text!r} are not a comma-separated list; write e.g. 16,32,64")
        values: list[Any] = []
        for p in parts:
            try:
                values.append(int(p))
            except ValueError:
                raise ConfigError(f"batch size {p!r} in {text!r} is not a whole number; write e.g. 16,32,64") \
                    from None
    else:
        values = list(text)
        if not values:
            raise ConfigError("the batch-size list is empty; give at least one batch size, e.g. [16, 32, 64]")
    for v in values:
        checks.positive_int("batch size", v, hint="write e.g. 16,32,64")
    return sorted(set(values))


def default_batch_sizes(num_train: int, max_micro_batch: int | None = None, base_batch_size: int | None = None,
                        *, extremes: bool = True) -> list[int]:
    """The default candidates: powers of two from 16 up to what fits, extended past it by gradient accumulation.

    - powers of two ``16 <= B <= min(N, M x 64)`` (``M``: the largest micro-batch that fits, unknown = no limit),
      so the largest batches run as up to 64 accumulated micro-batches;
    - the workload's own base batch size;
    - the extremes on small data sets: B = 1 when N <= 2048 (it costs N steps per epoch) and full batch B = N when
      N <= 8192 and N fits within the accumulation limit.

    >>> default_batch_sizes(1437)
    [1, 16, 32, 64, 128, 256, 512, 1024, 1437]
    >>> default_batch_sizes(100_000, max_micro_batch=64)
    [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    """
    n = num_train
    upper = n if max_micro_batch is None else min(n, max_micro_batch * MAX_ACCUMULATION)
    sizes = {2**k for k in range(4, 63) if 2**k <= upper}
    if not sizes:  # fewer than 16 samples: powers of two up to N
        sizes = {2**k for k in range(0, 5) if 2**k <= upper}
    if base_batch_size is not None and base_batch_size <= upper:
        sizes.add(base_batch_size)
    if extremes:
        if n <= SMALL_BATCH_MAX_N:
            sizes.add(1)
        if n <= FULL_BATCH_MAX_N and n <= upper:
            sizes.add(n)
    return sorted(sizes)


def lr_multipliers(n: int) -> list[float]:
    """``n`` LR multipliers around the scaled LR, in powers of two: 1 -> [1]; 2 -> [1/2, 1]; 3 -> [1/2, 1, 2]...

    Smaller first at even ``n`` (the scaled LR tends to be too high at large batches, not too low). At most
    :data:`MAX_LR_SEARCH` multipliers.

    >>> lr_multipliers(3), lr_multipliers(4)
    ([0.5, 1.0, 2.0], [0.25, 0.5, 1.0, 2.0])
    """
    checks.positive_int("lr_search", n, maximum=MAX_LR_SEARCH)
    exps: list[int] = [0]
    k = 1
    while len(exps) < n:
        exps.append(-k)
        if len(exps) < n:
            exps.append(k)
        k += 1
    return [2.0**e for e in sorted(exps)]


def lr_multipliers_by_batch(batch_sizes: Sequence[int], lr_search: int, *, rule: str, base_batch_size: int,
                            betas: Sequence[float] | None) -> dict[int, list[float]]:
    """The batch sizes whose LR rule is outside its range, each with at least :data:`OUTSIDE_RANGE_LR_SEARCH` LR
    multipliers: ``lr_multipliers(max(3, lr_search))``, so x1/2, x1 and x2 even at ``lr_search=1``.

    Only the adam-sqrt rule has a range (:func:`batchfit.scaling.scale_lr`: beta1 is held at 0.5 once
    ``k (1 - beta1) > 0.5``); there the betas are batchfit's choice rather than the rule's, so the rule's LR is no
    longer a derived value and is searched. Deterministic: a function of the batch sizes and the base optimizer's
    betas (both in the study identity), so a resumed sweep lays out the same grid. Batch sizes not named keep the
    sweep's ``lr_multipliers(lr_search)``.

    >>> lr_multipliers_by_batch([32, 64, 512], 1, rule="adam-sqrt", base_batch_size=32, betas=(0.9, 0.999))
    {512: [0.5, 1.0, 2.0]}
    """
    from batchfit.scaling import scale_lr

    checks.positive_int("lr_search", lr_search, maximum=MAX_LR_SEARCH)
    if rule != "adam-sqrt" or betas is None:
        return {}
    wide = lr_multipliers(max(OUTSIDE_RANGE_LR_SEARCH, lr_search))
    return {int(b): wide for b in batch_sizes
            if scale_lr(1.0, base_batch_size, int(b), rule, betas=tuple(betas)).outside_range}  # type: ignore[arg-type]


def config_key(batch_size: int, lr_multiplier: float, seed: int | None = None) -> str:
    """The grid point's key in the store: ``b64_m0.5``; a replicate seed appends ``_s3``, so the keys of studies
    made before seeds were a sweep dimension stay valid."""
    key = f"b{int(batch_size)}_m{float(lr_multiplier):.6g}"
    return key if seed is None else f"{key}_s{int(seed)}"


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One configuration of the sweep: an effective batch size and an LR multiplier on its rule-scaled LR, and a
    replicate ``seed`` (``None``: the sweep's own seed, so the keys of studies made before seeds stay valid)."""

    batch_size: int
    lr_multiplier: float
    seed: int | None = None

    @property
    def key(self) -> str:
        return config_key(self.batch_size, self.lr_multiplier, self.seed)

    def to_attr(self) -> dict[str, Any]:
        """The trial attribute that says which grid point a trial runs (``keys.TRIAL_CONFIG``)."""
        attr = {"key": self.key, "batch_size": int(self.batch_size), "lr_multiplier": float(self.lr_multiplier)}
        if self.seed is not None:
            attr["seed"] = int(self.seed)
        return attr

    @classmethod
    def from_attr(cls, attr: Mapping[str, Any]) -> GridPoint:
        seed = attr.get("seed")
        return cls(int(attr["batch_size"]), float(attr["lr_multiplier"]), None if seed is None else int(seed))


def make_grid(batch_sizes: Sequence[int], multipliers: Sequence[float], *, seeds: int = 1, base_seed: int = 0,
              replicates: Mapping[int, int] | None = None,
              by_batch: Mapping[int, Sequence[float]] | None = None) -> list[GridPoint]:
    """Every batch size at the scaled LR first, then at its neighbours (nearest multiplier first); then the
    replicate seeds ``base_seed + 1, ...``: ``seeds`` per configuration everywhere, or more for the batch sizes
    ``replicates`` names (``{batch: seeds}``, what tune's racing asks for). ``by_batch`` gives some batch sizes
    their own multipliers instead (:func:`lr_multipliers_by_batch`); they join the same order."""
    own = {int(b): [float(m) for m in ms] for b, ms in (by_batch or {}).items()}
    mults = {int(b): own.get(int(b), [float(m) for m in multipliers]) for b in batch_sizes}
    order = sorted({m for ms in mults.values() for m in ms}, key=lambda m: (abs(math.log2(m)), m))
    grid = [GridPoint(int(b), m) for m in order for b in batch_sizes if m in mults[int(b)]]
    wanted = {int(b): max(seeds, int((replicates or {}).get(b, 1))) for b in batch_sizes}
    for r in range(1, max(wanted.values(), default=1)):
        grid += [GridPoint(int(b), m, base_seed + r) for m in order for b in batch_sizes
                 if wanted[int(b)] > r and m in mults[int(b)]]
    return grid
