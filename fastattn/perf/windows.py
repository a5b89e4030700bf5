"""`python -m fastattn.perf windows RUN.json --out DIR`: TFLOP/s against window width.

Reads the window-width sweep of the ``full`` set (causal sliding windows of
:data:`fastattn.perf.cases.WINDOW_WIDTHS` keys at L = 32768, D = 128, bf16; ``make
window-sweep`` times just those) from a run and writes, per direction, one line per
implementation: DIR/windows.md (a table, width x implementation) and DIR/windows.png (without
matplotlib, the table only, and a line says so). Shows where each implementation wins as the
band widens towards full attention.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastattn.perf.cases import WINDOW_SWEEP_SHAPE
from fastattn.perf.report import IMPL_ORDER, load

DIRECTIONS = ("fwd", "fwd+bwd")


def sweep_points(run: dict) -> dict[str, dict[str, dict[int, float]]]:
    """{direction: {impl: {width: TFLOP/s}}} of the run's causal bf16 local cases at the
    sweep's shape (any other case is ignored)."""
    batch, heads, seq_len, head_dim = WINDOW_SWEEP_SHAPE
    points: dict[str, dict[str, dict[int, float]]] = {}
    for bench in run.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        window = info.get("window")
        if (info.get("op") != "local" or info.get("dtype") != "bf16" or info.get("tflops") is None
                or (info.get("B"), info.get("H"), info.get("L"), info.get("D")) != (batch, heads, seq_len, head_dim)
                or not isinstance(window, list) or len(window) != 2 or window[1] != 0):
            continue
        direction, impl = info.get("direction"), info.get("impl")
        if direction in DIRECTIONS and impl:
            points.setdefault(direction, {}).setdefault(impl, {})[window[0] + 1] = float(info["tflops"])
    return points


def _impls(by_impl: dict) -> list[str]:
    return [i for i in IMPL_ORDER if i in by_impl] + sorted(set(by_impl) - set(IMPL_ORDER))


def table(points: dict) -> str:
    batch, heads, seq_len, head_dim = WINDOW_SWEEP_SHAPE
    lines = [f"TFLOP/s (visible pairs) against causal window width (keys a query sees), "
             f"B={batch} H={heads} L={seq_len} D={head_dim} bf16; best per width in bold.", ""]
    for direction in DIRECTIONS:
        by_impl = points.get(direction)
        if not by_impl:
            continue
        impls = _impls(by_impl)
        widths = sorted({w for values in by_impl.values() for w in values})
        lines += [f"### {direction}", "", "| width | " + " | ".join(impls) + " |",
                  "|---:|" + "---:|" * len(impls)]
        for width in widths:
            values = [by_impl[i].get(width) for i in impls]
            best = max((v for v in values if v is not None), default=None)
            cells = ["—" if v is None else (f"**{v:.3g}**" if v == best else f"{v:.3g}") for v in values]
            lines.append(f"| {width} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(points: dict, path) -> bool:
    """One panel per direction, TFLOP/s against width (log 2); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    directions = [d for d in DIRECTIONS if points.get(d)]
    fig, axes = plt.subplots(1, len(directions), figsize=(6 * len(directions), 4), squeeze=False)
    for ax, direction in zip(axes[0], directions, strict=True):
        for impl in _impls(points[direction]):
            widths = sorted(points[direction][impl])
            ax.plot(widths, [points[direction][impl][w] for w in widths], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("causal window width (keys a query sees)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{direction}, L=32768 D=128 bf16")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(args: argparse.Namespace) -> int:
    try:
        run = load(args.run)
    except (OSError, ValueError) as err:
        print(f"windows: cannot read {args.run}: {err}", file=sys.stderr)
        return 2
    points = sweep_points(run)
    if not points:
        print(f"windows: {args.run} holds no case of the window-width sweep (time it with "
              "`make window-sweep`)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(points)
    (out / "windows.md").write_text(text, encoding="utf-8")
    print(text)
    if not plot(points, out / "windows.png"):
        print("matplotlib is not installed: no plot written", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("windows", help="TFLOP/s against window width (table + plot)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN.json")
    p.add_argument("--out", required=True, help="folder for windows.md and windows.png")
    p.set_defaults(func=main)
