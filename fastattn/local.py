"""Public sliding-window attention: ``fastattn.local_attention``."""

from __future__ import annotations

import torch

from fastattn import _ops
from fastattn._validate import check_lengths, check_qkv, check_scale, check_window


def local_attention(q, k, v, window, *, key_lengths=None, scale=None, return_lse=False):
    """Sliding-window attention: q (B, H, L, D), k and v (B, H_kv, L, D).

    Query ``i`` attends key ``j`` iff ``i - left <= j <= i + right`` and
    ``j < key_lengths[b]`` (inclusive bounds, FlashAttention's convention). ``(w, 0)`` is
    causal sliding-window attention; a window wider than L is full (or causal) attention.
    A query that sees no key gets output 0 and lse = -inf. ``key_lengths`` values are
    clamped to [0, L]. ``lse`` is float32 of shape (B, H, L), natural log.

    GQA / MQA: k and v may have H_kv heads where H_kv divides H (H_kv = 1 is MQA); query
    head ``h`` reads k / v head ``h // (H // H_kv)``, without a repeated copy of k and v. The
    gradients of k and v have k's shape: the sum over the H // H_kv query heads of a group.
    """
    check_qkv(q, k, v, grouped_kv=True)
    left, right = check_window(window)
    scale = check_scale(scale, q.shape[-1])
    key_lengths = check_lengths(key_lengths, "key_lengths", q.shape[0], q.device)
    seq_len = q.shape[2]
    _ops.ensure_loaded(q.device)
    out, lse = torch.ops.fastattn.local_attention_fwd(
        q, k, v, min(left, seq_len), min(right, seq_len), key_lengths, scale
    )
    return (out, lse) if return_lse else out
