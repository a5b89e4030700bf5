"""``LocalAttention``: fast-transformers' module, on fastattn's fused sliding-window kernel.

Semantics are fast-transformers 0.4.0's, exactly: query ``l`` sees keys ``l - c//2 .. l + (c -
1 - c//2)`` (c = ``local_context``) that are ``< key_lengths[n]``, plus whatever in-band entries
``attn_mask`` keeps; queries past ``query_lengths`` are computed like any other (upstream ignores
them). Two routes give the same numbers:

- all-ones or causal ``attn_mask``, no active dropout, L == S and a value dim equal to the key
  dim: ``fastattn.local_attention`` with window ``(c//2, c - 1 - c//2)`` (causal: ``(c//2, 0)``),
  so nothing of size L x c or L x S is ever materialised;
- anything else (an arbitrary additive mask, dropout in training): the banded primitives, as
  upstream: ``softmax(softmax_temp * local_dot_product(...))``, dropout, ``local_weighted_average``.

A query that sees no key at all gets upstream's output, not fastattn's zero: every slot then
holds the same -1e24, so softmax is uniform and the output is the sum of the in-range values
(``0 <= s < S``, padding included) divided by c. Its gradient reaches only those values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import fastattn
from fastattn._validate import CUDA_HEAD_DIMS, FLOAT_DTYPES
from fastattn.compat.fast_transformers.local_product import (
    band_of,
    banded_average,
    banded_scores,
    fill_value,
)
from fastattn.compat.fast_transformers.masking import additive_finite, lengths_tensor, mask_kind


class LocalAttention(nn.Module):
    """Local attention where query ``l`` sees the ``local_context`` keys centred on it.

    Arguments (fast-transformers' own): ``local_context``; ``softmax_temp`` (default
    ``1/sqrt(E)``); ``attention_dropout`` (default 0.1, applied to the attention weights in
    training mode); ``event_dispatcher`` (stored, not used: upstream's local attention
    dispatches no events either).
    """

    def __init__(self, local_context, softmax_temp=None, attention_dropout=0.1,
                 event_dispatcher=""):
        super().__init__()
        if isinstance(local_context, bool) or not isinstance(local_context, int) or local_context < 1:
            raise ValueError(f"local_context must be an int >= 1, got local_context={local_context!r}")
        self.local_context = local_context
        self.softmax_temp = softmax_temp
        self.dropout = nn.Dropout(attention_dropout)
        self.event_dispatcher = event_dispatcher

    def forward(self, queries, keys, values, attn_mask=None, query_lengths=None,
                key_lengths=None):
        """queries (N, L, H, E), keys (N, S, H, E), values (N, S, H, D) -> (N, L, H, D).

        ``attn_mask``: a mask object (None: all ones); ``key_lengths``: a length-mask object or
        an (N,) integer tensor (None: all S). ``query_lengths`` is accepted and, as upstream,
        not used.
        """
        _check_inputs(queries, keys, values)
        n, rows, _, head_dim = queries.shape
        cols = keys.shape[1]
        c = self.local_context
        scale = self.softmax_temp or 1.0 / math.sqrt(head_dim)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (queries, keys, values))
        kind = mask_kind(attn_mask, rows, cols)
        limit = lengths_tensor(key_lengths, "key_lengths", n, queries.device)
        dropout_active = self.training and self.dropout.p > 0
        if kind != "general" and not dropout_active and _fused_supports(q, k, v):
            out = _fused(q, k, v, c, kind == "causal", limit, scale)
        else:
            if kind == "all_ones":
                bias = None
            elif kind == "causal":
                bias = _causal_band(c, q.device)
            else:
                bias = band_of(additive_finite(attn_mask).to(q.device), c)
            scores = banded_scores(q, k, bias, limit, c)
            wide = torch.promote_types(q.dtype, torch.float32)
            weights = torch.softmax(scores.to(wide) * scale, dim=-1).to(q.dtype)
            out = banded_average(self.dropout(weights), v)
        return out.permute(0, 2, 1, 3).contiguous()

    def extra_repr(self) -> str:
        return (f"local_context={self.local_context}, softmax_temp={self.softmax_temp}, "
                f"attention_dropout={self.dropout.p}")


def _check_inputs(queries, keys, values):
    for name, t in (("queries", queries), ("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (N, L, H, E), got {name}.shape={tuple(t.shape)}")
    nq, _, hq, eq = queries.shape
    nk, sk, hk, ek = keys.shape
    nv, sv, hv, _ = values.shape
    if not (nq == nk == nv and hq == hk == hv and sk == sv and eq == ek):
        raise ValueError(
            "queries (N, L, H, E), keys (N, S, H, E) and values (N, S, H, D) disagree, got "
            f"queries.shape={tuple(queries.shape)}, keys.shape={tuple(keys.shape)}, "
            f"values.shape={tuple(values.shape)}")
    if not (queries.dtype == keys.dtype == values.dtype):
        raise TypeError(f"queries, keys, values must share a dtype, got {queries.dtype}, "
                        f"{keys.dtype}, {values.dtype}")
    if not queries.dtype.is_floating_point:
        raise TypeError(f"queries must be floating point, got {queries.dtype}")
    if not (queries.device == keys.device == values.device):
        raise ValueError(f"queries, keys, values must be on one device, got {queries.device}, "
                         f"{keys.device}, {values.device}")


def _fused_supports(q, k, v) -> bool:
    if q.shape != k.shape or k.shape != v.shape:
        return False
    if any(t.shape[-1] > 1 and t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if q.device.type == "cuda":
        return q.dtype in FLOAT_DTYPES and q.shape[-1] in CUDA_HEAD_DIMS
    return q.device.type == "cpu" and (q.dtype in FLOAT_DTYPES or q.dtype == torch.float64)


def _causal_band(c: int, device) -> torch.Tensor:
    """Slot j holds key l - c//2 + j, which is in the future iff j > c//2."""
    return torch.where(torch.arange(c, device=device) > c // 2, fill_value(torch.float32), 0.0)


def _fused(q, k, v, c, causal, limit, scale):
    window = (c // 2, 0 if causal else c - 1 - c // 2)
    out = fastattn.local_attention(q, k, v, window, key_lengths=limit, scale=scale)
    if limit is None:
        return out
    rows = q.shape[2]
    # Query l sees nothing iff min(key_length, S) <= max(0, l - c//2).
    nk = limit.clamp(0, rows).view(-1, 1, 1, 1)
    row = torch.arange(rows, device=q.device).view(1, 1, -1, 1)
    blind = nk <= (row - c // 2).clamp_min(0)
    first = int(torch.where(nk > 0, nk + c // 2, 0).min())
    if first >= rows:
        return out
    return torch.where(blind, _uniform_band_mean(v, c, first), out)


def _uniform_band_mean(v, c, first):
    """Rows first..L-1 of sum_{s in band, 0 <= s < S} v_s / c, zero above ``first``."""
    n, h, rows, d = v.shape
    start = first - c // 2
    lo, pad_lo = max(0, start), max(0, -start)
    hi = min(rows, rows - 1 - c // 2 + c)
    pad_hi = (rows - 1 - c // 2 + c) - hi
    window = torch.nn.functional.pad(v[:, :, lo:hi], (0, 0, pad_lo, pad_hi))
    tail = window.unfold(2, c, 1).sum(-1) / c
    return torch.nn.functional.pad(tail, (0, 0, first, 0))
