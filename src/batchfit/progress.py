"""One progress convention for train, find, noise, sweep and tune.

Every long-running public function takes ``progress: ProgressFn | None`` and calls it with a
:class:`ProgressEvent` as work completes. A display (the CLI's rich live view) or a logger implements one function;
it never needs to know which stage produced the event. Engine hooks (:class:`batchfit.engine.Callback`) stay the
lower-level, per-step interface.

Event kinds: ``start`` (a stage begins; ``total`` set when known), ``update`` (one unit done: a trial, a step, an
evaluation; ``completed`` counts units), ``record`` (a finished record in ``data``, e.g. one finder trial or one
sweep evaluation), ``end`` (the stage is done; ``message`` is its one-line result).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "STAGES", "ProgressEvent", "ProgressFn", "emit"]

KINDS = ("start", "update", "record", "end")
# every stage name an event carries: the commands', tune's stages in their order, and the capabilities tune runs
STAGES = ("train", "find", "noise", "lr_check", "step_time", "sweep", "precision", "batch_schedule_check", "report",
          "tune", "plan", "branching", "schedule_check")


@dataclass(frozen=True)
class ProgressEvent:
    """One thing that happened: ``stage`` is one of :data:`STAGES`."""

    stage: str
    kind: str
    message: str = ""
    completed: int | None = None
    total: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[ProgressEvent], None]


def emit(progress: ProgressFn | None, stage: str, kind: str, message: str = "", *, completed: int | None = None,
         total: int | None = None, **data: Any) -> None:
    """Call ``progress`` (if any) with one event."""
    if progress is not None:
        progress(ProgressEvent(stage=stage, kind=kind, message=message, completed=completed, total=total, data=data))
