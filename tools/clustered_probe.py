"""Dev probe for the CUDA clustered attention ops: a correctness spot check at full size, then
GPU time of fastattn.cluster / clustered_attention / improved_clustered_attention (forward and
forward+backward, clustering included unless said) vs SDPA full attention, on issue 4's
shapes. Each figure is the median over samples of a CUDA graph of several calls (the timer of
fastattn.perf.timing), divided by the calls, without L2 flush.

    PYTHONPATH=. python tools/clustered_probe.py [--quick] [--json results.json]
    PYTHONPATH=. python tools/clustered_probe.py --cpu   # float32 at (1, 8, 2048, 64, C=64),
                                                         # best of 5 host-clock calls
    PYTHONPATH=. python tools/clustered_probe.py --stages [--markdown FILE]
        # the GPU time of each stage (kernel) of each op, from the torch profiler: the table of
        # docs/clustered.md ("Where the time goes")
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastattn
from fastattn.perf.timing import TimingConfig, plan_gpu
from fastattn.reference import improved_clustered_attention_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bwd_breakdown import kernel_profile  # noqa: E402  (tools/, beside this script)

CASES = [(2, 8, 4096, 64, 128), (1, 8, 16384, 64, 256)]  # (B, H, L, D, C)
CPU_CASE = (1, 8, 2048, 64, 64)
BITS, ITERATIONS, TOPK = 63, 10, 32


def gpu_ms(fn, samples: int) -> float:
    plan = plan_gpu(fn, TimingConfig(flush_l2=False))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples):
        start.record()
        plan.target()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / plan.calls_per_round)
    return statistics.median(times)


def cpu_ms(fn, samples: int = 5) -> float:
    fn()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def forward_backward(fn, leaves, grad):
    def run():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad)
    return run


def make_ops(q, k, v, clustering, clusters):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    opts = dict(bits=BITS, iterations=ITERATIONS)
    return {
        "cluster": lambda: fastattn.cluster(q, clusters, **opts),
        "clustered fwd": lambda: fastattn.clustered_attention(q, k, v, clusters, **opts),
        "clustered fwd (given clustering)": lambda: fastattn.clustered_attention(
            q, k, v, clustering=clustering),
        "improved fwd": lambda: fastattn.improved_clustered_attention(
            q, k, v, clusters, topk=TOPK, **opts),
        "improved fwd (given clustering)": lambda: fastattn.improved_clustered_attention(
            q, k, v, clustering=clustering, topk=TOPK),
        "clustered fwd+bwd": forward_backward(
            lambda *t: fastattn.clustered_attention(*t, clusters, **opts), leaves, grad),
        "improved fwd+bwd": forward_backward(
            lambda *t: fastattn.improved_clustered_attention(*t, clusters, topk=TOPK, **opts),
            leaves, grad),
        "sdpa fwd": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa fwd+bwd": forward_backward(F.scaled_dot_product_attention, leaves, grad),
    }


def spot_check(q, k, v, clustering, clusters):
    """Improved attention (float32 kernel) vs the float64 reference with the kernel's top-k."""
    fwd = torch.ops.fastattn.clustered_attention_fwd(
        q, k, v, clustering.labels, clusters, TOPK, None, q.shape[-1] ** -0.5)
    gold = improved_clustered_attention_reference(
        q.double(), k.double(), v.double(), clustering.labels, clusters, top_idx=fwd[4])
    return (fwd[0].double() - gold).abs().max().item()


STAGE_OPS = ("cluster", "clustered fwd", "clustered fwd+bwd", "improved fwd", "improved fwd+bwd")


def stage_name(kernel: str) -> str:
    """A kernel's name without its namespace, template arguments and parameter list."""
    base = re.sub(r"\(.*", "", kernel.replace("(anonymous namespace)::", ""))
    base = re.sub(r"<.*", "", base)
    return base.split("::")[-1].split(" ")[-1][:60] or kernel[:60]


def stage_table(repeat: int = 5) -> str:
    """Markdown: per case, dtype and op, each kernel's microseconds per call and launches."""
    lines = []
    for batch, heads, seq_len, head_dim, clusters in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=dtype)
                       for _ in range(3))
            clustering = fastattn.cluster(q, clusters, bits=BITS, iterations=ITERATIONS)
            ops = make_ops(q, k, v, clustering, clusters)
            dname = str(dtype).removeprefix("torch.")
            for op in STAGE_OPS:
                kernels = kernel_profile(ops[op], repeat)
                total = sum(us for us, _ in kernels.values())
                lines.append(f"\n**B{batch} H{heads} L{seq_len} D{head_dim} C{clusters}, {dname}, "
                             f"{op}**: {total / 1000:.3f} ms of kernels per call\n")
                lines.append("| kernel | us per call | launches | share |")
                lines.append("|---|---:|---:|---:|")
                merged: dict[str, list[float]] = {}
                for name, (us, launches) in kernels.items():
                    entry = merged.setdefault(stage_name(name), [0.0, 0.0])
                    entry[0] += us
                    entry[1] += launches
                for name, (us, launches) in sorted(merged.items(), key=lambda kv: -kv[1][0]):
                    lines.append(f"| `{name}` | {us:.1f} | {launches:g} | "
                                 f"{us / total * 100:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the first case only, fewer samples")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--cpu", action="store_true", help="time the CPU kernels instead")
    parser.add_argument("--stages", action="store_true",
                        help="per-kernel GPU time of each op (torch profiler) instead")
    parser.add_argument("--markdown", help="with --stages: write the tables here too")
    args = parser.parse_args()
    if args.stages:
        table = f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}\n" + stage_table()
        print(table)
        if args.markdown:
            Path(args.markdown).write_text(table)
        return 0
    samples = 5 if args.quick else 15
    device = "cpu" if args.cpu else "cuda"
    timer = cpu_ms if args.cpu else (lambda fn: gpu_ms(fn, samples))
    device_name = "cpu" if args.cpu else torch.cuda.get_device_name()
    results = []
    print(f"device: {device_name}  torch {torch.__version__}")
    cases = [CPU_CASE] if args.cpu else CASES[:1] if args.quick else CASES
    dtypes = (torch.float32,) if args.cpu else (torch.float32, torch.bfloat16)
    for batch, heads, seq_len, head_dim, clusters in cases:
        shape = f"B{batch} H{heads} L{seq_len} D{head_dim} C{clusters}"
        for dtype in dtypes:
            q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype)
                       for _ in range(3))
            clustering = fastattn.cluster(q, clusters, bits=BITS, iterations=ITERATIONS)
            if dtype == torch.float32 and seq_len == 4096:
                print(f"{shape}: improved fp32 max |err| vs float64 = "
                      f"{spot_check(q, k, v, clustering, clusters):.2e}")
            ops = make_ops(q, k, v, clustering, clusters)
            timings = {}
            for name, fn in ops.items():
                try:
                    timings[name] = timer(fn)
                except Exception as exc:  # report and go on: a probe, not a gate
                    print(f"  {name}: failed: {type(exc).__name__}: {exc}")
            dname = str(dtype).replace("torch.", "")
            sdpa = timings.get("sdpa fwd")
            for name, ms in timings.items():
                ratio = f"  ({sdpa / ms:.2f}x SDPA fwd)" if sdpa and "fwd" in name and "bwd" not in name else ""
                print(f"{shape} {dname:8s} {name:34s} {ms:8.3f} ms{ratio}")
                results.append(dict(shape=shape, dtype=dname, op=name, ms=ms))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name, torch=torch.__version__,
                           results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
