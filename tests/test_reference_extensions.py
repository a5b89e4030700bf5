"""The references themselves (Lq != Lk, softcap, varlen) against a brute-force dense
computation in float64, so that a reference bug cannot hide a kernel bug: the kernels are
only ever held to these references.

The dense side writes the spec's rule out row by row (a list of the keys each query sees),
and a few hand-written visible sets pin the bottom-right alignment itself.
"""

import math

import pytest
import torch

from fastattn.reference import local_attention_reference, local_attention_varlen_reference
from tests.local_cases import make_qkv


def _seen(pos, window, keys):
    """The keys a query at key position ``pos`` sees, by the spec's rule."""
    left, right = window
    return [j for j in range(keys) if pos - left <= j <= pos + right]


def _dense(q, k, v, seen, scale, softcap):
    """q (B, H, Lq, D), k and v (B, H_kv, Lk, D); seen(b, i) lists the keys of query i."""
    batch, heads, q_len, _ = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype)
    rows_out, rows_lse = [], []
    for b in range(batch):
        for h in range(heads):
            scores = q[b, h] @ k[b, h // group].T * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            for i in range(q_len):
                cols = seen(b, i)
                if cols:
                    row = scores[i, cols]
                    rows_out.append(((b, h, i), torch.softmax(row, 0) @ v[b, h // group, cols]))
                    rows_lse.append(((b, h, i), torch.logsumexp(row, 0)))
    # Scattered at the end, out of place, so that autograd sees one graph.
    if rows_out:
        index = tuple(torch.tensor(ix) for ix in zip(*(ix for ix, _ in rows_out), strict=True))
        out = out.index_put(index, torch.stack([r for _, r in rows_out]))
        lse = lse.index_put(index, torch.stack([r for _, r in rows_lse]))
    return out, lse


def _dense_batched(q, k, v, window, key_lengths, scale, softcap):
    q_len, k_len = q.shape[2], k.shape[2]
    keys = [k_len] * q.shape[0] if key_lengths is None else [
        min(max(int(n), 0), k_len) for n in key_lengths]
    offsets = [0 if q_len == k_len else n - q_len for n in keys]
    return _dense(q, k, v, lambda b, i: _seen(i + offsets[b], window, keys[b]), scale, softcap)


def _assert_same(actual, expected, leaves, upstream):
    """Equal (out, lse) in float64, and equal gradients of one random upstream loss."""
    grads = []
    for out, lse in (actual, expected):
        torch.testing.assert_close(out, expected[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lse, expected[1], rtol=1e-10, atol=1e-12)
        finite = torch.isfinite(lse)
        loss = (out * upstream[0]).sum() + (lse[finite] * upstream[1][finite]).sum()
        grads.append(torch.autograd.grad(loss, leaves))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# (Lq, Lk, window, key_lengths of a batch of 3)
BATCHED = [
    (1, 13, (4, 0), [13, 0, 6]),  # decode
    (5, 13, (3, 2), [13, 4, 11]),  # a chunk of queries at the end of the cache
    (13, 13, (2, 1), [13, 0, 7]),  # Lq == Lk: padding mask, no shift
    (13, 13, (0, 20), None),
    (9, 4, (2, 0), [4, 1, 0]),  # Lq > Lk: the first queries sit at negative positions
    (9, 4, (1, 3), None),
    (6, 11, (30, 30), [11, 2, 9]),  # wider than Lk
]


def _case_id(case):
    q_len, k_len, window, key_lengths = case
    lengths = "" if key_lengths is None else "-kl" + "_".join(map(str, key_lengths))
    return f"Lq{q_len}-Lk{k_len}-w{window[0]}x{window[1]}{lengths}"


@pytest.mark.parametrize("softcap", [None, 0.7], ids=["nocap", "cap0.7"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=lambda h: f"Hkv{h}")
@pytest.mark.parametrize("case", BATCHED, ids=_case_id)
def test_batched_reference_equals_dense(case, kv_heads, softcap):
    q_len, k_len, window, key_lengths = case
    q, k, v = make_qkv(3, 4, q_len, 5, torch.float64, kv_heads=kv_heads, kv_len=k_len)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    key_lengths = None if key_lengths is None else torch.tensor(key_lengths)
    # chunk=2: chunks whose key range differs per batch (one offset each) and chunks that see
    # no key in some batch.
    actual = local_attention_reference(*leaves, window, key_lengths=key_lengths, scale=0.8,
                                       softcap=softcap, return_lse=True, chunk=2)
    expected = _dense_batched(*leaves, window, key_lengths, 0.8, softcap)
    upstream = (torch.randn_like(expected[0]), torch.randn_like(expected[1]))
    _assert_same(actual, expected, leaves, upstream)


def _visible_sets(q_len, k_len, window, key_lengths=None):
    """The keys each query sees, read off the reference: q = 0 gives uniform weights over the
    visible keys, and v = identity turns them into an indicator row."""
    q = torch.zeros(1, 1, q_len, k_len, dtype=torch.float64)
    k = torch.randn(1, 1, k_len, k_len, dtype=torch.float64)
    v = torch.eye(k_len, dtype=torch.float64).view(1, 1, k_len, k_len)
    lengths = None if key_lengths is None else torch.tensor([key_lengths])
    out, lse = local_attention_reference(q, k, v, window, key_lengths=lengths, return_lse=True)
    sets = [torch.nonzero(row).flatten().tolist() for row in out[0, 0]]
    assert [bool(s) for s in sets] == torch.isfinite(lse[0, 0]).tolist()
    return sets


@pytest.mark.parametrize(
    "q_len, k_len, window, key_lengths, expected",
    [
        (1, 10, (2, 0), None, [[7, 8, 9]]),
        (1, 10, (2, 0), 6, [[3, 4, 5]]),  # a cache filled to 6: the query sits at 5
        (3, 5, (1, 1), 4, [[0, 1, 2], [1, 2, 3], [2, 3]]),
        (4, 4, (0, 0), 2, [[0], [1], [], []]),  # Lq == Lk: key_lengths does not shift
        (4, 2, (1, 0), None, [[], [], [0], [0, 1]]),  # positions -2, -1, 0, 1
        (2, 6, (0, 1), 0, [[], []]),
    ],
)
def test_bottom_right_alignment_by_hand(q_len, k_len, window, key_lengths, expected):
    assert _visible_sets(q_len, k_len, window, key_lengths) == expected


def test_softcap_changes_the_scores_before_the_softmax():
    """With every score far above the cap, capped scores are all ~cap: uniform weights."""
    q, k, v = make_qkv(1, 1, 6, 4, torch.float64)
    q, k = q.abs() + 5, k.abs() + 5
    out, lse = local_attention_reference(q, k, v, (100, 100), scale=1.0, softcap=1e-3,
                                         return_lse=True)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(out))
    torch.testing.assert_close(lse, torch.full_like(lse, 1e-3 + math.log(6)))


def _dense_varlen(q, k, v, cu_q, cu_k, window, scale, softcap):
    """The packed tensors as one sequence, with the block rule: query row r of sequence n sees
    key row cu_k[n] + j for the local keys j the spec's rule gives it."""
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()

    def seen(_, row):
        n = max(m for m in range(len(cu_q) - 1) if cu_q[m] <= row < cu_q[m + 1])
        q_len, k_len = cu_q[n + 1] - cu_q[n], cu_k[n + 1] - cu_k[n]
        local = _seen(row - cu_q[n] + k_len - q_len, window, k_len)
        return [cu_k[n] + j for j in local]

    def batch_of_one(t):
        return t.transpose(0, 1).unsqueeze(0)

    out, lse = _dense(batch_of_one(q), batch_of_one(k), batch_of_one(v), seen, scale, softcap)
    return out[0].transpose(0, 1), lse[0]


@pytest.mark.parametrize("softcap", [None, 1.5], ids=["nocap", "cap1.5"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=lambda h: f"Hkv{h}")
def test_varlen_reference_equals_dense(kv_heads, softcap):
    # Sequences: q and k empty, q with no key, equal lengths, shorter q (decode-like), longer q.
    q_lens, k_lens = [0, 3, 5, 1, 6], [0, 0, 5, 7, 2]
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).int()
    cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0).int()
    q = torch.randn(sum(q_lens), 2, 3, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(sum(k_lens), kv_heads, 3, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    actual = local_attention_varlen_reference(q, k, v, cu_q, cu_k, (2, 1), softcap=softcap,
                                              return_lse=True)
    expected = _dense_varlen(q, k, v, cu_q, cu_k, (2, 1), 3**-0.5, softcap)
    assert actual[0].shape == (sum(q_lens), 2, 3) and actual[1].shape == (2, sum(q_lens))
    assert torch.all(actual[0][:3] == 0) and torch.all(torch.isneginf(actual[1][:, :3]))
    upstream = (torch.randn_like(expected[0]), torch.randn_like(expected[1]))
    _assert_same(actual, expected, [q, k, v], upstream)


def test_varlen_reference_with_no_sequence():
    q = torch.zeros(0, 2, 4)
    cu = torch.zeros(1, dtype=torch.int32)
    out, lse = local_attention_varlen_reference(q, q, q, cu, cu, (1, 1), return_lse=True)
    assert out.shape == (0, 2, 4) and lse.shape == (2, 0)
