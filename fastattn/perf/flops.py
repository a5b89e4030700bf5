"""Exact work models: FLOPs over the visible (query, key) pairs only, and the fewest bytes moved.

Conventions (FlashAttention's, so TFLOP/s compare across projects):

- forward: 4 * D FLOPs per visible (query, key) pair: 2 * D for the score q.k and 2 * D for
  adding p * v. Softmax, scaling and masking are not counted.
- backward: 2.5 x the forward (five matmuls against the forward's two: dV, dP, dS-to-dQ and
  dK, plus the recomputation of the scores).
- fwd+bwd: 3.5 x the forward.

Pairs are counted in closed form (O(B) work, never an L x L mask), so the model also serves
L = 131072. Bytes are the minimum an op must move through device memory: each input read
once, each output written once (forward: q, k, v in and out; backward: q, k, v, out, dout in,
dq, dk, dv out). Under GQA / MQA k, v, dk and dv have H_kv heads, so fewer bytes move for the
same FLOPs (each query head still sees the same keys). Clustering (hashing and k-means) is
timed with the clustered ops but not counted: only the attention matmuls are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fastattn.perf.cases import Case

BWD_FACTOR = 2.5
DIRECTION_FACTOR = {"fwd": 1.0, "bwd": BWD_FACTOR, "fwd+bwd": 1.0 + BWD_FACTOR}
# Tensors each direction reads plus writes (see the module docstring): (of q's shape: q, out,
# dout, dq; of k's shape: k, v, dk, dv).
DIRECTION_TENSORS = {"fwd": (2, 2), "bwd": (4, 4), "fwd+bwd": (6, 6)}
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


def local_pairs(seq_len: int, window: tuple[int, int], key_length: int | None = None) -> int:
    """Visible (query, key) pairs of one (batch, head): ``i - left <= j <= i + right``, ``j < key_length``."""
    left, right = window
    keys = seq_len if key_length is None else max(0, min(int(key_length), seq_len))
    return (_pairs_at_or_below(right, seq_len, keys)
            - _pairs_at_or_below(-left - 1, seq_len, keys))


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


def case_flops(case: Case, direction: str) -> float:
    if case.op == "local":
        return local_flops(case.batch, case.heads, case.seq_len, case.head_dim, case.window,
                           direction=direction)
    topk = case.topk if case.op == "improved-clustered" else None
    return clustered_flops(case.batch, case.heads, case.seq_len, case.head_dim, case.clusters,
                           topk=topk, direction=direction)


def case_bytes(case: Case, direction: str) -> int:
    q_like, kv_like = DIRECTION_TENSORS[direction]
    elements = q_like * math.prod(case.shape) + kv_like * math.prod(case.kv_shape)
    return elements * ELEMENT_BYTES[case.dtype]
