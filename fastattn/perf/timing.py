"""Timing that pytest-benchmark records as it is: GPU time from CUDA events, host time on a CPU.

pytest-benchmark times a round as ``end - start`` of two readings of its timer around the
target. :data:`round_timer` is such a timer: on a GPU each reading records a CUDA event on
the current stream, and ``end - start`` waits for the end event and returns the GPU time
between the two events divided by the calls the round made. So every sample that
pytest-benchmark keeps (its stats, ``--benchmark-json`` data, ``--benchmark-compare``,
histograms) is GPU seconds per call. Mark a benchmark with
``pytest.mark.benchmark(timer=round_timer)`` and time it with :func:`run`.

A GPU round (see docs/benchmarks.md):

1. setup, untimed: the L2 cache is flushed by zeroing a buffer larger than it;
2. start event; one replay of a CUDA graph holding N back-to-back calls (``graph`` mode) or,
   where capture is impossible, N eager calls (``eager`` mode); end event;
3. sample = elapsed / N.

Graph replay removes launch gaps and host jitter (on the lent H200 it cut the spread of
medians from 0.7-9% to 0.4-2.5%), so ratios between implementations are taken on what the
kernels cost. Eager per-call latency, host overhead included, is measured beside it
(``Plan.eager_call_s``): flush, synchronize, event, one call, event.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingConfig:
    flush_l2: bool = True
    budget_s: float = 0.4  # timed seconds per benchmark (rounds x round time), about
    target_round_s: float = 2e-3  # a round batches calls up to about this long
    max_calls_per_round: int = 50
    min_rounds: int = 10
    max_rounds: int = 200
    max_time_s: float = 4.0  # slow calls get fewer rounds (at least 3), not minutes
    warmup_s: float = 0.05

    @classmethod
    def for_cpu(cls, flush_l2: bool = False) -> TimingConfig:
        """Lean on a CPU: CI runs the smoke set on 2 shared cores."""
        return cls(flush_l2=flush_l2, budget_s=0.15, target_round_s=2e-3, min_rounds=5,
                   max_rounds=50, max_time_s=1.5, warmup_s=0.02)


@dataclass
class Plan:
    """How one benchmark is timed; the fields that describe it go to extra_info."""

    mode: str  # "graph", "eager" (CUDA events) or "host" (CPU clock)
    device: str
    target: Callable[[], object]
    setup: Callable[[], None] | None
    calls_per_round: int
    rounds: int
    warmup_rounds: int
    eager_call_s: float
    l2_flush: bool
    note: str = ""

    def describe(self) -> dict:
        info = {"timing_mode": self.mode, "calls_per_round": self.calls_per_round,
                "rounds": self.rounds, "l2_flush": self.l2_flush,
                "eager_call_s": self.eager_call_s}
        if self.note:
            info["timing_note"] = self.note
        return info


class _Stamp:
    """One reading of :data:`round_timer`; ``end - start`` is seconds per call."""

    __slots__ = ("calls", "event", "host")

    def __init__(self, calls: int, event=None, host: float = 0.0):
        self.calls, self.event, self.host = calls, event, host

    def __sub__(self, start: _Stamp) -> float:
        if self.event is None:
            return (self.host - start.host) / self.calls
        self.event.synchronize()
        return start.event.elapsed_time(self.event) * 1e-3 / self.calls


class RoundTimer:
    """A pytest-benchmark timer driven by the active :class:`Plan` (host clock when none)."""

    __name__ = "fastattn.perf.timing.round_timer"

    def __init__(self):
        self._plan: Plan | None = None

    @contextlib.contextmanager
    def use(self, plan: Plan):
        self._plan = plan
        try:
            yield self
        finally:
            self._plan = None

    def __call__(self) -> _Stamp:
        plan = self._plan
        if plan is None or plan.mode == "host":
            return _Stamp(plan.calls_per_round if plan else 1, host=time.perf_counter())
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return _Stamp(plan.calls_per_round, event=event)


round_timer = RoundTimer()


class L2Flusher:
    """Zeroes a buffer larger than the L2 cache (triton.testing.do_bench does the same)."""

    def __init__(self, device):
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 0) or 64 * 2**20
        self.buffer = torch.empty(max(4 * l2, 256 * 2**20), dtype=torch.int8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


@functools.cache
def l2_flusher(device: torch.device) -> L2Flusher:
    return L2Flusher(device)


def _clamp(value, lo, hi):
    return max(lo, min(hi, value))


def _rounds(round_s: float, config: TimingConfig) -> tuple[int, int]:
    rounds = _clamp(math.ceil(config.budget_s / max(round_s, 1e-9)), config.min_rounds,
                    config.max_rounds)
    if rounds * round_s > config.max_time_s:
        rounds = max(3, int(config.max_time_s / round_s))
    warmup = _clamp(math.ceil(config.warmup_s / max(round_s, 1e-9)), 1, 20)
    return rounds, warmup


def _event_time(setup, fn, *, sync_first: bool) -> float:
    """GPU seconds of one ``fn()`` after ``setup()``; ``sync_first`` puts host overhead in it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if setup is not None:
        setup()
    if sync_first:
        torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


@functools.cache
def _spin_cycles_per_s() -> float:
    """Clock rate of ``torch.cuda._sleep``'s spin loop, measured (clocks move with load)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # wakes the clocks up
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / (start.elapsed_time(end) * 1e-3)


def _held_behind_a_spin(setup, target):
    """A round setup that ends with a spin kernel on the stream, long enough for ``target``'s launches.

    An eager round otherwise times the host too: the GPU idles between launches while the host
    enqueues the next call, and how long depends on the process (fast-transformers' eager rows
    moved 3.6-17% between two runs on the H200 where every graph-timed row stayed within 1.4%).
    With the stream held by a spin until every launch of the round is queued, the start event
    fires when the spin ends and the calls run back to back, as a graph replay runs them
    (nvbench's blocking kernel does the same). The spin lasts twice the measured enqueue time.
    """
    cycles_per_s = _spin_cycles_per_s()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(cycles_per_s * 0.05))  # 50 ms: the enqueue below never waits for the GPU
    begin = time.perf_counter()
    target()
    enqueue_s = time.perf_counter() - begin
    torch.cuda.synchronize()
    if enqueue_s > 0.04:  # the round waited for the GPU (a sync inside): a spin cannot help
        return setup
    spin_cycles = int(cycles_per_s * (2 * enqueue_s + 50e-6))

    def held_setup():
        if setup is not None:
            setup()
        torch.cuda._sleep(spin_cycles)

    return held_setup


def capture_graph(fn: Callable[[], object], calls: int) -> torch.cuda.CUDAGraph:
    # Warm up on a side stream first, as capture requires (lazy init, autotuning, allocations).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def plan_gpu(fn: Callable[[], object], config: TimingConfig = TimingConfig(), *,
             no_graph_reason: str | None = None, device=None) -> Plan:
    """Warm up, measure eager latency, capture N calls in a graph, size the rounds.

    ``no_graph_reason`` skips capture (eager rounds) for a call known not to be capturable.
    """
    device = torch.device(device or "cuda")
    setup = l2_flusher(device) if config.flush_l2 else None
    warm_until = time.perf_counter() + config.warmup_s
    for i in range(100):
        fn()
        if i >= 2 and time.perf_counter() > warm_until:
            break
    torch.cuda.synchronize()
    eager = statistics.median(_event_time(setup, fn, sync_first=True) for _ in range(7))
    calls = _clamp(round(config.target_round_s / max(eager, 1e-9)), 1, config.max_calls_per_round)

    mode, note = "graph", ""
    if no_graph_reason is None:
        try:
            graph = capture_graph(fn, calls)
            target = graph.replay
        except Exception as exc:  # any capture failure: time eagerly, and say why
            torch.cuda.synchronize()
            mode, note = "eager", f"graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        mode, note = "eager", no_graph_reason
    if mode == "eager":
        def target():
            for _ in range(calls):
                fn()

        held = _held_behind_a_spin(setup, target)
        if held is not setup:
            setup, note = held, note + "; each round queued behind a spin kernel (no launch gaps)"

    target()  # the first replay uploads the graph
    round_s = statistics.median(_event_time(setup, target, sync_first=False) for _ in range(3))
    rounds, warmup = _rounds(round_s, config)
    return Plan(mode, str(device), target, setup, calls, rounds, warmup, eager,
                config.flush_l2, note)


def plan_cpu(fn: Callable[[], object], config: TimingConfig | None = None) -> Plan:
    config = config or TimingConfig.for_cpu()
    def one_call() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    one_call()  # first call: lazy build / compile / allocation
    eager = statistics.median(one_call() for _ in range(3))
    calls = _clamp(round(config.target_round_s / max(eager, 1e-9)), 1, config.max_calls_per_round)

    def target():
        for _ in range(calls):
            fn()

    rounds, warmup = _rounds(eager * calls, config)
    return Plan("host", "cpu", target, None, calls, rounds, warmup, eager, False)


def run(benchmark, plan: Plan):
    """Time ``plan`` with pytest-benchmark; every recorded round is seconds per call."""
    timer = getattr(benchmark, "_timer", round_timer)
    if timer is not round_timer:
        raise RuntimeError(
            "this benchmark's timer is not fastattn.perf.timing.round_timer; mark it with "
            "pytest.mark.benchmark(timer=round_timer) so that GPU time is what gets recorded")
    with round_timer.use(plan):
        benchmark.pedantic(plan.target, setup=plan.setup, rounds=plan.rounds,
                           warmup_rounds=plan.warmup_rounds)
    benchmark.extra_info.update(plan.describe())
