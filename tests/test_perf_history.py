"""`python -m fastattn.perf history`: commit order, change points, plots, storage."""

import sys

import numpy as np
import pytest

from fastattn.perf.__main__ import main
from tests.perf_factory import make_run, noisy_cases, write_run

COMMITS = 6


def commit(k: int) -> str:
    return f"c{k:02d}" + "0" * 37


def history_runs(tmp_path, factors, device="nvidia-h100-80gb-hbm3", seed=0):
    """One file per commit k with every time times factors[k]; files named against commit order."""
    rng = np.random.default_rng(seed)
    paths = []
    for k, factor in enumerate(factors):
        run = make_run(noisy_cases(rng, n_cases=2, factor=factor) | noisy_cases(rng, n_cases=2, impl="flex"),
                       device=device, commit=commit(k), commit_time=f"2026-11-{10 + k:02d}T12:00:00+01:00")
        paths.append(write_run(tmp_path / f"{device}-{COMMITS - k}.json", run))
    return paths


def table_rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("| `c")]


def test_runs_in_commit_order_with_the_step_marked(tmp_path, capsys):
    # fastattn gets 20% slower at commit 3, then 30% faster at commit 5; flex does not move.
    paths = history_runs(tmp_path, [1, 1, 1, 1.2, 1.2, 1.2 / 1.3])
    out = tmp_path / "out"
    assert main(["history", *reversed(paths), "--out", str(out)]) == 0
    md = (out / "history.md").read_text()
    rows = table_rows(md)[:COMMITS]  # the first group's table
    assert [r.split("`")[1] for r in rows] == [commit(k)[:8] for k in range(COMMITS)]
    assert [("▲" in r, "▼" in r) for r in rows] == [(False, False)] * 3 + [(True, False), (False, False), (False, True)]
    # the change is against the reference: +20% against commit 0, then -23% against commit 3
    assert 15 < float(rows[3].split("▲ ")[1].split("%")[0]) < 25
    assert -28 < float(rows[5].split("▼ ")[1].split("%")[0]) < -18
    assert "| commit | date | `fastattn` | `flex` |" in md


def test_slow_drift_is_marked_where_it_adds_up(tmp_path):
    factors = [1.0, 1.02, 1.04, 1.06, 1.08, 1.10]
    out = tmp_path / "out"
    assert main(["history", *history_runs(tmp_path, factors), "--out", str(out)]) == 0
    rows = table_rows((out / "history.md").read_text())[:COMMITS]
    marked = [k for k, r in enumerate(rows) if "▲" in r]
    assert marked and marked[0] >= 3  # never at +2% or +4%, at the latest by +10%


def test_plots_are_drawn_per_group(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert main(["history", *history_runs(tmp_path, [1, 1.2, 1.2]), "--out", str(out)]) == 0
    pngs = sorted((out / "nvidia-h100-80gb-hbm3").glob("*.png"))
    assert len(pngs) == 2
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_without_matplotlib_the_table_is_written_and_the_reason_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    out = tmp_path / "out"
    assert main(["history", *history_runs(tmp_path, [1, 1]), "--out", str(out)]) == 0
    assert (out / "history.md").exists() and not list(out.rglob("*.png"))
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_devices_get_their_own_sections(tmp_path):
    paths = history_runs(tmp_path, [1, 1]) + history_runs(tmp_path, [2, 2], device="nvidia-h200")
    out = tmp_path / "out"
    assert main(["history", *paths, "--out", str(out)]) == 0
    md = (out / "history.md").read_text()
    assert "(`nvidia-h100-80gb-hbm3`): 2 runs" in md and "(`nvidia-h200`): 2 runs" in md
    assert not any("▲" in r for r in table_rows(md))  # a device is never compared with another


def test_storage_add_and_skip(tmp_path, capsys):
    storage = tmp_path / "storage"
    paths = history_runs(tmp_path, [1, 1.3])
    out = tmp_path / "out"
    assert main(["history", "--storage", str(storage), "--add", paths[0], "--out", str(out)]) == 0
    (storage / "junk.json").write_text('{"benchmarks": [')
    assert main(["history", "--storage", str(storage), "--add", paths[1], "--out", str(out)]) == 0
    saved = sorted(p.name for p in (storage / "nvidia-h100-80gb-hbm3").iterdir())
    assert saved == ["20261110T120000_c00000000000.json", "20261111T120000_c01000000000.json"]
    err = capsys.readouterr().err
    assert "history: skipped" in err and "junk.json is not valid JSON" in err
    assert "▲" in (out / "history.md").read_text()


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--out", "o"], "give RUN.json files or --storage"),
        (["--storage", "empty", "--out", "o"], "no run found"),
        (["missing.json", "--out", "o"], "cannot read"),
        (["x.json", "--add", "y.json", "--out", "o"], "--add needs --storage"),
    ],
)
def test_unusable_history_input_exits_2(tmp_path, monkeypatch, capsys, argv, reason):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(["history", *argv]) == 2
    assert reason in capsys.readouterr().err
