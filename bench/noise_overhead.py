"""Noise-scale overhead: training with ``NoiseCallback`` on vs off, at the same micro-batch split.

Both runs use the same seed (same initialisation, same data order), the same batch and micro-batch sizes, and the
same number of optimizer steps; only the measurement differs. Runs are interleaved (off, on, off, on, ...) after
one untimed warm-up pair. ``train_ratio`` is the median on/off of the engine's training time (``train_seconds``:
forward, backward, the callbacks inside the step, optimizer; evaluation excluded); ``train_ratio_min`` the same with
the fastest run of each (robust when other processes share the machine); ``wall_ratio`` and ``cpu_ratio`` compare
the whole ``train`` call by wall-clock and by this thread's CPU time; ``callback_cpu_overhead`` is the CPU time spent
inside the measurement itself (the callback's engine hooks and its per-parameter gradient hooks, timed with
``time.thread_time``) over the CPU time of a run without it: the most robust number on a busy CPU-only machine.
On CUDA the CPU mostly queues kernels, so read ``train_ratio`` there. Target: ratio <= 1.03.

    python bench/noise_overhead.py --workload demo:mnist1d --batch-size 128 --micro-batch-size 64 --steps 60
    python bench/noise_overhead.py --device cuda --precision bf16 --workload demo:gpt-synthetic \\
        -O size=gpt2-small -O seq_len=1024 --batch-size 16 --micro-batch-size 8 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from batchfit.engine import train
from batchfit.loading import load_workload, parse_options
from batchfit.noise import NoiseCallback, _HookMeter


class _ThreadClock:
    """CPU time this thread spends inside the noise callback's engine hooks and its gradient hooks: the cost of
    the measurement itself, robust to other processes on the machine (on CUDA it is host time only)."""

    seconds = 0.0

    @classmethod
    def wrap(cls, fn: Any) -> Any:
        def timed(*a: Any, **kw: Any) -> Any:
            t = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                cls.seconds += time.thread_time() - t

        return timed


class TimedNoiseCallback(NoiseCallback):
    def on_micro_batch_end(self, state: Any) -> None:
        _ThreadClock.wrap(super().on_micro_batch_end)(state)

    def on_before_optimizer_step(self, state: Any) -> None:
        _ThreadClock.wrap(super().on_before_optimizer_step)(state)

    def on_step_end(self, state: Any) -> None:
        _ThreadClock.wrap(super().on_step_end)(state)


def one_run(workload: Any, args: argparse.Namespace, measure: bool) -> dict[str, Any]:
    callbacks = [TimedNoiseCallback(method=args.method)] if measure else []
    _ThreadClock.seconds = 0.0
    t0, c0 = time.perf_counter(), time.thread_time()
    result = train(workload, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, steps=args.steps,
                   device=args.device, precision=args.precision, seed=args.seed, callbacks=callbacks)
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    if result.diverged:
        raise SystemExit(f"the run diverged at step {result.diverged_at_step}; pick a smaller LR or other workload")
    return {"train_seconds": result.train_seconds, "wall_seconds": wall, "cpu_seconds": cpu,
            "callback_cpu_seconds": _ThreadClock.seconds,
            "b_simple": result.extras.get("b_simple"), "peak_memory_bytes": result.peak_memory_bytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="demo:mnist1d")
    p.add_argument("-O", "--workload-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="auto", choices=("auto", "hooks", "copy"), help="NoiseCallback(method=...)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU (default: torch's)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    workload = load_workload(args.workload, **parse_options(args.workload_option))
    _HookMeter._hook = _ThreadClock.wrap(_HookMeter._hook)  # count the per-parameter hooks too
    one_run(workload, args, False)  # warm-up: allocator, kernels, lazy imports
    one_run(workload, args, True)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for r in range(args.repeats):
        for measure in ((False, True) if r % 2 == 0 else (True, False)):
            runs[measure].append(one_run(workload, args, measure))

    def med(measure: bool, key: str) -> float:
        return statistics.median(x[key] for x in runs[measure])

    def mn(measure: bool, key: str) -> float:
        return min(x[key] for x in runs[measure])

    out = {
        "workload": workload.name,
        "device": args.device,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "precision": args.precision,
        "method": args.method,
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "train_seconds_off": med(False, "train_seconds"),
        "train_seconds_on": med(True, "train_seconds"),
        "train_ratio": med(True, "train_seconds") / med(False, "train_seconds"),
        "train_ratio_min": mn(True, "train_seconds") / mn(False, "train_seconds"),
        "wall_ratio": med(True, "wall_seconds") / med(False, "wall_seconds"),
        "cpu_ratio": med(True, "cpu_seconds") / med(False, "cpu_seconds"),
        # the measurement's own CPU time over the CPU time of a run without it (same thread, both medians)
        "callback_cpu_overhead": med(True, "callback_cpu_seconds") / med(False, "cpu_seconds"),
        "peak_memory_off": runs[False][0]["peak_memory_bytes"],
        "peak_memory_on": runs[True][0]["peak_memory_bytes"],
        "b_simple": runs[True][-1]["b_simple"],
        "all_train_seconds": {"off": [x["train_seconds"] for x in runs[False]],
                              "on": [x["train_seconds"] for x in runs[True]]},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
