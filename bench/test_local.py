"""Sliding-window attention: fastattn beside FlexAttention, SDPA, the reference, fast-transformers."""

import pytest

from bench.harness import bench
from fastattn.perf.timing import round_timer

OPS = ("local",)
pytestmark = pytest.mark.benchmark(timer=round_timer)


def test_local(benchmark, bench_item, bench_device, timing_config, machine):
    impl, case, direction = bench_item
    bench(benchmark, impl, case, direction, device=bench_device, config=timing_config,
          machine=machine)
