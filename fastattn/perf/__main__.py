"""`python -m fastattn.perf <command>`: the perf tools' command line.

Each command lives in its own module, which registers its subcommand with
``add_parser(subparsers)`` (setting ``func``, called with the parsed arguments and returning
the exit code). To add a command, add its module to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("compare", "baselines", "history", "report", "check", "fastest", "windows",
            "halo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.perf", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(f"fastattn.perf.{module}").add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
