"""The ``batchfit`` command line: ``batchfit train|find|noise|sweep|tune|report``.

Each subcommand lives in its own small module with ``add_parser(subparsers)`` and ``run(args) -> int``.
Bad input of any kind ends in one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from batchfit.cli._common import EXIT_INPUT, ArgumentParser, fail

# name -> module under batchfit.cli; a module that is not there yet is skipped (commands land one by one).
COMMANDS = ("train", "find", "noise", "sweep", "tune", "report")


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
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_INPUT
    return fail.guard(args.handler, args, debug=debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
