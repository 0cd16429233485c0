"""One set of argument checks for every module.

Each check returns the validated (normalised) value or raises :class:`~batchfit.errors.ConfigError` with one line
that names the *keyword argument* (``batch_size``, ``memory_budget``). The CLI translates keyword names into its
flags (see :func:`batchfit.cli._common`), so Python callers never read about flags they did not use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeVar

from batchfit.errors import ConfigError

__all__ = [
    "kind_value",
    "MAX_SEED",
    "finite_number",
    "fraction",
    "non_negative_int",
    "one_of",
    "positive_int",
    "positive_number",
    "seed",
    "seed_range",
]

T = TypeVar("T")

# numpy's and torch's generators both accept seeds in [0, 2**32) without surprise; larger ones overflow somewhere.
MAX_SEED = 2**32 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value: Any, *, allow_none: bool = False, maximum: int | None = None) -> Any:
    """An integer >= 1 (``None`` passes through when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value


def non_negative_int(name: str, value: Any, *, allow_none: bool = False, maximum: int | None = None) -> Any:
    """An integer >= 0 (``None`` passes through when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value


def seed(value: Any, name: str = "seed") -> int:
    """The one seed check: an integer in [0, 2**32 - 1]."""
    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be an integer in [0, {MAX_SEED}], got {value!r}")
    return value


def seed_range(first: Any, count: int, what: str | None = None) -> int:
    """Seeds ``first, first + 1, ..., first + count - 1`` (replicate seeds) must all be seeds: checked before any
    work, so the last replicate does not fail after the others ran. ``what`` says where ``count`` comes from
    (default ``seeds=<count>``)."""
    first = seed(first)
    last = first + count - 1
    if last > MAX_SEED:
        raise ConfigError(f"seed={first} with {what or f'seeds={count}'} would use seeds up to {last}, past the "
                          f"largest seed {MAX_SEED}; seed must be <= {MAX_SEED - count + 1} here"
                          + ("" if what else ", or ask for fewer seeds"))
    return first


def finite_number(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """A finite int or float (not a bool, not NaN/inf); returned as float."""
    if value is None and allow_none:
        return None
    if not _is_number(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        f = float(value)
    except OverflowError:
        raise ConfigError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(f):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return f


def positive_number(name: str, value: Any, *, allow_none: bool = False, maximum: float | None = None) -> Any:
    """A finite number > 0; returned as float."""
    if value is None and allow_none:
        return None
    f = finite_number(name, value)
    if f <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if maximum is not None and f > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g}, got {value!r}")
    return f


def fraction(name: str, value: Any, *, allow_none: bool = False, low_open: bool = True, high_open: bool = True) -> Any:
    """A finite number in (0, 1) (each end open unless ``low_open``/``high_open`` is False)."""
    if value is None and allow_none:
        return None
    f = finite_number(name, value)
    low_ok = f > 0 if low_open else f >= 0
    high_ok = f < 1 if high_open else f <= 1
    if not (low_ok and high_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ConfigError(f"{name} must be a number in {interval}, got {value!r}")
    return f


def one_of(name: str, value: Any, choices: Iterable[T]) -> T:
    """``value`` must be one of ``choices`` (compared with ==)."""
    options = tuple(choices)
    if value not in options:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, options))}")
    return value


def kind_value(name: str, text: Any, kinds: Iterable[str], examples: str) -> tuple[str, float]:
    """``KIND:VALUE`` (a budget: ``epochs:5``) -> ``(kind, value)``, a positive finite number of one of ``kinds``;
    every other form is one :class:`ConfigError` naming ``name`` and showing ``examples``."""
    if not isinstance(text, str):
        raise ConfigError(f"{name} must be a string like {examples}, got {text!r}")
    kind, sep, raw = text.strip().partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in tuple(kinds):
        raise ConfigError(f"{name} {text!r} is not understood; write {examples}")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} {text!r}: {raw!r} is not a number; write e.g. {kind}:5") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} {text!r} must be positive; write e.g. {kind}:5")
    return kind, value
