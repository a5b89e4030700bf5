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


def _capped(scores, softcap):
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def local_attention_reference(q, k, v, window, *, key_lengths=None, scale=None, softcap=None,
                              return_lse=False, chunk: int = 512):
    """Same contract as ``fastattn.local_attention``; memory O(chunk x (chunk + window)).

    q (B, H, Lq, D), k and v (B, H_kv, Lk, D). Query i sits at key position i + offset[b]:
    0 when Lq == Lk (self-attention, key_lengths only masks padding), else keys[b] - Lq
    (bottom-right: the queries are the last Lq positions of a cache filled to keys[b]).
    """
    left, right = window
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    if k.shape[1] != heads:  # GQA / MQA: a repeated copy is fine in the reference
        group = heads // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = head_dim**-0.5 if scale is None else scale
    keys = _key_limit(key_lengths, batch, k_len, q.device)
    offset = torch.zeros_like(keys) if q_len == k_len else keys - q_len
    first, last = (int(offset.min()), int(offset.max())) if batch else (0, 0)
    keys, offset = keys.view(batch, 1, 1, 1), offset.view(batch, 1, 1, 1)
    outs, lses = [], []
    for start in range(0, q_len if k_len else 0, chunk):
        stop = min(q_len, start + chunk)
        # The keys any batch's queries of this chunk can see, widened to one key at least so
        # that a chunk seeing none still gets its (masked) row: out 0, lse -inf.
        k_lo = min(k_len - 1, max(0, start + first - left))
        k_hi = max(k_lo + 1, min(k_len, stop + last + right))
        pos = torch.arange(start, stop, device=q.device).view(1, 1, -1, 1) + offset
        cols = torch.arange(k_lo, k_hi, device=q.device).view(1, 1, 1, -1)
        visible = (cols >= pos - left) & (cols <= pos + right) & (cols < keys)
        scores = _capped(q[:, :, start:stop] @ k[:, :, k_lo:k_hi].transpose(-1, -2) * scale,
                         softcap)
        weights, denom, lse = _masked_softmax_parts(scores, visible)
        outs.append((weights @ v[:, :, k_lo:k_hi]) / denom)
        lses.append(lse)
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(*q.shape[:-1], v.shape[-1])
    lse = torch.cat(lses, dim=2) if lses else q.new_full(q.shape[:-1], _NEG_INF)
    return (out, lse) if return_lse else out


def local_attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, window, *, scale=None,
                                     softcap=None, return_lse=False):
    """Same contract as ``fastattn.local_attention_varlen``: q (Tq, H, D), k and v (Tk, H_kv, D)
    packed; one batched reference call per sequence. out (Tq, H, D), lse (H, Tq)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for q_lo, q_hi, k_lo, k_hi in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], strict=True):
        # (l, H, D) rows of one sequence as a batch of one, (1, H, l, D).
        one_q, one_k, one_v = (t[lo:hi].transpose(0, 1).unsqueeze(0)
                               for t, lo, hi in ((q, q_lo, q_hi), (k, k_lo, k_hi), (v, k_lo, k_hi)))
        out, lse = local_attention_reference(one_q, one_k, one_v, window, scale=scale,
                                             softcap=softcap, return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    heads = q.shape[1]
    out = torch.cat(outs) if outs else q.new_zeros(0, heads, v.shape[-1])
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros(heads, 0)
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
    """Centroid probabilities over the keys and the scaled scores (-inf past key_lengths)."""
    batch, _, seq_len, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    centroids = cluster_centroids(q, labels, num_clusters)
    limit = _key_limit(key_lengths, batch, seq_len, q.device).view(batch, 1, 1, 1)
    visible = torch.arange(seq_len, device=q.device).view(1, 1, 1, -1) < limit
    scores = (centroids @ k.transpose(-1, -2) * scale).masked_fill(~visible, _NEG_INF)
    weights, denom, _ = _masked_softmax_parts(scores, visible.expand_as(scores))
    return weights / denom, scores, scale


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


def top_keys(scores, topk: int):
    """Each row's ``topk`` highest scores (ties to the lower key index) as indices, and
    whether each is a real key (-inf scores, past key_lengths, are never selected)."""
    top = min(topk, scores.shape[-1])
    # A stable descending sort keeps equal scores in ascending key order.
    order = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[..., :top]
    return order, torch.isfinite(scores.detach().gather(-1, order))


def improved_clustered_attention_reference(q, k, v, labels, num_clusters: int, *, topk: int = 32,
                                           key_lengths=None, scale=None, top_idx=None,
                                           chunk: int = 512):
    """Exact attention over each cluster's top-k keys (scaled by the centroid's mass on them)
    plus the centroid's attention over the remaining keys. ``top_idx`` (B, H, C, top), -1 for
    no key, replaces the selection (e.g. by a kernel's, to compare near-ties alike)."""
    probs, scores, scale = _centroid_attention(q, k, labels, num_clusters, key_lengths, scale)
    if top_idx is None:
        top_idx, top_valid = top_keys(scores, topk)  # (B, H, C, top)
    else:
        top_valid, top_idx = top_idx >= 0, top_idx.long().clamp_min(0)
    in_top = torch.zeros_like(probs, dtype=torch.long).scatter_add(-1, top_idx,
                                                                   top_valid.long()) > 0
    mass = probs.masked_fill(~in_top, 0).sum(-1, keepdim=True)  # (B, H, C, 1)
    rest = probs.masked_fill(in_top, 0)
    base = _broadcast(rest @ v, labels)
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


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _reseed_query(seed: int, row: int, round_: int, cluster: int, n: int) -> int:
    return _mix64((_mix64((_mix64((seed + row) & _MASK64) + round_) & _MASK64) + cluster)
                  & _MASK64) % n


def cluster_reference(q, planes, seed: int, num_clusters: int, iterations: int,
                      query_lengths=None):
    """fastattn.cluster's algorithm, step by step: returns (labels, counts) as int64.

    ``planes`` (bits, D + 1) and ``seed`` are what fastattn.cluster draws from its generator.
    Hashes come from float64 projections, so a query within rounding of a hyperplane may
    hash differently from the float32 kernels.
    """
    batch, heads, seq_len, _ = q.shape
    planes = planes.double().cpu()
    projections = q.detach().double().cpu() @ planes[:, :-1].T  # (B, H, L, bits)
    codes = projections > planes[:, -1]
    lengths = _key_limit(query_lengths, batch, seq_len, "cpu")
    labels = torch.full((batch, heads, seq_len), -1, dtype=torch.int64)
    counts = torch.zeros(batch, heads, num_clusters, dtype=torch.int64)
    for b in range(batch):
        n = int(lengths[b])
        for h in range(heads):
            if n == 0:
                continue
            row = b * heads + h
            code = codes[b, h, :n]  # (n, bits) bool
            centroids = torch.stack([
                code[c if c < n else _reseed_query(seed, row, 0, c, n)]
                for c in range(num_clusters)])
            for t in range(iterations + 1):
                distance = (code[:, None, :] != centroids[None, :, :]).sum(-1)  # (n, C)
                assign = distance.argmin(-1)  # first minimum: ties to the lower cluster
                members = torch.bincount(assign, minlength=num_clusters)
                if t == iterations:
                    break
                ones = torch.zeros(num_clusters, code.shape[1], dtype=torch.int64)
                ones.index_add_(0, assign, code.long())
                majority = 2 * ones > members[:, None]
                centroids = torch.stack([
                    majority[c] if members[c] > 0 else code[_reseed_query(seed, row, t + 1, c, n)]
                    for c in range(num_clusters)])
            labels[b, h, :n] = assign
            counts[b, h] = members
    return labels, counts
