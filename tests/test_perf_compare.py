"""`python -m fastattn.perf compare` and `baseline`: exit codes, reasons, thresholds, outputs, atomic writes."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastattn.perf import runs as runs_module
from fastattn.perf.__main__ import main
from fastattn.perf.cases import case_set
from fastattn.perf.runs import load_run, scaled
from tests.perf_factory import DEVICE, case_name, make_run, noisy_cases, write_run


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def pair(tmp_path, rng):
    """Baseline and an A/A run of the same cases (new noise draws), as files."""
    base = write_run(tmp_path / "base.json", make_run(noisy_cases(rng)))
    run = write_run(tmp_path / "run.json", make_run(noisy_cases(rng)))
    return base, run


@pytest.fixture(autouse=True)
def _no_step_summary(monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def gate(*argv):
    return main(["compare", *map(str, argv)])


def test_aa_run_passes(pair, capsys):
    assert gate(*pair) == 0
    out = capsys.readouterr()
    assert "perf gate: pass: 4 unchanged" in out.out
    assert out.out.count("| unchanged |") == 4


def test_every_sample_scaled_by_1_2_fails(tmp_path, pair, capsys):
    base, run = pair
    slow = write_run(tmp_path / "slow.json", scaled(json.loads(open(run).read()), 1.2))
    assert gate(base, slow) == 1
    out = capsys.readouterr()
    assert out.out.count("**REGRESSION**") == 4
    assert "perf gate: FAIL: 4 regression" in out.err


def test_one_slow_case_fails_and_is_listed_first(tmp_path, rng, capsys):
    cases = noisy_cases(rng)
    base = write_run(tmp_path / "b.json", make_run(cases))
    slow = dict(noisy_cases(rng))
    slow[case_name(2)] = slow[case_name(2)] * 1.10
    assert gate(base, write_run(tmp_path / "r.json", make_run(slow))) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert "REGRESSION" in rows[1] and "L3072" in rows[1] and "| +" in rows[1]  # rows[0]: header


def test_improvements_new_and_missing_cases_are_reported_not_failed(tmp_path, rng, capsys):
    base_cases = noisy_cases(rng, n_cases=3)
    run_cases = {k: v / 1.3 for k, v in noisy_cases(rng, n_cases=2).items()}
    run_cases[case_name(7)] = rng.lognormal(-9, 0.02, 30)
    code = gate(write_run(tmp_path / "b.json", make_run(base_cases)), write_run(tmp_path / "r.json", make_run(run_cases)))
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("| improvement |") == 2 and out.count("| new |") == 1 and out.count("| missing |") == 1


def test_cases_added_to_the_table_are_new_against_an_older_baseline(tmp_path, rng, capsys):
    # The GQA, decode and packed cases (issue 14) joined `default` after bench/baselines/ was
    # saved: a run holding them passes the gate, and they are listed as new beside the judged
    # cases.
    added = [c for c in case_set("default") if c.kv_heads is not None or not c.plain]
    old_names = [f"bench/test_local.py::test_local[{impl}-{c.bench_id(d)}]"
                 for c in case_set("default")[:2] for d in c.directions
                 for impl in ("fastattn", "flex")]
    new_names = [f"bench/test_local.py::test_local[fastattn-{c.bench_id(d)}]"
                 for c in added for d in c.directions]
    base_cases = {name: 1e-4 * rng.lognormal(0.0, 0.02, 30) for name in old_names}
    run_cases = {name: t * rng.lognormal(0.0, 0.02, 30) for name, t in base_cases.items()}
    run_cases.update({name: 1e-3 * rng.lognormal(0.0, 0.02, 30) for name in new_names})
    code = gate(write_run(tmp_path / "b.json", make_run(base_cases)),
                write_run(tmp_path / "r.json", make_run(run_cases)))
    out = capsys.readouterr().out
    assert code == 0
    new_rows = [line for line in out.splitlines() if "| new |" in line]
    assert len(new_rows) == len(new_names) == 7  # GQA and MQA 2 each, decode 1, packed 2
    assert all(any(c.id.split("-", 2)[2] in row for c in added) for row in new_rows)
    assert f"perf gate: pass: 7 new, {len(old_names)} unchanged" in out


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "cannot read"),
        ("", "not valid JSON (truncated or corrupt?)"),
        ("[1, 2]", "no 'benchmarks' list"),
        ('{"benchmarks": []}', "holds no benchmark"),
    ],
)
def test_unusable_run_file_exits_2_with_one_line_reason(tmp_path, pair, capsys, content, reason):
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert gate(pair[0], bad) == 2
    err = capsys.readouterr().err
    assert reason in err and str(bad) in err
    assert err.count("\n") == 1


def test_truncated_run_exits_2(tmp_path, pair, capsys):
    text = open(pair[1]).read()
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: len(text) // 2])
    assert gate(pair[0], truncated) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def broken(run: dict, how: str) -> dict:
    bench = run["benchmarks"][0]
    if how == "no-data":
        del bench["stats"]["data"]
    elif how == "negative":
        bench["stats"]["data"][3] = -1.0
    elif how == "nan":
        bench["stats"]["data"][3] = float("nan")
    elif how == "duplicate":
        run["benchmarks"].append(bench)
    elif how == "no-device":
        run["machine_info"] = {}
    elif how == "no-fullname":
        del bench["fullname"]
    return run


@pytest.mark.parametrize(
    "how, reason",
    [
        ("no-data", "--benchmark-save-data"),
        ("negative", "not a positive finite time"),
        ("nan", "not a positive finite time"),
        ("duplicate", "twice"),
        ("no-device", "names no device"),
        ("no-fullname", "no 'fullname'"),
    ],
)
def test_malformed_benchmarks_exit_2(tmp_path, rng, pair, capsys, how, reason):
    bad = write_run(tmp_path / "bad.json", broken(make_run(noisy_cases(rng)), how))
    assert gate(bad, pair[1]) == 2
    assert reason in capsys.readouterr().err


def test_different_devices_are_refused_unless_allowed(tmp_path, rng, pair, capsys):
    other = write_run(tmp_path / "h200.json", make_run(noisy_cases(rng), device="nvidia-h200"))
    assert gate(pair[0], other) == 2
    err = capsys.readouterr().err
    assert "nvidia-h100-80gb-hbm3" in err and "nvidia-h200" in err and "--allow-device-mismatch" in err
    assert gate(pair[0], other, "--allow-device-mismatch") == 0


def test_no_common_case_exits_2(tmp_path, rng, pair, capsys):
    other = write_run(tmp_path / "other.json", make_run(noisy_cases(rng, impl="flex")))
    assert gate(pair[0], other) == 2
    assert "no case in common" in capsys.readouterr().err


def test_cpu_brand_identifies_the_device_without_a_fastattn_record(tmp_path, rng):
    run = make_run(noisy_cases(rng))
    del run["machine_info"]["fastattn"]
    path = write_run(tmp_path / "cpu.json", run)
    assert load_run(path).device == "cpu-amd-epyc"


def test_real_pytest_benchmark_output_loads(tmp_path):
    # The contract is pytest-benchmark's own file: make one, without the repo's conftest.
    (tmp_path / "test_tiny.py").write_text(textwrap.dedent("""
        def test_tiny(benchmark):
            benchmark.group = "tiny"
            benchmark.pedantic(sum, args=(range(100),), rounds=7, iterations=3)
    """))
    out = tmp_path / "run.json"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(tmp_path / "test_tiny.py"), f"--benchmark-json={out}", "--benchmark-save-data"],
        cwd=tmp_path, check=True, capture_output=True,
    )
    run = load_run(out)
    (case,) = run.cases.values()
    assert case.fullname == "test_tiny.py::test_tiny" and case.group == "tiny" and case.samples.size == 7
    assert run.device.startswith("cpu-")


# --- thresholds ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_thresholds_file_per_case_glob(tmp_path, rng, suffix, capsys):
    cases = noisy_cases(rng)
    base = write_run(tmp_path / "b.json", make_run(cases))
    slow = write_run(tmp_path / "r.json", make_run({k: v * 1.10 for k, v in noisy_cases(rng).items()}))
    # Brackets in node ids are literal; the last matching glob wins.
    table = {"default": "5%", "cases": {"*[fastattn-*": "20%", "*L1024D64*": "2%"}}
    if suffix == ".json":
        text = json.dumps(table)
    else:
        text = 'default = "5%"\n[cases]\n"*[fastattn-*" = "20%"\n"*L1024D64*" = 0.02\n'
    path = tmp_path / f"thresholds{suffix}"
    path.write_text(text)
    assert gate(base, slow, "--thresholds", path) == 1
    out = capsys.readouterr().out
    assert out.count("**REGRESSION**") == 1 and "L1024D64" in out.split("**REGRESSION**")[1].splitlines()[0]
    assert out.count("| 20% |") == 3


def test_threshold_option_and_off(tmp_path, rng, capsys):
    base = write_run(tmp_path / "b.json", make_run(noisy_cases(rng)))
    slow = write_run(tmp_path / "r.json", make_run({k: v * 1.10 for k, v in noisy_cases(rng).items()}))
    assert gate(base, slow, "--threshold", "15%") == 0
    assert gate(base, slow, "--threshold", "0.05") == 1
    assert gate(base, slow, "--threshold", "off") == 0


@pytest.mark.parametrize(
    "table, reason",
    [
        ({"default": "five"}, "is not a threshold"),
        ({"default": 5}, "out of range"),
        ({"cases": {"*": "-1%"}}, "out of range"),
        ({"defaults": "5%"}, "unknown key"),
        ({"cases": ["*"]}, "'cases' must be a table"),
    ],
)
def test_bad_thresholds_file_exits_2(tmp_path, pair, capsys, table, reason):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    assert gate(*pair, "--thresholds", path) == 2
    assert reason in capsys.readouterr().err


# --- outputs -------------------------------------------------------------------------------


def test_markdown_file_and_github_step_summary(tmp_path, pair, monkeypatch, capsys):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out_md = tmp_path / "out" / "verdict.md"
    assert gate(*pair, "--markdown", out_md) == 0
    table = capsys.readouterr().out
    assert out_md.read_text() == table
    assert summary.read_text() == "earlier step\n" + table + "\n"
    header = [line for line in table.splitlines() if line.startswith("| verdict")][0]
    assert header.count("|") - 1 == 9  # columns, and each row has as many
    assert all(line.count("|") == header.count("|") for line in table.splitlines() if line.startswith("| "))


# --- baselines -----------------------------------------------------------------------------


def test_baseline_dir_picks_the_device_baseline(tmp_path, pair, capsys):
    baselines = tmp_path / "baselines"
    assert main(["baseline", pair[0], "--dir", str(baselines)]) == 0
    assert (baselines / f"{DEVICE}.json").read_bytes() == open(pair[0], "rb").read()
    assert gate("--baseline-dir", baselines, pair[1]) == 0


def test_missing_device_baseline_exits_2_naming_the_device(tmp_path, rng, capsys):
    (tmp_path / "nvidia-h200.json").write_text("{}")
    run = write_run(tmp_path / "r.json", make_run(noisy_cases(rng)))
    assert gate("--baseline-dir", tmp_path, run) == 2
    err = capsys.readouterr().err
    assert DEVICE in err and "nvidia-h200" in err and "make baseline" in err


def test_baseline_refuses_a_bad_run_and_keeps_the_old_one(tmp_path, rng, pair, capsys):
    baselines = tmp_path / "baselines"
    assert main(["baseline", pair[0], "--dir", str(baselines)]) == 0
    old = (baselines / f"{DEVICE}.json").read_bytes()
    few = write_run(tmp_path / "few.json", make_run(noisy_cases(rng, rounds=3)))
    assert main(["baseline", few, "--dir", str(baselines)]) == 2
    assert "every case has fewer than 5 rounds" in capsys.readouterr().err
    truncated = tmp_path / "t.json"
    truncated.write_text(open(pair[1]).read()[:300])
    assert main(["baseline", str(truncated), "--dir", str(baselines)]) == 2
    assert (baselines / f"{DEVICE}.json").read_bytes() == old
    assert os.listdir(baselines) == [f"{DEVICE}.json"]


def test_baseline_warns_about_cases_too_short_to_gate(tmp_path, rng, capsys):
    cases = noisy_cases(rng, n_cases=2) | noisy_cases(rng, n_cases=1, rounds=4, impl="reference")
    assert main(["baseline", write_run(tmp_path / "r.json", make_run(cases)), "--dir", str(tmp_path / "b")]) == 0
    assert "1 case(s) have fewer than 5 rounds" in capsys.readouterr().err


def test_cases_timed_differently_are_not_judged(tmp_path, rng, capsys):
    base, run = make_run(noisy_cases(rng)), make_run(noisy_cases(rng, factor=2.0))
    for b in base["benchmarks"]:
        b["extra_info"]["timing_mode"] = "graph"
    for b in run["benchmarks"]:
        b["extra_info"]["timing_mode"] = "eager"
    run["benchmarks"][0]["extra_info"]["timing_mode"] = "graph"
    assert gate(write_run(tmp_path / "b.json", base), write_run(tmp_path / "r.json", run)) == 1
    out = capsys.readouterr().out
    assert out.count("| incomparable |") == 3 and out.count("**REGRESSION**") == 1


@pytest.mark.parametrize("crash_at", ["write", "fsync", "replace"])
def test_baseline_write_is_atomic_when_it_crashes(tmp_path, pair, monkeypatch, crash_at):
    baselines = tmp_path / "baselines"
    assert main(["baseline", pair[0], "--dir", str(baselines)]) == 0
    target = baselines / f"{DEVICE}.json"
    old = target.read_bytes()

    class Crash(BaseException):  # like a KeyboardInterrupt or a kill, not an ordinary error
        pass

    def crash(*args, **kwargs):
        raise Crash

    if crash_at == "write":
        # half of the new file is written, then the process dies
        real_fdopen = os.fdopen

        def fdopen(fd, mode):
            f = real_fdopen(fd, mode)
            real_write = f.write

            class Half:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()

                def write(self, data):
                    real_write(data[: len(data) // 2])
                    raise Crash

                def __getattr__(self, name):
                    return getattr(f, name)

            return Half()

        monkeypatch.setattr(runs_module.os, "fdopen", fdopen)
    else:
        monkeypatch.setattr(runs_module.os, crash_at, crash)
    with pytest.raises(Crash):
        main(["baseline", pair[1], "--dir", str(baselines)])
    assert target.read_bytes() == old
    assert os.listdir(baselines) == [target.name]  # no temporary file left behind


# --- confirming regressions with a rerun -----------------------------------------------------


@pytest.mark.parametrize("rerun_factor, code, verdict", [(1.0, 0, "unconfirmed"), (1.2, 1, "**REGRESSION**")])
def test_a_regression_stands_only_if_the_rerun_shows_it(tmp_path, rng, capsys, rerun_factor, code, verdict):
    base = write_run(tmp_path / "b.json", make_run(noisy_cases(rng)))
    slow = dict(noisy_cases(rng))
    slow[case_name(1)] = slow[case_name(1)] * 1.2  # one case drifted (or regressed) in this process
    run = write_run(tmp_path / "r.json", make_run(slow))
    rerun = write_run(tmp_path / "rerun-source.json", make_run({case_name(1): noisy_cases(rng)[case_name(1)] * rerun_factor}))
    command = f"echo {{k}} > {tmp_path}/k.txt && cp {rerun} {tmp_path}/confirm.json"
    assert gate(base, run, "--confirm-with", command, "--confirm-run", tmp_path / "confirm.json") == code
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "L2048" in line)
    assert row.startswith(f"| {verdict} |") and "(rerun " in row
    assert (tmp_path / "k.txt").read_text().strip() == case_name(1).split("::")[1]


def test_a_failed_rerun_leaves_the_regressions_standing(tmp_path, pair, capsys):
    slow = write_run(tmp_path / "slow.json", scaled(json.loads(open(pair[1]).read()), 1.2))
    assert gate(pair[0], slow, "--confirm-with", "exit 3", "--confirm-run", tmp_path / "none.json") == 1
    assert "the confirming run failed (exit 3" in capsys.readouterr().err


# --- only the gated implementation fails; the others are controls -----------------------------


def _with_controls(rng, factor_ours=1.0, factor_controls=1.0, n_controls=4):
    cases = noisy_cases(rng, factor=factor_ours)
    for impl in ("flex", "sdpa"):
        cases.update(noisy_cases(rng, n_cases=n_controls // 2, factor=factor_controls, impl=impl))
    return cases


def test_a_slower_peer_is_reported_not_failed(tmp_path, rng, capsys):
    base = write_run(tmp_path / "b.json", make_run(_with_controls(rng)))
    cases = _with_controls(rng)
    cases[case_name(0, "flex")] = cases[case_name(0, "flex")] * 1.3
    run = write_run(tmp_path / "r.json", make_run(cases))
    assert gate(base, run) == 0
    out = capsys.readouterr().out
    assert out.count("| control-slower |") == 1
    assert "| control-slower | `test_local[flex-" in out
    # gating every implementation (the old behaviour) fails it
    assert gate(base, run, "--gate", "all") == 1


def test_a_machine_wide_slowdown_shows_in_the_controls_and_does_not_fail_us(tmp_path, rng, capsys):
    base = write_run(tmp_path / "b.json", make_run(_with_controls(rng)))
    run = write_run(tmp_path / "r.json", make_run(_with_controls(rng, 1.25, 1.25)))
    assert gate(base, run) == 0
    out = capsys.readouterr().out
    assert "median run/baseline ratio 1.2" in out and "times this drift" in out
    assert gate(base, run, "--no-drift") == 1


def test_our_slowdown_beside_steady_controls_fails(tmp_path, rng, capsys):
    base = write_run(tmp_path / "b.json", make_run(_with_controls(rng)))
    slow = scaled(make_run(_with_controls(rng)), 1.2, impl="fastattn")
    run = write_run(tmp_path / "r.json", slow)
    assert gate(base, run) == 1
    out = capsys.readouterr().out
    assert out.count("**REGRESSION**") == 4 and "test_local[fastattn-" in out


def test_our_slowdown_beyond_the_controls_drift_still_fails(tmp_path, rng):
    base = write_run(tmp_path / "b.json", make_run(_with_controls(rng)))
    run = write_run(tmp_path / "r.json", make_run(_with_controls(rng, 1.10 * 1.2, 1.10)))
    assert gate(base, run) == 1


def test_too_few_controls_apply_no_drift(tmp_path, rng, capsys):
    base = write_run(tmp_path / "b.json", make_run(_with_controls(rng, n_controls=2)))
    run = write_run(tmp_path / "r.json", make_run(_with_controls(rng, 1.25, 1.25, n_controls=2)))
    assert gate(base, run) == 1
    assert "fewer than 3: no machine drift applied" in capsys.readouterr().out


def test_a_case_is_judged_against_its_processes_spread(tmp_path, rng, capsys):
    cases = noisy_cases(rng)
    base_raw = make_run(cases)
    for bench in base_raw["benchmarks"]:
        bench["extra_info"]["process_spread"] = 0.15  # the processes of the baseline disagreed by 15%
    base = write_run(tmp_path / "b.json", base_raw)
    run = write_run(tmp_path / "r.json", make_run(noisy_cases(rng, factor=1.10)))
    assert gate(base, run) == 0
    assert "| 5% → 15% |" in capsys.readouterr().out
    run = write_run(tmp_path / "r2.json", make_run(noisy_cases(rng, factor=1.30)))
    assert gate(base, run) == 1


def test_a_slowdown_is_caught_past_one_slow_baseline_process(tmp_path, rng, capsys):
    """A baseline of seven processes, two of them in a slow mode, still catches x1.2: what is
    compared is the fastest process, and its spread is the next-fastest's distance from it."""
    base_raw = make_run(noisy_cases(rng))
    for bench in base_raw["benchmarks"]:
        median = float(np.median(bench["stats"]["data"]))
        bench["extra_info"]["process_medians"] = [median * f for f in (1.6, 1.0, 1.02, 1.6, 1.01, 1.03, 1.04)]
        bench["extra_info"]["process_spread"] = 0.6  # as written before: max / min - 1
    base = write_run(tmp_path / "b.json", base_raw)
    assert gate(base, write_run(tmp_path / "r.json", make_run(noisy_cases(rng, factor=1.2)))) == 1


def test_bad_gate_option_exits_2(pair, capsys):
    assert gate(*pair, "--gate", " , ") == 2
    assert "--gate" in capsys.readouterr().err
