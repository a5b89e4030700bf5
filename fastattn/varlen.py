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
    verified on a GPU (NotImplementedError otherwise; README).
    """
    check_varlen_qkv(q, k, v)
    check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.device)
    max_seqlen_q = check_int(max_seqlen_q, "max_seqlen_q", 0)
    max_seqlen_k = check_int(max_seqlen_k, "max_seqlen_k", 0)
    left, right = check_window(window)
    scale = check_scale(scale, q.shape[-1])
    softcap = check_softcap(softcap)
    widest = max(q.shape[0], k.shape[0])  # a side this wide is unbounded
    _ops.ensure_loaded(q.device)
    out, lse = torch.ops.fastattn.local_attention_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, min(left, widest),
        min(right, widest), scale, softcap,
    )
    return (out, lse) if return_lse else out
