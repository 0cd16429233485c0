"""The ``batchfit`` command line: ``batchfit train|find|noise|sweep|tune|report|plan``.

Each subcommand lives in its own small module with ``add_parser(subparsers)`` and ``run(args) -> int``.
Bad input of any kind ends in one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from batchfit.cli._common import EXIT_INPUT, ArgumentParser, fail, workload_import_path

__all__ = ["COMMANDS", "DISTRIBUTED_COMMANDS", "build_parser", "main"]

# name -> module under batchfit.cli; a module that is not there yet is skipped (commands land one by one).
COMMANDS = ("train", "find", "noise", "sweep", "tune", "report", "plan")
# Under torchrun these run data-parallel (one process per device); the others refuse to start N copies of themselves.
DISTRIBUTED_COMMANDS = ("train", "find", "noise", "sweep", "tune")


def build_parser() -> ArgumentParser:
    from batchfit import __version__

    parser = ArgumentParser(
        prog="batchfit",
        description="Measure and recommend the batch size (and the learning rate with it) for your model.",
    )
    parser.add_argument("--version", action="version", version=f"batchfit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"batchfit.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"batchfit.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (0 ok, 2 bad input or workload error, 130 Ctrl-C, 143 SIGTERM, 1
    batchfit bug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = getattr(args, "command", None)
    subparser = _subparser(parser, command)
    if extra:  # an unknown option belongs to the subcommand: point at that subcommand's help
        (subparser or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_INPUT
    _importable(getattr(args, "workload", None))
    handler = args.handler
    if all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) and os.environ["WORLD_SIZE"] != "1":
        handler = _under_torchrun(handler)
    return fail.guard(handler, args, debug=debug, parser=subparser)


def _subparser(parser: ArgumentParser, command: str | None) -> ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return None


def _importable(spec: object) -> None:
    """What ``python -m batchfit`` can import, the ``batchfit`` script can too: the current directory and the
    workload file's own folder go on ``sys.path`` (first, as Python puts a script's folder)."""
    for folder in reversed(workload_import_path(spec)):
        if folder not in sys.path:
            sys.path.insert(0, folder)


def _under_torchrun(handler):  # noqa: ANN001, ANN202
    """Join the process group first (this rank's device replaces --device), leave it after."""

    def run(args):  # noqa: ANN001, ANN202
        from batchfit import distributed
        from batchfit.errors import ConfigError

        if args.command not in DISTRIBUTED_COMMANDS:
            raise ConfigError(f"'batchfit {args.command}' does not run under torchrun; run it in one process "
                              f"(torchrun runs: {', '.join(DISTRIBUTED_COMMANDS)})")
        args.device = distributed.init_from_env(getattr(args, "device", "cpu"))
        try:
            return handler(args)
        finally:
            distributed.shutdown()

    return run


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
