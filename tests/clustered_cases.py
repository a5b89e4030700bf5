"""Helpers shared by the CPU and CUDA clustered attention tests."""

from __future__ import annotations

import torch

import fastattn
from fastattn import _ops
from fastattn.reference import (
    clustered_attention_reference,
    improved_clustered_attention_reference,
    top_keys,
)
from tests.local_cases import FLOORS
from tests.tolerance import GRAD_FACTOR, assert_close_to_reference

# (name, batch, heads, L, D, clusters, topk); topk None is plain clustered attention.
CASES = [
    ("basic", 2, 3, 37, 16, 5, None),
    ("improved", 2, 3, 37, 16, 5, 4),
    ("one-cluster", 1, 2, 29, 32, 1, None),
    ("one-cluster-improved", 1, 2, 29, 32, 1, 7),
    ("c-equals-l", 1, 2, 23, 16, 23, None),
    ("c-equals-l-improved", 1, 2, 23, 16, 23, 3),
    ("one-query", 2, 1, 1, 8, 1, 1),
    ("topk-over-l", 1, 2, 19, 24, 3, 50),
    ("odd-sizes", 3, 1, 67, 40, 6, 13),
]

# CUDA head dims only; topk 70 spans several 32-key chunks of the backward kernel.
CUDA_CASES = [
    ("basic", 2, 3, 37, 16, 5, None),
    ("improved", 2, 3, 37, 64, 5, 4),
    ("one-cluster", 1, 2, 29, 32, 1, None),
    ("one-cluster-improved", 1, 2, 129, 32, 1, 7),
    ("c-equals-l", 1, 2, 23, 16, 23, None),
    ("c-equals-l-improved", 1, 2, 23, 128, 23, 3),
    ("one-query", 2, 1, 1, 16, 1, 1),
    ("topk-over-l", 1, 2, 19, 96, 3, 50),
    ("topk-chunks", 2, 2, 301, 64, 9, 70),
    ("d256", 1, 2, 67, 256, 6, 13),
    ("long", 1, 2, 1500, 64, 40, 32),
]


def case_id(case):
    name, batch, heads, seq_len, head_dim, clusters, topk = case
    kind = "clustered" if topk is None else f"improved-k{topk}"
    return f"{name}-{kind}-B{batch}H{heads}L{seq_len}D{head_dim}C{clusters}"


def random_clustering(batch, heads, seq_len, clusters, device="cpu", used=None, query_lengths=None):
    """Random labels (every cluster used if ``used`` is None, else only the first ``used``)."""
    used = clusters if used is None else used
    labels = torch.randint(0, used, (batch, heads, seq_len), device=device)
    if seq_len >= used:  # make each used cluster non-empty
        labels[..., :used] = torch.arange(used, device=device)
    if query_lengths is not None:
        padded = torch.arange(seq_len, device=device) >= query_lengths.to(device).view(-1, 1, 1)
        labels = labels.masked_fill(padded, -1)
    counts = torch.zeros(batch, heads, clusters, dtype=torch.int64, device=device)
    counts.scatter_add_(2, labels.clamp_min(0), (labels >= 0).long())
    return fastattn.Clustering(labels, counts)


def kernel_topk(q, k, v, clustering, topk, key_lengths=None, scale=None):
    """The top-k indices the kernel selects (the op's fifth output)."""
    _ops.ensure_loaded(q.device)
    lengths = None if key_lengths is None else key_lengths.to(q.device, torch.int32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.fastattn.clustered_attention_fwd(
        q, k, v, clustering.labels, clustering.counts.shape[-1], min(topk, q.shape[2]), lengths,
        scale)[4]


def check_topk_selection(q, k, clustering, topk, chosen, key_lengths=None, scale=None, tol=1e-4):
    """The kernel's top-k equal the float64 top-k up to scores within ``tol`` (near-ties)."""
    from fastattn.reference import _centroid_attention

    _, scores, _ = _centroid_attention(q.double(), k.double(), clustering.labels,
                                       clustering.counts.shape[-1], key_lengths, scale)
    scores, chosen = scores.cpu(), chosen.cpu()
    gold, gold_valid = top_keys(scores, topk)
    assert chosen.shape == gold.shape, (chosen.shape, gold.shape)
    valid = chosen >= 0
    assert torch.equal(valid.sum(-1), gold_valid.sum(-1)), "top-k sizes differ from min(topk, valid)"
    assert torch.all(chosen[..., 1:][valid[..., 1:]] > chosen[..., :-1][valid[..., 1:]]), \
        "top-k indices must be ascending"
    assert torch.all(valid[..., :-1] | ~valid[..., 1:]), "-1 padding must come last"
    picked = torch.zeros_like(scores, dtype=torch.long).scatter_add_(
        -1, chosen.long().clamp_min(0), valid.long()) > 0
    lowest_picked = scores.masked_fill(~picked, float("inf")).amin(-1)
    highest_left = scores.masked_fill(picked, float("-inf")).amax(-1)
    ok = (lowest_picked >= highest_left - tol * (1 + highest_left.abs())) | ~valid.any(-1)
    assert ok.all(), f"{int((~ok).sum())} rows picked a key below an unpicked one"


def check_against_reference(q, k, v, clustering, topk=None, *, key_lengths=None, scale=None):
    """Forward and gradients (random upstream gradients) against the float64 reference, given
    the same clustering and the same top-k keys."""
    clusters = clustering.counts.shape[-1]
    floor = FLOORS[q.dtype]
    # The caller's layout reaches the op (see local_cases.check_against_reference).
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if topk is None:
        out = fastattn.clustered_attention(*leaves, clustering=clustering,
                                           key_lengths=key_lengths, scale=scale)

        def reference(*args):
            return clustered_attention_reference(*args, clustering.labels, clusters,
                                                 key_lengths=key_lengths, scale=scale)
    else:
        out = fastattn.improved_clustered_attention(*leaves, clustering=clustering, topk=topk,
                                                    key_lengths=key_lengths, scale=scale)
        chosen = kernel_topk(q, k, v, clustering, topk, key_lengths, scale)
        check_topk_selection(q, k, clustering, topk, chosen, key_lengths, scale)

        def reference(*args):
            return improved_clustered_attention_reference(
                *args, clustering.labels, clusters, topk=topk, key_lengths=key_lengths,
                scale=scale, top_idx=chosen)

    gold_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    gold = reference(*gold_leaves)
    same_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    same = reference(*same_leaves)
    assert_close_to_reference(out, gold, same, floor=floor, name="out")
    padded = clustering.labels < 0
    assert torch.all(out[padded] == 0), "padded queries (label -1) must get 0"

    grad_out = torch.randn_like(gold)
    for result in (out, gold, same):
        (result * grad_out.to(result.dtype)).sum().backward()
    for name, actual, gold_t, same_t in zip("qkv", leaves, gold_leaves, same_leaves, strict=True):
        assert_close_to_reference(actual.grad, gold_t.grad, same_t.grad, factor=GRAD_FACTOR,
                                  floor=floor, name=f"grad_{name}")
    assert torch.all(leaves[0].grad[padded] == 0), "padded queries must get no gradient"
    return out


def poison_cuda_cache(megabytes: int = 256) -> None:
    """Fill freed blocks of the caching allocator with NaN, so that an output the kernel
    forgets to write shows up as NaN: one large block, and many small ones (the allocator
    serves tensors up to 1 MB from a separate pool)."""
    torch.empty(megabytes * 2**18, device="cuda").fill_(float("nan"))
    small = [torch.empty(2**16, device="cuda") for _ in range(256)]  # 256 KB each
    for t in small:
        t.fill_(float("nan"))


def check_topk_ties(device):
    """Keys 100.. repeat keys 0..99, so every score appears twice: of a tied pair, the top-k
    may only hold the second if it holds the first."""
    q, k, v = (torch.randn(1, 2, 200, 32, device=device) for _ in range(3))
    k[:, :, 100:] = k[:, :, :100]
    clustering = random_clustering(1, 2, 200, 6, device=device)
    chosen = kernel_topk(q, k, v, clustering, 9).long().cpu()
    check_topk_selection(q, k, clustering, 9, chosen)
    picked = torch.zeros(1, 2, 6, 200, dtype=torch.bool).scatter_(-1, chosen, True)
    assert torch.all(picked[..., :100] | ~picked[..., 100:]), "a tie went to the higher key"
