"""batchfit.checks: the one set of argument checks (each a one-line ConfigError naming the keyword)."""

from __future__ import annotations

import pytest

from batchfit import checks
from batchfit.errors import ConfigError


@pytest.mark.parametrize(("values", "expected"), [
    ([4, 1, 2], [1, 2, 4]),
    ((8, 8, 2), [2, 8]),
    (iter([3]), [3]),
    ({16, 32}, [16, 32]),
])
def test_positive_ints_sorted_without_repeats(values: object, expected: list[int]) -> None:
    assert checks.positive_ints("batch_sizes", values) == expected


@pytest.mark.parametrize(("values", "message"), [
    ([], "batch_sizes must be a non-empty list of positive integers, got []; write e.g. 16,32"),
    ("16,32", "batch_sizes must be a non-empty list of positive integers, got '16,32'; write e.g. 16,32"),
    (16, "batch_sizes must be a non-empty list of positive integers, got 16; write e.g. 16,32"),
    (None, "batch_sizes must be a non-empty list of positive integers, got None; write e.g. 16,32"),
    ([16, 0], "batch_sizes must be a positive integer, got 0; write e.g. 16,32"),
    ([16, -4], "batch_sizes must be a positive integer, got -4; write e.g. 16,32"),
    ([16, 2.0], "batch_sizes must be a positive integer, got 2.0; write e.g. 16,32"),
    ([True], "batch_sizes must be a positive integer, got True; write e.g. 16,32"),
])
def test_positive_ints_refuses_with_one_line(values: object, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        checks.positive_ints("batch_sizes", values, hint="write e.g. 16,32")
    assert str(exc.value) == message
