"""CUDA kernels of local attention vs the float64 reference, and the CUDA plumbing around them.

Every test allocates its outputs from a caching allocator first filled with NaN, so an output
element the kernel forgets to write fails the comparison.
"""

import pytest
import torch

import fastattn
from fastattn import _ops
from fastattn.reference import local_attention_reference
from tests.local_cases import FLOORS, check_against_reference, make_qkv
from tests.tolerance import GRAD_FACTOR, assert_close_to_reference

pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HEAD_DIMS = [16, 32, 64, 96, 128]
# (L, window): lengths that are not tile multiples; windows (0,0), one-sided, two-sided,
# and wider than L (full and causal attention).
# (1500, (333, 400)) walks more key tiles than the Hopper forward's K/V ring holds.
SHAPES = [(1, (0, 0)), (17, (5, 0)), (129, (0, 7)), (200, (0, 0)), (1000, (64, 64)),
          (300, (1000, 1000)), (257, (2000, 0)), (1500, (333, 400))]


def _id(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], tuple):
        return f"L{value[0]}-w{value[1][0]}x{value[1][1]}"
    return None


@pytest.fixture(autouse=True)
def poisoned_allocator():
    """Fills the blocks the caching allocator will hand out next with NaN."""
    torch.cuda.synchronize()
    big = torch.full((1 << 26,), float("nan"), device="cuda")  # 256 MiB, large pool
    small = [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(16)]  # small pool
    del big, small
    yield


def nan_padded(t, extra=7, misalign=False):
    """A (B, H, L, D) view of t whose storage continues with NaN past every row and head
    (and, with misalign, starts one element past a 16-byte boundary)."""
    b, h, n, d = t.shape
    offset = 1 if misalign else 0
    buf = torch.full((offset + b * h * (n + extra) * d,), float("nan"), dtype=t.dtype,
                     device=t.device)
    view = buf[offset:].view(b, h, n + extra, d)[:, :, :n]
    view.copy_(t)
    return view


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_matches_reference(dtype, head_dim, shape):
    seq_len, window = shape
    q, k, v = (nan_padded(t) for t in make_qkv(2, 3, seq_len, head_dim, dtype, device="cuda"))
    check_against_reference(q, k, v, window)


@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
def test_mma_sync_forward_where_wgmma_is_the_default(dtype, head_dim, monkeypatch):
    """Hopper builds run these head dims on wgmma; the mma.sync kernel must stay right too."""
    monkeypatch.setenv("FASTATTN_DISABLE_WGMMA", "1")
    q, k, v = (nan_padded(t) for t in make_qkv(2, 2, 333, head_dim, dtype, device="cuda"))
    check_against_reference(q, k, v, (100, 7), key_lengths=torch.tensor([333, 200], device="cuda"))


@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
def test_one_warpgroup_wgmma_forward_where_warp_specialized_is_the_default(dtype, head_dim,
                                                                          monkeypatch):
    """Hopper builds run these head dims on the warp-specialized kernel; the one-warpgroup
    wgmma kernel (FASTATTN_DISABLE_WS=1) must stay right too."""
    monkeypatch.setenv("FASTATTN_DISABLE_WS", "1")
    q, k, v = (nan_padded(t) for t in make_qkv(2, 2, 333, head_dim, dtype, device="cuda"))
    check_against_reference(q, k, v, (100, 7), key_lengths=torch.tensor([333, 200], device="cuda"))


@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
def test_mma_sync_backward_where_the_hopper_backward_is_the_default(dtype, head_dim, monkeypatch):
    """Hopper builds run these head dims' backward on wgmma; the mma.sync backward
    (FASTATTN_DISABLE_WS_BWD=1) must stay right too."""
    monkeypatch.setenv("FASTATTN_DISABLE_WS_BWD", "1")
    q, k, v = (nan_padded(t) for t in make_qkv(2, 2, 333, head_dim, dtype, device="cuda"))
    check_against_reference(q, k, v, (100, 7), key_lengths=torch.tensor([333, 200], device="cuda"))


# The Hopper backward's other schedules (kernel switches, for comparison with the default):
# each must stay right. L = 1500 with (333, 400) walks 14 query tiles a key block, more than
# the ring has stages; key_lengths 1000 puts the padding edge inside a tile, 0 leaves blocks
# with no tile at all (the writer warp must not wait for them).
HOPPER_BWD_SCHEDULES = ["FASTATTN_WS_BWD_LOCKSTEP", "FASTATTN_WS_BWD_DK_AFTER_DQ",
                        "FASTATTN_WS_BWD_NO_DQ_WRITER",
                        "FASTATTN_WS_BWD_NO_DQ_WRITER+FASTATTN_WS_BWD_LOCKSTEP",
                        "FASTATTN_WS_BWD_NO_DQ_WRITER+FASTATTN_WS_BWD_DK_AFTER_DQ",
                        # the per-phase trace build (bfloat16; it prints a few lines)
                        "FASTATTN_WS_BWD_TRACE"]


@pytest.mark.parametrize("switches", HOPPER_BWD_SCHEDULES,
                         ids=lambda s: s.replace("FASTATTN_WS_BWD_", "").lower())
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
def test_hopper_backward_schedules(dtype, head_dim, switches, monkeypatch):
    for name in switches.split("+"):
        monkeypatch.setenv(name, "1")
    q, k, v = (nan_padded(t) for t in make_qkv(3, 2, 1500, head_dim, dtype, device="cuda"))
    check_against_reference(q, k, v, (333, 400),
                            key_lengths=torch.tensor([1500, 1000, 0], device="cuda"))


# The Hopper forward's softmax: folded scale (the default where the scale is positive), and the
# exact one (negative scales, or FASTATTN_WS_FWD_EXACT=1).
HOPPER_FWD_SOFTMAX = ["default", "FASTATTN_WS_FWD_EXACT", "FASTATTN_WS_FWD_CHAINS"]


def _climbing_scores(seq_len, head_dim, dtype, step):
    """q, k, v whose scores climb along the keys by about `step` (base 2, scaled) per key tile
    of 128: the running max of every row moves at every tile, by a little or by a lot."""
    q, k, v = make_qkv(2, 2, seq_len, head_dim, torch.float32, device="cuda")
    slope = step * head_dim**0.5 / (128 * 1.4426950408889634)
    q[..., 0] = 1.0
    k[..., 0] += slope * torch.arange(seq_len, device="cuda", dtype=torch.float32)
    return tuple(t.to(dtype) for t in (q, k, v))


@pytest.mark.parametrize("switch", HOPPER_FWD_SOFTMAX,
                         ids=lambda s: s.replace("FASTATTN_WS_FWD_", "").lower())
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
def test_hopper_forward_softmax_modes(dtype, head_dim, switch, monkeypatch):
    if switch != "default":
        monkeypatch.setenv(switch, "1")
    q, k, v = (nan_padded(t) for t in make_qkv(3, 2, 1500, head_dim, dtype, device="cuda"))
    check_against_reference(q, k, v, (333, 400),
                            key_lengths=torch.tensor([1500, 1000, 0], device="cuda"))
    for step in (3.0, 20.0):
        q, k, v = (nan_padded(t) for t in _climbing_scores(1100, head_dim, dtype, step))
        check_against_reference(q, k, v, (2000, 0))
        check_against_reference(q, k, v, (300, 300), key_lengths=torch.tensor([1100, 700],
                                                                               device="cuda"))
    # A negative scale cannot fold into the max (max(c s) = c min(s)): the exact softmax runs.
    check_against_reference(q, k, v, (300, 300), scale=-0.05)


def _gradients_vs_reference(q, k, v, window, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(fastattn.local_attention(*leaves, window), leaves, grad_out)
    gold_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    gold = torch.autograd.grad(local_attention_reference(*gold_leaves, window), gold_leaves,
                               grad_out.double())
    same_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    same = torch.autograd.grad(local_attention_reference(*same_leaves, window), same_leaves,
                               grad_out)
    for name, actual, g64, g16 in zip("qkv", grads, gold, same, strict=True):
        assert_close_to_reference(actual, g64, g16, factor=GRAD_FACTOR, floor=FLOORS[q.dtype],
                                  name=f"grad_{name}")


@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
def test_backward_of_a_grad_out_broadcast_over_the_batch(head_dim):
    """A grad_out with batch stride 0 (autograd hands such expanded tensors) is read in place;
    TMA cannot describe a zero stride, so the Hopper build takes the mma.sync backward."""
    q, k, v = make_qkv(2, 2, 300, head_dim, torch.bfloat16, device="cuda")
    grad_out = torch.randn(1, 2, 300, head_dim, device="cuda", dtype=torch.bfloat16)
    grad_out = grad_out.expand(2, -1, -1, -1)
    assert grad_out.stride(0) == 0
    _gradients_vs_reference(q, k, v, (50, 20), grad_out)


def test_float32_gradients_match_finite_differences():
    """The float32 backward against central differences of the float64 forward along random
    directions: a check that does not trust the reference's own autograd."""
    window = (5, 3)
    q, k, v = make_qkv(1, 2, 37, 16, torch.float32, device="cuda")
    grad_out = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(fastattn.local_attention(*leaves, window), leaves, grad_out)
    inputs = [t.double() for t in (q, k, v)]

    def loss(*qkv):
        return (local_attention_reference(*qkv, window) * grad_out.double()).sum().item()

    gen = torch.Generator(device="cuda").manual_seed(1)
    step = 1e-6
    for which in range(3):
        for _ in range(3):
            u = torch.randn(q.shape, generator=gen, device="cuda", dtype=torch.float64)
            plus = [x + step * u if j == which else x for j, x in enumerate(inputs)]
            minus = [x - step * u if j == which else x for j, x in enumerate(inputs)]
            numeric = (loss(*plus) - loss(*minus)) / (2 * step)
            analytic = (grads[which].double() * u).sum().item()
            assert abs(numeric - analytic) <= 1e-4 * (1 + abs(numeric)), ("qkv"[which], numeric,
                                                                          analytic)


def _nan_past(t, key_lengths):
    """t with every key position at or past key_lengths[b] replaced by NaN (differentiably)."""
    positions = torch.arange(t.shape[2], device=t.device)
    padded = positions[None, None, :, None] >= key_lengths[:, None, None, None]
    return torch.where(padded, torch.full_like(t, float("nan")), t)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_key_padding_is_never_read(dtype, head_dim, kv_heads):
    """Keys and values past key_lengths hold NaN: nothing of them may reach out, lse or a
    gradient (on Hopper the forward's producer warp copies the V tile holding that boundary, the
    backward copies K and V with zeros past it), also where query heads share a kv head."""
    seq_len, window = 700, (300, 150)
    key_lengths = torch.tensor([700, 455, 0], device="cuda")
    q, k, v = make_qkv(3, 2, seq_len, head_dim, dtype, device="cuda", kv_heads=kv_heads)

    def fn(q, k, v, window, **kwargs):
        return fastattn.local_attention(q, _nan_past(k, key_lengths), _nan_past(v, key_lengths),
                                        window, **kwargs)

    check_against_reference(q, k, v, window, key_lengths=key_lengths, fn=fn)


# How the Hopper forward loads Q: by the K / V thread before each tile's K / V into one buffer
# (the default), or by its own producer warp, two buffers at D = 64 (FASTATTN_WS_FWD_Q_WARP=1).
HOPPER_FWD_Q_LOADING = ["default", "FASTATTN_WS_FWD_Q_WARP"]


@pytest.mark.parametrize("switch", HOPPER_FWD_Q_LOADING,
                         ids=lambda s: s.replace("FASTATTN_WS_FWD_", "").lower())
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
def test_more_query_tiles_than_the_gpu_has_blocks(head_dim, switch, monkeypatch):
    """The Hopper forward is persistent (a block per SM walks several query tiles, its K/V ring,
    Q buffers and barriers carried over): more work items than SMs, some with no key at all."""
    if switch != "default":
        monkeypatch.setenv(switch, "1")
    _ops.load()
    seq_len = 2200
    heads = -(-2 * torch.cuda.get_device_properties(0).multi_processor_count // (seq_len // 128))
    q, k, v = make_qkv(2, heads, seq_len, head_dim, torch.bfloat16, device="cuda")
    key_lengths = torch.tensor([seq_len, 0], device="cuda")
    out = check_against_reference(q, k, v, (300, 200), key_lengths=key_lengths)
    assert torch.all(out[1] == 0)


# GQA / MQA: H = 16 query heads in groups of 1, 2, 8 and 16 (MQA) over H / group kv heads.
GQA_HEADS = 16
GQA_GROUPS = [1, 2, 8, GQA_HEADS]
# Lengths that are not tile multiples, causal / two-sided / wider-than-L windows, and
# (1500, (333, 400)), more key (query) tiles than the Hopper rings hold.
GQA_SHAPES = [(129, (17, 0)), (333, (100, 7)), (300, (1000, 1000)), (1500, (333, 400))]
# The kernels a GQA call can take besides the default (on Hopper, for 16-bit D in {64, 128},
# the warp-specialized forward and backward): the one-warpgroup wgmma forward, the mma.sync
# forward and backward, and the mma.sync backward alone. float32 always takes mma.sync.
GQA_KERNEL_SWITCHES = ["FASTATTN_DISABLE_WS", "FASTATTN_DISABLE_WGMMA", "FASTATTN_DISABLE_WS_BWD"]


def _gqa_id(group):
    return "mqa" if group == GQA_HEADS else f"group{group}"


def _nan_padded_call(q, k, v, window, **kwargs):
    """fastattn.local_attention on NaN-padded copies of q, k, v made inside the call (the
    comparison's own clones of nan_padded views would be contiguous again), differentiably."""
    return fastattn.local_attention(*(nan_padded(t) for t in (q, k, v)), window, **kwargs)


def _check_gqa(dtype, head_dim, group, shape):
    seq_len, window = shape
    q, k, v = make_qkv(3, GQA_HEADS, seq_len, head_dim, dtype, device="cuda",
                       kv_heads=GQA_HEADS // group)
    # All keys valid, none (zeros, lse -inf), and the boundary inside a tile.
    key_lengths = torch.tensor([seq_len, 0, 2 * seq_len // 3], device="cuda")
    out = check_against_reference(q, k, v, window, key_lengths=key_lengths, fn=_nan_padded_call)
    assert torch.all(out[1] == 0), "a batch with no valid key must give zeros"


@pytest.mark.parametrize("shape", GQA_SHAPES, ids=_id)
@pytest.mark.parametrize("group", GQA_GROUPS, ids=_gqa_id)
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_gqa_matches_reference(dtype, head_dim, group, shape):
    _check_gqa(dtype, head_dim, group, shape)


@pytest.mark.parametrize("switch", GQA_KERNEL_SWITCHES,
                         ids=lambda s: s.removeprefix("FASTATTN_").lower())
@pytest.mark.parametrize("group", GQA_GROUPS, ids=_gqa_id)
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
def test_gqa_on_the_other_kernels(dtype, head_dim, group, switch, monkeypatch):
    monkeypatch.setenv(switch, "1")
    _check_gqa(dtype, head_dim, group, (333, (100, 7)))


@pytest.mark.parametrize("group", [2, GQA_HEADS], ids=_gqa_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_gqa_forward_equals_attention_over_repeated_kv(dtype, group):
    """Reading kv head h // group is exactly attention over k and v repeated per query head:
    the same kernel on the same numbers (the Hopper forward's k / v maps have H_kv heads, the
    repeat's H), so the same bits."""
    q, k, v = make_qkv(2, GQA_HEADS, 700, 128, dtype, device="cuda", kv_heads=GQA_HEADS // group)
    out, lse = fastattn.local_attention(q, k, v, (200, 30), return_lse=True)
    k_rep, v_rep = (t.repeat_interleave(group, dim=1) for t in (k, v))
    out_rep, lse_rep = fastattn.local_attention(q, k_rep, v_rep, (200, 30), return_lse=True)
    assert torch.equal(out, out_rep) and torch.equal(lse, lse_rep)


@pytest.mark.parametrize("kv_heads", [8, 1], ids=["gqa", "mqa"])
def test_gqa_forward_allocates_no_copy_of_k_and_v(kv_heads):
    """k and v are read in place by every query head of their group: the forward allocates out
    and lse only, never a (B, H, L, D) repeat of k or v (which would be 2 x out here)."""
    _ops.load()
    q, k, v = make_qkv(1, 32, 4096, 128, torch.bfloat16, device="cuda", kv_heads=kv_heads)
    fastattn.local_attention(q, k, v, (256, 0))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, lse = fastattn.local_attention(q, k, v, (256, 0), return_lse=True)
    torch.cuda.synchronize()
    allocated = torch.cuda.max_memory_allocated() - before
    outputs = out.numel() * out.element_size() + lse.numel() * lse.element_size()
    assert allocated <= outputs + (1 << 20), (allocated, outputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(70, (9, 30)), (600, (100, 0))], ids=_id)
def test_head_dim_256_forward(dtype, shape):
    seq_len, window = shape
    q, k, v = make_qkv(2, 2, seq_len, 256, dtype, device="cuda")
    out, lse = fastattn.local_attention(q, k, v, window, return_lse=True)
    gold, gold_lse = local_attention_reference(q.double(), k.double(), v.double(), window,
                                               return_lse=True)
    same, same_lse = local_attention_reference(q, k, v, window, return_lse=True)
    assert_close_to_reference(out, gold, same, floor=FLOORS[dtype], name="out")
    assert_close_to_reference(lse, gold_lse, same_lse.float(), floor=1e-5, name="lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("head_dim", [32, 128], ids=lambda d: f"D{d}")
def test_key_lengths_zero_partial_and_full(dtype, head_dim):
    seq_len = 333
    q, k, v = make_qkv(3, 2, seq_len, head_dim, dtype, device="cuda")
    key_lengths = torch.tensor([0, 150, seq_len], device="cuda")
    out = check_against_reference(q, k, v, (70, 20), key_lengths=key_lengths)
    assert torch.all(out[0] == 0), "a batch with no valid key must give zeros"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_id)
def test_strided_blhd_inputs(dtype):
    q, k, v = make_qkv(2, 4, 150, 64, dtype, device="cuda", layout="blhd")
    assert not q.is_contiguous()
    check_against_reference(q, k, v, (33, 12))


@pytest.mark.parametrize("head_dim", [32, 64], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_id)
def test_rows_not_16_byte_aligned(dtype, head_dim):
    q, k, v = (nan_padded(t, extra=3, misalign=True)
               for t in make_qkv(2, 2, 97, head_dim, dtype, device="cuda"))
    assert q.data_ptr() % 16 != 0
    check_against_reference(q, k, v, (10, 10))


def test_custom_scale():
    q, k, v = make_qkv(1, 2, 190, 64, torch.bfloat16, device="cuda")
    check_against_reference(q, k, v, (40, 3), scale=-0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_forward_is_bitwise_deterministic(dtype):
    q, k, v = make_qkv(2, 4, 3000, 64, dtype, device="cuda")
    out1, lse1 = fastattn.local_attention(q, k, v, (300, 200), return_lse=True)
    out2, lse2 = fastattn.local_attention(q, k, v, (300, 200), return_lse=True)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


def test_opcheck_strided_bf16():
    _ops.load()
    q, k, v = make_qkv(2, 3, 77, 64, torch.bfloat16, device="cuda", layout="blhd")
    key_lengths = torch.tensor([77, 40], dtype=torch.int32, device="cuda")
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 9, 4, key_lengths, 0.125)
    torch.library.opcheck(torch.ops.fastattn.local_attention_fwd.default, args)


def test_compile_fullgraph_matches_eager():
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 300, 64, torch.bfloat16, device="cuda"))
    grad = torch.randn_like(q)

    def step(q, k, v):
        return fastattn.local_attention(q, k, v, (31, 7)) * 2.0

    torch.compiler.reset()
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(q, k, v)
    (dq, dk, dv) = torch.autograd.grad(out, (q, k, v), grad)
    eager = step(q, k, v)
    (eq, ek, ev) = torch.autograd.grad(eager, (q, k, v), grad)
    assert torch.equal(out, eager)
    for name, a, b in (("dq", dq, eq), ("dk", dk, ek), ("dv", dv, ev)):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=name)


def test_cuda_graph_capture_and_replay():
    _ops.load()
    window, scale = (20, 5), 0.125
    q, k, v = make_qkv(2, 2, 250, 64, torch.bfloat16, device="cuda")
    grad = torch.randn_like(q)
    grad_lse = torch.randn(q.shape[:-1], device="cuda")

    def run():
        out, lse = torch.ops.fastattn.local_attention_fwd(q, k, v, *window, None, scale)
        grads = torch.ops.fastattn.local_attention_bwd(grad, grad_lse, q, k, v, out, lse, *window,
                                                       None, scale)
        return (out, lse, *grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for t in (q, k, v, grad):
        t.copy_(torch.randn_like(t))
    graph.replay()
    expected = run()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])
    for a, b in zip(captured[2:], expected[2:], strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_runs_on_the_current_stream():
    q, k, v = make_qkv(2, 4, 2000, 64, torch.bfloat16, device="cuda")
    expected = fastattn.local_attention(q, k, v, (100, 100))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)  # the kernel must queue behind this, not race it
        out = fastattn.local_attention(q, k, v, (100, 100))
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    q, k, v = make_qkv(1, 2, 100, 32, torch.bfloat16, device="cuda:1")
    check_against_reference(q, k, v, (7, 7))


@pytest.mark.slow
def test_more_than_2_to_the_31_elements():
    """64-bit offsets: the last rows of the last head of a (1, 2, 2**24 + 77, 64) problem."""
    _ops.load()
    heads, seq_len, head_dim, window = 2, (1 << 24) + 77, 64, (8, 8)
    assert heads * seq_len * head_dim > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand():
        return torch.randn(1, heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=gen)

    q, k, v = rand(), rand(), rand()
    out, lse = torch.ops.fastattn.local_attention_fwd(q, k, v, *window, None, head_dim**-0.5)
    grad = rand()
    grad_lse = torch.zeros_like(lse)
    dq, dk, dv = torch.ops.fastattn.local_attention_bwd(grad, grad_lse, q, k, v, out, lse, *window,
                                                        None, head_dim**-0.5)
    start, skip = seq_len - 400, window[0] + window[1]
    tail = [t[:, -1:, start:].detach() for t in (q, k, v)]
    leaves64 = [t.double().requires_grad_() for t in tail]
    leaves = [t.clone().requires_grad_() for t in tail]
    gold = local_attention_reference(*leaves64, window)
    same = local_attention_reference(*leaves, window)
    g = grad[:, -1:, start:]
    gold.backward(g.double())
    same.backward(g)
    rows = slice(skip, None)  # rows whose whole band lies inside the tail
    assert_close_to_reference(out[:, -1:, start:][:, :, rows], gold[:, :, rows], same[:, :, rows],
                              floor=FLOORS[torch.bfloat16], name="out")
    for name, actual, g64, g16 in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves64, leaves, strict=True):
        assert_close_to_reference(actual[:, -1:, start:][:, :, rows], g64.grad[:, :, rows],
                                  g16.grad[:, :, rows], factor=GRAD_FACTOR,
                                  floor=FLOORS[torch.bfloat16], name=name)
