"""CUDA kernels for a KV cache (Lq != Lk), packed sequences and soft-capping (issue 14) against
the float64 reference: outputs, lse and gradients with random upstream gradients, on
NaN-padded inputs; and the gate that keeps them off until they have passed on a GPU.

These calls run in the general variants (kSeq) of the Hopper forward (local_fwd_ws.cuh) and of
the mma.sync forward and backward (local_fwd.cuh, local_bwd.cuh) and, for decode, in
local_decode.cuh, all compiled without a GPU: until this file has passed on one, the CUDA glue
runs them only where FASTATTN_UNVERIFIED_CUDA_FEATURES=1 is set, as the ``unverified`` fixture
does.
"""

import pytest
import torch

import fastattn
from tests.local_cases import check_against_reference, check_varlen_against_reference, make_qkv
from tests.test_local_cuda import _nan_past, nan_padded, poisoned_allocator  # noqa: F401 (autouse)

pytestmark = pytest.mark.cuda

SWITCH = "FASTATTN_UNVERIFIED_CUDA_FEATURES"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def unverified(monkeypatch):
    monkeypatch.setenv(SWITCH, "1")


# The forward of these calls: on Hopper (16-bit, D 64 / 128, aligned rows) the warp-specialized
# kernel walking a SeqFwdBlock, else (and with FASTATTN_DISABLE_WS_SEQ=1) the mma.sync one.
FORWARD_KERNELS = ["hopper", "mma_sync"]


@pytest.fixture(params=FORWARD_KERNELS)
def forward_kernel(request, monkeypatch):
    if request.param == "mma_sync":
        monkeypatch.setenv("FASTATTN_DISABLE_WS_SEQ", "1")
    return request.param


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def _padded_call(q, k, v, window, **kwargs):
    """fastattn.local_attention on NaN-padded copies of q, k, v (made inside the call, so the
    comparison's own copies stay plain), differentiably."""
    return fastattn.local_attention(*(nan_padded(t) for t in (q, k, v)), window, **kwargs)


# (Lq, window) for a cache of Lk = 300 keys (not a tile multiple): decode, a short chunk (both
# in the decode kernel: 2 and 14 packed rows), half the cache and more queries than keys (the
# general kernel; the first queries at negative positions); a causal window, a two-sided one,
# one wider than the cache, and a decode band split over several blocks.
KV_CACHE_CASES = [(1, (64, 0)), (7, (16, 16)), (150, (64, 0)), (333, (1000, 1000)),
                  (1, (1000, 0))]


@pytest.mark.parametrize("case", KV_CACHE_CASES, ids=lambda c: f"Lq{c[0]}-w{c[1][0]}x{c[1][1]}")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_kv_cache(dtype, head_dim, case, unverified, forward_kernel):
    q_len, window = case
    q, k, v = make_qkv(3, 4, q_len, head_dim, dtype, device="cuda", kv_heads=2, kv_len=300)
    # Full, empty, and filled to inside a tile.
    for key_lengths in (None, torch.tensor([300, 0, 171], device="cuda")):
        check_against_reference(q, k, v, window, key_lengths=key_lengths, fn=_padded_call)


@pytest.mark.parametrize("group", [1, 4, 16], ids=lambda g: f"group{g}")
@pytest.mark.parametrize("decode_kernel", [True, False], ids=["decode", "general"])
def test_decode_group_sizes_on_both_kernels(group, decode_kernel, unverified, monkeypatch):
    # 16 query heads: groups of 1, 4 and 16 (MQA) give 1, 4 and 16 packed rows a kv head at
    # Lq = 1, and 4 query rows give up to 64 (the decode kernel's limit).
    if not decode_kernel:
        monkeypatch.setenv("FASTATTN_DISABLE_DECODE", "1")
    for q_len in (1, 4):
        q, k, v = make_qkv(2, 16, q_len, 128, torch.bfloat16, device="cuda",
                           kv_heads=16 // group, kv_len=777)
        check_against_reference(q, k, v, (500, 0), key_lengths=torch.tensor([777, 300],
                                                                               device="cuda"),
                                fn=_padded_call)


def test_decode_of_one_sequence_splits_its_band(unverified):
    # One (batch, kv head): the band of 4097 keys is split over many blocks and merged.
    q, k, v = make_qkv(1, 8, 1, 128, torch.bfloat16, device="cuda", kv_heads=1, kv_len=5000)
    check_against_reference(q, k, v, (4096, 0), fn=_padded_call)


@pytest.mark.parametrize("decode_kernel", [True, False], ids=["decode", "general"])
def test_kv_cache_past_key_lengths_and_misaligned_rows(decode_kernel, unverified, monkeypatch):
    """Keys and values of the cache past key_lengths hold NaN and must never reach out, lse or
    a gradient; rows one element off 16 bytes take the element-by-element loads."""
    if not decode_kernel:
        monkeypatch.setenv("FASTATTN_DISABLE_DECODE", "1")
    key_lengths = torch.tensor([700, 455, 0], device="cuda")
    q, k, v = make_qkv(3, 4, 3, 64, torch.float16, device="cuda", kv_heads=2, kv_len=700)

    def fn(q, k, v, window, **kwargs):
        k, v = (nan_padded(_nan_past(t, key_lengths), extra=3, misalign=True) for t in (k, v))
        return fastattn.local_attention(nan_padded(q, extra=3, misalign=True), k, v, window,
                                        **kwargs)

    check_against_reference(q, k, v, (300, 0), key_lengths=key_lengths, fn=fn)


@pytest.mark.parametrize("head_dim", [16, 32, 96])
def test_kv_cache_other_head_dims(head_dim, unverified):
    q, k, v = make_qkv(2, 2, 5, head_dim, torch.bfloat16, device="cuda", kv_len=129)
    check_against_reference(q, k, v, (40, 0), fn=_padded_call)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_softcap(dtype, head_dim, unverified, forward_kernel):
    q, k, v = make_qkv(2, 4, 333, head_dim, dtype, device="cuda", kv_heads=2)
    q = (q.float() * 4).to(dtype)  # scores of a few units: a cap of 5 bends them
    key_lengths = torch.tensor([333, 100], device="cuda")
    for window in ((64, 0), (1000, 1000)):
        check_against_reference(q, k, v, window, key_lengths=key_lengths, softcap=5.0,
                                fn=_padded_call)
    # With a KV cache, on the decode kernel and on the general one.
    q, k, v = make_qkv(2, 4, 3, head_dim, dtype, device="cuda", kv_heads=2, kv_len=200)
    check_against_reference((q.float() * 4).to(dtype), k, v, (100, 0), softcap=5.0,
                            fn=_padded_call)


def _packed(lengths, heads, head_dim, dtype):
    """(T, heads, D) rows of sequences of ``lengths`` inside NaN: reading outside a sequence's
    rows, or past the tensor, shows up as NaN."""
    total = sum(lengths)
    buf = torch.full((total + 5, heads, head_dim), float("nan"), dtype=dtype, device="cuda")
    t = buf[2:2 + total]
    t.copy_(torch.randn(total, heads, head_dim, dtype=dtype, device="cuda"))
    return t


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device="cuda")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_varlen(dtype, head_dim, unverified, forward_kernel):
    # Empty sequences (both sides, then queries without keys), decode-like, self-attention
    # longer than a tile, keys longer than queries (bottom-right).
    q_lens, k_lens = [0, 3, 1, 200, 77, 130], [0, 0, 50, 200, 300, 130]
    q = _packed(q_lens, 4, head_dim, dtype)
    k, v = (_packed(k_lens, 2, head_dim, dtype) for _ in range(2))
    for window, softcap in (((32, 0), None), ((20, 20), 8.0), ((1000, 1000), None)):
        # max_seqlen above the longest sequence is allowed: its surplus tiles do nothing.
        check_varlen_against_reference(q, k, v, _cu(q_lens), _cu(k_lens), window,
                                       softcap=softcap, max_seqlen=(256, 300))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_neighbours_never_leak(head_dim, unverified, forward_kernel):
    """Sequences whose correct results do not depend on their non-finite rows sit between real
    ones: queries without keys (NaN q: out 0, lse -inf, grad 0) and keys without queries (NaN k
    and v: no effect, grads 0). A real sequence's tiles run into their rows (TMA loads what
    lies past a sequence), and nothing of them may reach its out, lse or gradients."""
    q_lens, k_lens = [70, 5, 0, 130, 0], [200, 0, 30, 130, 40]
    q = _packed(q_lens, 4, head_dim, torch.bfloat16)
    k, v = (_packed(k_lens, 2, head_dim, torch.bfloat16) for _ in range(2))
    cu_q, cu_k = _cu(q_lens), _cu(k_lens)
    with torch.no_grad():
        q[70:75] = float("nan")        # the second sequence's queries (it has no keys)
        k[200:230] = float("inf")      # the third sequence's keys and values (it has no queries)
        v[200:230] = float("nan")
        k[360:400] = float("nan")      # the last sequence's keys and values, past the real ones
        v[360:400] = float("nan")
    check_varlen_against_reference(q, k, v, cu_q, cu_k, (64, 0))
    check_varlen_against_reference(q, k, v, cu_q, cu_k, (1000, 1000))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kv_cache_nan_past_key_lengths_aligned(head_dim, unverified, forward_kernel):
    """As test_kv_cache_past_key_lengths_and_misaligned_rows on aligned rows, so that the Hopper
    kernels (their V tile holding the last key is copied with zeros past it) see the NaN."""
    key_lengths = torch.tensor([700, 455, 0], device="cuda")
    q, k, v = make_qkv(3, 4, 150, head_dim, torch.bfloat16, device="cuda", kv_heads=2,
                       kv_len=700)

    def fn(q, k, v, window, **kwargs):
        return fastattn.local_attention(q, _nan_past(k, key_lengths), _nan_past(v, key_lengths),
                                        window, **kwargs)

    check_against_reference(q, k, v, (300, 0), key_lengths=key_lengths, fn=fn)


def test_features_are_gated_until_verified(monkeypatch):
    monkeypatch.delenv(SWITCH, raising=False)
    q, k, v = make_qkv(1, 2, 10, 64, torch.bfloat16, device="cuda")
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    calls = [
        lambda: fastattn.local_attention(q[:, :, :3], k, v, (4, 0)),
        lambda: fastattn.local_attention(q, k, v, (4, 0), softcap=3.0),
        lambda: fastattn.local_attention_varlen(*packed, _cu([10]), _cu([10]), 10, 10, (4, 0)),
    ]
    for call in calls:
        with pytest.raises(NotImplementedError, match=SWITCH):
            call()


def test_bad_offsets_raise_on_the_gpu(unverified):
    q, k, v = (torch.randn(10, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    good = _cu([4, 6])
    for bad, pattern in ((_cu([4, 5]), r"cu_seqlens_q\[-1\] must equal"),
                         (torch.tensor([0, 7, 4, 10], dtype=torch.int32, device="cuda"),
                          "non-decreasing")):
        cu_k = good if bad.shape == good.shape else _cu([4, 0, 6])
        with pytest.raises(ValueError, match=pattern):
            fastattn.local_attention_varlen(q, k, v, bad, cu_k, 10, 10, (2, 0))
    with pytest.raises(ValueError, match="max_seqlen_q=5 is shorter"):
        fastattn.local_attention_varlen(q, k, v, good, good, 5, 10, (2, 0))


@pytest.mark.parametrize("softcap", [0.0, 1.5], ids=["nocap", "cap1.5"])
def test_varlen_ops_pass_opcheck(softcap, unverified):
    """The fake kernels' shapes and strides match the CUDA ones (grad_q in q's layout), and the
    autograd registration holds, for the packed ops on the GPU."""
    q_lens, k_lens = [3, 0, 40], [7, 5, 40]
    q = _packed(q_lens, 4, 64, torch.bfloat16).clone()
    k, v = (_packed(k_lens, 2, 64, torch.bfloat16).clone() for _ in range(2))
    rest = (_cu(q_lens), _cu(k_lens), 40, 40, 3, 1, 0.125, softcap)
    fwd = torch.ops.fastattn.local_attention_varlen_fwd
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(fwd.default, (*leaves, *rest))
    out, lse = fwd(q, k, v, *rest)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, *rest)
    torch.library.opcheck(torch.ops.fastattn.local_attention_varlen_bwd.default, bwd_args)
