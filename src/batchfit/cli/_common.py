"""What every subcommand shares: one-line errors, argument types, common options, JSON output."""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong, what to do) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_INPUT)


# ---------------------------------------------------------------------------------------------------------------
# Argument types: each raises ArgumentTypeError with a message that says what is expected


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive; give an integer >= 1")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give an integer >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give an integer >= 0")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a positive number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive finite number")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction like 0.05") from None
    if not (0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1); give a fraction like 0.05")
    return value


def warmup_value(text: str) -> int | float:
    """``100`` -> 100 steps; ``0.1`` -> 10 % of training."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give steps (e.g. 100) or a fraction (0.1)") \
            from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0: steps (e.g. 100) or a fraction below 1 (0.1)")
    if value >= 1:
        if value != int(value):
            raise argparse.ArgumentTypeError(f"{text!r}: a warm-up of 1 or more is a whole number of steps")
        return int(value)
    return value


def memory_size(text: str) -> int:
    from batchfit.errors import ConfigError
    from batchfit.memory import parse_bytes

    try:
        value = parse_bytes(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert value is not None
    return value


# ---------------------------------------------------------------------------------------------------------------
# Common options


def add_workload_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", "-w", default="demo:digits-mlp",
                   help="demo:NAME, path/to/file.py:factory or package.module:factory (default: demo:digits-mlp)")
    p.add_argument("--workload-option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword passed to the workload factory, e.g. -O num_samples=4000 (repeatable)")


def add_runtime_options(p: argparse.ArgumentParser, precision: bool = True) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    if precision:
        p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                       help="fp32, bf16 autocast (CPU and CUDA) or fp16 with a gradient scaler (CUDA)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (same seed -> same result)")


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, metavar="PATH", help="write the result as JSON to PATH")
    p.add_argument("--out", type=Path, metavar="DIR", help="write the result as DIR/<command>.json")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def load_workload_from_args(args: argparse.Namespace) -> Any:
    from batchfit.workload import load_workload, parse_options

    return load_workload(args.workload, **parse_options(args.workload_option))


# ---------------------------------------------------------------------------------------------------------------
# Output


def write_json(path: Path, data: Any) -> None:
    """Write atomically (temp file + rename), so a reader or a crash never sees half a file."""
    from batchfit._io import write_json as _write

    _write(path, data)


def output_paths(args: argparse.Namespace, command: str) -> list[Path]:
    paths = []
    if getattr(args, "json", None):
        paths.append(args.json)
    if getattr(args, "out", None):
        paths.append(Path(args.out) / f"{command}.json")
    return paths


def check_writable(paths: list[Path]) -> None:
    """Fail before any work if an output location cannot be written."""
    from batchfit.errors import ConfigError

    for path in paths:
        parent = Path(path).parent
        if Path(path).is_dir():
            raise ConfigError(f"output path {str(path)!r} is a directory; give a file name")
        probe = parent
        while not probe.exists():
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            raise ConfigError(f"cannot write to {str(parent)!r}; choose another output path")


def emit(args: argparse.Namespace, command: str, data: Any) -> None:
    """Write the JSON outputs; under torchrun only rank 0 writes, and every result says its ``world_size``."""
    from batchfit import distributed

    if not distributed.is_main():
        return
    if isinstance(data, dict) and "world_size" not in data:
        data = {**data, "world_size": distributed.world_size()}
    for path in output_paths(args, command):
        write_json(path, data)


def console(args: argparse.Namespace | None = None) -> Any:
    from rich.console import Console

    from batchfit import distributed

    # under torchrun only rank 0 prints progress and tables
    return Console(stderr=True, quiet=bool(getattr(args, "quiet", False)) or not distributed.is_main())


# ---------------------------------------------------------------------------------------------------------------
# Error guard


class _Fail:
    def guard(self, handler: Callable[[argparse.Namespace], int], args: argparse.Namespace, *, debug: bool) -> int:
        from batchfit.errors import BatchfitError

        try:
            return int(handler(args) or 0)
        except BatchfitError as exc:
            if debug:
                traceback.print_exc()
            sys.stderr.write(f"batchfit {args.command}: error: {_one_line(exc)}\n")
            return EXIT_INPUT
        except KeyboardInterrupt:
            sys.stderr.write(f"batchfit {args.command}: interrupted; results written so far are kept\n")
            return EXIT_INTERRUPTED
        except Exception as exc:  # an unexpected failure: still one line unless --debug
            if debug:
                traceback.print_exc()
            sys.stderr.write(
                f"batchfit {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
                "(run again with --debug for the traceback)\n"
            )
            return EXIT_ERROR


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


fail = _Fail()
