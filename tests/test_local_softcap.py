"""Logit soft-capping (Gemma 2): scores s = scale * q.k become c * tanh(s / c) before masking
and the softmax; on the CPU, against the float64 reference and finite differences."""

import math

import pytest
import torch

import fastattn
from tests.local_cases import check_against_reference, make_qkv

HEADS = 4
# (Lq, Lk, window, H_kv, key_lengths of a batch of 3, softcap): caps that bend the scores of
# randn inputs (|s| ~ 1-4 at scale 1), combined with GQA, MQA, Lq != Lk (decode, a chunk,
# Lq > Lk) and key_lengths with an empty batch row.
CASES = [
    (45, 45, (7, 0), 4, None, 2.0),
    (45, 45, (9, 9), 2, [45, 0, 20], 1.0),
    (7, 77, (20, 0), 1, [77, 0, 45], 0.5),
    (1, 77, (30, 30), 2, None, 3.0),
    (90, 77, (15, 15), 2, [77, 5, 60], 1.5),
]


def _case_id(case):
    q_len, k_len, window, kv_heads, key_lengths, softcap = case
    lengths = "-key_lengths" if key_lengths else ""
    return f"Lq{q_len}-Lk{k_len}-w{window[0]}x{window[1]}-Hkv{kv_heads}{lengths}-cap{softcap}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_matches_reference(dtype, case):
    q_len, k_len, window, kv_heads, key_lengths, softcap = case
    q, k, v = make_qkv(3, HEADS, q_len, 16, dtype, kv_heads=kv_heads, kv_len=k_len)
    key_lengths = None if key_lengths is None else torch.tensor(key_lengths)
    check_against_reference(q, k, v, window, key_lengths=key_lengths, scale=1.0, softcap=softcap)


def test_softcap_is_applied():
    """Guards the comparison above against a kernel and reference that both ignore softcap."""
    q, k, v = make_qkv(1, 2, 30, 16, torch.float32)
    plain = fastattn.local_attention(q, k, v, (8, 8), scale=1.0)
    capped = fastattn.local_attention(q, k, v, (8, 8), scale=1.0, softcap=1.0)
    assert (plain - capped).abs().max() > 0.1


@pytest.mark.parametrize("key_lengths", [None, [4]], ids=["no-lengths", "key_lengths"])
def test_gradients_by_finite_differences(key_lengths):
    """torch.autograd.gradcheck in float64 through the public API: out at gradcheck's own
    precision; lse is float32 (the contract), so its central differences take a step of 1e-3,
    where float32 rounding (~2e-7 of |lse| ~ 2, i.e. ~2e-4 of a derivative) stays below the
    tolerance and a missing 1 - tanh^2 factor (O(0.1) here) does not."""
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lengths = None if key_lengths is None else torch.tensor(key_lengths)

    def call(q, k, v):
        # Lq != Lk, GQA (two query heads on one kv head); every query sees a key: a finite lse.
        return fastattn.local_attention(q, k, v, (2, 1), key_lengths=lengths, scale=1.5,
                                        softcap=0.8, return_lse=True)

    assert torch.autograd.gradcheck(lambda *qkv: call(*qkv)[0], (q, k, v))
    assert torch.autograd.gradcheck(lambda *qkv: call(*qkv)[1].double(), (q, k, v), eps=1e-3,
                                    atol=1e-3, rtol=1e-3)


def test_large_softcap_equals_no_softcap():
    """c * tanh(s / c) = s - s^3 / (3 c^2) + ...: at c = 1e4 and |s| < 10 it moves s by < 1e-5."""
    q, k, v = make_qkv(2, HEADS, 40, 16, torch.float64)
    key_lengths = torch.tensor([40, 17])
    plain = fastattn.local_attention(q, k, v, (9, 3), key_lengths=key_lengths, return_lse=True)
    capped = fastattn.local_attention(q, k, v, (9, 3), key_lengths=key_lengths, softcap=1e4,
                                      return_lse=True)
    for a, b in zip(plain, capped, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _call_batched(softcap):
    q, k, v = make_qkv(1, 2, 8, 16, torch.float32)
    return fastattn.local_attention(q, k, v, (2, 2), softcap=softcap)


def _call_varlen(softcap):
    q, k, v = (torch.randn(8, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 8], dtype=torch.int32)
    return fastattn.local_attention_varlen(q, k, v, cu, cu, 8, 8, (2, 2), softcap=softcap)


@pytest.mark.parametrize("call", [_call_batched, _call_varlen], ids=["batched", "varlen"])
@pytest.mark.parametrize(
    "softcap, error, shown",
    [
        (0.0, ValueError, "0.0"),
        (-1.5, ValueError, "-1.5"),
        (math.nan, ValueError, "nan"),
        (math.inf, ValueError, "inf"),
        (True, TypeError, "True"),
        ("1.0", TypeError, "'1.0'"),
    ],
    ids=["zero", "negative", "nan", "inf", "bool", "str"],
)
def test_bad_softcap(call, softcap, error, shown):
    with pytest.raises(error, match=rf"softcap.*{shown}"):
        call(softcap)
