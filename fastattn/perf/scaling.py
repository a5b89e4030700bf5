"""Weak-scaling benchmark of ``fastattn.distributed.local_attention`` (issue 15's acceptance).

    torchrun --nproc-per-node 2 -m fastattn.perf.scaling          # bf16 (1, 16, 65536 per GPU, 128), (4096, 0)
    torchrun --nproc-per-node 2 -m fastattn.perf.scaling --shard 512 --heads 2 --head-dim 16 \\
        --window 64 0 --dtype fp32                                # a smoke run on CPUs (gloo)

Each rank holds one shard of the sequence. First every rank times the single-process op on its
shard alone (one GPU running a sequence of one shard's length: the per-GPU baseline), then the
distributed call. A round times ``--calls`` back-to-back calls per rank (CUDA events on a GPU,
the host clock on a CPU) after a barrier; its time is the slowest rank's, since a training step
waits for it; the figure is the median round. Efficiency = tokens/s per GPU against the
baseline = baseline time / distributed time. Rank 0 prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from fastattn.perf.halo import add_shape_arguments, shape_of
from fastattn.perf.timing import _event_time

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DIRECTIONS = ("fwd", "fwd+bwd")


def _seconds_per_call(fn, calls: int, device: torch.device) -> float:
    def all_calls():
        for _ in range(calls):
            fn()

    if device.type == "cuda":  # CUDA-event time of the whole loop, as the suite's timer reads it
        return _event_time(None, all_calls, sync_first=False) / calls
    started = time.perf_counter()
    all_calls()
    return (time.perf_counter() - started) / calls


def _call(attention, q, k, v, window, direction, grad_out):
    if direction == "fwd":
        with torch.no_grad():
            attention(q, k, v, window)
        return
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    attention(*leaves, window).backward(grad_out)


def measure(attention, shape, window, dtype, direction, device, *, calls=10, rounds=5, warmup=2):
    """Median over rounds of the slowest rank's seconds per call of ``attention`` on a shard.

    Collective (a barrier and an all_reduce per round): every rank of the world calls it.
    """
    q, k, v, grad_out = (torch.randn(shape, device=device, dtype=dtype) for _ in range(4))

    def fn():
        _call(attention, q, k, v, window, direction, grad_out)

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rounds):
        dist.barrier()
        mine = torch.tensor([_seconds_per_call(fn, calls, device)], dtype=torch.float64,
                            device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        samples.append(mine.item())
    return statistics.median(samples)


def main(argv=None) -> int:
    import fastattn
    import fastattn.distributed

    p = argparse.ArgumentParser(prog="torchrun ... -m fastattn.perf.scaling",
                                description=__doc__.splitlines()[0])
    add_shape_arguments(p)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    spec = shape_of(args)
    shape = (spec.batch, spec.heads, spec.shard, spec.head_dim)
    window, dtype = spec.window, DTYPES[spec.dtype]
    rows = []
    for direction in DIRECTIONS:
        alone = measure(fastattn.local_attention, shape, window, dtype, direction, device,
                        calls=args.calls, rounds=args.rounds)
        sharded = measure(fastattn.distributed.local_attention, shape, window, dtype, direction,
                          device, calls=args.calls, rounds=args.rounds)
        rows.append(f"| {direction} | {alone * 1e3:.3f} ms | {sharded * 1e3:.3f} ms "
                    f"| {alone / sharded:.1%} |")
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        world = dist.get_world_size()
        print(f"{world} ranks ({dist.get_backend()}, {name}), per rank (B, H, L_r, D) = {shape}, "
              f"window {window}, {spec.dtype}, torch {torch.__version__}\n")
        print(f"| direction | one shard alone | {world} ranks, slowest | efficiency |")
        print("|---|---|---|---|")
        print("\n".join(rows))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
