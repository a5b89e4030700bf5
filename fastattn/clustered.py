"""Public clustered attention: ``fastattn.cluster``, ``fastattn.clustered_attention`` and
``fastattn.improved_clustered_attention`` (fast-transformers' algorithms; see docs/clustered.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastattn import _ops
from fastattn._validate import check_int, check_lengths, check_qkv, check_scale


class Clustering(NamedTuple):
    """Cluster of every query: ``labels`` (B, H, L) int64 in [0, C), -1 for padded queries
    (i >= query_lengths[b]), which belong to no cluster; ``counts`` (B, H, C) int64."""

    labels: torch.Tensor
    counts: torch.Tensor


def _draw(generator, bits: int, head_dim: int, device: torch.device):
    """The random hyperplanes (bits, D + 1: normal, then bias) and the re-seeding seed."""
    source = device if generator is None else generator.device
    planes = torch.randn(bits, head_dim + 1, generator=generator, device=source)
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=source)
    return planes.to(device), seed.to(device)


def cluster(q, clusters, *, iterations=10, bits=32, generator=None, query_lengths=None):
    """Clusters the queries of each (batch, head) into ``clusters`` groups.

    Each query is hashed by ``bits`` random hyperplanes with bias (bit t is set iff
    ``q . normal_t > bias_t``), then ``iterations`` Lloyd steps of k-means in Hamming space
    run from the first C hashes as centroids: a centroid's bit is the majority bit of its
    members (ties give 0), and an empty cluster restarts at the hash of a valid query drawn
    from ``generator``. A last assignment gives the labels. Queries at or past
    ``query_lengths[b]`` get label -1 and count in no cluster. The same generator state
    gives the same clustering on the same device. Not differentiable.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be a 4-D (B, H, L, D) tensor, got q.shape={shape}")
    check_qkv(q, q, q)
    batch, _, seq_len, head_dim = q.shape
    check_int(clusters, "clusters", 1, max(seq_len, 1))
    check_int(iterations, "iterations", 0)
    check_int(bits, "bits", 1, 64)
    query_lengths = check_lengths(query_lengths, "query_lengths", batch, q.device)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    _ops.ensure_loaded(q.device)  # before _draw allocates on a device it may have no kernel for
    planes, seed = _draw(generator, bits, head_dim, q.device)
    labels, counts = torch.ops.fastattn.cluster(
        q.detach(), planes, seed, query_lengths, clusters, iterations)
    return Clustering(labels, counts)


def _labels_of(q, clusters, clustering, iterations, bits, generator, query_lengths):
    """Labels (B, H, L) int64 and the number of clusters, from exactly one of the two."""
    if (clusters is None) == (clustering is None):
        raise ValueError("pass exactly one of clusters=C or clustering=Clustering(...), got "
                         f"clusters={clusters!r} and clustering "
                         f"{'given' if clustering is not None else 'None'}")
    if clusters is not None:
        result = cluster(q, clusters, iterations=iterations, bits=bits, generator=generator,
                         query_lengths=query_lengths)
        return result.labels, clusters
    if not isinstance(clustering, tuple) or len(clustering) != 2:
        raise TypeError("clustering must be a Clustering(labels, counts) from fastattn.cluster, "
                        f"got {type(clustering).__name__}")
    labels, counts = clustering
    expected = tuple(q.shape[:3])
    for name, t in (("labels", labels), ("counts", counts)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"clustering.{name} must be an integer tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.device != q.device:
            raise ValueError(f"clustering.{name} must be on q's device {q.device}, got {t.device}")
    if tuple(labels.shape) != expected:
        raise ValueError(f"clustering.labels must have shape (B, H, L)={expected}, got "
                         f"{tuple(labels.shape)}")
    if counts.dim() != 3 or tuple(counts.shape[:2]) != expected[:2] or counts.shape[2] < 1:
        raise ValueError(f"clustering.counts must have shape (B, H, C)={expected[:2] + ('C',)} "
                         f"with C >= 1, got {tuple(counts.shape)}")
    labels = labels.long()
    if query_lengths is not None:
        lengths = check_lengths(query_lengths, "query_lengths", q.shape[0], q.device)
        padded = torch.arange(q.shape[2], device=q.device) >= lengths.view(-1, 1, 1)
        labels = labels.masked_fill(padded, -1)
    return labels, counts.shape[2]


def _attention(q, k, v, clusters, clustering, topk, iterations, bits, query_lengths,
               key_lengths, scale, generator):
    check_qkv(q, k, v)
    scale = check_scale(scale, q.shape[-1])
    key_lengths = check_lengths(key_lengths, "key_lengths", q.shape[0], q.device)
    labels, num_clusters = _labels_of(q, clusters, clustering, iterations, bits, generator,
                                      query_lengths)
    _ops.ensure_loaded(q.device)
    out, *_ = torch.ops.fastattn.clustered_attention_fwd(
        q, k, v, labels.contiguous(), num_clusters, min(topk, q.shape[2]), key_lengths, scale)
    return out


def clustered_attention(q, k, v, clusters=None, *, clustering=None, iterations=10, bits=32,
                        query_lengths=None, key_lengths=None, scale=None, generator=None):
    """Clustered attention over (B, H, L, D) tensors.

    The queries are grouped (``clusters=C`` clusters them with :func:`cluster`; or pass a
    ``clustering``); each cluster's centroid (mean of its queries) attends all keys below
    ``key_lengths[b]`` with softmax, and every query of the cluster receives its centroid's
    output. Padded queries (label -1) get 0, as does every query of a batch with no valid key.
    Differentiable in q (through the centroids), k and v; the clustering is held constant.
    """
    return _attention(q, k, v, clusters, clustering, 0, iterations, bits, query_lengths,
                      key_lengths, scale, generator)


def improved_clustered_attention(q, k, v, clusters=None, *, clustering=None, topk=32,
                                 iterations=10, bits=32, query_lengths=None, key_lengths=None,
                                 scale=None, generator=None):
    """Improved clustered attention: for each cluster, the ``topk`` keys with the highest
    centroid scores (ties to the lower key index, valid keys only); each query gets exact
    softmax attention over those keys, scaled by the centroid's probability mass on them,
    plus the centroid's attention over all other keys. With ``topk >= L`` this is exact
    attention. Other arguments as :func:`clustered_attention`.
    """
    check_int(topk, "topk", 1)
    return _attention(q, k, v, clusters, clustering, topk, iterations, bits, query_lengths,
                      key_lengths, scale, generator)
