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
    "boolean",
    "finite_number",
    "fraction",
    "int_at_least",
    "non_negative_int",
    "non_negative_number",
    "one_of",
    "positive_int",
    "positive_ints",
    "positive_number",
    "seed",
    "seed_range",
    "warmup",
]

T = TypeVar("T")

# numpy's and torch's generators both accept seeds in [0, 2**32) without surprise; larger ones overflow somewhere.
MAX_SEED = 2**32 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """``repr(value)``, cut to a readable length (a 400-digit seed is not printed whole)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"an integer of about {value.bit_length() * 0.30103:.0f} digits"
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _error(name: str, expected: str, value: Any, hint: str | None) -> ConfigError:
    """``<name> must be <expected>, got <value>[; <hint>]``: every check's one line."""
    return ConfigError(f"{name} must be {expected}, got {_shown(value)}" + (f"; {hint}" if hint else ""))


def _integer(name: str, value: Any, minimum: int, expected: str, allow_none: bool, maximum: int | None,
             hint: str | None) -> Any:
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < minimum:
        raise _error(name, expected, value, hint)
    if maximum is not None and value > maximum:
        raise _error(name, f"at most {maximum}", value, hint)
    return value


def positive_int(name: str, value: Any, *, allow_none: bool = False, maximum: int | None = None,
                 hint: str | None = None) -> Any:
    """An integer >= 1 (``None`` passes through when ``allow_none``); ``hint`` ends the message (what to write)."""
    return _integer(name, value, 1, "a positive integer", allow_none, maximum, hint)


def non_negative_int(name: str, value: Any, *, allow_none: bool = False, maximum: int | None = None,
                     hint: str | None = None) -> Any:
    """An integer >= 0 (``None`` passes through when ``allow_none``)."""
    return _integer(name, value, 0, "an integer >= 0", allow_none, maximum, hint)


def int_at_least(name: str, value: Any, minimum: int, *, allow_none: bool = False, maximum: int | None = None,
                 hint: str | None = None) -> Any:
    """An integer >= ``minimum`` (a size that needs two samples, an image of at least 8 pixels)."""
    return _integer(name, value, minimum, f"an integer >= {minimum}", allow_none, maximum, hint)


def positive_ints(name: str, values: Any, *, hint: str | None = None) -> list[int]:
    """A non-empty list (any iterable but a string) of positive integers, e.g. batch sizes; returned sorted, without
    repeats. An element that is not a positive integer is named as :func:`positive_int` names it."""
    items = None if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) else list(values)
    if not items:
        raise _error(name, "a non-empty list of positive integers", values, hint)
    return sorted({positive_int(name, v, hint=hint) for v in items})


def boolean(name: str, value: Any) -> bool:
    """``True`` or ``False`` itself (not 1, not "yes": a typo must not pass as a switch)."""
    if not isinstance(value, bool):
        raise _error(name, "True or False", value, None)
    return value


def seed(value: Any, name: str = "seed") -> int:
    """The one seed check: an integer in [0, 2**32 - 1]."""
    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        raise _error(name, f"an integer in [0, {MAX_SEED}]", value, None)
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


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` when it is not a finite int/float (a bool, NaN, inf, 1e400 as int)."""
    if not _is_number(value):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def finite_number(name: str, value: Any, *, allow_none: bool = False, hint: str | None = None) -> Any:
    """A finite int or float (not a bool, not NaN/inf); returned as float."""
    if value is None and allow_none:
        return None
    if not _is_number(value):
        raise _error(name, "a number", value, hint)
    f = _finite(value)
    if f is None:
        raise _error(name, "a finite number", value, hint)
    return f


def positive_number(name: str, value: Any, *, allow_none: bool = False, maximum: float | None = None,
                    hint: str | None = None) -> Any:
    """A finite number > 0; returned as float."""
    if value is None and allow_none:
        return None
    f = finite_number(name, value, hint=hint)
    if f <= 0:
        raise _error(name, "a positive number", value, hint)
    if maximum is not None and f > maximum:
        raise _error(name, f"at most {maximum:g}", value, hint)
    return f


def non_negative_number(name: str, value: Any, *, allow_none: bool = False, hint: str | None = None) -> Any:
    """A finite number >= 0; returned as float."""
    if value is None and allow_none:
        return None
    f = finite_number(name, value, hint=hint)
    if f < 0:
        raise _error(name, "a number >= 0", value, hint)
    return f


def fraction(name: str, value: Any, *, allow_none: bool = False, low_open: bool = True, high_open: bool = True,
             hint: str | None = None) -> Any:
    """A finite number in (0, 1) (each end open unless ``low_open``/``high_open`` is False)."""
    if value is None and allow_none:
        return None
    f = finite_number(name, value, hint=hint)
    low_ok = f > 0 if low_open else f >= 0
    high_ok = f < 1 if high_open else f <= 1
    if not (low_ok and high_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise _error(name, f"a number in {interval}", value, hint)
    return f


def warmup(name: str, value: Any) -> int | float:
    """A linear warm-up: a whole number of steps (>= 1, returned as int), a fraction of training in (0, 1) (a
    float) or 0 (none)."""
    f = _finite(value)
    if f is None or f < 0:
        raise _error(name, "a step count >= 0 or a fraction in (0, 1)", value, None)
    if f < 1:
        return f if f else 0
    if not f.is_integer():
        raise _error(name, "a whole number of steps or a fraction below 1", value, None)
    return int(f)


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
