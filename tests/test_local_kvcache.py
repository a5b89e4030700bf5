"""Lq != Lk on the CPU (KV cache, chunked prefill, decode): bottom-right alignment, query i at
key position i + keys[b] - Lq (i with Lq == Lk), against the float64 reference."""

import pytest
import torch

import fastattn
from tests.local_cases import check_against_reference, make_qkv

HEADS = 4
# (Lq, Lk): decode, a chunk of queries, half the cache and Lq == Lk, at cache lengths that are
# not multiples of the kernel's 32-row tiles or 64-key chunks.
SHAPES = [(1, 77), (7, 77), (38, 77), (77, 77), (1, 150), (75, 150)]
# Causal, two-sided, right-only, and wider than Lk (causal and full attention).
WINDOWS = [(20, 0), (13, 13), (0, 9), (200, 0), (200, 200)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _shape_id(shape):
    return f"Lq{shape[0]}-Lk{shape[1]}"


def _window_id(window):
    return f"w{window[0]}x{window[1]}"


def _group_id(group):
    return "mqa" if group == HEADS else f"group{group}"


def _cache(batch, q_len, k_len, dtype, group=2):
    return make_qkv(batch, HEADS, q_len, 16, dtype, kv_heads=HEADS // group, kv_len=k_len)


def _key_lengths(k_len):
    """An empty cache, one filled to 45 (inside a tile) and a full one."""
    return torch.tensor([0, 45, k_len])


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full-cache", "key_lengths"])
@pytest.mark.parametrize("window", WINDOWS, ids=_window_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, shape, window, with_lengths):
    q_len, k_len = shape
    key_lengths = _key_lengths(k_len) if with_lengths else None
    q, k, v = _cache(3, q_len, k_len, dtype)
    out = check_against_reference(q, k, v, window, key_lengths=key_lengths)
    assert out.shape == q.shape
    if with_lengths:
        assert torch.all(out[0] == 0), "an empty cache must give zeros"


@pytest.mark.parametrize("shape", [(7, 77), (38, 77), (75, 150)], ids=_shape_id)
@pytest.mark.parametrize("group", [1, 2, HEADS], ids=_group_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gqa(dtype, group, shape):
    q, k, v = _cache(3, *shape, dtype, group=group)
    check_against_reference(q, k, v, (17, 3), key_lengths=_key_lengths(shape[1]))


@pytest.mark.parametrize("window", [(10, 0), (6, 6), (0, 30)], ids=_window_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_more_queries_than_keys(dtype, window):
    """Lq > keys[b]: the first queries sit at negative positions; with a causal window they
    see nothing (out 0, lse -inf), with a right side they see the first keys."""
    q_len, k_len = 90, 77
    key_lengths = torch.tensor([k_len, 5])
    q, k, v = _cache(2, q_len, k_len, dtype)
    out = check_against_reference(q, k, v, window, key_lengths=key_lengths)
    _, lse = fastattn.local_attention(q, k, v, window, key_lengths=key_lengths, return_lse=True)
    for b, keys in enumerate(key_lengths.tolist()):
        # Query i sits at i + keys - Lq and sees a key iff it reaches 0 and is within keys.
        positions = torch.arange(q_len) + keys - q_len
        sees = (positions + window[1] >= 0) & (positions - window[0] < keys)
        assert torch.equal(torch.isfinite(lse[b]), sees.expand(HEADS, -1))
        assert torch.all(out[b][:, ~sees] == 0)


def _nan_past(t, key_lengths):
    """t with every key position at or past key_lengths[b] replaced by NaN (differentiably)."""
    positions = torch.arange(t.shape[2])
    padded = positions[None, None, :, None] >= key_lengths[:, None, None, None]
    return torch.where(padded, torch.full_like(t, float("nan")), t)


@pytest.mark.parametrize("shape", [(1, 150), (38, 77)], ids=_shape_id)
def test_unfilled_cache_is_never_read(shape):
    """A cache holds garbage past its filled length: NaN there must not reach out, lse or a
    gradient."""
    key_lengths = _key_lengths(shape[1])
    q, k, v = _cache(3, *shape, torch.float32)

    def fn(q, k, v, window, **kwargs):
        return fastattn.local_attention(q, _nan_past(k, key_lengths), _nan_past(v, key_lengths),
                                        window, **kwargs)

    check_against_reference(q, k, v, (30, 30), key_lengths=key_lengths, fn=fn)


@pytest.mark.parametrize("q_len", [1, 16], ids=lambda n: f"Lq{n}")
def test_decode_matches_self_attention(q_len):
    """Decoding the last queries of a cache gives the last rows of self-attention over the same
    sequence (Lq == Lk, whose key_lengths pads the queries too), and the float64 reference."""
    k_len, window = 4096, (1024, 0)
    key_lengths = torch.tensor([k_len, 3001])
    q_full, k, v = _cache(2, k_len, k_len, torch.float32)
    full = fastattn.local_attention(q_full, k, v, window, key_lengths=key_lengths)
    q = torch.stack([q_full[b, :, n - q_len:n] for b, n in enumerate(key_lengths.tolist())])
    out = check_against_reference(q, k, v, window, key_lengths=key_lengths)
    for b, n in enumerate(key_lengths.tolist()):
        torch.testing.assert_close(out[b], full[b, :, n - q_len:n])


def test_key_lengths_are_clamped_before_the_alignment():
    """keys[b] = clamp(key_lengths[b], 0, Lk) also sets the queries' positions (keys - Lq)."""
    q, k, v = _cache(2, 7, 30, torch.float32)
    clamped = fastattn.local_attention(q, k, v, (5, 2), key_lengths=torch.tensor([-3, 99]),
                                       return_lse=True)
    expected = fastattn.local_attention(q, k, v, (5, 2), key_lengths=torch.tensor([0, 30]),
                                        return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(clamped, expected, strict=True))


@pytest.mark.parametrize("shape", [(3, 0), (0, 5)], ids=_shape_id)
def test_empty_cache_or_no_queries(shape):
    """No key: out 0, lse -inf, zero gradients; no query: empty out, zero dk and dv."""
    q, k, v = (t.requires_grad_() for t in _cache(2, *shape, torch.float32))
    out, lse = fastattn.local_attention(q, k, v, (3, 0), return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert out.shape == q.shape and not out.any() and torch.isneginf(lse).all()
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert not any(g.any() for g in grads)


@pytest.mark.parametrize("window", [(70, 45), (130, 0)], ids=_window_id)
def test_many_tiles_and_chunks(window):
    """The CPU kernel's 32-row tiles and 64-key chunks, several of each, at an offset (keys -
    Lq) that is not a multiple of either, per batch row."""
    q, k, v = make_qkv(2, 2, 100, 40, torch.float32, kv_len=301)
    check_against_reference(q, k, v, window, key_lengths=torch.tensor([301, 150]))
