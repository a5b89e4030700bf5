"""GQA / MQA in local attention on the CPU: k and v with H_kv heads, each shared by a group of
H / H_kv query heads (query head h reads kv head h // (H / H_kv)), against the float64
reference; dk and dv have k's shape (the sum over each group's query heads)."""

import pytest
import torch

import fastattn
from tests.local_cases import check_against_reference, make_qkv

HEADS = 16
# Group sizes H / H_kv: 1 (every query head its own kv head), 2, 8 and H (MQA: one kv head).
GROUPS = [1, 2, 8, HEADS]
# (L, window): lengths that are not multiples of the kernel's 32-row tiles or 64-key chunks;
# causal, two-sided, and windows wider than L (full and causal attention).
SHAPES = [(45, (7, 0)), (67, (9, 9)), (37, (100, 100)), (70, (200, 0))]


def _group_id(group):
    return "mqa" if group == HEADS else f"group{group}"


def _shape_id(shape):
    return f"L{shape[0]}-w{shape[1][0]}x{shape[1][1]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("group", GROUPS, ids=_group_id)
def test_matches_reference(group, shape, dtype):
    seq_len, window = shape
    q, k, v = make_qkv(3, HEADS, seq_len, 16, dtype, kv_heads=HEADS // group)
    # No valid key at all, all of them, and a boundary inside a tile.
    key_lengths = torch.tensor([seq_len, 0, seq_len // 2 + 3])
    out = check_against_reference(q, k, v, window, key_lengths=key_lengths)
    assert torch.all(out[1] == 0), "a batch with no valid key must give zeros"


@pytest.mark.parametrize("group", [2, 3], ids=_group_id)
def test_strided_inputs_without_key_lengths(group):
    """(B, L, H, D) storage, so the heads of k and v are not adjacent in memory."""
    q, k, v = make_qkv(2, 6, 97, 24, torch.float32, layout="blhd", kv_heads=6 // group)
    assert not k.is_contiguous()
    check_against_reference(q, k, v, (20, 11))


@pytest.mark.parametrize("group", [2, HEADS], ids=_group_id)
def test_forward_equals_plain_attention_over_repeated_kv(group):
    """Reading kv head h // group is exactly attention over k and v repeated per query head:
    the same kernel on the same numbers, so the same bits."""
    q, k, v = make_qkv(2, HEADS, 50, 16, torch.bfloat16, kv_heads=HEADS // group)
    out, lse = fastattn.local_attention(q, k, v, (6, 3), return_lse=True)
    k_rep, v_rep = (t.repeat_interleave(group, dim=1) for t in (k, v))
    out_rep, lse_rep = fastattn.local_attention(q, k_rep, v_rep, (6, 3), return_lse=True)
    assert torch.equal(out, out_rep) and torch.equal(lse, lse_rep)


def test_backward_is_deterministic():
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 8, 130, 32, torch.bfloat16, kv_heads=2))
    grad = torch.randn_like(q)

    def grads():
        return torch.autograd.grad(fastattn.local_attention(q, k, v, (40, 40)), (q, k, v), grad)

    first, second = grads(), grads()
    assert [g.shape for g in first] == [q.shape, k.shape, v.shape]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("shape", [(1, 4, 0, 8), (0, 4, 5, 8), (2, 0, 5, 8)],
                         ids=["L0", "B0", "H0"])
def test_empty_inputs_give_gradients_of_k_s_shape(shape):
    batch, heads, seq_len, head_dim = shape
    q = torch.randn(shape, requires_grad=True)
    k, v = (torch.randn(batch, 2, seq_len, head_dim, requires_grad=True) for _ in range(2))
    out = fastattn.local_attention(q, k, v, (3, 3))
    grad_q, grad_k, grad_v = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert (grad_q.shape, grad_k.shape, grad_v.shape) == (q.shape, k.shape, v.shape)
    assert not grad_k.any() and not grad_v.any(), "no query: the kv gradients are zeros"
