"""Helpers shared by the local attention tests: inputs, and the float64 / same-precision check."""

from __future__ import annotations

import torch

import fastattn
from fastattn.reference import local_attention_reference, local_attention_varlen_reference
from tests.tolerance import GRAD_FACTOR, assert_close_to_reference

# Error floors per dtype: rounding of one output element, so that a tiny same-precision
# error does not make the bound vanish. float64 gradients go through the float32 lse.
FLOORS = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_qkv(batch, heads, seq_len, head_dim, dtype, device="cpu", layout="bhld", kv_heads=None,
             kv_len=None):
    """Random q, k, v; layout "blhd" gives (B, H, L, D) views of (B, L, H, D) storage.
    kv_heads, kv_len: the heads and length of k and v (GQA / MQA, a KV cache), by default q's."""
    def one(h, n):
        if layout == "blhd":
            t = torch.randn(batch, n, h, head_dim, device=device, dtype=dtype)
            return t.transpose(1, 2)
        return torch.randn(batch, h, n, head_dim, device=device, dtype=dtype)

    kv_heads = heads if kv_heads is None else kv_heads
    kv_len = seq_len if kv_len is None else kv_len
    return one(heads, seq_len), one(kv_heads, kv_len), one(kv_heads, kv_len)


def check_against_reference(q, k, v, window, *, key_lengths=None, scale=None, softcap=None,
                            fn=None):
    """Forward (out and lse) and gradients with random upstream gradients, against float64.
    q (B, H, Lq, D), k and v (B, H_kv, Lk, D); ``softcap`` reaches ``fn`` only when set."""
    fn = fn or fastattn.local_attention
    capped = {} if softcap is None else {"softcap": softcap}

    def run(q, k, v):
        return fn(q, k, v, window, key_lengths=key_lengths, scale=scale, return_lse=True,
                  **capped)

    def reference(q, k, v):
        return local_attention_reference(q, k, v, window, key_lengths=key_lengths, scale=scale,
                                         softcap=softcap, return_lse=True)

    return check_call_against_reference(run, reference, q, k, v)


def check_varlen_against_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, window, *, scale=None,
                                   softcap=None, max_seqlen=None):
    """As check_against_reference, for fastattn.local_attention_varlen on packed (T, H, D)
    tensors; max_seqlen (q's, k's) defaults to the longest sequences."""
    if max_seqlen is None:
        max_seqlen = tuple(max(cu.diff().tolist(), default=0)
                           for cu in (cu_seqlens_q, cu_seqlens_k))

    def run(q, k, v):
        return fastattn.local_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *max_seqlen,
                                               window, scale=scale, softcap=softcap,
                                               return_lse=True)

    def reference(q, k, v):
        return local_attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, window,
                                                scale=scale, softcap=softcap, return_lse=True)

    return check_call_against_reference(run, reference, q, k, v)


def check_call_against_reference(run, reference, q, k, v):
    """run(q, k, v) and reference(q, k, v) return (out, lse): the run on the caller's q, k, v,
    the reference on float64 copies (gold) and same-precision copies."""
    floor = FLOORS[q.dtype]
    # The kernel gets the caller's tensors as laid out (strided, NaN-padded or misaligned views:
    # a clone would come back contiguous and hide what the layout is there to test).
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = run(*leaves)

    gold_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    gold_out, gold_lse = reference(*gold_leaves)
    same_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    same_out, same_lse = reference(*same_leaves)

    assert_close_to_reference(out, gold_out, same_out, floor=floor, name="out")
    assert_close_to_reference(lse, gold_lse, same_lse.float(), floor=1e-5, name="lse")

    grad_out = torch.randn_like(gold_out)
    # lse is -inf for queries that see nothing; their lse gradient must not matter.
    grad_lse = torch.randn_like(gold_lse).masked_fill(~torch.isfinite(gold_lse), 0)
    for result, result_lse in ((out, lse), (gold_out, gold_lse), (same_out, same_lse)):
        finite = torch.isfinite(result_lse)
        loss = (result * grad_out.to(result.dtype)).sum()
        loss = loss + (result_lse[finite] * grad_lse.to(result_lse.dtype)[finite]).sum()
        loss.backward()
    for name, actual, gold, same in zip("qkv", leaves, gold_leaves, same_leaves, strict=True):
        assert_close_to_reference(actual.grad, gold.grad, same.grad, factor=GRAD_FACTOR,
                                  floor=floor, name=f"grad_{name}")
    return out
