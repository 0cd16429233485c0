"""What every subcommand shares: one-line errors, argument types, common options, output paths and JSON output.

The error guard (:data:`fail`) is the one place where anything that escapes a subcommand becomes one line on stderr
and an exit code: 2 for bad input, errors in the user's workload and unusable stores, 130 for a real Ctrl-C (143 for
SIGTERM, handled the same way), 1 only for batchfit's own bugs. Library messages name keyword arguments
(``batch_size``); the guard rewrites them to the subcommand's flags (``--batch-size``) through :data:`KEYWORD_FLAGS`
and the subcommand's own options.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import signal
import stat
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from batchfit._io import NAME_MAX  # re-exported: the limit on a path component

__all__ = [
    "EXIT_ERROR",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "KEYWORD_FLAGS",
    "MAX_MEMORY_BYTES",
    "NAME_MAX",
    "ArgumentParser",
    "add_output_options",
    "add_runtime_options",
    "add_workload_options",
    "check_outputs",
    "check_writable",
    "console",
    "emit",
    "fail",
    "flush_streams",
    "fraction",
    "keyword_flags",
    "load_workload_from_args",
    "memory_size",
    "nonneg_int",
    "output_paths",
    "positive_float",
    "positive_int",
    "seed_value",
    "to_flags",
    "warmup_value",
    "workload_import_path",
    "write_json",
]

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 143  # SIGTERM, handled as Ctrl-C is: 128 + 15, as a shell reports a process ended by it
MAX_MEMORY_BYTES = 2**60  # 1 EiB: more than any machine; larger budgets are typos (1e400, 10**30)
WIDE = 400  # console width when stderr is not a terminal (a log file, CI): tables print in full, never cut


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong, what to do) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_INPUT)


# ---------------------------------------------------------------------------------------------------------------
# Argument types: the text is parsed here, the value checked by batchfit.checks (the library's one set of checks);
# a failed check is argparse's error with the check's message ("argument --steps: must be a positive integer, got 0")


def _checked(check: Callable[..., Any], value: Any, **options: Any) -> Any:
    """``check(name, value, **options)`` from :mod:`batchfit.checks` with no keyword name (argparse names the flag
    in front of the message); its ConfigError becomes an ArgumentTypeError with the same message."""
    from batchfit.errors import ConfigError

    try:
        return check("", value, **options)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None


def _whole(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {expected}") from None


def _number(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {expected}") from None


def positive_int(text: str) -> int:
    from batchfit import checks

    return _checked(checks.positive_int, _whole(text, "a positive integer"))


def nonneg_int(text: str) -> int:
    from batchfit import checks

    return _checked(checks.non_negative_int, _whole(text, "an integer >= 0"))


def seed_value(text: str) -> int:
    """The seed, checked by the library's check (:func:`batchfit.checks.seed`): an integer in [0, 2**32 - 1]."""
    from batchfit import checks

    value = _whole(text, f"a seed in [0, {checks.MAX_SEED}]")
    return _checked(lambda name, v: checks.seed(v, name), value)


def positive_float(text: str) -> float:
    from batchfit import checks

    return _checked(checks.positive_number, _number(text, "a positive number"))


def fraction(text: str) -> float:
    from batchfit import checks

    return _checked(checks.fraction, _number(text, "a fraction like 0.05"), low_open=False,
                    hint="give a fraction like 0.05")


def warmup_value(text: str) -> int | float:
    """``100`` -> 100 steps; ``0.1`` -> 10 % of training."""
    from batchfit import checks

    return _checked(checks.warmup, _number(text, "steps (e.g. 100) or a fraction (0.1)"))


def memory_size(text: str) -> int:
    """``512MiB``, ``2GB``, ``1000000``: a positive, finite size below :data:`MAX_MEMORY_BYTES`."""
    from batchfit.errors import ConfigError
    from batchfit.memory import format_bytes, parse_bytes

    try:
        value = parse_bytes(text)
    except ConfigError as exc:  # the library names its keyword; here the flag is already named by argparse
        raise argparse.ArgumentTypeError(str(exc).replace("memory_budget", "memory size")) from None
    except (OverflowError, ValueError):  # 1e400 -> inf; nan
        raise argparse.ArgumentTypeError(f"memory size {text!r} is not a finite size; write e.g. 512MiB") from None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"memory size {text!r} is not positive; write e.g. 512MiB")
    if value > MAX_MEMORY_BYTES:
        raise argparse.ArgumentTypeError(
            f"memory size {text!r} is larger than any machine ({format_bytes(MAX_MEMORY_BYTES)}); write e.g. 512MiB"
        )
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
    p.add_argument("--seed", type=seed_value, default=0,
                   help="random seed in [0, 2**32 - 1] (same seed -> same result)")


def add_parallel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"),
                   help="under torchrun: ddp (every rank holds the model) or fsdp (FSDP2: parameters, gradients and "
                        "optimizer state sharded over the ranks); default ddp")


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="write the result as JSON to PATH ('-' for stdout; FIFOs and devices are written in place)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write the result as DIR/<command>.json")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def load_workload_from_args(args: argparse.Namespace) -> Any:
    from batchfit.loading import load_workload, parse_options

    return load_workload(args.workload, **parse_options(args.workload_option))


def workload_import_path(spec: Any) -> list[str]:
    """The folders a workload spec's imports should see, as ``python -m batchfit`` sees them: the current
    directory, and for ``path/to/file.py:factory`` the file's own folder (so it can import its sibling modules)."""
    folders = [os.getcwd()]
    if isinstance(spec, str) and ":" in spec and not spec.startswith("demo:"):
        target = spec.strip().rpartition(":")[0]
        if target.endswith(".py") or "/" in target or "\\" in target:
            with contextlib.suppress(OSError, ValueError):
                folders.insert(0, str(Path(target).resolve().parent))
    return folders


# ---------------------------------------------------------------------------------------------------------------
# Output paths: checked up front, the same way in every command


def output_paths(args: argparse.Namespace, command: str) -> list[Path]:
    paths = []
    if getattr(args, "json", None):
        paths.append(args.json)
    if getattr(args, "out", None):
        paths.append(Path(args.out) / f"{command}.json")
    return paths


def _store_file(store: Any) -> Path | None:
    """The file of a SQLite store given as a path or a ``sqlite:///`` URL; None for other URLs and memory."""
    if not isinstance(store, str) or not store:
        return None
    if "://" not in store:
        return Path(store)
    if store.startswith("sqlite:///"):
        path = store[len("sqlite:///"):].split("?")[0]
        if path and not path.startswith(":memory:") and "mode=memory" not in store:
            return Path(path)
    return None


def _check_path(flag: str, path: Any, *, directory: bool = False, store: bool = False) -> None:
    """One output location: every rule that would otherwise fail after the work (see :func:`check_outputs` and
    :func:`batchfit._io.check_output_path`, which the library uses for its own outputs, e.g. checkpoints)."""
    from batchfit._io import check_output_path

    check_output_path(flag, path, directory=directory, store=store)


def check_writable(paths: list[Path], flag: str = "output") -> None:
    """Fail before any work if an output file cannot be written (see :func:`check_outputs`)."""
    for path in paths:
        _check_path(flag, path)


def check_outputs(args: argparse.Namespace) -> None:
    """Check every output location a command was given, before it loads the workload or does any work:
    ``--json`` (a file, ``-``, a FIFO or a device), ``--out`` (a directory), ``--plot``, train's ``--checkpoint``
    and the ``--store`` of sweep and tune (a SQLite file). A parent that is a file, a name over 255 bytes, a folder
    that cannot be written or a read-only store ends in one line and exit 2 here, not after the work."""
    if getattr(args, "json", None) is not None:
        _check_path("--json", args.json)
    if getattr(args, "plot", None) is not None:
        _check_path("--plot", args.plot)
    if getattr(args, "checkpoint", None) is not None:
        _check_path("--checkpoint", args.checkpoint)
    if getattr(args, "out", None) is not None:
        _check_path("--out", args.out, directory=True)
    if getattr(args, "command", None) in ("sweep", "tune"):
        store = _store_file(getattr(args, "store", None))
        if store is not None:
            _check_path("--store", store, store=True)


# ---------------------------------------------------------------------------------------------------------------
# Output


_pending_streams: dict[str, Any] = {}  # a FIFO or stdout gets one JSON document: the last one, written at the end
_written_streams: set[str] = set()


def write_json(path: Path, data: Any) -> None:
    """Write atomically (temp file + rename) to regular files; through symlinks; in place to FIFOs and devices."""
    from batchfit._io import is_stream
    from batchfit._io import write_json as _write

    if not is_stream(path):
        _write(path, data)
        return
    _written_streams.add(str(path))
    try:
        _write(path, data)
    except BrokenPipeError:  # `... --json - | head -c0`: the reader left; the work is done, say so in one line
        _reader_gone(path)


def _reader_gone(path: Path) -> None:
    """The reader of a stream output closed it before the result came: one warning line, and standard output
    pointed at the null device so the interpreter's last flush does not fail again at exit."""
    import warnings

    from batchfit._io import STDOUT

    text = str(path)
    if text in (STDOUT, "/dev/stdout", "/proc/self/fd/1", "/dev/fd/1"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
    where = "standard output" if text == STDOUT else repr(text)
    warnings.warn(f"the reader of {where} closed it before the result was written, so the result was not "
                  "delivered there (the work itself is done and every other output is written)", stacklevel=2)


def flush_streams() -> None:
    """Write the last result held for each stream output (``-``, a FIFO, a device) once; called by the guard."""
    while _pending_streams:
        path, data = _pending_streams.popitem()
        with contextlib.suppress(BrokenPipeError):
            write_json(Path(path), data)


def _release_fifos(args: argparse.Namespace) -> None:
    """A FIFO named as an output that got no result (the command failed first) is opened and closed, so that its
    reader sees the end of the stream instead of waiting forever."""
    for path in output_paths(args, str(getattr(args, "command", ""))):
        if str(path) in _written_streams:
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.stat(path).st_mode):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO when no reader: nothing to release


def emit(args: argparse.Namespace, command: str, data: Any) -> None:
    """Write the JSON outputs; under torchrun only rank 0 writes, and every result says its ``world_size``.

    Regular files are rewritten at every call (results are kept as they complete); a stream (``--json -``, a FIFO,
    a device) is written once, with the last result, when the command ends — a reader gets one JSON document."""
    from batchfit import distributed
    from batchfit._io import is_stream

    if not distributed.is_main():
        return
    if isinstance(data, dict) and "world_size" not in data:
        data = {**data, "world_size": distributed.world_size()}
    for path in output_paths(args, command):
        if is_stream(path):
            _pending_streams[str(path)] = data
        else:
            write_json(path, data)


def console(args: argparse.Namespace | None = None) -> Any:
    """The rich console on stderr (stdout stays free for ``--json -``); wide when stderr is not a terminal, so
    tables in a log file or CI are printed in full, never cut to 80 columns."""
    from rich.console import Console

    from batchfit import distributed

    # under torchrun only rank 0 prints progress and tables
    quiet = bool(getattr(args, "quiet", False)) or not distributed.is_main()
    con = Console(stderr=True, quiet=quiet)
    if not con.is_terminal:
        con = Console(stderr=True, quiet=quiet, width=max(con.width, WIDE))
    return con


# ---------------------------------------------------------------------------------------------------------------
# Keyword arguments -> flags

# Library keyword names whose CLI flag is not "--" + the name with dashes (used where the subcommand has that flag
# and no flag of the keyword's own name). Everything else maps to "--name-with-dashes" when the subcommand has that
# flag, or to the flag whose destination is the keyword (``--wd-rule`` -> ``weight_decay_rule``). A switch named
# "--no-x" turns keyword ``x`` off (``drop_last``, ``noise``, ``find``, ``throughput`` ...): it is derived, and
# listed here only where the keyword is another word.
KEYWORD_FLAGS = {
    "storage": "--store",
    "study_name": "--study",
    "spec": "--workload",
    "workload_options": "--workload-option",
    "rel_ci": "--rel-ci",
    "batch_size_cap": "--max-batch-size",
    "micro_batch_limit": "--micro-batch-size",
    "out_dir": "--out",
    "resume_from": "--resume",
    "measure_noise": "--no-noise",
}
# a one-word name is a keyword only as the subject of a check ("seed must be ...", "unknown precision 'x'") or
# with a value ("seed=3")
_PLAIN_WORD = (r"(?:^|(?<=; )){name}(?=\s+(?:must|should|cannot|is not|has to)\b)", r"(?<=unknown ){name}(?=\s)",
               r"(?<![\w'\"./-]){name}(?==)")
_WORD_START = r"(?<![\w'\"./-])"


def keyword_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, str]]:
    """``{library keyword: (flag, kind)}`` for one subcommand; kind is ``value`` (``--lr 0.1``), ``on`` (a switch
    that sets the keyword: ``--retry-failed`` is ``retry_failed=True``) or ``off`` (a switch that clears it:
    ``--no-drop-last`` is ``drop_last=False``)."""
    names: dict[str, tuple[str, str]] = {}
    kinds: dict[str, str] = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest == "help":
            continue
        switch = isinstance(action, argparse._StoreTrueAction)
        for option in longs:
            name = option[2:].replace("-", "_")
            if switch and name.startswith("no_"):
                names.setdefault(name[3:], (option, "off"))
                kinds[option] = "off"
            else:
                names.setdefault(name, (option, "on" if switch else "value"))
                kinds[option] = "on" if switch else "value"
        if not (switch and longs[0].startswith("--no-")):
            names.setdefault(action.dest, (longs[0], kinds[longs[0]]))
    for name, flag in KEYWORD_FLAGS.items():
        if flag in kinds and name not in names:  # the subcommand's own flag of that name wins
            names[name] = (flag, kinds[flag])
    return names


def to_flags(message: str, parser: argparse.ArgumentParser | None) -> str:
    """Rewrite the keyword names in a library message (``batch_size must be ...``) to this subcommand's flags
    (``--batch-size must be ...``). Names with an underscore are rewritten wherever they stand as a word; one-word
    names (``seed``, ``lr``) where they are the subject of a check ("seed must ...", "unknown lr_rule ...") or carry
    a value (``seed=3``). Switches read as the command line is typed: ``drop_last=False`` is ``--no-drop-last``,
    ``drop_last=True`` "without --no-drop-last", ``retry_failed=True`` ``--retry-failed``; ``lr=None`` is "--lr not
    given". A bare keyword of a "--no-x" switch is left as it is (its flag means the opposite)."""
    if parser is None:
        return message
    names = keyword_flags(parser)
    for name in sorted(names, key=len, reverse=True):
        flag, kind = names[name]
        word = _WORD_START + re.escape(name)
        if kind != "value":
            on, off = (flag, f"without {flag}") if kind == "on" else (f"without {flag}", flag)
            message = re.sub(word + r"=True\b", on, message)
            message = re.sub(word + r"=False\b", off, message)
            if kind == "off":
                continue
        message = re.sub(word + r"=None\b", f"{flag} not given", message)
        if "_" in name:
            patterns: tuple[str, ...] = (rf"{word}(?![\w'\"])",)
        else:
            patterns = tuple(p.format(name=re.escape(name)) for p in _PLAIN_WORD)
        for pattern in patterns:
            message = re.sub(pattern, flag, message)
    # "rerun with --retry-failed (retry_failed=True)" has just become "... (--retry-failed)": say it once
    return re.sub(r"(--[\w-]+) \(\1(?:=[^)]*)?\)", r"\1", message)


# ---------------------------------------------------------------------------------------------------------------
# Error guard


class _Sigint:
    """Knows whether a real SIGINT (Ctrl-C, ``kill -INT``) or SIGTERM (``kill``, a job scheduler) arrived, to tell
    it from a KeyboardInterrupt that code raised by itself (a workload module doing ``raise KeyboardInterrupt`` at
    import). SIGTERM is handled as Ctrl-C is (a KeyboardInterrupt where the command is), so what was computed is
    kept and marked "interrupted" instead of the process dying with its JSON saying "running"."""

    def __init__(self) -> None:
        self.received: int | None = None  # the signal that arrived
        self.installed = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Sigint:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            # only where nobody else handles them: the default handlers (an embedding program keeps its own)
            for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(signum) is default:
                    self.previous[signum] = signal.signal(signum, self._handle)
            self.installed = signal.SIGINT in self.previous
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
        raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous.clear()
        self.installed = False


def _origin(exc: BaseException) -> str:
    """``file:line`` of the innermost frame that raised ``exc``."""
    tb = exc.__traceback__
    if tb is None:
        return "an unknown place"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _store_name(args: argparse.Namespace) -> str:
    store = getattr(args, "store", None)
    if store:
        return str(store)
    out = getattr(args, "out", None)
    return str(Path(out or ".") / "batchfit.db")


_MALFORMED = ("file is not a database", "database disk image is malformed", "malformed database schema")
_READ_ONLY = ("attempt to write a readonly database", "readonly database", "read-only file system",
              "unable to open database file")


def _storage_error(exc: BaseException, args: argparse.Namespace) -> str | None:
    """A one-line message naming the real cause when a store failure is somewhere in ``exc``'s chain."""
    from batchfit.errors import BatchfitError

    if getattr(args, "command", None) not in ("sweep", "tune", "report"):
        return None
    store = _store_name(args)
    for e in _chain(exc):
        module = type(e).__module__ or ""
        text = " ".join(str(e).split())
        low = text.lower()
        from_db = module.startswith(("sqlite3", "sqlalchemy", "optuna")) or "sqlite3." in low
        if from_db and any(m in low for m in _MALFORMED):
            return (f"the store {store!r} is not a valid SQLite database ({_sqlite_reason(low, _MALFORMED)}); "
                    "restore it from a copy, or give another --store / --out")
        if from_db and any(m in low for m in _READ_ONLY):
            return (f"the store {store!r} is read-only or cannot be opened for writing "
                    f"({_sqlite_reason(low, _READ_ONLY)}); make the file and its folder writable, or give another "
                    "--store / --out")
        if isinstance(e, json.JSONDecodeError) and not isinstance(exc, BatchfitError) and any(
                "optuna" in Path(f.filename).parts for f in traceback.extract_tb(e.__traceback__)):
            return (f"the store {store!r} is damaged: it holds an attribute that is not valid JSON ({text}); "
                    "restore it from a copy, or use another store")
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and e.filename and \
                os.path.basename(str(e.filename)).startswith(os.path.basename(store) or "batchfit.db"):
            return (f"the store {store!r} is read-only ({e.strerror}: {e.filename}); make the file and its folder "
                    "writable, or give another --store / --out")
    return None


def _sqlite_reason(low: str, markers: tuple[str, ...]) -> str:
    return next(m for m in markers if m in low)


class _Fail:
    def guard(self, handler: Callable[[argparse.Namespace], int], args: argparse.Namespace, *, debug: bool,
              parser: argparse.ArgumentParser | None = None) -> int:
        """Run ``handler(args)``; whatever escapes becomes one line on stderr and an exit code."""
        name = f"batchfit {getattr(args, 'command', '')}".strip()
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and "RANK" in os.environ:  # torchrun: whose line
            name += f" (rank {os.environ['RANK']})"
        with _Sigint() as sigint, _one_line_warnings(name, parser):
            try:
                check_outputs(args)
                return int(handler(args) or 0)
            except KeyboardInterrupt as exc:
                if sigint.received == signal.SIGTERM:  # kill, a scheduler's preemption: as Ctrl-C, with its code
                    sys.stderr.write(f"{name}: interrupted (SIGTERM); results written so far are kept\n")
                    return EXIT_TERMINATED
                if sigint.received is not None or not sigint.installed:  # a real Ctrl-C (or one we cannot tell)
                    sys.stderr.write(f"{name}: interrupted; results written so far are kept\n")
                    return EXIT_INTERRUPTED
                if debug:
                    traceback.print_exc()
                sys.stderr.write(
                    f"{name}: error: KeyboardInterrupt raised by code at {_origin(exc)} (no Ctrl-C was pressed); "
                    "nothing was finished - remove that raise from the workload\n"
                )
                return EXIT_INPUT
            except SystemExit as exc:  # a workload module or factory calling sys.exit() must not end batchfit quietly
                if debug:
                    traceback.print_exc()
                sys.stderr.write(
                    f"{name}: error: the workload called sys.exit({exc.code!r}) at {_origin(exc)}; batchfit stopped "
                    "without a result - raise an exception in the workload instead of exiting\n"
                )
                return EXIT_INPUT
            except Exception as exc:
                return self._report(exc, args, name, debug=debug, parser=parser)
            finally:
                flush_streams()
                _release_fifos(args)
                _written_streams.clear()

    def _report(self, exc: Exception, args: argparse.Namespace, name: str, *, debug: bool,
                parser: argparse.ArgumentParser | None) -> int:
        from batchfit.errors import BatchfitError, LeaderStoppedError

        if debug:
            traceback.print_exc()
        if isinstance(exc, LeaderStoppedError):  # a follower under torchrun: rank 0 has printed the line
            return exc.exit_code
        storage = _storage_error(exc, args)
        if storage is not None:
            sys.stderr.write(f"{name}: error: {storage}\n")
            return EXIT_INPUT
        if isinstance(exc, BatchfitError):
            sys.stderr.write(f"{name}: error: {to_flags(_one_line(exc), parser)}\n")
            return EXIT_INPUT
        from batchfit.data import loader_failure

        loader = loader_failure(exc)  # a DataLoader worker died while batchfit's own code ran: the data's fault
        if loader is not None:
            sys.stderr.write(f"{name}: error: the workload's data loader failed: {loader}\n")
            return EXIT_INPUT
        # an unexpected failure: still one line unless --debug
        sys.stderr.write(
            f"{name}: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(run again with --debug for the traceback)\n"
        )
        return EXIT_ERROR


@contextlib.contextmanager
def _one_line_warnings(name: str, parser: argparse.ArgumentParser | None) -> Any:
    """Warnings print as one line each ("batchfit train: warning: ..."), in the flags' words, not as
    ``file:line: UserWarning`` plus the source line."""
    import warnings

    previous = warnings.showwarning

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        text = " ".join(str(message).split())
        (file or sys.stderr).write(f"{name}: warning: {to_flags(text, parser)}\n")

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


fail = _Fail()
