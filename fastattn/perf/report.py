"""A run as a markdown table (one row per case and direction, one column per implementation,
speedup against FlexAttention) and a PNG chart of TFLOP/s.

``python -m fastattn.perf report RUN.json --out DIR`` writes DIR/table.md and DIR/chart.png
and prints the table; ``--noise EARLIER.json`` adds each median's change since an earlier run
of the same cases (DIR/noise.md). Times are pytest-benchmark's medians, i.e. GPU time per call on a GPU
(see fastattn.perf.timing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

IMPL_ORDER = ("fastattn", "flex", "flash-attn-4", "sdpa", "reference", "fast-transformers")
OP_ORDER = ("local", "clustered", "improved-clustered")
BASELINE_IMPL = "flex"


def load(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _rows(run: dict) -> tuple[list[str], list[str], dict]:
    """(groups in run order, implementations, {(group, impl): benchmark})."""
    groups, impls, cells = {}, set(), {}
    for bench in run.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        group = bench.get("group") or bench.get("name")
        impl = info.get("impl") or bench.get("name")
        op = info.get("op")
        groups.setdefault(group, OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER))
        impls.add(impl)
        cells[(group, impl)] = bench
    ordered = [i for i in IMPL_ORDER if i in impls] + sorted(impls - set(IMPL_ORDER))
    # Local attention first, then the clustered ops; within an op, in the order they ran.
    return sorted(groups, key=groups.get), ordered, cells


def format_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def _cell(bench: dict | None, baseline: dict | None) -> str:
    if bench is None:
        return "—"
    median = bench["stats"]["median"]
    info = bench.get("extra_info") or {}
    text = format_time(median)
    if info.get("tflops") is not None:
        text += f" · {info['tflops']:.3g} TF/s"
    if baseline is not None:
        text += f" · {baseline['stats']['median'] / median:.2f}x"
    if info.get("timing_mode") == "eager":
        text += " †"
    return text


def header(run: dict) -> str:
    fa = (run.get("machine_info") or {}).get("fastattn") or {}
    commit = next((c for c in ((run.get("commit_info") or {}).get("id"), fa.get("commit"))
                   if c and c != "unknown"), "unknown")
    dirty = " (dirty)" if (run.get("commit_info") or {}).get("dirty") else ""
    return (f"Device: {fa.get('device', 'unknown')} · torch {fa.get('torch', '?')} · "
            f"CUDA {fa.get('cuda', '?')} · driver {fa.get('driver', '?')} · "
            f"commit {commit[:10]}{dirty} · {run.get('datetime', '')[:19]}")


def table(run: dict) -> str:
    groups, impls, cells = _rows(run)
    lines = [header(run), "",
             "Median time per call · TFLOP/s (visible pairs only) · speedup vs FlexAttention "
             "(its time / this time). GPU: graph-batched CUDA-event time, L2 flushed per round; "
             "† = eager event timing (no graph capture).", "",
             "| case | " + " | ".join(impls) + " |",
             "|---|" + "---|" * len(impls)]
    for group in groups:
        baseline = cells.get((group, BASELINE_IMPL))
        row = [_cell(cells.get((group, impl)), baseline) for impl in impls]
        lines.append(f"| {group} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def noise(first: dict, second: dict, min_s: float = 50e-6) -> str:
    """Run-to-run change of each benchmark's median between two runs of the same cases.

    The summary counts only medians of at least ``min_s``: below it a few microseconds of
    launch or clock jitter are a large fraction. Benchmarks in one run only (a case added or
    dropped between them) are counted in the summary and not compared.
    """
    before = {b["fullname"]: b for b in first.get("benchmarks", [])}
    after = {b["fullname"] for b in second.get("benchmarks", [])}
    lines = ["| benchmark | first | second | change |", "|---|---|---|---|"]
    changes = []
    for bench in second.get("benchmarks", []):
        old = before.get(bench["fullname"])
        if old is None:
            continue
        a, b = old["stats"]["median"], bench["stats"]["median"]
        change = 100 * (b - a) / a
        if min(a, b) >= min_s:
            changes.append(abs(change))
        lines.append(f"| {bench['name']} | {format_time(a)} | {format_time(b)} | {change:+.1f}% |")
    if changes:
        changes.sort()
        summary = (f"{len(changes)} benchmarks of at least {format_time(min_s)}: median |change| "
                   f"{changes[len(changes) // 2]:.1f}%, max {changes[-1]:.1f}%, "
                   f"{sum(c > 3 for c in changes)} above 3%")
    else:
        summary = "no benchmark in both runs"
    only_second, only_first = len(after - set(before)), len(set(before) - after)
    if only_second or only_first:
        summary += (f"; not compared: {only_second} only in the second run (new), "
                    f"{only_first} only in the first")
    return "\n".join([summary, ""] + lines + [""])


def chart(run: dict, path) -> bool:
    """TFLOP/s per case and implementation; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups, impls, cells = _rows(run)
    height = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.1 * len(groups) * max(2, len(impls))))
    values_seen = []
    for n, impl in enumerate(impls):
        ys, values = [], []
        for row, group in enumerate(groups):
            bench = cells.get((group, impl))
            if bench and (bench.get("extra_info") or {}).get("tflops"):
                ys.append(row + n * height)
                values.append(bench["extra_info"]["tflops"])
        ax.barh(ys, values, height=height, label=impl)
        values_seen += values
    if values_seen and max(values_seen) > 20 * min(values_seen):
        ax.set_xscale("log")  # fp32, bf16 and the clustered ops differ by orders of magnitude
    ax.set_yticks([row + height * (len(impls) - 1) / 2 for row in range(len(groups))])
    ax.set_yticklabels(groups, fontsize=7)
    ax.set_ylim(len(groups), -1 + height)
    ax.set_xlabel("TFLOP/s (visible (q, k) pairs only)")
    ax.set_title(header(run), fontsize=7)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(run_path, out_dir, noise_against=None) -> str:
    run = load(run_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = table(run)
    (out / "table.md").write_text(text, encoding="utf-8")
    if noise_against:
        extra = "\nRun-to-run noise against " + str(noise_against) + ":\n\n"
        extra += noise(load(noise_against), run)
        (out / "noise.md").write_text(extra, encoding="utf-8")
        text += extra
    if not chart(run, out / "chart.png"):
        print("matplotlib is not installed: no chart written", file=sys.stderr)
    return text


def _arguments(parser) -> None:
    parser.add_argument("run", help="a pytest-benchmark --benchmark-json file")
    parser.add_argument("--out", default="results", help="folder for table.md and chart.png")
    parser.add_argument("--noise", metavar="EARLIER.json",
                        help="also write noise.md: each median's change since an earlier run")
    parser.set_defaults(func=_main)


def add_parser(subparsers) -> None:
    """``python -m fastattn.perf report``."""
    _arguments(subparsers.add_parser("report", help="markdown table and PNG chart of a run",
                                     description=__doc__.splitlines()[0]))


def _main(args) -> int:
    print(write(args.run, args.out, args.noise), end="")
    return 0
