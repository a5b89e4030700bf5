"""``fastattn.distributed.local_attention``: the public entry, checks to result."""

from __future__ import annotations

import torch.distributed as dist

from fastattn.distributed._agree import agree
from fastattn.distributed._function import ShardedLocalAttention
from fastattn.distributed._plan import halo_plan


def local_attention(q, k, v, window, *, group=None, key_lengths=None, scale=None,
                    return_lse=False):
    """Sliding-window attention over a sequence sharded across the ranks of ``group``.

    Each rank passes its contiguous shard (B, H, L_r, D) of q, k, v, in rank order (rank 0
    holds the first L_0 positions, rank 1 the next L_1, ...); L_r may differ between ranks
    and may be 0. The result is this rank's shard of what ``fastattn.local_attention`` gives
    on the concatenated sequence: query at global position i attends key j iff
    ``i - left <= j <= i + right`` and ``j < key_lengths[b]``, where ``key_lengths`` is the
    *global* valid length (the same (B,) tensor on every rank) and ``window`` is the same on
    every rank. Returns out (B, H, L_r, D), and lse (B, H, L_r) float32 with ``return_lse``.
    GQA / MQA as in ``fastattn.local_attention``: k and v may have H_kv heads dividing H; the
    halos then carry H_kv heads.

    Collective: every rank of the group must call it, and, when it needs gradients, run the
    backward. The call starts with one all_gather of a small description of each rank's
    inputs, which agrees the shard lengths and makes a bad input raise on every rank;
    then halos of keys/values travel by point-to-point ops, ``left`` keys from the ranks
    before and ``right`` from the ranks after (several ranks when a window is wider than a
    shard). The backward returns the halo keys' gradients to their owners. A rank that never
    calls blocks the others until the group's timeout.
    """
    agreed = agree(q, k, v, window, key_lengths, scale, group)
    plan = halo_plan(agreed.lengths, agreed.rank, agreed.left, agreed.right)
    out, lse = ShardedLocalAttention.apply(q, k, v, agreed, plan,
                                           group if group is not None else dist.group.WORLD)
    return (out, lse) if return_lse else out
