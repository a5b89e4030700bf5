"""CPU clustering and clustered attention vs the float64 references."""

import pytest
import torch

import fastattn
from fastattn.clustered import _draw
from fastattn.reference import cluster_reference, local_attention_reference
from tests.clustered_cases import (
    CASES,
    case_id,
    check_against_reference,
    check_topk_ties,
    random_clustering,
)
from tests.local_cases import make_qkv

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(dtype, case):
    _, batch, heads, seq_len, head_dim, clusters, topk = case
    q, k, v = make_qkv(batch, heads, seq_len, head_dim, dtype)
    check_against_reference(q, k, v, random_clustering(batch, heads, seq_len, clusters), topk)


@pytest.mark.parametrize("topk", [None, 6], ids=["clustered", "improved"])
def test_float64_custom_scale_and_strided_inputs(topk):
    q, k, v = make_qkv(2, 3, 31, 8, torch.float64, layout="blhd")
    assert not q.is_contiguous()
    check_against_reference(q, k, v, random_clustering(2, 3, 31, 4), topk, scale=0.3)


@pytest.mark.parametrize("topk", [None, 5, 40], ids=["clustered", "improved", "improved-all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_and_query_lengths(dtype, topk):
    batch, seq_len = 3, 33
    q, k, v = make_qkv(batch, 2, seq_len, 16, dtype)
    query_lengths = torch.tensor([seq_len, 20, 0])
    clustering = random_clustering(batch, 2, seq_len, 4, query_lengths=query_lengths)
    key_lengths = torch.tensor([0, 9, seq_len])
    out = check_against_reference(q, k, v, clustering, topk, key_lengths=key_lengths)
    assert torch.all(out[0] == 0), "a batch with no valid key must give zeros"


@pytest.mark.parametrize("topk", [None, 3], ids=["clustered", "improved"])
def test_empty_clusters(topk):
    q, k, v = make_qkv(2, 2, 30, 16, torch.float32)
    clustering = random_clustering(2, 2, 30, 8, used=3)
    assert torch.all(clustering.counts[..., 3:] == 0)
    check_against_reference(q, k, v, clustering, topk)


def test_topk_ties_go_to_the_lower_key():
    check_topk_ties("cpu")


def test_topk_at_least_l_is_exact_attention():
    q, k, v = make_qkv(2, 2, 41, 16, torch.float64)
    clustering = fastattn.cluster(q, 4)
    key_lengths = torch.tensor([41, 17])
    out = fastattn.improved_clustered_attention(q, k, v, clustering=clustering, topk=41,
                                                key_lengths=key_lengths)
    exact = local_attention_reference(q, k, v, (41, 41), key_lengths=key_lengths)
    torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10)


def test_one_query_per_cluster_is_exact_attention():
    q, k, v = make_qkv(1, 2, 26, 16, torch.float64)
    labels = torch.arange(26).expand(1, 2, 26)
    clustering = fastattn.Clustering(labels, torch.ones(1, 2, 26, dtype=torch.int64))
    out = fastattn.clustered_attention(q, k, v, clustering=clustering)
    torch.testing.assert_close(out, local_attention_reference(q, k, v, (26, 26)))


def test_forward_is_deterministic():
    q, k, v = make_qkv(2, 2, 200, 32, torch.bfloat16)
    clustering = fastattn.cluster(q, 9)
    first = fastattn.improved_clustered_attention(q, k, v, clustering=clustering, topk=8)
    again = fastattn.improved_clustered_attention(q, k, v, clustering=clustering, topk=8)
    assert torch.equal(first, again)


# ---- clustering ------------------------------------------------------------------------------

def _reference_clustering(q, clusters, iterations, bits, seed, query_lengths=None):
    generator = torch.Generator().manual_seed(seed)
    planes, seed_tensor = _draw(generator, bits, q.shape[-1], q.device)
    projections = q.double() @ planes[:, :-1].double().T - planes[:, -1].double()
    margin = projections.abs().min().item()
    assert margin > 1e-4, f"test input too close to a hyperplane ({margin:.2g}); change seed"
    return cluster_reference(q, planes, int(seed_tensor), clusters, iterations, query_lengths)


@pytest.mark.parametrize(
    "clusters,bits,iterations,seq_len",
    [(5, 32, 10, 61), (1, 8, 3, 20), (20, 1, 4, 20), (7, 64, 10, 45), (45, 16, 2, 45),
     (6, 63, 0, 33)],
    ids=lambda x: str(x))
def test_cluster_matches_reference(clusters, bits, iterations, seq_len):
    q = torch.randn(2, 3, seq_len, 16)
    result = fastattn.cluster(q, clusters, iterations=iterations, bits=bits,
                              generator=torch.Generator().manual_seed(11))
    labels, counts = _reference_clustering(q, clusters, iterations, bits, 11)
    assert result.labels.dtype == torch.int64 and result.counts.dtype == torch.int64
    assert torch.equal(result.labels, labels)
    assert torch.equal(result.counts, counts)


def test_cluster_query_lengths_and_counts():
    q = torch.randn(3, 2, 40, 8, dtype=torch.bfloat16)
    query_lengths = torch.tensor([40, 13, 0])
    result = fastattn.cluster(q, 6, query_lengths=query_lengths,
                              generator=torch.Generator().manual_seed(3))
    labels, counts = result
    padded = torch.arange(40) >= query_lengths.view(-1, 1, 1)
    assert torch.all(labels[padded.expand_as(labels)] == -1)
    assert torch.all((labels[~padded.expand_as(labels)] >= 0) & (labels[~padded.expand_as(labels)] < 6))
    bincount = torch.zeros_like(counts).scatter_add_(2, labels.clamp_min(0), (labels >= 0).long())
    assert torch.equal(counts, bincount)
    assert torch.equal(counts.sum(-1), query_lengths.view(-1, 1).expand(3, 2))
    ref_labels, ref_counts = _reference_clustering(q.float(), 6, 10, 32, 3, query_lengths)
    assert torch.equal(labels, ref_labels) and torch.equal(counts, ref_counts)


def test_same_seed_same_labels():
    q = torch.randn(2, 4, 300, 32)
    first = fastattn.cluster(q, 12, generator=torch.Generator().manual_seed(5))
    again = fastattn.cluster(q, 12, generator=torch.Generator().manual_seed(5))
    other = fastattn.cluster(q, 12, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first.labels, again.labels) and torch.equal(first.counts, again.counts)
    assert not torch.equal(first.labels, other.labels)
    torch.manual_seed(1)
    global_first = fastattn.cluster(q, 12)
    torch.manual_seed(1)
    assert torch.equal(global_first.labels, fastattn.cluster(q, 12).labels)


def test_clusters_argument_clusters_internally():
    q, k, v = make_qkv(2, 2, 50, 16, torch.float32)
    clustering = fastattn.cluster(q, 7, bits=20, generator=torch.Generator().manual_seed(2))
    direct = fastattn.improved_clustered_attention(
        q, k, v, 7, bits=20, topk=5, generator=torch.Generator().manual_seed(2))
    given = fastattn.improved_clustered_attention(q, k, v, clustering=clustering, topk=5)
    assert torch.equal(direct, given)


def test_similar_queries_share_a_cluster():
    centres = torch.randn(4, 32) * 3
    pick = torch.randint(0, 4, (200,))
    q = (centres[pick] + 0.01 * torch.randn(200, 32)).view(1, 1, 200, 32)
    labels = fastattn.cluster(q, 4, bits=64, iterations=10,
                              generator=torch.Generator().manual_seed(0)).labels[0, 0]
    for c in range(4):
        assert labels[pick == c].unique().numel() == 1, "one centre's queries were split"


# ---- validation and op registration ----------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(clusters=0), ValueError, r"clusters must be in \[1, 10\], got clusters=0"),
    (dict(clusters=11), ValueError, r"clusters=11"),
    (dict(clusters=2.5), TypeError, r"clusters must be an int"),
    (dict(clusters=3, bits=0), ValueError, r"bits must be in \[1, 64\], got bits=0"),
    (dict(clusters=3, bits=65), ValueError, r"bits=65"),
    (dict(clusters=3, iterations=-1), ValueError, r"iterations must be >= 0"),
    (dict(clusters=3, topk=0), ValueError, r"topk must be >= 1, got topk=0"),
    (dict(), ValueError, r"exactly one of clusters"),
    (dict(clusters=3, clustering="both"), ValueError, r"exactly one of clusters"),
    (dict(clustering=(torch.zeros(1, 2, 9, dtype=torch.long), torch.ones(1, 2, 3, dtype=torch.long))),
     ValueError,
     r"clustering.labels must have shape \(B, H, L\)=\(1, 2, 10\), got \(1, 2, 9\)"),
    (dict(clustering=(torch.zeros(1, 2, 10), torch.ones(1, 2, 3))), TypeError,
     r"clustering.labels must be an integer tensor"),
    (dict(clusters=3, key_lengths=torch.tensor([1, 2])), ValueError, r"key_lengths must have shape \(1,\)"),
])
def test_bad_inputs_raise(kwargs, error, match):
    q, k, v = make_qkv(1, 2, 10, 8, torch.float32)
    with pytest.raises(error, match=match):
        fastattn.improved_clustered_attention(q, k, v, **kwargs)


def test_mismatched_qkv_raise():
    q, k, v = make_qkv(1, 2, 10, 8, torch.float32)
    with pytest.raises(TypeError, match="same dtype|share a dtype"):
        fastattn.clustered_attention(q, k.double(), v, 2)
    with pytest.raises(ValueError, match=r"k.shape=\(1, 2, 9, 8\)"):
        fastattn.clustered_attention(q, k[:, :, :9], v, 2)
    with pytest.raises(ValueError, match=r"clusters must be in \[1, 10\]"):
        fastattn.cluster(q, 20)


@pytest.mark.parametrize("topk", [0, 4], ids=["clustered", "improved"])
def test_opcheck(topk):
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 21, 8, torch.float32))
    clustering = random_clustering(2, 2, 21, 4)
    args = (q, k, v, clustering.labels, 4, topk, torch.tensor([21, 12], dtype=torch.int32), 0.4)
    torch.library.opcheck(torch.ops.fastattn.clustered_attention_fwd.default, args)
    planes, seed = _draw(torch.Generator().manual_seed(0), 16, 8, q.device)
    torch.library.opcheck(torch.ops.fastattn.cluster.default,
                          (q.detach(), planes, seed, torch.tensor([21, 5], dtype=torch.int32), 4, 3))


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 40, 16, torch.float32))
    clustering = fastattn.cluster(q, 5)

    def attend(q, k, v, labels, counts):
        return fastattn.improved_clustered_attention(
            q, k, v, clustering=fastattn.Clustering(labels, counts), topk=6)

    compiled = torch.compile(attend, fullgraph=True)
    eager, traced = attend(q, k, v, *clustering), compiled(q, k, v, *clustering)
    assert torch.equal(eager, traced)
    grad = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(eager, (q, k, v), grad),
                    torch.autograd.grad(traced, (q, k, v), grad), strict=True):
        assert torch.equal(a, b)
