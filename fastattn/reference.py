"""Pure-PyTorch references: readable, differentiable by autograd, exact in float64.

They work in the inputs' dtype (upcast to float64 for a gold reference) and are chunked
over queries so that long sequences never need an L x L buffer.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def _masked_softmax_parts(scores: torch.Tensor, visible: torch.Tensor):
    """Softmax weights, normaliser-safe denominators and lse; all-masked rows give 0 / -inf."""
    scores = scores.masked_fill(~visible, _NEG_INF)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    safe_denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return weights, safe_denom, lse


def _key_limit(key_lengths, batch: int, seq_len: int, device) -> torch.Tensor:
    if key_lengths is None:
        return torch.full((batch,), seq_len, device=device)
    return key_lengths.to(device=device, dtype=torch.long).clamp(0, seq_len)


def local_attention_reference(q, k, v, window, *, key_lengths=None, scale=None,
                              return_lse=False, chunk: int = 512):
    """Same contract as ``fastattn.local_attention``; memory O(chunk x (chunk + window))."""
    left, right = window
    batch, _, seq_len, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    limit = _key_limit(key_lengths, batch, seq_len, q.device).view(batch, 1, 1, 1)
    outs, lses = [], []
    for start in range(0, seq_len, chunk):
        stop = min(seq_len, start + chunk)
        k_lo, k_hi = max(0, start - left), min(seq_len, stop + right)
        rows = torch.arange(start, stop, device=q.device).view(-1, 1)
        cols = torch.arange(k_lo, k_hi, device=q.device).view(1, -1)
        visible = (cols >= rows - left) & (cols <= rows + right) & (cols < limit)
        scores = q[:, :, start:stop] @ k[:, :, k_lo:k_hi].transpose(-1, -2) * scale
        weights, denom, lse = _masked_softmax_parts(scores, visible)
        outs.append((weights @ v[:, :, k_lo:k_hi]) / denom)
        lses.append(lse)
    out = torch.cat(outs, dim=2) if outs else torch.zeros_like(q)
    lse = torch.cat(lses, dim=2) if lses else q.new_zeros(q.shape[:-1])
    return (out, lse) if return_lse else out


def cluster_centroids(q, labels, num_clusters: int):
    """Mean query of each cluster, (B, H, C, D); label -1 (padding) belongs to no cluster."""
    batch, heads, _, head_dim = q.shape
    index = torch.where(labels < 0, num_clusters, labels).long()
    sums = q.new_zeros(batch, heads, num_clusters + 1, head_dim)
    sums = sums.scatter_add(2, index.unsqueeze(-1).expand_as(q), q)
    counts = torch.zeros(batch, heads, num_clusters + 1, device=q.device, dtype=q.dtype)
    counts = counts.scatter_add(2, index, torch.ones_like(index, dtype=q.dtype))
    return (sums / counts.clamp_min(1).unsqueeze(-1))[:, :, :num_clusters]


def _centroid_attention(q, k, labels, num_clusters, key_lengths, scale):
    batch, _, seq_len, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    centroids = cluster_centroids(q, labels, num_clusters)
    limit = _key_limit(key_lengths, batch, seq_len, q.device).view(batch, 1, 1, 1)
    visible = torch.arange(seq_len, device=q.device).view(1, 1, 1, -1) < limit
    scores = centroids @ k.transpose(-1, -2) * scale
    weights, denom, _ = _masked_softmax_parts(scores, visible.expand_as(scores))
    return weights / denom, visible, scale


def _broadcast(per_cluster, labels):
    """Gives each query its cluster's row; queries labelled -1 (padding) get zeros."""
    index = labels.clamp_min(0).long().unsqueeze(-1).expand(*labels.shape, per_cluster.shape[-1])
    gathered = per_cluster.gather(2, index)
    return gathered.masked_fill((labels < 0).unsqueeze(-1), 0)


def clustered_attention_reference(q, k, v, labels, num_clusters: int, *, key_lengths=None,
                                  scale=None):
    """Each cluster's centroid attends all valid keys; its queries receive that output."""
    probs, _, _ = _centroid_attention(q, k, labels, num_clusters, key_lengths, scale)
    return _broadcast(probs @ v, labels)


def improved_clustered_attention_reference(q, k, v, labels, num_clusters: int, *, topk: int = 32,
                                           key_lengths=None, scale=None, chunk: int = 512):
    """Exact attention over each cluster's top-k keys (scaled by the centroid's mass on them)
    plus the centroid's attention over the remaining keys."""
    probs, visible, scale = _centroid_attention(q, k, labels, num_clusters, key_lengths, scale)
    seq_len = k.shape[2]
    top = min(topk, seq_len)
    top_idx = probs.topk(top, dim=-1).indices  # (B, H, C, top)
    top_probs = probs.gather(-1, top_idx)
    mass = top_probs.sum(-1, keepdim=True)  # (B, H, C, 1)
    rest = probs.scatter(-1, top_idx, torch.zeros_like(top_probs))
    base = _broadcast(rest @ v, labels)
    top_valid = visible.expand(*probs.shape).gather(-1, top_idx)
    outs = []
    for start in range(0, q.shape[2], chunk):
        lab = labels[:, :, start:start + chunk]
        idx = _broadcast(top_idx, lab).long()  # (B, H, n, top) key indices of each query
        gather_idx = idx.unsqueeze(-1).expand(*idx.shape, k.shape[-1])
        keys = k.unsqueeze(2).expand(-1, -1, idx.shape[2], -1, -1).gather(3, gather_idx)
        values = v.unsqueeze(2).expand(-1, -1, idx.shape[2], -1, -1).gather(3, gather_idx)
        scores = (q[:, :, start:start + chunk].unsqueeze(-2) @ keys.transpose(-1, -2)).squeeze(-2)
        ok = _broadcast(top_valid.to(q.dtype), lab) > 0
        weights, denom, _ = _masked_softmax_parts(scores * scale, ok)
        local = ((weights / denom).unsqueeze(-2) @ values).squeeze(-2)
        outs.append(local * _broadcast(mass, lab))
    return base + torch.cat(outs, dim=2)
