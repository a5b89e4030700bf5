"""Packed variable-length batches: ``fastattn.local_attention_varlen``."""

from __future__ import annotations

import torch

from fastattn import _ops
from fastattn._validate import (
    check_cu_seqlens,
    check_int,
    check_scale,
    check_softcap,
    check_varlen_qkv,
    check_window,
)


def _check_offsets_on_device(cu_seqlens_q, cu_seqlens_k, rows_q, rows_k, max_seqlen_q,
                             max_seqlen_k) -> None:
    """The values of cu_seqlens on a GPU, read with one device sync: the kernels would read
    past a tensor, or leave rows unwritten, with offsets that do not start at 0, decrease, end
    elsewhere than at the rows, or outrun max_seqlen. (On the CPU the kernels' glue checks
    them.) Not under torch.compile or CUDA-graph capture, where values cannot be read; there
    they are trusted, as FlashAttention trusts them."""
    if cu_seqlens_q.device.type == "cpu" or torch.compiler.is_compiling():
        return
    if cu_seqlens_q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    offsets = torch.cat([cu_seqlens_q, cu_seqlens_k]).tolist()
    n = cu_seqlens_q.shape[0]
    check_offsets("cu_seqlens_q", offsets[:n], rows_q, "max_seqlen_q", max_seqlen_q)
    check_offsets("cu_seqlens_k", offsets[n:], rows_k, "max_seqlen_k", max_seqlen_k)


def check_offsets(name: str, offsets: list[int], rows: int, max_name: str,
                  max_seqlen: int) -> None:
    """One cu_seqlens as a list: from 0, non-decreasing, ending at ``rows``, no sequence longer
    than ``max_seqlen``; the messages of the CPU glue's check."""
    if offsets[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {offsets[0]}")
    for i, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
        if stop < start:
            raise ValueError(f"{name} must be non-decreasing, got {name}[{i}]={start} > "
                             f"{name}[{i + 1}]={stop}")
        if stop - start > max_seqlen:
            raise ValueError(f"{max_name}={max_seqlen} is shorter than sequence {i} of {name} "
                             f"({stop - start} rows)")
    if offsets[-1] != rows:
        raise ValueError(f"{name}[-1] must equal the rows of its tensor ({rows}), got "
                         f"{offsets[-1]}")


def local_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           window, *, scale=None, softcap=None, return_lse=False):
    """Sliding-window attention over sequences packed end to end, as FlashAttention's
    ``flash_attn_varlen_func``: q (Tq, H, D), k and v (Tk, H_kv, D).

    Sequence ``n`` owns query rows ``cu_seqlens_q[n] : cu_seqlens_q[n + 1]`` and key rows
    ``cu_seqlens_k[n] : cu_seqlens_k[n + 1]`` (int32 (N + 1,) on q's device, from 0,
    non-decreasing, ending at Tq and Tk); ``max_seqlen_q`` / ``max_seqlen_k`` bound one
    sequence's rows. No query attends across a sequence boundary. Within a sequence of lq
    queries and lk keys, query ``i`` sits at key position ``i + lk - lq`` (bottom-right, as
    ``fastattn.local_attention`` with Lq != Lk) and sees the keys of its ``window`` there.
    Empty sequences are allowed; a query that sees no key gets 0 and lse = -inf.

    Returns out (Tq, H, D) and, with ``return_lse``, lse (H, Tq) float32 (FlashAttention's
    varlen layout). GQA / MQA, ``scale`` and ``softcap`` as in ``fastattn.local_attention``.
    On CUDA it runs only with FASTATTN_UNVERIFIED_CUDA_FEATURES=1 until its kernels have been
    verified on a GPU (NotImplementedError otherwise; README). There the offsets are checked
    with one device sync per call, except under torch.compile and CUDA-graph capture, where
    they are trusted (as FlashAttention trusts them).
    """
    check_varlen_qkv(q, k, v)
    check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.device)
    max_seqlen_q = check_int(max_seqlen_q, "max_seqlen_q", 0)
    max_seqlen_k = check_int(max_seqlen_k, "max_seqlen_k", 0)
    left, right = check_window(window)
    scale = check_scale(scale, q.shape[-1])
    softcap = check_softcap(softcap)
    _check_offsets_on_device(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q,
                             max_seqlen_k)
    widest = max(q.shape[0], k.shape[0])  # a side this wide is unbounded
    _ops.ensure_loaded(q.device)
    out, lse = torch.ops.fastattn.local_attention_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, min(left, widest),
        min(right, widest), scale, softcap,
    )
    return (out, lse) if return_lse else out
