"""CUDA clustering and clustered attention vs the float64 references (outputs poisoned first)."""

import pytest
import torch

import fastattn
from fastattn.clustered import _draw
from fastattn.reference import cluster_reference, local_attention_reference
from tests.clustered_cases import (
    CUDA_CASES,
    case_id,
    check_against_reference,
    check_topk_ties,
    poison_cuda_cache,
    random_clustering,
)
from tests.local_cases import make_qkv

pytestmark = pytest.mark.cuda
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
def test_matches_reference(dtype, case):
    _, batch, heads, seq_len, head_dim, clusters, topk = case
    q, k, v = make_qkv(batch, heads, seq_len, head_dim, dtype, device="cuda")
    clustering = random_clustering(batch, heads, seq_len, clusters, device="cuda")
    poison_cuda_cache()
    check_against_reference(q, k, v, clustering, topk)


@pytest.mark.parametrize("topk", [None, 5, 40], ids=["clustered", "improved", "improved-all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_and_query_lengths(dtype, topk):
    batch, seq_len = 3, 33
    q, k, v = make_qkv(batch, 2, seq_len, 32, dtype, device="cuda", layout="blhd")
    query_lengths = torch.tensor([seq_len, 20, 0], device="cuda")
    clustering = random_clustering(batch, 2, seq_len, 4, device="cuda", query_lengths=query_lengths)
    key_lengths = torch.tensor([0, 9, seq_len], device="cuda")
    poison_cuda_cache()
    out = check_against_reference(q, k, v, clustering, topk, key_lengths=key_lengths)
    assert torch.all(out[0] == 0)


@pytest.mark.parametrize("topk", [None, 3], ids=["clustered", "improved"])
def test_empty_clusters(topk):
    q, k, v = make_qkv(2, 2, 30, 16, torch.float32, device="cuda")
    clustering = random_clustering(2, 2, 30, 8, device="cuda", used=3)
    poison_cuda_cache()
    check_against_reference(q, k, v, clustering, topk)


def test_topk_ties_go_to_the_lower_key():
    check_topk_ties("cuda")


def test_topk_at_least_l_is_exact_attention():
    q, k, v = make_qkv(2, 2, 41, 16, torch.float32, device="cuda")
    key_lengths = torch.tensor([41, 17], device="cuda")
    out = fastattn.improved_clustered_attention(q, k, v, 4, topk=41, key_lengths=key_lengths)
    exact = local_attention_reference(q.double(), k.double(), v.double(), (41, 41),
                                      key_lengths=key_lengths)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


def test_cluster_matches_reference_and_cpu():
    """Same generator state: the same labels as the CPU kernel (both hash without fused
    multiply-add), and as the reference where no query is within rounding of a plane."""
    checked = 0
    for clusters, bits, iterations, seq_len in [(5, 32, 10, 61), (20, 1, 4, 20), (7, 64, 10, 45),
                                                (45, 16, 2, 45), (9, 8, 5, 90)]:
        q = torch.randn(2, 3, seq_len, 16, device="cuda")
        query_lengths = torch.tensor([seq_len, seq_len // 3], device="cuda")
        generator = torch.Generator().manual_seed(11)
        planes, seed = _draw(torch.Generator().manual_seed(11), bits, 16, q.device)
        result = fastattn.cluster(q, clusters, iterations=iterations, bits=bits,
                                  generator=generator, query_lengths=query_lengths)
        on_cpu = fastattn.cluster(q.cpu(), clusters, iterations=iterations, bits=bits,
                                  generator=torch.Generator().manual_seed(11),
                                  query_lengths=query_lengths.cpu())
        assert torch.equal(result.labels.cpu(), on_cpu.labels)
        assert torch.equal(result.counts.cpu(), on_cpu.counts)
        projections = q.double() @ planes[:, :-1].double().T - planes[:, -1].double()
        if projections.abs().min() < 1e-4:
            continue  # a query within rounding of a hyperplane: float64 may hash it otherwise
        labels, counts = cluster_reference(q, planes, int(seed), clusters, iterations,
                                           query_lengths)
        assert torch.equal(result.labels.cpu(), labels)
        assert torch.equal(result.counts.cpu(), counts)
        checked += 1
    assert checked >= 3, f"only {checked} inputs were far enough from the hyperplanes"


def test_same_seed_same_labels_and_counts_agree():
    q = torch.randn(2, 4, 3000, 64, device="cuda", dtype=torch.bfloat16)
    first = fastattn.cluster(q, 100, bits=63, generator=torch.Generator("cuda").manual_seed(5))
    again = fastattn.cluster(q, 100, bits=63, generator=torch.Generator("cuda").manual_seed(5))
    assert torch.equal(first.labels, again.labels) and torch.equal(first.counts, again.counts)
    bincount = torch.zeros_like(first.counts).scatter_add_(2, first.labels, torch.ones_like(first.labels))
    assert torch.equal(first.counts, bincount)


def test_forward_is_deterministic():
    q, k, v = make_qkv(2, 4, 2000, 64, torch.bfloat16, device="cuda")
    clustering = fastattn.cluster(q, 50)
    first = fastattn.improved_clustered_attention(q, k, v, clustering=clustering)
    poison_cuda_cache()
    assert torch.equal(first, fastattn.improved_clustered_attention(q, k, v, clustering=clustering))


def test_bad_head_dim_and_device_mismatch_raise():
    q, k, v = make_qkv(1, 2, 10, 24, torch.float32, device="cuda")
    with pytest.raises(ValueError, match="head dim D must be one of"):
        fastattn.clustered_attention(q, k, v, 2)
    q, k, v = make_qkv(1, 2, 10, 16, torch.float32, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        fastattn.clustered_attention(q, k.cpu(), v, 2)


@pytest.mark.parametrize("topk", [0, 40], ids=["clustered", "improved"])
def test_opcheck(topk):
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 45, 16, torch.float32, device="cuda"))
    clustering = random_clustering(2, 2, 45, 4, device="cuda")
    key_lengths = torch.tensor([45, 12], dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.fastattn.clustered_attention_fwd.default,
                          (q, k, v, clustering.labels, 4, topk, key_lengths, 0.4))
    planes, seed = _draw(None, 16, 16, q.device)
    torch.library.opcheck(torch.ops.fastattn.cluster.default,
                          (q.detach(), planes, seed, key_lengths, 4, 3))
