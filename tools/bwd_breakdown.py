"""Dev probe: where one fastattn backward call spends its GPU time, kernel by kernel (the delta
pre-pass, the zeroing of the float32 dQ scratch, the main kernel, the dQ conversion), on the
bfloat16 local cases of the benchmark suite's default set, from the torch profiler.

    PYTHONPATH=. python tools/bwd_breakdown.py [--dtype bf16] [--repeat 10]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch

from fastattn import _ops
from fastattn.perf.cases import case_set
from fastattn.perf.flops import case_flops


def kernel_profile(fn, repeat: int) -> dict[str, tuple[float, float]]:
    """Per kernel fn launches: (mean device microseconds per call of fn, launches per call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
    totals = defaultdict(lambda: [0.0, 0.0])
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.key][0] += event.self_device_time_total / repeat
            totals[event.key][1] += event.count / repeat
    return {name: (us, launches) for name, (us, launches) in totals.items()}


def kernel_times_us(fn, repeat: int) -> dict[str, float]:
    """Mean device time per call of each kernel fn launches."""
    return {name: us for name, (us, _) in kernel_profile(fn, repeat).items()}


def backward_call(case):
    """A function that runs fastattn's backward op alone on the case's random inputs (the
    forward's out and lse computed once, ahead)."""
    b, h, n, d = case.shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(b, h, n, d, device="cuda", dtype=case.torch_dtype,
                                 generator=gen) for _ in range(4))
    out, lse = torch.ops.fastattn.local_attention_fwd(q, k, v, *case.window, None, d**-0.5)
    grad_lse = torch.zeros_like(lse)

    def bwd():
        torch.ops.fastattn.local_attention_bwd(grad, grad_lse, q, k, v, out, lse, *case.window,
                                               None, d**-0.5)

    return bwd


def short(name: str) -> str:
    for key in ("local_bwd_ws_kernel", "local_bwd_kernel", "local_bwd_delta_kernel",
                "local_bwd_dq_kernel"):
        if key in name:
            return key.removeprefix("local_bwd_").removesuffix("_kernel") or "main"
    if "fill" in name or "memset" in name.lower() or "zero" in name:
        return "zero-dq"
    return name[:24]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    cases = [c for c in case_set("default")
             if c.op == "local" and c.plain and c.dtype == args.dtype]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  (us per call)")
    for case in cases:
        b, h, n, d = case.shape
        bwd = backward_call(case)
        times = defaultdict(float)
        for name, us in kernel_times_us(bwd, args.repeat).items():
            times[short(name)] += us
        total = sum(times.values())
        main_us = times.get("ws", times.get("main", 0.0))
        bwd_flops = case_flops(case, "fwd+bwd") - case_flops(case, "fwd")
        parts = "  ".join(f"{k} {v:7.1f}" for k, v in sorted(times.items()))
        print(f"{b},{h},{n},{d},w{case.window[0]}x{case.window[1]:<5} total {total:8.1f}  {parts}"
              f"  main {bwd_flops / main_us / 1e6 if main_us else 0:6.1f} TF/s")
    return 0


if __name__ == "__main__":
    _ops.load()
    sys.exit(main())
