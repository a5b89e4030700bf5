"""Forward and backward of sequence-parallel local attention on one rank's shard.

Forward: post the halo exchange, compute every query of the shard against the shard's own
keys while the halos travel (exact for the interior: queries at least ``left`` from the
shard's start and ``right`` from its end need nothing else), then wait and add the edges'
halo parts. Backward: the edges' parts first, so that the halo keys' gradients are on their
way back to their owners while the interior's backward runs; then the owners add them.
"""

from __future__ import annotations

import torch

from fastattn.distributed import _exchange
from fastattn.distributed._parts import Part, add_rows, backward_part, forward_part, merge


def _shift(key_lengths, offset: int, size: int):
    """Global valid lengths as lengths of the block of keys at [offset, offset + size)."""
    return None if key_lengths is None else (key_lengths - offset).clamp(0, size)


def _receives(buffer: torch.Tensor, pieces) -> list:
    """(peer, slice of buffer) for each piece of a halo, in global order."""
    receives, at = [], 0
    for piece in pieces:
        receives.append((piece.src, buffer[at:at + piece.size]))
        at += piece.size
    return receives


def _edge_parts(plan, agreed, left_buffer, right_buffer):
    """The halo parts of this shard, each with its pieces and its keys' global start.

    Left halo keys [s - a, s): shard query i sees halo key j iff j >= i - (left - a), so the
    part's window is (left - a, a) over queries [0, min(left, L_r)). Right halo keys
    [e, e + b): query i of the last E_r = min(right, L_r) sees key j iff j <= i + right - E_r.
    """
    rows, left, right = plan.stop - plan.start, agreed.left, agreed.right
    parts = []
    if plan.left_halo:
        size = plan.left_size
        k, v = _exchange.unpack(left_buffer)
        base = plan.start - size
        part = Part(0, min(left, rows), k, v, (left - size, size),
                    _shift(agreed.key_lengths, base, size))
        parts.append((part, plan.left_halo, base))
    if plan.right_halo:
        size, edge = plan.right_size, min(right, rows)
        k, v = _exchange.unpack(right_buffer)
        part = Part(rows - edge, edge, k, v, (edge + left, right - edge),
                    _shift(agreed.key_lengths, plan.stop, size))
        parts.append((part, plan.right_halo, plan.stop))
    return parts


class ShardedLocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, agreed, plan, group):
        start, rows = plan.start, plan.stop - plan.start
        left_buffer = _exchange.rows_buffer(k, plan.left_size)
        right_buffer = _exchange.rows_buffer(k, plan.right_size)
        sends = [(p.dst, _exchange.pack(k, v, p.lo - start, p.hi - start)) for p in plan.sends]
        receives = _receives(left_buffer, plan.left_halo) + _receives(right_buffer, plan.right_halo)
        works = _exchange.start(sends, receives, group)

        window = (min(agreed.left, rows), min(agreed.right, rows))
        interior_lengths = _shift(agreed.key_lengths, start, rows)
        out, lse = torch.ops.fastattn.local_attention_fwd(
            q, k, v, *window, interior_lengths, agreed.scale)

        _exchange.finish(works)
        parts = _edge_parts(plan, agreed, left_buffer, right_buffer)
        merge(out, lse, [(part.row_lo, *forward_part(part, q, agreed.scale))
                         for part, _, _ in parts])

        ctx.save_for_backward(q, k, v, out, lse)
        ctx.parts, ctx.plan, ctx.group = parts, plan, group
        ctx.window, ctx.interior_lengths, ctx.scale = window, interior_lengths, agreed.scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, start = ctx.plan, ctx.plan.start
        dq_parts, sends = [], []
        for part, pieces, base in ctx.parts:
            dq_rows, dk_halo, dv_halo = backward_part(part, grad_out, grad_lse, out, lse, ctx.scale)
            dq_parts.append((part.row_lo, dq_rows))
            sends += [(p.src, _exchange.pack(dk_halo, dv_halo, p.lo - base, p.hi - base))
                      for p in pieces]
        receives = [(p.dst, _exchange.rows_buffer(k, p.size)) for p in plan.sends]
        works = _exchange.start(sends, receives, ctx.group)

        dq, dk, dv = torch.ops.fastattn.local_attention_bwd(
            grad_out, grad_lse, q, k, v, out, lse, *ctx.window, ctx.interior_lengths, ctx.scale)
        add_rows(dq, dq_parts)

        _exchange.finish(works)
        returned = [(p.lo - start, _exchange.unpack(buffer)) for p, (_, buffer) in
                    zip(plan.sends, receives, strict=True)]
        add_rows(dk, [(lo, kv[0]) for lo, kv in returned])
        add_rows(dv, [(lo, kv[1]) for lo, kv in returned])
        return dq, dk, dv, None, None, None
