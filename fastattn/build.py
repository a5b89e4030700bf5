"""Build the extension: ``python -m fastattn.build [--cuda] [--verbose] [--info]``.

Without ``--info`` this is the JIT build done ahead of time: it exits non-zero with the
compiler's message when a source fails, and ``--cuda`` compiles the CUDA sources even on a
machine without a GPU, as a compile check. ``--info`` loads what an op call would load (the
prebuilt library of a wheel, else the JIT build, compiling it if needed) and prints one line
saying which it is, its path and the kernels it holds.
"""

from __future__ import annotations

import argparse
import sys

from fastattn._build import BuildError, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true",
                        help="compile the CUDA sources even where no GPU is visible")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    parser.add_argument("--info", action="store_true",
                        help="load the library an op call would use and say which it is")
    args = parser.parse_args(argv)
    if args.info and args.cuda:
        parser.error("--info reports what an op call loads; --cuda only applies to a build")
    try:
        if args.info:
            from fastattn import _ops

            print(_ops.load().describe())
            return 0
        path = build(force_cuda=args.cuda, verbose=args.verbose)
    except BuildError as exc:
        print(f"fastattn build failed: {exc}", file=sys.stderr)
        return 1
    print(f"fastattn extension built: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
