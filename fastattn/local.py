"""Public sliding-window attention: ``fastattn.local_attention``."""

from __future__ import annotations

import torch

from fastattn import _ops
from fastattn._validate import (
    check_lengths,
    check_qkv,
    check_scale,
    check_softcap,
    check_window,
)


def local_attention(q, k, v, window, *, key_lengths=None, scale=None, softcap=None,
                    return_lse=False):
    """Sliding-window attention: q (B, H, Lq, D), k and v (B, H_kv, Lk, D).

    Query ``i`` sits at key position ``p = i + offset`` and attends key ``j`` iff
    ``p - left <= j <= p + right`` and ``j < keys[b]`` (inclusive bounds, FlashAttention's
    convention), where ``keys[b]`` is ``key_lengths[b]`` clamped to [0, Lk] (Lk without
    key_lengths). ``(w, 0)`` is causal sliding-window attention; a window wider than the
    sequence is full (or causal) attention. A query that sees no key gets output 0 and
    lse = -inf. ``lse`` is float32 of shape (B, H, Lq), natural log.

    Alignment: with Lq == Lk (self-attention) ``offset = 0``, and key_lengths pads queries and
    keys alike. With Lq != Lk (a KV cache, chunked prefill, decode) the queries are the last
    Lq positions of the keys, bottom-right aligned as in FlashAttention >= 2.1:
    ``offset = keys[b] - Lq``, so with key_lengths each batch row's queries end at its own
    filled length. Queries at negative positions (Lq > keys[b]) see only keys their right side
    reaches.

    GQA / MQA: k and v may have H_kv heads where H_kv divides H (H_kv = 1 is MQA); query
    head ``h`` reads k / v head ``h // (H // H_kv)``, without a repeated copy of k and v. The
    gradients of k and v have k's shape: the sum over the H // H_kv query heads of a group.

    softcap: ``c > 0`` replaces each scaled score ``s`` by ``c * tanh(s / c)`` before the
    softmax (Gemma 2's logit soft-capping), with its exact gradient; None: no capping.

    On CUDA, Lq != Lk and softcap run only with FASTATTN_UNVERIFIED_CUDA_FEATURES=1 until
    their kernels have been verified on a GPU (NotImplementedError otherwise; README).
    """
    check_qkv(q, k, v, grouped_kv=True, kv_cache=True)
    left, right = check_window(window)
    scale = check_scale(scale, q.shape[-1])
    softcap = check_softcap(softcap)
    key_lengths = check_lengths(key_lengths, "key_lengths", q.shape[0], q.device)
    widest = max(q.shape[2], k.shape[2])  # a side this wide is unbounded
    _ops.ensure_loaded(q.device)
    out, lse = torch.ops.fastattn.local_attention_fwd(
        q, k, v, min(left, widest), min(right, widest), key_lengths, scale, softcap
    )
    return (out, lse) if return_lse else out
