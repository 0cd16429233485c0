"""The layer table: which module sits in which layer. The one place it is written down.

A module imports only from its own layer or the layers below it, and no chain of imports comes back to where it
started — at module level, inside a function (a lazy import that dodges a loop is still the loop) and under
``TYPE_CHECKING`` alike. ``tests/test_architecture.py`` reads every import in ``src/batchfit`` with :mod:`ast` and
checks them against this table; ``docs/architecture.md`` shows the table as :func:`render` prints it (the test checks
that too). A new module gets a row here before it gets an import.

Names are module paths under ``batchfit`` (``study`` covers the whole ``batchfit.study`` package, ``__init__`` is
the package's own ``__init__``); the lowest layer comes first.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["LAYERS", "layer_of", "render"]

# layer -> (what it is, its modules)
LAYERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "foundation": ("errors, argument checks, progress, metric, statistics, device and seeds, writing files, "
                   "lazy re-exports",
                   ("_layers", "_version", "_lazy", "errors", "checks", "progress", "metric", "critical", "stats",
                    "_io", "cost", "runtime")),
    "resources": ("memory meters and the OOM guard, where batches come from, torchrun",
                  ("memory", "data", "distributed")),
    "workload": ("what a workload is, LR rules, batch-size schedules", ("workload", "scaling", "schedule")),
    "step": ("the one training step, trials of it at a size, FSDP2 sharding", ("step", "sharding")),
    "loading": ("the built-in workloads and a spec -> Workload", ("demos", "loading")),
    "measurement": ("train and every measurement built on the step",
                    ("engine", "finder", "noise", "branching", "sharpness", "steptime", "schedule_check",
                     "planner")),
    "study": ("the sweep in an Optuna study", ("study",)),
    "decision": ("the decision and the recommendation", ("decide", "horizon", "recommend")),
    "report": ("tables, plots, markdown and HTML", ("report",)),
    "recipe": ("tune(): every stage composed", ("tuning",)),
    "integrations": ("Lightning, Keras, Hugging Face", ("integrations",)),
    "api": ("the public names, re-exported lazily", ("__init__",)),
    "cli": ("the command line", ("cli", "__main__")),
}


def layer_of(module: str) -> int | None:
    """The layer index (0 = lowest) of a module path under ``batchfit`` (``"study.trial"``; ``""`` or
    ``"__init__"`` for the package itself); ``None`` for a module the table does not list."""
    module = module or "__init__"
    best: tuple[int, int] | None = None  # (length of the matched name, layer)
    for index, (_, modules) in enumerate(LAYERS.values()):
        for name in modules:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[0]):
                best = (len(name), index)
    return None if best is None else best[1]


def render() -> str:
    """The table as docs/architecture.md shows it (Markdown): the highest layer first, as a map is read top-down."""
    here = Path(__file__).resolve().parent
    lines = ["| layer | modules | what |", "|---|---|---|"]
    for name, (what, modules) in reversed(LAYERS.items()):
        files = ", ".join(f"`{m}/`" if (here / m).is_dir() else f"`{m}.py`" for m in modules)
        lines.append(f"| {name} | {files} | {what} |")
    return "\n".join(lines)
