"""`python -m fastattn.perf history`: saved runs over commits as a trend table and plots.

Runs (files given, or every ``*.json`` below ``--storage``, e.g. pytest-benchmark's
``.benchmarks``) are split by device and put in commit order (the commit's time, then the
run's). Per device and benchmark group, ``history.md`` gets a table (one row per run, one
column per case, the median time) and ``<device>/<group>.png`` a plot of the medians with their
interquartile range.

Change points use the gate's rule (:mod:`fastattn.perf.stats`): each case is compared with its
*reference* run, at first its oldest; a run that the gate would call a regression (``▲``) or
an improvement (``▼``) against the reference is marked, and becomes the new reference. So a
step is marked at the commit that made it, and a slow drift is marked where it has added up to
more than the threshold.

``--add RUN.json`` first copies a checked run into the storage (atomically, as
``<device>/<commit time>_<commit>.json``): that is how CI on main grows the history.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fastattn.perf import stats
from fastattn.perf.compare import (
    EXIT_OK,
    EXIT_UNUSABLE,
    Thresholds,
    add_threshold_args,
    check_alpha,
    format_change,
    format_time,
    load_thresholds,
)
from fastattn.perf.runs import Run, RunError, load_run, read_run, slugify, write_atomic

MARKS = {"regression": "▲", "improvement": "▼"}


@dataclass(frozen=True)
class Point:
    """One case in one run: its median, quartiles and the change marked there (if any)."""

    median: float
    q1: float
    q3: float
    mark: str = ""  # "regression", "improvement" or ""
    ratio: float = 1.0  # against the reference the mark was judged on


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _when(iso: str) -> float:
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return math.inf
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def order(runs: list[Run]) -> list[Run]:
    """Commit order: the commit's time, then the run's (repeats of one commit), undated last."""
    return sorted(runs, key=lambda r: (_when(r.commit_time), _when(r.run_time), r.path))


def collect(storage: str) -> tuple[list[Run], list[str]]:
    """Every run below `storage`, and a one-line reason for each file skipped."""
    runs, skipped = [], []
    for path in sorted(Path(storage).rglob("*.json")):
        if path.name.startswith("."):  # a temporary file of write_atomic, or not ours
            continue
        try:
            runs.append(load_run(path))
        except RunError as err:
            skipped.append(str(err))
    return runs, skipped


def trends(runs: list[Run], thresholds: Thresholds, alpha: float) -> dict[str, dict[str, list[Point | None]]]:
    """For runs of one device in order: {group: {case fullname: [Point or None per run]}}."""
    groups: dict[str, dict[str, list[Point | None]]] = defaultdict(dict)
    for fullname in sorted({f for r in runs for f in r.cases}):
        reference = None
        points: list[Point | None] = []
        group = ""
        for run in runs:
            case = run.cases.get(fullname)
            if case is None:
                points.append(None)
                continue
            group = case.group
            q1, med, q3 = np.percentile(case.samples, [25, 50, 75])
            mark, ratio = "", 1.0
            if reference is None:
                reference = case.samples
            else:
                j = stats.judge(reference, case.samples, thresholds.for_case(fullname), alpha, interval=False)
                if j.verdict in MARKS:
                    mark, ratio, reference = j.verdict, j.ratio, case.samples
            points.append(Point(float(med), float(q1), float(q3), mark, ratio))
        groups[group][fullname] = points
    return groups


def case_labels(fullnames: list[str]) -> dict[str, str]:
    """Short column labels: the parameter id's '-'-separated parts that are not shared by all cases."""
    ids = {f: f.rsplit("[", 1)[-1].rstrip("]") if f.endswith("]") else f.split("::")[-1] for f in fullnames}
    if len(fullnames) < 2:
        return ids
    parts = {f: i.split("-") for f, i in ids.items()}
    shared = set.intersection(*(set(p) for p in parts.values()))
    labels = {f: "-".join(t for t in p if t not in shared) or ids[f] for f, p in parts.items()}
    return labels if len(set(labels.values())) == len(labels) else ids


def markdown(device: str, runs: list[Run], groups, thresholds: Thresholds) -> str:
    lines = [f"## {runs[0].device_name} (`{device}`): {_count(len(runs), 'run')}", ""]
    for group in sorted(groups):
        cases = groups[group]
        labels = case_labels(list(cases))
        lines += [f"### {group}", "", "| commit | date | " + " | ".join(f"`{labels[f]}`" for f in cases) + " |"]
        lines.append("|---|---|" + "---:|" * len(cases))
        for i, run in enumerate(runs):
            cells = []
            for f in cases:
                p = cases[f][i]
                cell = "—" if p is None else format_time(p.median)
                if p is not None and p.mark:
                    cell += f" {MARKS[p.mark]} {format_change(p.ratio)}"
                cells.append(cell)
            lines.append(f"| `{run.short_commit}` | {run.commit_time[:10] or run.run_time[:10]} | " + " | ".join(cells) + " |")
        lines.append("")
    threshold = "per-case thresholds" if thresholds.patterns else f"a {thresholds.default * 100:g}% threshold"
    lines += [
        f"Medians per run. ▲/▼: the gate (with {threshold}) finds this run slower/faster than the "
        "case's reference run, the first run or the last marked one; the change is against that reference.",
        "",
    ]
    return "\n".join(lines)


def plot(path: Path, title: str, runs: list[Run], cases: dict[str, list[Point | None]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = case_labels(list(cases))
    top = max(p.median for points in cases.values() for p in points if p)
    unit, scale = next((u, s) for u, s in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 0.0)) if top >= s)
    scale = scale or 1e-9
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(runs) + 3), 4.5))
    for f, points in cases.items():
        xs = [i for i, p in enumerate(points) if p]
        med = np.array([points[i].median for i in xs]) / scale
        lo = med - np.array([points[i].q1 for i in xs]) / scale
        hi = np.array([points[i].q3 for i in xs]) / scale - med
        line = ax.errorbar(xs, med, yerr=[lo, hi], marker="o", ms=3, capsize=2, label=labels[f])
        for mark, style in (("regression", "^"), ("improvement", "v")):
            at = [i for i in xs if points[i].mark == mark]
            if at:
                ax.scatter(at, [points[i].median / scale for i in at], marker=style, s=90, zorder=3,
                           facecolors="none", edgecolors="red" if mark == "regression" else "green", linewidths=1.5)
        line.lines[0].set_linewidth(1.2)
    ax.set_xticks(range(len(runs)), [r.short_commit for r in runs], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"median time per call ({unit}), bars: IQR")
    ax.set_xlabel("commit; red △ / green ▽: slower / faster than the case's reference (the gate's rule)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(runs: list[Run], out: str, thresholds: Thresholds, alpha: float = stats.ALPHA) -> tuple[Path, list[Path], str]:
    """Write history.md and the plots under `out`; returns (markdown path, plot paths, note).

    The note is non-empty when the plots were not drawn (matplotlib missing)."""
    try:
        import matplotlib  # noqa: F401

        note = ""
    except ImportError:
        note = "matplotlib is not installed, so no PNG plots were drawn (pip install matplotlib, or the project's `plots` extra)"
    by_device: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_device[run.device].append(run)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, pngs = ["# Benchmark history", ""], []
    for device in sorted(by_device):
        ordered = order(by_device[device])
        groups = trends(ordered, thresholds, alpha)
        sections.append(markdown(device, ordered, groups, thresholds))
        if not note:
            for group, cases in sorted(groups.items()):
                png = out_dir / device / f"{slugify(group) or 'cases'}.png"
                plot(png, f"{group} on {ordered[0].device_name}", ordered, cases)
                pngs.append(png)
    md = out_dir / "history.md"
    md.write_text("\n".join(sections), encoding="utf-8")
    return md, pngs, note


def add_run(src: str, storage: str) -> Path:
    run, data = read_run(src)
    stamp = "".join(c for c in (run.commit_time or run.run_time)[:19] if c.isalnum()) or "undated"
    dest = Path(storage) / run.device / f"{stamp}_{slugify(run.commit)[:12]}.json"
    write_atomic(dest, data)
    return dest


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("history", help="trend table and plots of saved runs in commit order", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN.json")
    p.add_argument("--storage", metavar="DIR", help="take every *.json below DIR (skipping unreadable ones, with a note)")
    p.add_argument("--add", metavar="RUN.json", help="first copy this run into --storage")
    p.add_argument("--out", required=True, metavar="DIR", help="where history.md and the PNG plots go")
    add_threshold_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        if bool(args.runs) == bool(args.storage):
            raise RunError("give RUN.json files or --storage DIR (one of the two)")
        if args.add and not args.storage:
            raise RunError("--add needs --storage")
        thresholds = load_thresholds(args.thresholds, args.threshold)
        check_alpha(args.alpha)
        if args.add:
            print(f"history: added {add_run(args.add, args.storage)}", file=sys.stderr)
        if args.storage:
            runs, skipped = collect(args.storage)
            for reason in skipped:
                print(f"history: skipped {reason}", file=sys.stderr)
        else:
            runs = [load_run(p) for p in args.runs]
        if not runs:
            raise RunError(f"no run found in {args.storage}")
    except RunError as err:
        print(f"history: {err}", file=sys.stderr)
        return EXIT_UNUSABLE
    md, pngs, note = render(runs, args.out, thresholds, args.alpha)
    print(f"history: {_count(len(runs), 'run')} -> {md}" + (f" and {_count(len(pngs), 'plot')}" if pngs else ""), file=sys.stderr)
    if note:
        print(f"history: {note}", file=sys.stderr)
    return EXIT_OK
