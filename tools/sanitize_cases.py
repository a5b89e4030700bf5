"""Small forward and backward calls of the CUDA local attention kernels, for compute-sanitizer
(tools/sanitize.sh). Covers each dtype, a tile-straddling length, key_lengths with 0 and L,
the unmasked fast path, the element-wise (unaligned) copy paths, the wgmma kernels (16-bit,
D = 64 and 128 on Hopper: the warp-specialized and one-warpgroup forwards, the Hopper backward
and, switched off, the mma.sync backward) and the largest head dims."""

import os

import torch

import fastattn
from fastattn import _ops


def run(dtype, head_dim, seq_len, window, key_lengths=None, misalign=False):
    def make():
        n = 2 * 2 * seq_len * head_dim
        buf = torch.randn(n + 1, device="cuda", dtype=dtype)
        return buf[1:] if misalign else buf[:n]

    q, k, v = (make().view(2, 2, seq_len, head_dim).requires_grad_() for _ in range(3))
    out, lse = fastattn.local_attention(q, k, v, window, key_lengths=key_lengths, return_lse=True)
    if head_dim <= 128:  # the backward supports D <= 128
        (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    torch.cuda.synchronize()


def main():
    _ops.load()
    lengths = torch.tensor([0, 77], device="cuda")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        run(dtype, 64, 77, (5, 9), key_lengths=lengths)
        run(dtype, 128, 150, (100, 100))
        run(dtype, 16, 33, (3, 0), misalign=True)
        run(dtype, 64, 40, (7, 7), misalign=True)
    # The warp-specialized forward and the Hopper backward (16-bit, D = 64 / 128): bands deeper
    # than their rings and a padding boundary inside a tile (the producer warp's own copy of
    # that V tile; the backward's zero-filled K / V copy).
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            run(dtype, head_dim, 1100, (300, 400), key_lengths=torch.tensor([1100, 700],
                                                                            device="cuda"))
    os.environ["FASTATTN_DISABLE_WS"] = "1"  # the one-warpgroup wgmma forward
    run(torch.bfloat16, 128, 150, (100, 100), key_lengths=lengths)
    del os.environ["FASTATTN_DISABLE_WS"]
    os.environ["FASTATTN_DISABLE_WS_BWD"] = "1"  # the mma.sync backward where wgmma's is default
    run(torch.bfloat16, 128, 150, (100, 100), key_lengths=lengths)
    del os.environ["FASTATTN_DISABLE_WS_BWD"]
    run(torch.bfloat16, 256, 70, (20, 20))
    print("sanitize cases ran")


if __name__ == "__main__":
    main()
