"""Clustered and improved-clustered attention: fastattn beside the reference and fast-transformers."""

import pytest

from bench.harness import bench
from fastattn.perf.timing import round_timer

OPS = ("clustered", "improved-clustered")
pytestmark = pytest.mark.benchmark(timer=round_timer)


def test_clustered(benchmark, bench_item, bench_device, timing_config, machine):
    impl, case, direction = bench_item
    bench(benchmark, impl, case, direction, device=bench_device, config=timing_config,
          machine=machine)
