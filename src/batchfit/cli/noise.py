"""``batchfit noise``: the gradient noise scale B_simple at fixed parameters, with a confidence interval."""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from batchfit.cli import _common as c

__all__ = ["add_parser", "print_training_noise", "run"]


def _rel_ci(text: str) -> float:
    """A fraction in (0, 1), checked as the library checks ``rel_ci`` (:func:`batchfit.checks.fraction`)."""
    from batchfit import checks

    return c._checked(checks.fraction, c._number(text, "a fraction below 1, e.g. 0.1 for ±10 %"),
                      hint="give e.g. 0.1 for ±10 %")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "noise", help="measure the gradient noise scale (a guide to the critical batch size)",
        description="Estimate the gradient noise scale B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018) at fixed "
                    "parameters from micro-batch and batch gradient norms; it stops when the 95% interval is "
                    "within the --rel-ci fraction of the estimate, or after --steps batches.")
    c.add_workload_options(p)
    p.add_argument("--batch-size", "-b", type=c.positive_int, help="the batch B (default: the workload's; >= 2)")
    p.add_argument("--micro-batch-size", "-m", type=c.positive_int,
                   help="the micro-batch b < B (default: ceil(B/4), i.e. 4 micro-batches)")
    p.add_argument("--steps", type=c.positive_int, default=200, help="at most this many batches (default 200)")
    p.add_argument("--rel-ci", type=_rel_ci, default=0.10,
                   help="stop when the 95%% interval is within ± this fraction (default 0.1)")
    p.add_argument("--train-steps", type=c.nonneg_int, default=0,
                   help="train this many steps first and probe there (default 0: at initialisation)")
    p.add_argument("--lr", type=c.positive_float, help="learning rate of the --train-steps (default: scaled base LR)")
    c.add_runtime_options(p)
    c.add_parallel_option(p)
    c.add_output_options(p)
    p.set_defaults(handler=run)


class _Live:
    """A progress bar over probe steps; the JSON is rewritten after every measured step, so an interrupted probe
    leaves every step it measured in the file (a write costs far less than a probe step)."""

    def __init__(self, args: argparse.Namespace, partial: dict[str, Any]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.args, self.partial = args, partial
        self.progress = Progress(TextColumn("noise"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 console=c.console(args), transient=False, disable=args.quiet)
        self.task = self.progress.add_task("noise", total=args.steps, info="")
        self.progress.start()

    def __call__(self, event: Any) -> None:
        if event.kind != "update":
            return
        info = event.data
        b, ci = info["b_simple"], info["b_simple_ci"]
        text = "B_simple -" if b is None else f"B_simple {b:.4g}"
        if ci is not None:
            text += f" [{ci[0]:.4g}, {ci[1]:.4g}]"
        self.progress.update(self.task, completed=info["step"], info=text)
        self.partial["history"].append({"step": info["step"], "b_simple": b})
        self.partial.update(steps=info["step"], b_simple=b, grad_norm_sq=info["grad_norm_sq"],
                            trace_cov=info["trace_cov"])
        c.emit(self.args, "noise", self.partial)

    def close(self) -> None:
        self.progress.stop()


def run(args: argparse.Namespace) -> int:
    from batchfit.errors import NoisyEstimateWarning
    from batchfit.noise import noise_scale

    c.check_writable(c.output_paths(args, "noise"))
    workload = c.load_workload_from_args(args)
    partial: dict[str, Any] = {"workload": workload.name, "status": "running", "history": []}
    live = _Live(args, partial)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NoisyEstimateWarning)
            result = noise_scale(
                workload, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, steps=args.steps,
                device=args.device, precision=args.precision, seed=args.seed, rel_ci=args.rel_ci,
                train_steps=args.train_steps, lr=args.lr, progress=live, parallel=args.parallel,
            )
    except KeyboardInterrupt:  # every measured step is in the file already; it now says it was interrupted
        partial["status"] = "interrupted"
        c.emit(args, "noise", partial)
        raise
    finally:
        live.close()
    data = result.to_dict()
    data["status"] = "ok" if result.converged else "noisy"
    c.emit(args, "noise", data)

    con = c.console(args)
    low, high = result.b_simple_ci
    where = "at initialisation" if not result.train_steps else f"after {result.train_steps} training steps"
    con.print(
        f"[bold]B_simple {where} = {result.b_simple:.4g}[/] (95% CI {low:.4g} to {high:.4g}) from {result.steps} "
        f"batches of {result.batch_size} (micro-batch {result.micro_batch_size}); |G|^2 {result.grad_norm_sq:.4g}, "
        f"tr(Sigma) {result.trace_cov:.4g}"
    )
    con.print(result.reading(), soft_wrap=True)
    for w in caught:
        if issubclass(w.category, NoisyEstimateWarning):
            con.print(f"[yellow]warning:[/] {w.message}", soft_wrap=True)
    return c.EXIT_OK


def print_training_noise(args: argparse.Namespace, result: Any) -> None:
    """After ``batchfit train --measure-noise``: B_simple at each evaluation, on one line."""
    history = result.extras.get("b_simple_history") or []
    values = ", ".join(
        f"step {h['step']}: {'-' if h['b_simple'] is None else format(h['b_simple'], '.4g')}" for h in history
    )
    c.console(args).print(
        f"B_simple (gradient noise scale, EMA) {values or 'not measured'}; it tends to grow as the loss falls "
        "(see docs/noise.md)", soft_wrap=True,
    )
