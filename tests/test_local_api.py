"""Input validation of fastattn.local_attention: each error names the argument and values."""

import pytest
import torch

import fastattn
from fastattn import _ops


def qkv(shape=(2, 3, 10, 16), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda q, k, v: ("q", k, v), TypeError, r"q must be a torch.Tensor, got str"),
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must be 4-D .* q.shape=\(3, 10, 16\)"),
        (lambda q, k, v: (q, k[:, :, :7], v), ValueError, r"k.shape=\(2, 3, 7, 16\)"),
        (lambda q, k, v: (q, k, v[:, :2]), ValueError, r"v.shape=\(2, 2, 10, 16\)"),
        (lambda q, k, v: (q, k.double(), v), TypeError, r"share a dtype, got torch.float32, torch.float64"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, r"q.dtype must be one of .* got torch.int32"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, r"one device, got cpu, meta, cpu"),
        (lambda q, k, v: (q.transpose(2, 3).contiguous().transpose(2, 3), k, v), ValueError,
         r"q's last \(head\) dimension must be contiguous, got q.stride\(\)=\(480, 160, 1, 10\)"),
        (lambda q, k, v: (q, k[:, :2], v[:, :2]), ValueError,
         r"q has H=3 heads, k and v have H_kv=2: H must be a multiple of H_kv"),
        (lambda q, k, v: (q, k[:, :0], v[:, :0]), ValueError,
         r"q has H=3 heads, k and v have H_kv=0: H must be a multiple of H_kv"),
        (lambda q, k, v: (q, k[:, :1], v), ValueError,
         r"k and v must have the same \(B, H_kv, L, D\) shape, got .* k.shape=\(2, 1, 10, 16\), "
         r"v.shape=\(2, 3, 10, 16\)"),
        (lambda q, k, v: (q, k[:, :1, :, :8], v[:, :1, :, :8]), ValueError,
         r"q, k, v must have the same B and D, got q.shape=\(2, 3, 10, 16\), "
         r"k.shape=\(2, 1, 10, 8\)"),
    ],
    ids=["not-tensor", "rank", "k-len", "v-heads", "dtype-mismatch", "int-dtype", "device",
         "strided-head-dim", "heads-not-divisible", "no-kv-heads", "k-v-heads-differ",
         "gqa-head-dim"],
)
def test_bad_tensors(mutate, error, pattern):
    with pytest.raises(error, match=pattern):
        fastattn.local_attention(*mutate(*qkv()), (1, 1))


@pytest.mark.parametrize(
    "window, error, pattern",
    [
        ((-1, 2), ValueError, r"window sides must be >= 0, got window=\(-1, 2\)"),
        ((3, -5), ValueError, r"got window=\(3, -5\)"),
        (4, TypeError, r"window must be a pair of ints \(left, right\), got window=4"),
        ((1, 2, 3), TypeError, r"got window=\(1, 2, 3\)"),
        ((1.5, 2), TypeError, r"got window=\(1.5, 2\)"),
        ((True, 2), TypeError, r"got window=\(True, 2\)"),
    ],
)
def test_bad_window(window, error, pattern):
    with pytest.raises(error, match=pattern):
        fastattn.local_attention(*qkv(), window)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5"])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match=r"scale must be a finite number, got scale="):
        fastattn.local_attention(*qkv(), (1, 1), scale=scale)


@pytest.mark.parametrize(
    "key_lengths, error, pattern",
    [
        (torch.tensor([1.0, 2.0]), TypeError, r"key_lengths must have an integer dtype, got key_lengths.dtype=torch.float32"),
        (torch.tensor([1, 2, 3]), ValueError, r"key_lengths must have shape \(2,\) .* got \(3,\)"),
        ([1, 2], TypeError, r"key_lengths must be an integer tensor of shape \(B,\), got list"),
    ],
)
def test_bad_key_lengths(key_lengths, error, pattern):
    with pytest.raises(error, match=pattern):
        fastattn.local_attention(*qkv(), (1, 1), key_lengths=key_lengths)


@pytest.mark.parametrize(
    "heads, pattern",
    [((3, 2), r"q has H=3 heads, k and v have H_kv=2: H must be a multiple of H_kv"),
     ((2, 4), r"q has H=2 heads, k and v have H_kv=4: H must be a multiple of H_kv")],
    ids=["not-divisible", "more-kv-heads"])
def test_the_op_itself_checks_the_kv_heads(heads, pattern):
    """Direct op calls (no Python validation) get the C++ check, not a wrong kernel read."""
    _ops.load()
    q = torch.randn(1, heads[0], 8, 16)
    k, v = torch.randn(2, 1, heads[1], 8, 16)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.fastattn.local_attention_fwd(q, k, v, 1, 1, None, 0.25)


def test_errors_come_before_any_build(monkeypatch):
    """Validation must not need the extension: a bad call fails fast even with no compiler."""
    def no_build(*args, **kwargs):
        raise AssertionError("validation should fail before the extension is loaded")

    monkeypatch.setattr(_ops, "load", no_build)
    with pytest.raises(ValueError):
        fastattn.local_attention(*qkv(), (-1, 0))


@pytest.mark.cuda
def test_unsupported_head_dim_on_cuda():
    q, k, v = (t.cuda() for t in qkv((1, 1, 8, 40)))
    with pytest.raises(ValueError, match=r"head dim D must be one of .* got D=40"):
        fastattn.local_attention(q, k, v, (1, 1))


def test_key_lengths_outside_range_are_clamped():
    q, k, v = qkv()
    clamped = fastattn.local_attention(q, k, v, (2, 2), key_lengths=torch.tensor([-3, 99]))
    expected = fastattn.local_attention(q, k, v, (2, 2), key_lengths=torch.tensor([0, 10]))
    assert torch.equal(clamped, expected)
