"""The cost model of distributed local attention (`python -m fastattn.perf halo-model`)."""

import pytest

from fastattn.perf import halo
from fastattn.perf.__main__ import main

SHAPE = halo.Shape(1, 16, 65536, 128, (4096, 0))


def test_halo_bytes_are_window_rows_of_keys_and_values():
    # 4096 positions of k and v, (B, H, D) = (1, 16, 128) each, 2 bytes: in from the left
    # neighbour and out to the right one.
    p = halo.predict(SHAPE, 8)
    assert p.bytes_in == p.bytes_out == 4096 * 2 * 16 * 128 * 2
    assert halo.predict(halo.Shape(2, 8, 1000, 64, (100, 30), "fp32"), 4).bytes_in == (
        (100 + 30) * 2 * 2 * 8 * 64 * 4)


def test_bytes_per_rank_do_not_grow_with_the_gpu_count():
    sizes = {(p.bytes_in, p.bytes_out) for p in (halo.predict(SHAPE, n) for n in (8, 64, 512))}
    assert len(sizes) == 1


def test_efficiency_is_one_on_one_gpu_and_falls_with_scale():
    assert halo.predict(SHAPE, 1).efficiency("fwd") == pytest.approx(1.0)
    efficiencies = [halo.predict(SHAPE, n).efficiency("fwd") for n in (2, 8, 64, 512)]
    assert all(0 < e < 1 for e in efficiencies)
    assert efficiencies == sorted(efficiencies, reverse=True)


def test_window_wider_than_a_shard_reaches_several_ranks():
    p = halo.predict(halo.Shape(1, 1, 1000, 64, (2500, 0)), 8)
    assert p.bytes_in == 2500 * 2 * 64 * 2


def test_command_prints_one_row_per_gpu_count(capsys):
    assert main(["halo-model", "--gpus", "2", "64"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 ")
            or line.startswith("| 64 ")]
    assert len(rows) == 2 and "network" in rows[1]
