"""``batchfit find``: the largest batch that fits (predicted from a few probes, then verified) and the fastest one."""

from __future__ import annotations

import argparse
from typing import Any

from batchfit.cli import _common as c

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("find", help="find the largest batch that fits, the recommended one and the throughput knee",
                       description="Fit peak memory = fixed + per-sample x B from a few real probes, verify the "
                                   "predicted largest batch with real optimizer steps (bisecting only where the "
                                   "prediction fails), keep a headroom margin, size evaluation separately and time "
                                   "samples/s at powers of two to find the knee.")
    c.add_workload_options(p)
    p.add_argument("--memory-budget", type=c.memory_size, metavar="SIZE",
                   help="stay within this much memory, e.g. 512MiB (CPU: counted live tensor bytes; default: the "
                        "memory available now)")
    p.add_argument("--max-batch-size", type=c.positive_int, metavar="N",
                   help="never try a batch larger than this (the cap; the result's max_batch_size is the largest "
                        "batch found)")
    p.add_argument("--margin", type=c.fraction, default=0.05,
                   help="headroom kept by the recommended batch, as a fraction of the limit (default 0.05)")
    p.add_argument("--no-throughput", action="store_true", help="skip timing samples/s (no knee)")
    c.add_runtime_options(p)
    c.add_parallel_option(p)
    c.add_output_options(p)
    p.set_defaults(handler=run)


def _fmt_row(r: dict[str, Any]) -> tuple[str, ...]:
    from batchfit.memory import format_bytes

    ok = "[green]yes[/]" if r["ok"] else "[red]no[/]"
    sps = "-" if r.get("samples_per_s") is None else f"{r['samples_per_s']:.0f}"
    return str(r["batch_size"]), r["phase"], format_bytes(r.get("peak_bytes")), sps, ok


def run(args: argparse.Namespace) -> int:
    from batchfit.finder import find_batch_size

    c.check_writable(c.output_paths(args, "find"))
    workload = c.load_workload_from_args(args)
    con = c.console(args)
    partial: dict[str, Any] = {"workload": workload.name, "status": "running", "probes": []}

    def progress(event: Any) -> None:  # each trial shown and saved as it completes
        if event.kind != "record":
            return
        partial["probes"].append(event.data)
        c.emit(args, "find", partial)
        batch, phase, peak, sps, ok = _fmt_row(event.data)
        con.print(f"  {phase:<10} batch {batch:>7}  peak {peak:>10}  samples/s {sps:>8}  ok {ok}")

    con.print(f"[bold]batchfit find[/]: {workload.name} on {args.device} ({args.precision})")
    try:
        result = find_batch_size(
            workload,
            device=args.device,
            precision=args.precision,
            memory_budget=args.memory_budget,
            batch_size_cap=args.max_batch_size,
            margin=args.margin,
            throughput=not args.no_throughput,
            seed=args.seed,
            progress=progress,
            parallel=args.parallel,
        )
    except KeyboardInterrupt:  # the trials that finished stay in the file, which says it was interrupted
        partial["status"] = "interrupted"
        c.emit(args, "find", partial)
        raise
    data = result.to_dict()
    data["status"] = "ok"
    c.emit(args, "find", data)
    _print_summary(args, result)
    return c.EXIT_OK


def _print_summary(args: argparse.Namespace, result: Any) -> None:
    from rich.table import Table

    from batchfit.memory import format_bytes

    con = c.console(args)
    table = Table(title=f"batchfit find: {result.workload} ({result.device}, {result.precision})",
                  title_justify="left")
    for col in ("batch", "phase", "peak memory", "samples/s", "ok"):
        table.add_column(col, justify="right")
    for r in sorted(result.probes, key=lambda r: (r["phase"] == "eval", r["batch_size"])):
        table.add_row(*_fmt_row(r))
    con.print(table)
    limit = (f"budget {format_bytes(result.memory_budget_bytes)}" if result.memory_budget_bytes is not None
             else f"available {format_bytes(result.memory_limit_bytes)}")
    mm = result.memory_model
    model = ("" if mm.get("per_sample_bytes") is None else
             f"; peak = {format_bytes(mm['fixed_bytes'])} + {format_bytes(mm['per_sample_bytes'])} x B")
    con.print(f"largest batch that fits: [bold]{result.max_batch_size}[/] (limited by {result.limited_by}, "
              f"{limit}{model}); {result.real_trials} real trials, {result.seconds:.1f} s")
    con.print(f"recommended batch: [bold green]{result.recommended_batch_size}[/] "
              f"({result.margin:.0%} headroom)")
    if result.throughput_knee_batch_size is not None:
        con.print(f"throughput knee: [bold]{result.throughput_knee_batch_size}[/] (smallest batch with >= 95 % of "
                  "the best samples/s; the better choice when memory is plentiful)")
    if result.eval_batch_size is not None:
        con.print(f"evaluation batch: {result.eval_batch_size} (sized on its own; pass --eval-batch-size to train)")
    shard = result.extras.get("sharding")
    if shard:
        by_world = ", ".join(f"{w}: {b}" for w, b in shard["per_rank_max_by_world"].items() if int(w) <= 16)
        con.print(f"per rank, FSDP over {shard['world_size']} ranks: sharded state "
                  f"{format_bytes(shard['sharded_state_bytes'])}, largest gathered unit "
                  f"{format_bytes(shard['largest_unit_bytes'])}, activations "
                  f"{format_bytes(shard['activation_bytes_per_sample'])}/sample; predicted largest batch per rank "
                  f"by world size: {by_world}")
    split = result.extras.get("global_batch")
    if split:
        con.print(f"the base batch {split['batch_size']} = micro-batch {split['micro_batch_size']} x accumulation "
                  f"{split['accumulation_steps']} x world {split['world_size']} (same global batch and LR on any "
                  "world size: the accumulation adjusts)")
