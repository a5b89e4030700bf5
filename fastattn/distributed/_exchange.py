"""Point-to-point transfers of key/value rows between ranks (torch.distributed P2P ops).

Rows travel packed as one contiguous (n, 2, B, H, D) tensor per (src, dst) pair: keys and
values in one message halves the message count, and with the sequence dimension outermost a
halo's pieces land in contiguous slices of one receive buffer, which the kernel reads in
place as a (B, H, n, D) view (it takes any strides with a contiguous last dim): no
concatenation after the receive.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def pack(k: torch.Tensor, v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of (B, H, L, D) k and v as one contiguous (n, 2, B, H, D) tensor."""
    return torch.stack((k[:, :, lo:hi], v[:, :, lo:hi])).permute(3, 0, 1, 2, 4).contiguous()


def unpack(buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2, B, H, D) -> (B, H, n, D) views of the keys and the values."""
    return buffer[:, 0].permute(1, 2, 0, 3), buffer[:, 1].permute(1, 2, 0, 3)


def rows_buffer(like: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised (rows, 2, B, H, D) buffer for rows of ``like`` (B, H, L, D)."""
    batch, heads, _, head_dim = like.shape
    return like.new_empty((rows, 2, batch, heads, head_dim))


def start(sends, receives, group) -> list:
    """Posts every send and receive at once and returns their works, to wait on later.

    ``sends`` and ``receives`` are (peer group rank, tensor) pairs. Each ordered pair of
    ranks exchanges at most one message per call, so messages match without tags.
    """
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=peer) for peer, t in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer) for peer, t in receives]
    return dist.batch_isend_irecv(ops) if ops else []


def finish(works) -> None:
    for work in works:
        work.wait()
