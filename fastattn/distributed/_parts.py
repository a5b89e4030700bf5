"""Attention of some of a shard's queries over keys held elsewhere, and how partial results
over disjoint key sets combine into the exact result.

The fused op needs Lq == Lk and aligns query i with key i; a part maps its own (query, key)
offset onto the op's window instead, and pads the shorter side with zero rows at the end
(padded queries are dropped; padded keys sit past the part's ``key_lengths``). Padding only
happens when a window is wider than a shard; otherwise a halo part is exactly the edge's
``min(window, L_r)`` queries against the halo's keys.

Partials over disjoint key sets combine exactly by their lse (out = sum_p exp(lse_p - lse)
out_p), in float32 (float64 for float64 inputs), rounded to the output dtype once. Their gradients need no such step: the
op's backward recomputes probabilities from the lse and delta = rowsum(dout * out) - dlse it
is given, so each part's backward run with the *combined* out and lse gives that part's
exact share of dq, dk, dv (the decomposition ring attention uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Part:
    """Shard queries [row_lo, row_lo + rows) against keys ``k``, ``v`` (B, H, n_k, D), with the
    op's ``window`` in the part's own coordinates and the part's own ``key_lengths``."""

    row_lo: int
    rows: int
    k: torch.Tensor
    v: torch.Tensor
    window: tuple[int, int]
    key_lengths: torch.Tensor | None
    saved: dict = field(default_factory=dict)

    @property
    def row_hi(self) -> int:
        return self.row_lo + self.rows


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` (B, H, n, ...) with zero rows appended along dim 2 up to ``rows``."""
    extra = rows - t.shape[2]
    if extra == 0:
        return t
    return torch.cat((t, t.new_zeros((*t.shape[:2], extra, *t.shape[3:]))), dim=2)


def forward_part(part: Part, q: torch.Tensor, scale: float):
    """The part's (out, lse) rows; keeps what its backward needs in ``part.saved``."""
    keys = part.k.shape[2]
    size = max(part.rows, keys)
    key_lengths = part.key_lengths
    if keys < size and key_lengths is None:
        key_lengths = torch.full((q.shape[0],), keys, dtype=torch.int32, device=q.device)
    window = tuple(min(w, size) for w in part.window)
    inputs = (_pad_rows(q[:, :, part.row_lo:part.row_hi], size), _pad_rows(part.k, size),
              _pad_rows(part.v, size))
    out, lse = torch.ops.fastattn.local_attention_fwd(*inputs, *window, key_lengths, scale)
    # The padded queries' own out and lse stand in for them in the backward, where their
    # upstream gradient is 0: their contribution is then exactly 0, whatever they saw.
    part.saved = dict(inputs=inputs, window=window, key_lengths=key_lengths,
                      pad_out=out[:, :, part.rows:], pad_lse=lse[:, :, part.rows:])
    return out[:, :, :part.rows], lse[:, :, :part.rows]


def backward_part(part: Part, grad_out, grad_lse, out, lse, scale: float):
    """(dq rows, dk, dv of the part's keys), given the combined out and lse of the shard."""
    s = part.saved
    rows = slice(part.row_lo, part.row_hi)
    size = s["inputs"][0].shape[2]
    grads = torch.ops.fastattn.local_attention_bwd(
        _pad_rows(grad_out[:, :, rows], size), _pad_rows(grad_lse[:, :, rows], size),
        *s["inputs"], torch.cat((out[:, :, rows], s["pad_out"]), dim=2),
        torch.cat((lse[:, :, rows], s["pad_lse"]), dim=2), *s["window"], s["key_lengths"], scale)
    keys = part.k.shape[2]
    return grads[0][:, :, :part.rows], grads[1][:, :, :keys], grads[2][:, :, :keys]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype: float32, or float64 for float64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _spans(items):
    """(lo, hi, payload) items grouped into maximal overlapping spans: [(lo, hi, payloads)]."""
    spans = []
    for lo, hi, payload in sorted(items, key=lambda item: item[0]):
        if spans and lo < spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], hi)
            spans[-1][2].append((lo, payload))
        else:
            spans.append([lo, hi, [(lo, payload)]])
    return spans


def merge(out: torch.Tensor, lse: torch.Tensor, partials) -> None:
    """Combines (row_lo, out_rows, lse_rows) partials into ``out``/``lse`` in place.

    Only the rows the partials cover are touched, in float32 per overlapping span, so that
    each output row is rounded once however many partials it has.
    """
    items = [(lo, lo + o.shape[2], (o, s)) for lo, o, s in partials]
    for lo, hi, members in _spans(items):
        acc_out, acc_lse = _wide(out[:, :, lo:hi]), lse[:, :, lo:hi].clone()
        for row_lo, (part_out, part_lse) in members:
            rows = slice(row_lo - lo, row_lo - lo + part_out.shape[2])
            acc_out[:, :, rows], acc_lse[:, :, rows] = _combine(
                acc_out[:, :, rows], acc_lse[:, :, rows], _wide(part_out), part_lse)
        out[:, :, lo:hi] = acc_out.to(out.dtype)
        lse[:, :, lo:hi] = acc_lse


def _combine(out_a, lse_a, out_b, lse_b):
    top = torch.maximum(lse_a, lse_b)
    # A row that sees no key in either part has lse -inf in both: keep 0 and -inf, not NaN.
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = weight_a + weight_b
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (out_a * weight_a.unsqueeze(-1) + out_b * weight_b.unsqueeze(-1)) / safe.unsqueeze(-1)
    return out, top + torch.log(total)


def add_rows(target: torch.Tensor, parts) -> None:
    """Adds (row_lo, rows (B, H, n, D)) parts into ``target`` (B, H, L, D) in place, summing
    in float32 per overlapping span so that each row is rounded once."""
    items = [(lo, lo + t.shape[2], t) for lo, t in parts]
    for lo, hi, members in _spans(items):
        acc = _wide(target[:, :, lo:hi])
        for row_lo, t in members:
            acc[:, :, row_lo - lo:row_lo - lo + t.shape[2]] += _wide(t)
        target[:, :, lo:hi] = acc.to(target.dtype)
