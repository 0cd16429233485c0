"""``batchfit plan``: peak memory, the largest batch and step time on a named GPU, predicted on this machine."""

from __future__ import annotations

import argparse
from typing import Any

from batchfit.cli import _common as c

__all__ = ["add_parser", "run"]


def _batch_sizes(text: str) -> list[int]:
    """``1,2,4,8`` -> the sorted distinct sizes (empty items are skipped), checked by
    :func:`batchfit.checks.positive_ints`."""
    from batchfit import checks

    parts = [part for part in text.replace(" ", "").split(",") if part]
    return c._checked(checks.positive_ints, [c._whole(part, "sizes like 1,2,4,8") for part in parts],
                      hint="give sizes like 1,2,4,8")


def _gpu(text: str) -> str:
    from batchfit.errors import ConfigError
    from batchfit.planner.devices import lookup

    try:
        return lookup(text).name
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("unknown gpu", "unknown GPU")) from None


def add_parser(sub: Any) -> None:
    from batchfit.planner.devices import gpu_names

    p = sub.add_parser("plan", help="predict memory, the largest batch and step time on a GPU you don't have",
                       description="Trace one training step on PyTorch's meta device (no GPU, no real memory), put "
                                   "in CUDA's kernels by rule (autocast lists, attention kernels, foreach optimizers, "
                                   "allocator rounding, library workspaces) and predict, per batch size, the peak of "
                                   "torch.cuda.max_memory_allocated on that GPU split into parts, the largest batch "
                                   "that fits with the finder's margin, seconds per step and samples/s with an "
                                   "interval (a roofline per operator) and the throughput knee. See docs/plan.md.")
    c.add_workload_options(p)
    p.add_argument("--gpu", type=_gpu, default="H100-80GB", metavar="NAME",
                   help=f"the GPU: {', '.join(gpu_names())} (default H100-80GB)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="fp32, or bf16 / fp16 autocast as 'batchfit train --precision' runs them (default fp32)")
    p.add_argument("--batch-sizes", "-b", type=_batch_sizes, metavar="B1,B2,...",
                   help="(micro-)batch sizes per GPU to report (default: powers of two up to the largest that fits)")
    p.add_argument("--parallel", default="none", choices=("none", "ddp", "fsdp"),
                   help="data parallelism over --world GPUs: ddp (full replicas) or fsdp (full sharding)")
    p.add_argument("--world", dest="world_size", type=c.positive_int, default=1, metavar="N",
                   help="GPUs in the data-parallel group (with --parallel; default 1)")
    p.add_argument("--margin", type=c.fraction, default=0.05,
                   help="headroom kept under the usable memory by the largest batch reported (default 0.05, as find)")
    p.add_argument("--memory", dest="memory_bytes", type=c.memory_size, metavar="SIZE",
                   help="the GPU's memory, e.g. 40GiB (a MIG slice, another driver) instead of the table's")
    p.add_argument("--max-batch-size", type=c.positive_int, metavar="N",
                   help="never consider a batch larger than this (the training set caps too)")
    p.add_argument("--host-op-us", type=c.positive_float, metavar="US",
                   help="the host's time per operator in microseconds, measured on your machine "
                        "(batchfit.planner.calibrate_host; default: the generic constant of docs/plan.md)")
    c.add_output_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from batchfit.planner import plan

    c.check_writable(c.output_paths(args, "plan"))
    if args.parallel != "none" and args.world_size < 2:
        from batchfit.errors import ConfigError

        raise ConfigError(f"--parallel {args.parallel} needs --world N with N >= 2")
    if args.parallel == "none" and args.world_size != 1:
        from batchfit.errors import ConfigError

        raise ConfigError("--world N needs --parallel ddp or --parallel fsdp")
    if args.host_op_us is not None and args.host_op_us >= 1e6:
        from batchfit.errors import ConfigError

        raise ConfigError(f"--host-op-us {args.host_op_us:g} is a second or more per operator; give microseconds "
                          "(e.g. 40)")
    workload = c.load_workload_from_args(args)
    con = c.console(args)
    con.print(f"[bold]batchfit plan[/]: {workload.name} on {args.gpu} ({args.precision}"
              + (f", {args.parallel} x {args.world_size}" if args.parallel != "none" else "") + ")")

    def progress(event: Any) -> None:
        if event.kind in ("start", "update"):
            con.print(f"  {event.message}")

    result = plan(workload, gpu=args.gpu, precision=args.precision, batch_sizes=args.batch_sizes,
                  parallel=args.parallel, world_size=args.world_size, margin=args.margin,
                  memory_bytes=args.memory_bytes, batch_size_cap=args.max_batch_size, progress=progress,
                  host_op_seconds=None if args.host_op_us is None else args.host_op_us * 1e-6)
    data = result.to_dict()
    data["status"] = "ok"
    c.emit(args, "plan", data)
    _print_summary(args, result)
    return c.EXIT_OK


def _print_summary(args: argparse.Namespace, result: Any) -> None:
    from rich.table import Table

    from batchfit.memory import format_bytes

    con = c.console(args)
    table = Table(title=f"batchfit plan: {result.workload} on {result.gpu} ({result.precision})",
                  title_justify="left")
    for col in ("batch", "peak", "params", "grads", "optimizer", "activations", "other", "workspace", "peak at",
                "step (low-high)", "samples/s", "fits"):
        table.add_column(col, justify="right")
    for p in result.points:
        parts = p["parts"]
        other = parts["optimizer_temporaries"] + parts["inputs"]
        st = p["step_seconds"]
        table.add_row(str(p["batch_size"]), format_bytes(p["peak_bytes"]), format_bytes(parts["parameters"]),
                      format_bytes(parts["gradients"]), format_bytes(parts["optimizer_state"]),
                      format_bytes(parts["activations"]), format_bytes(other), format_bytes(parts["workspace"]),
                      f"{p['peak_phase']} ({p['peak_op']})",
                      f"{_ms(st['estimate'])} ({_ms(st['low'])}-{_ms(st['high'])})", f"{p['samples_per_s']:.0f}",
                      "[green]yes[/]" if p["fits"] else "[red]no[/]")
    con.print(table)
    con.print(f"memory {format_bytes(result.memory_bytes)}, usable {format_bytes(result.usable_bytes)} (less the "
              f"CUDA context); peak ~ {format_bytes(result.fixed_bytes)} + {format_bytes(result.per_sample_bytes)} x B")
    con.print(f"largest batch with {result.margin:.0%} headroom: [bold green]{result.max_batch_size}[/] "
              f"(limited by {result.limited_by}; {result.limit_batch_size} with none)")
    if result.throughput_knee_batch_size is not None:
        con.print(f"throughput knee: [bold]{result.throughput_knee_batch_size}[/] (smallest batch with >= 95 % of the "
                  "best predicted samples/s)")
    kernels = ", ".join(f"{k} x{v}" for k, v in result.rules["kernels"].items())
    if kernels:
        con.print(f"CUDA rules applied: {kernels}")
    for note in result.notes:
        con.print(f"[yellow]note[/]: {note}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"
