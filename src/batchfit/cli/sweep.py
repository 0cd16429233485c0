"""``batchfit sweep``: train every candidate batch size on an equal budget, persisted in an Optuna store.

Re-running the same command resumes the study: finished trials are not re-run, a trial killed mid-way is re-run.
"""

from __future__ import annotations

import argparse
from typing import Any

from batchfit.cli import _common as c

__all__ = ["add_parser", "run"]


def _wrap(parse: Any) -> Any:
    """An argparse type from a batchfit parser: its ConfigError becomes argparse's one-line usage error."""

    def convert(text: str) -> Any:
        from batchfit.errors import ConfigError

        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _batch_sizes(text: str) -> list[int]:
    from batchfit.study import parse_batch_sizes

    return parse_batch_sizes(text)


def _budget(text: str) -> Any:
    from batchfit.study import parse_budget

    return parse_budget(text)


def _target(text: str) -> dict[str, Any]:
    from batchfit.study import parse_target

    return parse_target(text)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sweep", help="train each candidate batch size (and LR) on an equal budget; persisted, resumable",
        description="Train every candidate effective batch size with its LR scaled by the rule (and, with "
                    "--lr-search, a few LRs around it), on an equal budget, and measure validation quality, speed, "
                    "memory, steps to a target, B_simple and the critical batch size. Every evaluation is stored in "
                    "an Optuna study as it happens; the same command again resumes it.")
    c.add_workload_options(p)
    p.add_argument("--batch-sizes", "-b", type=_wrap(_batch_sizes), metavar="B1,B2,...",
                   help="effective batch sizes, e.g. 16,32,64 (default: powers of two from 16 up to what fits, "
                        "extended by accumulation, plus B=1 and full batch on small data sets)")
    p.add_argument("--budget", type=_wrap(_budget), default="epochs:5",
                   help="the same budget for every trial: epochs:E, steps:S or samples:N (default epochs:5)")
    p.add_argument("--lr-rule", default="auto", choices=("auto", "none", "linear", "sqrt", "adam-sqrt"),
                   help="scale the workload's base LR to each batch size (default: auto by optimizer family)")
    p.add_argument("--wd-rule", dest="weight_decay_rule", default="keep", choices=("keep", "timescale"),
                   help="weight decay across batch sizes: keep it (default) or timescale: hold the AdamW timescale "
                        "B / (lr x weight decay) of the base batch (Wang & Aitchison 2024; Bergsma et al. 2025)")
    p.add_argument("--seeds", type=c.positive_int, default=1, metavar="N",
                   help="train every configuration with N seeds (--seed, --seed + 1, ...), each a trial of the "
                        "study; rerunning with more seeds adds only the missing ones (default 1)")
    p.add_argument("--lr-search", type=c.positive_int, default=1, metavar="N",
                   help="N learning rates per batch size around the scaled one (x1/2, x1, x2, ...; at most 16); "
                        "the best is kept. A batch size outside the adam-sqrt rule's range gets at least 3")
    p.add_argument("--warmup", type=c.warmup_value, default=0, help="linear warm-up: steps (100) or fraction (0.1)")
    p.add_argument("--target", type=_wrap(_target), default="0.97",
                   help="steps-to-target goal: a fraction of the best validation metric any trial reached (0.97, "
                        "the default) or an absolute value (abs:0.9)")
    p.add_argument("--store", metavar="URL",
                   help="Optuna storage URL (default sqlite:///<out or .>/batchfit.db); postgresql://... works too")
    p.add_argument("--study", metavar="NAME", help="study name (default: derived from the settings, so the same "
                                                   "command resumes the same study)")
    p.add_argument("--micro-batch-size", "--micro-batch-limit", "-m", dest="micro_batch_size", type=c.positive_int,
                   help="the sweep's micro-batch memory limit: the largest micro-batch that fits; larger batches "
                        "use gradient accumulation (default: from the finder)")
    p.add_argument("--eval-every", type=c.positive_int, help="evaluate every N steps (default ~16 per trial)")
    p.add_argument("--sharpness", action="store_true",
                   help="measure the top Hessian eigenvalue of each final model (power iteration)")
    p.add_argument("--no-noise", action="store_true",
                   help="do not measure B_simple during training (batches then run unsplit: cleaner throughput)")
    p.add_argument("--no-extremes", action="store_true", help="no B=1 / full-batch candidates by default")
    p.add_argument("--retry-failed", action="store_true",
                   help="also re-run trials that failed with an error, once per run")
    c.add_runtime_options(p)
    c.add_parallel_option(p)
    c.add_output_options(p)
    p.set_defaults(handler=run)


class _Display:
    """A rich live display of the sweep's progress events: one bar over trials, one over the current trial's
    steps; the JSON and the report are rewritten after every trial."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.progress: Any = None
        self.sweep_task: Any = None
        self.trial_task: Any = None

    def __call__(self, event: Any) -> None:
        handler = getattr(self, f"_on_{event.data.get('event')}", None)
        if handler is not None:
            handler(event)

    def _on_start(self, ev: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        con = c.console(self.args)
        info = ev.data
        sizes = ", ".join(map(str, info["batch_sizes"]))
        mults = ", ".join(f"x{m:g}" for m in info["lr_multipliers"])
        wide = info.get("lr_multipliers_by_batch") or {}
        if wide:  # batch sizes outside the LR rule's range search their LR (batchfit.study.lr_multipliers_by_batch)
            mults += (f" (batch {', '.join(wide)}: outside the rule's range, "
                      f"{', '.join(f'x{m:g}' for m in next(iter(wide.values())))})")
        con.print(f"[bold]sweep[/] {info['study_name']} in {info['storage']}")
        kept = int(info.get("failed_kept") or 0)
        note = f"; {kept} failed trial(s) kept; rerun with --retry-failed to run them again" if kept else ""
        con.print(f"batch sizes {sizes}; LR {mults}; budget {info['budget']['kind']}:{info['budget']['value']}; "
                  f"micro-batch limit {info.get('micro_batch_limit') or 'none'}; {ev.completed} of {ev.total} "
                  f"trial(s) already done{note}")
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 console=con, disable=bool(self.args.quiet))
        self.progress.start()
        self.sweep_task = self.progress.add_task("trials", total=ev.total, completed=ev.completed, info="")

    def _on_trial_start(self, ev: Any) -> None:
        if self.progress is None:
            return
        info = ev.data
        desc = (f"B={info['batch_size']} ({info['micro_batch_size']}x{info['accumulation_steps']}) "
                f"lr {info.get('lr', 0):.3g}")
        if self.trial_task is not None:
            self.progress.remove_task(self.trial_task)
        self.trial_task = self.progress.add_task(desc, total=int(info.get("total_steps") or info["steps"]), info="")

    def _on_step(self, ev: Any) -> None:
        if self.progress is not None and self.trial_task is not None:
            self.progress.update(self.trial_task, completed=ev.data["step"])

    def _on_eval(self, ev: Any) -> None:
        if self.progress is not None and self.trial_task is not None and ev.data.get("metric") is not None:
            self.progress.update(self.trial_task, info=f"val {ev.data['metric']:.4f}")

    def _on_trial_end(self, ev: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.sweep_task, completed=ev.completed,
                                 info=f"last: B={ev.data['batch_size']} {ev.data.get('status')}")
        results = ev.data.get("results")
        if results is not None:  # nothing computed is lost: the JSON and the report follow every trial
            data = results.to_dict()
            c.emit(self.args, "sweep", data)
            _write_report(self.args, data, plots=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _write_report(args: argparse.Namespace, results: dict[str, Any], plots: bool = True) -> Any:
    if not getattr(args, "out", None):
        return None
    try:
        from batchfit.report import write_report
    except ImportError:  # the report module is optional for the sweep
        return None
    return write_report(results, args.out, plots=plots)


def run(args: argparse.Namespace) -> int:
    from batchfit.study import sweep

    c.check_writable(c.output_paths(args, "sweep"))
    workload = c.load_workload_from_args(args)
    display = _Display(args)
    try:
        result = sweep(
            workload, batch_sizes=args.batch_sizes, budget=args.budget, lr_rule=args.lr_rule,
            weight_decay_rule=args.weight_decay_rule, lr_search=args.lr_search, warmup=args.warmup,
            target=args.target, storage=args.store,
            study_name=args.study, micro_batch_limit=args.micro_batch_size, device=args.device,
            precision=args.precision, seed=args.seed, measure_noise=not args.no_noise, sharpness=args.sharpness,
            seeds=args.seeds, eval_every=args.eval_every, progress=display, out_dir=args.out,
            retry_failed=args.retry_failed, extremes=not args.no_extremes, parallel=args.parallel,
        )
    finally:
        display.close()
    from batchfit import distributed

    if not distributed.is_main():  # under torchrun rank 0 writes and prints
        return c.EXIT_OK
    results = result.to_dict()
    c.emit(args, "sweep", results)
    paths = _write_report(args, results)
    _print_summary(args, results, paths)
    result.raise_for_status()  # every trial failed: exit 2 naming the first error (the results are written)
    return c.EXIT_OK


def _print_summary(args: argparse.Namespace, results: dict[str, Any], paths: Any) -> None:
    from rich.table import Table

    from batchfit.memory import format_bytes

    con = c.console(args)
    primary = results["primary_metric"]
    table = Table(title=f"batchfit sweep: {results['workload']} ({results['budget']['kind']}:"
                        f"{results['budget']['value']})", title_justify="left")
    trials = results["trials"]
    show_bs = any(t["b_simple"] is not None for t in trials)
    show_sharp = any(t["sharpness"] is not None for t in trials)
    cols = ["B", "micro x acc", "lr", "status", f"best {primary}", "gap", "steps to tgt", "epochs to tgt",
            "s to tgt", "samples/s", "peak mem"] + ["B_simple"] * show_bs + ["sharpness"] * show_sharp
    for col in cols:
        table.add_column(col, justify="right")

    def num(x: Any, fmt: str) -> str:
        return "-" if not isinstance(x, (int, float)) else format(x, fmt)

    best = {id(t) for t in results["best_per_batch"]}
    for t in trials:
        style = "bold" if id(t) in best and len(results["trials"]) > len(results["best_per_batch"]) else None
        row = [
            str(t["batch_size"]), f"{t['micro_batch_size'] or '-'} x {t['accumulation_steps'] or '-'}",
            num(t["lr"], ".3g"), t["status"], num(t.get("best_metric"), ".4f"), num(t["generalization_gap"], "+.3f"),
            num(t["steps_to_target"], ".4g"), num(t["epochs_to_target"], ".3g"), num(t["seconds_to_target"], ".3g"),
            num(t["samples_per_s"], ".0f"), format_bytes(t["peak_memory_bytes"]),
        ] + [num(t["b_simple"], ".3g")] * show_bs + [num(t["sharpness"], ".3g")] * show_sharp
        table.add_row(*row, style=style)
    con.print(table)
    con.print(f"target: {results['target']['definition']}")
    crit = results.get("critical_batch_size")
    if crit:
        con.print(f"critical batch B_crit = {crit['b_crit']:.4g} (S_min {crit['s_min']:.4g} steps, fit R^2 "
                  f"{crit['r2']:.3f} over {len(crit['points'])} batch sizes)")
    else:
        con.print(f"critical batch: not fitted: {results.get('critical_batch_size_reason')}")
    from batchfit import noise as nz

    curve = nz.b_simple_against_loss(nz.noise_records(results["trials"]))
    if curve:  # B_simple grows as the loss falls: it is stated at a training loss, pooled over every trial
        con.print("B_simple against the training loss (pooled over trials, 95 % bootstrap): " + "; ".join(
            f"loss {p.train_loss:.3g}: {p.b_simple.estimate:.3g}"
            + (f" [{p.b_simple.low:.3g}, {p.b_simple.high:.3g}]" if p.b_simple.known else "") for p in curve))
    elif results.get("b_simple") is not None:
        con.print(f"B_simple during training (median over batch sizes of each run's median, not at a stated "
                  f"training loss): {results['b_simple']:.4g}")
    failed = [t for t in results["trials"] if t["status"] in ("failed", "diverged")]
    for t in failed:
        con.print(f"[yellow]B={t['batch_size']} lr {num(t['lr'], '.3g')}: {t['status']}: {t['error']}[/]")
    n_failed = sum(1 for t in failed if t["status"] == "failed")
    if n_failed and not args.retry_failed:
        con.print(f"{n_failed} failed trial(s) kept; rerun with --retry-failed to run them again")
    con.print(f"store {results['storage']}, study {results['study_name']} (run the same command to resume)")
    if paths:
        con.print(f"report: {paths.get('html')}")
    for path in c.output_paths(args, "sweep"):
        con.print(f"results: {path}")
