"""fast-transformers' banded primitives ``local_dot_product`` / ``local_weighted_average``.

Layout (fast-transformers 0.4.0, CPU and CUDA alike): for local context ``c`` the scores are
(N, H, L, c) and slot ``j`` of query ``l`` holds key ``s = l - c//2 + j``, so query ``l`` sees
keys ``l - c//2 .. l + (c - 1 - c//2)`` (c = 4: l-2 .. l+1; c = 5: l-2 .. l+2). A slot whose key
is outside ``[0, min(key_length, S))`` holds -1e24; the others hold ``q_l . k_s +
attn_mask[l, s]``. The weighted average sums ``A[l, j] v_s`` over every slot with ``0 <= s < S``
(key lengths are not applied there, as upstream).

Both are compositions of tensor ops that autograd differentiates exactly: the gradients are
right for any upstream gradient, on CPU and CUDA, in float32, float16 and bfloat16 (float64 on
CPU too). Queries are processed in blocks of ``B`` rows against the ``B + c - 1`` keys their
band touches, so memory stays O(L (B + c)) per head and the band is cut out of each block by a
flat "skew" reshape instead of an index gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastattn.compat.fast_transformers.masking import FINITE_NEG

# Query rows per block: B = max(c, 64) keeps each block's dense (B, B + c - 1) product at
# most twice the band it yields, and the matmuls big enough to be efficient for small c.
_MIN_BLOCK = 64


def fill_value(dtype: torch.dtype) -> float:
    """-1e24, or the most negative finite value where the dtype cannot hold it (float16)."""
    return max(FINITE_NEG, torch.finfo(dtype).min)


def local_dot_product(Q, K, attn_mask, key_lengths, local_context):
    """Banded scores (N, H, L, local_context) of Q (N, H, L, E) and K (N, H, S, E).

    ``attn_mask``: additive float (L, S) matrix (fast-transformers passes
    ``mask.additive_matrix_finite``) or None; only its in-band entries are read.
    ``key_lengths``: (N,) integer tensor of valid keys per sequence, or None (all S).
    """
    c = _check_context(local_context)
    _check_pair(Q, K, "Q", "K", "(N, H, L, E)", "(N, H, S, E)", match_last=True)
    n, _, rows, _ = Q.shape
    cols = K.shape[2]
    bias = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or tuple(attn_mask.shape) != (rows, cols):
            seen = tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
            raise ValueError(f"attn_mask must be an additive (L, S) = ({rows}, {cols}) tensor, got {seen}")
        bias = band_of(attn_mask.to(Q.device), c)
    limit = None
    if key_lengths is not None:
        if not isinstance(key_lengths, torch.Tensor) or tuple(key_lengths.shape) != (n,):
            seen = tuple(key_lengths.shape) if isinstance(key_lengths, torch.Tensor) else type(key_lengths).__name__
            raise ValueError(f"key_lengths must be an (N,) = ({n},) integer tensor, got {seen}")
        limit = key_lengths.to(Q.device, torch.long)
    return banded_scores(Q, K, bias, limit, c)


def local_weighted_average(A, V):
    """``out[l] = sum_j A[l, j] V[l - c//2 + j]`` over in-range keys: A (N, H, L, c), V (N, H, S, D)."""
    _check_pair(A, V, "A", "V", "(N, H, L, local_context)", "(N, H, S, D)", match_last=False)
    return banded_average(A, V)


def band_of(matrix: torch.Tensor, c: int) -> torch.Tensor:
    """The (L, c) band of an (L, S) matrix in the slot layout; out-of-range slots read 0."""
    rows, cols = matrix.shape
    right = max(c - 1 - c // 2, rows + c - 1 - c // 2 - cols)
    padded = F.pad(matrix, (c // 2, right))
    index = torch.arange(rows, device=matrix.device).unsqueeze(1) + torch.arange(c, device=matrix.device)
    return padded.gather(1, index)


def slot_keys(rows: int, c: int, device) -> torch.Tensor:
    """(L, c) key index of every slot: ``l - c//2 + j``."""
    return (torch.arange(rows, device=device).unsqueeze(1) - c // 2
            + torch.arange(c, device=device))


def banded_scores(q, k, bias, key_limit, c: int):
    """Slots: ``q_l . k_s + bias[l, j]`` where ``0 <= s < min(key_limit, S)``, else the fill.

    ``bias``: None or float, broadcastable to (L, c). ``key_limit``: None or (N,) int64.
    """
    rows, cols = q.shape[2], k.shape[2]
    dots = _band_dots(q, k, c)
    limit = torch.full((1,), cols, device=q.device) if key_limit is None else key_limit.clamp(0, cols)
    keys = slot_keys(rows, c, q.device)
    valid = (keys >= 0) & (keys < limit.view(-1, 1, 1, 1))
    fill = fill_value(q.dtype)
    if bias is not None:
        # Added in float32 or wider, then clamped so that float16 saturates instead of -inf.
        wide = torch.promote_types(q.dtype, torch.float32)
        dots = (dots.to(wide) + bias.to(wide)).clamp_min(fill).to(q.dtype)
    return dots.masked_fill(~valid, fill)


def banded_average(a, v):
    """``local_weighted_average`` without the checks: (N, H, L, c) x (N, H, S, D) -> (N, H, L, D)."""
    n, h, rows, c = a.shape
    block, blocks, padded_rows, width = _blocking(rows, c)
    # Lay each block's (B, c) band out as a (B, B + c - 1) dense row block: pad every row to
    # width + 1 and re-read the flat buffer with row length `width`, which shifts row i by i.
    a = F.pad(a, (0, width + 1 - c, 0, padded_rows - rows)).view(n, h, blocks, block * (width + 1))
    dense = a[..., : block * width].view(n, h, blocks, block, width)
    out = dense @ _key_windows(v, c, block, blocks, padded_rows).transpose(-1, -2)
    return out.reshape(n, h, padded_rows, v.shape[-1])[:, :, :rows]


def _band_dots(q, k, c: int):
    n, h, rows, _ = q.shape
    block, blocks, padded_rows, width = _blocking(rows, c)
    qb = F.pad(q, (0, 0, 0, padded_rows - rows)).view(n, h, blocks, block, q.shape[-1])
    dense = qb @ _key_windows(k, c, block, blocks, padded_rows)  # (n, h, blocks, B, width)
    # The inverse skew of banded_average: row i of the block keeps columns i .. i + c - 1.
    flat = F.pad(dense.flatten(-2), (0, block))
    band = flat.view(n, h, blocks, block, width + 1)[..., :c]
    return band.reshape(n, h, padded_rows, c)[:, :, :rows]


def _blocking(rows: int, c: int):
    block = max(c, _MIN_BLOCK) if rows > max(c, _MIN_BLOCK) else max(rows, 1)
    blocks = -(-rows // block)
    return block, blocks, blocks * block, block + c - 1


def _key_windows(x, c: int, block: int, blocks: int, padded_rows: int):
    """(N, H, blocks, D, B + c - 1): the keys each query block's band touches, zero outside."""
    cols = x.shape[2]
    width = block + c - 1
    padded = F.pad(x, (0, 0, c // 2, padded_rows + c - 1 - c // 2 - cols))
    return padded.unfold(2, width, block)


def _check_context(local_context) -> int:
    if isinstance(local_context, bool) or not isinstance(local_context, int) or local_context < 1:
        raise ValueError(f"local_context must be an int >= 1, got local_context={local_context!r}")
    return local_context


def _check_pair(a, b, name_a, name_b, layout_a, layout_b, *, match_last: bool):
    for name, t, layout in ((name_a, a, layout_a), (name_b, b, layout_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {layout}, got {name}.shape={tuple(t.shape)}")
    same = a.shape[:2] == b.shape[:2] and (not match_last or a.shape[-1] == b.shape[-1])
    if not same:
        raise ValueError(f"{name_a} and {name_b} must agree on (N, H{', E' if match_last else ''}), "
                         f"got {name_a}.shape={tuple(a.shape)}, {name_b}.shape={tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must share a dtype, got {a.dtype}, {b.dtype}")
    if not a.dtype.is_floating_point:
        raise TypeError(f"{name_a} must be a floating-point tensor, got {a.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on one device, got {a.device}, {b.device}")
