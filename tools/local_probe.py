"""Dev probe for the CUDA local attention kernels: a quick correctness check, then fastattn vs
torch.compile'd FlexAttention (same sliding-window block mask) on issue 3's acceptance cases.

GPU time only: each sample replays a CUDA graph of --inner launches and divides; the figure
is the median of --samples samples. Block-mask creation and compilation stay outside the
timing, and the probe checks (with the profiler) that Flex really ran its Triton kernel.

    PYTHONPATH=. python tools/local_probe.py [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

import torch

import fastattn
from fastattn.perf.cases import case_set
from fastattn.perf.flops import case_bytes, case_flops
from fastattn.perf.timing import capture_graph
from fastattn.reference import local_attention_reference

# Issue 3's acceptance cases: the local cases of the benchmark suite's default set (its plain
# ones: this probe times fastattn.local_attention over (B, H, L, D), not a KV cache or packing).
CASES = [case for case in case_set("default") if case.op == "local" and case.plain]


def graph_time_ms(fn, inner: int, samples: int) -> list[float]:
    graph = capture_graph(fn, inner)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    del graph
    return times


@contextlib.contextmanager
def switched(variables):
    """Kernel switches ("A" or "A+B") set for the duration (launchers read them, also at graph
    capture); the backward of a fwd+bwd step runs inside them too."""
    names = variables.split("+") if variables else []
    for name in names:
        os.environ[name] = "1"
    try:
        yield
    finally:
        for name in names:
            del os.environ[name]


def make_flex(case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n, (left, right) = case.seq_len, case.window

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx <= left) & (kv_idx - q_idx <= right)

    mask = create_block_mask(sliding, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cuda")
    compiled = torch.compile(flex_attention, fullgraph=True)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


def ran_triton(fn) -> bool:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    return any("triton" in name or "flex" in name for name in names)


def quick_check() -> list[str]:
    """Small cases against float64; returns failures (empty when all pass)."""
    failures = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (16, 64, 128):
            for n, window in ((1, (0, 0)), (130, (17, 3)), (700, (2000, 0))):
                q, k, v = (torch.randn(2, 2, n, d, device="cuda", dtype=dtype).requires_grad_()
                           for _ in range(3))
                out = fastattn.local_attention(q, k, v, window)
                grad = torch.randn_like(out)
                out.backward(grad)
                ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
                ref = local_attention_reference(*ref_in, window)
                ref.backward(grad.double())
                for name, a, b in (("out", out, ref), *((f"d{c}", t.grad, r.grad) for c, t, r in
                                                         zip("qkv", (q, k, v), ref_in, strict=True))):
                    # Inputs are O(1); a gradient that is exactly 0 (L = 1) has rounding noise.
                    err = (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1.0)
                    tol = 1e-5 if dtype == torch.float32 else 3e-2
                    if not err <= tol:
                        failures.append(f"{dtype} D{d} L{n} w{window} {name}: rel err {err:.2e}")
    return failures


def probe_case(case, inner, samples, with_flex, variants, bwd_variants=False, extra=()):
    b, h, n, d = case.shape
    window, dtype = case.window, case.torch_dtype
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=gen)
               .requires_grad_() for _ in range(3))
    grad = torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=gen)
    fwd_flops, fwd_bwd_flops = case_flops(case, "fwd"), case_flops(case, "fwd+bwd")
    fwd_bytes = case_bytes(case, "fwd")
    def local(q, k, v):
        return fastattn.local_attention(q, k, v, window)

    impls = {"fastattn": local}
    switches = {}
    if variants and dtype != torch.float32 and d in (64, 128):
        # The warp-specialized forward is the default; fa-wg1 is the one-warpgroup wgmma
        # kernel before it, fa-mma the mma.sync kernel.
        impls["fa-wg1"] = impls["fa-mma"] = local
        switches["fa-wg1"], switches["fa-mma"] = "FASTATTN_DISABLE_WS", "FASTATTN_DISABLE_WGMMA"
    if bwd_variants and dtype != torch.float32 and d in (64, 128):
        # The Hopper (wgmma) backward is the default; fa-bmma is the mma.sync backward.
        impls["fa-bmma"] = local
        switches["fa-bmma"] = "FASTATTN_DISABLE_WS_BWD"
    for label, variables in extra:  # --switch LABEL=VAR[+VAR...]: any other kernel variant
        impls[label] = local
        switches[label] = variables
    if with_flex:
        impls["flex"] = make_flex(case)
    rows = []
    outputs = {}
    for name, fn in impls.items():
        switch = switches.get(name)
        with torch.no_grad(), switched(switch):
            outputs[name] = fn(q, k, v)
        note = ""
        if name == "flex" and not ran_triton(lambda fn=fn: fn(q, k, v)):
            note = "NOT-TRITON"

        def fwd(fn=fn, switch=switch):
            with torch.no_grad(), switched(switch):
                fn(q, k, v)

        def fwd_bwd(fn=fn, switch=switch):
            with switched(switch):
                out = fn(q, k, v)
                torch.autograd.grad(out, (q, k, v), grad)

        t_f = statistics.median(graph_time_ms(fwd, inner, samples))
        t_fb = statistics.median(graph_time_ms(fwd_bwd, inner, samples))
        rows.append(dict(impl=name, case=[b, h, n, d, *window], dtype=case.dtype,
                         fwd_ms=t_f, fwd_bwd_ms=t_fb, fwd_tflops=fwd_flops / t_f / 1e9,
                         fwd_bwd_tflops=fwd_bwd_flops / t_fb / 1e9,
                         fwd_gbps=fwd_bytes / t_f / 1e6, note=note))
    if "flex" in outputs:
        a, r = outputs["fastattn"].double(), outputs["flex"].double()
        diff = ((a - r).norm() / r.norm()).item()
        for row in rows:
            row["vs_flex_rel"] = diff
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--quick", action="store_true",
                        help="bf16 only at D=64, L <= 16384 (plus the float32 cases)")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--dtype", default=None, help="only the cases of this dtype (bf16, ...)")
    parser.add_argument("--head-dim", type=int, default=None, help="only the cases of this D")
    parser.add_argument("--fp16", action="store_true",
                        help="also run each bf16 case in float16 (the same kernels' other dtype)")
    parser.add_argument("--variants", action="store_true",
                        help="also time the older forward kernels where the newer one is the default")
    parser.add_argument("--bwd-variants", action="store_true",
                        help="also time the mma.sync backward where the Hopper one is the default")
    parser.add_argument("--switch", action="append", default=[], metavar="LABEL=VAR[+VAR]",
                        help="also time fastattn with these kernel switches set (repeatable)")
    args = parser.parse_args(argv)
    extra = []
    for item in args.switch:
        label, sep, variables = item.partition("=")
        if not sep or not label or not variables:
            parser.error(f"--switch wants LABEL=VAR[+VAR], got {item!r}")
        extra.append((label, variables))

    if not args.no_check:
        failures = quick_check()
        print("correctness:", "ok" if not failures else "\n  ".join(["FAILED"] + failures))
        if failures:
            return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = [c for c in CASES
             if (not args.quick or c.dtype != "bf16" or (c.seq_len <= 16384 and c.head_dim == 64))
             and (args.dtype is None or c.dtype == args.dtype)
             and (args.head_dim is None or c.head_dim == args.head_dim)]
    if args.fp16:
        cases += [c.with_(dtype="fp16") for c in cases if c.dtype == "bf16"]
    rows = []
    # Each case compiles Flex afresh (new shape and mask; grad and no-grad variants).
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    for case in cases:
        torch._dynamo.reset()
        # float16 rows are there to compare with bf16: fastattn's default kernel alone.
        full = case.dtype != "fp16"
        rows += probe_case(case, args.inner, args.samples, full and not args.no_flex,
                           full and args.variants, full and args.bwd_variants,
                           extra if full else ())
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           rows=rows), f, indent=1)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"(median of {args.samples} samples, {args.inner} launches per graph replay)")
    print(f"{'case':30} {'dt':5} {'impl':8} {'fwd ms':>8} {'TF/s':>6} {'f+b ms':>8} {'TF/s':>6}"
          f" {'x flex f':>8} {'x flex fb':>9}")
    by_case = {}
    for row in rows:
        by_case.setdefault((tuple(row["case"]), row["dtype"]), {})[row["impl"]] = row
    for (case, dtype), impls in by_case.items():
        flex = impls.get("flex")
        for name, row in impls.items():
            ratio_f = ratio_fb = ""
            if flex and name == "fastattn":
                ratio_f = f"{flex['fwd_ms'] / row['fwd_ms']:.2f}"
                ratio_fb = f"{flex['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f}"
            label = "{},{},{},{},w{}x{}".format(*case)
            print(f"{label:30} {dtype:5} {name:8} {row['fwd_ms']:8.3f} {row['fwd_tflops']:6.1f} "
                  f"{row['fwd_bwd_ms']:8.3f} {row['fwd_bwd_tflops']:6.1f} {ratio_f:>8} "
                  f"{ratio_fb:>9} {row['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
