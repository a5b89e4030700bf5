"""What pytest-benchmark records through fastattn.perf.timing is the time of the op itself.

Each test runs a real pytest-benchmark session in a subprocess (as ``make bench`` does) and
reads its JSON. On a CPU the recorded rounds are host time; on a GPU (``cuda``) they agree
with CUDA events placed by hand around the same op.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastattn.perf import timing

REPO = Path(__file__).resolve().parents[1]


def run_session(tmp_path, body: str) -> dict:
    """Runs a one-benchmark pytest file using round_timer; returns its --benchmark-json."""
    test = tmp_path / "test_timed.py"
    test.write_text(textwrap.dedent("""
        import time
        import pytest
        import torch
        from fastattn.perf import timing

        pytestmark = pytest.mark.benchmark(timer=timing.round_timer)
    """) + textwrap.dedent(body))
    out = tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(test), "-q", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "--benchmark-only", f"--benchmark-json={out}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_cpu_rounds_record_host_time_per_call(tmp_path):
    run = run_session(tmp_path, """
        def spin():
            end = time.perf_counter() + 3e-3
            while time.perf_counter() < end:
                pass

        def test_spin(benchmark):
            timing.run(benchmark, timing.plan_cpu(spin))
    """)
    (bench,) = run["benchmarks"]
    data = bench["stats"]["data"]
    assert len(data) == bench["extra_info"]["rounds"] == bench["stats"]["rounds"] >= 5
    assert bench["extra_info"]["timing_mode"] == "host"
    # A 3 ms busy wait: never faster; the quickest round (the one least disturbed by other
    # processes on a busy machine) is not much slower.
    assert 3e-3 <= bench["stats"]["min"] and min(data) < 6e-3, data
    assert bench["options"]["timer"] == "fastattn.perf.timing.round_timer"


def test_a_sample_is_divided_by_the_calls_of_its_round():
    plan = timing.Plan("host", "cpu", target=lambda: None, setup=None, calls_per_round=4,
                       rounds=1, warmup_rounds=0, eager_call_s=0.0, l2_flush=False)
    with timing.round_timer.use(plan):
        start = timing.round_timer()
        time.sleep(0.02)
        end = timing.round_timer()
    assert 0.005 <= end - start < 0.02  # undivided, the round would read >= 0.02


def test_run_refuses_a_benchmark_with_another_timer():
    class Fixture:
        _timer = time.perf_counter

    with pytest.raises(RuntimeError, match="round_timer"):
        timing.run(Fixture(), timing.plan_cpu(lambda: None))


# The GPU check runs inside the timed session: the op is first run for about a second (the
# card settles its clocks; a long compute-bound op runs ~14% slower sustained than fresh on the
# lent H200), then timed by hand, through pytest-benchmark, and by hand again. By hand: L2
# flushed, then events around one eager call, once per round that pytest-benchmark timed.
HAND_TIMED = """
def hand_timed(op, samples):
    flush = torch.empty(512 * 2**20, dtype=torch.int8, device="cuda")
    times = []
    for _ in range(samples):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        op()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return sorted(times)[len(times) // 2]


def settle(op, seconds=1.0):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        op()
        torch.cuda.synchronize()
"""

# (inputs, call): each call runs far past launch overhead, so one eager call timed by hand
# measures what a graph replay does.
OPS = {
    # Memory bound: 1 GiB read and written per call (several calls per round).
    "stream": ("x = torch.randn(2**28, device='cuda')", "x.mul_(1.0000001)"),
    # Compute bound: a bf16 matmul of 2 x 8192^3 FLOPs (about one call per round).
    "matmul": ("x = torch.randn(2, 8192, 8192, device='cuda', dtype=torch.bfloat16)",
               "torch.mm(x[0], x[1])"),
}


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(OPS))
def test_gpu_recorded_time_agrees_with_hand_placed_events(tmp_path, name):
    inputs, call = OPS[name]
    run = run_session(tmp_path, HAND_TIMED + f"""

def test_op(benchmark):
    {inputs}
    op = lambda: {call}
    settle(op)
    before = hand_timed(op, 50)
    plan = timing.plan_gpu(op)
    timing.run(benchmark, plan)
    benchmark.extra_info["hand_s"] = [before, hand_timed(op, plan.rounds)]
""")
    (bench,) = run["benchmarks"]
    assert bench["extra_info"]["timing_mode"] == "graph"
    recorded = bench["stats"]["median"]
    before, after = bench["extra_info"]["hand_s"]
    by_hand = (before + after) / 2
    assert abs(recorded - by_hand) <= 0.05 * by_hand, (
        f"{name}: pytest-benchmark recorded {recorded * 1e6:.1f} us per call; CUDA events by "
        f"hand {before * 1e6:.1f} us before, {after * 1e6:.1f} us after "
        f"({bench['extra_info']['calls_per_round']} calls per round)")


@pytest.mark.cuda
def test_gpu_eager_rounds_exclude_the_hosts_launch_gaps(tmp_path):
    # 200 launches of a tiny kernel: the host needs several microseconds to enqueue each, the GPU
    # far less to run it. An eager round that timed the host's pace would record about the
    # enqueue time; queued behind the spin, the calls run back to back, as in a graph.
    run = run_session(tmp_path, """

def test_op(benchmark):
    x = torch.zeros(256, device="cuda")
    def op():
        for _ in range(200):
            x.add_(1.0)
    plan = timing.plan_gpu(op, no_graph_reason="timed eagerly on purpose")
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(20):
        op()
    benchmark.extra_info["enqueue_s"] = (time.perf_counter() - begin) / 20
    torch.cuda.synchronize()
    timing.run(benchmark, plan)
""")
    (bench,) = run["benchmarks"]
    info = bench["extra_info"]
    assert info["timing_mode"] == "eager" and "spin kernel" in info["timing_note"]
    recorded = bench["stats"]["median"]
    assert recorded < 0.6 * info["enqueue_s"], (
        f"an eager round recorded {recorded * 1e6:.1f} us per call, the host's enqueue pace is "
        f"{info['enqueue_s'] * 1e6:.1f} us: the rounds still wait for the host")
