"""What the framework integrations share: keeping the effective batch through accumulation.

This module imports no framework, so every integration (Lightning, Hugging Face, Keras) can use it.
"""

from __future__ import annotations

import math

__all__ = ["plan_accumulation"]


def plan_accumulation(effective: int, recommended: int) -> tuple[int, int]:
    """``(micro, accumulation)`` with micro <= recommended and micro x accumulation == effective when a divisor of
    the effective batch is near; otherwise the fewest accumulation steps (micro x accumulation then exceeds the
    effective batch by less than ``accumulation``).

    >>> plan_accumulation(256, 100)
    (64, 4)
    >>> plan_accumulation(32, 100)
    (32, 1)
    >>> plan_accumulation(97, 50)
    (49, 2)
    """
    fewest = max(1, math.ceil(effective / max(1, recommended)))
    for accumulation in range(fewest, 2 * fewest + 1):  # an exact split keeps the batch exactly
        if effective % accumulation == 0:
            return effective // accumulation, accumulation
    return math.ceil(effective / fewest), fewest
