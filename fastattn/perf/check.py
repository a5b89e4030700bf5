"""Checks that a benchmark run carries what the report and the gate read.

``python -m fastattn.perf check-json RUN.json`` exits 1, listing every problem, unless: each
benchmark has its per-round samples (``stats.data``, seconds > 0), ``extra_info`` with
positive ``flops`` and ``tflops``, an ``impl`` and a ``timing_mode``; the run names its device
(``machine_info.fastattn.device_slug``); and fastattn shares a group with at least one peer.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def problems(run: dict) -> list[str]:
    found = []
    benchmarks = run.get("benchmarks") or []
    if not benchmarks:
        return ["no benchmarks in the run"]
    fa = (run.get("machine_info") or {}).get("fastattn") or {}
    if not fa.get("device_slug"):
        found.append("machine_info.fastattn.device_slug is missing")
    groups = defaultdict(set)
    for bench in benchmarks:
        name = bench.get("fullname", "?")
        data = (bench.get("stats") or {}).get("data")
        if not data or not all(isinstance(t, (int, float)) and t > 0 for t in data):
            found.append(f"{name}: no per-round samples (stats.data); pass --benchmark-save-data "
                         "with --benchmark-save, or use --benchmark-json")
        info = bench.get("extra_info") or {}
        for key in ("flops", "tflops"):
            if not isinstance(info.get(key), (int, float)) or info[key] <= 0:
                found.append(f"{name}: extra_info.{key} is missing or not positive")
        for key in ("impl", "timing_mode"):
            if not info.get(key):
                found.append(f"{name}: extra_info.{key} is missing")
        groups[bench.get("group")].add(info.get("impl"))
    if not any("fastattn" in impls and len(impls) > 1 for impls in groups.values()):
        found.append("no group holds fastattn beside a peer")
    return found


def _arguments(parser) -> None:
    parser.add_argument("run", help="a pytest-benchmark --benchmark-json file")
    parser.set_defaults(func=_main)


def add_parser(subparsers) -> None:
    """``python -m fastattn.perf check-json``."""
    _arguments(subparsers.add_parser("check-json", help="check a run has what the report and gate need",
                                     description=__doc__.splitlines()[0]))


def _main(args) -> int:
    try:
        with open(args.run, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        print(f"{args.run}: cannot read a run: {err}", file=sys.stderr)
        return 1
    found = problems(run)
    for problem in found:
        print(f"{args.run}: {problem}", file=sys.stderr)
    if not found:
        print(f"{args.run}: {len(run['benchmarks'])} benchmarks, samples and extra_info complete")
    return 1 if found else 0
