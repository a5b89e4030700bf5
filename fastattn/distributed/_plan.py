"""Which keys each rank needs from which other rank: the halo plan, from the shard lengths.

Pure Python on the agreed lengths, so every rank derives the same plan without talking.
A rank with shard [s, e) of a sequence of length L needs keys [max(0, s - left), s) (its left
halo) and [e, min(L, e + right)) (its right halo). Each owner sends its part of a halo
directly to the rank that needs it: a window wider than a shard reaches past the neighbour,
to rank r +- 2, r +- 3, ... (the "hops"), and each of those ranks sends its own slice; nothing
is relayed, so every key crosses the network once per step and direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True)
class Piece:
    """Keys [lo, hi) (global positions) that rank ``src`` owns and rank ``dst`` needs."""

    src: int
    dst: int
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class Layout:
    """Where each rank's shard sits in the global sequence."""

    lengths: tuple[int, ...]

    @property
    def starts(self) -> tuple[int, ...]:
        return (0, *accumulate(self.lengths))[:-1]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def span(self, rank: int) -> tuple[int, int]:
        start = self.starts[rank]
        return start, start + self.lengths[rank]


@dataclass(frozen=True)
class HaloPlan:
    """One rank's view: what it receives (left and right halo, in global order) and sends."""

    rank: int
    start: int
    stop: int
    left_halo: tuple[Piece, ...]
    right_halo: tuple[Piece, ...]
    sends: tuple[Piece, ...]

    @property
    def left_size(self) -> int:
        return sum(p.size for p in self.left_halo)

    @property
    def right_size(self) -> int:
        return sum(p.size for p in self.right_halo)

    @property
    def hops(self) -> int:
        """How far (in ranks) the farthest transfer of this rank reaches."""
        return max((abs(p.src - p.dst) for p in (*self.left_halo, *self.right_halo, *self.sends)),
                   default=0)


def _piece(layout: Layout, src: int, dst: int, left: int, right: int) -> Piece | None:
    """The keys of ``src`` inside ``dst``'s halo, or None. A rank with no queries needs none."""
    if src == dst or layout.lengths[dst] == 0:
        return None
    src_lo, src_hi = layout.span(src)
    dst_lo, dst_hi = layout.span(dst)
    if src < dst:
        lo, hi = max(src_lo, dst_lo - left), min(src_hi, dst_lo)
    else:
        lo, hi = max(src_lo, dst_hi), min(src_hi, dst_hi + right)
    return Piece(src, dst, lo, hi) if lo < hi else None


def _scan(layout: Layout, rank: int, step: int, piece_of, reaches) -> list[Piece]:
    """Pieces with ranks rank+step, rank+2*step, ... while ``reaches(other)`` holds.

    Shards are contiguous and in rank order, so once a rank is out of the window's reach every
    rank beyond it is too: the scan costs O(hops), not O(world size).
    """
    found, other = [], rank + step
    while 0 <= other < len(layout.lengths) and reaches(other):
        piece = piece_of(other)
        if piece is not None:
            found.append(piece)
        other += step
    return found


def halo_plan(lengths, rank: int, left: int, right: int) -> HaloPlan:
    layout = Layout(tuple(int(n) for n in lengths))
    start, stop = layout.span(rank)
    starts = layout.starts
    ends = [s + n for s, n in zip(starts, layout.lengths, strict=True)]

    def receive_from(src):
        return _piece(layout, src, rank, left, right)

    def send_to(dst):
        return _piece(layout, rank, dst, left, right)

    # A lower rank reaches into my left halo while it ends after start - left; a higher rank
    # reaches into my right halo while it starts before stop + right. Sends mirror this.
    left_halo = _scan(layout, rank, -1, receive_from, lambda o: ends[o] > start - left)
    right_halo = _scan(layout, rank, +1, receive_from, lambda o: starts[o] < stop + right)
    sends = (_scan(layout, rank, -1, send_to, lambda o: ends[o] + right > start)
             + _scan(layout, rank, +1, send_to, lambda o: starts[o] - left < stop))
    return HaloPlan(rank, start, stop, tuple(reversed(left_halo)), tuple(right_halo),
                    tuple(sends))
