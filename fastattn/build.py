"""Build the extension ahead of time: ``python -m fastattn.build [--cuda] [--verbose]``.

Exits non-zero with the compiler's message when a source fails. ``--cuda`` compiles the
CUDA sources even on a machine without a GPU, as a compile check.
"""

from __future__ import annotations

import argparse
import sys

from fastattn._build import BuildError, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.build", description=__doc__)
    parser.add_argument("--cuda", action="store_true",
                        help="compile the CUDA sources even where no GPU is visible")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    try:
        path = build(force_cuda=args.cuda, verbose=args.verbose)
    except BuildError as exc:
        print(f"fastattn build failed: {exc}", file=sys.stderr)
        return 1
    print(f"fastattn extension built: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
