"""``batchfit tune``: the main job — find, noise, lr_check, sweep, precision, report — with a live display.

With no arguments it tunes ``demo:digits-mlp`` on the CPU and writes everything to ``./batchfit-out``.
Re-running the same command resumes from what is already there.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from batchfit.cli import _common as c
from batchfit.progress import ProgressEvent
from batchfit.tuning import STAGES

__all__ = ["add_parser", "batch_list", "budget_value", "eval_every_value", "run", "target_value"]


def _from_config_error(parse: Any) -> Any:
    """Wrap a sweep parser so a bad value is an argparse error (one line, exit 2) before any work starts."""

    def convert(text: str) -> Any:
        from batchfit.errors import ConfigError

        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def batch_list(text: str) -> list[int]:
    """``16,32,64`` -> [16, 32, 64]."""
    from batchfit.study import parse_batch_sizes

    return _from_config_error(parse_batch_sizes)(text)


def budget_value(text: str) -> str:
    from batchfit.study import parse_budget

    return str(_from_config_error(parse_budget)(text))


def train_budget_value(text: str) -> str:
    from batchfit.cost import parse_train_budget

    return str(_from_config_error(lambda t: parse_train_budget(t, name="--train-budget"))(text))


def max_cost_value(text: str) -> float | str | None:
    """``auto``, ``none`` (uncapped) or runs of the train budget, checked as the library checks ``max_cost``
    (:func:`batchfit.checks.positive_number`)."""
    from batchfit import checks

    word = text.strip().lower()
    if word in ("auto", "none"):
        return None if word == "none" else "auto"
    expected = "runs of the train budget (e.g. 1.0), auto or none"
    return c._checked(checks.positive_number, c._number(text, expected), hint=f"give {expected}")


def target_value(text: str) -> str | float:
    from batchfit.study import parse_target

    spec = _from_config_error(parse_target)(text)
    return spec["value"] if spec["kind"] == "fraction" else f"abs:{spec['value']}"


def eval_every_value(text: str) -> int | str:
    return "auto" if text == "auto" else c.positive_int(text)


def add_parser(sub: Any) -> None:
    from batchfit.tuning import DEFAULT_BUDGET, DEFAULT_NOISE_STEPS

    p = sub.add_parser(
        "tune", help="the main job: measure and recommend the batch size (find, noise, lr_check, sweep, precision, "
                     "report)",
        description="Find the largest batch that fits and the throughput knee, measure the gradient noise scale, "
                    "check the base LR, train every candidate batch size at its scaled LR, compare bf16 with fp32 on "
                    "the pick, and write a report with the measured trade-off table and a recommendation. "
                    "Re-running the same command resumes.")
    c.add_workload_options(p)
    p.add_argument("--batch-sizes", "-b", type=batch_list, metavar="B1,B2,...",
                   help="effective batch sizes to compare (default: powers of two from 16 up to 64 x the largest "
                        "micro-batch that fits, at most the training set, the workload's base batch, and the full "
                        "batch on sets of up to 8,192 samples: 8 sizes for demo:digits-mlp, 13 for 100,000 samples "
                        "without a memory limit)")
    p.add_argument("--train-budget", type=train_budget_value, metavar="BUDGET",
                   help="what you will train: samples:N, steps:S (at the base batch), epochs:E or tokens:T (default: "
                        f"the workload's own, else {DEFAULT_BUDGET}); the recommendation is for this budget and every "
                        "result states its cost in runs of it")
    p.add_argument("--max-cost", type=max_cost_value, metavar="F", default="auto",
                   help="what batchfit may spend, in runs of the train budget: a number, auto (default: 1.0 when "
                        "batchfit plans the measurement, uncapped with --budget) or none (uncapped: every candidate "
                        "trains the whole train budget); capped, every stage gets a share, each trial trains an "
                        "equal share of samples and racing stops at the cap")
    p.add_argument("--budget", type=budget_value, default=None,
                   help="set the per-trial measurement budget yourself: epochs:E, steps:S or samples:N (default: "
                        "planned from --train-budget and --max-cost)")
    p.add_argument("--lr-rule", default="auto", choices=("auto", "none", "linear", "sqrt", "adam-sqrt"),
                   help="LR scaling rule (default: auto by optimizer family)")
    p.add_argument("--wd-rule", dest="weight_decay_rule", default="keep", choices=("keep", "timescale"),
                   help="weight decay across batch sizes: keep it (default) or timescale: hold the AdamW timescale "
                        "B / (lr x weight decay) of the base batch (Wang & Aitchison 2024; Bergsma et al. 2025)")
    p.add_argument("--lr-search", type=c.positive_int, default=1, metavar="N",
                   help="learning rates tried per batch size around the rule's (default 1)")
    p.add_argument("--warmup", type=c.warmup_value, default=0, help="linear warm-up: steps (100) or fraction (0.1)")
    p.add_argument("--target", type=target_value, default=0.97,
                   help="fraction of the best validation metric that counts as reaching the target (default 0.97), "
                        "or an absolute value abs:0.9")
    p.add_argument("--tolerance", type=c.fraction, default=0.01,
                   help="only widens ties: quality differences below this fraction are ties even when measured "
                        "precisely (default 0.01); the decision itself compares 95 %% intervals")
    p.add_argument("--seeds", type=c.positive_int, metavar="N",
                   help="train every configuration with N seeds (--seed, --seed + 1, ...); default: race, one seed "
                        "each, then more only for the batch sizes the data cannot yet tell apart, until the choice "
                        "is stable (at most 3)")
    p.add_argument("--eval-every", type=eval_every_value, default="auto",
                   help="evaluate every N optimizer steps (default auto: 4 per epoch at the smallest batch)")
    p.add_argument("--store", help="Optuna storage URL (default sqlite:///OUT/batchfit.db)")
    p.add_argument("--study", "--study-name", dest="study_name", metavar="NAME",
                   help="Optuna study name (default: derived from the sweep settings, so re-running resumes)")
    p.add_argument("--memory-budget", type=c.memory_size,
                   help="memory budget for the finder, e.g. 512MiB (not with --no-find: the finder applies it)")
    p.add_argument("--max-batch-size", type=c.positive_int, help="largest batch size to consider")
    p.add_argument("--retry-failed", action="store_true",
                   help="run the sweep's failed trials again, once per run (interrupted trials always are)")
    p.add_argument("--margin", type=c.fraction, default=0.05, help="finder headroom margin (default 0.05)")
    p.add_argument("--noise-steps", type=c.positive_int, default=DEFAULT_NOISE_STEPS,
                   help=f"most batches for the B_simple probe (default {DEFAULT_NOISE_STEPS})")
    p.add_argument("--no-find", action="store_true", help="skip the finder (micro-batch = the effective batch)")
    p.add_argument("--no-noise", action="store_true", help="skip the B_simple probe")
    p.add_argument("--no-precision-check", action="store_true", help="skip the short fp32 vs bf16 measurement")
    p.add_argument("--batch-schedule-check", action="store_true",
                   help="also compare a batch-size warm-up derived from the measured local critical batch with the "
                        "best fixed batch (>= 3 seeds each; docs/batch-schedule.md)")
    p.add_argument("--no-lr-calibration", action="store_true",
                   help="trust the workload's base LR (skip the short check of x1/4 ... x8 at the base batch)")
    p.add_argument("--sharpness", action="store_true", help="measure the top Hessian eigenvalue of each final model")
    c.add_runtime_options(p)
    c.add_parallel_option(p)
    p.add_argument("--out", type=Path, default=Path("batchfit-out"), metavar="DIR",
                   help="write find.json, noise.json, the store, results.json and the report here "
                        "(default ./batchfit-out)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write results + recommendation as JSON to PATH")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress display and no table: only the one-line recommendation")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.set_defaults(handler=run)


class _Live:
    """A rich progress display fed by tune's progress events: one line per stage, and one for the running trial."""

    def __init__(self, args: argparse.Namespace) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = c.console(args)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[stage]:<9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), console=self.console, disable=args.quiet,
        )
        self.tasks: dict[str, Any] = {}
        self.started = False

    def __enter__(self) -> _Live:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            self.progress.stop()

    def _task(self, stage: str, total: int | None = None) -> Any:
        if not self.started:  # start at the first stage, so input errors print as one clean line
            self.progress.start()
            self.started = True
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total or 1, stage=stage, info="")
        elif total:
            self.progress.update(self.tasks[stage], total=total)
        return self.tasks[stage]

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "record":
            self._record(event)
            return
        if event.stage not in STAGES:  # the finder's or a trial's own events: shown through their stage's line
            return
        task = self._task(event.stage, event.total)
        update: dict[str, Any] = {}
        if event.completed is not None:
            update["completed"] = event.completed
        if event.kind == "end":
            update["completed"] = self.progress.tasks[task].total or 1
            update["info"] = f"[green]done[/]: {event.message}"
        elif event.message:
            update["info"] = event.message
        self.progress.update(task, **update)

    def _record(self, event: ProgressEvent) -> None:
        """The sweep's running trial: its batch, LR and steps."""
        data = event.data
        if event.stage != "sweep":
            return
        if data.get("event") == "trial_start":
            task = self._task("trial", int(data.get("total_steps") or data.get("steps") or 1))
            self.progress.update(task, completed=0, info=f"batch {data.get('batch_size')} (micro "
                                 f"{data.get('micro_batch_size')} x {data.get('accumulation_steps')}), lr "
                                 f"{data.get('lr') or 0:.3g}")
        elif isinstance(data.get("step"), int):
            self.progress.update(self._task("trial", data.get("total_steps")), completed=data["step"])


def run(args: argparse.Namespace) -> int:
    from batchfit.errors import ConfigError
    from batchfit.loading import parse_options
    from batchfit.tuning import tune

    c.check_outputs(args)
    if args.no_find and args.memory_budget is not None:
        raise ConfigError("--memory-budget is only applied by the finder, and --no-find skips it; drop one of the two")
    from batchfit import distributed

    main = distributed.is_main()  # under torchrun rank 0 shows progress and writes; the other ranks follow
    with _Live(args) if main else contextlib.nullcontext() as live:
        result = tune(
            args.workload, workload_options=parse_options(args.workload_option), out_dir=args.out,
            batch_sizes=args.batch_sizes, budget=args.budget, lr_rule=args.lr_rule, lr_search=args.lr_search,
            train_budget=args.train_budget, max_cost=args.max_cost,
            weight_decay_rule=args.weight_decay_rule,
            warmup=args.warmup, target=args.target, storage=args.store, study_name=args.study_name,
            device=args.device, precision=args.precision, seed=args.seed, memory_budget=args.memory_budget,
            batch_size_cap=args.max_batch_size, margin=args.margin, noise_steps=args.noise_steps,
            eval_every=args.eval_every, tolerance=args.tolerance, find=not args.no_find, noise=not args.no_noise,
            precision_check=not args.no_precision_check, lr_calibration=not args.no_lr_calibration,
            batch_schedule_check=getattr(args, "batch_schedule_check", False),
            sharpness=args.sharpness, retry_failed=args.retry_failed, progress=live, seeds=args.seeds,
            parallel=args.parallel,
        )
    if not main:
        return c.EXIT_OK
    data = result.to_dict()
    if args.json:
        c.write_json(args.json, data)
    from batchfit.cli.report import print_summary

    if result.recommendation is not None or not args.quiet:  # -q without one: only the error line below
        print_summary(args, data, result.recommendation)
    if result.recommendation is None:
        check = getattr(result.sweep, "raise_for_status", None)
        if check is not None:
            check()  # every trial failed: one line naming the first error
        raise ConfigError("no recommendation: no trial reached a usable result (every trial failed or diverged; the "
                          "report's table of trials says why); fix the cause and rerun, with --retry-failed for the "
                          "failed trials")
    return c.EXIT_OK
