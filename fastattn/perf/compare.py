"""`python -m fastattn.perf compare`: the regression gate.

Compares a run with a baseline case by case (cases are matched by pytest node id,
``fullname``) with the rule of :mod:`fastattn.perf.stats`, prints a markdown verdict table
(also appended to ``$GITHUB_STEP_SUMMARY`` when that is set) and exits

Only the gated implementations' cases can fail (``--gate``, default fastattn: a case's
implementation is its ``extra_info["impl"]``; a case without one is gated). The others
(peers, references) are *controls*: judged and reported, never failed, and their median
run/baseline ratio is the machine's drift: when the controls are slower, each gated case is
judged against its threshold times that drift (a machine-wide slowdown is not ours). A case
whose baseline (or run) was timed in several processes (``fastest-of``) keeps its fastest
process, and is judged against the larger of its threshold and that kept median's
between-process spread (``fastest.fastest_spread``: second-lowest / lowest process median).

- 0: no case regressed (improvements, unclear moves, new and missing cases are reported only),
- 1: at least one case regressed,
- 2: the input is unusable (missing, corrupt or truncated file, no common case, runs of
  different devices unless ``--allow-device-mismatch``), with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastattn.perf import stats
from fastattn.perf.fastest import fastest_spread
from fastattn.perf.runs import Case, Run, RunError, load_run

EXIT_OK, EXIT_REGRESSION, EXIT_UNUSABLE = 0, 1, 2

# Table order: what needs a look first.
VERDICTS = ("regression", "unconfirmed", "slower?", "control-slower", "incomparable", "missing", "improvement", "faster?", "new", "unchanged")
# The implementations whose cases can fail the gate unless --gate says otherwise.
DEFAULT_GATE = ("fastattn",)
# Fewer controls than this tell nothing reliable about the machine: no drift is applied.
MIN_CONTROLS = 3
# extra_info keys that must agree for two timings of a case to be comparable (graph-batched GPU
# time and eager per-call latency answer different questions; see DESIGN.md).
SETUP_KEYS = ("timing_mode",)


# ---------------------------------------------------------------------------------------------
# thresholds


def parse_threshold(value, where: str = "threshold") -> float:
    """"5%" or 0.05 -> 0.05; "off" -> inf (the case is reported, never failed)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "off":
            return math.inf
        try:
            number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise RunError(f"{where}: {value!r} is not a threshold (write 5% or 0.05, or off)") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise RunError(f"{where}: {value!r} is not a threshold (write 5% or 0.05, or off)")
    if not 0 <= number < 1:
        raise RunError(f"{where}: {value!r} is out of range (a fraction in [0, 1) such as 0.05, or a percentage such as 5%)")
    return number


def _glob(pattern: str) -> re.Pattern:
    # Only * and ? are wildcards: node ids are full of [ ] that fnmatch would read as classes.
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.S)


@dataclass(frozen=True)
class Thresholds:
    default: float = stats.DEFAULT_THRESHOLD
    patterns: tuple[tuple[str, re.Pattern, float], ...] = ()

    def for_case(self, fullname: str) -> float:
        """The threshold of the last pattern that matches the whole node id, else the default."""
        for _, regex, value in reversed(self.patterns):
            if regex.fullmatch(fullname):
                return value
        return self.default


def load_thresholds(path: str | None, default: str | None = None) -> Thresholds:
    """Thresholds from a JSON or TOML file, ``{default = "5%", cases = {"<glob>" = "10%"}}``;
    `default` (the --threshold option) overrides the file's default."""
    table: dict = {}
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise RunError(f"cannot read thresholds file {path}: {err.strerror or err}") from None
        table = _parse_table(text, path)
        unknown = set(table) - {"default", "cases"}
        if unknown:
            raise RunError(f"{path}: unknown key(s) {sorted(unknown)}; expected 'default' and 'cases'")
        if not isinstance(table.get("cases", {}), dict):
            raise RunError(f"{path}: 'cases' must be a table of glob = threshold")
    if default is not None:
        value = parse_threshold(default, "--threshold")
    elif "default" in table:
        value = parse_threshold(table["default"], f"{path}: default")
    else:
        value = stats.DEFAULT_THRESHOLD
    patterns = tuple(
        (glob, _glob(glob), parse_threshold(v, f"{path}: cases.{glob!r}"))
        for glob, v in table.get("cases", {}).items()
    )
    return Thresholds(value, patterns)


def _parse_table(text: str, path: str) -> dict:
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise RunError(f"{path}: reading TOML needs Python 3.11 or the tomli package; or write it as JSON") from None
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise RunError(f"{path} is not valid TOML: {err}") from None
    else:
        try:
            table = json.loads(text)
        except json.JSONDecodeError as err:
            raise RunError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(table, dict):
        raise RunError(f"{path}: expected a table with 'default' and 'cases'")
    return table


def check_alpha(alpha: float) -> None:
    if not 0 < alpha < 0.5:
        raise RunError(f"--alpha must be in (0, 0.5), got {alpha}")


def add_threshold_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", metavar="PCT", help="slowdown allowed per case, e.g. 5%% or 0.05 (default 5%%, or the thresholds file's default)")
    parser.add_argument("--thresholds", metavar="FILE", help="JSON or TOML: default = '5%%' and cases = {'<glob on node id>' = '10%%'}; the last matching glob wins")
    parser.add_argument("--alpha", type=float, default=stats.ALPHA, help="significance level of the one-sided test per case (default %(default)s)")


# ---------------------------------------------------------------------------------------------
# presentation


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.4g} {unit}"
    return f"{seconds / 1e-9:.4g} ns"


def format_pct(fraction: float) -> str:
    return "off" if math.isinf(fraction) else f"{fraction * 100:.3g}%"


def format_change(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def display_names(fullnames) -> dict[str, str]:
    """Shortest readable label per case: the node id without its file where that stays unique."""
    short = {f: f.split("::", 1)[-1] for f in fullnames}
    if len(set(short.values())) == len(short):
        return short
    return {f: f for f in fullnames}


# ---------------------------------------------------------------------------------------------
# the comparison


@dataclass(frozen=True)
class Row:
    fullname: str
    verdict: str
    base: Case | None
    run: Case | None
    judgement: stats.Judgement | None
    threshold: float  # the configured one; judgement.threshold is what the case was judged at
    confirm: stats.Judgement | None = None  # the rerun's judgement, where one was taken
    gated: bool = True  # False: a control, never failed


def impl_of(case: Case) -> str | None:
    impl = case.extra_info.get("impl")
    return str(impl) if impl is not None else None


def is_gated(case: Case, gate: tuple[str, ...] | None) -> bool:
    """Whether a case can fail: every case with gate=None, else those of the gated
    implementations and those that name no implementation."""
    impl = impl_of(case)
    return gate is None or impl is None or impl in gate


def process_spread(case: Case | None) -> float:
    """The between-process noise of a case's kept median where it was timed in several processes
    (``fastest.fastest_spread``), else 0."""
    if case is None:
        return 0.0
    medians = case.extra_info.get("process_medians")
    if isinstance(medians, list) and len(medians) > 1 and all(
            isinstance(m, (int, float)) and math.isfinite(m) and m > 0 for m in medians):
        return fastest_spread(medians)  # files written before the spread was the jackknife's
    value = case.extra_info.get("process_spread")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else 0.0


def effective_threshold(threshold: float, spread: float, drift: float) -> float:
    """The slowdown a gated case may show: its threshold or its processes' spread, whichever is
    larger, on top of the machine's drift (1 when the controls are not slower)."""
    if math.isinf(threshold):
        return threshold
    return (1.0 + max(threshold, spread)) * drift - 1.0


@dataclass(frozen=True)
class Report:
    baseline: Run
    run: Run
    rows: list[Row]
    alpha: float
    gate: tuple[str, ...] | None = DEFAULT_GATE
    drift: float = 1.0  # the controls' median run/baseline ratio (nan: too few controls)
    controls: int = 0

    def count(self, verdict: str) -> int:
        return sum(r.verdict == verdict for r in self.rows)

    @property
    def exit_code(self) -> int:
        return EXIT_REGRESSION if self.count("regression") else EXIT_OK

    def summary(self) -> str:
        parts = [f"{self.count(v)} {v}" for v in VERDICTS if self.count(v)]
        state = "FAIL" if self.exit_code else "pass"
        return f"perf gate: {state}: " + ", ".join(parts)

    def markdown(self) -> str:
        names = display_names(r.fullname for r in self.rows)
        common = [r.judgement.ratio for r in self.rows if r.judgement]
        overall = sorted(common)[len(common) // 2] if common else math.nan
        lines = [
            f"### {self.summary()}",
            "",
            f"Baseline `{self.baseline.path}` ({self.baseline.short_commit}) vs run `{self.run.path}` "
            f"({self.run.short_commit}) on {self.run.device_name} (`{self.run.device}`)"
            + ("" if self.run.device == self.baseline.device else f"; baseline device `{self.baseline.device}`")
            + f". Median run/baseline ratio over common cases: {overall:.3f}.",
            "",
            self._controls_line(),
            "",
            "| verdict | case | baseline | run | change | interval | noise base / run | threshold | rounds |",
            "|---|---|---:|---:|---:|---|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(_markdown_row(r, names[r.fullname]))
        lines += [
            "",
            f"A case regresses when its median is slower by more than its threshold **and** a one-sided "
            f"Mann-Whitney U test on the per-round samples rejects \"at most threshold slower\" at "
            f"α = {self.alpha:g}. *interval*: run/baseline time ratios the test cannot reject on either "
            f"side (a {100 * (1 - 2 * self.alpha):g}% interval); *noise*: IQR/median of each side's rounds; "
            "`?`: moved beyond the threshold by the medians, not clearly on the samples (reported, not failed); "
            "*unconfirmed*: a regression that a second timing of the case, in a fresh process, did not show "
            "(reported, not failed); "
            f"*incomparable*: timed differently ({', '.join(SETUP_KEYS)} differs), not judged; "
            "*control-slower*: a control (not a gated implementation) slower by the rule, reported only. "
            "*threshold*: the configured one, then what the case was judged at where the process spread "
            "or the controls' drift raised it.",
            "",
        ]
        return "\n".join(lines)

    def _controls_line(self) -> str:
        gated = "every implementation" if self.gate is None else ", ".join(self.gate)
        if self.gate is None or not self.controls:
            return f"Gated: {gated}; no controls."
        if math.isnan(self.drift):
            return (f"Gated: {gated}. Controls: {self.controls} case(s), fewer than {MIN_CONTROLS}: "
                    "no machine drift applied.")
        applied = ("gated cases judged against their threshold times this drift"
                   if self.drift > 1.0 else "not slower, so no drift applied")
        return (f"Gated: {gated}. Controls (the other implementations, reported, never failed): "
                f"{self.controls} case(s), median run/baseline ratio {self.drift:.3f}: {applied}.")


def _markdown_row(r: Row, name: str) -> str:
    verdict = f"**{r.verdict.upper()}**" if r.verdict == "regression" else r.verdict
    if not r.gated and r.verdict not in ("control-slower", "new", "missing"):
        verdict += " (control)"
    base = format_time(r.base.median) if r.base else "—"
    run = format_time(r.run.median) if r.run else "—"
    rounds = f"{r.base.samples.size if r.base else '—'} / {r.run.samples.size if r.run else '—'}"
    j = r.judgement
    if j is None:
        change = interval = noise = "—"
    else:
        change = format_change(j.ratio)
        if r.confirm is not None:
            change += f" (rerun {format_change(r.confirm.ratio)})"
        lo = "…" if math.isnan(j.low) else f"{j.low:.3f}"
        hi = "…" if math.isnan(j.high) else f"{j.high:.3f}"
        interval = f"{lo} – {hi}"
        noise = f"{j.noise_base * 100:.1f}% / {j.noise_run * 100:.1f}%"
    threshold = format_pct(r.threshold)
    if j is not None and not math.isinf(r.threshold) and not math.isclose(j.threshold, r.threshold):
        threshold += f" → {format_pct(j.threshold)}"
    return f"| {verdict} | `{name}` | {base} | {run} | {change} | {interval} | {noise} | {threshold} | {rounds} |"


def compare_runs(
    baseline: Run,
    run: Run,
    thresholds: Thresholds | None = None,
    alpha: float = stats.ALPHA,
    allow_device_mismatch: bool = False,
    confirm: Run | None = None,
    gate: tuple[str, ...] | None = DEFAULT_GATE,
    drift_from_controls: bool = True,
) -> Report:
    """Judge every case; raises RunError where the two runs cannot be compared.

    `confirm`: a second run of (some of) the cases, taken after this one. A regression stands
    only if the case regresses in `confirm` too; otherwise it is "unconfirmed" (reported only).
    `gate`: the implementations whose cases can fail (None: all); the others are controls.
    `drift_from_controls`: judge gated cases against their threshold times the controls'
    median ratio when that is above 1.
    """
    thresholds = thresholds or Thresholds()
    if baseline.device != run.device and not allow_device_mismatch:
        raise RunError(
            f"baseline {baseline.path} is for device {baseline.device!r} but run {run.path} is for "
            f"{run.device!r}; pass --allow-device-mismatch to compare them anyway"
        )
    common = [f for f in baseline.cases if f in run.cases]
    if not common:
        raise RunError(f"baseline {baseline.path} and run {run.path} have no case in common")
    names = sorted(set(baseline.cases) | set(run.cases))
    comparable = {
        f for f in common
        if all(baseline.cases[f].extra_info.get(k) == run.cases[f].extra_info.get(k) for k in SETUP_KEYS)
    }
    controls = [f for f in sorted(comparable) if not is_gated(baseline.cases[f], gate)]
    ratios = sorted(run.cases[f].median / baseline.cases[f].median for f in controls)
    drift = float(np.median(ratios)) if len(ratios) >= MIN_CONTROLS else math.nan
    applied = drift if drift_from_controls and drift > 1.0 else 1.0
    rows = []
    for fullname in names:
        base, new = baseline.cases.get(fullname), run.cases.get(fullname)
        threshold = thresholds.for_case(fullname)
        gated = is_gated(base or new, gate)
        if base is None or new is None:
            rows.append(Row(fullname, "new" if base is None else "missing", base, new, None, threshold, gated=gated))
            continue
        if fullname not in comparable:
            rows.append(Row(fullname, "incomparable", base, new, None, threshold, gated=gated))
            continue
        spread = max(process_spread(base), process_spread(new))
        judged_at = effective_threshold(threshold, spread, applied if gated else 1.0)
        judgement = stats.judge(base.samples, new.samples, judged_at, alpha)
        verdict, second = judgement.verdict, None
        if not gated and verdict == "regression":
            verdict = "control-slower"
        if verdict == "regression" and confirm is not None and fullname in confirm.cases:
            second = stats.judge(base.samples, confirm.cases[fullname].samples, judged_at, alpha)
            verdict = "regression" if second.verdict == "regression" else "unconfirmed"
        rows.append(Row(fullname, verdict, base, new, judgement, threshold, second, gated))
    rows.sort(key=lambda r: (VERDICTS.index(r.verdict), not r.gated,
                             -(r.judgement.ratio if r.judgement else 0.0), r.fullname))
    return Report(baseline, run, rows, alpha, gate, drift, len(controls))


def baseline_for(run: Run, directory: str) -> str:
    """The baseline file for the run's device in `directory`; RunError naming what is there if none."""
    path = Path(directory) / f"{run.device}.json"
    if path.is_file():
        return str(path)
    have = sorted(p.stem for p in Path(directory).glob("*.json")) if Path(directory).is_dir() else []
    raise RunError(
        f"no baseline for device {run.device!r} ({run.device_name}) in {directory} "
        f"(baselines there: {', '.join(have) or 'none'}); make one on this device with `make baseline`"
    )


def publish(markdown: str, out: str | None) -> None:
    """The verdict table to stdout, to `out` if given, and appended to $GITHUB_STEP_SUMMARY if set."""
    sys.stdout.write(markdown)
    sys.stdout.flush()
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(markdown, encoding="utf-8")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(markdown + "\n")


# ---------------------------------------------------------------------------------------------
# command line


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="gate a run against a baseline (exit 0 pass, 1 regression, 2 unusable input)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="BASELINE RUN", help="baseline and run JSON; only RUN with --baseline-dir")
    p.add_argument("--baseline-dir", metavar="DIR", help="take the baseline DIR/<device>.json of the run's device")
    add_threshold_args(p)
    p.add_argument("--markdown", metavar="OUT", help="also write the verdict table to OUT")
    p.add_argument("--allow-device-mismatch", action="store_true", help="compare runs of different devices")
    p.add_argument("--gate", metavar="IMPLS", default=",".join(DEFAULT_GATE),
                   help="comma-separated implementations whose cases can fail (extra_info impl), or 'all'; "
                   "the others are controls, reported only (default %(default)s)")
    p.add_argument("--no-drift", action="store_true",
                   help="do not widen gated cases' thresholds by the controls' drift")
    p.add_argument("--confirm-with", metavar="CMD", help="shell command that times the regressed cases once more, "
                   "with {k} replaced by a pytest -k expression selecting them; a regression stands only if it shows again")
    p.add_argument("--confirm-run", metavar="FILE", help="the run that --confirm-with writes")
    p.set_defaults(func=main)


def parse_gate(text: str) -> tuple[str, ...] | None:
    """--gate: "all" -> None (every case gated), else the named implementations."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise RunError(f"--gate: {text!r} names no implementation (write e.g. fastattn, or all)")
    return None if names == ("all",) else names


def rerun_expression(fullnames) -> str:
    """A pytest -k expression selecting exactly these cases (names with their parameter ids)."""
    return " or ".join(sorted(f.split("::")[-1] for f in fullnames))


def confirm_regressions(report: Report, command: str, run_file: str) -> Run | None:
    """Run `command` for the report's regressions; the run it wrote, or None (regressions stand)."""
    regressed = [r.fullname for r in report.rows if r.verdict == "regression"]
    command = command.replace("{k}", shlex.quote(rerun_expression(regressed)))
    print(f"compare: {len(regressed)} regression(s); timing them once more to confirm: {command}", file=sys.stderr)
    Path(run_file).unlink(missing_ok=True)
    status = subprocess.run(command, shell=True, stdout=2).returncode  # its output to stderr: stdout is the table
    try:
        return load_run(run_file)
    except RunError as err:
        print(f"compare: the confirming run failed (exit {status}: {err}); the regressions stand", file=sys.stderr)
        return None


def main(args: argparse.Namespace) -> int:
    try:
        want = 1 if args.baseline_dir else 2
        if bool(args.confirm_with) != bool(args.confirm_run):
            raise RunError("--confirm-with and --confirm-run go together")
        if len(args.files) != want:
            raise RunError(
                "give BASELINE.json RUN.json, or RUN.json with --baseline-dir DIR"
                f" (got {len(args.files)} file(s))"
            )
        run = load_run(args.files[-1])
        baseline = load_run(baseline_for(run, args.baseline_dir) if args.baseline_dir else args.files[0])
        thresholds = load_thresholds(args.thresholds, args.threshold)
        check_alpha(args.alpha)
        gate = parse_gate(args.gate)
        options = dict(gate=gate, drift_from_controls=not args.no_drift)
        report = compare_runs(baseline, run, thresholds, args.alpha, args.allow_device_mismatch, **options)
        if args.confirm_with and report.count("regression"):
            rerun = confirm_regressions(report, args.confirm_with, args.confirm_run)
            if rerun is not None:
                report = compare_runs(baseline, run, thresholds, args.alpha, args.allow_device_mismatch, rerun,
                                      **options)
    except RunError as err:
        print(f"compare: {err}", file=sys.stderr)
        return EXIT_UNUSABLE
    publish(report.markdown(), args.markdown)
    print(report.summary(), file=sys.stderr)
    return report.exit_code
