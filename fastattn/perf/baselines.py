"""`python -m fastattn.perf baseline RUN.json`: promote a checked run to its device's baseline.

The run must load as the gate loads it, and some case must hold at least ``MIN_ROUNDS`` rounds
(with fewer, no slowdown can ever be shown at the gate's significance level: such cases are
named in a warning, and the gate will only report them); it is then copied,
byte for byte, to ``<dir>/<device_slug>.json`` atomically (temporary file, fsync, rename): a
crash leaves the old baseline or the new one, never part of a file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastattn.perf.compare import EXIT_OK, EXIT_UNUSABLE
from fastattn.perf.runs import Run, RunError, read_run, write_atomic

DEFAULT_DIR = "bench/baselines"
# With 5 rounds on each side the smallest one-sided Mann-Whitney p-value is 1/252 < 0.01.
MIN_ROUNDS = 5


def check_baseline(run: Run) -> str:
    """Raises RunError if no case of `run` can be gated on; returns a warning ("" if none)."""
    few = [f"{c.fullname} ({c.samples.size})" for c in run.cases.values() if c.samples.size < MIN_ROUNDS]
    listed = ", ".join(few[:3]) + (" ..." if len(few) > 3 else "")
    if len(few) == len(run.cases):
        raise RunError(f"{run.path}: every case has fewer than {MIN_ROUNDS} rounds, too few to gate on: {listed}")
    if few:
        return f"{len(few)} case(s) have fewer than {MIN_ROUNDS} rounds and will only be reported, never failed: {listed}"
    return ""


def promote(src: str, directory: str = DEFAULT_DIR) -> tuple[Run, Path, str]:
    """Check the run at `src` and write it as its device's baseline; (run, path, warning)."""
    run, data = read_run(src)
    warning = check_baseline(run)
    dest = Path(directory) / f"{run.device}.json"
    write_atomic(dest, data)
    return run, dest, warning


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("baseline", help="check a run and write it as its device's baseline, atomically", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN.json")
    p.add_argument("--dir", default=DEFAULT_DIR, help="baselines folder (default %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        run, dest, warning = promote(args.run, args.dir)
    except RunError as err:
        print(f"baseline: {err}", file=sys.stderr)
        return EXIT_UNUSABLE
    if warning:
        print(f"baseline: warning: {warning}", file=sys.stderr)
    if run.dirty:
        print(f"baseline: warning: {run.path} was timed on a working tree with uncommitted changes", file=sys.stderr)
    print(f"baseline: {dest} <- {run.path}: {len(run.cases)} cases on {run.device_name}, commit {run.short_commit}")
    return EXIT_OK
