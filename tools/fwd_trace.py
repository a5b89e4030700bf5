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
import sys

import torch
from bwd_trace import call_ms, trace_cases  # tools/, beside this script
from local_probe import switched

Q_MODES = {"v3g": "", "v3h": "FASTATTN_WS_FWD_Q_WARP"}  # switches, as local_probe takes them


def main() -> int:
    for case in trace_cases():
        b, h, n, d = case.shape
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))

        def fwd():
            torch.ops.fastattn.local_attention_fwd(q, k, v, *case.window, None, d**-0.5)

        for mode, switches in Q_MODES.items():
            with switched(switches):
                plain = call_ms(fwd)
            print(f"case {b},{h},{n},{d},w{case.window[0]}x{case.window[1]} {mode}: "
                  f"forward {plain:.4f} ms", flush=True)

            with switched("+".join(filter(None, (switches, "FASTATTN_WS_FWD_TRACE")))):
                fwd()
                torch.cuda.synchronize()  # the kernel's lines reach C's stdout here
                ctypes.CDLL(None).fflush(None)  # ... and the log file here, in order
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
