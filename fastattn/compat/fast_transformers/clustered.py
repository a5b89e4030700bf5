"""``ClusteredAttention`` and ``ImprovedClusteredAttention`` on fastattn's clustered kernels.

The queries are clustered by ``fastattn.cluster`` (LSH by ``bits`` hyperplanes, then Lloyd
iterations in Hamming space: fast-transformers' algorithm, drawn from torch's global RNG as
upstream draws its planes) and attention runs in ``fastattn.clustered_attention`` /
``fastattn.improved_clustered_attention`` on that clustering. Where the fused op cannot serve
(dropout active in training, S != L, a value dim other than the key dim) the same attention
runs as a composition of tensor ops with dropout where upstream applies it: on the centroids'
attention, and for the improved variant on both its top-k and its remaining-keys part.

Differences from upstream, all at degenerate inputs: a batch with no valid key gives 0 (upstream
gives NaN), queries past ``query_lengths`` give 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import fastattn
from fastattn.compat.fast_transformers.local import _check_inputs
from fastattn.compat.fast_transformers.masking import lengths_tensor, mask_kind
from fastattn.reference import cluster_centroids

_CHUNK = 512


class ClusteredAttention(nn.Module):
    """Each cluster's centroid attends all valid keys; its queries receive that output.

    Arguments (fast-transformers' own): ``clusters``, ``iterations`` (10), ``bits`` (32),
    ``hash_bias`` (True; False is not offered by fastattn.cluster and raises),
    ``softmax_temp`` (default ``1/sqrt(E)``), ``attention_dropout`` (0.1, in training mode),
    ``event_dispatcher`` (stored, not used).
    """

    topk = None

    def __init__(self, clusters, iterations=10, bits=32, hash_bias=True, softmax_temp=None,
                 attention_dropout=0.1, event_dispatcher=""):
        super().__init__()
        if not hash_bias:
            raise ValueError("hash_bias=False (hyperplanes through the origin) is not supported "
                             "by fastattn.cluster, got hash_bias=False")
        self.clusters = clusters
        self.iterations = iterations
        self.bits = bits
        self.hash_bias = hash_bias
        self.softmax_temp = softmax_temp
        self.dropout = nn.Dropout(attention_dropout)
        self.event_dispatcher = event_dispatcher

    def cluster(self, q, query_lengths):
        """The clustering of q (N, H, L, E); a seam for tests and for custom clusterings."""
        return fastattn.cluster(q, self.clusters, iterations=self.iterations, bits=self.bits,
                                query_lengths=query_lengths)

    def forward(self, queries, keys, values, attn_mask=None, query_lengths=None,
                key_lengths=None):
        """queries (N, L, H, E), keys (N, S, H, E), values (N, S, H, D) -> (N, L, H, D).

        ``attn_mask`` must be all ones (None counts as all ones); ``query_lengths`` and
        ``key_lengths``: length-mask objects or (N,) integer tensors (None: full).
        """
        _check_inputs(queries, keys, values)
        n, rows, _, head_dim = queries.shape
        if mask_kind(attn_mask, rows, keys.shape[1]) != "all_ones":
            raise ValueError(f"{type(self).__name__} cannot use an arbitrary attention mask; "
                             "attn_mask must be all ones")
        scale = self.softmax_temp or 1.0 / math.sqrt(head_dim)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (queries, keys, values))
        query_limit = lengths_tensor(query_lengths, "query_lengths", n, queries.device)
        key_limit = lengths_tensor(key_lengths, "key_lengths", n, queries.device)
        clustering = self.cluster(q, query_limit)
        dropout_active = self.training and self.dropout.p > 0
        if not dropout_active and q.shape == k.shape == v.shape:
            out = self._fused(q, k, v, clustering, query_limit, key_limit, scale)
        else:
            out = self._composite(q, k, v, clustering, query_limit, key_limit, scale)
        return out.permute(0, 2, 1, 3).contiguous()

    def _fused(self, q, k, v, clustering, query_limit, key_limit, scale):
        return fastattn.clustered_attention(q, k, v, clustering=clustering,
                                            query_lengths=query_limit, key_lengths=key_limit,
                                            scale=scale)

    def _composite(self, q, k, v, clustering, query_limit, key_limit, scale):
        labels, num_clusters = _labels(q, clustering, query_limit)
        probs, _ = _centroid_probs(q, k, labels, num_clusters, key_limit, scale)
        return _broadcast(self.dropout(probs) @ v, labels)

    def extra_repr(self) -> str:
        topk = "" if self.topk is None else f", topk={self.topk}"
        return (f"clusters={self.clusters}, iterations={self.iterations}, bits={self.bits}"
                f"{topk}, softmax_temp={self.softmax_temp}, attention_dropout={self.dropout.p}")


class ImprovedClusteredAttention(ClusteredAttention):
    """Per cluster, the ``topk`` keys its centroid scores highest; each query attends those
    exactly (scaled by the centroid's mass on them) plus the centroid's attention elsewhere.

    Arguments: those of :class:`ClusteredAttention` and ``topk`` (32), in upstream's order.
    """

    def __init__(self, clusters, iterations=10, bits=32, hash_bias=True, topk=32,
                 softmax_temp=None, attention_dropout=0.1, event_dispatcher=""):
        super().__init__(clusters, iterations, bits, hash_bias, softmax_temp, attention_dropout,
                         event_dispatcher)
        self.topk = topk

    def _fused(self, q, k, v, clustering, query_limit, key_limit, scale):
        return fastattn.improved_clustered_attention(
            q, k, v, clustering=clustering, topk=self.topk, query_lengths=query_limit,
            key_lengths=key_limit, scale=scale)

    def _composite(self, q, k, v, clustering, query_limit, key_limit, scale):
        labels, num_clusters = _labels(q, clustering, query_limit)
        probs, scores = _centroid_probs(q, k, labels, num_clusters, key_limit, scale)
        top = min(self.topk, k.shape[2])
        # Highest scores first, equal scores in key order (fastattn's kernels break ties alike).
        top_idx = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[..., :top]
        top_valid = torch.isfinite(scores.detach().gather(-1, top_idx))
        in_top = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_idx, top_valid)
        mass = probs.masked_fill(~in_top, 0).sum(-1, keepdim=True)
        out = _broadcast(self.dropout(probs.masked_fill(in_top, 0)) @ v, labels)
        chunks = []
        for start in range(0, q.shape[2], _CHUNK):
            lab = labels[:, :, start:start + _CHUNK]
            idx = _broadcast(top_idx, lab)  # (N, H, n, top): key indices of each query
            keys, values = (_gather_rows(t, idx) for t in (k, v))
            scores_q = (q[:, :, start:start + _CHUNK].unsqueeze(-2) @ keys.transpose(-1, -2))
            weights = _softmax_where(scores_q.squeeze(-2) * scale, _broadcast(top_valid, lab))
            weights = self.dropout(weights * _broadcast(mass, lab))
            chunks.append((weights.unsqueeze(-2) @ values).squeeze(-2))
        return out + torch.cat(chunks, dim=2)


def _labels(q, clustering, query_limit):
    """Labels (N, H, L) int64 with -1 for queries past query_lengths, and the cluster count."""
    labels = clustering.labels.long()
    if query_limit is not None:
        padded = torch.arange(q.shape[2], device=q.device) >= query_limit.view(-1, 1, 1)
        labels = labels.masked_fill(padded, -1)
    return labels, clustering.counts.shape[-1]


def _softmax_where(scores, visible):
    """Softmax over the visible entries; a row with none gives zeros (and zero gradients)."""
    seen = visible.any(-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~seen, 0.0)
    return torch.softmax(scores, dim=-1) * seen


def _centroid_probs(q, k, labels, num_clusters, key_limit, scale):
    """Each centroid's softmax over the valid keys, and its scores (-inf past key_lengths)."""
    centroids = cluster_centroids(q, labels, num_clusters)
    cols = k.shape[2]
    visible = torch.ones(1, 1, 1, cols, dtype=torch.bool, device=q.device)
    if key_limit is not None:
        visible = torch.arange(cols, device=q.device) < key_limit.view(-1, 1, 1, 1)
    scores = (centroids @ k.transpose(-1, -2)) * scale
    visible = visible.expand_as(scores)
    return _softmax_where(scores, visible), scores.masked_fill(~visible, float("-inf"))


def _broadcast(per_cluster, labels):
    """Each query's cluster row of (N, H, C, X); label -1 gives zeros."""
    index = labels.clamp_min(0).unsqueeze(-1).expand(*labels.shape, per_cluster.shape[-1])
    return per_cluster.gather(2, index).masked_fill((labels < 0).unsqueeze(-1), 0)


def _gather_rows(x, idx):
    """x (N, H, S, X) at idx (N, H, n, top) -> (N, H, n, top, X)."""
    n, h, rows, top = idx.shape
    flat = x.gather(2, idx.reshape(n, h, rows * top, 1).expand(-1, -1, -1, x.shape[-1]))
    return flat.view(n, h, rows, top, x.shape[-1])
