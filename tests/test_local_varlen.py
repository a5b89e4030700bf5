"""fastattn.local_attention_varlen on the CPU: sequences packed end to end, (T, H, D), each
attending only its own keys (bottom-right within a sequence), against the float64 reference,
the batched op, and bad cu_seqlens / max_seqlen."""

import pytest
import torch

import fastattn
from fastattn import _ops
from fastattn.varlen import check_offsets
from tests.local_cases import check_varlen_against_reference

HEADS = 4
# (query lengths, key lengths) of the packed sequences.
SEQUENCES = {
    # empty in q and k, queries without keys, Lq == Lk, decode, Lq > Lk (negative positions)
    "mixed": ([0, 5, 37, 1, 70, 3], [0, 0, 37, 50, 20, 3]),
    # 1 to 12 tokens: most windows below reach past both ends of every sequence
    "short": ([3, 9, 12, 1], [3, 9, 12, 1]),
    # chunks of queries at the end of longer key sequences, across tile and chunk boundaries
    "uneven": ([10, 33, 64], [77, 33, 100]),
}
WINDOWS = [(16, 0), (8, 8), (0, 5), (500, 500)]


def _window_id(window):
    return f"w{window[0]}x{window[1]}"


def _cu(lengths):
    return torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)


def nan_surrounded(t, extra=3):
    """A view of t, (T, H, D), inside a NaN buffer: NaN rows before and after, a NaN head after
    the last and NaN past each head's D, so that any read outside t shows up as NaN."""
    rows, heads, dim = t.shape
    buf = torch.full((rows + 2 * extra, heads + 1, dim + extra), float("nan"), dtype=t.dtype)
    view = buf[extra:extra + rows, :heads, :dim]
    view.copy_(t.detach())
    return view


def _packed(sequences, dtype, kv_heads=HEADS // 2, head_dim=16):
    """NaN-surrounded q (Tq, H, D), k and v (Tk, H_kv, D) and their cu_seqlens."""
    q_lens, k_lens = sequences
    q = nan_surrounded(torch.randn(sum(q_lens), HEADS, head_dim, dtype=dtype))
    k, v = (nan_surrounded(torch.randn(sum(k_lens), kv_heads, head_dim, dtype=dtype))
            for _ in range(2))
    return q, k, v, _cu(q_lens), _cu(k_lens)


@pytest.mark.parametrize("window", WINDOWS, ids=_window_id)
@pytest.mark.parametrize("sequences", SEQUENCES.values(), ids=SEQUENCES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_matches_reference(dtype, sequences, window):
    q, k, v, cu_q, cu_k = _packed(sequences, dtype)
    out = check_varlen_against_reference(q, k, v, cu_q, cu_k, window)
    assert out.shape == q.shape and out.is_contiguous()


def test_non_finite_rows_of_other_sequences_never_leak():
    """Non-finite rows that no correct result depends on, in sequences beside real ones: queries
    without keys (NaN q: out 0, lse -inf, grad 0) and keys without queries (inf k, NaN v). The
    CUDA kernels' tiles run into such rows (tests/test_local_features_cuda.py has the twin)."""
    q, k, v, cu_q, cu_k = _packed(([30, 5, 0, 40, 0], [50, 0, 12, 40, 9]), torch.float32)
    with torch.no_grad():
        q[30:35] = float("nan")
        k[50:62], v[50:62] = float("inf"), float("nan")
        k[102:], v[102:] = float("nan"), float("nan")
    for window in ((8, 0), (100, 100)):
        check_varlen_against_reference(q, k, v, cu_q, cu_k, window)


@pytest.mark.parametrize("kv_heads", [HEADS, 1], ids=["group1", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gqa(dtype, kv_heads):
    q, k, v, cu_q, cu_k = _packed(SEQUENCES["mixed"], dtype, kv_heads=kv_heads)
    check_varlen_against_reference(q, k, v, cu_q, cu_k, (12, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_softcap(dtype):
    q, k, v, cu_q, cu_k = _packed(SEQUENCES["uneven"], dtype)
    check_varlen_against_reference(q, k, v, cu_q, cu_k, (20, 3), scale=1.0, softcap=1.5)


def test_max_seqlen_larger_than_needed():
    q, k, v, cu_q, cu_k = _packed(SEQUENCES["uneven"], torch.float32)
    check_varlen_against_reference(q, k, v, cu_q, cu_k, (9, 9), max_seqlen=(1000, 1000))


def _as_batch(t):
    """The (L, H, D) rows of one sequence as a batch of one, (1, H, L, D)."""
    return t.transpose(0, 1).unsqueeze(0)


def _assert_same_bits(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _run_with_grads(fn, leaves, grad_out, grad_lse):
    out, lse = fn(*leaves)
    # lse is -inf for queries that see nothing; their lse gradient must not matter.
    grad_lse = grad_lse.masked_fill(~torch.isfinite(lse), 0)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))
    return out, lse, grads


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "cap2"])
@pytest.mark.parametrize("q_len, k_len", [(77, 77), (7, 77), (90, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_sequence_equals_the_batched_op(dtype, q_len, k_len, softcap):
    """Varlen with one sequence is local_attention on (1, H, L, D): out, lse and gradients, to
    the bit (one CPU kernel walks both, on the same numbers in the same order)."""
    q, k, v, cu_q, cu_k = _packed(([q_len], [k_len]), dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad_out, grad_lse = torch.randn(q.shape, dtype=dtype), torch.randn(HEADS, q_len)
    varlen = _run_with_grads(
        lambda q, k, v: fastattn.local_attention_varlen(
            q, k, v, cu_q, cu_k, q_len, k_len, (11, 5), softcap=softcap, return_lse=True),
        leaves, grad_out, grad_lse)
    batched = _run_with_grads(
        lambda q, k, v: fastattn.local_attention(
            *(_as_batch(t) for t in (q, k, v)), (11, 5), softcap=softcap, return_lse=True),
        leaves, _as_batch(grad_out), grad_lse.unsqueeze(0))
    _assert_same_bits(varlen[0], batched[0][0].transpose(0, 1))
    _assert_same_bits(varlen[1], batched[1][0])
    for a, b in zip(varlen[2], batched[2], strict=True):
        _assert_same_bits(a, b)


def test_equal_sequences_equal_the_batched_op():
    """N sequences of one length are a batch of N (B, H, L, D): the same out, lse, gradients,
    to the bit."""
    batch, seq_len, window = 3, 45, (6, 6)
    q, k, v = (torch.randn(batch, seq_len, HEADS, 16, requires_grad=True) for _ in range(3))
    cu = _cu([seq_len] * batch)
    grad_out, grad_lse = torch.randn(batch, seq_len, HEADS, 16), torch.randn(HEADS, batch, seq_len)
    out, lse = fastattn.local_attention_varlen(
        *(t.flatten(0, 1) for t in (q, k, v)), cu, cu, seq_len, seq_len, window, return_lse=True)
    varlen_grads = torch.autograd.grad((out, lse), (q, k, v),
                                       (grad_out.flatten(0, 1), grad_lse.flatten(1)))
    b_out, b_lse = fastattn.local_attention(*(t.transpose(1, 2) for t in (q, k, v)), window,
                                            return_lse=True)
    batched_grads = torch.autograd.grad((b_out, b_lse), (q, k, v),
                                        (grad_out.transpose(1, 2), grad_lse.transpose(0, 1)))
    _assert_same_bits(out, b_out.transpose(1, 2).flatten(0, 1))
    _assert_same_bits(lse.view(HEADS, batch, seq_len), b_lse.transpose(0, 1))
    for a, b in zip(varlen_grads, batched_grads, strict=True):
        _assert_same_bits(a, b)


def _args():
    """A valid call: Tq = 10 in sequences of 4 and 6 queries, Tk = 12 in 7 and 5 keys."""
    q = torch.randn(10, HEADS, 16)
    k, v = torch.randn(2, 12, HEADS // 2, 16)
    return dict(q=q, k=k, v=v, cu_seqlens_q=_cu([4, 6]), cu_seqlens_k=_cu([7, 5]),
                max_seqlen_q=6, max_seqlen_k=7)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(cu_seqlens_q=_cu([4, 6]).long()), TypeError, r"cu_seqlens_q.*int64"),
        (dict(cu_seqlens_k=_cu([7, 5]).float()), TypeError, r"cu_seqlens_k.*float32"),
        (dict(cu_seqlens_q=[0, 4, 10]), TypeError, r"cu_seqlens_q.*list"),
        (dict(cu_seqlens_k=_cu([7, 5]).to("meta")), ValueError, r"cu_seqlens_k.*meta"),
        (dict(cu_seqlens_q=_cu([4, 6]).view(1, 3)), ValueError, r"cu_seqlens_q.*\(1, 3\)"),
        (dict(cu_seqlens_q=_i32(), cu_seqlens_k=_i32()), ValueError, r"cu_seqlens_q.*\(0,\)"),
        (dict(cu_seqlens_q=_i32(1, 4, 10)), ValueError, r"cu_seqlens_q.*1"),
        (dict(cu_seqlens_k=_i32(2, 7, 12)), ValueError, r"cu_seqlens_k.*2"),
        (dict(cu_seqlens_q=_i32(0, 6, 4, 10), cu_seqlens_k=_i32(0, 3, 7, 12)), ValueError,
         r"cu_seqlens_q"),
        (dict(cu_seqlens_k=_i32(0, 7, 5, 12), cu_seqlens_q=_i32(0, 2, 4, 10)), ValueError,
         r"cu_seqlens_k"),
        (dict(cu_seqlens_q=_i32(0, 4, 9)), ValueError, r"cu_seqlens_q.*(9.*10|10.*9)"),
        (dict(cu_seqlens_k=_i32(0, 7, 13)), ValueError, r"cu_seqlens_k.*(13.*12|12.*13)"),
        (dict(cu_seqlens_k=_i32(0, 12)), ValueError, r"cu_seqlens_q and cu_seqlens_k"),
        (dict(max_seqlen_q=5), ValueError, r"max_seqlen_q.*5"),
        (dict(max_seqlen_k=6), ValueError, r"max_seqlen_k.*6"),
        (dict(max_seqlen_q=-1), ValueError, r"max_seqlen_q.*-1"),
        (dict(max_seqlen_q=6.0), TypeError, r"max_seqlen_q.*6.0"),
        (dict(max_seqlen_k=True), TypeError, r"max_seqlen_k.*True"),
        (dict(max_seqlen_k=torch.tensor(7)), TypeError, r"max_seqlen_k"),
    ],
    ids=["cu-q-int64", "cu-k-float", "cu-q-list", "cu-k-device", "cu-q-2d", "cu-empty",
         "cu-q-start", "cu-k-start", "cu-q-decreasing", "cu-k-decreasing", "cu-q-last",
         "cu-k-last", "cu-lengths-differ", "max-q-small", "max-k-small", "max-q-negative",
         "max-q-float", "max-k-bool", "max-k-tensor"],
)
def test_bad_cu_seqlens_and_max_seqlen(change, error, pattern):
    with pytest.raises(error, match=pattern):
        fastattn.local_attention_varlen(**{**_args(), **change}, window=(2, 2))


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda a: dict(q=a["q"][None]), r"q must be 3-D .* q.shape=\(1, 10, 4, 16\)"),
        (lambda a: dict(k=a["k"][0], v=a["v"][0]), r"k must be 3-D"),
        (lambda a: dict(k=a["k"][:, :1], v=a["v"][:, :1].repeat(1, 3, 1)),
         r"k and v must have the same"),
        (lambda a: dict(k=a["k"].repeat(1, 3, 1)[:, :3], v=a["v"].repeat(1, 3, 1)[:, :3]),
         r"H=4 .* H_kv=3"),
        (lambda a: dict(k=a["k"][..., :8], v=a["v"][..., :8]), r"same D.*k.shape=\(12, 2, 8\)"),
    ],
    ids=["q-rank", "k-rank", "k-v-differ", "heads-not-divisible", "head-dim"],
)
def test_bad_tensors(change, pattern):
    args = _args()
    with pytest.raises(ValueError, match=pattern):
        fastattn.local_attention_varlen(**{**args, **change(args)}, window=(2, 2))


def _varlen_fwd_args(requires_grad=False, softcap=0.0):
    a = _args()
    q, k, v = (a[n].requires_grad_(requires_grad) for n in "qkv")
    return (q, k, v, a["cu_seqlens_q"], a["cu_seqlens_k"], 6, 7, 3, 1, 0.25, softcap)


@pytest.mark.parametrize("softcap", [0.0, 1.5], ids=["nocap", "cap1.5"])
def test_opcheck(softcap):
    _ops.load()
    fwd_args = _varlen_fwd_args(requires_grad=True, softcap=softcap)
    torch.library.opcheck(torch.ops.fastattn.local_attention_varlen_fwd.default, fwd_args)
    q, k, v, *rest = _varlen_fwd_args(softcap=softcap)
    out, lse = torch.ops.fastattn.local_attention_varlen_fwd(q, k, v, *rest)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, *rest)
    torch.library.opcheck(torch.ops.fastattn.local_attention_varlen_bwd.default, bwd_args)


def test_compile_fullgraph_without_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.compiler.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(q, k, v, cu_q, cu_k):
        out, lse = fastattn.local_attention_varlen(q, k, v, cu_q, cu_k, 6, 7, (3, 1),
                                                   softcap=2.0, return_lse=True)
        return (out * out).sum() + lse.sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for _ in range(2):  # same shapes, fresh data: one compilation only
        a = _args()
        leaves = [a[n].requires_grad_() for n in "qkv"]
        loss = compiled(*leaves, a["cu_seqlens_q"], a["cu_seqlens_k"])
        grads = torch.autograd.grad(loss, leaves)
        eager_leaves = [t.detach().clone().requires_grad_() for t in leaves]
        expected = step(*eager_leaves, a["cu_seqlens_q"], a["cu_seqlens_k"])
        torch.testing.assert_close(loss, expected)
        for actual, eager in zip(grads, torch.autograd.grad(expected, eager_leaves), strict=True):
            torch.testing.assert_close(actual, eager)
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "offsets, rows, max_seqlen, pattern",
    [([1, 4, 10], 10, 6, r"cu_seqlens_q\[0\] must be 0, got 1"),
     ([0, 7, 4, 10], 10, 7, r"must be non-decreasing, got cu_seqlens_q\[1\]=7 > cu_seqlens_q\[2\]=4"),
     ([0, 4, 9], 10, 6, r"cu_seqlens_q\[-1\] must equal the rows of its tensor \(10\), got 9"),
     ([0, 4, 10], 10, 5, r"max_seqlen_q=5 is shorter than sequence 1 of cu_seqlens_q \(6 rows\)")],
    ids=["start", "decreasing", "end", "max_seqlen"])
def test_gpu_side_offset_check_matches_the_cpu_glue(offsets, rows, max_seqlen, pattern):
    """On a GPU the offsets are read back and checked in Python (varlen.check_offsets), with the
    CPU glue's messages; the same bad offsets on the CPU raise the same error from C++."""
    with pytest.raises(ValueError, match=pattern):
        check_offsets("cu_seqlens_q", offsets, rows, "max_seqlen_q", max_seqlen)
    q = torch.randn(rows, 2, 8)
    k, v = torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cu_k = torch.tensor([0] * (len(offsets) - 1) + [12], dtype=torch.int32)
    with pytest.raises(ValueError, match=pattern):
        fastattn.local_attention_varlen(q, k, v, torch.tensor(offsets, dtype=torch.int32), cu_k,
                                        max_seqlen, 12, (2, 2))
