"""Exact work models: FLOPs over the visible (query, key) pairs only, and the fewest bytes moved.

Conventions (FlashAttention's, so TFLOP/s compare across projects):

- forward: 4 * D FLOPs per visible (query, key) pair: 2 * D for the score q.k and 2 * D for
  adding p * v. Softmax, scaling and masking are not counted.
- backward: 2.5 x the forward (five matmuls against the forward's two: dV, dP, dS-to-dQ and
  dK, plus the recomputation of the scores).
- fwd+bwd: 3.5 x the forward.

Pairs are counted in closed form (O(B) work, never an L x L mask), so the model also serves
L = 131072. A KV cache (Lq != Lk) counts its Lq query rows at their bottom-right positions; a
packed batch counts each sequence on its own (nothing is visible across sequences).

Bytes are the minimum an op must move through device memory: each input read once, each
output written once (forward: q, k, v in and out; backward: q, k, v, out, dout in, dq, dk, dv
out). Of k and v only the rows some query sees need reading: every row in self-attention, but
in decode only the window's last keys of the cache (at Lq = 1, Lk = 32768, window (4096, 0):
4097 of 32768 rows); dk and dv are written whole. Under GQA / MQA k, v, dk and dv have H_kv
heads, so fewer bytes move for the same FLOPs (each query head still sees the same keys).
Clustering (hashing and k-means) is timed with the clustered ops but not counted: only the
attention matmuls are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fastattn.perf.cases import Case

BWD_FACTOR = 2.5
DIRECTION_FACTOR = {"fwd": 1.0, "bwd": BWD_FACTOR, "fwd+bwd": 1.0 + BWD_FACTOR}
# Tensors each direction reads plus writes (see the module docstring): (of q's shape: q, out,
# dout, dq; k and v read, of their rows that some query sees; dk and dv written, whole).
DIRECTION_TENSORS = {"fwd": (2, 2, 0), "bwd": (4, 2, 2), "fwd+bwd": (6, 4, 2)}
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _clamped_sum(lo: int, hi: int, cap: int) -> int:
    """sum(min(max(x, 0), cap) for x in range(lo, hi + 1)), in O(1)."""
    if hi < lo:
        return 0
    total = 0
    a, b = max(lo, 0), min(hi, cap)
    if a <= b:
        total += (a + b) * (b - a + 1) // 2
    full_from = max(lo, cap + 1)
    if full_from <= hi:
        total += cap * (hi - full_from + 1)
    return total


def _pairs_at_or_below(offset: int, queries: int, keys: int) -> int:
    """Count of (i, j), 0 <= i < queries, 0 <= j < keys, with j <= i + offset."""
    # For query i, keys 0 .. min(i + offset, keys - 1): min(max(i + offset + 1, 0), keys) of them.
    return _clamped_sum(offset + 1, offset + queries, keys)


def _keys_and_offset(seq_len, key_length, query_len) -> tuple[int, int, int]:
    """(queries, keys, offset) of one batch row, by fastattn.local_attention's alignment rule:
    query i sits at key position i + offset; offset is 0 when Lq == Lk (self-attention, where
    key_lengths only masks padding) and keys - Lq otherwise (bottom-right)."""
    queries = seq_len if query_len is None else int(query_len)
    keys = seq_len if key_length is None else max(0, min(int(key_length), seq_len))
    return queries, keys, 0 if queries == seq_len else keys - queries


def local_pairs(seq_len: int, window: tuple[int, int], key_length: int | None = None,
                query_len: int | None = None) -> int:
    """Visible (query, key) pairs of one (batch, head): ``p - left <= j <= p + right`` and
    ``j < key_length``, where query i sits at ``p = i + offset`` (:func:`_keys_and_offset`).
    ``seq_len`` is the keys' length Lk; ``query_len`` (Lq) defaults to it."""
    left, right = window
    queries, keys, offset = _keys_and_offset(seq_len, key_length, query_len)
    return (_pairs_at_or_below(offset + right, queries, keys)
            - _pairs_at_or_below(offset - left - 1, queries, keys))


def local_keys_seen(seq_len: int, window: tuple[int, int], key_length: int | None = None,
                    query_len: int | None = None) -> int:
    """Keys of one (batch, head) that at least one query sees: the queries sit at consecutive
    positions and each sees a run of left + right + 1, so together they see one run of keys."""
    left, right = window
    queries, keys, offset = _keys_and_offset(seq_len, key_length, query_len)
    if not queries:
        return 0
    return max(0, min(keys, offset + queries + right) - max(0, offset - left))


def local_flops(batch, heads, seq_len, head_dim, window, *, key_lengths: Sequence[int] | None = None,
                direction: str = "fwd") -> float:
    lengths = [None] * batch if key_lengths is None else [int(n) for n in key_lengths]
    if len(lengths) != batch:
        raise ValueError(f"key_lengths must have {batch} entries, got {len(lengths)}")
    pairs = sum(local_pairs(seq_len, window, n) for n in lengths)
    return 4.0 * head_dim * heads * pairs * DIRECTION_FACTOR[direction]


def clustered_flops(batch, heads, seq_len, head_dim, clusters, *, topk: int | None = None,
                    direction: str = "fwd") -> float:
    """Centroid attention: C x L pairs per head; improved (``topk``) adds L x topk exact pairs."""
    pairs = clusters * seq_len + (seq_len * min(topk, seq_len) if topk else 0)
    return 4.0 * head_dim * heads * batch * pairs * DIRECTION_FACTOR[direction]


def _local_rows(case: Case) -> list[tuple[int, int | None]]:
    """(keys, queries) of each attention problem of a local case: each batch row, or each
    sequence of a packed batch (its queries and keys alike)."""
    if case.seq_lens is not None:
        return [(length, None) for length in case.seq_lens]
    return [(case.seq_len, case.query_len)] * case.batch


def case_flops(case: Case, direction: str) -> float:
    if case.op == "local":
        pairs = sum(local_pairs(keys, case.window, query_len=queries)
                    for keys, queries in _local_rows(case))
        return 4.0 * case.head_dim * case.heads * pairs * DIRECTION_FACTOR[direction]
    topk = case.topk if case.op == "improved-clustered" else None
    return clustered_flops(case.batch, case.heads, case.seq_len, case.head_dim, case.clusters,
                           topk=topk, direction=direction)


def case_bytes(case: Case, direction: str) -> int:
    q_like, kv_read, kv_written = DIRECTION_TENSORS[direction]
    kv_row = math.prod(case.kv_shape) // (case.batch * case.seq_len)  # H_kv x D
    rows_seen = case.seq_len * case.batch
    if case.op == "local":
        rows_seen = sum(local_keys_seen(keys, case.window, query_len=queries)
                        for keys, queries in _local_rows(case))
    elements = (q_like * math.prod(case.shape) + kv_read * rows_seen * kv_row
                + kv_written * math.prod(case.kv_shape))
    return elements * ELEMENT_BYTES[case.dtype]
