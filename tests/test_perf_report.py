"""The report (markdown table, PNG chart) and the run checker, on a small synthetic run."""

import copy
import json

import pytest

from fastattn.perf import check, report


def bench(impl, group, median, *, op="local", mode="graph", tflops=100.0):
    return {
        "group": group, "name": f"test_local[{impl}-{group}]",
        "fullname": f"bench/test_local.py::test_local[{impl}-{group}]",
        "stats": {"median": median, "data": [median * 0.99, median, median * 1.01]},
        "extra_info": {"impl": impl, "op": op, "flops": tflops * 1e12 * median,
                       "tflops": tflops, "timing_mode": mode},
    }


FWD = "local-fwd-bf16-B1H16L16384D64-w256x256"
CLU = "clustered-fwd-fp32-B2H8L4096D64-c128"
RUN = {
    "machine_info": {"fastattn": {"device": "NVIDIA H100 80GB HBM3",
                                  "device_slug": "nvidia-h100-80gb-hbm3", "torch": "2.11.0"}},
    "commit_info": {"id": "0123456789abcdef", "dirty": False},
    "datetime": "2026-11-26T21:00:00",
    "benchmarks": [
        bench("fastattn", CLU, 1e-3, op="clustered"),
        bench("flex", FWD, 2e-4),
        bench("fastattn", FWD, 1e-4),
        bench("sdpa", FWD, 4e-4, mode="eager"),
    ],
}


def test_table_has_a_row_per_case_a_column_per_impl_and_speedups_vs_flex():
    text = report.table(RUN)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| case"))
    assert header == "| case | fastattn | flex | sdpa |"
    rows = [line for line in lines if line.startswith(("| local", "| clustered"))]
    assert rows[0].startswith(f"| {FWD} |"), "local attention comes first"
    cells = rows[0].split(" | ")
    assert "100 µs" in cells[1] and "2.00x" in cells[1]
    assert "1.00x" in cells[2]
    assert "0.50x" in cells[3] and "†" in cells[3], "eager-timed cells are marked"
    assert rows[1] == f"| {CLU} | 1 ms · 100 TF/s | — | — |"
    assert "NVIDIA H100 80GB HBM3" in text and "0123456789" in text


def test_write_makes_table_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(RUN))
    text = report.write(path, tmp_path / "out")
    assert (tmp_path / "out" / "table.md").read_text() == text
    assert (tmp_path / "out" / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_accepts_a_complete_run_and_names_each_gap():
    assert check.problems(RUN) == []
    broken = copy.deepcopy(RUN)
    del broken["benchmarks"][1]["stats"]["data"]
    broken["benchmarks"][2]["extra_info"].pop("tflops")
    broken["machine_info"]["fastattn"].pop("device_slug")
    found = check.problems(broken)
    assert any("flex" in p and "stats.data" in p for p in found)
    assert any("fastattn" in p and "tflops" in p for p in found)
    assert any("device_slug" in p for p in found)


def test_check_wants_fastattn_beside_a_peer():
    alone = copy.deepcopy(RUN)
    alone["benchmarks"] = [b for b in alone["benchmarks"] if b["extra_info"]["impl"] == "fastattn"]
    assert "no group holds fastattn beside a peer" in check.problems(alone)


def test_noise_reports_the_change_of_each_median_and_summarises_the_slow_ones():
    later = copy.deepcopy(RUN)
    for b, factor in zip(later["benchmarks"], (1.02, 0.5, 1.05, 1.0), strict=True):
        b["stats"]["median"] *= factor
    text = report.noise(RUN, later, min_s=1e-4)
    assert "+2.0%" in text and "-50.0%" in text and "+5.0%" in text
    # 4 medians >= 100 us in both runs (the 2e-4 one halves to 1e-4): 2 moved more than 3%.
    assert text.splitlines()[0].startswith("4 benchmarks") and "max 50.0%" in text
    assert "2 above 3%" in text


def test_noise_counts_benchmarks_of_one_run_only_and_compares_the_rest():
    later = copy.deepcopy(RUN)
    new = bench("fastattn", "local-fwd-bf16-B1H32KV8L16384D128-w4096x0", 3e-4)
    later["benchmarks"] = later["benchmarks"][1:] + [new]  # one case dropped, one added
    text = report.noise(RUN, later, min_s=1e-4)
    summary = text.splitlines()[0]
    assert "not compared: 1 only in the second run (new), 1 only in the first" in summary
    assert "KV8" not in text.split("\n", 1)[1]  # no row for it: nothing to compare with
    assert text.splitlines()[0].startswith("3 benchmarks")
