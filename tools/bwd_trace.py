"""Dev probe: where a tile's time goes in the Hopper backward. Runs one backward per case with
FASTATTN_WS_BWD_TRACE=1 (bfloat16, the default schedule), whose kernel prints, for a few blocks,
each consumer's cycles per query tile by phase; then times the backward with and without the
trace (the stamps themselves cost a little).

    PYTHONPATH=. python tools/bwd_trace.py [--cases default]
"""

from __future__ import annotations

import os
import sys

import torch
from bwd_breakdown import backward_call  # tools/, beside this script

from fastattn import _ops
from fastattn.perf.cases import case_set


def call_ms(fn, repeat: int = 10) -> float:
    """Mean GPU milliseconds per call of fn (one warm-up call first)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeat


def trace_cases():
    """Loads the extension, names the device, and returns the default set's plain bf16 local
    cases (what both trace probes run; no KV cache or packed batch: they time the backward of
    fastattn.local_attention over (B, H, L, D))."""
    _ops.load()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    return [c for c in case_set("default") if c.op == "local" and c.plain and c.dtype == "bf16"]


def main() -> int:
    for case in trace_cases():
        b, h, n, d = case.shape
        bwd = backward_call(case)
        plain = call_ms(bwd)
        print(f"case {b},{h},{n},{d},w{case.window[0]}x{case.window[1]}: backward {plain:.3f} ms",
              flush=True)
        os.environ["FASTATTN_WS_BWD_TRACE"] = "1"
        try:
            bwd()
            torch.cuda.synchronize()  # the kernel's lines come out here
            sys.stdout.flush()
            traced = call_ms(bwd, repeat=3)
        finally:
            del os.environ["FASTATTN_WS_BWD_TRACE"]
        print(f"  with the trace: {traced:.3f} ms (+{100 * (traced / plain - 1):.1f}%)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
