"""CPU kernel of local attention vs the float64 reference: outputs, lse and gradients."""

import pytest
import torch

import fastattn
from tests.local_cases import check_against_reference, make_qkv

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_len", [1, 17, 67])
@pytest.mark.parametrize(
    "window", [(0, 0), (5, 0), (0, 6), (3, 9), (200, 200), (200, 0)],
    ids=lambda w: f"w{w[0]}x{w[1]}")
def test_matches_reference(dtype, seq_len, window):
    q, k, v = make_qkv(2, 3, seq_len, 16, dtype)
    check_against_reference(q, k, v, window)


# The CPU kernel works in tiles of 32 rows against chunks of 64 keys (queries): lengths and
# windows that cross several tiles and chunks at odd offsets, key_lengths ending mid-tile, and
# a head dim with a remainder past the kernel's 32-wide blocks.
@pytest.mark.parametrize("window", [(70, 45), (130, 0), (0, 97), (1, 1)], ids=lambda w: f"w{w[0]}x{w[1]}")
def test_many_tiles_and_chunks(window):
    q, k, v = make_qkv(2, 2, 301, 40, torch.float32)
    check_against_reference(q, k, v, window, key_lengths=torch.tensor([301, 150]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_lengths_zero_partial_and_full(dtype):
    seq_len = 45
    q, k, v = make_qkv(3, 2, seq_len, 24, dtype)
    key_lengths = torch.tensor([0, 19, seq_len])
    out = check_against_reference(q, k, v, (4, 7), key_lengths=key_lengths)
    assert torch.all(out[0] == 0), "a batch with no valid key must give zeros"


def test_queries_past_the_valid_keys_see_nothing():
    q, k, v = make_qkv(1, 1, 20, 16, torch.float32)
    out, lse = fastattn.local_attention(q, k, v, (0, 0), key_lengths=torch.tensor([10]),
                                        return_lse=True)
    assert torch.all(out[..., 10:, :] == 0) and torch.all(torch.isneginf(lse[..., 10:]))
    assert torch.isfinite(lse[..., :10]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs_from_blhd_layout(dtype):
    q, k, v = make_qkv(2, 4, 33, 32, dtype, layout="blhd")
    assert not q.is_contiguous()
    check_against_reference(q, k, v, (6, 2))


@pytest.mark.parametrize("head_dim", [1, 7, 64, 160])
def test_any_head_dim(head_dim):
    q, k, v = make_qkv(1, 2, 29, head_dim, torch.float32)
    check_against_reference(q, k, v, (5, 5))


def test_custom_scale_and_float64():
    q, k, v = make_qkv(1, 2, 31, 8, torch.float64)
    check_against_reference(q, k, v, (3, 3), scale=0.7)


def test_wide_window_equals_full_attention():
    q, k, v = make_qkv(1, 2, 50, 16, torch.float64)
    wide = fastattn.local_attention(q, k, v, (10**9, 10**9))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(wide, full)
    causal = fastattn.local_attention(q, k, v, (10**9, 0))
    torch.testing.assert_close(causal, torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True))


def test_forward_is_deterministic():
    q, k, v = make_qkv(2, 2, 300, 32, torch.bfloat16)
    first = fastattn.local_attention(q, k, v, (40, 40))
    assert torch.equal(first, fastattn.local_attention(q, k, v, (40, 40)))
