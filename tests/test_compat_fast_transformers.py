"""fastattn.compat.fast_transformers: fast-transformers 0.4.0's API and semantics.

Outputs and gradients (random upstream gradients) are held to the STYLE.md rule against a dense
float64 reference of fast-transformers' banded semantics written here from its CPU source, and,
where fast-transformers is installed, forward outputs are compared with fast-transformers itself.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn.compat import fast_transformers as ft_compat
from fastattn.compat.fast_transformers import (
    ClusteredAttention,
    FullMask,
    ImprovedClusteredAttention,
    LengthMask,
    LocalAttention,
    TriangularCausalMask,
    local_dot_product,
    local_weighted_average,
)
from fastattn.reference import clustered_attention_reference, improved_clustered_attention_reference
from tests.local_cases import FLOORS
from tests.tolerance import GRAD_FACTOR, assert_close_to_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd and even contexts, and one wider than the sequences below.
CONTEXTS = [1, 4, 5, 8, 40]


def fill(dtype):
    """fast-transformers' -1e24 for an empty slot; float16 saturates at its most negative value."""
    return max(-1e24, torch.finfo(dtype).min)


# --- dense reference of fast-transformers' local product, from local_product_cpu.cpp ----------

def slot_keys(rows, c, device):
    return torch.arange(rows, device=device).view(-1, 1) - c // 2 + torch.arange(c, device=device)


def dense_scores(q, k, bias, key_lengths, c):
    """Slot j of query l: q_l . k_s + bias[l, s] for s = l - c//2 + j in [0, min(len, S))."""
    rows, cols = q.shape[2], k.shape[2]
    keys = slot_keys(rows, c, q.device)
    limit = torch.full((q.shape[0],), cols, device=q.device) if key_lengths is None else key_lengths
    inside = (keys >= 0) & (keys < limit.clamp(max=cols).view(-1, 1, 1, 1))
    index = keys.clamp(0, cols - 1)
    dots = (q.unsqueeze(-2) * k[:, :, index]).sum(-1)  # CPU half einsum here is very slow
    if bias is not None:
        wide = torch.promote_types(q.dtype, torch.float32)
        picked = bias.to(q.device)[torch.arange(rows, device=q.device).view(-1, 1), index]
        dots = (dots.to(wide) + picked.to(wide)).clamp_min(fill(q.dtype)).to(q.dtype)
    return dots.masked_fill(~inside, fill(q.dtype))


def dense_average(a, v):
    keys = slot_keys(a.shape[2], a.shape[3], a.device)
    inside = (keys >= 0) & (keys < v.shape[2])
    return torch.einsum("nhlc,nhlcd->nhld", a * inside, v[:, :, keys.clamp(0, v.shape[2] - 1)])


def dense_local_attention(queries, keys, values, bias, key_lengths, c, scale):
    """fast-transformers' LocalAttention.forward (eval mode), (N, L, H, E) in and out."""
    q, k, v = (t.permute(0, 2, 1, 3) for t in (queries, keys, values))
    scores = dense_scores(q, k, bias, key_lengths, c)
    wide = torch.promote_types(q.dtype, torch.float32)
    weights = torch.softmax(scores.to(wide) * scale, dim=-1).to(q.dtype)
    return dense_average(weights, v).permute(0, 2, 1, 3)


# --- helpers ----------------------------------------------------------------------------------

def leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def check_grads(fn, ref, inputs, *, floor, compare=None):
    """fn(*inputs) vs ref in float64 and in the inputs' dtype: output and all gradients."""
    ours, gold, same = leaves(inputs), leaves(inputs, torch.float64), leaves(inputs)
    out, gold_out, same_out = fn(*ours), ref(*gold), ref(*same)
    grad = torch.randn_like(gold_out)
    for result in (out, gold_out, same_out):
        (result * grad.to(result.dtype)).sum().backward()
    keep = compare if compare is not None else torch.ones_like(gold_out, dtype=torch.bool)
    assert_close_to_reference(out[keep], gold_out[keep], same_out[keep], floor=floor)
    for i, (a, g, s) in enumerate(zip(ours, gold, same, strict=True)):
        assert_close_to_reference(a.grad, g.grad, s.grad, factor=GRAD_FACTOR, floor=floor,
                                  name=f"grad of input {i}")
    return out


def make_mask(kind, rows, device):
    return {
        "none": lambda: None,
        "full": lambda: FullMask(rows, device=device),
        "causal": lambda: TriangularCausalMask(rows, device=device),
        "general": lambda: FullMask(torch.rand(rows, rows, device=device) > 0.3),
    }[kind]()


def mask_bias(mask):
    return None if mask is None else mask.additive_matrix_finite


# --- primitives -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CONTEXTS, ids=lambda c: f"c{c}")
@pytest.mark.parametrize("rows, cols", [(29, 29), (23, 31), (31, 23), (150, 131)],
                         ids=lambda s: f"{s}")
def test_local_dot_product(device, dtype, c, rows, cols):
    q = torch.randn(3, 2, rows, 16, device=device, dtype=dtype)
    k = torch.randn(3, 2, cols, 16, device=device, dtype=dtype)
    bias = torch.randn(rows, cols, device=device) * 2  # moderate, so in-band sums stay exact
    lengths = torch.tensor([cols, cols // 2, 0], device=device)
    keys = slot_keys(rows, c, device)
    inside = ((keys >= 0) & (keys < lengths.view(-1, 1, 1, 1))).expand(3, 2, rows, c)

    out = check_grads(lambda q, k: local_dot_product(q, k, bias, lengths, c),
                      lambda q, k: dense_scores(q, k, bias, lengths, c),
                      [q, k], floor=FLOORS[dtype], compare=inside)
    assert out.shape == (3, 2, rows, c) and out.dtype == dtype
    assert torch.all(out[~inside] == fill(dtype)), "empty slots must hold -1e24"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CONTEXTS, ids=lambda c: f"c{c}")
@pytest.mark.parametrize("rows, cols", [(29, 29), (23, 31), (31, 23), (150, 131)],
                         ids=lambda s: f"{s}")
def test_local_weighted_average(device, dtype, c, rows, cols):
    a = torch.randn(2, 3, rows, c, device=device, dtype=dtype)
    v = torch.randn(2, 3, cols, 24, device=device, dtype=dtype)
    out = check_grads(local_weighted_average, dense_average, [a, v], floor=FLOORS[dtype])
    assert out.shape == (2, 3, rows, 24)


def test_primitives_gradcheck():
    """Exact float64 gradients (finite differences) of both primitives, long enough for blocks."""
    q, k = (torch.randn(1, 2, 70, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bias = torch.randn(70, 70, dtype=torch.float64)
    lengths = torch.tensor([60])
    torch.autograd.gradcheck(lambda q, k: local_dot_product(q, k, bias, lengths, 6), (q, k), fast_mode=True)
    a = torch.randn(1, 2, 70, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 70, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(local_weighted_average, (a, v), fast_mode=True)


def test_band_placement_matches_fast_transformers_source():
    """c = 4: query l holds keys l-2, l-1, l, l+1 in slots 0..3; c = 5: l-2 .. l+2."""
    seq = torch.arange(6, dtype=torch.float64).view(1, 1, 6, 1)
    ones = torch.ones_like(seq)
    even = local_dot_product(ones, seq, None, None, 4)[0, 0]
    assert even[3].tolist() == [1, 2, 3, 4]
    assert even[0].tolist() == [-1e24, -1e24, 0, 1]
    assert even[5].tolist() == [3, 4, 5, -1e24]
    odd = local_dot_product(ones, seq, None, torch.tensor([4]), 5)[0, 0]
    assert odd[2].tolist() == [0, 1, 2, 3, -1e24]


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda q: local_dot_product(q, q, None, None, 0), ValueError, r"local_context=0"),
        (lambda q: local_dot_product(q, q, None, None, 2.0), ValueError, r"local_context=2.0"),
        (lambda q: local_dot_product(q[0], q, None, None, 3), ValueError, r"Q.shape=\(2, 9, 4\)"),
        (lambda q: local_dot_product(q, q[..., :3], None, None, 3), ValueError,
         r"K.shape=\(1, 2, 9, 3\)"),
        (lambda q: local_dot_product(q, q.double(), None, None, 3), TypeError, r"share a dtype"),
        (lambda q: local_dot_product(q, q, torch.zeros(9, 8), None, 3), ValueError,
         r"\(L, S\) = \(9, 9\) tensor, got \(9, 8\)"),
        (lambda q: local_dot_product(q, q, None, torch.tensor([9, 9]), 3), ValueError,
         r"key_lengths must be an \(N,\) = \(1,\) integer tensor, got \(2,\)"),
        (lambda q: local_weighted_average(q, q[:, :1]), ValueError, r"V.shape=\(1, 1, 9, 4\)"),
    ],
)
def test_primitive_errors(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(torch.randn(1, 2, 9, 4))


# --- LocalAttention ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CONTEXTS, ids=lambda c: f"c{c}")
@pytest.mark.parametrize("mask_kind", ["none", "causal", "general"])
def test_local_attention(device, dtype, c, mask_kind):
    """Key lengths leave some queries with no visible key (upstream: a uniform average)."""
    n, rows, heads, dim = 3, 29, 2, 16
    qkv = [torch.randn(n, rows, heads, dim, device=device, dtype=dtype) for _ in range(3)]
    mask = make_mask(mask_kind, rows, device)
    lengths = torch.tensor([rows, 7, 0], device=device)
    module = LocalAttention(c, attention_dropout=0.3).eval()
    check_grads(lambda q, k, v: module(q, k, v, mask, None, LengthMask(lengths, max_len=rows)),
                lambda q, k, v: dense_local_attention(q, k, v, mask_bias(mask), lengths, c,
                                                      dim**-0.5),
                qkv, floor=FLOORS[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "causal"])
def test_local_attention_long_on_cuda(dtype, mask_kind):
    """Many kernel tiles: L = 1000, D = 64, c = 129, with queries that see no key."""
    n, rows, heads, dim, c = 2, 1000, 4, 64, 129
    qkv = [torch.randn(n, rows, heads, dim, device="cuda", dtype=dtype) for _ in range(3)]
    mask = make_mask(mask_kind, rows, "cuda")
    lengths = torch.tensor([rows, 611], device="cuda")
    module = LocalAttention(c).eval()
    check_grads(lambda q, k, v: module(q, k, v, mask, None, lengths),
                lambda q, k, v: dense_local_attention(q, k, v, mask_bias(mask), lengths, c,
                                                      dim**-0.5),
                qkv, floor=FLOORS[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", [(21, 30, 16, 8), (30, 21, 16, 16), (25, 25, 16, 40)],
                         ids=lambda s: "L{}-S{}-E{}-D{}".format(*s))
def test_local_attention_other_shapes(device, shapes):
    rows, cols, key_dim, value_dim = shapes
    q = torch.randn(2, rows, 3, key_dim, device=device)
    k = torch.randn(2, cols, 3, key_dim, device=device)
    v = torch.randn(2, cols, 3, value_dim, device=device)
    lengths = torch.tensor([cols, cols - 6], device=device)
    module = LocalAttention(6, softmax_temp=0.3)
    module.eval()
    check_grads(lambda q, k, v: module(q, k, v, None, None, lengths),
                lambda q, k, v: dense_local_attention(q, k, v, None, lengths, 6, 0.3),
                [q, k, v], floor=FLOORS[torch.float32])


@pytest.mark.parametrize("mask_kind, training, dropout, fused", [
    ("none", False, 0.1, True), ("full", False, 0.1, True), ("causal", False, 0.1, True),
    ("general", False, 0.1, False), ("none", True, 0.1, False), ("causal", True, 0.0, True),
])
def test_local_attention_routes(monkeypatch, mask_kind, training, dropout, fused):
    calls = []
    real = fastattn.local_attention
    monkeypatch.setattr(fastattn, "local_attention", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    module = LocalAttention(5, attention_dropout=dropout).train(training)
    q, k, v = (torch.randn(1, 12, 2, 16) for _ in range(3))
    module(q, k, v, make_mask(mask_kind, 12, "cpu"), None, None)
    assert bool(calls) == fused
    if fused:
        assert calls == [(2, 0) if mask_kind == "causal" else (2, 2)]


def test_local_attention_fused_causal_window_for_even_context(monkeypatch):
    windows = []
    real = fastattn.local_attention
    monkeypatch.setattr(fastattn, "local_attention", lambda *a, **kw: windows.append(a[3]) or real(*a, **kw))
    q = torch.randn(1, 12, 2, 16)
    LocalAttention(8).eval()(q, q, q, None, None, None)
    LocalAttention(8).eval()(q, q, q, TriangularCausalMask(12), None, None)
    assert windows == [(4, 3), (4, 0)]


def test_local_attention_dropout_on_the_banded_weights():
    """In training mode, dropout hits the (N, H, L, c) weights before the weighted average,
    as upstream; its gradients are exact (the same dropout mask in every call)."""
    module = LocalAttention(5, attention_dropout=0.4).train()
    q, k, v = (torch.randn(2, 11, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def seeded(q, k, v):
        torch.manual_seed(7)
        return module(q, k, v, None, None, None)

    torch.manual_seed(7)
    weights = torch.softmax(local_dot_product(q.transpose(1, 2), k.transpose(1, 2), None, None, 5)
                            * 4**-0.5, dim=-1)
    expected = local_weighted_average(torch.nn.functional.dropout(weights, 0.4),
                                      v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(seeded(q, k, v), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(seeded(q, k, v), module.eval()(q, k, v, None, None, None))
    module.train()
    torch.autograd.gradcheck(seeded, (q, k, v), fast_mode=True)


def test_local_attention_output_is_contiguous_nlhd():
    q = torch.randn(2, 10, 3, 16)
    out = LocalAttention(3).eval()(q, q, q, None, None, None)
    assert out.shape == (2, 10, 3, 16) and out.is_contiguous()


def test_constructor_arguments_as_upstream():
    module = LocalAttention(7, 0.5, 0.2, "dispatcher")
    assert (module.local_context, module.softmax_temp, module.dropout.p) == (7, 0.5, 0.2)
    assert module.event_dispatcher == "dispatcher"
    with pytest.raises(ValueError, match=r"local_context=0"):
        LocalAttention(0)


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"queries must be 4-D .* queries.shape=\(8, 2, 16\)"),
        (lambda q, k, v: (q, k[:, :, :1], v), ValueError, r"keys.shape=\(1, 8, 1, 16\)"),
        (lambda q, k, v: (q, k, v[:, :5]), ValueError, r"values.shape=\(1, 5, 2, 16\)"),
        (lambda q, k, v: (q, k.double(), v), TypeError, r"share a dtype"),
    ],
)
def test_local_attention_errors(mutate, error, pattern):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(error, match=pattern):
        LocalAttention(3)(*mutate(q, q, q), None, None, None)


def test_local_attention_mask_errors():
    q = torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) = \(8, 8\), got \(8, 9\)"):
        LocalAttention(3)(q, q, q, FullMask(8, 9), None, None)
    with pytest.raises(ValueError, match=r"key_lengths must hold one length per batch, shape \(2,\), got \(3,\)"):
        LocalAttention(3)(q, q, q, None, None, torch.tensor([1, 2, 3]))


# --- masks ------------------------------------------------------------------------------------

def test_masks_follow_fast_transformers_definitions():
    lengths = torch.tensor([3, 1, 2])
    mask = LengthMask(lengths, max_len=4)
    assert mask.bool_matrix.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert torch.equal(mask.lengths, lengths) and mask.shape == (3, 4) and not mask.all_ones
    assert torch.equal(mask.additive_matrix_finite, (~mask.bool_matrix).float() * -1e24)
    assert torch.equal(mask.additive_matrix, torch.log(mask.bool_matrix.float()))
    assert torch.equal(mask.float_matrix, mask.bool_matrix.float())
    assert LengthMask(torch.tensor([4, 4])).all_ones

    causal = TriangularCausalMask(5)
    assert causal.lower_triangular and not causal.all_ones
    assert torch.equal(causal.bool_matrix, torch.ones(5, 5, dtype=torch.bool).tril())
    assert FullMask(torch.ones(4, 4, dtype=torch.bool).tril()).lower_triangular

    full = FullMask(3, 5)
    assert full.all_ones and full.shape == (3, 5) and FullMask(N=4).shape == (4, 4)
    holes = FullMask(torch.tensor([[True, False, True]]))
    assert not holes.all_ones and not holes.lower_triangular
    with pytest.raises(ValueError, match="not a length mask"):
        _ = holes.lengths
    with pytest.raises(ValueError, match=r"bool, got mask.dtype=torch.float32"):
        FullMask(torch.ones(2, 2))
    with pytest.raises(ValueError, match="Either mask or N"):
        FullMask()


def test_causal_mask_is_not_expanded_by_local_attention():
    mask = TriangularCausalMask(4096)
    q = torch.randn(1, 4096, 1, 16)
    LocalAttention(4).eval()(q, q, q, mask, None, None)
    assert not hasattr(mask, "_bool_matrix"), "the L x L causal matrix should never be built"


# --- clustered attention ----------------------------------------------------------------------

needs_clustered = pytest.mark.skipif(
    not hasattr(fastattn, "clustered_attention"),
    reason="fastattn.clustered_attention is not in this checkout yet")
CLUSTERED = [(ClusteredAttention, {}, clustered_attention_reference),
             (ImprovedClusteredAttention, {"topk": 5}, improved_clustered_attention_reference)]
CLUSTERED_IDS = ["clustered", "improved"]


def clustered_inputs(device, dtype, rows=37):
    qkv = [torch.randn(3, rows, 2, 16, device=device, dtype=dtype) for _ in range(3)]
    query_lengths = torch.tensor([rows, 25, 30], device=device)
    key_lengths = torch.tensor([rows, 20, 0], device=device)
    return qkv, query_lengths, key_lengths


@needs_clustered
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls, kwargs, reference", CLUSTERED, ids=CLUSTERED_IDS)
def test_clustered_equals_fastattn_on_the_same_clustering(device, cls, kwargs, reference):
    (q, k, v), query_lengths, key_lengths = clustered_inputs(device, torch.float32)
    module = cls(6, iterations=5, bits=24, softmax_temp=0.2, **kwargs).eval()
    torch.manual_seed(3)
    out = module(q, k, v, FullMask(37, device=device), LengthMask(query_lengths, max_len=37),
                 LengthMask(key_lengths, max_len=37))
    torch.manual_seed(3)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    clustering = fastattn.cluster(qh, 6, iterations=5, bits=24, query_lengths=query_lengths)
    fn = fastattn.clustered_attention if cls is ClusteredAttention else \
        fastattn.improved_clustered_attention
    expected = fn(qh, kh, vh, clustering=clustering, query_lengths=query_lengths,
                  key_lengths=key_lengths, scale=0.2, **kwargs).transpose(1, 2)
    assert torch.equal(out, expected)


@needs_clustered
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["fused", "composite"])
@pytest.mark.parametrize("cls, kwargs, reference", CLUSTERED, ids=CLUSTERED_IDS)
def test_clustered_gradients(device, dtype, path, cls, kwargs, reference):
    """Both routes (the fused op; the composite that serves dropout) against float64. In half
    precision the improved variant keeps every key (topk >= L): a top-k picked from rounded
    scores may differ from float64's at near-ties, which says nothing about the attention."""
    (q, k, v), query_lengths, key_lengths = clustered_inputs(device, dtype)
    if kwargs and dtype != torch.float32:
        kwargs = {"topk": 40}
    module = cls(5, **kwargs).eval()
    clustering = fastattn.cluster(q.transpose(1, 2), 5, query_lengths=query_lengths)
    module.cluster = lambda *args: clustering
    if path == "composite":
        module._fused = module._composite
    labels = clustering.labels.masked_fill(
        torch.arange(37, device=device) >= query_lengths.view(-1, 1, 1), -1)

    def ref(q, k, v):
        out = reference(*(t.transpose(1, 2) for t in (q, k, v)), labels, 5,
                        key_lengths=key_lengths, **kwargs)
        return out.transpose(1, 2)

    out = check_grads(lambda q, k, v: module(q, k, v, None, query_lengths, key_lengths), ref,
                      [q, k, v], floor=FLOORS[dtype])
    assert torch.all(out[2] == 0), "a batch with no valid key gives zeros"
    assert torch.all(out[1, 25:] == 0), "queries past query_lengths give zeros"


@needs_clustered
@pytest.mark.parametrize("cls, kwargs, reference", CLUSTERED, ids=CLUSTERED_IDS)
def test_clustered_dropout_in_training(cls, kwargs, reference):
    """Dropout (training mode) takes the composite route; it is random per call, and exact
    in its gradients for a fixed dropout mask."""
    q, k, v = leaves(torch.randn(1, 9, 2, 8, dtype=torch.float64) for _ in range(3))
    module = cls(3, attention_dropout=0.5, **kwargs)
    clustering = fastattn.cluster(q.detach().transpose(1, 2), 3)
    module.cluster = lambda *args: clustering

    def seeded(q, k, v):
        torch.manual_seed(11)
        return module(q, k, v, None, None, None)

    module.train()
    dropped = seeded(q, k, v)
    assert torch.equal(dropped, seeded(q, k, v))
    assert not torch.allclose(dropped, module.eval()(q, k, v, None, None, None))
    module.train()
    torch.autograd.gradcheck(seeded, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("cls", [ClusteredAttention, ImprovedClusteredAttention], ids=CLUSTERED_IDS)
def test_clustered_rejects_what_upstream_rejects(cls):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="cannot use an arbitrary attention mask"):
        cls(2)(q, q, q, TriangularCausalMask(8), None, None)
    with pytest.raises(ValueError, match="hash_bias=False"):
        cls(2, hash_bias=False)


def test_improved_constructor_order_as_upstream():
    module = ImprovedClusteredAttention(10, 3, 16, True, 8, 0.4, 0.0, "events")
    assert (module.clusters, module.iterations, module.bits, module.topk) == (10, 3, 16, 8)
    assert (module.softmax_temp, module.dropout.p, module.event_dispatcher) == (0.4, 0.0, "events")


# --- against fast-transformers itself -----------------------------------------------------------

# Where `make fast-transformers` (tools/build_fast_transformers.py) puts its build for this torch.
FT_SITE = Path(__file__).resolve().parents[1] / ".ft" / f"torch{torch.__version__.replace('+', '_')}" / "site"


def fast_transformers_modules():
    if FT_SITE.is_dir() and str(FT_SITE) not in sys.path:
        sys.path.append(str(FT_SITE))
    pytest.importorskip("fast_transformers")
    from fast_transformers import local_product, masking
    from fast_transformers.attention import local_attention
    return local_product, masking, local_attention


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", CONTEXTS, ids=lambda c: f"c{c}")
def test_equals_fast_transformers(device, c):
    upstream, masking, attention = fast_transformers_modules()
    n, rows, heads, dim = 3, 67, 2, 32
    q, k, v = (torch.randn(n, rows, heads, dim, device=device) for _ in range(3))
    lengths = torch.tensor([rows, 40, 0], device=device)
    key_lengths = masking.LengthMask(lengths, max_len=rows)
    bias = torch.randn(rows, rows, device=device)
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))

    scores = upstream.local_dot_product(qh, kh, bias, lengths, c)
    torch.testing.assert_close(local_dot_product(qh, kh, bias, lengths, c), scores)
    weights = torch.softmax(scores * 0.3, dim=-1)
    torch.testing.assert_close(local_weighted_average(weights, vh),
                               upstream.local_weighted_average(weights, vh))
    for mask in (masking.FullMask(rows, device=device), masking.TriangularCausalMask(rows, device=device),
                 masking.FullMask(torch.rand(rows, rows, device=device) > 0.2)):
        expected = attention.LocalAttention(c).eval()(q, k, v, mask, key_lengths, key_lengths)
        ours = LocalAttention(c).eval()(q, k, v, mask, key_lengths, key_lengths)
        torch.testing.assert_close(ours, expected)


@needs_clustered
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("improved", [False, True], ids=CLUSTERED_IDS)
def test_clustered_equals_fast_transformers_on_its_clustering(device, improved):
    """Given the clusters fast-transformers drew, the outputs of valid queries agree."""
    _, masking, _ = fast_transformers_modules()
    from fast_transformers import attention

    n, rows, heads, dim, clusters = 2, 70, 2, 32, 6
    q, k, v = (torch.randn(n, rows, heads, dim, device=device) for _ in range(3))
    query_lengths = torch.tensor([rows, 50], device=device)
    key_lengths = torch.tensor([rows, 41], device=device)
    kwargs = {"topk": 8} if improved else {}
    upstream = (attention.ImprovedClusteredAttention if improved else attention.ClusteredAttention)(
        clusters, attention_dropout=0.0, **kwargs).eval()
    drawn = {}
    create = upstream._create_query_groups

    def spy(queries, lengths):
        (sorted_clusters, counts), order = create(queries, lengths)
        labels = torch.empty_like(sorted_clusters).scatter_(-1, order, sorted_clusters)
        drawn["clustering"] = fastattn.Clustering(labels.long(), counts.long())
        return (sorted_clusters, counts), order

    upstream._create_query_groups = spy
    masks = (masking.FullMask(rows, device=device), masking.LengthMask(query_lengths, max_len=rows),
             masking.LengthMask(key_lengths, max_len=rows))
    expected = upstream(q, k, v, *masks)
    ours = (ImprovedClusteredAttention if improved else ClusteredAttention)(clusters, **kwargs).eval()
    ours.cluster = lambda *args: drawn["clustering"]
    out = ours(q, k, v, *masks)
    valid = torch.arange(rows, device=device) < query_lengths.view(-1, 1)
    torch.testing.assert_close(out[valid], expected[valid])


@pytest.mark.cuda
def test_fast_transformers_cuda_key_gradient_is_wrong_and_ours_is_right():
    """Upstream's CUDA local_dot_backward reads the upstream gradient with the slot order of
    the query gradient for the keys too: right only for gradients constant along the band."""
    upstream, _, _ = fast_transformers_modules()
    q, k = (torch.randn(2, 2, 64, 32, device="cuda") for _ in range(2))
    grad = torch.randn(2, 2, 64, 8, device="cuda")
    lengths = torch.tensor([64, 64], device="cuda")
    bias = torch.zeros(64, 64, device="cuda")

    def key_grad(fn, dtype):
        kk = k.detach().to(dtype).clone().requires_grad_()
        (fn(q.to(dtype), kk, bias.to(dtype), lengths, 8) * grad.to(dtype)).sum().backward()
        return kk.grad.double()

    gold = key_grad(dense_scores, torch.float64)
    same = (key_grad(dense_scores, torch.float32) - gold).abs().max().item()
    ours = (key_grad(local_dot_product, torch.float32) - gold).abs().max().item()
    theirs = (key_grad(upstream.local_dot_product, torch.float32) - gold).abs().max().item()
    bound = GRAD_FACTOR * same + FLOORS[torch.float32]
    assert ours <= bound
    assert theirs > 100 * bound, f"fast-transformers' key gradient error {theirs:.3g} looks fixed"


def test_public_names():
    assert set(ft_compat.__all__) >= {
        "LocalAttention", "ClusteredAttention", "ImprovedClusteredAttention", "FullMask",
        "LengthMask", "TriangularCausalMask", "local_dot_product", "local_weighted_average"}
    from fastattn.compat.fast_transformers import attention, local_product, masking
    assert attention.LocalAttention is LocalAttention
    assert local_product.local_dot_product is local_dot_product
    assert masking.LengthMask is LengthMask


def test_default_softmax_temp_is_inverse_sqrt_of_key_dim():
    q = torch.randn(1, 9, 2, 16, dtype=torch.float64)
    default = LocalAttention(4).eval()(q, q, q, None, None, None)
    explicit = LocalAttention(4, softmax_temp=1 / math.sqrt(16)).eval()(q, q, q, None, None, None)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
