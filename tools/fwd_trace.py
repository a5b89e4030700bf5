"""Dev probe: where a round's time goes in the Hopper forward. Runs one forward per case with
FASTATTN_WS_FWD_TRACE=1 (bfloat16, the folded softmax), whose kernel prints, for a few blocks,
each consumer's cycles per round (one key tile) by phase and per query tile for the rest; in
both Q modes (v3g: Q by the K / V thread; v3h: FASTATTN_WS_FWD_Q_WARP=1), beside the time of
the forward without the trace (a traced launch prints, so it runs once and is not timed: its
"total/round" against the plain time says what the stamps cost).

    PYTHONPATH=. python tools/fwd_trace.py
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from bwd_trace import call_ms  # tools/, beside this script

from fastattn import _ops
from fastattn.perf.cases import case_set

Q_MODES = {"v3g": {}, "v3h": {"FASTATTN_WS_FWD_Q_WARP": "1"}}


def with_env(env: dict[str, str], fn):
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def main() -> int:
    _ops.load()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    cases = [c for c in case_set("default") if c.op == "local" and c.dtype == "bf16"]
    for case in cases:
        b, h, n, d = case.shape
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))

        def fwd():
            torch.ops.fastattn.local_attention_fwd(q, k, v, *case.window, None, d**-0.5)

        for mode, env in Q_MODES.items():
            plain = with_env(env, lambda: call_ms(fwd))
            print(f"case {b},{h},{n},{d},w{case.window[0]}x{case.window[1]} {mode}: "
                  f"forward {plain:.4f} ms", flush=True)

            def traced_run():
                fwd()
                torch.cuda.synchronize()  # the kernel's lines reach C's stdout here
                ctypes.CDLL(None).fflush(None)  # ... and the log file here, in order

            with_env({**env, "FASTATTN_WS_FWD_TRACE": "1"}, traced_run)
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
