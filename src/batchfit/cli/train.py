"""``batchfit train``: one training run at one batch size, measured (the guides' "train with 64, then 32")."""

from __future__ import annotations

__all__ = ["add_parser", "run"]

import argparse
from pathlib import Path
from typing import Any

from batchfit.cli import _common as c


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train once at a batch size and measure it",
                       description="Train the workload at one effective batch size and measure loss, validation "
                                   "metrics, throughput and peak memory.")
    c.add_workload_options(p)
    p.add_argument("--batch-size", "-b", type=c.positive_int, help="effective batch size (default: the workload's)")
    p.add_argument("--micro-batch-size", "-m", type=c.positive_int,
                   help="samples per forward/backward; gradient accumulation makes up the rest")
    lr = p.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=c.positive_float, help="a fixed learning rate (no scaling rule)")
    lr.add_argument("--lr-rule", default="auto", choices=("auto", "none", "linear", "sqrt", "adam-sqrt"),
                    help="scale the workload's base LR to the batch size (default: auto by optimizer family)")
    p.add_argument("--wd-rule", dest="weight_decay_rule", default="keep", choices=("keep", "timescale"),
                   help="weight decay across batch sizes: keep it (default) or timescale: hold the AdamW timescale "
                        "B / (lr x weight decay) of the base batch (Wang & Aitchison 2024; Bergsma et al. 2025)")
    p.add_argument("--warmup", type=c.warmup_value, default=0, help="linear warm-up: steps (100) or fraction (0.1)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=c.positive_int, help="epochs to train (default 1)")
    budget.add_argument("--steps", type=c.positive_int, help="optimizer steps to train")
    p.add_argument("--eval-every", type=c.positive_int, help="also evaluate every N optimizer steps")
    p.add_argument("--eval-batch-size", type=c.positive_int, help="evaluation batch size (default max(micro, 256))")
    p.add_argument("--grad-clip", type=c.positive_float,
                   help="clip the global gradient norm to this value (default: the workload's grad_clip)")
    p.add_argument("--no-drop-last", action="store_true", help="keep the last, smaller batch of each epoch")
    p.add_argument("--measure-noise", action="store_true",
                   help="record the gradient noise scale B_simple at each evaluation (needs >= 2 micro-batches; "
                        "without --micro-batch-size each batch is split in 2; with --batch-schedule the first "
                        "phase's batch is, and larger phases accumulate more micro-batches of that size)")
    p.add_argument("--memory-budget", type=c.memory_size, metavar="SIZE",
                   help="train inside this memory budget, e.g. 512MiB (the one `batchfit find` used)")
    sched = p.add_argument_group("batch-size schedule (docs/batch-schedule.md)")
    sched.add_argument("--batch-schedule", metavar="SPEC",
                       help="the batch over training: STEP:BATCH,... e.g. 0:32,500:64,1500:128 (integer factors), or "
                            "'auto': measure the local critical batch by branching first, then follow it")
    sched.add_argument("--micro-batch-limit", type=c.positive_int, metavar="N",
                       help="the largest micro-batch (the one `batchfit find` found): larger phases accumulate")
    sched.add_argument("--beta2", choices=("power", "sde", "keep"),
                       help="Adam's beta2 at a change by k: beta2^k (power, the default), 1 - k(1 - beta2) or keep")
    sched.add_argument("--weight-decay-timescale", action="store_true",
                       help="keep the AdamW timescale B / (lr x weight decay x N) constant across changes")
    sched.add_argument("--checkpoint", type=Path, metavar="PATH",
                       help="write a resumable checkpoint here (every --checkpoint-every steps and at the end)")
    sched.add_argument("--checkpoint-every", type=c.positive_int, metavar="N", help="checkpoint every N steps")
    sched.add_argument("--resume", type=Path, metavar="PATH",
                       help="continue the run saved in this checkpoint, with the same arguments (any argument that "
                            "changes the result, --steps included, must match; a mismatch is named)")
    c.add_runtime_options(p)
    c.add_parallel_option(p)
    c.add_output_options(p)
    p.set_defaults(handler=run)


class _Progress:
    """A rich progress bar over optimizer steps, and the JSON rewritten after every evaluation."""

    def __init__(self, args: argparse.Namespace, partial: dict[str, Any]) -> None:
        self.args = args
        self.partial = partial
        self.progress = None
        self.task = None

    def on_train_start(self, state: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        con = c.console(self.args)
        con.print(
            f"[bold]{state.workload.name}[/]: effective batch {state.batch_size} = micro-batch "
            f"{state.micro_batch_size} x accumulation {state.accumulation_steps} x world {state.world_size}; "
            f"lr {state.optimizer.param_groups[0]['lr']:.4g}; {state.total_steps} steps on {state.device}"
        )
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                 console=con, transient=False, disable=self.args.quiet)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.total_steps, info="")

    def on_step_end(self, state: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.step)

    def on_evaluate(self, state: Any, record: dict[str, Any]) -> None:
        self.partial["history"].append(record)
        c.emit(self.args, "train", self.partial)
        if self.progress is not None:
            metrics = " ".join(f"{k} {v:.4f}" for k, v in (record.get("val_metrics") or {}).items())
            val = record.get("val_loss")
            info = f"loss {record['train_loss']:.4f}" + (f" val {val:.4f} {metrics}" if val is not None else "")
            self.progress.update(self.task, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def run(args: argparse.Namespace) -> int:
    from batchfit.engine import train

    c.check_writable(c.output_paths(args, "train"))
    workload = c.load_workload_from_args(args)
    partial: dict[str, Any] = {"workload": workload.name, "status": "running", "history": []}
    progress = _Progress(args, partial)
    callbacks: list[Any] = [progress]
    kwargs: dict[str, Any] = {}
    if getattr(args, "memory_budget", None) is not None:
        kwargs["memory_budget"] = args.memory_budget
    for key in ("batch_schedule", "micro_batch_limit", "beta2", "checkpoint", "checkpoint_every"):
        if getattr(args, key, None) is not None:
            kwargs[key] = getattr(args, key)
    if getattr(args, "weight_decay_timescale", False):
        kwargs["weight_decay_timescale"] = True
    if getattr(args, "resume", None) is not None:
        kwargs["resume_from"] = args.resume
    batch_size = args.batch_size
    from batchfit import distributed

    world = distributed.world_size()
    if world > 1:  # torchrun: --batch-size is the effective (global) batch; the engine takes the per-rank share
        from batchfit.errors import ConfigError

        global_batch = batch_size or workload.base_batch_size
        if global_batch % world:
            raise ConfigError(
                f"batch size {global_batch} does not split evenly over {world} ranks; give a multiple of {world}"
            )
        batch_size = global_batch // world
        kwargs["world_size"] = world
        if kwargs.get("batch_schedule") not in (None, "auto"):  # the schedule's batches are global too
            from batchfit.schedule import Phase, parse_schedule

            phases = parse_schedule(kwargs["batch_schedule"])
            if any(p.batch_size % world for p in phases):
                raise ConfigError(f"--batch-schedule batches must split evenly over {world} ranks")
            kwargs["batch_schedule"] = [Phase(p.step, p.batch_size // world) for p in phases]
            if args.batch_size is None:
                batch_size = None
    micro_batch_size = args.micro_batch_size
    if getattr(args, "measure_noise", False):  # B_simple per evaluation (batchfit.noise); before _Progress writes
        from batchfit.noise import NoiseCallback, training_micro_batch_size

        first = batch_size or workload.base_batch_size
        schedule = kwargs.get("batch_schedule")
        if schedule is not None and schedule != "auto":  # a schedule: its first phase is the smallest batch
            from batchfit.schedule import parse_schedule

            first = parse_schedule(schedule)[0].batch_size
        micro_batch_size = training_micro_batch_size(first, micro_batch_size, world)
        if schedule is not None and micro_batch_size is not None:  # every phase splits into >= 2 micro-batches
            limit = kwargs.get("micro_batch_limit")
            kwargs["micro_batch_limit"] = micro_batch_size if limit is None else min(limit, micro_batch_size)
        callbacks.insert(0, NoiseCallback())
    try:
        result = _train_or_explain(
            train,
            workload,
            batch_size=batch_size,
            micro_batch_size=micro_batch_size,
            lr=args.lr,
            lr_rule=args.lr_rule,
            weight_decay_rule=args.weight_decay_rule,
            warmup=args.warmup,
            epochs=args.epochs,
            steps=args.steps,
            precision=args.precision,
            device=args.device,
            seed=args.seed,
            drop_last=not args.no_drop_last,
            eval_batch_size=args.eval_batch_size,
            eval_every=args.eval_every,
            grad_clip=args.grad_clip,
            callbacks=callbacks,
            parallel=args.parallel,
            **kwargs,
        )
    except KeyboardInterrupt:  # what was evaluated so far stays in the JSON, marked as such (not "running")
        partial["status"] = "interrupted"
        c.emit(args, "train", partial)
        raise
    except Exception as exc:  # an error after some work: the JSON keeps what was evaluated and says it failed
        if partial["history"]:
            partial.update(status="failed", error=" ".join(str(exc).split())[:500] or type(exc).__name__)
            c.emit(args, "train", partial)
        raise
    finally:
        progress.close()
    data = result.to_dict()
    data["status"] = "diverged" if result.diverged else "ok"
    c.emit(args, "train", data)
    _print_summary(args, result)
    if getattr(args, "measure_noise", False):
        from batchfit.cli.noise import print_training_noise

        print_training_noise(args, result)
    return c.EXIT_OK


def _train_or_explain(train: Any, workload: Any, **kwargs: Any) -> Any:
    """Run ``train``; an out-of-memory error in training is the user's batch choice: one line, exit 2."""
    from batchfit import memory
    from batchfit.errors import ConfigError

    try:
        return train(workload, **kwargs)
    except Exception as exc:
        if not memory.is_oom(exc):
            raise
        line = (str(exc).splitlines() or ["out of memory"])[0][:200]
        batch = kwargs.get("batch_size") or workload.base_batch_size
        raise ConfigError(
            f"out of memory training at --batch-size {batch} ({line}); lower --batch-size, add --micro-batch-size "
            "or raise --memory-budget (batchfit find measures what fits)"
        ) from None


def _print_summary(args: argparse.Namespace, result: Any) -> None:
    from rich.table import Table

    from batchfit.memory import format_bytes

    con = c.console(args)
    table = Table(title=f"batchfit train: {result.workload}", title_justify="left")
    for col in ("epoch", "step", "train loss", "val loss", "val metrics", "gap", "samples/s"):
        table.add_column(col, justify="right")
    for r in result.history:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in (r.get("val_metrics") or {}).items())
        table.add_row(
            f"{r['epoch']:g}", str(r["step"]), f"{r['train_loss']:.4f}",
            "-" if r.get("val_loss") is None else f"{r['val_loss']:.4f}", metrics or "-",
            "-" if r.get("generalization_gap") is None else f"{r['generalization_gap']:+.4f}",
            "-" if r.get("samples_per_s") is None else f"{r['samples_per_s']:.0f}",
        )
    con.print(table)
    reason = result.extras.get("diverged_reason", "non-finite loss")
    status = (f"[red]diverged at step {result.diverged_at_step}[/] ({reason}): lower the LR or add warm-up"
              if result.diverged else "[green]ok[/]")
    con.print(
        f"{status}; batch {result.batch_size} (micro {result.micro_batch_size} x {result.accumulation_steps}), "
        f"lr {result.lr:.4g} ({result.lr_rule}), {result.precision}; peak memory "
        f"{format_bytes(result.peak_memory_bytes)}; {result.samples_per_s or 0:.0f} samples/s; "
        f"{result.seconds:.1f} s"
    )
