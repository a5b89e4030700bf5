"""`python -m fastattn.perf windows`: the window-width sweep's table (and plot) from a run."""

import json

from fastattn.perf.__main__ import main
from fastattn.perf.cases import WINDOW_WIDTHS, case_set, window_sweep
from fastattn.perf.windows import sweep_points, table


def _bench(impl, direction, width, tflops, L=32768, right=0):
    return {"name": f"{impl}-{width}", "fullname": f"x::{impl}-{direction}-{width}",
            "group": f"{direction}-{width}",
            "stats": {"median": 1e-3, "data": [1e-3] * 5},
            "extra_info": {"impl": impl, "op": "local", "dtype": "bf16", "B": 1, "H": 16, "L": L,
                           "D": 128, "window": [width - 1, right], "direction": direction,
                           "tflops": tflops}}


def _run():
    benches = [_bench(impl, d, w, base * w ** 0.1)
               for impl, base in (("fastattn", 300.0), ("flex", 250.0))
               for d in ("fwd", "fwd+bwd") for w in WINDOW_WIDTHS]
    benches.append(_bench("sdpa", "fwd", 64, 999.0, L=16384))  # another shape: ignored
    benches.append(_bench("sdpa", "fwd", 64, 999.0, right=5))  # not causal: ignored
    return {"benchmarks": benches}


def test_the_sweep_is_in_the_full_set_and_causal():
    ids = {c.id for c in case_set("full")}
    assert all(c.id in ids for c in window_sweep())
    assert [c.window for c in window_sweep()] == [(w - 1, 0) for w in WINDOW_WIDTHS]


def test_points_and_table_name_the_winner_per_width():
    points = sweep_points(_run())
    assert set(points) == {"fwd", "fwd+bwd"} and set(points["fwd"]) == {"fastattn", "flex"}
    assert sorted(points["fwd"]["flex"]) == list(WINDOW_WIDTHS)
    text = table(points)
    assert "| width | fastattn | flex |" in text
    assert f"| 8192 | **{300 * 8192 ** 0.1:.3g}** | {250 * 8192 ** 0.1:.3g} |" in text
    assert "999" not in text


def test_command_writes_the_table_and_refuses_a_run_without_the_sweep(tmp_path, capsys):
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_run()))
    assert main(["windows", str(run), "--out", str(tmp_path / "out")]) == 0
    assert "### fwd+bwd" in (tmp_path / "out" / "windows.md").read_text()
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": [_bench("sdpa", "fwd", 64, 1.0, L=16384)]}))
    assert main(["windows", str(empty), "--out", str(tmp_path / "o2")]) == 2
    assert "make window-sweep" in capsys.readouterr().err
